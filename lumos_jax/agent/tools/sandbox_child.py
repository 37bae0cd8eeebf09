"""Runs inside the Code sandbox's child process (started with `python -I`, empty environment).

Order matters: limits and isolation are set up before any user code runs.
1. network namespace (root, or an unprivileged user namespace) so sockets reach nothing;
2. drop root to `nobody`, so files outside the scratch dir and other users' /proc are off;
3. rlimits: CPU seconds, address space, file size, open files, processes;
4. an audit hook (PEP 578) refusing process creation, sockets, ctypes, writes outside the
   scratch dir and reads under /proc — a second line of defence, not the only one.
The request is one JSON object on stdin; the answer is one JSON line on stdout.
"""

import json
import os
import resource
import sys

NOBODY = 65534
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000


def _isolate_network():
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        flags = CLONE_NEWNET if os.getuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
        return libc.unshare(flags) == 0
    except Exception:  # noqa: BLE001 - the audit hook still blocks sockets
        return False


def _drop_privileges(scratch):
    if os.getuid() != 0:
        return
    os.chown(scratch, NOBODY, NOBODY)
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _limits(req):
    cpu = max(1, int(req["cpu_seconds"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = int(req["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    out = int(req["output_bytes"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (out, out))
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


_BLOCKED_PREFIXES = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                     "os.forkpty", "os.system", "os.kill", "os.killpg", "pty.", "sys.setrecursionlimit",
                     "os.setuid", "os.setgid", "os.chroot", "winreg.", "webbrowser.", "urllib.", "http.",
                     "ftplib.", "smtplib.", "imaplib.", "poplib.", "telnetlib.", "nntplib.")
_BLOCKED_IMPORTS = {"ctypes", "_ctypes", "socket", "_socket", "subprocess", "_posixsubprocess",
                    "multiprocessing", "_multiprocessing", "pty", "gc", "signal", "asyncio", "ssl",
                    "urllib.request", "http.client", "ftplib", "smtplib", "resource", "importlib.util"}
_PATH_EVENTS = {"os.remove", "os.unlink", "os.rename", "os.replace", "os.rmdir", "os.mkdir", "os.chmod",
                "os.chown", "os.symlink", "os.link", "os.truncate", "os.utime", "shutil.copyfile",
                "shutil.copymode", "shutil.copystat", "shutil.copytree", "shutil.rmtree", "shutil.move",
                "shutil.chown", "os.mkfifo", "os.mknod"}


def _install_audit_hook(scratch):
    scratch = os.path.realpath(scratch)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    realpath, isinstance_, str_, bytes_ = os.path.realpath, isinstance, str, bytes

    def inside(path):
        if isinstance_(path, bytes_):
            path = path.decode("utf-8", "replace")
        if not isinstance_(path, str_):
            return True  # file descriptors were opened under the same rules
        p = realpath(path)
        return p == scratch or p.startswith(scratch + "/")

    def hook(event, args):
        if event.startswith(_BLOCKED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args and args[0] in _BLOCKED_IMPORTS:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open" and args:
            path, mode, flags = (list(args) + [None, None])[:3]
            if isinstance_(path, (str_, bytes_)):
                text = path.decode("utf-8", "replace") if isinstance_(path, bytes_) else path
                if realpath(text).startswith("/proc"):
                    raise PermissionError(f"sandbox: reading {text} is not allowed")
                writing = (isinstance_(mode, str_) and any(c in mode for c in "wax+")) or \
                    (isinstance_(flags, int) and flags & write_flags)
                if writing and not inside(path):
                    raise PermissionError(f"sandbox: writing outside the scratch directory ({text})")
        if event in _PATH_EVENTS:
            for a in args:
                if isinstance_(a, (str_, bytes_)) and not inside(a):
                    raise PermissionError(f"sandbox: {event} outside the scratch directory")

    sys.addaudithook(hook)


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


# Imported while the interpreter can still read its standard library (once privileges are
# dropped, the library under a private home directory may be unreadable).
PRELOADED = ("ast", "math", "cmath", "itertools", "functools", "collections", "fractions", "decimal",
             "statistics", "re", "datetime", "random", "string", "operator", "heapq", "bisect", "json")


def main():
    import importlib

    req = json.loads(sys.stdin.read())
    scratch = req["scratch"]
    os.chdir(scratch)
    for name in PRELOADED:
        importlib.import_module(name)
    import ast

    net_isolated = _isolate_network()
    _drop_privileges(scratch)
    _limits(req)

    real_stdout = sys.stdout
    captured = _CappedWriter(int(req["output_bytes"]) // 2)
    answer = {"ok": True, "stdout": "", "value": None, "error": None, "net_isolated": net_isolated}
    try:
        tree = ast.parse(req["code"], mode="exec")
        last_expr = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last_expr = ast.Expression(tree.body.pop().value)
        body = compile(tree, "<code>", "exec")
        tail = compile(last_expr, "<code>", "eval") if last_expr is not None else None
        _install_audit_hook(scratch)
        sys.stdout = sys.stderr = captured
        scope = {"__name__": "__main__", "__builtins__": __builtins__}
        exec(body, scope)  # noqa: S102 - this is the sandbox
        value = eval(tail, scope) if tail is not None else scope.get("result", scope.get("answer"))  # noqa: S307
        answer["value"] = None if value is None else repr(value) if not isinstance(value, str) else value
    except MemoryError:
        answer.update(ok=False, error="MemoryError: memory limit exceeded")
    except BaseException as e:  # noqa: BLE001 - report everything, including SystemExit
        answer.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
    finally:
        sys.stdout = real_stdout
    answer["stdout"] = captured.text()
    real_stdout.write(json.dumps(answer) + "\n")
    real_stdout.flush()


if __name__ == "__main__":
    main()
