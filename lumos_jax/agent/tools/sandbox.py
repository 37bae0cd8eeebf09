"""Launches the Code tool's child under walls the child cannot reach: kernel namespaces,
seccomp, rlimits and an unprivileged uid, all set up before its interpreter starts.

`bubblewrap` isolation (when `bwrap` exists and user namespaces work, probed once per uid):
new user, mount, PID, network, IPC, UTS and cgroup namespaces; a read-only root holding
only the interpreter and the shared libraries it links; a size-capped private tmpfs at
/scratch as the only writable place; a fresh /proc of its own PID namespace; no /dev, /home,
/etc, /tmp or host environment; `--die-with-parent`, `--new-session`, no further user
namespaces; the seccomp `startup` program. When the agent runs as root, bubblewrap itself is
started as `nobody`, so the sandbox is an unprivileged uid to the host kernel too.

`rlimits-only` isolation (fallback, said in every answer and logged once): the same seccomp
programs and rlimits, a Landlock ruleset where the kernel has one (read the interpreter and
system libraries, write the scratch, no signals out), and the child's audit hook; when the
agent is root, also `nobody`, a private network namespace and a size-capped tmpfs scratch.
Without Landlock, files the child's uid can read are refused by the audit hook alone.

The seccomp programs and the Landlock ruleset are built in `sandbox_kernel.py`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from lumos_jax.agent.tools.sandbox_kernel import (SeccompUnavailable, landlock_abi, landlock_installer,
                                                  seccomp_loader, seccomp_programs)

BUBBLEWRAP, RLIMITS_ONLY = "bubblewrap", "rlimits-only"
NOBODY = 65534
SANDBOX_SCRATCH = "/scratch"
SYSTEM_LIBRARIES = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32")  # readable in the fallback
CHILD_SOURCE = Path(__file__).with_name("sandbox_child.py")
CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Limits:
    cpu_seconds: float = 2.0
    wall_seconds: float = 5.0
    memory_bytes: int = 512 * 2**20
    output_bytes: int = 64 * 1024
    scratch_bytes: int = 16 * 2**20
    open_files: int = 64
    extra_processes: int = 16  # over what the uid already runs (bubblewrap forks twice)

    @property
    def stdout_cap(self) -> int:
        """RLIMIT_FSIZE of the child's stdout file: its output plus room for the answer line."""
        return self.output_bytes + 4096


class SandboxUnavailable(RuntimeError):
    """The launcher could not set up the requested isolation (the child never ran)."""


@dataclasses.dataclass
class Finished:
    returncode: int | None
    stdout: bytes
    timed_out: bool
    isolation: str
    seccomp: bool
    landlock: bool


def _python_prefix() -> str:
    return os.path.realpath(sys.base_prefix)


def _interpreter() -> str:
    """The base interpreter (not the venv's symlink): the child runs the standard library only."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _hidden_ancestor(path: str) -> str | None:
    """The outermost directory above `path` that other users cannot enter (e.g. /root for a
    pyenv interpreter), or None."""
    p = Path(path)
    closed = [d for d in [p, *p.parents] if not os.stat(d).st_mode & 0o001]
    return str(closed[-1]) if closed else None


def _target_uid() -> int:
    """The uid the sandbox runs as on the host: `nobody` for root, else the agent's own."""
    return NOBODY if os.geteuid() == 0 else os.geteuid()


def _tasks_of(uid: int) -> int:
    """Processes and threads the uid runs now (RLIMIT_NPROC counts them all)."""
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    n += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return n


def _rlimits(limits: Limits, uid: int) -> list[tuple[int, tuple[int, int]]]:
    cpu = max(1, int(round(limits.cpu_seconds)))
    nproc = _tasks_of(uid) + limits.extra_processes
    return [(resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (limits.memory_bytes,) * 2),
            (resource.RLIMIT_FSIZE, (limits.stdout_cap,) * 2),
            (resource.RLIMIT_NOFILE, (limits.open_files,) * 2), (resource.RLIMIT_NPROC, (nproc, nproc)),
            (resource.RLIMIT_CORE, (0, 0))]


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.unshare.argtypes = [ctypes.c_int]
    return libc


