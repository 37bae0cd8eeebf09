"""Token backends for `ChatModelGenerator`: the plain greedy generator and the Engine.

`GreedyBackend` recomputes every prompt from scratch each turn (the reference's behaviour,
kept as a fallback and a baseline). `EngineBackend` keeps one engine slot per session and
extends it with only the new tokens, so each prompt token is prefilled once; when a new
prompt does not extend what the slot holds (reference-style re-tokenization drift), the
slot is restarted and the recomputation is counted in `recomputed_tokens`.
"""

from __future__ import annotations

import itertools
import threading
from typing import Sequence

from lumos_jax.generation import greedy_generate
from lumos_jax.inference import Engine, SamplingParams
from lumos_jax.inference.params import decode_params


class GreedyBackend:
    """Each call on a fresh engine: nothing is kept from one turn to the next. By default
    that engine is sized to the call (`greedy_generate`); `engine_settings` (Engine keyword
    arguments) fix its sizes instead, so that every call runs the same compiled programs."""

    def __init__(self, model, **engine_settings):
        self.model = model
        self.prefilled_tokens = 0
        self._lock = threading.Lock()
        self.engine_settings = engine_settings
        self._weights = decode_params(model) if engine_settings else None

    def generate_tokens(self, batch: Sequence[tuple[str, list[int]]], max_new_tokens: int,
                        stop_ids: Sequence[int]) -> list[tuple[list[int], int]]:
        with self._lock:
            prompts = [list(ids) for _, ids in batch]
            if self._weights is None:
                outs = greedy_generate(self.model, prompts, max_new_tokens, stop_ids)
            else:  # a fresh engine (empty pool and prefix table) over the same weights
                engine = Engine.from_params(self.model.config, *self._weights, **self.engine_settings)
                params = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids))
                outs = [r.tokens for r in engine.generate(prompts, params)]
            self.prefilled_tokens += sum(len(p) for p in prompts)
        return [(o, len(p)) for o, p in zip(outs, prompts)]

    def release(self, session: str) -> None:
        pass


class EngineBackend:
    """Sessions on `lumos_jax.inference.Engine` slots (API in docs/inference.md)."""

    def __init__(self, engine, seed: int = 0):
        self.engine, self._params_cls, self.seed = engine, SamplingParams, seed
        self.slots: dict[str, int] = {}
        self.recomputed_tokens = 0
        self.evicted_sessions = 0
        self._lock = threading.Lock()
        self._handles = itertools.count()
        self._waiting: list[tuple] = []
        self._running: dict[int, int] = {}     # slot -> handle of the turn it generates
        self._done: dict[int, tuple] = {}

    def _params(self, max_new_tokens, stop_ids):
        return self._params_cls(temperature=0.0, max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids),
                                seed=self.seed)

    def generate_tokens(self, batch, max_new_tokens, stop_ids):
        with self._lock:
            params = self._params(max_new_tokens, stop_ids)
            pending = list(range(len(batch)))
            results: dict[int, tuple[list[int], int]] = {}
            while pending:
                running: dict[int, int] = {}
                waiting = []
                for i in pending:
                    try:
                        slot = self._begin(batch[i][0], batch[i][1], params)
                    except ValueError as e:  # e.g. the prompt no longer fits max_len: this one only
                        self._drop(batch[i][0])
                        results[i] = ([], 0, str(e))
                        continue
                    if slot is None:
                        waiting.append(i)
                    else:
                        running[slot] = i
                if not running and waiting:
                    raise RuntimeError("engine: no free slot for a new session (release finished episodes "
                                       "or raise num_slots)")
                while running:
                    for r in self.engine.step():
                        i = running.pop(r.slot, None)
                        if i is not None:
                            results[i] = (list(r.tokens), r.prompt_tokens)
                pending = waiting
            return [results[i] for i in range(len(batch))]

    # -- non-blocking: submit / poll (the streaming runner) --------------------------------
    def submit(self, session: str, ids: list[int], max_new_tokens: int, stop_ids) -> int:
        """Queue one turn; `poll` starts it as soon as a slot is free."""
        with self._lock:
            h = next(self._handles)
            self._waiting.append((h, session, list(ids), self._params(max_new_tokens, stop_ids)))
            return h

    def poll(self, handles) -> list:
        """Admit waiting turns, run one engine step, return the finished turns among
        `handles` as (handle, (tokens, prompt tokens computed[, error]))."""
        with self._lock:
            if not any(h in self._done for h in handles):
                self._admit()
                if self._running:
                    for r in self.engine.step():
                        h = self._running.pop(r.slot, None)
                        if h is not None:
                            self._done[h] = (list(r.tokens), r.prompt_tokens)
            return [(h, self._done.pop(h)) for h in list(handles) if h in self._done]

    def _admit(self) -> None:
        waiting, self._waiting = self._waiting, []
        for item in waiting:
            h, session, ids, params = item
            try:
                slot = self._begin(session, ids, params)
                if slot is None and self._evict_idle():
                    slot = self._begin(session, ids, params)
            except ValueError as e:  # e.g. the prompt no longer fits max_len: this one only
                self._drop(session)
                self._done[h] = ([], 0, str(e))
                continue
            if slot is None:  # every slot is generating: wait for a later step
                self._waiting.append(item)
            else:
                self._running[slot] = h

    def _evict_idle(self) -> bool:
        """Free the slot of the least recently used session that is not generating (an
        episode waiting on tools); its next turn restarts it. False if none is idle."""
        busy = set(self._running)
        for session, slot in self.slots.items():  # insertion order = least recently used first
            if slot not in busy:
                self.evicted_sessions += 1
                self.recomputed_tokens += len(self.engine.sequence(slot))
                self._drop(session)
                return True
        return False

    def _begin(self, session: str, ids: list[int], params):
        slot = self.slots.get(session)
        if slot is not None:
            seq = self.engine.sequence(slot)
            if len(seq) < len(ids) and ids[:len(seq)] == seq:
                self.engine.extend(slot, ids[len(seq):], params)
                self.slots[session] = self.slots.pop(session)  # most recently used last
                return slot
            self.recomputed_tokens += min(len(seq), len(ids))
            self.engine.release(slot)
            del self.slots[session]
        if self.engine.free_slots == 0:
            return None
        slot = self.engine.start(ids, params, request_id=session)
        self.slots[session] = slot
        return slot

    def _drop(self, session: str) -> None:
        slot = self.slots.pop(session, None)
        if slot is not None:
            self.engine.release(slot)

    def release(self, session: str) -> None:
        with self._lock:
            self._drop(session)
