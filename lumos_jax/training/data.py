"""Training batches: the data pipeline's iterator, or a small in-memory one with the same
contract, and the step from a host's rows to one global sharded batch.

Contract (docs/architecture.md, docs/data.md): dicts of int32 (rows, seq_len) arrays
`input_ids, targets, loss_mask, segment_ids, positions`; the iterator has
`get_state()` / `set_state()` (JSON) and `steps_per_epoch`.

`InMemoryBatches` defines the *global* batch sequence and hands each process its own
rows of it, so a run gives the same batches on any number of processes (the property
the multi-host test checks). The pipeline's iterator (`lumos_jax.data.loader`) instead gives
each host disjoint examples. Both pack with the one first-fit `Packer` and lay rows out with
`render_rows` (lumos_jax/data/packing.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, Sequence

import gin
import jax
import numpy as np

from lumos_jax.data.loader import make_eval_iterator, make_train_iterator
from lumos_jax.data.packing import BATCH_KEYS, Packer, render_rows
from lumos_jax.data.records import BadRecordError, parse_record, untrained_message
from lumos_jax.jsonl import iter_jsonl_lines
from lumos_jax.tokenization import Tokenizer, encode_conversation

Example = tuple[np.ndarray, np.ndarray]  # (input_ids, labels) of one conversation


def pack_rows(examples: Sequence[Example], seq_len: int, packing: bool) -> list[list[Example]]:
    """Rows (lists of examples) in the pipeline's first-fit order; each row fills seq_len slots
    at most (n tokens take n - 1). Longer examples are cut to seq_len + 1 tokens."""
    examples = [(ids[:seq_len + 1], labels[:seq_len + 1]) for ids, labels in examples]
    packer, rows = Packer(seq_len, packing=packing), []
    for i, (ids, _) in enumerate(examples):
        rows += packer.add(i, len(ids) - 1)
    return [[examples[i] for i in row] for row in rows + packer.flush()]


class InMemoryBatches:
    """Deterministic batches from examples held in memory: a fresh permutation per epoch
    (seed + epoch), rows built per epoch. Its position is (epoch, batch index), so
    `set_state` is exact and cheap.

    Every epoch gives `steps_per_epoch` full batches (counted on epoch 0): with packing a
    later epoch's shuffle packs into a few more or fewer rows, so surplus rows are dropped
    and a shortfall is topped up with empty rows (segment 0, loss_mask 0: no targets).
    `token_vocab_size`: ids in input_ids/targets are below it (checked against the model)."""

    def __init__(self, examples: Sequence[dict], seq_len: int, global_batch: int, seed: int = 0,
                 packing: bool = False, shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 pad_id: int = 0, token_vocab_size: int | None = None):
        self.examples = [(np.asarray(ids), np.asarray(labels)) for ids, labels in examples]
        if not self.examples:
            raise ValueError("training data: no examples")
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.packing, self.shuffle, self.num_epochs, self.pad_id = packing, shuffle, num_epochs, pad_id
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch % self.process_count:
            raise ValueError(f"global batch {global_batch} not divisible by {self.process_count} processes")
        self.local_batch = global_batch // self.process_count
        self.token_vocab_size = token_vocab_size
        self.epoch, self.index = 0, 0
        self._rows_epoch, self._rows = None, None
        self.steps_per_epoch = len(self._epoch_rows(0)) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"training data: {len(self._epoch_rows(0))} rows of {seq_len} tokens "
                             f"make no full global batch of {global_batch}")

    def _epoch_rows(self, epoch: int) -> list[list[Example]]:
        if self._rows_epoch != epoch:
            order = np.arange(len(self.examples))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(order)
            self._rows = pack_rows([self.examples[i] for i in order], self.seq_len, self.packing)
            self._rows_epoch = epoch
        return self._rows

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        rows = self._epoch_rows(self.epoch)
        start = self.index * self.global_batch + self.process_index * self.local_batch
        self.index += 1  # rows missing at the end of a short epoch are empty (no targets)
        return render_rows(rows[start:start + self.local_batch], self.seq_len, self.local_batch, self.pad_id)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def encode_files(paths: Sequence[str | Path], tokenizer, max_len: int) -> list[tuple]:
    """(input_ids, labels) per record. Records are checked as the data pipeline checks them
    (BadRecordError `file:line: what`: bytes, JSON, roles, empty or missing assistant turn);
    records with no trained token are left out, counted and reported in one line."""
    out, untrained = [], []
    for path in paths:
        for n, raw in iter_jsonl_lines(path):
            record, problem = parse_record(raw, f"{path}:{n}")
            if problem is not None:
                raise BadRecordError(problem[1])
            ids, labels = encode_conversation(record["messages"], tokenizer, max_len)
            if not np.any(np.asarray(labels)[1:] != -100):
                untrained.append(f"{path}:{n}")
                continue
            out.append((ids, labels))
    if untrained:
        print(untrained_message(len(untrained), untrained, max_len), file=sys.stderr, flush=True)
    return out


def synthetic_examples(num: int, vocab_size: int, min_len: int, max_len: int, seed: int = 0) -> list[tuple]:
    """Random token conversations with a masked 'prompt' half: for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        n = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(3, vocab_size, n).astype(np.int32)
        ids[0] = 1
        labels = ids.copy()
        labels[: n // 2] = -100
        out.append((ids, labels))
    return out


@gin.configurable
def training_data(seq_len: int = 1024, global_batch: int = 128, seed: int = 0,
                  source: str = "auto", data_dir: str | None = None,
                  task: str | None = None, module: str | None = None,
                  formulation: str | None = None, files: Sequence[str] = (),
                  tokenizer: str | None = None, packing: bool = True,
                  max_seq_length: int | None = None, holdout_fraction: float = 0.0,
                  synthetic_vocab: int = 512, synthetic_examples_count: int = 256):
    """The train iterator a run uses (and a held-out one when holdout_fraction > 0).

    Files: `files`, or `{data_dir}/lumos_{task}_{module}_{formulation}.jsonl` (the
    released naming). source: "pipeline" (lumos_jax.data.loader; "auto" is the same),
    "memory" (encode every file up front, pad with id 0), "synthetic" (random tokens).
    Returns (train_iterator, eval_iterator_factory or None)."""
    if source == "synthetic":
        ex = synthetic_examples(synthetic_examples_count, synthetic_vocab, seq_len // 4, seq_len + 1, seed)
        return InMemoryBatches(ex, seq_len, global_batch, seed, packing=packing,
                               token_vocab_size=synthetic_vocab), None
    paths = [Path(f) for f in files]
    if not paths:
        if not (task and module and formulation):
            raise ValueError("training_data: set `files` or all of task, module, formulation")
        if not data_dir:
            raise ValueError("training_data.data_dir: set it to the folder holding lumos_{task}_{module}_"
                             "{formulation}.jsonl (the 12 bundled samples: 'bundled:demo_data/annotations')")
        paths = [Path(data_dir) / f"lumos_{task}_{module}_{formulation}.jsonl"]
    for p in paths:  # relative paths are relative to the current folder
        if not p.exists():
            where = "training_data.files" if files else "training_data.data_dir"
            raise FileNotFoundError(f"{where}: {p.absolute()} does not exist")
    if not tokenizer:
        raise ValueError("training_data.tokenizer: set it to the tokenizer's folder (the base model's, "
                         "e.g. Llama-2-7b-hf; the bundled 512-piece one: 'bundled:stories260k')")
    tok_path = Path(tokenizer)
    if source in ("auto", "pipeline"):
        per_host = global_batch // jax.process_count()
        common = dict(sources=[str(p) for p in paths], tokenizer=str(tok_path), seq_len=seq_len,
                      batch_size=per_host)
        it = make_train_iterator(**common, packing=packing, seed=seed, num_epochs=None,
                                 max_seq_length=max_seq_length, holdout_fraction=holdout_fraction)
        ev = ((lambda: make_eval_iterator(**common, holdout_fraction=holdout_fraction))
              if holdout_fraction > 0 else None)
        return it, ev
    if source != "memory":
        raise ValueError(f"training_data.source={source!r}; expected auto, pipeline, memory or synthetic")
    tok = Tokenizer(tok_path, add_pad_token=True)
    examples = encode_files(paths, tok, max_seq_length or seq_len)
    held = []
    if holdout_fraction > 0:
        order = np.random.default_rng([seed, 12345]).permutation(len(examples))
        n_eval = max(1, int(round(holdout_fraction * len(examples))))
        held = [examples[i] for i in order[:n_eval]]
        examples = [examples[i] for i in order[n_eval:]]
    # Padding is masked (segment 0, loss_mask 0), so it uses id 0, valid in any vocab; the
    # tokenizer's <pad> is one past its base vocab and may not exist in the model.
    it = InMemoryBatches(examples, seq_len, global_batch, seed, packing=packing, pad_id=0,
                         token_vocab_size=tok.vocab_size)
    ev = None
    if held:
        def ev():
            return _fixed_batches(pack_rows(held, seq_len, packing), seq_len, global_batch)
    return it, ev


def _fixed_batches(rows: list[list[Example]], seq_len: int, global_batch: int) -> Iterator[dict]:
    """Every row once, the last batch topped up with empty rows (no targets)."""
    local = global_batch // jax.process_count()
    p = jax.process_index()
    for start in range(0, len(rows), global_batch):
        yield render_rows(rows[start + p * local: start + (p + 1) * local], seq_len, local, pad_id=0)


def data_vocab_size(iterator) -> int | None:
    """Ids the iterator can emit are below this (None when it can't tell): the memory and
    synthetic iterators say so; the data pipeline's is its tokenizer's vocab, <pad> included
    (it pads input_ids with the tokenizer's pad id)."""
    size = getattr(iterator, "token_vocab_size", None)
    if size is None and getattr(iterator, "tokenizer", None) is not None:
        size = iterator.tokenizer.vocab_size
    return None if size is None else int(size)


def check_vocab(iterator, model_vocab_size: int) -> None:
    """Fail before compiling when the data's ids don't fit the model's embedding; an id past
    it gives NaN losses from step 1 (jnp.take fills out-of-range rows with NaN), no error."""
    data_vocab = data_vocab_size(iterator)
    if data_vocab is not None and data_vocab > model_vocab_size:
        raise ValueError(
            f"training data: ids go up to {data_vocab - 1} (data vocab_size {data_vocab}, the tokenizer's"
            f" with <pad>) but the model's vocab_size is {model_vocab_size}; set"
            f" model_config.overrides={{'vocab_size': {data_vocab}}} (or model_config.preset /"
            f" model_config.hf_dir) or a matching training_data.tokenizer")


def global_batch_array(host_batch: dict, sharding, global_rows: int) -> dict:
    """This host's rows -> global jax.Arrays laid out on the batch sharding."""
    out = {}
    for k in BATCH_KEYS:
        local = np.asarray(host_batch[k], dtype=np.int32)
        shape = (global_rows, local.shape[1])
        out[k] = jax.make_array_from_process_local_data(sharding, local, shape)
    return out
