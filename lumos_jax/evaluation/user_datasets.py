"""Readers for benchmarks the user supplies in their official formats (none are bundled).

- WebShop: the goals file of the WebShop environment (a JSON list of goal dicts with
  `instruction_text`, `asin`, `attributes`, `goal_options`, `price_upper`), or a JSONL of
  `{"instruction": ...}`. The score comes from the environment's reward at purchase.
- A-OKVQA: `aokvqa_v1p0_{val,test}.json` (list of `question_id`, `image_id`, `split`,
  `question`, `choices`, `correct_choice_idx`, `direct_answers`). Images are COCO 2017:
  `{coco_dir}/{split}2017/{image_id:012d}.jpg`.
- ScienceQA: `problems.json` (id -> `question`, `choices`, `answer` index, `hint`, `image`,
  `split`, ...) with the official `pid_splits.json` beside it (optional).
- InterCode-SQL: `ic_spider_dev.json` style list of `{db, query, gold, hardness}`; scoring
  executes both queries on `{db_dir}/{db}/{db}.sqlite` (Spider's database folder).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

from lumos_jax.evaluation.mind2web import read_mind2web
from lumos_jax.evaluation.datasets import DatasetError, Example, read_json, records, require_field


def read_webshop(path: str | Path) -> list[Example]:
    path = Path(path)
    out = []
    for _, where, rec in records(path):
        text = rec.get("instruction_text", rec.get("instruction"))
        if not isinstance(text, str):
            raise DatasetError(f"{where}: missing field 'instruction_text' (or 'instruction')")
        out.append(Example(f"webshop_{len(out)}", text.strip(), None, "webshop",
                           {"goal": rec, "instruction_idx": len(out)}))
    return out


def read_aokvqa(path: str | Path, coco_dir: str | Path = "coco") -> list[Example]:
    path = Path(path)
    out = []
    for i, where, rec in records(path):
        question = require_field(rec, "question", where)
        choices = require_field(rec, "choices", where, list)
        image_id = require_field(rec, "image_id", where, int)
        split = rec.get("split", "val")
        gold = rec.get("correct_choice_idx")  # absent in the test split
        out.append(Example(str(rec.get("question_id", f"aokvqa_{i}")), question.strip(), gold,
                           "multimodal", {
                               "choices": choices,
                               "direct_answers": rec.get("direct_answers", []),
                               "image": str(Path(coco_dir) / f"{split}2017" / f"{image_id:012d}.jpg"),
                           }))
    return out


def read_scienceqa(path: str | Path, split: str = "test", image_dir: str | Path | None = None) -> list[Example]:
    path = Path(path)
    problems = read_json(path)
    if not isinstance(problems, dict):
        raise DatasetError(f"{path}: expected a JSON object id -> problem")
    splits_file = path.parent / "pid_splits.json"
    if splits_file.exists():
        wanted = read_json(splits_file).get(split)
        if wanted is None:
            raise DatasetError(f"{splits_file}: no split {split!r}")
        ids = [str(p) for p in wanted]
    else:
        ids = [pid for pid, p in problems.items() if isinstance(p, dict) and p.get("split") == split]
    out = []
    for pid in ids:
        where = f"{path}[{pid!r}]"
        rec = problems.get(pid)
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: missing problem")
        question = require_field(rec, "question", where)
        choices = require_field(rec, "choices", where, list)
        answer = require_field(rec, "answer", where, int)
        image = rec.get("image")
        if image and image_dir is not None:
            image = str(Path(image_dir) / split / pid / image)
        out.append(Example(pid, question.strip(), answer, "multimodal",
                           {"choices": choices, "hint": rec.get("hint", ""), "image": image,
                            "subject": rec.get("subject"), "grade": rec.get("grade")}))
    return out


def read_intercode_sql(path: str | Path, db_dir: str | Path = "database") -> list[Example]:
    path = Path(path)
    out = []
    for _, where, rec in records(path):
        db = require_field(rec, "db", where)
        question = require_field(rec, "query", where)
        gold = require_field(rec, "gold", where)
        out.append(Example(f"intercode_sql_{len(out)}", question.strip(), gold, "sql", {
            "db": db, "db_path": str(Path(db_dir) / db / f"{db}.sqlite"),
            "hardness": rec.get("hardness")}))
    return out


def _run_readonly(db_path: str, query: str) -> Counter | None:
    try:
        con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        return Counter(tuple(r) for r in con.execute(query).fetchall())
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return None
    finally:
        con.close()


def sql_execution_match(prediction: str, example: Example) -> bool:
    """Both queries run on the read-only database; equal result multisets = correct."""
    db_path = example.meta["db_path"]
    if not Path(db_path).exists():
        raise FileNotFoundError(f"InterCode-SQL database not found: {db_path}")
    gold = _run_readonly(db_path, example.answer)
    if gold is None:
        raise DatasetError(f"{example.id}: gold query fails on {db_path}")
    pred = _run_readonly(db_path, prediction)
    return pred is not None and pred == gold


USER_READERS = {
    "mind2web": read_mind2web,
    "webshop": read_webshop,
    "aokvqa": read_aokvqa,
    "scienceqa": read_scienceqa,
    "intercode_sql": read_intercode_sql,
}
