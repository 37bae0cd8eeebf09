"""Compile an engine's device programs ahead of their first use, several at a time.

An agent run meets its shape buckets one by one and, without this, compiles each program on
the spot with the whole batch waiting (the 135M SVAMP eval on one H200, 2026-12-01: 18
programs, 167 s of its 197 s). With `engine_settings.precompile_threads = N` the engine's
first device call starts compiling every other program it can ever call (`program_shapes`)
in N background threads; XLA compiles outside the GIL, so they overlap each other and the
run. A call whose program is ready runs the compiled executable; one still compiling waits
for it rather than compiling it twice, and one still queued is compiled by the calling thread
at once (not after the queue ahead of it); anything else (say, more stop ids than the first
call had) goes through `jax.jit` as before. Same programs, same results: only when they are
compiled changes.

With `engine_settings.program_cache_dir` set (`program_cache.py`) every call goes ahead of
time, with or without threads: a program is taken from memory, else loaded from the disk
cache, else lowered, compiled and written there; the threads, too, load before compiling.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import threading
from typing import Any, Callable

import jax
import numpy as np

from lumos_jax.inference.paged_slots import DECODE_ROW_FLOOR, pow2_at_least, prefill_lengths, row_count
from lumos_jax.inference.program_cache import (ProgramCache, abstract_text, describe, entry_key, environment,
                                               fresh_compile)
from lumos_jax.inference.sampling import row_keys
from lumos_jax.inference.steps import RowControls, decode_loop, prefill_step

log = logging.getLogger(__name__)
# programs being built in this process, by their full key text: an engine of the same shapes
# that needs one meanwhile waits for it instead of compiling it too
_SHARED: dict[str, cf.Future] = {}
_SHARED_LOCK = threading.Lock()


def program_shapes(num_slots: int, max_len: int, max_prefill_tokens: int) -> list[tuple]:
    """(kind, rows, tokens) of every call the engine can make: prefill rows as
    `Engine._prefill_rows` pads them for each length bucket, decode rows as `row_count`."""
    shapes = []
    for t in prefill_lengths(max_len):
        per_call = max(1, min(num_slots, max_prefill_tokens // t))
        rows = {max(k, min(row_count(k, t, num_slots), max_prefill_tokens // t)) for k in range(1, per_call + 1)}
        shapes += [("prefill", n, t) for n in sorted(rows)]
    decode = {row_count(k, 1, num_slots) for k in range(1, num_slots + 1)}
    return shapes + [("decode", b, 1) for b in sorted(decode)]


def _controls(rows: int, n_stop: int) -> RowControls:
    z = np.zeros(rows, np.int32)
    return RowControls(np.zeros(rows, np.float32), z, np.ones(rows, np.float32),
                       row_keys(np.zeros(rows, np.uint32)), np.full((rows, n_stop), -1, np.int32), z)


class Precompiler:
    """The engine's compiled programs by (kind, rows, tokens, n_stop); see the module doc."""

    def __init__(self, engine, threads: int = 0, cache_dir: str | None = None):
        self.engine, self.threads = engine, int(threads)
        self.cache = ProgramCache(cache_dir) if cache_dir else None
        self._ready: dict[tuple, Any] = {}
        self._pending: dict[tuple, cf.Future] = {}
        self._failed: set[tuple] = set()
        self._lock = threading.Lock()
        self._pool: cf.ThreadPoolExecutor | None = None
        self._abstract = None
        self._key_base: tuple[dict, dict] | None = None
        self.stats = {"precompiled": 0, "precompile_failed": 0, "ran_precompiled": 0,
                      "cache_loaded": 0, "cache_stored": 0, "shared": 0}

    @property
    def cache_dir(self) -> str | None:
        return None if self.cache is None else str(self.cache.directory)

    def _prepare(self) -> None:
        """The weights' and pool's shapes and shardings, and the key parts they give (once:
        the pool is replaced by calls, never reshaped)."""
        e = self.engine
        self._abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                      (e.params, e.cache))
        try:  # the key also lets engines of one process with the same shapes share programs
            engine = {"arguments": abstract_text(self._abstract), "spec": repr(e.spec),
                      "cache_sharding": describe(e.cache_sharding), "table_width": e.memory.max_blocks}
            self._key_base = (environment(), engine)
        except Exception as err:  # noqa: BLE001 - no key, no cache: compile as without one
            if self.cache is not None:
                log.warning("program cache %s off for this engine: its key cannot be made (%s: %s)",
                            self.cache.directory, type(err).__name__, err)
            self.cache = None

    def _cache_key(self, key: tuple) -> tuple[str, dict]:
        kind, rows, tokens, n_stop = key
        call = {"kind": kind, "rows": rows, "tokens": tokens, "n_stop": n_stop}
        if kind == "decode":
            e = self.engine
            call.update(steps=e.steps_per_call, attention=e.decode_attention)
        return f"{kind}-r{rows}-t{tokens}-s{n_stop}", entry_key(*self._key_base, call)

    def _lower(self, kind: str, rows: int, tokens: int, n_stop: int):
        """Lowered from the weights' and pool's shapes and shardings (`_abstract`): the pool
        itself is donated by the calls running meanwhile."""
        e = self.engine
        params, cache = self._abstract
        z = np.zeros(rows, np.int32)
        table = np.zeros((rows, e.memory.max_blocks), np.int32)
        controls = _controls(rows, n_stop)
        if kind == "prefill":
            return prefill_step.lower(params, cache, table, np.zeros((rows, tokens), np.int32), z, z, controls,
                                      spec=e.spec, cache_sharding=e.cache_sharding)
        return decode_loop.lower(params, cache, table, z, z, z, np.zeros(rows, bool), z, controls,
                                 spec=e.spec, steps=e.steps_per_call, cache_sharding=e.cache_sharding,
                                 attention=e.decode_attention)

    def _compile(self, key: tuple):
        """The program of `key`: the one another engine of this process with the same shapes is
        building right now (a planner and a grounder of one size precompiling side by side: one
        compile, not two), else loaded from the disk cache, else lowered and compiled (and
        stored); None if that fails (the call then goes through jax.jit)."""
        if self._key_base is None:
            return self._build(key)
        shared = json.dumps(self._cache_key(key)[1], sort_keys=True, default=repr)
        with _SHARED_LOCK:
            future = _SHARED.get(shared)
            owner = future is None
            if owner:  # registered only by a thread that builds it now, so a waiter never waits on a queue
                future = _SHARED[shared] = cf.Future()
        if not owner:
            compiled = future.result()
            if compiled is None:
                return self._build(key)
            with self._lock:
                self._ready[key] = compiled
                self.stats["precompiled"] += 1
                self.stats["shared"] += 1
            return compiled
        compiled = None
        try:
            compiled = self._build(key)
        finally:
            with _SHARED_LOCK:  # in flight only: a later engine loads it from the disk cache
                _SHARED.pop(shared, None)
            future.set_result(compiled)
        return compiled

    def _build(self, key: tuple):
        compiled = None
        if self.cache is not None:
            label, full = self._cache_key(key)
            compiled = self.cache.load(label, full)
            if compiled is not None:
                with self._lock:
                    self.stats["cache_loaded"] += 1
        if compiled is None:
            try:
                if self.cache is None:
                    compiled, storable = self._lower(*key).compile(), False
                else:
                    compiled, storable = fresh_compile(self._lower(*key))
            except Exception as err:  # noqa: BLE001 - that shape falls back to jax.jit
                log.warning("precompile %s failed (%s: %s); it compiles on first use", key, type(err).__name__, err)
                with self._lock:
                    self.stats["precompile_failed"] += 1
                    self._failed.add(key)
                return None
            if storable and self.cache.store(label, full, compiled):
                with self._lock:
                    self.stats["cache_stored"] += 1
        with self._lock:
            self._ready[key] = compiled
            self.stats["precompiled"] += 1
        return compiled

    def _start(self, first: tuple) -> None:
        """Queue every program shape with the first call's stop-id width: that one first, then
        the decode programs (every run needs one right after its first prefill), smallest first,
        then prefills by size (short prompts and few rows come before the rare long ones)."""
        e = self.engine
        n_stop = first[-1]
        self._pool = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="lumos-precompile")
        shapes = program_shapes(e.num_slots, e.max_len, e.max_prefill_tokens)
        shapes.sort(key=lambda s: (s[0] != "decode", s[1] * s[2], s[2]))
        keys = [s + (n_stop,) for s in shapes]
        for key in [first] + [k for k in keys if k != first]:
            self._pending[key] = self._pool.submit(self._compile, key)
        self._pool.shutdown(wait=False)

    def wait(self, timeout: float | None = None) -> int:
        """Block until every queued program is built (or `timeout` seconds pass); returns how
        many are still being built. A benchmark calls this after its warm-up so that no
        compile runs inside a timed window (2026-12-02: 8 programs, 69 s of compile threads,
        fell into the 7B rollouts' first timed concurrency)."""
        futures = list(self._pending.values())
        _, not_done = cf.wait(futures, timeout=timeout)
        return len(not_done)

    def run(self, kind: str, rows: int, tokens: int, fn: Callable, args: tuple, statics: dict):
        """fn(*args, **statics) through the precompiled program of this shape when there is one."""
        key = (kind, rows, tokens, int(args[-1].stop_ids.shape[1]))
        if self._abstract is None and (self.threads > 0 or self.cache is not None):
            self._prepare()
        if self.threads > 0 and self._pool is None:
            self._start(key)
        compiled = self._ready.get(key)
        if compiled is None and key in self._pending:
            future = self._pending[key]
            # Still queued behind others: compile it here now rather than wait for the queue
            # (a 7B engine's 34 programs take ~8 s each); one already compiling is waited for.
            compiled = self._compile(key) if future.cancel() else future.result()
        elif compiled is None and self.cache is not None and key not in self._failed:
            compiled = self._compile(key)
        if compiled is None:
            return fn(*args, **statics)
        self.stats["ran_precompiled"] += 1
        return compiled(*args)
