"""Run a function on untrusted input in a worker process that is killed at hard limits.

A tool that computes on model text (sympy can be made to run for hours or fill memory) must
not run in the agent's process: a thread cannot be stopped, it keeps the GIL busy and stalls
every other episode. `ForkServer` starts one small server process (`python -c ...serve`)
that imports the named modules once (running each one's `warm_up()`), then keeps a pool of
workers forked from itself — pre-forked, so a call costs about a millisecond plus its own
work. A worker runs one call at a time under `RLIMIT_CPU` (soft limit = CPU used so far +
the call's allowance: SIGXCPU kills it), `RLIMIT_AS` (its size at birth + the call's
allowance; the hard cap is `max_memory_mb`), `RLIMIT_FSIZE=0`, `RLIMIT_CORE=0`, nice 10. The
server SIGKILLs a worker at the call's wall-clock limit and forks a fresh one for the next
call; the parent kills the whole server (restarted on the next call) if no answer comes
within `wall_s + 1.5 s`. Workers retire after 200 calls, a MemoryError, or 256 MiB of growth.

Requests and answers are JSON lines over pipes (never pickle: the answer comes from a
process that read hostile text). A call returns the function's JSON-able value or raises a
ToolError: the function's own (same `kind`), `ToolTimeout` for CPU/wall time, and
`ResourceLimit` for memory, output size or a dead worker.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import itertools
import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from lumos_jax.agent.tools.base import BadArguments, ToolError, ToolTimeout, UndefinedVariable

_GRACE_S = 1.5  # the parent's backstop beyond the child's wall limit
_KINDS = {c.kind: c for c in (ToolError, BadArguments, UndefinedVariable, ToolTimeout)}


class ResourceLimit(ToolError):
    kind = "resource_limit"


_KINDS[ResourceLimit.kind] = ResourceLimit


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-call limits: CPU seconds, wall seconds, memory (MiB above the server's size),
    bytes of the JSON answer."""

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
    if cls is None:
        err = ToolError(message)
        err.kind = kind if isinstance(kind, str) and kind.isidentifier() else "tool_error"
        return err
    return cls(message)


class _Slot:
    """One call waiting for its answer from server process `proc`."""

    __slots__ = ("event", "answer", "proc")

    def __init__(self, proc):
        self.event, self.answer, self.proc = threading.Event(), None, proc


