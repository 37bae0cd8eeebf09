"""The training and evaluation batch iterator: the one every caller reads (the train loop
through `lumos_jax.training.data.training_data`, the `lumos-jax data` CLI, the benchmarks).

`make_train_iterator(...)` → an iterator of batch dicts (see docs/data.md) with
`get_state()` / `set_state()`. State is small and JSON-serialisable: the epoch and
position in this host's example order (rebuilt from the seed), the example references
held in partly packed rows, and running statistics. Restoring it on a fresh iterator
built with the same arguments yields exactly the batches that would have followed.
"""

from __future__ import annotations

import collections
import logging
from typing import Sequence

import gin
import jax
import numpy as np

from lumos_jax.data.encoding import Encoded
from lumos_jax.data.mixture import Mixture, holdout_mask, host_slice
from lumos_jax.data.packing import Packer, render_rows
from lumos_jax.data.records import BadRecordReport, untrained_message
from lumos_jax.data.sources import EncodedSource, open_sources
from lumos_jax.tokenization import Tokenizer

STATE_VERSION = 1
ENCODE_BATCH = 256  # examples per batched tokenizer call
logger = logging.getLogger(__name__)


def _as_tokenizer(tokenizer, sources) -> Tokenizer | None:
    if tokenizer is None:
        if sources and all(isinstance(s, EncodedSource) for s in sources):
            return None  # examples already encoded: no tokenizer needed
        raise ValueError("data loader: a tokenizer (path or Tokenizer) is required")
    return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer, add_pad_token=True)


