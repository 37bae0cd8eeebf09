"""Run a function on untrusted input in a worker process that is killed at hard limits.

A tool that computes on model text (sympy can be made to run for hours or fill memory) must
not run in the agent's process: a thread cannot be stopped, it keeps the GIL busy and stalls
every other episode. `ForkServer` starts one small server process that imports the named
modules once (running each one's `warm_up()`) and forks workers from that warm state on
request, handing the agent each worker's pipes and a pidfd over a Unix socket. The agent
keeps a pool of idle workers (two are forked ahead), writes a request to one, and waits for
the answer with a timeout in the calling thread: a call costs a pipe round trip plus its own
work, and other threads never wait on it.

Limits: a worker runs one call at a time under `RLIMIT_CPU` (soft limit = CPU used so far +
the call's allowance: SIGXCPU kills it), `RLIMIT_AS` (its size at birth + the call's
allowance; hard cap `max_memory_mb`), `RLIMIT_FSIZE=0`, `RLIMIT_CORE=0` and nice 10. At the
call's wall-clock limit the agent SIGKILLs the worker through its pidfd (no pid reuse race)
and the next call gets a fresh one. Workers retire after 200 calls, a MemoryError, or
256 MiB of growth; a dead server is restarted on the next fork.

Requests and answers are JSON lines over pipes (never pickle: the answer comes from a
process that read hostile text). A call returns the function's JSON-able value or raises a
ToolError: the function's own (same `kind`), `ToolTimeout` for CPU/wall time, and
`ResourceLimit` for memory, output size or a dead worker.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import json
import math
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from lumos_jax.agent.tools.base import BadArguments, ToolError, ToolTimeout, UndefinedVariable

MAX_CALLS_PER_WORKER = 200  # a worker retires after this many calls (sympy's caches grow)
_RSS_GROWTH = 256 * 2**20  # ... or when it has grown this much
_SPARE = 2  # idle workers kept forked ahead


class ResourceLimit(ToolError):
    kind = "resource_limit"


_KINDS = {c.kind: c for c in (ToolError, BadArguments, UndefinedVariable, ToolTimeout, ResourceLimit)}


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-call limits: CPU seconds, wall seconds, memory (MiB above the worker's size at
    birth), bytes of the JSON answer."""

    cpu_s: float = 5.0
    wall_s: float = 10.0
    memory_mb: int = 1024
    output_bytes: int = 1 << 20

    def __post_init__(self):
        if not (self.cpu_s > 0 and self.wall_s > 0 and self.memory_mb > 0 and self.output_bytes > 0):
            raise ValueError(f"Limits: every limit must be positive, got {self}")


def error_from(kind: str, message: str) -> ToolError:
    """A ToolError of the given kind (its class when we have one)."""
    cls = _KINDS.get(kind)
    if cls is not None:
        return cls(message)
    err = ToolError(message)
    err.kind = kind if isinstance(kind, str) and kind.isidentifier() else "tool_error"
    return err