class ForkServer:
    """A process-limit runner shared by threads: `call('pkg.mod:fn', args, limits)`.

    `modules` are imported by the server before it forks (and each one's `warm_up()` run),
    and only the public functions they define may be called. At most `max_children` calls run at once; more
    wait for a free place (`queue_s` at most)."""

    def __init__(self, modules: tuple[str, ...], max_children: int = 4, max_memory_mb: int = 4096,
                 startup_s: float = 120.0, queue_s: float = 300.0):
        self.modules, self.max_children, self.max_memory_mb = tuple(modules), max_children, max_memory_mb
        self.startup_s, self.queue_s = startup_s, queue_s
        self._lock = threading.Lock()
        self._places = threading.BoundedSemaphore(max_children)
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen | None = None
        self._ready = threading.Event()
        self._pending: dict[int, _Slot] = {}
        self._stderr = None  # the server's stderr, to say why it did not start
        self.restarts = 0
        atexit.register(self.close)

    # -- lifecycle
    def start(self) -> None:
        """Start the server now (it warms up in the background); later calls reuse it."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        code = "from lumos_jax.agent.tools.limits import serve; serve()"
        if self._stderr is not None:
            self._stderr.close()
        self._stderr = tempfile.TemporaryFile()
        proc = subprocess.Popen([sys.executable, "-c", code, str(self.max_children), str(self.max_memory_mb),
                                 *self.modules],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                env=env, close_fds=True, start_new_session=True)
        ready = threading.Event()
        self._proc, self._ready = proc, ready
        threading.Thread(target=self._read, args=(proc, ready), daemon=True, name="lumos-forkserver").start()
        return proc

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            _kill_group(proc)

    def _kill(self, proc: subprocess.Popen) -> None:
        with self._lock:
            if self._proc is proc:
                self._proc = None
                self.restarts += 1
        _kill_group(proc)

    def _read(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        """Deliver answers by id; at EOF fail whatever is still waiting on this server."""
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if msg.get("ready"):
                ready.set()
                continue
            slot = self._pending.pop(msg.get("id"), None)
            if slot is not None:
                slot.answer = msg
                slot.event.set()
        ready.set()
        with self._lock:
            if self._proc is proc:
                self._proc = None
        for rid, slot in list(self._pending.items()):
            if slot.proc is proc:
                self._pending.pop(rid, None)
                slot.answer = {"error": {"kind": "resource_limit", "message": "the worker process died"}}
                slot.event.set()

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
        with self._lock:
            proc = self._start_locked()
            ready = self._ready
        if not ready.wait(self.startup_s):
            self._kill(proc)
            raise ResourceLimit(f"the worker process did not start within {self.startup_s:g}s")
        if proc.poll() is not None:
            self._kill(proc)
            raise ResourceLimit(f"the worker process failed to start: {_tail(self._stderr)}")
        rid, slot = next(self._ids), _Slot(proc)
        request = json.dumps({"id": rid, "fn": fn, "args": args, "cpu_s": limits.cpu_s, "wall_s": limits.wall_s,
                              "memory_mb": limits.memory_mb, "output_bytes": limits.output_bytes})
        self._pending[rid] = slot
        try:
            with self._lock:
                proc.stdin.write(request.encode() + b"\n")
                proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self._pending.pop(rid, None)
            self._kill(proc)
            raise ResourceLimit("the worker process died; it restarts on the next call") from None
        if not slot.event.wait(limits.wall_s + _GRACE_S):
            self._pending.pop(rid, None)
            self._kill(proc)  # a server that does not answer is killed with its children
            raise ToolTimeout(f"no answer within {limits.wall_s:g}s (worker killed and restarted)")
        answer = slot.answer
        if "error" in answer:
            err = answer["error"]
            raise error_from(str(err.get("kind")), str(err.get("message"))[:500])
        return answer.get("ok")


def _tail(f) -> str:
    try:
        f.seek(0)
        lines = f.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1][:300] if lines else "no message"
    except (OSError, ValueError, AttributeError):
        return "no message"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass
    for f in (proc.stdin, proc.stdout):
        try:
            f.close()
        except (OSError, ValueError):
            pass


# ---------------------------------------------------------------- server side

MAX_CALLS_PER_WORKER = 200  # a worker retires after this many calls (sympy's caches grow)
_RSS_GROWTH = 256 * 2**20  # ... or when it has grown this much


def _statm(field: int) -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[field]) * resource.getpagesize()


def _answer(req: dict, fn, args: list) -> tuple[dict, bool]:
    """(answer, retire): the call under this call's CPU and memory limits."""
    rid = req.get("id")
    used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(used + float(req["cpu_s"])), resource.RLIM_INFINITY))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (min(_BIRTH_SIZE + int(req["memory_mb"]) * 2**20, hard), hard))
    retire = False
    try:
        answer = {"id": rid, "ok": fn(*args)}
    except ToolError as e:
        answer = {"id": rid, "error": {"kind": e.kind, "message": str(e) or type(e).__name__}}
    except MemoryError:
        answer, retire = {"id": rid, "error": {"kind": "resource_limit",
                                               "message": f"memory limit of {req['memory_mb']} MiB exceeded"}}, True
    except RecursionError:
        answer, retire = {"id": rid, "error": {"kind": "bad_arguments", "message": "input nested too deeply"}}, True
    except Exception as e:  # noqa: BLE001 - a bug in the function becomes an answer, not a hang
        answer = {"id": rid, "error": {"kind": "tool_exception", "message": f"{type(e).__name__}: {e}"[:500]}}
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    return answer, retire


_BIRTH_SIZE = 0  # the worker's address space when it was forked


def _worker(functions: dict, rfd: int, wfd: int, max_memory_mb: int) -> None:
    """A forked worker: answer requests from `rfd` on `wfd` until told to stop or retired.
    Only our own code runs here; the limits bound what sympy may do with hostile input."""
    global _BIRTH_SIZE
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        for fd in range(3, 1 << 10):  # keep only our two pipe ends
            if fd not in (rfd, wfd):
                try:
                    os.close(fd)
                except OSError:
                    pass
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
            answer, retire = _answer(req, functions[req["fn"]], list(req.get("args") or []))
            retire = retire or calls == MAX_CALLS_PER_WORKER or _statm(1) - rss0 > _RSS_GROWTH
            if retire:
                answer["retire"] = True  # so the server sends it nothing more
            try:
                data = json.dumps(answer).encode()
            except (TypeError, ValueError):
                data = json.dumps({"id": req["id"], "error": {"kind": "tool_exception",
                                                              "message": "the result is not JSON data"}}).encode()
            if len(data) > int(req["output_bytes"]):
                data = json.dumps({"id": req["id"], "error": {"kind": "resource_limit", "message":
                                   f"answer of {len(data)} bytes exceeds {req['output_bytes']}"}}).encode()
            view = memoryview(data + b"\n")
            while view:
                view = view[os.write(wfd, view):]
            if retire:
                break
    finally:
        os._exit(0)


def _death_reason(status: int, req: dict) -> dict:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return {"kind": "timeout", "message": f"CPU-time limit of {req['cpu_s']:g}s exceeded (process killed)"}
        if sig == signal.SIGSEGV:
            return {"kind": "resource_limit", "message": f"crashed (memory limit of {req['memory_mb']} MiB?)"}
        return {"kind": "resource_limit", "message": f"killed by signal {sig}"}
    return {"kind": "resource_limit", "message": f"the worker exited with status {os.WEXITSTATUS(status)} "
                                                 "and no answer (memory limit?)"}


