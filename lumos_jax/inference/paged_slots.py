"""The host's record of one engine slot and of a finished turn, and the shape buckets that bound compilation.

A slot's paging fields (history, cache_len, blocks, keys, registered) are the ones
`paged.PagedMemory` works on; the rest is the engine's turn bookkeeping.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from lumos_jax.inference.sampling import SamplingParams, row_keys
from lumos_jax.inference.steps import RowControls


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
class Slot:
    params: SamplingParams
    request_id: Any
    auto_release: bool
    history: list[int] = field(default_factory=list)   # every token of the sequence
    cache_len: int = 0               # leading history tokens whose K/V are in `blocks`
    blocks: list[int] = field(default_factory=list)    # block table
    keys: list[bytes] = field(default_factory=list)    # prefix keys of history's full blocks
    registered: int = 0              # leading full blocks offered to the prefix table
    generated: list[int] = field(default_factory=list)
    turn_prompt: int = 0             # tokens the caller supplied for this turn
    new_turn: bool = True            # the turn's first prefill has not run yet
    prefilled: int = 0
    state: str = "prefill"           # prefill | generating | idle
    order: int = 0                   # admission order: older slots get memory first
    last_used: int = 0               # idle slots are evicted least recently used first


# Compiled shapes, bucketed so that an agent run compiles few programs: a prefill call's
# rows are a power of four (at least ROW_FLOOR_TOKENS tokens in all: a call that small is
# bound by reading the weights, so padding rows cost nothing) and its length one of
# `prefill_lengths` (at least PREFILL_MIN); a decode call's rows a power of two, at least
# DECODE_ROW_FLOOR.
ROW_FLOOR_TOKENS = 256
PREFILL_MIN = 64
DECODE_ROW_FLOOR = 16


def checked_token_ids(ids: Sequence[int], vocab_size: int, what: str) -> list[int]:
    """ids as ints, or one line saying which is empty or outside the vocabulary."""
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError(f"{what}: needs at least one token")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{what}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


@functools.lru_cache(maxsize=64)
def prefill_lengths(max_len: int) -> tuple[int, ...]:
    """Every prefill length a call can have: PREFILL_MIN times 1, 1.5, 2, 3, 4, 6, ...
    (powers of two and the midpoints between them), capped at max_len. The midpoints cut the
    padding of a row's new tokens from ~25% to ~15% on average: on a replay of the 7B
    rollouts the length padding was 158k prefill tokens for 311k needed with powers of two
    alone, the largest waste left (2026-12-02), for ~1.8x the prefill programs."""
    out, t = [], PREFILL_MIN
    while t < max_len:
        out.append(t)
        if t * 3 // 2 < max_len:
            out.append(t * 3 // 2)
        t *= 2
    return tuple(out) + (max_len,)


def length_bucket(n: int, max_len: int) -> int:
    """The prefill length of a row with n new tokens (capped at max_len)."""
    return next((t for t in prefill_lengths(max_len) if t >= n), max_len)


def row_count(n: int, tokens: int, num_slots: int) -> int:
    """Rows of a call of n rows of `tokens` tokens each (1: decode), at most num_slots'
    power of two."""
    if tokens == 1:
        rows = pow2_at_least(max(n, DECODE_ROW_FLOOR))
    else:
        rows = 1
        while rows < max(n, ROW_FLOOR_TOKENS // tokens):
            rows *= 4
    return min(rows, pow2_at_least(num_slots))


def prefill_rows(k: int, tokens: int, num_slots: int, budget: int) -> int:
    """Rows a prefill call of k rows of `tokens` pads to (its compiled shape)."""
    return max(k, min(row_count(k, tokens, num_slots), budget // tokens))


def call_cost_tokens(num_params: int) -> int:
    """A prefill call's fixed cost in prefill tokens of compute, what splitting a group into
    more, better-filled calls must save: reading the weights once (~120 tokens' compute at any
    size, bf16 on a GPU of ~3.4 TB/s and ~400 dense TFLOP/s) plus ~2 ms of launch and host
    wait, which at 135M parameters is worth thousands of tokens and at 7B about 60."""
    return int(min(4096, max(128, 120 + 2e-3 * 4e14 / (2 * max(num_params, 1)))))


@functools.lru_cache(maxsize=4096)
def prefill_calls(k: int, tokens: int, num_slots: int, budget: int, call_cost: int = 256) -> tuple[int, ...]:
    """Row counts of the calls that prefill k rows of `tokens` tokens, largest first, padding
    least (in tokens, each call costing `call_cost` more). e.g. 70 rows of 64 tokens at 7B:
    54 + 16 (64 + 16 padded) rather than one call padded to 256 (the 7B rollouts computed
    3.1x the prefill tokens they needed, 2026-12-02)."""
    per_call = max(1, min(num_slots, budget // tokens))
    sizes = sorted({prefill_rows(j, tokens, num_slots, budget) for j in range(1, per_call + 1)})
    sizes = [n for n in sizes if n <= per_call]
    best: list[tuple[int, tuple[int, ...]]] = [(0, ())]
    for r in range(1, k + 1):
        options = []
        if r <= per_call:
            options.append((prefill_rows(r, tokens, num_slots, budget) * tokens + call_cost, (r,)))
        for n in sizes:
            if n < r:
                cost, rest = best[r - n]
                options.append((cost + n * tokens + call_cost, (n,) + rest))
        best.append(min(options, key=lambda o: (o[0], len(o[1]))))
    return tuple(sorted(best[k][1], reverse=True))


def pow2_at_least(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def prefill_inputs(rows: Sequence[Slot | None], t: int) -> tuple[np.ndarray, ...]:
    """(ids (n, t), start positions, new-token counts) of one prefill call: each row's
    tokens past its cache (None rows: padding, writing nothing)."""
    ids = np.zeros((len(rows), t), np.int32)
    starts, valid = np.zeros(len(rows), np.int32), np.zeros(len(rows), np.int32)
    for r, s in enumerate(rows):
        if s is not None:
            toks = s.history[s.cache_len:]
            ids[r, : len(toks)] = toks
            starts[r], valid[r] = s.cache_len, len(toks)
    return ids, starts, valid


def decode_inputs(rows: Sequence[Slot | None], width: int, block_size: int, max_len: int
                  ) -> tuple[np.ndarray, ...]:
    """(last token, cache length, tokens generated, capacity, active) of one decode call; a
    row's capacity is what its first `width` blocks hold, at most max_len (None rows:
    padding, inactive)."""
    last, lengths, generated, capacity = (np.zeros(len(rows), np.int32) for _ in range(4))
    active = np.zeros(len(rows), bool)
    for r, s in enumerate(rows):
        if s is not None:
            last[r], lengths[r], generated[r] = s.history[s.cache_len], s.cache_len, len(s.generated)
            capacity[r] = min(min(len(s.blocks), width) * block_size, max_len)
            active[r] = True
    return last, lengths, generated, capacity, active


def row_controls(rows: Sequence[Slot | None]) -> RowControls:
    """Per-row sampling settings of one device call (None rows: padding)."""
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
