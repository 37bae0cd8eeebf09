"""The host-side executor: many episodes advance together.

Each pass (1) hands every episode's pending tool work to a thread pool, (2) batches every
episode waiting on the same module (planner, grounder) into one generation call — the
model works while tools run — and (3) resumes episodes whose tools finished. An episode
that raises, or whose generation fails, ends cleanly with the reason in its trace.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import time
from typing import Callable, Sequence

from lumos_jax.agent.execution import Executor
from lumos_jax.agent.generators import GenOutput, GenRequest
from lumos_jax.agent.loops import EpisodeConfig, EpisodeResult, Generate, Work, episode
from lumos_jax.agent.tools.base import ToolContext
from lumos_jax.agent.trace import Trace


@dataclasses.dataclass
class _Live:
    index: int
    gen: object
    trace: Trace
    task: str
    pending: object = None
    future: cf.Future | None = None


@dataclasses.dataclass
class RunStats:
    generate_calls: int = 0
    batched_requests: int = 0
    max_batch: int = 0
    tool_jobs: int = 0
    seconds: float = 0.0


class EpisodeRunner:
    def __init__(self, generators: dict, executor_for: Callable[[int], tuple[Executor, ToolContext | None]],
                 cfg: EpisodeConfig, max_concurrent: int = 64, tool_workers: int = 8):
        """`executor_for(i)` gives episode i its Executor and (optional) ToolContext (so
        each web episode can have its own environment)."""
        self.generators, self.executor_for, self.cfg = generators, executor_for, cfg
        self.max_concurrent, self.tool_workers = max_concurrent, tool_workers
        self.stats = RunStats()

    def run(self, tasks: Sequence[str]) -> list[EpisodeResult]:
        start = time.perf_counter()
        results: list[EpisodeResult | None] = [None] * len(tasks)
        queue = list(range(len(tasks)))[::-1]
        live: dict[int, _Live] = {}
        with cf.ThreadPoolExecutor(self.tool_workers, thread_name_prefix="lumos-tools") as pool:
            while queue or live:
                while queue and len(live) < self.max_concurrent:
                    i = queue.pop()
                    ep = self._start(i, tasks[i], results)
                    if ep is not None:
                        live[i] = ep
                for ep in [e for e in live.values() if not isinstance(e.pending, (Work, Generate))]:
                    self._fail(ep, f"internal_error: episode yielded {type(ep.pending).__name__}", live, results)
                for ep in live.values():
                    if isinstance(ep.pending, Work) and ep.future is None:
                        ep.future = pool.submit(ep.pending.fn)
                        self.stats.tool_jobs += 1
                by_module: dict[str, list[_Live]] = {}
                for ep in live.values():
                    if isinstance(ep.pending, Generate):
                        by_module.setdefault(ep.pending.module, []).append(ep)
                for module, eps in by_module.items():
                    outs = self._generate(module, eps)
                    for ep, out in zip(eps, outs):
                        self._resume(ep, out, live, results)
                waiting = [ep.future for ep in live.values() if ep.future is not None]
                if waiting:
                    if not by_module:
                        cf.wait(waiting, return_when=cf.FIRST_COMPLETED)
                    for ep in [e for e in live.values() if e.future is not None and e.future.done()]:
                        fut, ep.future = ep.future, None
                        try:
                            value = fut.result()
                        except Exception as e:  # noqa: BLE001 - tool work never kills the run
                            self._fail(ep, f"tool_work_error: {type(e).__name__}: {e}", live, results)
                            continue
                        self._resume(ep, value, live, results)
        self.stats.seconds = time.perf_counter() - start
        return results  # type: ignore[return-value]

    def _start(self, i: int, task: str, results) -> _Live | None:
        executor, ctx = self.executor_for(i)
        trace = Trace(task=task, domain=self.cfg.domain, formulation=self.cfg.formulation, style=self.cfg.style,
                      episode_id=str(i))
        if ctx is not None:
            ctx.task, ctx.domain = task, self.cfg.domain
        ep = _Live(index=i, gen=episode(task, self.cfg, executor, ctx, trace), trace=trace, task=task)
        try:
            ep.pending = next(ep.gen)
        except StopIteration as stop:
            results[i] = stop.value
            return None
        except Exception as e:  # noqa: BLE001
            results[i] = self._failed_result(ep, f"internal_error: {type(e).__name__}: {e}")
            return None
        return ep

    def _generate(self, module: str, eps: list[_Live]) -> list[GenOutput]:
        gen = self.generators.get(module)
        reqs = [GenRequest(session=f"{ep.index}/{module}", module=module, messages=list(ep.pending.messages))
                for ep in eps]
        self.stats.generate_calls += 1
        self.stats.batched_requests += len(reqs)
        self.stats.max_batch = max(self.stats.max_batch, len(reqs))
        t0 = time.perf_counter()
        try:
            if gen is None:
                raise KeyError(f"no generator for module {module!r}")
            outs = gen.generate(reqs)
            if len(outs) != len(reqs):
                raise RuntimeError(f"generator returned {len(outs)} outputs for {len(reqs)} requests")
        except Exception as e:  # noqa: BLE001 - each episode gets an empty output with the error
            msg = f"{type(e).__name__}: {e}"
            outs = [GenOutput(text="", error=msg, finish_reason="error") for _ in reqs]
        dt = time.perf_counter() - t0
        for o in outs:
            o.seconds = dt
        return outs

    def _resume(self, ep: _Live, value, live, results) -> None:
        if isinstance(value, GenOutput) and value.error and value.finish_reason == "error":
            self._fail(ep, f"generation_error: {value.error}", live, results)
            return
        try:
            ep.pending = ep.gen.send(value)
        except StopIteration as stop:
            results[ep.index] = stop.value
            self._close(ep, live)
        except Exception as e:  # noqa: BLE001 - a bug in one episode must not stop the others
            self._fail(ep, f"internal_error: {type(e).__name__}: {e}", live, results)

    def _fail(self, ep: _Live, reason: str, live, results) -> None:
        results[ep.index] = self._failed_result(ep, reason)
        self._close(ep, live)

    @staticmethod
    def _failed_result(ep: _Live, reason: str) -> EpisodeResult:
        ep.trace.end(reason, None, -1)
        return EpisodeResult(task=ep.task, answer=None, reason=reason, rounds=-1, trace=ep.trace)

    def _close(self, ep: _Live, live) -> None:
        live.pop(ep.index, None)
        try:
            ep.gen.close()
        except Exception:  # noqa: BLE001
            pass
        for module, gen in self.generators.items():
            gen.release(f"{ep.index}/{module}")
