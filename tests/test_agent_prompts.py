"""Prompts: every train-style conversation equals the annotation files byte for byte, the
token rendering equals the training encoder's, and the reference style matches the
reference's inference strings."""

import json

import pytest

from conftest import DATA, FIXTURES
from lumos_jax.agent import prompts
from lumos_jax.agent.execution import Executor
from lumos_jax.agent.generators import ChatModelGenerator, GenRequest, ScriptedGenerator
from lumos_jax.agent.loops import EpisodeConfig
from lumos_jax.agent.replay import read_converted, replay_tools
from lumos_jax.agent.runner import EpisodeRunner
from lumos_jax.agent.tools.registry import build_registry
from lumos_jax.jsonl import read_jsonl
from lumos_jax.tokenization import Tokenizer, encode_conversation

ANN = DATA / "lumos" / "annotations"
CONVERTED = DATA / "lumos" / "converted"


@pytest.mark.parametrize("domain", ["maths", "complex_qa", "web_agent"])
@pytest.mark.parametrize("formulation", ["iterative", "onetime"])
def test_scripted_episodes_rebuild_every_annotation_turn(domain, formulation):
    """Lumos-I / Lumos-O end to end with a model that replays the annotations; the scripted
    model compares every conversation it is sent with the annotation's, message by message.
    Maths runs the real sympy tools; complex_qa replays retrieval/QA results (live services
    in the reference) and runs Calculator for real; web has no browser."""
    rows = read_converted(CONVERTED / f"{domain}.jsonl")
    plan_file = ANN / f"lumos_{domain}_plan_{formulation}.jsonl"
    ground_file = ANN / f"lumos_{domain}_ground_{formulation}.jsonl"
    gen = ScriptedGenerator.from_files(plan_file, ground_file)
    extra = replay_tools(rows, ("KnowledgeQuery", "ParagraphRetrieve", "QA")) if domain == "complex_qa" else None
    registry = build_registry(domain, extra_tools=extra)
    cfg = EpisodeConfig(domain=domain, formulation=formulation, max_rounds=20, final_answer_qa=False)
    runner = EpisodeRunner({"plan": gen, "ground": gen}, lambda i: (Executor(registry), None), cfg)
    results = runner.run([r["task"] for r in rows])
    assert gen.mismatches == []
    # Every assistant turn of every annotation was requested (so every user turn was compared).
    expected_calls = sum(sum(m["role"] == "assistant" for m in row["messages"])
                         for f in (plan_file, ground_file) for row in read_jsonl(f))
    assert gen.calls == expected_calls
    assert all(r.reason in ("stopped", "done") and r.trace.complete for r in results)
    if domain == "maths":
        assert [r.answer for r in results] == ["6", "11", "1000", "110", "990", "45"]
    assert all(not ev.get("error_kind") for r in results for ev in r.trace.events if ev["event"] == "action")
    if formulation == "iterative":
        assert runner.stats.max_batch == len(rows)  # all episodes share each generation call


class _TeacherBackend:
    """Token backend that 'generates' the annotation's assistant tokens (teacher forcing)."""

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def generate_tokens(self, batch, max_new_tokens, stop_ids):
        out = []
        for _, ids in batch:
            out.append((self.answers[self.calls], len(ids)))
            self.calls += 1
        return out

    def release(self, session):
        pass


def test_train_style_tokens_equal_the_training_encoder(llama2_tokenizer):
    """Turn by turn, the train-style prompt + generated tokens is the exact prefix of
    `encode_conversation` (BOS, `</s>` + `\\n<|user|>` pieces), for every annotation file."""
    tok = llama2_tokenizer
    checked = 0
    for path in sorted(ANN.glob("*.jsonl")):
        for row in read_jsonl(path):
            msgs = row["messages"]
            ids, labels = encode_conversation(msgs, tok, max_len=100_000)
            ids = ids.tolist()
            # The assistant tokens as trained: label spans (content + EOS).
            spans, cur = [], []
            for i, lab in enumerate(labels.tolist()):
                if lab != -100:
                    cur.append(ids[i])
                elif cur:
                    spans.append(cur)
                    cur = []
            if cur:
                spans.append(cur)
            # The encoder's labels also cover the "▁\n" after each EOS (a kept quirk); the
            # model's own turn ends at EOS.
            spans = [sp[: sp.index(tok.eos_id) + 1] for sp in spans]
            gen = ChatModelGenerator(_TeacherBackend(spans), tok, style="train")
            for k in range(len(spans)):
                n_user = [i for i, m in enumerate(msgs) if m["role"] == "assistant"][k]
                out = gen.generate([GenRequest("s", "x", msgs[:n_user])])[0]
                prompt = gen._sessions["s"].ids[: out.prompt_tokens]
                assert prompt == ids[: len(prompt)], (path.name, k)
                checked += 1
            assert gen._sessions["s"].ids == ids
    assert checked == 163  # every assistant turn of the 12 annotation files


