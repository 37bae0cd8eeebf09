"""protocol='reference': every ★ row of ../shared/REFERENCE_AUDIT.md, rebuilt with scripted
model outputs and checked against what the reference's code (allenai/lumos @ 146dd9d) does.

Expected strings are written out the way the reference builds them, with its file:line; `gsm`
is eval/gsm/run_eval.py, `hotpotqa`/`strategyqa`/`mind2web`/`webshop` the run_eval.py of that
folder, `qa_tool` eval/hotpotqa/qa_tool.py. The maths tool backend is faked where a row is about
the protocol, not about WolframAlpha's arithmetic (that is tests/test_agent_maths.py's job).
"""

import json

import pytest

from conftest import DATA
from protocol_helpers import Seq, StopAtStops, _no_gin_bindings  # noqa: F401 - autouse fixture
from lumos_jax.agent.execution import Executor
from lumos_jax.agent.generators import ChatModelGenerator, GenRequest
from lumos_jax.agent.loops import EpisodeConfig, episode, run_episode
from lumos_jax.agent.tools.base import FunctionTool
from lumos_jax.agent.tools.qa import QA
from lumos_jax.agent.tools.registry import build_registry
from lumos_jax.evaluation.agents import AgentResult
from lumos_jax.evaluation.datasets import Example, read_strategyqa
from lumos_jax.evaluation.runner import evaluate
from lumos_jax.evaluation.scoring import get_scorer, rescore



# gsm:89-93 and hotpotqa:219-223, as the reference writes them.
PLAN_PREFIX = "Please provide a reasonable subgoal-based plan to solve the given task.\n"
GROUND_MATHS = (
    "Please ground the given subgoal to corresponding executable actions for solving the given task. The grounded "
    "actions must be the one in available action list.\n\nThe available action list is 'Calculator', 'SetEquation', "
    "'SolveEquation', 'Count', 'SolveInequality', 'Code', and 'Define'.\nCalculator(formula): Calculate the input "
    "formula; SetEquation(equation): Set up an equation to be solved; SolveEquation(equation): Solve the previous set "
    "equation; Count(list): Count the number of elements in the given list; SolveInequality(inequality): Solve the "
    "previous set inequality; Code(pseudo_code): Generate a Python function that corresponds to the pseudo code; "
    "Define(variable/number): Define a variable or a number for latter usage.\n\n")
GROUND_QA = (
    "Please ground the given subgoal to corresponding executable actions for solving the given task. The grounded "
    "actions must be the one in available action list.\n\nThe available action list is 'KnowledgeQuery', "
    "'ParagraphRetrieve', 'QA', 'Calculator', and 'Code'.\nCalculator(formula): Calculate the input formula; "
    "KnowledgeQuery(query): Capture the relevant webpages according to the query; ParagraphRetrieve(context, query): "
    "Given a query, retrieve the most relevant paragraphs from the given context; QA(context, query): Given context, "
    "answer the given query; Calculator(formula): Calculate the input formula; Code(pseudo_code): Generate a Python "
    "function that corresponds to the pseudo code.\n\n")


def qa_prompt(question, context):  # qa_tool:73
    return (f"Please answer the following question according to the context. Please answer with one brief entity, "
            f"beginning with 'Answer: '. If the answer can't be found in the context, answer 'No answer'. No more "
            f"details and explanations.\n\nQuestion: {question}\nContext: {context}\n")


class FakeQA:
    """QA backend: `reply(prompt)`; every prompt is kept."""

    def __init__(self, reply):
        self.reply, self.prompts = reply, []

    def complete(self, prompts):
        self.prompts += list(prompts)
        return [self.reply(p) for p in prompts]


def run(task, domain, plan, ground, protocol, formulation="iterative", tools=None, qa=None, yes_no=False,
        max_rounds=8):
    g = Seq(plan=plan, ground=ground)
    cfg = EpisodeConfig(domain=domain, formulation=formulation, style="reference", max_rounds=max_rounds,
                        protocol=protocol, yes_no=yes_no)
    reg = build_registry(domain, protocol=protocol, qa_backend=qa, qa_yes_no=yes_no, extra_tools=tools)
    return run_episode(episode(task, cfg, Executor(reg)), {"plan": g, "ground": g}), g


