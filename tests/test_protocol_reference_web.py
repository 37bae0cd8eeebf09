"""protocol='reference' for the web domains (audit A7 Mind2Web, A8 WebShop), with scripted
model outputs checked against what the reference's eval/mind2web and eval/webshop run_eval.py do
(allenai/lumos @ 146dd9d, file:line cited)."""

import json

from lumos_jax.agent.execution import Executor
from lumos_jax.agent.generators import ChatModelGenerator, GenRequest
from lumos_jax.agent.loops import EpisodeConfig, episode, run_episode, webshop_mangle
from lumos_jax.agent.tools.base import FunctionTool
from lumos_jax.agent.tools.registry import build_registry
from lumos_jax.evaluation.datasets import Example
from lumos_jax.evaluation.mind2web import read_mind2web
from lumos_jax.evaluation.mind2web_agent import Mind2WebStepAgent
from lumos_jax.evaluation.scoring import get_scorer
from protocol_helpers import Seq, StopAtStops, _no_gin_bindings  # noqa: F401 - autouse fixture

# -- A7 #37-#39: Mind2Web -------------------------------------------------------------------

def _mind2web_task(tmp_path, n_steps=17, scored=(0, 1, 15), n_cands=60):
    reprs = [f"[button]  Step {i} -> CLICK" for i in range(n_steps)]
    actions = []
    for i in range(n_steps):
        ids = [f"{i}_{j}" for j in range(n_cands)]
        actions.append({"action_uid": f"u{i}", "operation": {"op": "CLICK", "value": ""},
                        "pos_candidate_ids": [ids[55]], "candidate_ids": ids,
                        "candidates": [f'<button bnid="{c}">Step {i} item {c}</button>' for c in ids]})
    task = {"annotation_id": "t", "confirmed_task": "Do the steps.", "action_reprs": reprs,
            "steps_with_candidates": list(scored), "actions": actions}
    path = tmp_path / "m2w.jsonl"
    path.write_text(json.dumps(task) + "\n")
    return read_mind2web(path)[0]


def test_mind2web_reference_cap_subgoal_pool_and_per_action_counting(tmp_path):
    """#37 mind2web:122 evaluates steps 0-14 only; #38 mind2web:169-172 grounds the planner's own
    output, even "Yes, I will stop planning."; #39 mind2web:67-68,212: the page is the first 50
    of pos + neg candidates (the positive first), and each grounded action counts (mind2web:55-61)."""
    ex = _mind2web_task(tmp_path)
    step0 = ex.meta["steps"][0]
    assert step0["reference_pool"][0] == "0_55" and len(step0["reference_pool"]) == 50
    plan = ["Subgoal 1: Click button Step 0", "Yes, I will stop planning."] + ["No, I will keep planning. "
                                                                                "Subgoal 3: x"] * 15
    # BM25 stands in for MindAct; a query naming a negative element makes step 1 wrong.
    ground = ["R1 = CLICK(Env, QUERY: Step 0 item 0_55); R2 = TYPE(R1, QUERY: Step 0 item 0_55, TEXT: x)",
              "R1 = CLICK(Env, QUERY: Step 1 item 1_3)"] + ["R1 = CLICK(Env, QUERY: y)"] * 15
    g = Seq(plan=list(plan), ground=list(ground))
    res = Mind2WebStepAgent({"plan": g, "ground": g}, protocol="reference").run_batch([ex])[0]
    assert len(g.prompts["plan"]) == 15
    assert g.prompts["ground"][1].endswith("<|user|>\nSubgoal to be grounded: Yes, I will stop planning."
                                           "\n<|assistant|>\n")
    assert set(res.answer) == {"u0", "u1"} and len(res.answer["u0"]) == 2
    s = get_scorer("mind2web_step_sr", "reference")(ex, res.answer)
    assert s["total"] == 3.0 and s["correct"] == 1.0  # step 0: 1 of 2 actions; step 1: 0 of 1; step 15 not run
    g = Seq(plan=list(plan) + ["No"] * 2, ground=list(ground) + ["R1 = CLICK(Env, QUERY: y)"] * 2)
    rob = Mind2WebStepAgent({"plan": g, "ground": g}, protocol="robust").run_batch([ex])[0]
    assert len(g.prompts["plan"]) == 17
    assert "Subgoal to be grounded: Subgoal 2: Click button Step 1" in g.prompts["ground"][1]
    assert get_scorer("mind2web_step_sr", "robust")(ex, rob.answer)["total"] == 3.0


