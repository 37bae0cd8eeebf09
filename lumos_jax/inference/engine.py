"""The inference engine: slots over a shared KV cache, driven from the host.

Each slot holds one live sequence. `start` / `extend` queue tokens for prefill, `step`
prefills them (grouped by length bucket) and then runs the jitted decode loop for every
generating slot. Finished turns keep their cache so an agent can `extend` them; requests
from `submit` are queued and their slots are refilled as soon as they finish (continuous
batching). The host owns the bookkeeping (lengths, pending tokens, stop strings); the
device owns the cache. See docs/inference.md for the API contract.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from lumos_jax.inference.forward import DECODE_ATTENTION, SlotCache
from lumos_jax.inference.params import decode_params
from lumos_jax.inference.sampling import SamplingParams, row_keys
from lumos_jax.inference.steps import RowControls, decode_loop, prefill_step
from lumos_jax.inference.stops import find_stop_string
from lumos_jax.sharding import logical_to_spec


class NoFreeSlotError(RuntimeError):
    """`start` was called while every slot is taken."""


@dataclass
class TurnResult:
    slot: int
    request_id: Any
    tokens: list[int]
    finish_reason: str                 # "stop" or "length"
    stop: int | str | None = None
    prompt_tokens: int = 0
    text: str | None = None


@dataclass
class _Slot:
    params: SamplingParams
    request_id: Any
    auto_release: bool
    history: list[int] = field(default_factory=list)   # every token of the sequence
    to_prefill: list[int] = field(default_factory=list)
    cache_len: int = 0
    pending: int | None = None       # newest generated token, not yet in the cache
    generated: list[int] = field(default_factory=list)
    turn_prompt: int = 0
    prefilled: int = 0
    state: str = "prefill"           # prefill | generating | idle


# Decode attention reads a power-of-two window of the cache (at least this many entries)
# covering every active row's length plus the steps of one call.
WINDOW_MIN = 256


def attention_window(longest: int, steps: int, max_len: int) -> int:
    return min(max_len, max(WINDOW_MIN, pow2_at_least(longest + steps)))


def length_bucket(n: int, max_len: int, minimum: int = 16) -> int:
    """Power-of-two buckets (capped at max_len) so prefill compiles for few lengths."""
    return min(max_len, max(minimum, pow2_at_least(n)))


def pow2_at_least(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


class Engine:
    """See docs/inference.md. `model` is a `LlamaForCausalLM`; `mesh` shards it
    tensor-parallel (kv heads / mlp / vocab over `tensor`, slots over `data`)."""

    def __init__(self, model, *, num_slots: int = 8, max_len: int = 2048, steps_per_call: int = 16,
                 mesh: Mesh | None = None, tokenizer=None, max_prefill_tokens: int = 16384,
                 rules=None, decode_attention: str = "dot"):
        params, spec = decode_params(model, mesh, rules)
        self._setup(model.config, params, spec, mesh, rules, num_slots, max_len, steps_per_call,
                    tokenizer, max_prefill_tokens, decode_attention)

    def _setup(self, config, params, spec, mesh, rules, num_slots, max_len, steps_per_call,
               tokenizer, max_prefill_tokens, decode_attention):
        if num_slots < 1 or max_len < 2 or steps_per_call < 1:
            raise ValueError(f"Engine: num_slots={num_slots}, max_len={max_len}, "
                             f"steps_per_call={steps_per_call} must be positive (max_len >= 2)")
        if decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"Engine: decode_attention={decode_attention!r}; expected one of "
                             f"{sorted(DECODE_ATTENTION)}")
        self.config, self.params, self.spec, self.mesh, self._rules = config, params, spec, mesh, rules
        self.num_slots, self.max_len, self.steps_per_call = num_slots, max_len, steps_per_call
        self.tokenizer = tokenizer
        self.max_prefill_tokens = max_prefill_tokens
        self.decode_attention = decode_attention
        self.vocab_size = config.vocab_size
        self.cache_sharding = None
        shape = (num_slots, spec.num_kv_heads, max_len, spec.head_dim)
        if mesh is not None:
            self.cache_sharding = NamedSharding(
                mesh, logical_to_spec(SlotCache.logical_axes(), shape, mesh, rules))
        self.cache = SlotCache.init(spec, num_slots, max_len, config.jnp_dtype, self.cache_sharding)
        self._slots: dict[int, _Slot] = {}
        self._queue: deque = deque()
        self._ids = itertools.count()
        self.stats = {"prefilled_tokens": 0, "generated_tokens": 0, "decode_calls": 0,
                      "prefill_calls": 0}

    def resized(self, **changes) -> "Engine":
        """A fresh engine sharing these weights, with other sizes (num_slots, max_len,
        steps_per_call, max_prefill_tokens, decode_attention, tokenizer). Drop this engine
        first if its cache should be freed."""
        kw = dict(num_slots=self.num_slots, max_len=self.max_len, steps_per_call=self.steps_per_call,
                  tokenizer=self.tokenizer, max_prefill_tokens=self.max_prefill_tokens,
                  decode_attention=self.decode_attention)
        bad = set(changes) - set(kw)
        if bad:
            raise ValueError(f"Engine.resized: unknown setting(s) {sorted(bad)}")
        kw.update(changes)
        new = object.__new__(Engine)
        new._setup(self.config, self.params, self.spec, self.mesh, self._rules, kw["num_slots"],
                   kw["max_len"], kw["steps_per_call"], kw["tokenizer"], kw["max_prefill_tokens"],
                   kw["decode_attention"])
        return new

    @classmethod
    def from_path(cls, path, *, mesh: Mesh | None = None, tokenizer=None, rules=None,
                  model_overrides: dict | None = None, **kw) -> "Engine":
        """Weights from an HF directory or a lumos-jax (orbax) checkpoint, read straight
        into their shards on `mesh`."""
        from lumos_jax.checkpoints.native import load_model

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
        need = s.cache_len + (s.pending is not None) + len(ids)
        if need > self.max_len:
            raise ValueError(f"extend(slot={slot}): {len(ids)} new tokens need {need} cache "
                             f"entries but max_len is {self.max_len}")
        if sampling is not None:
            self._check_sampling(sampling)
            s.params = sampling
        s.to_prefill = ids
        s.history.extend(ids)
        s.state = "prefill"

    def cancel(self, request_id: Any) -> bool:
        """Drop a submitted request: unqueue it, or free its slot mid-turn (nothing is
        returned for it). False if no queued or running request has this id."""
        for item in list(self._queue):
            if item[2] is request_id:
                self._queue.remove(item)
                return True
        for slot, s in list(self._slots.items()):
            if s.request_id is request_id and s.auto_release:
                del self._slots[slot]
                return True
        return False

    def release(self, slot: int) -> None:
        self._slot(slot)
        del self._slots[slot]

    def prefilled_tokens(self, slot: int) -> int:
        return self._slot(slot).prefilled

    def sequence(self, slot: int) -> list[int]:
        return list(self._slot(slot).history)

    def is_generating(self, slot: int) -> bool:
        return self._slot(slot).state != "idle"

    def step(self) -> list[TurnResult]:
        """Admit queued requests, prefill new tokens, decode up to steps_per_call tokens;
        return the turns that finished."""
        while self._queue and self.free_slots:
            ids, sampling, rid = self._queue.popleft()
            self._claim(ids, sampling, rid, auto_release=True, checked=True)
        finished: list[TurnResult] = []
        self._prefill(finished)
        if any(s.state == "generating" for s in self._slots.values()):
            self._decode(finished)
        for r in finished:
            if self._slots[r.slot].auto_release:
                del self._slots[r.slot]
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
    def _slot(self, slot: int) -> _Slot:
        if slot not in self._slots:
            raise ValueError(f"slot {slot} is not in use (released or never started)")
        return self._slots[slot]

    def _check_ids(self, ids: Sequence[int], what: str) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError(f"{what}: needs at least one token")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{what}: token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        return ids

    def _check_fits(self, n: int, what: str) -> None:
        if n > self.max_len:
            raise ValueError(f"{what}: {n} tokens do not fit the engine's max_len={self.max_len}")

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
        self._slots[slot] = _Slot(sampling, request_id, auto_release, history=list(ids),
                                  to_prefill=list(ids))
        return slot

    # -- device calls -----------------------------------------------------------------------
    def _controls(self, rows: Sequence[_Slot | None]) -> RowControls:
        n_stop = pow2_at_least(max([len(s.params.stop_ids) for s in rows if s] + [4]))
        stop = np.full((len(rows), n_stop), -1, np.int32)
        temp = np.zeros(len(rows), np.float32)
        top_k = np.zeros(len(rows), np.int32)
        top_p = np.ones(len(rows), np.float32)
        max_new = np.ones(len(rows), np.int32)
        seeds = np.zeros(len(rows), np.uint32)
        for i, s in enumerate(rows):
            if s is None:
                continue
            p = s.params
            stop[i, : len(p.stop_ids)] = p.stop_ids
            temp[i], top_k[i], top_p[i] = p.temperature, p.top_k, p.top_p
            max_new[i], seeds[i] = p.max_new_tokens, p.seed & 0xFFFFFFFF
        return RowControls(temp, top_k, top_p, row_keys(seeds), stop, max_new)

    def _prefill(self, finished: list[TurnResult]) -> None:
        todo = [i for i, s in self._slots.items() if s.state == "prefill"]
        groups: dict[int, list[int]] = {}
        for i in todo:
            s = self._slots[i]
            n = len(s.to_prefill) + (s.pending is not None)
            groups.setdefault(length_bucket(n, self.max_len), []).append(i)
        for t, slots in sorted(groups.items()):
            per_call = max(1, min(self.num_slots, self.max_prefill_tokens // t))
            for lo in range(0, len(slots), per_call):
                self._prefill_rows(slots[lo: lo + per_call], t, finished)

    def _prefill_rows(self, slots: list[int], t: int, finished: list[TurnResult]) -> None:
        n = min(pow2_at_least(len(slots)), pow2_at_least(self.num_slots))
        ids = np.zeros((n, t), np.int32)
        starts = np.zeros(n, np.int32)
        valid = np.ones(n, np.int32)
        slot_ids = np.full(n, self.num_slots, np.int32)   # padding rows write nothing
        rows: list[_Slot | None] = [None] * n
        for r, i in enumerate(slots):
            s = self._slots[i]
            toks = ([s.pending] if s.pending is not None else []) + s.to_prefill
            ids[r, : len(toks)] = toks
            starts[r], valid[r], slot_ids[r], rows[r] = s.cache_len, len(toks), i, s
        first, self.cache = prefill_step(self.params, self.cache, slot_ids, ids, starts, valid,
                                         self._controls(rows), spec=self.spec,
                                         cache_sharding=self.cache_sharding)
        first = np.asarray(jax.device_get(first))
        self.stats["prefill_calls"] += 1
        for r, i in enumerate(slots):
            s = self._slots[i]
            s.cache_len += int(valid[r])
            s.prefilled += len(s.to_prefill)
            self.stats["prefilled_tokens"] += len(s.to_prefill)
            s.turn_prompt = len(s.to_prefill)
            s.to_prefill = []
            s.pending = None
            s.generated = []
            s.state = "generating"
            self._accept(i, s, [int(first[r])], s.cache_len, True, finished)

    def _decode(self, finished: list[TurnResult]) -> None:
        b = self.num_slots
        last = np.zeros(b, np.int32)
        lengths = np.zeros(b, np.int32)
        generated = np.zeros(b, np.int32)
        active = np.zeros(b, bool)
        rows: list[_Slot | None] = [None] * b
        for i, s in self._slots.items():
            if s.state == "generating":
                last[i], lengths[i], generated[i] = s.pending, s.cache_len, len(s.generated)
                active[i], rows[i] = True, s
        out, self.cache = decode_loop(self.params, self.cache, last, lengths, generated, active,
                                      self._controls(rows), spec=self.spec,
                                      steps=self.steps_per_call, cache_sharding=self.cache_sharding,
                                      attention=self.decode_attention,
                                      window=attention_window(int(lengths[active].max()),
                                                              self.steps_per_call, self.max_len))
        out = jax.device_get(out)
        self.stats["decode_calls"] += 1
        for i in np.flatnonzero(active):
            s = self._slots[int(i)]
            new = [int(x) for x in out.tokens[i] if x >= 0]
            self._accept(int(i), s, new, int(out.lengths[i]), bool(out.active[i]), finished)

    def _accept(self, slot: int, s: _Slot, new: list[int], cache_len: int, still_active: bool,
                finished: list[TurnResult]) -> None:
        """Record new tokens (the last one pending) and finish the turn if it ended."""
        before = len(s.generated)
        s.generated.extend(new)
        s.history.extend(new)
        s.cache_len = cache_len
        s.pending = s.generated[-1]
        self.stats["generated_tokens"] += len(new)
        p = s.params
        reason, stop = None, None
        if p.stop_strings and new:
            hit = find_stop_string(self.tokenizer, s.generated, p.stop_strings, before)
            if hit is not None:
                keep, stop = hit
                drop = len(s.generated) - keep
                del s.generated[keep:]
                del s.history[len(s.history) - drop:]
                s.cache_len -= drop
                s.pending = s.generated[-1]
                self.stats["generated_tokens"] -= drop
                reason = "stop"
        if reason is None:
            if s.pending in p.stop_ids:
                reason, stop = "stop", s.pending
            elif len(s.generated) >= p.max_new_tokens or s.cache_len >= self.max_len:
                reason = "length"
            elif not still_active:
                raise RuntimeError(f"slot {slot}: device stopped a row the host cannot explain")
        if reason is None:
            return
        s.state = "idle"
        text = self.tokenizer.decode(s.generated) if self.tokenizer is not None else None
        finished.append(TurnResult(slot, s.request_id, list(s.generated), reason, stop,
                                   s.turn_prompt, text))