def solve_tool(text):
    """SolveEquation answering as WolframAlpha's `Solve …` plaintext does (math_tool.py:39-40)."""
    return FunctionTool("SolveEquation", lambda args, ctx: text)


def score(metric, protocol, gold, prediction):
    return get_scorer(metric, protocol)(Example("x", "q", gold, ""), prediction)["correct"]


# -- A1 #5: EOS ends reference-style generation ----------------------------------------------

def test_eos_stops_reference_generation(llama2_tokenizer):
    """eval/utils.py:47-52 calls `model.generate` with the checkpoint's eos_token_id in force, so
    a row ends at EOS; the text after it never enters the output."""
    tok = llama2_tokenizer
    body = tok.encode("Subgoal 1: Add.")
    junk = tok.encode(" more")
    gen = ChatModelGenerator(StopAtStops(body + [tok.eos_id] + junk + [tok.encode("\n")[-1]]), tok,
                             style="reference")
    out = gen.generate([GenRequest("s", "plan", [{"role": "user", "content": "Task: t"}])])[0]
    assert out.finish_reason == "stop" and out.tokens[-1] == tok.eos_id
    assert out.text == "Subgoal 1: Add."


# -- A2 #9, A4 #17 #18 #21 #22: maths -------------------------------------------------------

TASK = "Natalia sold 48 clips in April, and half as many in May. How many clips did she sell?"
PLAN = ["Subgoal 1: Calculate the clips sold in May.", "No, I will keep planning. Subgoal 2: Add both months.",
        "Yes, I will stop planning."]


def test_maths_prompts_carry_the_whole_planner_output_and_the_text_after_the_last_equals():
    """#9: gsm:112 grounds `subgoals[j].strip()` (the whole output, keep-planning prefix and all);
    #22: gsm:105 tells the planner `actions[-1].split('=')[-1].strip()` of `action = result`."""
    ground = ["R1 = Calculator(48 / 2)", "R2 = SetEquation(x = 48 + R1)"]
    r, g = run(TASK, "maths", PLAN, ground, "reference")
    assert r.reason == "stopped"
    # gsm:109 then gsm:112 (the second turn appends the first answer and the new subgoal)
    assert g.prompts["ground"][1] == (
        "<|user|>\n" + GROUND_MATHS + "Task: " + TASK + " \nSubgoal to be grounded: " + PLAN[0] + "\n<|assistant|>\n"
        + ground[0] + "\n\n<|user|>\nSubgoal to be grounded: " + PLAN[1] + "\n<|assistant|>\n")
    # gsm:102,105: feedback after round 1 is "24"; after `R2 = SetEquation(x = 48 + R1) = x = 48 + (24)`
    # (SetEquation returns its argument, math_tool.py:33-37) it is the text after the last "=".
    first = "<|user|>\n" + PLAN_PREFIX + "Task: " + TASK + "; Initial Environment Description: None.\n<|assistant|>\n"
    assert g.prompts["plan"][1] == (first + PLAN[0] + "\n\n<|user|>\nThe executed result for Subgoal 1 is 24. "
                                    "Should we stop planning?\n<|assistant|>\n")
    fed_back = g.prompts["plan"][2].split("The executed result for Subgoal 2 is ")[1].split(". Should")[0]
    assert fed_back == "48 + (24)"
    # robust: the grounder sees the cut subgoal and the planner the whole observation
    r2, g2 = run(TASK, "maths", PLAN, ground, "robust")
    assert "Subgoal to be grounded: Subgoal 2: Add both months." in g2.prompts["ground"][1]
    assert "The executed result for Subgoal 2 is x = 48 + " in g2.prompts["plan"][2]


