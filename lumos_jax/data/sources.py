"""Random-access record sources: annotation JSONL files, tfds array_record datasets, or
examples already encoded in memory (`EncodedSource`: synthetic tokens, files encoded up front).

Each source encodes its own example i (`encode`, `length`), so the one batch iterator
(`lumos_jax.data.loader.BatchIterator`) reads all three kinds alike. A source spec is a string:
- `path/to/file.jsonl` — a Lumos annotation file, validated when opened;
- `tfds:NAME/CONFIG` (optionally `:SPLIT`, default `train`) — a dataset written by
  `lumos_jax.data.tfds_builders`, read with `tfds.data_source` through a `grain.MapDataset`
  (no TensorFlow). `tfds_data_dir` says where it was built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from lumos_jax.data.encoding import Encoded, encode_fast, encode_many
from lumos_jax.data.records import BadRecordReport, read_annotations
from lumos_jax.tokenization import Tokenizer, concat_messages


class RecordSource:
    """`len(src)`, `src[i]` → `{dataset, id, messages}`; `name` for errors and holdout hashing;
    `where(i)` → `file:line` (or `name record i`) for messages."""

    def __init__(self, name: str, records, path: str | None = None, lines: Sequence[int] | None = None):
        self.name = name
        self._records = records
        self._path, self._lines = path, lines

    def where(self, i: int) -> str:
        if self._lines is not None:
            return f"{self._path}:{self._lines[i]}"
        return f"{self.name} record {i}"

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> dict:
        return self._records[i]

    def encode(self, i: int, tokenizer: Tokenizer, max_len: int) -> Encoded:
        record = self[i]
        try:
            return encode_fast(record["messages"], tokenizer, max_len)
        except ValueError as e:
            raise ValueError(f"{self.where(i)} (id {record.get('id')}): {e}") from None

    def encode_many(self, indices: Sequence[int], tokenizer: Tokenizer, max_len: int) -> list[Encoded]:
        """`encode` of each index in one batched tokenizer call (a bad record raises; the
        loader then encodes one by one, whose error names it)."""
        return encode_many([self[i]["messages"] for i in indices], tokenizer, max_len)

    def length(self, i: int, tokenizer: Tokenizer, max_len: int) -> int:
        """Tokens of example i after truncation (BOS included when the tokenizer adds one),
        without computing its labels."""
        text = concat_messages(self[i]["messages"], tokenizer.eos_token).strip()
        return min(len(tokenizer.encode(text, add_bos=tokenizer.chat_bos)), max_len)


class EncodedSource:
    """Examples already encoded: `(input_ids, labels)` pairs (labels -100 where masked); the
    tokenizer is not needed. `encode` cuts them to max_len as file sources are cut."""

    def __init__(self, name: str, examples: Sequence[tuple]):
        self.name = name
        self._examples = [(np.asarray(ids, np.int32), np.asarray(labels, np.int32)) for ids, labels in examples]

    def where(self, i: int) -> str:
        return f"{self.name} example {i}"

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self._examples[i]

    def encode(self, i: int, tokenizer, max_len: int) -> Encoded:
        ids, labels = self._examples[i]
        return Encoded(ids[:max_len], labels[:max_len], len(ids))

    def length(self, i: int, tokenizer, max_len: int) -> int:
        return min(len(self._examples[i][0]), max_len)


def _decode_tfds_example(example: dict) -> dict:
    def text(v):
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    return {"dataset": text(example["dataset"]), "id": text(example["id"]),
            "messages": json.loads(text(example["messages_json"]))}


def open_source(spec: str, skip_bad_records: bool = False, report: BadRecordReport | None = None,
                tfds_data_dir: str | None = None) -> RecordSource:
    if spec.startswith("tfds:"):
        # deferred: grain and tensorflow_datasets take seconds to import and only tfds: specs use them
        import grain
        import tensorflow_datasets as tfds

        name, _, split = spec[len("tfds:"):].partition(":")
        import lumos_jax.data.tfds_builders  # noqa: F401  (registers the builders)

        data_source = tfds.data_source(name, split=split or "train", data_dir=tfds_data_dir,
                                       download=False)
        dataset = grain.MapDataset.source(data_source).map(_decode_tfds_example)
        return RecordSource(spec, dataset)
    path = Path(spec)
    lines: list[int] = []
    records = read_annotations(path, skip_bad_records, report, lines)
    return RecordSource(path.name, records, str(path), lines)


def open_sources(specs: Sequence, skip_bad_records: bool = False, report: BadRecordReport | None = None,
                 tfds_data_dir: str | None = None) -> list:
    """Specs (strings) opened; EncodedSource objects passed through."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise ValueError("data sources: at least one file or tfds dataset is needed")
    out = [s if isinstance(s, EncodedSource) else open_source(s, skip_bad_records, report, tfds_data_dir)
           for s in specs]
    for spec, src in zip(specs, out):
        if len(src) == 0:
            raise ValueError(f"data source {getattr(spec, 'name', spec)}: no usable records")
    return out
