"""Per-row paging of the KV cache: block tables, prefix reuse, growth, eviction, rewind.

A row (an engine slot) holds `history` (every token of its sequence), `cache_len` (how
many leading tokens have K/V in the pages) and `blocks` (its block table). `PagedMemory`
changes those three together with the `BlockPool` so that:
  - `cache_len` tokens always sit in the row's first ceil(cache_len / bs) blocks;
  - a row's full blocks are offered to the prefix table once computed (`register`), and a
    row about to prefill first takes every full block of its history already stored
    (`match`), computing only the rest;
  - a row writes only at positions >= cache_len, i.e. into its own unshared last block or
    fresh ones: shared blocks are full and read-only (`truncate` keeps it so on rewind).
Also the memory budget: how many blocks an engine's pool gets.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lumos_jax.inference.blocks import ROOT_KEY, BlockPool, block_key
from lumos_jax.inference.decode_attention import CHUNK_TOKENS
from lumos_jax.inference.paged_slots import PREFILL_MIN, pow2_at_least
from lumos_jax.inference.params import padded_vocab
from lumos_jax.inference.quant import KV_SCALE_BYTES


def block_bytes(spec, block_size: int, dtype) -> int:
    """Bytes one block takes over all layers, K and V, unsharded (int8: with the fp32
    scale of each token and head)."""
    per_token_head = spec.head_dim * np.dtype(dtype).itemsize
    if np.dtype(dtype) == np.int8:
        per_token_head += KV_SCALE_BYTES
    return 2 * spec.num_layers * spec.num_kv_heads * block_size * per_token_head


def free_device_bytes(devices) -> int | None:
    """The least free memory over `devices` (None where the backend does not report it)."""
    free = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free) if free else None


def check_allocatable(shape, dtype, sharding, count: int, what: str = "KV pool") -> None:
    """Raise one line if `count` arrays of `shape` (placed by `sharding`, None: one device)
    cannot all be placed whole
    (XLA's allocator otherwise retries a fragmented heap without end: the 7B eval on one H200,
    2026-12-01, hung on a 20.67 GiB pool array with 40 GiB free in 10-15 GiB holes). Room is
    the largest free block of the reserved heap, or what is still unreserved; backends that
    report neither (CPU) are not checked."""
    per_device = sharding.shard_shape(tuple(shape)) if sharding is not None else tuple(shape)
    nbytes = int(np.prod(per_device)) * jnp.dtype(dtype).itemsize
    devices = sharding.device_set if sharding is not None else jax.devices()[:1]
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if not stats or not {"largest_free_block_bytes", "bytes_limit", "bytes_reserved"} <= set(stats):
            continue
        unreserved = stats["bytes_limit"] - stats["bytes_reserved"]
        room = max(stats["largest_free_block_bytes"], unreserved)
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        if nbytes > room or nbytes * count > free:
            raise ValueError(
                f"{what}: {count} arrays of {nbytes / 2**30:.3g} GiB do not fit {d}: its largest free block is "
                f"{room / 2**30:.3g} GiB of {free / 2**30:.3g} GiB free; lower engine_settings.kv_memory_gb / "
                "kv_memory_fraction, or unroll the layers (engine_settings.scan_layers=False: one array per layer)")


def step_reserve_bytes(config, spec, *, num_slots: int, max_len: int,
                       max_prefill_tokens: int) -> int:
    """An upper bound on one device's temporaries in the engine's largest device call, which
    the KV pools must leave free: a prefill call of `max_prefill_tokens` tokens (activations
    of every matmul, fp32-sized; one attention chunk's gathered K/V pages, fp32, for the most
    rows a call has, and its fp32 scores; the rows' logits) or a decode call over every slot
    (one chunk of K/V pages per row). The pool itself is updated in place (donated; see
    tests/test_inference_memory.py), so it needs no room here."""
    f32 = 4
    rows = min(pow2_at_least(num_slots), max(1, max_prefill_tokens // PREFILL_MIN))
    chunk = min(CHUNK_TOKENS, max_len)
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    per_token = f32 * (4 * config.hidden_size + 3 * config.intermediate_size + 2 * qkv)
    scores = 5 * f32 * spec.num_heads * chunk       # scores, masked, exponentials, probabilities (x2)
    pages = 2 * f32 * spec.num_kv_heads * chunk * spec.head_dim    # one chunk of K and V, per row
    logits = 2 * f32 * padded_vocab(spec.vocab_size)
    prefill = max_prefill_tokens * (per_token + scores) + rows * (pages + logits)
    decode = pow2_at_least(num_slots) * (pages + logits)
    return max(prefill, decode)


def pool_blocks(spec, block_size: int, dtype, *, num_slots: int, max_len: int, mesh=None,
                num_blocks: int | None = None, kv_memory_gb: float | None = None,
                kv_memory_fraction: float | None = None, reserve_bytes: int = 0) -> int:
    """Blocks in an engine's pool. First match wins: `num_blocks`; `kv_memory_gb` (GiB of
    each device's memory); `kv_memory_fraction` of each device's free memory now (after the
    weights are placed), never leaving less than `reserve_bytes` free (`step_reserve_bytes`);
    else enough for every slot at max_len (the contiguous cache's size). Never more than
    twice that (the extra keeps released prefixes cached)."""
    per_row = -(-max_len // block_size)
    full = num_slots * per_row
    if num_blocks is not None:
        n = int(num_blocks)
    else:
        shards = 1
        if mesh is not None and spec.num_kv_heads % mesh.shape["tensor"] == 0:
            shards = mesh.shape["tensor"]
        per_device = block_bytes(spec, block_size, dtype) / shards
        budget = None
        if kv_memory_gb is not None:
            budget = float(kv_memory_gb) * 2**30
        elif kv_memory_fraction is not None:
            devices = mesh.devices.flat if mesh is not None else jax.devices()[:1]
            free = free_device_bytes(list(devices))
            if free is not None:
                budget = min(float(kv_memory_fraction) * free, free - reserve_bytes)
        n = full if budget is None else min(int(budget // per_device), 2 * full)
    if n < 1:
        raise ValueError(f"KV pool: the budget holds {n} blocks of {block_size} tokens (after "
                         f"{reserve_bytes / 2**30:.2f} GiB kept for a device call's temporaries); "
                         "raise engine_settings.kv_memory_gb / kv_memory_fraction or num_blocks")
    return n


class PagedMemory:
    """The block pool plus the per-row operations on it (see the module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, max_len: int):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size} must be a power of two")
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.max_blocks = -(-max_len // block_size)

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def key(self, row, j: int) -> bytes:
        """Prefix key of the row's j-th full block of history (chain hash, memoised)."""
        bs = self.block_size
        while len(row.keys) <= j:
            i = len(row.keys)
            parent = row.keys[-1] if row.keys else ROOT_KEY
            row.keys.append(block_key(parent, row.history[i * bs:(i + 1) * bs]))
        return row.keys[j]

    def match(self, row) -> int:
        """Take every stored full block continuing the row's cached prefix, leaving at least
        one token to compute (its logits give the next token). Returns tokens reused."""
        bs = self.block_size
        if row.cache_len % bs or len(row.blocks) != row.cache_len // bs:
            return 0
        j, saved = row.cache_len // bs, 0
        while j in self.shareable(row):
            block = self.pool.lookup(self.key(row, j))
            if block is None:
                break
            self.pool.incref(block)
            row.blocks.append(block)
            row.cache_len += bs
            saved += bs
            j += 1
        row.registered = max(row.registered, j)
        return saved

    def shareable(self, row) -> range:
        """Indices of the full blocks a prefill of the row computes that `match` could take
        from the table (every full block before the last token)."""
        bs = self.block_size
        if row.cache_len % bs:
            return range(0)
        return range(row.cache_len // bs, (len(row.history) - 1) // bs)

    def grow(self, row, tokens: int, evict: Callable[[], bool]) -> bool:
        """Give the row blocks for `tokens` positions; `evict()` frees memory elsewhere and
        returns False when it cannot. False if the blocks could not all be had (those
        obtained are kept)."""
        need = min(-(-tokens // self.block_size), self.max_blocks) - len(row.blocks)
        while need > 0:
            block = self.pool.alloc()
            if block is None:
                if not evict():
                    return False
                continue
            row.blocks.append(block)
            need -= 1
        return True

    def register(self, row) -> None:
        """Offer the row's newly completed full blocks to the prefix table."""
        full = row.cache_len // self.block_size
        while row.registered < full:
            self.pool.register(row.blocks[row.registered], self.key(row, row.registered))
            row.registered += 1

    def truncate(self, row, n: int) -> None:
        """Keep the first n cached tokens (history already cut). A kept partial block that
        is registered is unregistered if only this row holds it, else dropped (its tokens
        are recomputed), so the row never writes into a shared block."""
        bs = self.block_size
        del row.keys[len(row.history) // bs:]
        keep = -(-n // bs)
        for block in row.blocks[keep:]:
            self.pool.decref(block)
        del row.blocks[keep:]
        row.cache_len = n
        row.registered = min(row.registered, n // bs)
        if n % bs and self.pool.is_registered(row.blocks[-1]):
            last = row.blocks[-1]
            if self.pool.refs[last] == 1:
                self.pool.unregister(last)
            else:
                self.pool.decref(last)
                row.blocks.pop()
                row.cache_len = (n // bs) * bs

    def trim(self, row) -> None:
        """Return blocks reserved past the row's cached tokens (decode reserves ahead)."""
        keep = -(-row.cache_len // self.block_size)
        for block in row.blocks[keep:]:
            self.pool.decref(block)
        del row.blocks[keep:]

    def drop(self, row) -> None:
        """Free all of the row's blocks; its tokens stay in `history` for a recompute."""
        for block in row.blocks:
            self.pool.decref(block)
        row.blocks = []
        row.cache_len = 0
        row.registered = 0

    def table(self, rows, width: int) -> np.ndarray:
        """(len(rows), width) int32 block tables (None rows and unused entries: block 0,
        masked by length)."""
        out = np.zeros((len(rows), width), np.int32)
        for r, row in enumerate(rows):
            if row is not None:
                blocks = row.blocks[:width]
                out[r, : len(blocks)] = blocks
        return out