def _mount_plan(expose: tuple[str, str, str] | None, scratch_tmpfs: tuple[str, int] | None) -> list[tuple]:
    """Mounts for the launcher's private mount namespace (root only), as (source, target, fstype,
    flags, data) or ("mkdir", path): the interpreter re-bound under an empty tmpfs laid over its
    closed ancestor (so `nobody` can run it and sees nothing else there), and a size-capped
    tmpfs owned by `nobody` as the fallback's scratch."""
    plan: list[tuple] = [(None, "/", None, MS_REC | MS_PRIVATE, None)]
    if expose:
        prefix, view, closed = expose
        plan += [(prefix, view, None, MS_BIND | MS_REC, None),
                 ("tmpfs", closed, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755"), ("mkdir", prefix),
                 (view, prefix, None, MS_BIND | MS_REC, None)]
    if scratch_tmpfs:
        path, size = scratch_tmpfs
        plan.append(("tmpfs", path, b"tmpfs", MS_NOSUID | MS_NODEV,
                     f"size={size},mode=0700,uid={NOBODY},gid={NOBODY}".encode()))
    return plan if len(plan) > 1 else []


def _preexec(rlimits, drop_to: int | None, mounts: list[tuple], new_netns: bool, install_landlock=None,
             install_seccomp=None):
    """What runs between fork and exec (as root first when the agent is root): the private mount
    namespace of `_mount_plan`, an optional network namespace, the uid drop, rlimits, then
    (fallback) Landlock and the seccomp program. Everything it needs is built before fork."""
    libc = _libc() if mounts or new_netns else None

    def fail(what):
        raise OSError(ctypes.get_errno(), f"sandbox launcher: {what} failed")

    def run():
        if mounts and libc.unshare(CLONE_NEWNS) != 0:
            fail("unshare(CLONE_NEWNS)")
        for op in mounts:
            if op[0] == "mkdir":
                os.makedirs(op[1], exist_ok=True)
                continue
            src, dst, fstype, flags, data = op
            if libc.mount(src and src.encode(), dst.encode(), fstype, flags, data) != 0:
                fail(f"mount {src} on {dst}")
        if new_netns and libc.unshare(CLONE_NEWNET) != 0:
            fail("unshare(CLONE_NEWNET)")
        if drop_to is not None:
            os.setgroups([])
            os.setresgid(drop_to, drop_to, drop_to)
            os.setresuid(drop_to, drop_to, drop_to)
        for which, value in rlimits:
            resource.setrlimit(which, value)
        if install_landlock is not None:
            install_landlock()
        if install_seccomp is not None:
            install_seccomp()

    return run


def _library_binds() -> list[str]:
    """Read-only binds (or symlinks, mirroring the host) for the dynamic loader and libc."""
    args: list[str] = []
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    for d in ("/lib", "/lib64", "/lib32", "/usr/lib64", "/usr/lib32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    usr_lib = f"/usr/lib/{multiarch}" if multiarch and os.path.isdir(f"/usr/lib/{multiarch}") else "/usr/lib"
    return args + ["--ro-bind", usr_lib, usr_lib]


def _bwrap_argv(bwrap: str, limits: Limits, seccomp_fd: int | None) -> list[str]:
    prefix = _python_prefix()
    argv = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox",
            "--disable-userns", "--die-with-parent", "--new-session", "--clearenv", "--cap-drop", "ALL",
            *_library_binds(), "--ro-bind", prefix, prefix, "--proc", "/proc",
            "--size", str(limits.scratch_bytes), "--perms", "0700", "--tmpfs", SANDBOX_SCRATCH,
            "--chdir", SANDBOX_SCRATCH, "--remount-ro", "/"]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv + ["--", _interpreter(), "-I", "-S", "-c", CHILD_SOURCE.read_text()]


def _seccomp_programs() -> tuple[bytes, bytes] | None:
    try:
        return seccomp_programs()
    except (SeccompUnavailable, OSError) as e:
        _warn_once(f"Code sandbox: no seccomp filter ({e})")
        return None


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


def _launch(isolation: str, programs, limits: Limits, base: Path, stdout) -> subprocess.Popen:
    """Start the child (not waited for); the caller feeds the request and enforces the wall clock."""
    root = os.geteuid() == 0
    uid = _target_uid()
    rlimits = _rlimits(limits, uid)
    pass_fds: list[int] = []
    expose = None
    closed = _hidden_ancestor(_python_prefix()) if root else None
    if closed:  # nobody could not run the interpreter: see _preexec
        (base / "python").mkdir()
        expose = (_python_prefix(), str(base / "python"), closed)
    if root:
        os.chmod(base, 0o711)
    if isolation == BUBBLEWRAP:
        seccomp_fd = None
        if programs is not None:
            seccomp_fd = os.memfd_create("lumos-seccomp-startup", 0)
            os.write(seccomp_fd, programs[0])
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
            pass_fds.append(seccomp_fd)
        argv = _bwrap_argv(shutil.which("bwrap"), limits, seccomp_fd)
        preexec = _preexec(rlimits, NOBODY if root else None, _mount_plan(expose, None), False)
        cwd = "/"
    else:
        scratch = base / "scratch"
        scratch.mkdir()
        if root:
            os.chown(scratch, NOBODY, NOBODY)
        install = seccomp_loader(programs[0]) if programs is not None else None
        mounts = _mount_plan(expose, (str(scratch), limits.scratch_bytes) if root else None)
        landlock = landlock_installer([_python_prefix(), *SYSTEM_LIBRARIES], [str(scratch)])
        preexec = _preexec(rlimits, NOBODY if root else None, mounts, root, landlock, install)
        argv = [_interpreter(), "-I", "-S", "-c", CHILD_SOURCE.read_text()]
        cwd = str(scratch)
    try:
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=stdout, stderr=subprocess.DEVNULL, env={},
                                cwd=cwd, start_new_session=True, close_fds=True, pass_fds=pass_fds,
                                preexec_fn=preexec)
    finally:
        for fd in pass_fds:
            os.close(fd)


