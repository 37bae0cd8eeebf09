"""Which example comes when: weighted mixtures, holdout split, per-epoch shuffle, host shards.

An epoch of a mixture has `epoch_size` examples (default: the sum of source sizes). With
weights w_i (normalised to proportions p_i) source i contributes round(p_i * epoch_size)
examples: fewer than it has → a fresh random subset each epoch; more → it is repeated,
each repetition a fresh permutation. Without weights every source contributes all its
examples once (plain concatenation, as the reference's "unified" files). The combined list
is shuffled with a generator seeded by (seed, epoch), so any epoch's order can be rebuilt
from the seed alone — which is what makes iterator state small.

grain's `MapDataset.mix` stops at its shortest source and has no per-epoch fresh subset or
repetition of a source, so the quotas above are ours; shuffling is a seeded numpy permutation.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def holdout_mask(source_name: str, size: int, fraction: float) -> np.ndarray:
    """Boolean (size,) mask of held-out examples, a stable hash of (source name, index)."""
    if fraction <= 0:
        return np.zeros(size, bool)
    if fraction >= 1:
        raise ValueError(f"holdout_fraction={fraction}: must be below 1")
    scores = np.empty(size, np.float64)
    for i in range(size):
        digest = hashlib.blake2b(f"{source_name}\x00{i}".encode(), digest_size=8).digest()
        scores[i] = int.from_bytes(digest, "little") / 2.0**64
    return scores < fraction


class Mixture:
    """Per-epoch example order over several sources: entries are (source index, example index)."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None = None,
                 epoch_size: int | None = None, seed: int = 0, shuffle: bool = True,
                 allowed: Sequence[np.ndarray] | None = None):
        self.allowed = [np.arange(n) if allowed is None else np.flatnonzero(allowed[i])
                        for i, n in enumerate(sizes)]
        counts = [len(a) for a in self.allowed]
        if sum(counts) == 0:
            raise ValueError("mixture: no examples (after the holdout split)")
        self.seed, self.shuffle = seed, shuffle
        if weights is None:
            self.quotas = counts
        else:
            if len(weights) != len(sizes):
                raise ValueError(f"mixture: {len(weights)} weights for {len(sizes)} sources")
            w = np.asarray(weights, np.float64)
            if np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"mixture weights {list(weights)}: must be >= 0 with a positive sum")
            empty = [i for i, c in enumerate(counts) if c == 0 and w[i] > 0]
            if empty:
                raise ValueError(f"mixture: source {empty[0]} has weight {w[empty[0]]} but no examples")
            total = epoch_size or sum(counts)
            self.quotas = [int(round(p * total)) for p in w / w.sum()]
        self.epoch_size = sum(self.quotas)
        self._cache: dict[int, np.ndarray] = {}

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *keys])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(epoch_size, 2) int64 array of (source, example) for this epoch."""
        if epoch in self._cache:
            return self._cache[epoch]
        parts = []
        for s, (quota, allowed) in enumerate(zip(self.quotas, self.allowed)):
            if not self.shuffle:
                idx = np.resize(allowed, quota)
            else:
                reps = -(-quota // max(len(allowed), 1))
                idx = np.concatenate([allowed[self._rng(epoch, s, r).permutation(len(allowed))]
                                      for r in range(reps)])[:quota] if quota else allowed[:0]
            parts.append(np.stack([np.full(len(idx), s), idx], axis=1))
        order = np.concatenate(parts).astype(np.int64)
        if self.shuffle:
            order = order[self._rng(epoch, 1 << 20).permutation(len(order))]
        if len(self._cache) > 2:
            self._cache.pop(min(self._cache))
        self._cache[epoch] = order
        return order


def host_slice(order: np.ndarray, process_index: int, process_count: int, pad: bool = False) -> np.ndarray:
    """This host's share: every process_count-th entry; equal lengths on all hosts.

    pad=False drops the remainder (training); pad=True keeps everything and marks the
    missing tail entries with -1 (evaluation, where nothing may be lost).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    if pad:
        per_host = -(-len(order) // process_count)
        mine = order[process_index::process_count]
        fill = np.full((per_host - len(mine), order.shape[1]), -1, order.dtype)
        return np.concatenate([mine, fill])
    per_host = len(order) // process_count
    return order[process_index::process_count][:per_host]
