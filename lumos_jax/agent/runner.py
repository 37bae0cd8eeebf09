"""The host-side executor: episodes stream through the models and tools with no barriers.

Up to `max_concurrent` episodes are live at once; a finished episode's place goes to the
next task at once. Each pass (1) hands every episode's pending tool work to a thread pool,
(2) submits every pending planner/grounder turn to its (non-blocking) generator, (3) polls
each generator once — one engine step — resuming each episode whose own turn finished and
submitting what it asks for next before the next generator is polled (a grounder turn runs
in the pass its planner turn ended), and (4) waits briefly (a quarter of the pass, at most
50 ms) for the tools started, then resumes the episodes whose tools finished. So the planner turns, grounder turns and
tools of different episodes overlap; nothing waits for a batch. An episode that raises, or
whose generation fails, ends alone with the reason in its trace.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from lumos_jax.agent.execution import Executor
from lumos_jax.agent.generators import GenOutput, GenRequest, as_polling, error_output
from lumos_jax.agent.loops import EpisodeConfig, EpisodeResult, Generate, Work, episode
from lumos_jax.agent.tools.base import ToolContext
from lumos_jax.agent.trace import Trace

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Live:
    index: int
    gen: object
    trace: Trace
    task: str
    started: float
    pending: object = None
    handle: Any = None               # (generator, handle) of the turn in flight
    future: cf.Future | None = None


@dataclasses.dataclass
class RunStats:
    generate_calls: int = 0          # generator polls (each one engine step)
    batched_requests: int = 0        # turns submitted
    max_batch: int = 0               # most turns in flight on one generator at a poll
    max_live: int = 0                # most episodes live at once
    tool_jobs: int = 0
    seconds: float = 0.0


class EpisodeRunner:
    def __init__(self, generators: dict, executor_for: Callable[[int], tuple[Executor, ToolContext | None]],
                 cfg: EpisodeConfig, max_concurrent: int = 64, tool_workers: int = 8,
                 request_options: Callable[[int, Generate], dict] | None = None,
                 tool_window: float = 0.25, tool_window_max_s: float = 0.05):
        """`executor_for(i)` gives episode i its Executor and (optional) ToolContext (so
        each web episode can have its own environment). `request_options(i, generate)`
        may add GenRequest fields per turn (e.g. a benchmark's forced token count). After
        each pass the runner waits up to `tool_window` x that pass's seconds (at most
        `tool_window_max_s`) for the tools started in it, so an episode whose tool takes a
        few milliseconds has its next turn in the next pass rather than the one after."""
        if max_concurrent < 1:
            raise ValueError(f"EpisodeRunner: max_concurrent={max_concurrent} must be >= 1")
        polling: dict[int, Any] = {}
        self.generators = {m: polling.setdefault(id(g), as_polling(g)) for m, g in generators.items()}
        self.executor_for, self.cfg = executor_for, cfg
        self.max_concurrent, self.tool_workers = max_concurrent, tool_workers
        self.request_options = request_options
        self.tool_window, self.tool_window_max_s = tool_window, tool_window_max_s
        self.stats = RunStats()

    def run(self, tasks: Sequence[str]) -> list[EpisodeResult]:
        """Every task's result, in task order."""
        results: list[EpisodeResult | None] = [None] * len(tasks)
        for i, result, _ in self.stream(enumerate(tasks)):
            results[i] = result
        return results  # type: ignore[return-value]

    def stream(self, tasks: Iterable[tuple[int, str]]) -> Iterator[tuple[int, EpisodeResult, float]]:
        """(index, result, seconds) for each episode as it ends; `tasks` yields (index, task)
        and is read only as places free up."""
        start = time.perf_counter()
        source = iter(tasks)
        live: dict[int, _Live] = {}
        done: list[tuple[int, EpisodeResult, float]] = []
        exhausted = False
        with cf.ThreadPoolExecutor(self.tool_workers, thread_name_prefix="lumos-tools") as pool:
            while not exhausted or live:
                while not exhausted and len(live) < self.max_concurrent:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                        break
                    ep = self._start(item[0], item[1], done)
                    if ep is not None:
                        live[ep.index] = ep
                self.stats.max_live = max(self.stats.max_live, len(live))
                pass_start = time.perf_counter()
                self._dispatch(live, done, pool)
                progressed = self._poll_generators(live, done, pool)
                futures = [ep.future for ep in live.values() if ep.future is not None]
                if futures and not progressed and not self._generating(live):
                    cf.wait(futures, return_when=cf.FIRST_COMPLETED)
                elif futures:
                    window = min(self.tool_window * (time.perf_counter() - pass_start), self.tool_window_max_s)
                    cf.wait(futures, timeout=window)
                for ep in [e for e in live.values() if e.future is not None and e.future.done()]:
                    fut, ep.future = ep.future, None
                    try:
                        value = fut.result()
                    except Exception as e:  # noqa: BLE001 - tool work never kills the run
                        self._fail(ep, f"tool_work_error: {type(e).__name__}: {e}", live, done)
                        continue
                    self._resume(ep, value, live, done)
                yield from done
                done.clear()
        self.stats.seconds = time.perf_counter() - start

    # -- one pass -----------------------------------------------------------------------------
    def _dispatch(self, live: dict[int, _Live], done, pool) -> None:
        """Start the tool work and submit the turns that episodes are waiting for."""
        for ep in list(live.values()):
            if isinstance(ep.pending, Work):
                if ep.future is None:
                    ep.future = pool.submit(ep.pending.fn)
                    self.stats.tool_jobs += 1
            elif isinstance(ep.pending, Generate):
                if ep.handle is None:
                    self._submit(ep, live, done)
            else:
                self._fail(ep, f"internal_error: episode yielded {type(ep.pending).__name__}", live, done)

    def _submit(self, ep: _Live, live, done) -> None:
        module = ep.pending.module
        gen = self.generators.get(module)
        if gen is None:
            self._resume(ep, error_output(KeyError(f"no generator for module {module!r}")), live, done)
            return
        extra = self.request_options(ep.index, ep.pending) if self.request_options else {}
        req = GenRequest(session=f"{ep.index}/{module}", module=module, messages=list(ep.pending.messages),
                         prefill=ep.pending.prefill, **extra)
        try:
            ep.handle = (gen, gen.submit(req))
        except Exception as e:  # noqa: BLE001 - this episode alone fails
            self._resume(ep, error_output(e), live, done)
            return
        self.stats.batched_requests += 1

    def _generating(self, live: dict[int, _Live]) -> bool:
        return any(ep.handle is not None for ep in live.values())

    def _poll_generators(self, live: dict[int, _Live], done, pool) -> bool:
        """Poll each generator with turns in flight once, in turn; resume the episodes that
        finished and dispatch what they ask for next before the next generator is polled, so
        an episode whose planner turn ends here has its grounder turn in this same pass (before,
        it waited a whole pass: two engine steps per turn, one of them idle for it)."""
        progressed = False
        for gen in dict.fromkeys(self.generators.values()):
            eps = {ep.handle[1]: ep for ep in live.values() if ep.handle is not None and ep.handle[0] is gen}
            if not eps:
                continue
            self.stats.generate_calls += 1
            self.stats.max_batch = max(self.stats.max_batch, len(eps))
            try:
                finished = gen.poll(list(eps))
            except Exception as e:  # noqa: BLE001 - every turn in flight on it fails
                log.warning("agent: a generator failed with %d turns in flight: %s: %s",
                            len(eps), type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                log.debug("agent: generator failure", exc_info=True)
                finished = [(h, error_output(e)) for h in eps]
            for h, out in finished:
                ep = eps.get(h)
                if ep is None or ep.index not in live:
                    continue
                ep.handle = None
                progressed = True
                self._resume(ep, out, live, done)
            self._dispatch(live, done, pool)
        return progressed

    # -- episode lifecycle ----------------------------------------------------------------------
    def _start(self, i: int, task: str, done) -> _Live | None:
        executor, ctx = self.executor_for(i)
        trace = Trace(task=task, domain=self.cfg.domain, formulation=self.cfg.formulation, style=self.cfg.style,
                      episode_id=str(i))
        if ctx is not None:
            ctx.task, ctx.domain = task, self.cfg.domain
        ep = _Live(index=i, gen=episode(task, self.cfg, executor, ctx, trace), trace=trace, task=task,
                   started=time.perf_counter())
        try:
            ep.pending = next(ep.gen)
        except StopIteration as stop:
            done.append((i, stop.value, time.perf_counter() - ep.started))
            return None
        except Exception as e:  # noqa: BLE001
            done.append((i, self._failed_result(ep, f"internal_error: {type(e).__name__}: {e}"),
                         time.perf_counter() - ep.started))
            return None
        return ep

    def _resume(self, ep: _Live, value, live, done) -> None:
        if isinstance(value, GenOutput) and value.error and value.finish_reason == "error":
            self._fail(ep, f"generation_error: {value.error}", live, done)
            return
        try:
            ep.pending = ep.gen.send(value)
        except StopIteration as stop:
            self._close(ep, stop.value, live, done)
        except Exception as e:  # noqa: BLE001 - a bug in one episode must not stop the others
            self._fail(ep, f"internal_error: {type(e).__name__}: {e}", live, done)

    def _fail(self, ep: _Live, reason: str, live, done) -> None:
        self._close(ep, self._failed_result(ep, reason), live, done)

    @staticmethod
    def _failed_result(ep: _Live, reason: str) -> EpisodeResult:
        ep.trace.end(reason, None, -1)
        return EpisodeResult(task=ep.task, answer=None, reason=reason, rounds=-1, trace=ep.trace)

    def _close(self, ep: _Live, result: EpisodeResult, live, done) -> None:
        if live.pop(ep.index, None) is None:
            return
        done.append((ep.index, result, time.perf_counter() - ep.started))
        try:
            ep.gen.close()
        except Exception:  # noqa: BLE001
            pass
        for module, gen in self.generators.items():
            gen.release(f"{ep.index}/{module}")
