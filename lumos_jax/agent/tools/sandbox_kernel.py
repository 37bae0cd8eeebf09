"""Kernel filters for the Code sandbox, built in the trusted parent: seccomp programs compiled by
libseccomp (the C library, through ctypes) and a Landlock ruleset (raw syscalls) for the fallback.
Nothing here runs user code; `sandbox.py` decides where each filter is loaded.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

# --- seccomp -------------------------------------------------------------------------------
# Two classic-BPF programs compiled by libseccomp (the C library, through ctypes) in the trusted
# parent, once per process:
# - startup: loaded before the sandboxed interpreter is executed (bubblewrap's --seccomp, or in
#   the fallback by the launcher just before execve). Denies what a calculator never needs:
#   ptrace and cross-process memory, every socket family, mount and namespace calls, kexec, bpf,
#   perf, keyrings, kernel modules, io_uring, signals, and new processes or threads.
# - lockdown: loaded by the child itself once its modules are imported and before user code: no
#   execve and no executable memory (mmap/mprotect with PROT_EXEC), so neither a shell nor
#   injected machine code runs. Filters stack and cannot be removed from inside.
# A syscall through another architecture's entry (x32/i386) kills the process (libseccomp's
# default for a foreign architecture).

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
PROT_EXEC = 0x4
TIOCSTI = 0x5412
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


STARTUP_DENY = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "socket", "socketpair",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount",
    "fsconfig", "fspick", "mount_setattr", "unshare", "setns",
    "kexec_load", "kexec_file_load", "bpf", "perf_event_open", "keyctl", "add_key", "request_key",
    "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "syslog", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "name_to_handle_at",
    "open_by_handle_at", "iopl", "ioperm", "quotactl", "vhangup", "personality",
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open",
    "pidfd_send_signal", "fork", "vfork", "clone",
)
ENOSYS_STARTUP = ("clone3",)  # ENOSYS, so libc falls back to clone (which is denied)
LOCKDOWN_DENY = ("execve", "execveat", "memfd_create")
NO_EXEC_MEMORY = ("mmap", "mprotect", "pkey_mprotect")  # prot is argument 2 of each


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class SeccompUnavailable(RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def _lib():
    for name in ("libseccomp.so.2", "libseccomp.so"):
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                               ctypes.POINTER(_ArgCmp)]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        return lib
    raise SeccompUnavailable("libseccomp.so.2 not found (Debian package libseccomp2)")


def _compile(rules: list[tuple[str, int, tuple]]) -> bytes:
    """rules: (syscall name, action, ((arg index, mask, value), ...)) -> BPF program bytes."""
    lib = _lib()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        for name, action, conds in rules:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue  # not a syscall on this architecture
            arr = (_ArgCmp * max(1, len(conds)))(*[_ArgCmp(i, SCMP_CMP_MASKED_EQ, m, v) for i, m, v in conds])
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(conds), arr)
            if rc < 0:
                raise SeccompUnavailable(f"seccomp rule for {name} refused ({os.strerror(-rc)})")
        fd = os.memfd_create("lumos-seccomp", 0)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise SeccompUnavailable(f"seccomp_export_bpf failed ({os.strerror(-rc)})")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


@functools.lru_cache(maxsize=1)
def seccomp_programs() -> tuple[bytes, bytes]:
    """(startup, lockdown) BPF programs; raises SeccompUnavailable without libseccomp."""
    eperm = _errno_action(errno.EPERM)
    startup = [(n, eperm, ()) for n in STARTUP_DENY]
    startup += [(n, _errno_action(errno.ENOSYS), ()) for n in ENOSYS_STARTUP]
    startup.append(("ioctl", eperm, ((1, 0xFFFFFFFF, TIOCSTI),)))  # no typing into a terminal
    lockdown = [(n, eperm, ()) for n in LOCKDOWN_DENY]
    lockdown += [(n, eperm, ((2, PROT_EXEC, PROT_EXEC),)) for n in NO_EXEC_MEMORY]
    return _compile(startup), _compile(lockdown)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_loader(program: bytes):
    """A no-argument function that installs `program` on the calling thread (no_new_privs +
    PR_SET_SECCOMP). Buffers are built here so that the call itself only makes syscalls (it
    runs between fork and exec)."""
    if len(program) % 8:
        raise ValueError("a BPF program is a whole number of 8-byte instructions")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    keep = (buf, prog)

    def install():
        if prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0 or \
                prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(keep[1]), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "seccomp filter refused by the kernel")

    return install


# --- Landlock ------------------------------------------------------------------------------
# For the rlimits-only fallback (no mount namespace to hide the host): the kernel itself limits
# the child to reading and executing the interpreter and system libraries and to writing in its
# scratch; where the kernel's Landlock ABI has them (4 and 6), also no TCP bind/connect and no
# signals or abstract-socket connections out of the sandbox. Unprivileged; a no-op (None) on
# kernels without Landlock.

SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR, FS_REMOVE_DIR, FS_REMOVE_FILE = 1, 2, 4, 8, 16, 32
FS_MAKE_DIR, FS_MAKE_REG, FS_ABI1_ALL, FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 128, 256, (1 << 13) - 1, 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@functools.lru_cache(maxsize=1)
def _syscall():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


@functools.lru_cache(maxsize=1)
def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (or the LSM is off)."""
    v = _syscall().syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                           ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(0, int(v))


def landlock_installer(read_exec: list[str], read_write: list[str]):
    """A no-argument function that confines the calling process to `read_exec` (read, list,
    execute) and `read_write` (also create, write, remove) directory trees; None without
    Landlock. Paths are opened when it runs (after the launcher's own mounts)."""
    abi = landlock_abi()
    if abi < 1:
        return None
    handled = FS_ABI1_ALL | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | \
        (FS_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(handled, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    attr_size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ro = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    rw = ro | FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG | \
        (FS_TRUNCATE if abi >= 3 else 0)
    rules = [(p, ro) for p in read_exec] + [(p, rw) for p in read_write]
    beneath = _PathBeneath()
    libc = _syscall()
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]

    def fail(what):
        raise OSError(ctypes.get_errno(), f"landlock: {what} refused")

    def install():
        ruleset = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                               ctypes.c_size_t(attr_size), ctypes.c_uint32(0))
        if ruleset < 0:
            fail("create_ruleset")
        try:
            for path, access in rules:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY)
                except OSError:
                    continue  # not on this host
                try:
                    beneath.allowed_access, beneath.parent_fd = access, fd
                    if libc.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                                    ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(beneath),
                                    ctypes.c_uint32(0)) != 0:
                        fail(f"rule for {path}")
                finally:
                    os.close(fd)
            if prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
                fail("no_new_privs")
            if libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
                fail("restrict_self")
        finally:
            os.close(ruleset)

    return install