def _process_info(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


class BatchIterator:
    """Batches of (batch_size, seq_len) int32 arrays from a mixture of sources.

    Hosts share the work in one of two ways. By default each host reads every
    process_count-th example of the epoch order and packs its own rows (no host encodes
    another's examples). With `global_rows=True` every host packs the whole order into the
    same global batches of batch_size * process_count rows and keeps its own rows of each:
    the batches a run trains on are then the same on any number of processes (for examples
    held in memory, where encoding all of them on every host costs little).
    `pad_id`: the id of padding in input_ids (default: the tokenizer's <pad>);
    `token_vocab_size`: ids are below it (default: the tokenizer's vocab, <pad> included)."""

    def __init__(self, sources, tokenizer, *, seq_len: int, batch_size: int, packing: bool,
                 seed: int, num_epochs: int | None, process_index: int, process_count: int,
                 max_seq_length: int | None, weights: Sequence[float] | None = None,
                 epoch_size: int | None = None, holdout_fraction: float = 0.0,
                 holdout_side: str = "train", shuffle: bool = True, pad_hosts: bool = False,
                 open_rows: int = 8, skip_bad_records: bool = False, tfds_data_dir: str | None = None,
                 drop_untrained: bool = True, encode_cache_tokens: int = 1 << 25,
                 global_rows: bool = False, pad_id: int | None = None, token_vocab_size: int | None = None):
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len}, batch_size={batch_size}: need seq_len >= 2, batch_size >= 1")
        self.max_len = seq_len if max_seq_length is None else int(max_seq_length)
        if not 2 <= self.max_len <= seq_len + 1:
            raise ValueError(f"max_seq_length={max_seq_length}: must be in 2..seq_len+1 ({seq_len + 1})")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs={num_epochs}: must be >= 1 or None (forever)")
        self.report = BadRecordReport()
        self.sources = open_sources(sources, skip_bad_records, self.report, tfds_data_dir)
        self.tokenizer = _as_tokenizer(tokenizer, self.sources)
        if pad_id is None:
            pad_id = 0 if self.tokenizer is None or self.tokenizer.pad_id is None else self.tokenizer.pad_id
        self.pad_id = int(pad_id)
        if token_vocab_size is None and self.tokenizer is not None:
            token_vocab_size = self.tokenizer.vocab_size
        self.token_vocab_size = token_vocab_size
        self.global_rows = global_rows
        self.rows_per_step = batch_size * process_count if global_rows else batch_size
        held = [holdout_mask(s.name, len(s), holdout_fraction) for s in self.sources]
        allowed = held if holdout_side == "eval" else [~h for h in held]
        self.mixture = Mixture([len(s) for s in self.sources], weights, epoch_size, seed, shuffle, allowed)
        self.seq_len, self.batch_size, self.packing = seq_len, batch_size, packing
        self.num_epochs, self.pad_hosts = num_epochs, pad_hosts
        # Records with no trained token are left out of training (and reported); the batch
        # counts (steps_per_epoch, num_batches) leave them out too.
        self.drop_untrained = drop_untrained
        self.untrained: list[str] = []  # file:line of the first few, this epoch
        self.untrained_epoch = 0
        self._seen_epoch = self._kept_epoch = 0  # this process, this epoch: stops a hopeless loop
        self.process_index, self.process_count = process_index, process_count
        self._lengths = [np.full(len(s), -1, np.int32) for s in self.sources]
        self._has_target = [np.full(len(s), -1, np.int8) for s in self.sources]  # -1: not known yet
        self._encoded: dict[tuple[int, int], Encoded | None] = {}  # by (epoch, position)
        self._by_example: dict[tuple[int, int], Encoded] = {}  # by (source, index), across epochs
        self._cache_tokens_left = int(encode_cache_tokens)
        self._ahead: dict[tuple[int, int], Encoded] = {}  # encoded in a batch past the cache budget
        self._fingerprint = {"sources": [s.name for s in self.sources], "sizes": [len(s) for s in self.sources],
                             "weights": None if weights is None else [float(w) for w in weights],
                             "seq_len": seq_len, "batch_size": batch_size, "packing": packing, "seed": seed,
                             "max_len": self.max_len, "process": [process_index, process_count],
                             "holdout": [holdout_fraction, holdout_side], "open_rows": open_rows}
        if global_rows:  # only when set: states saved before the option existed still match
            self._fingerprint["global_rows"] = True
        self._packer = Packer(seq_len, open_rows, packing)
        if len(self._host_order(0)) == 0:
            raise ValueError(f"data loader: {self.mixture.epoch_size} examples per epoch is fewer than "
                             f"{process_count} hosts")
        self._reset_position()

    def _report_untrained(self) -> None:
        """One line per epoch with the count and the first few file:line."""
        if self.untrained_epoch and self.drop_untrained:
            logger.warning("epoch %d: %s", self.epoch,
                           untrained_message(self.untrained_epoch, self.untrained, self.max_len))
        self.untrained, self.untrained_epoch = [], 0

    # -- order ------------------------------------------------------------------------
    def _host_order(self, epoch: int) -> np.ndarray:
        """The examples this host packs: its share, or all of them with global_rows."""
        if self.global_rows:
            return self.mixture.epoch_order(epoch)
        return host_slice(self.mixture.epoch_order(epoch), self.process_index, self.process_count,
                          pad=self.pad_hosts)

    def _reset_position(self):
        self.epoch, self.pos, self.batches = 0, 0, 0
        self._ready: list[list[tuple[int, int]]] = []
        self._exhausted = False
        self.stats = collections.Counter()
        self._packer.flush()

    # -- examples ---------------------------------------------------------------------
    def _ref(self, key: tuple[int, int]) -> tuple[int, int]:
        s, i = self._host_order(key[0])[key[1]]
        return int(s), int(i)

    def _encode_example(self, s: int, i: int) -> Encoded:
        """One example's encoding; kept for later epochs while the cache budget lasts (the
        encoding is deterministic, so this changes speed only: ~85% of a batch's host time)."""
        enc = self._by_example.get((s, i))
        if enc is None:
            enc = self._ahead.pop((s, i), None)
        if enc is None:
            enc = self.sources[s].encode(i, self.tokenizer, self.max_len)
            self._keep(s, i, enc)
        return enc

    def _keep(self, s: int, i: int, enc: Encoded, ahead: bool = False) -> None:
        self._lengths[s][i] = len(enc.input_ids)
        self._has_target[s][i] = int(np.any(enc.labels[1:] >= 0))
        if len(enc.input_ids) <= self._cache_tokens_left:
            self._by_example[(s, i)] = enc
            self._cache_tokens_left -= len(enc.input_ids)
        elif ahead:
            self._ahead[(s, i)] = enc

    def _encode_batched(self, refs, ahead: bool) -> None:
        """Encode the examples among `refs` ((source, index) pairs) not encoded yet, ENCODE_BATCH
        per batched tokenizer call (HF tokenizers use every core; the SmolLM2 grounder data
        took ~5 ms a conversation one by one on one core). `ahead`: keep the ones past the
        cache budget until their turn (a window); otherwise only their lengths are kept."""
        todo: dict[int, list[int]] = {}
        for s, i in refs:
            s, i = int(s), int(i)
            if s >= 0 and self._has_target[s][i] < 0 and (s, i) not in self._ahead:
                todo.setdefault(s, []).append(i)
        for s, indices in todo.items():
            many = getattr(self.sources[s], "encode_many", None)
            indices = list(dict.fromkeys(indices))
            for lo in range(0, len(indices) if many else 0, ENCODE_BATCH):
                chunk = indices[lo: lo + ENCODE_BATCH]
                try:
                    encoded = many(chunk, self.tokenizer, self.max_len)
                except ValueError:  # a bad record: encoded one by one later, its error names it
                    continue
                for i, enc in zip(chunk, encoded):
                    self._keep(s, i, enc, ahead)

    def _encode(self, key: tuple[int, int]) -> Encoded | None:
        if key not in self._encoded:
            s, i = self._ref(key)
            if s >= 0 and self._has_target[s][i] < 0 and getattr(self.sources[s], "encode_many", None):
                epoch, pos = key  # (a source without batched encoding: no window scan per example)
                self._encode_batched(self._host_order(epoch)[pos: pos + ENCODE_BATCH], ahead=True)
            self._encoded[key] = None if s < 0 else self._encode_example(s, i)
        return self._encoded[key]

    def _slots(self, key) -> int:
        enc = self._encode(key)
        return 0 if enc is None else len(enc.input_ids) - 1

    def example_length(self, source: int, index: int) -> int:
        """Tokens of one example after truncation (BOS included when the tokenizer adds one); cached."""
        n = self._lengths[source][index]
        if n < 0:
            n = self.sources[source].length(index, self.tokenizer, self.max_len)
            self._lengths[source][index] = n
        return int(n)

    def _kept(self, source: int, index: int) -> bool:
        """Whether the example goes into batches (pads do; untrained ones don't when dropped)."""
        if source < 0 or not self.drop_untrained:
            return True
        if self._has_target[source][index] < 0:
            self._encode_example(source, index)
        return bool(self._has_target[source][index])

    def _kept_count(self, epoch: int) -> int:
        order = self._host_order(epoch)
        if self.drop_untrained:
            self._encode_batched(order, ahead=False)
        return sum(self._kept(int(s), int(i)) for s, i in order)

    # -- iteration --------------------------------------------------------------------
    def __iter__(self):
        return self

    def _advance(self) -> bool:
        """Feed one example to the packer; False when the data is exhausted."""
        order_len = len(self._host_order(self.epoch))
        if self.pos >= order_len:
            if self.drop_untrained and order_len and self._seen_epoch == order_len and not self._kept_epoch:
                raise ValueError(
                    f"training data: none of the {order_len} records on this host has a trained token within "
                    f"max_len {self.max_len} (first: {', '.join(self.untrained[:3]) or 'n/a'}); "
                    "raise train.seq_len / training_data.max_seq_length")
            self._seen_epoch = self._kept_epoch = 0
            self._report_untrained()
            self.epoch, self.pos = self.epoch + 1, 0
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                self._ready.extend(self._packer.flush())
                self._exhausted = True
                return False
        key = (self.epoch, self.pos)
        self.pos += 1
        self._seen_epoch += 1
        enc = self._encode(key)
        if enc is not None:
            self.stats["examples"] += 1
            self.stats["truncated"] += int(enc.full_length > self.max_len)
            if not np.any(enc.labels[1:] >= 0):
                self.stats["no_target"] += 1
                if self.drop_untrained:
                    s, i = self._ref(key)
                    self.untrained_epoch += 1
                    if len(self.untrained) < 5:
                        self.untrained.append(self.sources[s].where(i))
                    if self.stats["no_target"] == 1:  # the first at once; the count per epoch
                        logger.warning("training data: warning: %s: no trained tokens (every assistant "
                                       "token is past max_len %d); left out", self.untrained[0], self.max_len)
                    self._encoded.pop(key, None)
                    return True
        self._kept_epoch += 1
        self._ready.extend(self._packer.add(key, self._slots(key)))
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        while len(self._ready) < self.rows_per_step and not self._exhausted:
            self._advance()
        if not self._ready:
            raise StopIteration
        step_rows, self._ready = self._ready[:self.rows_per_step], self._ready[self.rows_per_step:]
        rows = step_rows
        if self.global_rows:  # this host's rows of the global batch
            rows = step_rows[self.process_index * self.batch_size:(self.process_index + 1) * self.batch_size]
        encoded = [[e for e in (self._encode(k) for k in row) if e is not None] for row in rows]
        batch = render_rows(encoded, self.seq_len, self.batch_size, self.pad_id)
        for row in step_rows:
            for k in row:
                self._encoded.pop(k, None)
        self.batches += 1
        self.stats["rows"] += self.batch_size
        self.stats["tokens"] += int((batch["segment_ids"] > 0).sum())
        self.stats["loss_tokens"] += int(batch["loss_mask"].sum())
        return batch

    # -- state ------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "fingerprint": self._fingerprint, "epoch": self.epoch,
                "pos": self.pos, "batches": self.batches, "exhausted": self._exhausted,
                "open_rows": [[list(k) for k in r] for r in self._packer.rows],
                "ready_rows": [[list(k) for k in r] for r in self._ready], "stats": dict(self.stats)}

    def set_state(self, state: dict) -> None:
        if isinstance(state, dict) and set(state) == {"epoch", "index"}:
            raise ValueError("data iterator state: written by an older lumos-jax's in-memory iterator "
                             "(source 'memory' or 'synthetic'); its batches cannot be resumed: use a fresh workdir")
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state: unsupported version {state.get('version') if isinstance(state, dict) else state!r}")
        if state["fingerprint"] != self._fingerprint:
            diff = sorted(k for k in self._fingerprint if state["fingerprint"].get(k) != self._fingerprint[k])
            raise ValueError(f"data iterator state was saved with different settings ({', '.join(diff)})")
        self._encoded.clear()
        self.epoch, self.pos, self.batches = int(state["epoch"]), int(state["pos"]), int(state["batches"])
        self._exhausted = bool(state["exhausted"])
        self._ready = [[tuple(k) for k in r] for r in state["ready_rows"]]
        self._packer.restore([[tuple(k) for k in r] for r in state["open_rows"]], self._slots)
        self.stats = collections.Counter(state["stats"])

    # -- sizes ------------------------------------------------------------------------
    def _count_rows(self, epochs: Sequence[int]) -> tuple[int, int]:
        """(rows finished within the epochs, rows left open) replaying the packer on lengths."""
        packer = Packer(self.seq_len, self._packer.open_rows, self.packing)
        rows = 0
        for epoch in epochs:
            if self.drop_untrained:  # every example's targets are needed: encode them all, batched
                self._encode_batched(self._host_order(epoch), ahead=False)
            for s, i in self._host_order(epoch):
                if not self._kept(int(s), int(i)):
                    continue
                slots = 0 if s < 0 else self.example_length(int(s), int(i)) - 1
                rows += len(packer.add(0, slots))
        return rows, len(packer.rows)

    @property
    def steps_per_epoch(self) -> int:
        """Full batches in one epoch on this host (packed: replays the packer on lengths)."""
        if not self.packing:
            return self._kept_count(0) // self.rows_per_step
        rows, _ = self._count_rows([0])
        return rows // self.rows_per_step

    @property
    def num_batches(self) -> int | None:
        """Batches the whole run yields (None when num_epochs is None); exact."""
        if self.num_epochs is None:
            return None
        if not self.packing:
            return -(-sum(self._kept_count(e) for e in range(self.num_epochs)) // self.rows_per_step)
        rows, left = self._count_rows(range(self.num_epochs))
        return -(-(rows + left) // self.rows_per_step)

    def summary(self) -> dict:
        """Statistics so far: examples, truncation, tokens, packing efficiency, bad records."""
        st = dict(self.stats)
        rows = st.get("rows", 0)
        st["packing_efficiency"] = st.get("tokens", 0) / (rows * self.seq_len) if rows else 0.0
        st["bad_records"] = self.report.total
        return st


@gin.configurable
def make_train_iterator(sources: Sequence[str] | str = gin.REQUIRED, tokenizer=gin.REQUIRED, *,
                        weights: Sequence[float] | None = None, epoch_size: int | None = None,
                        seq_len: int = 1024, batch_size: int = 8, packing: bool = True, seed: int = 0,
                        num_epochs: int | None = None, process_index: int | None = None,
                        process_count: int | None = None, max_seq_length: int | None = None,
                        holdout_fraction: float = 0.0, open_rows: int = 8,
                        skip_bad_records: bool = False, tfds_data_dir: str | None = None,
                        drop_untrained: bool = True, encode_cache_tokens: int = 1 << 25) -> BatchIterator:
    """Shuffled, host-sharded, (optionally) packed training batches; see docs/data.md.
    drop_untrained=False keeps records with no trained token (counted in summary()["no_target"]).
    encode_cache_tokens: encoded examples kept for later epochs, up to this many tokens
    (8 bytes each: the default 32M tokens is 256 MiB; 0 re-encodes every epoch)."""
    process_index, process_count = _process_info(process_index, process_count)
    return BatchIterator(sources, tokenizer, seq_len=seq_len, batch_size=batch_size, packing=packing,
                         seed=seed, num_epochs=num_epochs, process_index=process_index,
                         process_count=process_count, max_seq_length=max_seq_length, weights=weights,
                         epoch_size=epoch_size, holdout_fraction=holdout_fraction, holdout_side="train",
                         open_rows=open_rows, skip_bad_records=skip_bad_records, tfds_data_dir=tfds_data_dir,
                         drop_untrained=drop_untrained, encode_cache_tokens=encode_cache_tokens)


def make_memory_iterator(examples, *, seq_len: int, global_batch: int, seed: int = 0, packing: bool = True,
                         num_epochs: int | None = None, name: str = "memory",
                         token_vocab_size: int | None = None, holdout_fraction: float = 0.0,
                         evaluation: bool = False, process_index: int | None = None,
                         process_count: int | None = None) -> BatchIterator:
    """Batches of examples held in memory ((input_ids, labels) pairs: synthetic, or files
    encoded up front), the same global batches on any number of processes (global_rows).
    Padding is id 0, inside any vocab (a tokenizer's <pad> may lie past the model's).
    Examples are cut to seq_len + 1 tokens (seq_len slots). evaluation=True: the held-out
    examples (holdout_fraction > 0) or all, once, in order, one per row."""
    process_index, process_count = _process_info(process_index, process_count)
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} not divisible by {process_count} processes")
    source = examples if isinstance(examples, EncodedSource) else EncodedSource(name, examples)
    if len(source) == 0:
        raise ValueError(f"training data ({name}): no examples")
    held_out = evaluation and holdout_fraction > 0
    return BatchIterator([source], None, seq_len=seq_len, batch_size=global_batch // process_count,
                         packing=packing and not evaluation, seed=seed, num_epochs=1 if evaluation else num_epochs,
                         process_index=process_index, process_count=process_count, max_seq_length=seq_len + 1,
                         holdout_fraction=holdout_fraction, holdout_side="eval" if held_out else "train",
                         shuffle=not evaluation, drop_untrained=not evaluation, global_rows=True, pad_id=0,
                         token_vocab_size=token_vocab_size)


@gin.configurable
def make_eval_iterator(sources: Sequence[str] | str = gin.REQUIRED, tokenizer=gin.REQUIRED, *,
                       seq_len: int = 1024, batch_size: int = 8, holdout_fraction: float = 0.0,
                       process_index: int | None = None, process_count: int | None = None,
                       max_seq_length: int | None = None, skip_bad_records: bool = False,
                       tfds_data_dir: str | None = None) -> BatchIterator:
    """One pass, in file order, one conversation per row; with holdout_fraction > 0 only the
    held-out examples (those the train iterator with the same fraction leaves out). Every
    host yields the same number of batches (missing rows are empty)."""
    process_index, process_count = _process_info(process_index, process_count)
    return BatchIterator(sources, tokenizer, seq_len=seq_len, batch_size=batch_size, packing=False,
                         seed=0, num_epochs=1, process_index=process_index, process_count=process_count,
                         max_seq_length=max_seq_length, holdout_fraction=holdout_fraction,
                         holdout_side="eval" if holdout_fraction > 0 else "train", shuffle=False,
                         pad_hosts=True, skip_bad_records=skip_bad_records, tfds_data_dir=tfds_data_dir,
                         drop_untrained=False)