@functools.lru_cache(maxsize=None)
def _bwrap_works(uid: int) -> bool:
    """Probe once per uid: does a do-nothing child start under the full bubblewrap setup?"""
    if not shutil.which("bwrap"):
        _warn_once("Code sandbox: no bwrap on PATH (Debian package bubblewrap): using the rlimits-only fallback")
        return False
    try:
        result = run({"probe": True}, Limits(cpu_seconds=5, wall_seconds=20), BUBBLEWRAP)
        ok, why = result.returncode == 0 and b'"probe": "ok"' in result.stdout, f"status {result.returncode}"
    except SandboxUnavailable as e:
        ok, why = False, str(e)
    if not ok:
        _warn_once(f"Code sandbox: bubblewrap does not work here ({why}; user namespaces off?): "
                   "using the rlimits-only fallback")
    return ok


def isolation() -> str:
    """Which isolation the Code tool gets on this host, for this uid: 'bubblewrap' or 'rlimits-only'."""
    return BUBBLEWRAP if _bwrap_works(os.geteuid()) else RLIMITS_ONLY


def run(payload: dict, limits: Limits, isolation_kind: str | None = None) -> Finished:
    """Run the child on one request (`code`, or `probe`) under `isolation_kind` (default: the
    best available) and return what it printed (capped) once it exits or the wall clock runs out."""
    kind = isolation_kind or isolation()
    if kind not in (BUBBLEWRAP, RLIMITS_ONLY):
        raise ValueError(f"sandbox isolation must be {BUBBLEWRAP!r} or {RLIMITS_ONLY!r}, not {kind!r}")
    if kind == RLIMITS_ONLY:
        _warn_once("Code sandbox: rlimits-only isolation (no namespaces; see docs/security.md, 'Code sandbox')")
    programs = _seccomp_programs()
    base = Path(tempfile.mkdtemp(prefix="lumos-sandbox-"))
    request = json.dumps(dict(payload, scratch=SANDBOX_SCRATCH if kind == BUBBLEWRAP else str(base / "scratch"),
                              output_bytes=limits.output_bytes,
                              lockdown=programs[1].hex() if programs else None)).encode()
    out_path = base / "stdout"
    timed_out = False
    try:
        with open(out_path, "wb") as out:
            try:
                proc = _launch(kind, programs, limits, base, out)
            except (OSError, subprocess.SubprocessError) as e:
                raise SandboxUnavailable(f"the {kind} sandbox could not start: {e}") from None
            try:
                proc.communicate(request, timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill(proc)
        with open(out_path, "rb") as f:
            data = f.read(limits.stdout_cap)
        return Finished(proc.returncode, data, timed_out, kind, programs is not None,
                        kind == RLIMITS_ONLY and landlock_abi() > 0)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child's session; under bubblewrap its PID namespace dies with it."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