def test_multi_output_feedback_is_comma_joined_and_iterative_roots_keep_their_space():
    """#22/#21: gsm:43-51 cuts each root after "=", so WolframAlpha's "x = -2 ∧ x = 2" gives
    [" -2", " 2"], stored unstripped (gsm:171) and fed back as ", ".join (gsm:182) after the last
    "=" (gsm:105); one-time strips them (gsm:296-299)."""
    plan = ["Subgoal 1: Solve the equation.", "Yes, I will stop planning."]
    ground = ["R1, R2 = SolveEquation(x^2 = 4)"]
    tools = [solve_tool("x = -2 ∧ x = 2")]
    r, g = run(TASK, "maths", plan, ground, "reference", tools=tools)
    assert r.variables == {"R1": " -2", "R2": " 2"}
    assert r.answer == " 2"
    expected = ("R1, R2 = SolveEquation(x^2 = 4)" + " = " + ", ".join([" -2", " 2"])).split("=")[-1].strip()
    assert expected == "-2,  2"
    assert g.prompts["plan"][1].endswith(f"The executed result for Subgoal 1 is {expected}. Should we stop "
                                         "planning?\n<|assistant|>\n")
    # robust (the audit's #22 "differs"): the observation of a two-root answer, one root per line
    r2, g2 = run(TASK, "maths", plan, ground, "robust",
                 tools=[FunctionTool("SolveEquation", lambda a, c: ["-2", "2"], multi_output=True)])
    assert "The executed result for Subgoal 1 is -2\n2. Should" in g2.prompts["plan"][1]


def test_iterative_solve_equation_value_is_never_correct_under_reference():
    """#21 + #32: `results[R] == answer` (gsm:194) compares " 1000" with "1000": wrong; one-time
    strips (gsm:296) and is right; robust compares numbers and is right both times."""
    plan = ["Subgoal 1: Solve for the price.", "Yes, I will stop planning."]
    tools = [solve_tool("x = 1000")]
    it, _ = run(TASK, "maths", plan, ["R1 = SolveEquation(2x = 2000)"], "reference", tools=tools)
    one, _ = run(TASK, "maths", ["Subgoal 1: Solve for the price."], ["R1 = SolveEquation(2x = 2000)"],
                 "reference", formulation="onetime", tools=tools)
    assert (it.answer, one.answer) == (" 1000", "1000")
    assert score("numeric_match", "reference", "1000", it.answer) == 0.0
    assert score("numeric_match", "reference", "1000", one.answer) == 1.0
    assert score("numeric_match", "robust", "1000", it.answer) == 1.0


@pytest.mark.parametrize("action", ["R1 = Count(3, 4, 5)", "R1 = SolveInequality(x > 3)",
                                    "R1 = Code(def f(): return 3)", "Calculator(1 + 2)"])
def test_actions_the_reference_cannot_run_void_the_sample(action):
    """#17: gsm:18 dispatches only "", Calculator, SetEquation, SolveEquation and Define; the
    others return None, the unpack at gsm:165 raises and the sample's results become None.
    Without " = ", gsm/utils.py:110-113 reads the name from offset 2 ("lculator"): the same."""
    plan = ["Subgoal 1: Count them.", "Yes, I will stop planning."]
    r, _ = run(TASK, "maths", plan, [action], "reference")
    assert r.reason.startswith("voided") and r.answer is None
    assert score("numeric_match", "reference", "3", r.answer) == 0.0


def test_an_early_failure_voids_the_sample_even_if_the_last_action_succeeds():
    """#18: gsm:172-175 sets results=None on any failure and gsm:160 never grounds that sample
    again; robust reports the error to the planner and scores the later answer."""
    plan = ["Subgoal 1: Use the earlier result.", "No, I will keep planning. Subgoal 2: Add.",
            "Yes, I will stop planning."]
    ground = ["R1 = Calculator(R9 + 1)", "R2 = Calculator(70 + 2)"]
    ref, g = run(TASK, "maths", plan, ground, "reference")
    rob, _ = run(TASK, "maths", plan, ground, "robust")
    assert ref.reason.startswith("voided") and ref.answer is None and len(g.prompts["ground"]) == 1
    assert rob.reason == "stopped" and rob.answer == "72"
    assert (score("numeric_match", "reference", "72", ref.answer), score("numeric_match", "robust", "72", rob.answer)) \
        == (0.0, 1.0)