class _Server:
    """Server state: idle and busy workers, the request queue, answers to the parent."""

    def __init__(self, functions: dict, max_children: int, max_memory_mb: int, out):
        self.functions, self.max_children, self.max_memory_mb, self.out = functions, max_children, max_memory_mb, out
        self.workers: dict[int, dict] = {}  # reply fd -> {pid, to, req, deadline, buf}
        self.queue: list[dict] = []

    def send(self, msg: dict) -> None:
        self.out.write(json.dumps(msg).encode() + b"\n")

    def fork(self) -> dict:
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            _worker(self.functions, req_r, ans_w, self.max_memory_mb)
        os.close(req_r)
        os.close(ans_w)
        w = {"pid": pid, "to": req_w, "req": None, "deadline": None, "buf": b""}
        self.workers[ans_r] = w
        return w

    def dispatch(self) -> None:
        while self.queue:
            idle = [w for w in self.workers.values() if w["req"] is None]
            if not idle and len(self.workers) >= self.max_children:
                return
            req = self.queue.pop(0)
            if req.get("fn") not in self.functions:
                self.send({"id": req.get("id"), "error": {"kind": "tool_error",
                                                          "message": f"unknown function {req.get('fn')!r}"}})
                continue
            w = idle[0] if idle else self.fork()
            w["req"], w["deadline"], w["buf"] = req, time.monotonic() + float(req["wall_s"]), b""
            try:
                os.write(w["to"], json.dumps(req).encode() + b"\n")
            except OSError:  # it retired or died just now: its EOF answers for it
                pass

    def reap(self, fd: int, answer: dict | None = None) -> None:
        w = self.workers.pop(fd)
        try:
            os.kill(w["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(w["pid"], 0)
        for f in (fd, w["to"]):
            os.close(f)
        if w["req"] is not None:
            self.send(answer or {"id": w["req"]["id"], "error": _death_reason(status, w["req"])})

    def on_reply(self, fd: int) -> None:
        w = self.workers[fd]
        data = os.read(fd, 1 << 16)
        if not data:
            self.reap(fd)
            return
        w["buf"] += data
        while b"\n" in w["buf"] and w["req"] is not None:
            line, w["buf"] = w["buf"].split(b"\n", 1)
            try:
                answer = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if answer.get("id") == w["req"]["id"]:
                retire = answer.pop("retire", False)
                self.send(answer)
                w["req"], w["deadline"] = None, None
                if retire:
                    self.reap(fd)
                    return
        if w["req"] is not None and len(w["buf"]) > int(w["req"]["output_bytes"]) + 1024:
            self.reap(fd, {"id": w["req"]["id"], "error": {"kind": "resource_limit", "message": "answer too large"}})

    def expire(self) -> None:
        now = time.monotonic()
        for fd, w in list(self.workers.items()):
            if w["deadline"] is not None and w["deadline"] <= now:
                self.reap(fd, {"id": w["req"]["id"], "error": {"kind": "timeout", "message":
                               f"wall-clock limit of {w['req']['wall_s']:g}s exceeded (process killed)"}})


def serve() -> None:
    """The server loop; argv = max_children, max_memory_mb, module names. Requests on stdin,
    answers on stdout; each request goes to an idle pre-forked worker (or a new one)."""
    max_children, max_memory_mb = int(sys.argv[1]), int(sys.argv[2])
    functions = {}
    for name in sys.argv[3:]:
        module = importlib.import_module(name)
        if callable(getattr(module, "warm_up", None)):
            module.warm_up()
        functions.update({f"{name}:{k}": v for k, v in vars(module).items()
                          if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == name})
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray prints must not corrupt the protocol
    server = _Server(functions, max_children, max_memory_mb, out)
    for _ in range(min(2, max_children)):  # pre-forked: the first calls need no fork
        server.fork()
    server.send({"ready": True, "pid": os.getpid()})
    inbuf = b""
    while True:
        server.dispatch()
        now = time.monotonic()
        deadlines = [w["deadline"] for w in server.workers.values() if w["deadline"] is not None]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        readable, _, _ = select.select([0, *server.workers], [], [], timeout)
        for fd in readable:
            if fd != 0:
                if fd in server.workers:
                    server.on_reply(fd)
                continue
            data = os.read(0, 1 << 16)
            if not data:  # the parent is gone: so are its calls
                for wfd in list(server.workers):
                    server.workers[wfd]["req"] = None
                    server.reap(wfd)
                return
            inbuf += data
            *lines, inbuf = inbuf.split(b"\n")
            for line in lines:
                try:
                    server.queue.append(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    pass
        server.expire()
