"""The evaluator driving the real agent runtime (Lumos-I loop, offline tools, scripted models).

- Gold replay: the first GSM8K *test* rationales, converted by the data pipeline's GSM8K
  converter into plan/ground annotations, replayed by the agent's ScriptedGenerator through
  the real Lumos-I loop and the real sympy tools, score 100% against the `####` answers
  wherever a gold plan exists; a model that grounds every subgoal wrongly scores 0.
- HotpotQA distractor end to end on the 103-question sample, each question's 10 paragraphs
  as its document store (KnowledgeQuery / ParagraphRetrieve / QA / final-answer QA).
"""

import json
import re

import pytest

from conftest import DATA
from lumos_jax.evaluation import datasets as d
from lumos_jax.evaluation.lumos_adapter import LumosEvalAgent, lumos_agent, make_registry_factory
from lumos_jax.evaluation.runner import evaluate, load_records

EVAL = DATA / "eval"


@pytest.fixture(scope="module")
def gold_plans(tmp_path_factory):
    from lumos_jax.data.gsm8k import convert_problem
    from lumos_jax.data.reference_conversion import convert_rows

    rows, keep = [], []
    with open(EVAL / "gsm8k_test.jsonl") as f:
        for i, line in enumerate(f):
            if i == 40:
                break
            conv = convert_problem(json.loads(line))
            if conv.executed:
                rows.append(conv.row)
                keep.append(i)
    out = tmp_path_factory.mktemp("gold")
    for module in ("plan", "ground"):
        lines, _ = convert_rows(rows, "maths", module, "iterative")
        (out / f"lumos_maths_{module}_iterative.jsonl").write_text("\n".join(lines) + "\n")
    examples = [ex for ex in d.read_gsm8k(EVAL / "gsm8k_test.jsonl")[:40]
                if int(ex.id.split("_")[1]) in keep]
    return out, examples


def test_gold_replay_through_lumos_i_scores_100(gold_plans, tmp_path):
    scripted_dir, examples = gold_plans
    assert len(examples) >= 30  # gold exists for most of the first 40
    agent = lumos_agent(domain="maths", metric="numeric_match", default_max_rounds=8, examples=examples,
                        backend="scripted", scripted_dir=str(scripted_dir), prompt_style="train")
    s = evaluate(examples, agent, "numeric_match", tmp_path, "gsm8k", batch_size=16)
    assert s["score"] == 100.0, s["error_kinds"]
    assert agent.generators["plan"].mismatches == []  # every prompt equals the annotation's
    rec = load_records(tmp_path / "predictions.jsonl", "gsm8k")["gsm8k_0"]
    kinds = [e["event"] for e in rec["trace"]]
    assert kinds[0] == "start" and kinds[-1] == "end" and "action" in kinds
    assert rec["rounds"] >= 1 and rec["stopped"]


def test_wrong_grounding_scores_0(gold_plans, tmp_path):
    from lumos_jax.agent.gin_configurables import agent_episode
    from lumos_jax.agent.generators import ScriptedGenerator

    scripted_dir, examples = gold_plans
    examples = examples[:10]
    gen = ScriptedGenerator.from_files(scripted_dir / "lumos_maths_plan_iterative.jsonl",
                                       scripted_dir / "lumos_maths_ground_iterative.jsonl",
                                       override=lambda req, text: (re.sub(r"Calculator\((.*)\)", r"Calculator(\1 + 0.5)", text)
                                                                   if req.module == "ground" else text))
    agent = LumosEvalAgent({"plan": gen, "ground": gen}, agent_episode(domain="maths"),
                           make_registry_factory("maths"))
    s = evaluate(examples, agent, "numeric_match", tmp_path, "gsm8k", batch_size=10)
    assert s["score"] == 0.0 and s["error_kinds"] == {"wrong_answer": 10}


class TemplateQAGenerator:
    """A scripted planner/grounder for any HotpotQA question: look up the first supporting
    title, retrieve passages for the question, ask QA, stop."""

    def __init__(self, by_question):
        self.by_question = by_question

    def generate(self, requests):
        from lumos_jax.agent.generators import GenOutput

        out = []
        for r in requests:
            task = r.messages[0]["content"].split("Task: ", 1)[1].split("; Initial Environment")[0].split(" \n")[0]
            ex = self.by_question[task.strip()]
            if r.module == "plan":
                text = ("Subgoal 1: Find the answer in the paragraphs." if len(r.messages) == 1
                        else "Yes, I will stop planning.")
            else:
                title = ex.meta["supporting_titles"][0]
                text = (f"R1 = KnowledgeQuery({title}); R2 = ParagraphRetrieve(R1, Query: {ex.question}); "
                        f"R3 = QA([R2], Question: {ex.question})")
            out.append(GenOutput(text=text))
        return out

    def release(self, session):
        pass


class ExtractiveQA:
    """Answers only what its context literally contains: the gold answer, or 'No answer'
    (never yes/no, which no passage spells out). A prompt without context (the reference
    protocol's retry) gets 'No answer'."""

    def __init__(self, golds):
        self.golds = golds

    def complete(self, prompts):
        out = []
        for p in prompts:
            question = p.split("Question: ", 1)[1].split("\n")[0]
            context = p.split("\nContext: ", 1)[1] if "\nContext: " in p else ""
            gold = self.golds.get(question)
            found = gold and gold not in ("yes", "no") and gold.lower() in context.lower()
            out.append(f"Answer: {gold}" if found else "No answer")
        return out


def test_hotpotqa_distractor_end_to_end(tmp_path):
    from lumos_jax.agent.gin_configurables import agent_episode

    examples = d.read_hotpotqa_distractor(EVAL / "hotpotqa_dev_distractor_sample.jsonl")
    golds = {ex.question: ex.answer for ex in examples}
    gen = TemplateQAGenerator({ex.question: ex for ex in examples})
    agent = LumosEvalAgent({"plan": gen, "ground": gen}, agent_episode(domain="complex_qa", max_rounds=5),
                           make_registry_factory("complex_qa", qa_backend=ExtractiveQA(golds)))
    s = evaluate(examples, agent, "squad", tmp_path, "hotpotqa_distractor", batch_size=32)
    recs = load_records(tmp_path / "predictions.jsonl", "hotpotqa_distractor")
    assert s["n"] == 103 and "agent_exception" not in s["error_kinds"]
    for ex in examples:
        trace = recs[ex.id]["trace"]
        assert trace[0]["event"] == "start" and trace[-1]["event"] == "end"
        kq = next(e for e in trace if e["event"] == "action" and e["tool"] == "KnowledgeQuery")
        # the document store is this question's own paragraphs: the gold title comes back first
        assert kq["result"][0].startswith(ex.meta["supporting_titles"][0])
        titles = {doc["title"] for doc in ex.meta["documents"]}
        assert all(r.split(":")[0] in titles for r in kq["result"])
        # a right answer came from the retrieved passages (or, for comparisons, the question)
        qa = next(e for e in trace if e["event"] == "action" and e["tool"] == "QA")
        if recs[ex.id]["correct"]:
            assert qa["result"] == ex.answer or ex.answer.lower() in ex.question.lower()
    yes_no = sum(ex.answer in ("yes", "no") for ex in examples)
    # yes/no answers never appear in a passage, so they are never "extracted"
    assert 40.0 < s["score"] <= 100.0 * (103 - yes_no) / 103
    assert s["extras"]["f1"] >= s["score"]