def test_gold_maths_actions_of_the_exemplars_reproduce_under_reference():
    """The reference's own exemplars (converted/maths.jsonl, WolframAlpha's recorded results)
    executed action by action under the reference executor and maths_tools(protocol=
    'reference'): none is voided, and every result equals the recorded text after the
    reference's normalisation (`.strip()`, gsm:296-299; multi-outputs ", "-joined, gsm:182)."""
    from lumos_jax.agent.parsing import parse_actions
    from lumos_jax.agent.reference import ReferenceExecutor
    from lumos_jax.agent.replay import gold_actions, read_converted
    from lumos_jax.agent.tools.base import ToolContext

    rows = read_converted(DATA / "lumos" / "converted" / "maths.jsonl")
    ex = ReferenceExecutor(Executor(build_registry("maths", protocol="reference")), "maths", "onetime")
    checked = 0
    for row in rows:
        ctx = ToolContext(variables={}, task=row["task"], domain="maths")
        for text, recorded in gold_actions(row["subgoal_plan"]):
            out = ex.run(parse_actions(text), ctx)
            value = out.last_value
            got = ", ".join(v.strip() for v in value) if isinstance(value, list) else str(value).strip()
            assert out.void is None and got == recorded.strip(), (text, recorded, got, out.void)
            checked += 1
    assert checked == 27


# -- A5 #25-#29: complex QA -----------------------------------------------------------------

QTASK = "Was Bob born before Ann?"
QPLAN = ["Subgoal 1: Obtain the year Bob was born.", "No, I will keep planning. Subgoal 2: Obtain the year Ann "
         "was born.", "No, I will keep planning. Subgoal 3: Determine if Bob was born before Ann.",
         "Yes, I will stop planning."]
QGROUND = ["R1 = KnowledgeQuery(Bob); R2 = QA([R1], Question: When was Bob born?)",
           "R3 = KnowledgeQuery(Ann); R4 = QA([R3], Question: When was Ann born?)",
           "R5 = Calculator(R2 < R4)"]
PAGES = {"Bob": "Bob was born in 1950.", "Ann": "Ann was born in 1960."}


def knowledge():
    return FunctionTool("KnowledgeQuery", lambda args, ctx: PAGES[args])


def qa_replies(prompt):
    if "When was Bob born?" in prompt.split("Context:")[0]:
        return "Answer: 1950"
    if "When was Ann born?" in prompt.split("Context:")[0]:
        return "Answer: 1960"
    return "Answer: yes"


def test_strategyqa_iterative_qa_returns_feedback_calculator_and_final_question():
    """#25 qa_tool:110 returns `Question: {q}; {reply}` and the planner is told the text after
    the last "=" of `R2 = QA(...) = Question: ...; Answer: 1950` (hotpotqa:235,306);
    #29 strategyqa:110-122: Calculator is QA over the operands (each variable's text + ".",
    operators dropped) asked with the last subgoal's text;
    #27/#28 strategyqa:14-22,217-220: when the planner stops, QA over every "Question: " result
    joined by "; ", asked with the task + " Must answer yes/no."."""
    backend = FakeQA(qa_replies)
    r, g = run(QTASK, "complex_qa", QPLAN, QGROUND, "reference", tools=[knowledge()], qa=backend, yes_no=True,
               max_rounds=5)
    assert r.reason == "stopped"
    assert g.prompts["plan"][1].endswith("<|user|>\nThe executed result for Subgoal 1 is Question: When was Bob "
                                         "born?; Answer: 1950. Should we stop planning?\n<|assistant|>\n")
    # hotpotqa/strategyqa:173-177: earlier results holding "Answer: ", the text after it
    assert g.prompts["ground"][2].endswith(
        "<|user|>\nSubgoal to be grounded: Subgoal 3: Determine if Bob was born before Ann. The grounding could be "
        "based on the following results: The execution result for Subgoal 1 is 1950 The execution result for "
        "Subgoal 2 is 1960\n<|assistant|>\n")
    r2 = "Question: When was Bob born?; Answer: 1950"
    r4 = "Question: When was Ann born?; Answer: 1960"
    operands = "R2 < R4".replace("R2", r2 + ".").replace("R4", r4 + ".")
    for op in ['*', '/', '+', '-', '^', '=', '<', '>']:
        operands = operands.replace(op, '')
    assert backend.prompts[2] == qa_prompt("Determine if Bob was born before Ann.", operands)
    r5 = "Question: Determine if Bob was born before Ann.; Answer: yes"
    final_context = (r2 + "; " + r4 + "; " + r5 + "; ").strip()
    assert backend.prompts[3] == qa_prompt(QTASK + " Must answer yes/no.", final_context)
    assert r.answer == f"Question: {QTASK} Must answer yes/no.; Answer: yes"
    assert score("yes_no", "reference", True, r.answer) == 1.0