@dataclasses.dataclass
class _Worker:
    pid: int
    to: int  # request pipe (write end)
    back: int  # answer pipe (read end)
    pidfd: int | None
    calls: int = 0

    def kill(self) -> None:
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass
        self.close()

    def close(self) -> None:
        for fd in (self.to, self.back, self.pidfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.to = self.back = self.pidfd = None


class ForkServer:
    """A process-limit runner shared by threads: `call('pkg.mod:fn', args, limits)`.

    `modules` are imported by the server before it forks, and only the public functions they
    define may be called. At most `max_children` calls run at once; more wait for a free
    place (`queue_s` at most)."""

    def __init__(self, modules: tuple[str, ...], max_children: int = 4, max_memory_mb: int = 4096,
                 startup_s: float = 120.0, queue_s: float = 300.0):
        self.modules, self.max_children, self.max_memory_mb = tuple(modules), max_children, max_memory_mb
        self.startup_s, self.queue_s = startup_s, queue_s
        self._lock = threading.Lock()
        self._born = threading.Condition(self._lock)
        self._places = threading.BoundedSemaphore(max_children)
        self._proc: subprocess.Popen | None = None
        self._ctrl: socket.socket | None = None
        self._idle: list[_Worker] = []
        self._asked = 0  # forks requested and not yet delivered
        self._exits: dict[int, int] = {}  # pid -> wait status, reported by the server
        self._stderr = None
        atexit.register(self.close)

    # -- the server
    def start(self) -> None:
        """Start the server now (it warms up and forks spares in the background)."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._stderr is not None:
            self._stderr.close()
        self._stderr = tempfile.TemporaryFile()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        code = "from lumos_jax.agent.tools.limits import serve; serve()"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, str(theirs.fileno()), str(self.max_memory_mb), *self.modules],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr, env=env,
            pass_fds=(theirs.fileno(),), start_new_session=True)
        theirs.close()
        self._ctrl, self._asked = ours, 0
        threading.Thread(target=self._listen, args=(self._proc, ours), daemon=True, name="lumos-forkserver").start()
        self._ask_locked(_SPARE)

    def _ask_locked(self, n: int) -> None:
        try:
            self._ctrl.send(json.dumps({"fork": n}).encode())
            self._asked += n
        except OSError:
            pass  # the listener sees the server gone

    def _listen(self, proc: subprocess.Popen, ctrl: socket.socket) -> None:
        """Workers and exit statuses from the server; at EOF the server is gone."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(ctrl, 1 << 12, 3)
            except OSError:
                data, fds = b"", []
            if not data:
                break
            msg = json.loads(data)
            with self._lock:
                for fd in fds:
                    os.set_inheritable(fd, False)
                if "worker" in msg and len(fds) == 3:
                    self._idle.append(_Worker(msg["worker"], fds[0], fds[1], fds[2]))
                    self._asked = max(0, self._asked - 1)
                elif "exit" in msg:
                    self._exits[msg["exit"]] = msg["status"]
                    if len(self._exits) > 10_000:
                        self._exits.pop(next(iter(self._exits)))
                self._born.notify_all()
        with self._lock:
            if self._proc is proc:
                self._proc, self._asked = None, 0
            self._born.notify_all()
        ctrl.close()

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            idle, self._idle = self._idle, []
        for w in idle:
            w.kill()
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, OSError):
                pass
            proc.wait()

    def _take(self) -> _Worker:
        """An idle worker, or a freshly forked one (the server is (re)started as needed)."""
        deadline = time.monotonic() + self.startup_s
        with self._lock:
            while True:
                if self._idle:
                    w = self._idle.pop()
                    if len(self._idle) + self._asked < 1:
                        self._ask_locked(1)  # keep one spare warm
                    return w
                self._start_locked()
                if self._asked == 0:
                    self._ask_locked(1)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResourceLimit(f"no worker process within {self.startup_s:g}s: {_tail(self._stderr)}")
                self._born.wait(min(left, 1.0))

    def _exit_status(self, pid: int, wait_s: float = 2.0) -> int | None:
        deadline = time.monotonic() + wait_s
        with self._lock:
            while pid not in self._exits and time.monotonic() < deadline:
                if self._proc is None:
                    return None
                self._born.wait(0.05)
            return self._exits.pop(pid, None)

    # -- calls
    def call(self, fn: str, args: list, limits: Limits = Limits()) -> Any:
        if limits.memory_mb > self.max_memory_mb:
            raise ValueError(f"Limits.memory_mb={limits.memory_mb} exceeds the server's cap of {self.max_memory_mb}")
        if not self._places.acquire(timeout=self.queue_s):
            raise ToolTimeout(f"no free worker within {self.queue_s:g}s")
        try:
            return self._call(fn, args, limits)
        finally:
            self._places.release()

    def _call(self, fn: str, args: list, limits: Limits) -> Any:
        request = json.dumps({"fn": fn, "args": args, "cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb,
                              "output_bytes": limits.output_bytes}).encode() + b"\n"
        w = self._take()
        try:
            _write_all(w.to, request)
            line = _read_line(w.back, limits.wall_s, limits.output_bytes + 1024)
        except TimeoutError:
            w.kill()
            raise ToolTimeout(f"wall-clock limit of {limits.wall_s:g}s exceeded (process killed)") from None
        except (EOFError, OSError):
            w.close()
            raise error_from(**_death_reason(self._exit_status(w.pid), limits)) from None
        except ValueError:  # an oversized answer
            w.kill()
            raise ResourceLimit(f"answer exceeds {limits.output_bytes} bytes") from None
        try:
            answer = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            w.kill()
            raise ResourceLimit("unreadable answer from the worker process") from None
        w.calls += 1
        if answer.get("retire"):
            w.close()
        else:
            with self._lock:
                self._idle.append(w)
        if "error" in answer:
            err = answer["error"]
            raise error_from(str(err.get("kind")), str(err.get("message"))[:500])
        return answer.get("ok")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_line(fd: int, timeout_s: float, max_bytes: int) -> bytes:
    """One newline-terminated line from `fd` within `timeout_s` (TimeoutError), at most
    `max_bytes` (ValueError); EOFError if the writer is gone."""
    deadline = time.monotonic() + timeout_s
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        data = os.read(fd, 1 << 16)
        if not data:
            raise EOFError
        buf += data
        if len(buf) > max_bytes:
            raise ValueError
    return buf.split(b"\n", 1)[0]


def _death_reason(status: int | None, limits: Limits) -> dict:
    if status is not None and os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return {"kind": "timeout", "message": f"CPU-time limit of {limits.cpu_s:g}s exceeded (process killed)"}
        if sig == signal.SIGSEGV:
            return {"kind": "resource_limit", "message": f"crashed (memory limit of {limits.memory_mb} MiB?)"}
        return {"kind": "resource_limit", "message": f"the worker process was killed by signal {sig}"}
    if status is not None:
        return {"kind": "resource_limit", "message": f"the worker process exited with status "
                                                     f"{os.WEXITSTATUS(status)} and no answer"}
    return {"kind": "resource_limit", "message": "the worker process died"}


