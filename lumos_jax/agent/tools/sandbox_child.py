"""Runs inside the Code sandbox (`python -I -S -c <this file>`, empty environment), after the
launcher (sandbox.py) has set up namespaces, the uid, rlimits and the startup seccomp filter.

Before any user code: import the allowed modules, load the `lockdown` seccomp program (no
execve, no executable memory from here on), then add an audit hook (PEP 578) as a second
line of defence. The hook keeps no state user code can reach: it is compiled from a template
whose lists and paths are constants of its own code object, it reads no globals except two
exception classes, and builtins it needs are literals' methods. The request is one JSON
object on stdin; the answer is one JSON line on stdout.
"""

import json
import os
import sys

PRELOADED = ("ast", "math", "cmath", "itertools", "functools", "collections", "fractions", "decimal",
             "statistics", "re", "datetime", "random", "string", "operator", "heapq", "bisect", "json",
             "copy", "numbers", "array", "calendar", "textwrap", "unicodedata", "enum", "dataclasses",
             "typing", "time", "hashlib", "base64", "struct", "binascii")
DROPPED = ("ctypes", "ctypes._endian", "_ctypes")  # used for the lockdown, then forgotten

HOOK_TEMPLATE = '''
def hook(event, args):
    if event.startswith(("socket.", "ctypes.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn",
                         "os.fork", "os.forkpty", "os.system", "os.kill", "os.killpg", "os.setuid",
                         "os.setgid", "os.setreuid", "os.setregid", "os.chroot", "os.chdir", "os.symlink",
                         "os.link", "os.mkfifo", "os.mknod", "os.startfile", "os.add_dll_directory",
                         "pty.", "mmap.", "winreg.", "webbrowser.", "urllib.", "http.", "ftplib.",
                         "smtplib.", "imaplib.", "poplib.", "telnetlib.", "nntplib.", "sys.setrecursionlimit",
                         "_thread.start_new_thread", "faulthandler.")):
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "import":
        name = args[0] if args else ""
        if name.__class__ is "".__class__ and (name in {BLOCKED_IMPORTS} or name.split(".")[0] in {BLOCKED_IMPORTS}
                                              or name.startswith(("_test", "_xx"))):
            raise ImportError("sandbox: importing " + name + " is not allowed")
        return
    if event == "open":
        path, mode, flags = (args + (None, None, None))[:3]
        if path.__class__ is (0).__class__:
            return  # descriptors come only from opens checked here
        where = place(path)
        writing = (mode.__class__ is "".__class__ and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) \\
            or (flags.__class__ is (0).__class__ and flags & {WRITE_FLAGS})
        if where == "scratch":
            return
        if writing or mode is None:  # os.open outside scratch: no directory fds for dir_fd tricks
            raise PermissionError("sandbox: opening " + shown(path) + " is not allowed (only " + {SCRATCH!r} + ")")
        if where != "library":
            raise PermissionError("sandbox: reading " + shown(path) + " is not allowed")
        return
    if event in {READ_EVENTS} and args:
        if args[0] is not None and args[0].__class__ is not (0).__class__ and place(args[0]) is None:
            raise PermissionError("sandbox: " + event + " outside the scratch directory")
    if event in {PATH_EVENTS}:
        for a in args:
            if (a.__class__ is "".__class__ or a.__class__ is b"".__class__) and place(a) != "scratch":
                raise PermissionError("sandbox: " + event + " outside the scratch directory")


def shown(path):
    return path.decode("utf-8", "replace") if path.__class__ is b"".__class__ else str(path)


def place(path):
    """'scratch', 'library' or None, by lexical normalisation (no symlinks can be made)."""
    if path.__class__ is b"".__class__:
        path = path.decode("utf-8", "surrogateescape")
    if path.__class__ is not "".__class__:
        raise PermissionError("sandbox: give paths as str or bytes (path objects could answer the check and the open differently)")
    if "\\x00" in path:
        raise PermissionError("sandbox: NUL in path")
    if not path.startswith("/"):
        path = {SCRATCH!r} + "/" + path
    parts = []
    for p in path.split("/"):
        if p == "..":
            if parts:
                parts.pop()
        elif p and p != ".":
            parts.append(p)
    norm = "/" + "/".join(parts)
    if norm == {SCRATCH!r} or norm.startswith({SCRATCH!r} + "/"):
        return "scratch"
    if norm == {LIBRARY!r} or norm.startswith({LIBRARY!r} + "/"):
        return "library"
    return None
'''
BLOCKED_IMPORTS = {"ctypes", "_ctypes", "socket", "_socket", "subprocess", "_posixsubprocess", "multiprocessing",
                   "_multiprocessing", "pty", "gc", "signal", "asyncio", "ssl", "_ssl", "mmap", "resource",
                   "faulthandler", "urllib.request", "http", "ftplib", "smtplib", "select", "selectors", "fcntl", "termios",
                   "_posixshmem", "_xxsubinterpreters", "tracemalloc", "_tracemalloc", "threading", "_thread",
                   "concurrent"}
