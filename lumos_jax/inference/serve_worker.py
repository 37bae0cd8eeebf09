"""The engine-driving thread of `lumos-jax serve`: the only thread that touches the engine.

HTTP handler threads put `_Job`s in its inbox and read events from each job's queue:
("tokens", ids so far), ("done", TurnResult) or ("error", (status, message)).
"""

from __future__ import annotations

import logging
import queue
import threading

log = logging.getLogger(__name__)

_POLL_S = 0.05


class _Job:
    def __init__(self, ids, parsed):
        self.ids, self.parsed = ids, parsed
        self.events: queue.Queue = queue.Queue()
        self.cancelled = False


class EngineWorker(threading.Thread):
    """The only thread that touches the engine: admits jobs, steps, reports progress.

    A failure is confined to the requests it can be pinned on: a job the engine refuses
    gets its own error; a failing `step()` (no request to blame) fails the requests in
    flight, which are cancelled, and the worker keeps serving. Only when the engine cannot
    even be cleared does the worker stop, with `fatal` set (then /health says 503)."""

    def __init__(self, engine):
        super().__init__(daemon=True, name="engine-worker")
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self._stop_event = threading.Event()
        self._live: set[_Job] = set()
        self.fatal: str | None = None
        self.step_failures = 0

    @property
    def healthy(self) -> bool:
        return self.is_alive() and self.fatal is None

    def submit(self, job: _Job) -> None:
        self.inbox.put(job)

    def cancel(self, job: _Job) -> None:
        """Free the request's slot (the client went away); done on the engine thread."""
        job.cancelled = True
        self.inbox.put(job)

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                self._admit()
                if self.engine.busy:
                    self._step()
        except Exception as e:  # the engine could not be cleared: nothing can be served
            self.fatal = f"{type(e).__name__}: {e}"
            log.error("lumos-jax serve: engine thread stopped (%s)", self.fatal)
        for job in list(self._live):
            job.events.put(("error", (503, "the engine thread stopped")))

    def _admit(self) -> None:
        try:
            job = self.inbox.get(timeout=_POLL_S) if not self.engine.busy else self.inbox.get_nowait()
        except queue.Empty:
            return
        while job is not None:
            try:
                if job.cancelled:
                    self._live.discard(job)
                    self.engine.cancel(job)
                else:
                    self.engine.submit(job.ids, job.parsed.sampling, request_id=job)
                    self._live.add(job)
            except ValueError as e:
                job.events.put(("error", (400, str(e))))
            except Exception as e:  # noqa: BLE001 - this request only
                job.events.put(("error", (500, f"the engine refused the request ({type(e).__name__}: {e})")))
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                job = None

    def _step(self) -> None:
        try:
            finished = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail what is in flight, keep serving
            self.step_failures += 1
            message = f"engine failure: {type(e).__name__}: {e}"
            log.warning("lumos-jax serve: %s", message)
            for job in list(self._live):
                job.events.put(("error", (500, message)))
                self.engine.cancel(job)  # raises when the engine is beyond repair -> fatal
            self._live.clear()
            if self.engine.busy:
                raise RuntimeError(f"engine still busy after cancelling every request ({message})")
            return
        for job, tokens in self.engine.progress().items():
            job.events.put(("tokens", tokens))
        for r in finished:
            self._live.discard(r.request_id)
            r.request_id.events.put(("done", r))
