"""Mind2Web: task reader (our sample JSONL and the official split JSON) and step success rate.

A step succeeds when the predicted element is one of the step's positive candidates, the
operation equals the gold `operation.op` (the original data writes HOVER as CLICK), and for
TYPE/SELECT the typed/selected text equals `operation.value` case-insensitively (reference:
`eval/mind2web/run_eval.py`). Step SR = successful steps / evaluated steps, over all tasks.
Only steps with candidate elements are evaluated. Candidates are shuffled with a fixed seed per
step, because in the files the positive elements come first.

The reference protocol (`score_actions_reference`) instead counts every grounded action of
steps 0-14 against the reference's page: the first 50 of positives + negatives, unshuffled.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lumos_jax.evaluation.datasets import DatasetError, Example, read_json, iter_jsonl

OPERATIONS = ("CLICK", "TYPE", "SELECT")
REFERENCE_MAX_STEPS = 15      # mind2web:122 `for i in range(15)`
REFERENCE_POOL = 50           # mind2web:67-68,212 `env[:50]` of pos + neg candidates


@dataclass(frozen=True)
class StepPrediction:
    """What an agent did at one step: the element it acted on, the operation and the text."""

    element_id: str | None
    op: str | None
    value: str = ""


def step_success(pred: StepPrediction | dict | None, gold: dict) -> bool:
    """Element right, operation right and (TYPE/SELECT) value right, ignoring case and spaces."""
    if pred is None:
        return False
    if isinstance(pred, dict):
        pred = StepPrediction(pred.get("element_id"), pred.get("op"), pred.get("value") or "")
    if pred.element_id is None or str(pred.element_id) not in gold["element_ids"]:
        return False
    op = (pred.op or "").strip().upper()
    if op != gold["op"]:
        return False
    if op in ("TYPE", "SELECT"):
        return (pred.value or "").strip().lower() == gold["value"].strip().lower()
    return True


def score_steps(predictions: Any, gold_steps: list[dict]) -> dict:
    """Per task: {correct: successful steps, total: evaluated steps}. Missing steps are wrong.

    `predictions` maps action_uid -> StepPrediction/dict (or is a list aligned with the steps).
    """
    if isinstance(predictions, list):
        predictions = {g["action_uid"]: p for g, p in zip(gold_steps, predictions)}
    elif not isinstance(predictions, dict):
        predictions = {}
    correct = sum(step_success(predictions.get(g["action_uid"]), g) for g in gold_steps)
    return {"correct": float(correct), "total": float(len(gold_steps))}


def score_actions_reference(predictions: Any, example: Example) -> dict:
    """The reference's step SR numerator and denominator for one task (mind2web:55-61): each
    grounded action of a step below 15 counts once; it succeeds when its element's text equals
    that of the page's first element (the first positive), the operation is the gold one and,
    for TYPE/SELECT, the text equals the gold value ignoring case.

    `predictions` maps action_uid -> a list of StepPrediction/dicts (one per action)."""
    if not isinstance(predictions, dict):
        return {"correct": 0.0, "total": 0.0}
    steps = {s["action_uid"]: s for s in example.meta.get("steps", [])}
    correct = total = 0
    for gold in example.answer:
        step = steps.get(gold["action_uid"], {})
        if step.get("index", 0) >= REFERENCE_MAX_STEPS:
            continue
        preds = predictions.get(gold["action_uid"]) or []
        html = {c["id"]: c["html"] for c in step.get("candidates", [])}
        first = html.get(gold["element_ids"][0]) if gold["element_ids"] else None
        for p in preds if isinstance(preds, list) else [preds]:
            if isinstance(p, dict):
                p = StepPrediction(p.get("element_id"), p.get("op"), p.get("value") or "")
            total += 1
            if p is None or p.element_id is None or first is None:
                continue
            same = html.get(str(p.element_id), "").replace("\n", " ") == first.replace("\n", " ")
            if same and p.op == gold["op"] and (p.op == "CLICK" or (p.value or "").lower() == gold["value"].lower()):
                correct += 1
    return {"correct": float(correct), "total": float(total)}


def reference_pool(cands: list[dict], pos: list[str]) -> list[str]:
    """Ids of the reference's page: positives first, then the rest in file order, first 50."""
    pos_set = set(pos)
    by_id = {c["id"]: c for c in cands}
    ordered = [i for i in pos if i in by_id] + [c["id"] for c in cands if c["id"] not in pos_set]
    return ordered[:REFERENCE_POOL]


def _shuffled(candidates: list[dict], seed_text: str) -> list[dict]:
    order = list(candidates)
    random.Random(seed_text).shuffle(order)
    return order


