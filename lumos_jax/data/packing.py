"""Rows of training tokens: one conversation per row, or several packed per row.

A conversation of n tokens takes n - 1 slots (inputs ids[:-1], targets ids[1:]). The
packer keeps up to `open_rows` partly filled rows and puts each conversation into the
first one it fits (first fit); when none has room and all are open, the fullest row is
finished and a new one opened. Its decisions depend only on lengths, so the same packing
can be replayed from lengths alone (exact batch counts) or from the references stored in
an iterator state (exact resume).

Why not grain's `FirstFitPackIterDataset` (grain 0.2.18): measured on 20,000 conversations of
64-1,500 tokens into 2,048-slot rows, 8 open rows / bins, batch 32 (CPU, this container),
ours packs and renders 31-35M tokens/s at 94.0% of slots filled; grain's 0.7M tokens/s at
85.3% (it emits all its bins whenever one example fits none). Its rows also differ, and the
exact batch counts (`steps_per_epoch`, `num_batches`) replay this packer on lengths alone.
"""

from __future__ import annotations

from typing import Hashable, Iterable

import numpy as np

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


class Packer:
    """First-fit packer over items (key, slots); finished rows are lists of keys."""

    def __init__(self, seq_len: int, open_rows: int = 8, packing: bool = True):
        self.seq_len, self.open_rows, self.packing = seq_len, open_rows, packing
        self.rows: list[list[Hashable]] = []  # open rows (keys)
        self.used: list[int] = []  # slots used per open row

    def add(self, key: Hashable, slots: int) -> list[list[Hashable]]:
        """Place one item; returns the rows this finished (in order)."""
        if slots > self.seq_len:
            raise ValueError(f"example of {slots} slots does not fit seq_len {self.seq_len}")
        if not self.packing:
            return [[key]]
        for r, used in enumerate(self.used):
            if used + slots <= self.seq_len:
                self.rows[r].append(key)
                self.used[r] += slots
                return self._pop_full()
        finished = []
        if len(self.rows) >= self.open_rows:
            fullest = int(np.argmax(self.used))
            finished.append(self.rows.pop(fullest))
            self.used.pop(fullest)
        self.rows.append([key])
        self.used.append(slots)
        return finished + self._pop_full()

    def _pop_full(self) -> list[list[Hashable]]:
        done = [r for r, u in zip(self.rows, self.used) if u == self.seq_len]
        if done:
            keep = [i for i, u in enumerate(self.used) if u < self.seq_len]
            self.rows = [self.rows[i] for i in keep]
            self.used = [self.used[i] for i in keep]
        return done

    def flush(self) -> list[list[Hashable]]:
        rows, self.rows, self.used = self.rows, [], []
        return rows

    def restore(self, rows: list[list[Hashable]], slots_of) -> None:
        self.rows = [list(r) for r in rows]
        self.used = [sum(slots_of(k) for k in r) for r in self.rows]


def render_rows(rows: Iterable[list[tuple[np.ndarray, np.ndarray]]], seq_len: int, batch_size: int,
                pad_id: int) -> dict[str, np.ndarray]:
    """Batch dict (batch_size, seq_len) from rows of (input_ids, labels); missing rows are empty."""
    out = {k: np.zeros((batch_size, seq_len), np.int32) for k in BATCH_KEYS}
    out["input_ids"].fill(pad_id)
    for b, row in enumerate(rows):
        at = 0
        for seg, (ids, labels, *_) in enumerate(row, 1):
            n = len(ids) - 1
            out["input_ids"][b, at:at + n] = ids[:-1]
            out["targets"][b, at:at + n] = ids[1:]
            out["loss_mask"][b, at:at + n] = labels[1:] >= 0
            out["segment_ids"][b, at:at + n] = seg
            out["positions"][b, at:at + n] = np.arange(n, dtype=np.int32)
            at += n
    return out