def _tail(f) -> str:
    try:
        f.seek(0)
        lines = f.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1][:300] if lines else "no message"
    except (OSError, ValueError, AttributeError):
        return "no message"


# ---------------------------------------------------------------- server and workers

_BIRTH_SIZE = 0  # a worker's address space when it was forked


def _statm(field: int) -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[field]) * resource.getpagesize()


def _answer(req: dict, functions: dict) -> tuple[dict, bool]:
    """(answer, retire): one call under this call's CPU and memory limits."""
    fn = functions.get(req.get("fn"))
    if fn is None:
        return {"error": {"kind": "tool_error", "message": f"unknown function {req.get('fn')!r}"}}, False
    used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(used + float(req["cpu_s"])), resource.RLIM_INFINITY))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (min(_BIRTH_SIZE + int(req["memory_mb"]) * 2**20, hard), hard))
    retire = False
    try:
        answer = {"ok": fn(*list(req.get("args") or []))}
    except ToolError as e:
        answer = {"error": {"kind": e.kind, "message": str(e) or type(e).__name__}}
    except MemoryError:
        answer, retire = {"error": {"kind": "resource_limit",
                                    "message": f"memory limit of {req['memory_mb']} MiB exceeded"}}, True
    except RecursionError:
        answer, retire = {"error": {"kind": "bad_arguments", "message": "input nested too deeply"}}, True
    except Exception as e:  # noqa: BLE001 - a bug in the function becomes an answer, not a hang
        answer = {"error": {"kind": "tool_exception", "message": f"{type(e).__name__}: {e}"[:500]}}
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    return answer, retire


def _worker(functions: dict, rfd: int, wfd: int, max_memory_mb: int) -> None:
    """A forked worker: answer requests from `rfd` on `wfd` until EOF or retirement. Only our
    own code runs here; the limits bound what it may do with hostile input."""
    global _BIRTH_SIZE
    try:
        signal.set_wakeup_fd(-1)  # the server's signal plumbing is not ours
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.closerange(3, min(rfd, wfd))  # keep only our two pipe ends
        os.closerange(min(rfd, wfd) + 1, max(rfd, wfd))
        os.closerange(max(rfd, wfd) + 1, 1 << 16)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        os.nice(10)  # a busy worker yields the CPU to the agent's own threads
        _BIRTH_SIZE = _statm(0)
        cap = _BIRTH_SIZE + max_memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        rss0 = _statm(1)
        reader = os.fdopen(rfd, "rb")
        for calls in range(1, MAX_CALLS_PER_WORKER + 1):
            line = reader.readline()
            if not line:
                break
            req = json.loads(line)
            answer, retire = _answer(req, functions)
            if retire or calls == MAX_CALLS_PER_WORKER or _statm(1) - rss0 > _RSS_GROWTH:
                answer["retire"] = retire = True  # the agent sends it nothing more
            try:
                data = json.dumps(answer).encode()
            except (TypeError, ValueError):
                data = json.dumps({"error": {"kind": "tool_exception", "message": "the result is not JSON data"},
                                   "retire": retire}).encode()
            if len(data) > int(req["output_bytes"]):
                data = json.dumps({"error": {"kind": "resource_limit", "message":
                                   f"answer of {len(data)} bytes exceeds {req['output_bytes']}"},
                                   "retire": retire}).encode()
            _write_all(wfd, data + b"\n")
            if retire:
                break
    finally:
        os._exit(0)


def _fork_worker(functions: dict, ctrl: socket.socket, max_memory_mb: int) -> None:
    req_r, req_w = os.pipe()
    ans_r, ans_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _worker(functions, req_r, ans_w, max_memory_mb)
    pidfd = os.pidfd_open(pid)  # before any reaping: it names this very process
    try:
        socket.send_fds(ctrl, [json.dumps({"worker": pid}).encode()], [req_w, ans_r, pidfd])
    finally:
        for fd in (req_r, req_w, ans_r, ans_w, pidfd):
            os.close(fd)


def serve() -> None:
    """The server; argv = control socket fd, max_memory_mb, module names. Forks workers on
    request ({"fork": n}) and reports their exit statuses; exits when the agent is gone."""
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    max_memory_mb = int(sys.argv[2])
    functions = {}
    for name in sys.argv[3:]:
        module = importlib.import_module(name)
        if callable(getattr(module, "warm_up", None)):
            module.warm_up()
        functions.update({f"{name}:{k}": v for k, v in vars(module).items()
                          if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == name})
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        readable, _, _ = select.select([ctrl, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 1 << 12)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                try:
                    ctrl.send(json.dumps({"exit": pid, "status": status}).encode())
                except OSError:
                    pass
        if ctrl in readable:
            data = ctrl.recv(1 << 12)
            if not data:  # the agent is gone; its workers see their pipes close
                return
            try:
                n = int(json.loads(data).get("fork", 0))
            except (ValueError, AttributeError, TypeError):
                n = 0
            for _ in range(max(0, min(n, 64))):
                _fork_worker(functions, ctrl, max_memory_mb)
