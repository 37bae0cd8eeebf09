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


class GoldWebModel:
    """Scripted planner/grounder for Mind2Web: the planner writes the gold (synthesised)
    subgoal of the step it is asked for; the grounder writes the gold operation and value with
    the gold element's text as the query. `bad_op` makes the grounder use a wrong operation."""

    def __init__(self, tasks, bad_op=False):
        self.by_task = {t.question: t for t in tasks}
        self.bad_op = bad_op

    def generate(self, requests):
        from lumos_jax.agent.generators import GenOutput
        from lumos_jax.evaluation.mind2web_agent import synthetic_subgoal

        outs = []
        for r in requests:
            first = r.messages[0]["content"]
            question = first.split("Task: ", 1)[1].split("; Initial Environment")[0].split(" \nSubgoal")[0]
            task = self.by_task[question.strip()]
            i = sum(m["role"] == "assistant" for m in r.messages)
            if r.module == "plan":
                outs.append(GenOutput(text=f"Subgoal {i + 1}: {synthetic_subgoal(task.meta['action_reprs'][i])}"))
                continue
            left, _, right = task.meta["action_reprs"][i].partition(" -> ")
            query = left[left.find("]") + 1:].strip()
            op, _, value = right.partition(": ")
            op = "CLICK" if op.strip() == "HOVER" else op.strip()
            gold = {s["index"]: g for s, g in zip(task.meta["steps"], task.answer)}.get(i)
            if gold is not None:
                op, value = gold["op"], gold["value"]
            if self.bad_op:
                op = "SELECT" if op != "SELECT" else "CLICK"
            args = f"Env, QUERY: {query}" + (f", TEXT: {value}" if op != "CLICK" else "")
            outs.append(GenOutput(text=f"R{i + 1} = {op}({args})"))
        return outs

    def release(self, session):
        pass


def test_teacher_forced_agent_on_the_sample(tasks, tmp_path):
    import re

    from lumos_jax.evaluation.mind2web_agent import Mind2WebStepAgent
    from lumos_jax.evaluation.runner import evaluate, load_records

    model = GoldWebModel(tasks)
    s = evaluate(tasks, Mind2WebStepAgent({"plan": model, "ground": model}), "mind2web_step_sr",
                 tmp_path / "gold", "mind2web", batch_size=20)
    recs = load_records(tmp_path / "gold" / "predictions.jsonl", "mind2web")
    chosen_ok, steps, random_baseline = 0, 0, 0.0
    for t in tasks:
        acted = [e for e in recs[t.id]["trace"] if e["event"] == "action" and e["error_kind"] is None]
        assert len(acted) == len(t.answer)  # one action on every page with candidates
        for e, gold, step in zip(acted, t.answer, t.meta["steps"]):
            assert e["result"]["op"] == gold["op"] and e["result"]["value"] == gold["value"]
            bnid = re.search(r'bnid="([^"]*)"', e["result"]["element"]).group(1)
            chosen_ok += bnid in gold["element_ids"]
            steps += 1
            random_baseline += len(gold["element_ids"]) / len(step["candidates"])
    assert steps == 43
    assert s["score"] == pytest.approx(100.0 * chosen_ok / steps)
    assert s["score"] > 3 * 100.0 * random_baseline / steps  # the offline ranker beats chance
    bad = GoldWebModel(tasks, bad_op=True)
    s_bad = evaluate(tasks, Mind2WebStepAgent({"plan": bad, "ground": bad}), "mind2web_step_sr",
                     tmp_path / "bad", "mind2web", batch_size=20)
    assert s_bad["score"] == 0.0