def test_reference_style_strings(llama2_tokenizer):
    task = "Natalia sold clips?"
    first = prompts.plan_first(task)
    assert first == ("Please provide a reasonable subgoal-based plan to solve the given task.\n"
                     "Task: Natalia sold clips?; Initial Environment Description: None.")
    from lumos_jax.tokenization import reference_prompt_text as _reference_text

    msgs = [{"role": "user", "content": first}, {"role": "assistant", "content": "Subgoal 1: Add. "},
            {"role": "user", "content": prompts.plan_feedback("maths", "reference", 1, "Subgoal 1: Add.", "72")}]
    # eval/gsm/run_eval.py: "<|user|>\n" + prefix + "Task: ...\n<|assistant|>\n", then
    # subgoal.strip() + "\n\n<|user|>\nThe executed result for Subgoal 1 is 72. Should we stop planning?\n<|assistant|>\n"
    assert _reference_text(msgs) == (
        "<|user|>\n" + first + "\n<|assistant|>\nSubgoal 1: Add.\n\n<|user|>\nThe executed result for Subgoal 1 "
        "is 72. Should we stop planning?\n<|assistant|>\n")
    g = prompts.ground_first("maths", task, "Subgoal 1: Add.")
    assert g.endswith("Task: Natalia sold clips? \nSubgoal to be grounded: Subgoal 1: Add.\n")
    # complex_qa reference: only QA answers are listed, without a period added.
    nxt = prompts.ground_next("complex_qa", "reference", "Subgoal 3: Compare.",
                              [("Subgoal 1", "3", True), ("Subgoal 2", "True", False)])
    assert nxt == ("Subgoal to be grounded: Subgoal 3: Compare. The grounding could be based on the following "
                   "results: The execution result for Subgoal 1 is 3\n")
    gen = ChatModelGenerator(_TeacherBackend([[13]]), llama2_tokenizer, style="reference")
    # gsm:132,140 stop at the newline; HF generate (eval/utils.py:47-52) also ends at EOS (id 2).
    assert gen.stop_ids == [llama2_tokenizer.encode("\n")[-1], 2]
    out = gen.generate([GenRequest("s", "plan", msgs[:1])])[0]
    assert out.prompt_tokens == len(llama2_tokenizer.encode(_reference_text(msgs[:1])))  # no BOS


def test_reference_style_incremental_tokens_equal_the_retokenized_prompt(llama2_tokenizer):
    """Without re-tokenizing, turn 2's ids are still exactly the reference string's tokens
    (when the model's answer tokens are the ones the tokenizer would produce)."""
    from lumos_jax.tokenization import reference_prompt_text as _reference_text

    tok = llama2_tokenizer
    u1 = prompts.ground_first("maths", "Natalia sold 48 clips. How many?", "Subgoal 1: Half of 48.")
    msgs = [{"role": "user", "content": u1}, {"role": "assistant", "content": "R1 = Calculator(48 / 2)"},
            {"role": "user", "content": "Subgoal to be grounded: Subgoal 2: Add.\n"}]
    ids1, ids2 = tok.encode(_reference_text(msgs[:1])), tok.encode(_reference_text(msgs))
    assert ids2[: len(ids1)] == ids1
    newline = tok.encode("\n")[-1]
    answer = ids2[len(ids1): ids2.index(newline, len(ids1)) + 1]  # the answer and its stop newline
    for retokenize in (True, False):
        backend = _TeacherBackend([answer, [newline]])
        gen = ChatModelGenerator(backend, tok, style="reference", retokenize=retokenize)
        assert gen.generate([GenRequest("s", "ground", msgs[:1])])[0].text == "R1 = Calculator(48 / 2)"
        out = gen.generate([GenRequest("s", "ground", msgs)])[0]
        assert gen._sessions["s"].ids[: out.prompt_tokens] == ids2
    assert gen.supplied_tokens == len(ids1) + len(ids2) - len(ids1) - len(answer)


def test_webshop_exemplars_render_like_the_reference():
    ex = prompts.load_webshop_exemplars(DATA / "lumos" / "webshop_incontext_exemplars.jsonl")
    plans, grounds = prompts.webshop_exemplar_conversations(ex)
    assert len(plans) == len(grounds) == 2
    assert plans[0][1]["content"] == "Subgoal 1: Search two relevant items and the product names according to the instruction."
    assert plans[0][2]["content"].startswith("The execution result for Subgoal 1 is b09s3bn15c - Mens Linen")
    assert plans[0][-1] == {"role": "assistant", "content": ""}
    assert grounds[0][1]["content"].startswith("R1 = Search(Find me slim fit")
    assert grounds[0][3]["content"] == ("R2 = Click(b09s3bn15c); R3 = FeatureRetrieve(R2, Query: Find me slim fit, "
                                        "loose fit women's tops, tees & blouses with long sleeve, short sleeve with "
                                        "color: a01#black, and size: large, and price lower than 50.00 dollars).")
    assert "'Search', 'FeatureRetrieve', 'Pick' and 'Click'" in grounds[0][0]["content"]


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="agent domain 'chess'"):
        prompts.check("chess", "train")
    with pytest.raises(ValueError, match="prompt style"):
        ChatModelGenerator(None, Tokenizer(FIXTURES / "stories260k"), style="chat")
