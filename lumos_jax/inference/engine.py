"""The inference engine: slots over one paged KV cache, driven from the host.

Each slot holds one live sequence; its K/V live in fixed-size blocks of a pool shared by
every slot (`paged.py`, `blocks.py`). `start` / `extend` queue tokens for prefill, `step`
prefills them (grouped by length bucket) and then runs the jitted decode loop for every
generating slot. Finished turns keep their blocks so an agent can `extend` them; requests
from `submit` are queued and their slots are refilled as soon as they finish (continuous
batching). Identical full-block prefixes are stored once and not recomputed. When the pool
is full, idle slots are evicted (tokens kept on the host, recomputed on their next turn) and,
if that is not enough, the youngest running slot is preempted: a request never fails
because others hold memory. The host owns the bookkeeping (lengths, block tables, stop
strings); the device owns the pages. See docs/inference.md for the API contract.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from lumos_jax.checkpoints.native import load_model
from lumos_jax.inference.decode_attention import resolve_decode_attention
from lumos_jax.inference.forward import PagedCache
from lumos_jax.inference.paged import PagedMemory, check_allocatable, pool_blocks, step_reserve_bytes
from lumos_jax.inference.paged_slots import (NoFreeSlotError, Slot, TurnResult, call_cost_tokens,
                                             checked_token_ids, decode_inputs, length_bucket, prefill_calls,
                                             prefill_inputs, prefill_rows, row_count, row_controls)
from lumos_jax.inference.params import decode_params, layer_layout, layer_weight_bytes, resolve_scan_layers
from lumos_jax.inference.precompile import Precompiler
from lumos_jax.inference.quant import check_int8_matmul
from lumos_jax.inference.sampling import SamplingParams
from lumos_jax.inference.scheduling import Scheduling
from lumos_jax.inference.steps import decode_loop, prefill_step
from lumos_jax.inference.stops import find_stop_string
from lumos_jax.sharding import logical_to_spec


CACHE_DTYPES = ("float32", "bfloat16", "float16", "int8")  # int8: per-token-per-head scales
STAT_KEYS = ("prefilled_tokens", "generated_tokens", "decode_calls", "prefill_calls",
             "prompt_tokens", "prefill_tokens", "prefix_saved_tokens", "evictions",
             "preemptions", "decode_steps", "decode_row_steps")
# decode_steps: loop iterations run; decode_row_steps: rows x iterations of the rows that held
# a turn (padding excluded). TIMING_KEYS (also in `stats`): seconds from each call's launch until
# its results were on the host (device time plus dispatch; what a benchmark tells host time by).
TIMING_KEYS = ("prefill_s", "decode_s")


class Engine(Scheduling):
    """See docs/inference.md. `model` is a `LlamaForCausalLM`; `mesh` shards it
    tensor-parallel (kv heads / mlp / vocab over `tensor`; the pages by kv heads)."""

    def __init__(self, model, *, mesh: Mesh | None = None, rules=None, **settings):
        params, spec = decode_params(model, mesh, rules)
        self._setup(model.config, params, spec, mesh, rules, **settings)

    @classmethod
    def from_params(cls, config, params, spec, *, mesh: Mesh | None = None, rules=None,
                    **settings) -> "Engine":
        """An engine over decode params already built by `decode_params` (the loader)."""
        new = object.__new__(cls)
        new._setup(config, params, spec, mesh, rules, **settings)
        return new

    def _setup(self, config, params, spec, mesh, rules, *, num_slots: int = 8, max_len: int = 2048,
               steps_per_call: int = 16, tokenizer=None, max_prefill_tokens: int = 16384,
               decode_attention: str = "auto", block_size: int = 16, num_blocks: int | None = None,
               kv_memory_gb: float | None = None, kv_memory_fraction: float | None = None,
               cache_dtype: str | None = None, scan_layers="auto", precompile_threads: int = 0,
               program_cache_dir: str | None = None, int8_matmul: str = "xla"):
        if num_slots < 1 or max_len < 2 or steps_per_call < 1:
            raise ValueError(f"Engine: num_slots={num_slots}, max_len={max_len}, "
                             f"steps_per_call={steps_per_call} must be positive (max_len >= 2)")
        decode_attention = resolve_decode_attention(decode_attention)
        # int8 weights' matmuls (quant.qeinsum), a static fact of every compiled forward
        spec = spec._replace(int8_matmul=check_int8_matmul(int8_matmul, mesh))
        self.scan_layers = resolve_scan_layers(scan_layers, layer_weight_bytes(params))
        params = layer_layout(params, self.scan_layers)
        if cache_dtype not in (None, *CACHE_DTYPES):
            raise ValueError(f"Engine: cache_dtype={cache_dtype!r}; expected one of {CACHE_DTYPES}")
        self.config, self.params, self.spec, self.mesh, self._rules = config, params, spec, mesh, rules
        self.num_slots, self.max_len, self.steps_per_call = num_slots, max_len, steps_per_call
        self.tokenizer = tokenizer
        self.max_prefill_tokens = max_prefill_tokens
        self.call_cost = call_cost_tokens(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
        self.decode_attention = decode_attention
        self.vocab_size = config.vocab_size
        self.cache_dtype = cache_dtype or config.dtype
        self._budget = dict(block_size=block_size, num_blocks=num_blocks, kv_memory_gb=kv_memory_gb,
                            kv_memory_fraction=kv_memory_fraction, cache_dtype=cache_dtype)
        blocks = pool_blocks(spec, block_size, jnp.dtype(self.cache_dtype), num_slots=num_slots,
                             max_len=max_len, mesh=mesh, num_blocks=num_blocks,
                             kv_memory_gb=kv_memory_gb, kv_memory_fraction=kv_memory_fraction,
                             reserve_bytes=self.reserve_bytes)
        self.memory = PagedMemory(blocks, block_size, max_len)
        self.block_size = block_size
        per_layer = not self.scan_layers        # unrolled: K, V arrays per layer (forward.py)
        self.cache_sharding = None              # of each cache array
        shape = PagedCache.array_shape(spec, blocks, block_size, per_layer)
        if mesh is not None:
            self.cache_sharding = NamedSharding(
                mesh, logical_to_spec(PagedCache.logical_axes(per_layer), shape, mesh, rules))
        check_allocatable(shape, self.cache_dtype, self.cache_sharding, 2 * (spec.num_layers if per_layer else 1))
        self.cache = PagedCache.init(spec, blocks, block_size, jnp.dtype(self.cache_dtype),
                                     self.cache_sharding, per_layer=per_layer)
        self._slots: dict[int, Slot] = {}
        self._queue: deque = deque()
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        self._stats = {k: 0 for k in STAT_KEYS + TIMING_KEYS}
        self.programs = Precompiler(self, precompile_threads, program_cache_dir)   # precompile.py

    @property
    def reserve_bytes(self) -> int:
        """Device memory the KV pool leaves for this engine's largest call (unsharded: an
        upper bound per device)."""
        return step_reserve_bytes(self.config, self.spec, num_slots=self.num_slots,
                                  max_len=self.max_len, max_prefill_tokens=self.max_prefill_tokens)

    def resized(self, **changes) -> "Engine":
        """A fresh engine sharing these weights, with other sizes (num_slots, max_len,
        steps_per_call, max_prefill_tokens, decode_attention, tokenizer, block_size,
        num_blocks, kv_memory_gb, kv_memory_fraction, cache_dtype, int8_matmul). Drop this
        engine first if its cache should be freed."""
        kw = dict(num_slots=self.num_slots, max_len=self.max_len, steps_per_call=self.steps_per_call,
                  tokenizer=self.tokenizer, max_prefill_tokens=self.max_prefill_tokens,
                  decode_attention=self.decode_attention, scan_layers=self.scan_layers,
                  int8_matmul=self.spec.int8_matmul,
                  precompile_threads=self.programs.threads, program_cache_dir=self.programs.cache_dir,
                  **self._budget)
        bad = set(changes) - set(kw)
        if bad:
            raise ValueError(f"Engine.resized: unknown setting(s) {sorted(bad)}")
        kw.update(changes)
        return Engine.from_params(self.config, self.params, self.spec, mesh=self.mesh,
                                  rules=self._rules, **kw)

    @classmethod
    def from_path(cls, path, *, mesh: Mesh | None = None, tokenizer=None, rules=None,
                  model_overrides: dict | None = None, **kw) -> "Engine":
        """Weights from an HF directory or a lumos-jax (orbax) checkpoint, read straight
        into their shards on `mesh`."""
        model = load_model(path, mesh, rules, **(model_overrides or {}))
        return cls(model, mesh=mesh, tokenizer=tokenizer, rules=rules, **kw)

    # -- public API -------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self.num_slots - len(self._slots)

    @property
    def pending_requests(self) -> int:
        return len(self._queue)

    @property
    def num_blocks(self) -> int:
        return self.memory.pool.num_blocks

    @property
    def busy(self) -> bool:
        """True while anything is queued, waiting for prefill or generating."""
        return bool(self._queue) or any(s.state != "idle" for s in self._slots.values())

    def progress(self) -> dict:
        """request_id -> tokens generated so far in the current turn, for every slot that is
        generating (for streaming; tokens past a stop string are cut when the turn ends)."""
        return {s.request_id: list(s.generated) for s in self._slots.values()
                if s.state == "generating"}

    def start(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None,
              request_id: Any = None) -> int:
        """Claim a free slot for a new sequence; it is prefilled in the next `step`."""
        return self._claim(prompt_ids, sampling or SamplingParams(), request_id, auto_release=False)

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None,
               request_id: Any = None) -> Any:
        """Queue an independent request; `step` admits it when a slot is free and releases
        the slot when its turn ends."""
        sampling = sampling or SamplingParams()
        ids = self._check_ids(prompt_ids, "prompt")
        self._check_fits(len(ids), "prompt")
        self._check_sampling(sampling)
        request_id = next(self._ids) if request_id is None else request_id
        self._queue.append((ids, sampling, request_id))
        return request_id

    def extend(self, slot: int, new_ids: Sequence[int], sampling: SamplingParams | None = None) -> None:
        """Start the next turn of a finished slot with `new_ids` appended to its sequence."""
        s = self._slot(slot)
        if s.state != "idle":
            raise ValueError(f"extend(slot={slot}): the slot is still {s.state}; wait for its "
                             "TurnResult from step()")
        ids = self._check_ids(new_ids, "extend")
        need = len(s.history) + len(ids)
        if need > self.max_len:
            raise ValueError(f"extend(slot={slot}): {len(ids)} new tokens need {need} cache "
                             f"entries but max_len is {self.max_len}")
        self._check_fits(need, f"extend(slot={slot})")
        if sampling is not None:
            self._check_sampling(sampling)
            s.params = sampling
        s.history.extend(ids)
        s.turn_prompt, s.new_turn, s.state = len(ids), True, "prefill"
        self._stats["prompt_tokens"] += len(s.history)

    def cancel(self, request_id: Any) -> bool:
        """Drop a submitted request: unqueue it, or free its slot mid-turn (nothing is
        returned for it). False if no queued or running request has this id."""
        for item in list(self._queue):
            if item[2] is request_id:
                self._queue.remove(item)
                return True
        for slot, s in list(self._slots.items()):
            if s.request_id is request_id and s.auto_release:
                self._free(slot)
                return True
        return False

    def release(self, slot: int) -> None:
        self._slot(slot)
        self._free(slot)

    def prefilled_tokens(self, slot: int) -> int:
        return self._slot(slot).prefilled

    def sequence(self, slot: int) -> list[int]:
        return list(self._slot(slot).history)

    def is_generating(self, slot: int) -> bool:
        return self._slot(slot).state != "idle"

    def step(self) -> list[TurnResult]:
        """Admit queued requests, prefill new tokens, decode up to steps_per_call tokens;
        return the turns that finished. When memory stops every slot, the youngest running
        slot is preempted (recomputed later) until one can move."""
        while self._queue and self.free_slots:
            ids, sampling, rid = self._queue.popleft()
            self._claim(ids, sampling, rid, auto_release=True, checked=True)
        finished: list[TurnResult] = []
        for _ in range(2 * self.num_slots + 1):
            moved = self._prefill(self._reserve(), finished)
            if any(s.state == "generating" for s in self._slots.values()):
                moved = self._decode(finished) or moved
            if moved or not any(s.state != "idle" for s in self._slots.values()):
                break
            self._preempt(finished)
        for r in finished:
            if self._slots[r.slot].auto_release:
                self._free(r.slot)
        return finished

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None
                 ) -> list[TurnResult]:
        """Run `prompts` through the queue (continuous batching); results in input order."""
        tags = [object() for _ in prompts]
        for ids, tag in zip(prompts, tags):
            self.submit(ids, sampling, request_id=tag)
        want = {id(t): i for i, t in enumerate(tags)}
        out: list[TurnResult | None] = [None] * len(prompts)
        left = len(prompts)
        while left:
            for r in self.step():
                i = want.get(id(r.request_id))
                if i is not None and r.request_id is tags[i]:
                    r.request_id = None
                    out[i] = r
                    left -= 1
        return out  # type: ignore[return-value]

    # -- validation -------------------------------------------------------------------------
    def _slot(self, slot: int) -> Slot:
        if slot not in self._slots:
            raise ValueError(f"slot {slot} is not in use (released or never started)")
        return self._slots[slot]

    def _check_ids(self, ids: Sequence[int], what: str) -> list[int]:
        return checked_token_ids(ids, self.vocab_size, what)

    def _check_fits(self, n: int, what: str) -> None:
        if n > self.max_len:
            raise ValueError(f"{what}: {n} tokens do not fit the engine's max_len={self.max_len}")
        if n > self.memory.capacity_tokens:
            raise ValueError(f"{what}: {n} tokens do not fit the whole KV pool "
                             f"({self.num_blocks} blocks of {self.block_size}); raise "
                             "engine_settings.kv_memory_gb or kv_memory_fraction")

    def _check_sampling(self, sampling: SamplingParams) -> None:
        if sampling.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need an Engine built with a tokenizer")

    def _claim(self, ids, sampling, request_id, auto_release, checked=False) -> int:
        if not checked:
            ids = self._check_ids(ids, "prompt")
            self._check_fits(len(ids), "prompt")
            self._check_sampling(sampling)
        free = [i for i in range(self.num_slots) if i not in self._slots]
        if not free:
            raise NoFreeSlotError(f"all {self.num_slots} slots are in use; release one first")
        slot = free[0]
        self._slots[slot] = Slot(sampling, request_id, auto_release, history=list(ids),
                                  turn_prompt=len(ids), order=next(self._clock))
        self._stats["prompt_tokens"] += len(ids)
        return slot

    # -- memory -----------------------------------------------------------------------------
    def _free(self, slot: int) -> None:
        self.memory.drop(self._slots.pop(slot))

    @property
    def stats(self) -> dict:
        """Counters (STAT_KEYS) and the pool now: blocks_total / used (held by slots) /
        cached (unreferenced stored prefixes) / free."""
        pool = self.memory.pool
        self._stats.update(blocks_total=pool.num_blocks, blocks_used=pool.used,
                           blocks_cached=pool.cached, blocks_free=pool.available - pool.cached)
        return self._stats

    # -- device calls -----------------------------------------------------------------------
    def _row_count(self, n: int, tokens: int = 1) -> int:
        return row_count(n, tokens, self.num_slots)

    @property
    def _table_width(self) -> int:
        """Every call passes whole block tables (max_len wide): attention stops after the
        call's longest row (decode_attention.py), so the width costs nothing and is not a
        compiled shape of its own."""
        return self.memory.max_blocks

    def _prefill(self, ready: list[int], finished: list[TurnResult]) -> bool:
        """Prefill the slots that got their blocks; False if none."""
        groups: dict[int, list[int]] = {}
        for i in ready:
            s = self._slots[i]
            groups.setdefault(length_bucket(len(s.history) - s.cache_len, self.max_len), []).append(i)
        for t, slots in sorted(groups.items()):
            lo = 0
            for k in prefill_calls(len(slots), t, self.num_slots, self.max_prefill_tokens, self.call_cost):
                self._prefill_rows(slots[lo: lo + k], t, finished)
                lo += k
        return bool(ready)

    def _prefill_rows(self, slots: list[int], t: int, finished: list[TurnResult]) -> None:
        n = prefill_rows(len(slots), t, self.num_slots, self.max_prefill_tokens)
        rows: list[Slot | None] = [self._slots[i] for i in slots] + [None] * (n - len(slots))
        ids, starts, valid = prefill_inputs(rows, t)
        table = self.memory.table(rows, self._table_width)
        t0 = time.perf_counter()
        first, self.cache = self.programs.run(
            "prefill", n, t, prefill_step, (self.params, self.cache, table, ids, starts, valid, row_controls(rows)),
            dict(spec=self.spec, cache_sharding=self.cache_sharding))
        first = np.asarray(jax.device_get(first))
        self._stats["prefill_s"] += time.perf_counter() - t0
        self._stats["prefill_calls"] += 1
        for r, i in enumerate(slots):
            s = self._slots[i]
            s.cache_len += int(valid[r])
            self._stats["prefill_tokens"] += int(valid[r])
            if s.new_turn:
                s.prefilled += s.turn_prompt
                self._stats["prefilled_tokens"] += s.turn_prompt
                s.generated, s.new_turn = [], False
            s.state = "generating"
            self._accept(i, s, [int(first[r])], s.cache_len, True, finished)

    def _decode(self, finished: list[TurnResult]) -> bool:
        """Grow each generating slot's blocks for this call (oldest first; a slot that gets
        no room waits) and run the decode loop over those rows; False if none could run."""
        runnable = []
        for i, s in sorted(self._slots.items(), key=lambda kv: kv[1].order):
            if s.state != "generating":
                continue
            self._grow(s, self._decode_need(s))       # slots prefilled in this round
            if len(s.blocks) * self.block_size > s.cache_len:
                runnable.append(i)
        if not runnable:
            return False
        b = self._row_count(len(runnable))
        width = self._table_width
        rows: list[Slot | None] = [self._slots[i] for i in runnable] + [None] * (b - len(runnable))
        last, lengths, generated, capacity, active = decode_inputs(rows, width, self.block_size,
                                                                   self.max_len)
        table = self.memory.table(rows, width)
        t0 = time.perf_counter()
        out, self.cache = self.programs.run(
            "decode", b, 1, decode_loop,
            (self.params, self.cache, table, last, lengths, generated, active, capacity, row_controls(rows)),
            dict(spec=self.spec, steps=self.steps_per_call, cache_sharding=self.cache_sharding,
                 attention=self.decode_attention))
        out = jax.device_get(out)
        self._stats["decode_s"] += time.perf_counter() - t0
        self._stats["decode_calls"] += 1
        self._stats["decode_steps"] += int(out.steps_run)
        self._stats["decode_row_steps"] += int(out.steps_run) * len(runnable)
        for r, i in enumerate(runnable):
            s = self._slots[i]
            new = [int(x) for x in out.tokens[r] if x >= 0]
            self._accept(i, s, new, int(out.lengths[r]), bool(out.active[r]), finished,
                         room=int(capacity[r]))
        return True

    def _accept(self, slot: int, s: Slot, new: list[int], cache_len: int, still_active: bool,
                finished: list[TurnResult], room: int | None = None) -> None:
        """Record new tokens (the last one not yet in the cache), offer completed blocks to
        the prefix table and finish the turn if it ended."""
        before = len(s.generated)
        s.generated.extend(new)
        s.history.extend(new)
        s.cache_len = cache_len
        self._stats["generated_tokens"] += len(new)
        p = s.params
        reason, stop = None, None
        if p.stop_strings and new:
            hit = find_stop_string(self.tokenizer, s.generated, p.stop_strings, before)
            if hit is not None:
                keep, stop = hit
                drop = len(s.generated) - keep
                del s.generated[keep:]
                del s.history[len(s.history) - drop:]
                self.memory.truncate(s, s.cache_len - drop)
                self._stats["generated_tokens"] -= drop
                reason = "stop"
        self.memory.register(s)
        if reason is None:
            if s.history[-1] in p.stop_ids:
                reason, stop = "stop", s.history[-1]
            elif len(s.generated) >= p.max_new_tokens or s.cache_len >= self.max_len:
                reason = "length"
            elif not still_active and (room is None or s.cache_len < room):
                raise RuntimeError(f"slot {slot}: device stopped a row the host cannot explain")
        if reason is not None:
            self._finish(slot, s, reason, stop, finished)

    def _finish(self, slot: int, s: Slot, reason: str, stop, finished: list[TurnResult]) -> None:
        s.state = "idle"
        s.last_used = next(self._clock)
        self.memory.trim(s)
        text = self.tokenizer.decode(s.generated) if self.tokenizer is not None else None
        finished.append(TurnResult(slot, s.request_id, list(s.generated), reason, stop,
                                   s.turn_prompt, text))