def test_no_answer_fallbacks():
    """#26 qa_tool:82-108: a reply holding "No answer" is asked again without the context, or,
    for a `Must answer yes/no` question, with the forced prompt; hotpotqa:147-170: still no
    answer -> web search (only when a search backend is configured) -> "No answer."."""
    retry = ("Please answer the following question. Please answer with one brief entity, beginning with 'Answer: '. "
             "If the answer can't be answered, output 'No answer'. No more details and explanations.\n\n"
             "Question: When was Bob born?\n")
    forced = ("Please answer the following question. Please answer with one brief entity, beginning with "
              "'Answer: '.\n\nQuestion: Is it? Must answer yes/no.\n")
    b = FakeQA(lambda p: "No answer" if "Context:" in p else "Answer: 1950")
    qa = QA(b, protocol="reference")
    assert qa.reference_answer("When was Bob born?", "ctx") == "Question: When was Bob born?; Answer: 1950"
    assert b.prompts == [qa_prompt("When was Bob born?", "ctx"), retry]
    b = FakeQA(lambda p: "No answer" if "Context:" in p else "Answer: yes")
    assert QA(b, protocol="reference").reference_answer("Is it? Must answer yes/no.", "c").endswith("Answer: yes")
    assert b.prompts[1] == forced
    never = FakeQA(lambda p: "No answer")
    assert QA(never, protocol="reference").reference_call("[R1], Question: Who?", _ctx(R1="t")) == "No answer."
    searched = FakeQA(lambda p: "Answer: Ann" if "Evidence 1: found" in p else "No answer")
    qa = QA(searched, protocol="reference", search=lambda q: iter(["Evidence 1: found"]))
    assert qa.reference_call("[R1], Question: Who?", _ctx(R1="t")) == "Question: Who?; Answer: Ann"


def _ctx(**variables):
    from lumos_jax.agent.tools.base import ToolContext

    return ToolContext(variables=dict(variables), task="t", domain="complex_qa")


def test_final_qa_only_when_the_planner_stops():
    """#28 hotpotqa:286-289: `final_ans` is computed only at "Yes, I will stop planning"; an
    episode that runs out of rounds has no prediction (robust still asks the final QA)."""
    plan = QPLAN[:2]
    ground = QGROUND[:2]
    ref, _ = run(QTASK, "complex_qa", plan, ground, "reference", tools=[knowledge()], qa=FakeQA(qa_replies),
                 max_rounds=2)
    rob, _ = run(QTASK, "complex_qa", plan, ground, "robust", tools=[knowledge()], qa=FakeQA(qa_replies),
                 max_rounds=2)
    assert ref.reason == rob.reason == "max_rounds"
    assert ref.answer is None and rob.answer == "yes"
    assert score("squad", "reference", "yes", ref.answer) == 0.0