# -- A8 #42 #43: WebShop --------------------------------------------------------------------

def test_webshop_mangle_and_average_over_finished():
    """#42 webshop:194 `"R1 = " + action.strip("R1 = ")` strips those characters off both ends;
    #43 webshop:210 divides by the finished episodes only."""
    for out in ("Search(red shoes)", "R1 = Search(red shoes)", "R1 = Click(R1)", "Search(R1 = 1"):
        assert webshop_mangle(out) == "R1 = " + out.strip("R1 = ")
    assert webshop_mangle("Search(R1 = 1") == "R1 = Search("
    preds = [0.5, {"reward": 1.0, "finished": True}, None, {"reward": 0.0, "finished": False}]
    scores = [get_scorer("webshop_reward", "reference")(Example(str(i), "q", None, ""), p) for i, p in enumerate(preds)]
    assert sum(s["correct"] for s in scores) / sum(s["total"] for s in scores) == 0.75
    robust = [get_scorer("webshop_reward", "robust")(Example("i", "q", None, ""), p) for p in preds]
    assert sum(s["correct"] for s in robust) / len(robust) == 0.375


class _Recording(StopAtStops):
    def __init__(self, tokens):
        super().__init__(tokens)
        self.prompts = []

    def generate_tokens(self, batch, max_new_tokens, stop_ids):
        self.prompts += [ids for _, ids in batch]
        return super().generate_tokens(batch, max_new_tokens, stop_ids)


def test_webshop_first_grounding_turn_is_prefilled_with_r1(llama2_tokenizer):
    """#42 webshop:145: the first grounding prompt is the string ending "<|assistant|>\\n" plus
    "R1 = ", tokenized as one; the model's continuation is then mangled (webshop:194) and that
    mangled action is what later prompts carry (webshop:148 `ground_prompts[j] += actions[j]`)."""
    tok = llama2_tokenizer
    ground = [{"role": "user", "content": "Task: buy socks \nSubgoal to be grounded: Subgoal 1: Search."}]
    newline = tok.encode("\n")[-1]
    backend = _Recording(tok.encode("Search(socks)") + [newline])
    gen = ChatModelGenerator(backend, tok, style="reference")
    out = gen.generate([GenRequest("s", "ground", ground, prefill="R1 = ")])[0]
    reference_string = "<|user|>\n" + ground[0]["content"] + "\n<|assistant|>\n" + "R1 = "
    assert backend.prompts[0] == tok.encode(reference_string)
    assert out.text == "Search(socks)"

    g = Seq(plan=["Subgoal 1: Search socks.", "Yes, I will stop planning."], ground=["R1 = Search(socks)"])
    seen = []

    class Spy(Seq):
        def generate(self, requests):
            seen.extend((r.module, r.prefill) for r in requests)
            return g.generate(requests)

    cfg = EpisodeConfig(domain="webshop", formulation="iterative", style="reference", max_rounds=2,
                        protocol="reference")
    reg = build_registry("webshop", protocol="reference",
                         extra_tools=[FunctionTool("Search", lambda args, ctx: f"found {args}")])
    spy = Spy()
    res = run_episode(episode("buy socks", cfg, Executor(reg)), {"plan": spy, "ground": spy})
    assert ("ground", "R1 = ") in seen and [p for m, p in seen if m == "plan"] == ["", ""]
    assert res.reason == "stopped", res.reason