PATH_EVENTS = {"os.remove", "os.unlink", "os.rename", "os.replace", "os.rmdir", "os.mkdir", "os.chmod",
               "os.chown", "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.lchmod", "os.setxattr",
               "os.removexattr", "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree",
               "shutil.rmtree", "shutil.move", "shutil.chown", "shutil.make_archive", "shutil.unpack_archive"}
READ_EVENTS = {"os.listdir", "os.scandir", "os.getxattr", "os.listxattr", "glob.glob"}


def _make_hook(scratch, library):
    """Compile the hook with everything it checks as constants (see module docstring)."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def literal(names):
        return "{" + ", ".join(sorted(map(repr, names))) + "}"  # a frozenset constant once compiled

    source = HOOK_TEMPLATE.format(SCRATCH=scratch, LIBRARY=library, WRITE_FLAGS=write_flags,
                                  BLOCKED_IMPORTS=literal(BLOCKED_IMPORTS), PATH_EVENTS=literal(PATH_EVENTS),
                                  READ_EVENTS=literal(READ_EVENTS))
    scope = {"__builtins__": {"PermissionError": PermissionError, "ImportError": ImportError, "str": str}}
    exec(compile(source, "<sandbox-hook>", "exec"), scope)  # noqa: S102 - our own template, no user text
    return scope["hook"]


def _lockdown(program_hex):
    """Load the lockdown seccomp program (hex of BPF bytes) on this, the only, thread."""
    import ctypes  # noqa: PLC0415 - imported for this call only, then dropped from sys.modules

    program = bytes.fromhex(program_hex)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program, len(program))
    prog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if prctl(38, 1, None, 0, 0) != 0 or prctl(22, 2, ctypes.addressof(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "lockdown seccomp filter refused")


class _CappedWriter:
    def __init__(self, limit):
        self.parts, self.size, self.limit = [], 0, limit

    def write(self, s):
        s = str(s)
        self.size += len(s)
        if self.size > self.limit:
            raise OverflowError(f"sandbox: output limit of {self.limit} characters exceeded")
        self.parts.append(s)
        return len(s)

    def flush(self):
        pass

    def text(self):
        return "".join(self.parts)


def _answer(obj):
    sys.__stdout__.write(json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def main():
    req = json.loads(sys.stdin.read())
    if req.get("probe"):
        _answer({"probe": "ok", "uid": os.getuid()})
        return
    scratch = req["scratch"]
    os.chdir(scratch)
    for name in PRELOADED:
        __import__(name)
    import ast  # noqa: PLC0415 - preloaded above

    answer = {"ok": True, "stdout": "", "value": None, "error": None, "lockdown": False}
    try:
        tree = ast.parse(req["code"], mode="exec")
    except SyntaxError as e:
        answer.update(ok=False, error=f"SyntaxError: {e}"[:500])
        _answer(answer)
        return
    last_expr = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last_expr = ast.Expression(tree.body.pop().value)
    body = compile(tree, "<code>", "exec")
    tail = compile(last_expr, "<code>", "eval") if last_expr is not None else None
    if req.get("lockdown"):
        _lockdown(req["lockdown"])
        answer["lockdown"] = True
    for name in DROPPED:
        sys.modules.pop(name, None)
    if req.get("audit_hook", True):  # off only when a test checks the kernel walls alone
        library = os.path.dirname(os.path.realpath(os.__file__))
        sys.addaudithook(_make_hook(os.path.realpath(scratch), library))
    limit = int(req["output_bytes"]) // 2
    captured = _CappedWriter(limit)
    # What the answer is built with, bound before user code can rebind builtins or modules.
    is_a, text_of, type_of, quote, write = isinstance, repr, type, json.encoder.encode_basestring_ascii, os.write
    leave = os._exit  # no interpreter finalization: audit hooks are cleared there, before the last __del__s
    memory_error, any_error, text_type = MemoryError, BaseException, str
    try:
        sys.stdout = sys.stderr = captured
        scope = {"__name__": "__sandbox__", "__builtins__": __builtins__}
        exec(body, scope)  # noqa: S102 - this is the sandbox
        value = eval(tail, scope) if tail is not None else scope.get("result", scope.get("answer"))  # noqa: S307
        answer["value"] = None if value is None else value if is_a(value, text_type) else text_of(value)
    except memory_error:
        answer.update(ok=False, error="MemoryError: memory limit exceeded")
    except any_error as e:  # noqa: BLE001 - report everything, including SystemExit
        try:
            message = text_type(e)
            if "failed to map segment" in message:  # the lockdown refuses executable mappings
                message = "sandbox: C extensions other than the preloaded modules cannot be loaded (" + message + ")"
            answer.update(ok=False, error=(type_of(e).__name__ + ": " + message)[:500])
        except any_error:
            answer.update(ok=False, error=type_of(e).__name__)
    try:
        answer["stdout"] = "".join(captured.parts)[:limit]
        # A flat dict of str / bool / None, written with C functions only (json's Python layer
        # calls builtins that user code may have replaced).
        fields = [quote(k) + ": " + ("null" if v is None else "true" if v is True else "false" if v is False
                                     else quote(v)) for k, v in answer.items()]
        write(1, ("{" + ", ".join(fields) + "}\n").encode())
    finally:
        leave(0)  # also when the write fails (a full stdout): never reach finalization


if __name__ == "__main__":
    main()