def test_onetime_has_no_final_qa_and_asks_the_last_step_as_the_reference():
    """#28/#27: one-time has no final QA (hotpotqa:424-429, strategyqa:345-354): the answer is
    the highest R's text after "Answer: ". StrategyQA's last QA (k > 0) gets " Must answer
    yes/no." (strategyqa:78-80); HotpotQA's last QA asks the original question (hotpotqa:128-131)."""
    plan = ["Subgoal 1: Find Bob.; Subgoal 2: Answer."]
    ground = ["R1 = KnowledgeQuery(Bob); R2 = QA([R1], Question: Was Bob born in 1950?)"]
    b = FakeQA(lambda p: "Answer: yes")
    r, _ = run(QTASK, "complex_qa", plan, ground, "reference", formulation="onetime", tools=[knowledge()], qa=b,
               yes_no=True)
    assert b.prompts == [qa_prompt("Was Bob born in 1950? Must answer yes/no.", PAGES["Bob"])]
    assert r.answer == "Question: Was Bob born in 1950? Must answer yes/no.; Answer: yes"
    assert score("yes_no", "reference", True, r.answer) == 1.0
    b = FakeQA(lambda p: "Answer: 1950")
    r, _ = run(QTASK, "complex_qa", plan, ground, "reference", formulation="onetime", tools=[knowledge()], qa=b)
    assert b.prompts == [qa_prompt(QTASK, PAGES["Bob"])]
    rob_b = FakeQA(lambda p: "Answer: 1950")
    run(QTASK, "complex_qa", plan, ground, "robust", formulation="onetime", tools=[knowledge()], qa=rob_b)
    assert len(rob_b.prompts) == 2  # robust adds a final QA step


def test_complex_qa_code_voids_and_a_tool_error_reports_empty():
    """hotpotqa:86-195: Code falls through to None (the unpack raises: sample void); a failing
    tool is caught inside `execute` and returns "", so iterative goes on with feedback ""."""
    plan = ["Subgoal 1: Run code.", "Yes, I will stop planning."]
    r, _ = run(QTASK, "complex_qa", plan, ["R1 = Code(x)"], "reference", qa=FakeQA(qa_replies))
    assert r.reason.startswith("voided") and r.answer is None
    plan = ["Subgoal 1: Ask.", "No, I will keep planning. Subgoal 2: Ask again.", "Yes, I will stop planning."]
    r, g = run(QTASK, "complex_qa", plan, ["R1 = QA([R9], Question: Who?)", "R2 = QA([R1], Question: Who?)"],
               "reference", qa=FakeQA(lambda p: "Answer: Ann"))
    assert "The executed result for Subgoal 1 is . Should we stop planning?" in g.prompts["plan"][1]


# -- A6 #32 #33: scoring --------------------------------------------------------------------

def test_string_comparison_of_maths_predictions():
    """#32 gsm:194,317 compare strings; svamp:71 gold is str(int(Answer))."""
    for pred, ref in (("18", 1.0), ("18.0", 0.0), ("$18", 0.0), (" 18", 0.0), (None, 0.0)):
        assert score("numeric_match", "reference", "18", pred) == ref
    assert score("numeric_match", "robust", "18", "18.0") == 1.0


def test_strategyqa_never_answering_agent_scores_zero_under_reference(tmp_path):
    """#33 strategyqa:243-253: only samples with a final answer are scored, so an agent that
    never answers scores 0; robust reads no answer as "no" and scores the share of False golds
    of the first 300 questions (55.7). The same predictions file rescored gives both numbers."""
    examples = read_strategyqa(DATA / "eval" / "strategyqa_test.json")[:300]
    false_share = 100.0 * sum(not ex.answer for ex in examples) / len(examples)
    assert round(false_share, 1) == 55.7

    def silent(example):
        return AgentResult(answer=None, stopped=True)

    out = {}
    for protocol in ("reference", "robust"):
        out[protocol] = evaluate(examples, silent, "yes_no", tmp_path / protocol, "strategyqa", protocol=protocol)
    assert out["reference"]["score"] == 0.0 and out["reference"]["protocol"] == "reference"
    assert out["robust"]["score"] == pytest.approx(false_share)
    records = [json.loads(line) for line in (tmp_path / "robust" / "predictions.jsonl").read_text().splitlines()]
    assert rescore(records, "yes_no", "reference")["score"] == 0.0
    assert rescore(records, "yes_no", "robust")["score"] == pytest.approx(false_share)
