"""The four reference eval sets read through the data pipeline's tfds builders
(`lumos_jax/data/tfds_builders.py`, `lumos_eval/<name>`, array_record, no TensorFlow).

Rows come back as the same `Example`s the file readers give (ids, questions and golds in the
metrics' form), so either source can feed the runner; `tests/test_eval_datasets.py` checks
that the two agree example for example.
"""

from __future__ import annotations

import json
from pathlib import Path

from lumos_jax.evaluation import metrics
from lumos_jax.evaluation.datasets import Example

TFDS_NAMES = ("gsm8k", "svamp", "strategyqa", "hotpotqa")
_DOMAIN = {"gsm8k": "maths", "svamp": "maths", "strategyqa": "complex_qa", "hotpotqa": "complex_qa"}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _example(name: str, row: dict) -> Example:
    ex_id, question, answer = _text(row["id"]), _text(row["question"]), _text(row["answer"])
    meta = json.loads(_text(row["meta_json"]))
    if name == "gsm8k":
        gold = metrics.reference_gold_number(answer)
    elif name == "svamp":
        gold = str(int(float(answer))) if float(answer).is_integer() else answer
        ex_id = str(meta.get("ID", ex_id))
        meta = {"equation": meta.get("Equation"), "type": meta.get("Type")}
    elif name == "strategyqa":
        gold = metrics.yes_no_gold(answer)
    else:
        gold = answer
    return Example(ex_id, question.strip(), gold, _DOMAIN[name], meta)


def read_tfds(name: str, data_dir: str | Path, manual_dir: str | Path) -> list[Example]:
    """Build `lumos_eval/<name>` under data_dir from the files in manual_dir (once), then read."""
    if name not in TFDS_NAMES:
        raise ValueError(f"no tfds builder for eval dataset {name!r}; have {', '.join(TFDS_NAMES)}")
    # deferred: tensorflow_datasets takes seconds to import and only tfds eval sets need it
    import tensorflow_datasets as tfds

    from lumos_jax.data.tfds_builders import build

    build(f"lumos_eval/{name}", data_dir, manual_dir)
    source = tfds.data_source(f"lumos_eval/{name}", split="test", data_dir=str(data_dir))
    return [_example(name, source[i]) for i in range(len(source))]
