"""Evaluation sets as lists of `Example`, read the way the reference reads them.

Bundled-format readers (the files in `shared/data/eval/`, as the reference ships them):
GSM8K, SVAMP, StrategyQA, HotpotQA (open-domain question list) and the HotpotQA distractor
sample (questions with their 10 context paragraphs). User-supplied benchmarks (Mind2Web,
WebShop, A-OKVQA, ScienceQA, InterCode-SQL) are in `user_datasets.py`.

Every reader validates each row and raises a one-line `DatasetError` naming file and row.
Default subsets follow the reference: first 1,000 HotpotQA, first 300 StrategyQA, all of
GSM8K (1,319) and SVAMP (1,000); WebShop the first 500 instructions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from lumos_jax import jsonl
from lumos_jax.errors import UserError
from lumos_jax.evaluation import metrics


class DatasetError(UserError):
    """A malformed evaluation file; the message names the file and the row."""


@dataclass(frozen=True)
class Example:
    """One evaluation item. `answer` is the gold in the form the dataset's metric expects."""

    id: str
    question: str
    answer: Any
    task: str  # agent domain: maths | complex_qa | web_agent | webshop | multimodal | sql
    meta: dict = field(default_factory=dict)


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"evaluation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-empty line (lumos_jax.jsonl); bad JSON or a
    non-object names file:line."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"evaluation file not found: {path}")
    for lineno, record in jsonl.iter_jsonl(path, error=DatasetError):
        if not isinstance(record, dict):
            raise DatasetError(f"{path}:{lineno}: expected a JSON object")
        yield lineno, record


def require_field(record: dict, key: str, where: str, kind: type | tuple = str) -> Any:
    if key not in record:
        raise DatasetError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        raise DatasetError(f"{where}: field {key!r} should be {getattr(kind, '__name__', kind)}")
    return value


def read_json_list(path: Path) -> list:
    data = read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of examples")
    return data


def records(path: Path) -> Iterator[tuple[int, str, dict]]:
    """(index, where, record) for a JSON list (`file[i]`) or JSONL file (`file:line`);
    every record must be an object."""
    if path.suffix == ".jsonl":
        rows = ((lineno, f"{path}:{lineno}", rec) for lineno, rec in iter_jsonl(path))
    else:
        rows = ((i, f"{path}[{i}]", rec) for i, rec in enumerate(read_json_list(path)))
    for i, (_, where, rec) in enumerate(rows):
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: expected an object")
        yield i, where, rec


def read_gsm8k(path: str | Path) -> list[Example]:
    """GSM8K JSONL (`question`, `answer` ending in `#### N`); gold = N without commas."""
    path = Path(path)
    out = []
    for i, (lineno, rec) in enumerate(iter_jsonl(path)):
        where = f"{path}:{lineno}"
        question = require_field(rec, "question", where)
        rationale = require_field(rec, "answer", where)
        try:
            gold = metrics.gsm8k_gold(rationale)
        except ValueError as e:
            raise DatasetError(f"{where}: {e}") from None
        if metrics.parse_number(gold) is None:
            raise DatasetError(f"{where}: gold answer {gold!r} is not a number")
        out.append(Example(f"gsm8k_{i}", question.strip(), gold, "maths", {"rationale": rationale}))
    return out


def read_svamp(path: str | Path) -> list[Example]:
    """SVAMP JSON list; question = Body + ' ' + Question, gold = str(int(Answer)) (reference)."""
    path = Path(path)
    out = []
    for i, where, rec in records(path):
        body = require_field(rec, "Body", where)
        question = require_field(rec, "Question", where)
        answer = require_field(rec, "Answer", where, (int, float))
        gold = str(int(answer)) if float(answer).is_integer() else str(answer)
        ex_id = str(rec.get("ID", f"svamp_{i}"))
        out.append(Example(ex_id, f"{body} {question}".strip(), gold, "maths",
                           {"equation": rec.get("Equation"), "type": rec.get("Type")}))
    return out


def read_strategyqa(path: str | Path) -> list[Example]:
    """StrategyQA JSON list (`question`, `answer` bool)."""
    path = Path(path)
    out = []
    for i, where, rec in records(path):
        question = require_field(rec, "question", where)
        answer = require_field(rec, "answer", where, bool)
        out.append(Example(f"strategyqa_{i}", question.strip(), answer, "complex_qa"))
    return out


def read_hotpotqa(path: str | Path) -> list[Example]:
    """HotpotQA dev question list (`question`, `answer`, `type`), open-domain setting."""
    path = Path(path)
    out = []
    for i, where, rec in records(path):
        question = require_field(rec, "question", where)
        answer = require_field(rec, "answer", where)
        out.append(Example(f"hotpotqa_{i}", question.strip(), answer, "complex_qa",
                           {"type": rec.get("type")}))
    return out


def read_hotpotqa_distractor(path: str | Path) -> list[Example]:
    """HotpotQA distractor JSONL (or the official JSON list): `context` becomes meta.documents.

    `meta["documents"]` is a list of `{"title", "text"}` (sentences joined with ''), the
    per-question document store of the distractor setting.
    """
    path = Path(path)
    out = []
    for _, where, rec in records(path):
        ex_id = rec.get("id", rec.get("_id"))
        if not isinstance(ex_id, str):
            raise DatasetError(f"{where}: missing field 'id' (or '_id')")
        question = require_field(rec, "question", where)
        answer = require_field(rec, "answer", where)
        context = require_field(rec, "context", where, list)
        documents = []
        for j, para in enumerate(context):
            if (not isinstance(para, list) or len(para) != 2 or not isinstance(para[0], str)
                    or not isinstance(para[1], list)):
                raise DatasetError(f"{where}: context[{j}] should be [title, [sentences]]")
            documents.append({"title": para[0], "text": "".join(para[1])})
        out.append(Example(ex_id, question.strip(), answer, "complex_qa", {
            "type": rec.get("type"), "documents": documents,
            "supporting_titles": sorted({t for t, _ in rec.get("supporting_facts", [])}),
        }))
    return out


# name -> (reader, file name inside shared/data/eval, reference default subset, metric name)
READERS: dict[str, tuple[Callable[[Path], list[Example]], str, int | None, str]] = {
    "gsm8k": (read_gsm8k, "gsm8k_test.jsonl", None, "numeric_match"),
    "svamp": (read_svamp, "svamp_test.json", None, "numeric_match"),
    "strategyqa": (read_strategyqa, "strategyqa_test.json", 300, "yes_no"),
    "hotpotqa": (read_hotpotqa, "hotpotqa_dev.json", 1000, "squad"),
    "hotpotqa_distractor": (read_hotpotqa_distractor, "hotpotqa_dev_distractor_sample.jsonl",
                            None, "squad"),
}


def select_subset(examples: list[Example], start: int = 0, limit: int | None = None) -> list[Example]:
    """examples[start : start+limit]; the reference always takes a prefix (start=0)."""
    if start < 0 or (limit is not None and limit < 0):
        raise ValueError(f"bad subset start={start} limit={limit}")
    end = None if limit is None else start + limit
    return examples[start:end]
