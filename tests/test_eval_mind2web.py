"""Mind2Web step success rate on the real sample: oracle = 100%, each kind of mistake drops it."""

import dataclasses

import pytest

from conftest import DATA
from lumos_jax.evaluation.agents import ScriptedAgent
from lumos_jax.evaluation.mind2web import StepPrediction, oracle_predictions, read_mind2web, step_success
from lumos_jax.evaluation.scoring import headline, score_mind2web

SAMPLE = DATA / "eval" / "mind2web_sample.jsonl"


@pytest.fixture(scope="module")
def tasks():
    return read_mind2web(SAMPLE)


def _sr(tasks, preds_by_task):
    return headline([score_mind2web(t, p) for t, p in zip(tasks, preds_by_task)])


def test_sample_shape(tasks):
    assert len(tasks) == 20
    assert sum(len(t.answer) for t in tasks) == 43
    step, gold = tasks[0].meta["steps"][0], tasks[0].answer[0]
    assert gold["op"] == "CLICK" and gold["element_ids"] == ["110393"]
    # positives come first in the file; the reader shuffles, deterministically
    assert step["candidates"][0]["id"] != "110393" or len(step["candidates"]) == 1
    assert read_mind2web(SAMPLE)[0].meta["steps"][0]["candidates"] == step["candidates"]
    assert {c["id"] for c in step["candidates"]} >= {"110393"}


def test_oracle_is_100(tasks):
    assert _sr(tasks, [oracle_predictions(t) for t in tasks]) == 100.0
    assert _sr(tasks, [ScriptedAgent("mind2web_step_sr")(t).answer for t in tasks]) == 100.0
    assert _sr(tasks, [ScriptedAgent("mind2web_step_sr", "wrong")(t).answer for t in tasks]) == 0.0


def _perturb(tasks, change):
    out = []
    for t in tasks:
        preds = oracle_predictions(t)
        for step, gold in zip(t.meta["steps"], t.answer):
            new = change(preds[gold["action_uid"]], step, gold)
            if new is not None:
                preds[gold["action_uid"]] = new
        out.append(preds)
    return out


def test_each_mistake_drops_exactly_its_steps(tasks):
    golds = [g for t in tasks for g in t.answer]
    n = len(golds)
    n_text = sum(g["op"] in ("TYPE", "SELECT") for g in golds)
    assert n_text > 0

    def wrong_element(p, step, gold):
        other = next(c["id"] for c in step["candidates"] if c["id"] not in gold["element_ids"])
        return dataclasses.replace(p, element_id=other)

    def wrong_op(p, step, gold):
        return dataclasses.replace(p, op="TYPE" if gold["op"] != "TYPE" else "CLICK")

    def wrong_value(p, step, gold):
        return dataclasses.replace(p, value=gold["value"] + " extra")

    def value_case_and_space(p, step, gold):
        return dataclasses.replace(p, value="  " + gold["value"].upper() + " ")

    assert _sr(tasks, _perturb(tasks, wrong_element)) == 0.0
    assert _sr(tasks, _perturb(tasks, wrong_op)) == 0.0
    # a wrong text only hurts TYPE/SELECT steps; CLICK ignores the value
    assert _sr(tasks, _perturb(tasks, wrong_value)) == pytest.approx(100.0 * (n - n_text) / n)
    assert _sr(tasks, _perturb(tasks, value_case_and_space)) == 100.0
    # one step missing in one task
    preds = [oracle_predictions(t) for t in tasks]
    preds[0].pop(tasks[0].answer[0]["action_uid"])
    assert _sr(tasks, preds) == pytest.approx(100.0 * (n - 1) / n)


def test_step_success_edge_cases(tasks):
    gold = {"action_uid": "u", "element_ids": ["7"], "op": "SELECT", "value": "9 30 AM"}
    assert step_success(StepPrediction("7", "select", "9 30 am"), gold)
    assert step_success({"element_id": 7, "op": "SELECT", "value": "9 30 AM"}, gold)
    assert not step_success(StepPrediction(None, "SELECT", "9 30 AM"), gold)
    assert not step_success(None, gold)
    assert not step_success(StepPrediction("7", None, ""), gold)