def _render_official_candidate(cand: dict) -> str:
    """`<tag attr="v" ...>` from an official Mind2Web candidate (attributes is a JSON string)."""
    attrs = cand.get("attributes", "{}")
    if isinstance(attrs, str):
        try:
            attrs = json.loads(attrs)
        except json.JSONDecodeError:
            attrs = {}
    parts = [cand.get("tag", "element"), f'bnid="{cand.get("backend_node_id", "")}"']
    parts += [f'{k}="{str(v)[:80]}"' for k, v in attrs.items() if k != "backend_node_id"]
    return "<" + " ".join(parts) + ">"


def _step_from_sample(action: dict, index: int, where: str) -> dict:
    for key in ("action_uid", "operation", "pos_candidate_ids", "candidate_ids", "candidates"):
        if key not in action:
            raise DatasetError(f"{where}: step {index} lacks {key!r}")
    if len(action["candidate_ids"]) != len(action["candidates"]):
        raise DatasetError(f"{where}: step {index} has {len(action['candidate_ids'])} ids "
                           f"but {len(action['candidates'])} candidates")
    cands = [{"id": str(i), "html": h} for i, h in zip(action["candidate_ids"], action["candidates"])]
    return {"cands": cands, "pos": [str(i) for i in action["pos_candidate_ids"]]}


def _step_from_official(action: dict, index: int, where: str) -> dict:
    if "operation" not in action or "pos_candidates" not in action:
        raise DatasetError(f"{where}: step {index} lacks 'operation' or 'pos_candidates'")
    pos = action["pos_candidates"]
    neg = action.get("neg_candidates", [])
    cands = [{"id": str(c.get("backend_node_id")), "html": _render_official_candidate(c)}
             for c in pos + neg]
    return {"cands": cands, "pos": [str(c.get("backend_node_id")) for c in pos]}


def _task_to_example(task: dict, where: str) -> Example:
    for key in ("annotation_id", "confirmed_task", "actions"):
        if key not in task:
            raise DatasetError(f"{where}: missing field {key!r}")
    actions = task["actions"]
    reprs = task.get("action_reprs") or [a.get("action_repr", "") for a in actions]
    if "steps_with_candidates" in task:  # our sample: only some steps carry candidates
        indices = list(task["steps_with_candidates"])
        builder = _step_from_sample
    else:  # official split files: every step carries pos/neg candidates
        indices = list(range(len(actions)))
        builder = _step_from_official
    steps, gold = [], []
    for i in indices:
        if not 0 <= i < len(actions):
            raise DatasetError(f"{where}: step index {i} out of range")
        action = actions[i]
        built = builder(action, i, where)
        op = action["operation"]
        gold_op = str(op.get("op", "")).upper()
        if gold_op not in OPERATIONS:
            raise DatasetError(f"{where}: step {i} has unknown operation {gold_op!r}")
        uid = str(action["action_uid"])
        steps.append({
            "action_uid": uid, "index": i,
            "previous_actions": reprs[max(i - 3, 0):i],  # the reference shows the last 3
            "candidates": _shuffled(built["cands"], uid),
            "reference_pool": reference_pool(built["cands"], built["pos"]),
        })
        gold.append({"action_uid": uid, "element_ids": built["pos"], "op": gold_op,
                     "value": str(op.get("value", "") or "")})
    meta = {"website": task.get("website"), "domain": task.get("domain"),
            "action_reprs": reprs, "steps": steps}
    return Example(str(task["annotation_id"]), task["confirmed_task"].strip(), gold,
                   "web_agent", meta)


def read_mind2web(path: str | Path) -> list[Example]:
    """Our sample JSONL, an official split JSON file (a list of tasks), or a folder of those.

    Official layout (Mind2Web `data/test_{task,website,domain}/*.json`): each task has
    `annotation_id`, `confirmed_task`, `action_reprs` and `actions[]` with `action_uid`,
    `operation {op, value}`, `pos_candidates` and `neg_candidates` (`backend_node_id`, `tag`,
    `attributes`). The gold of an example is its list of evaluated steps.
    """
    path = Path(path)
    if path.is_dir():
        out: list[Example] = []
        for f in sorted(path.glob("*.json")) + sorted(path.glob("*.jsonl")):
            out += read_mind2web(f)
        return out
    if path.suffix == ".jsonl":
        return [_task_to_example(rec, f"{path}:{n}") for n, rec in iter_jsonl(path)]
    data = read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of Mind2Web tasks")
    return [_task_to_example(t, f"{path}[{i}]") for i, t in enumerate(data)]


def oracle_predictions(example: Example) -> dict[str, StepPrediction]:
    """The gold action of every evaluated step (first positive element)."""
    return {g["action_uid"]: StepPrediction(g["element_ids"][0], g["op"], g["value"])
            for g in example.answer}
