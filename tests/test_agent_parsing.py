"""Parsers of planner and grounder output (LUMOS_SPEC §2), and a fuzz of malformed output."""

import random
import string

from lumos_jax.agent.execution import Executor
from lumos_jax.agent.parsing import (parse_action, parse_actions, parse_onetime_plan, parse_plan_turn,
                                     split_actions)
from lumos_jax.agent.tools.base import ToolContext
from lumos_jax.agent.tools.registry import build_registry


def test_plan_turns_follow_the_reference_rules():
    assert parse_plan_turn("Yes, I will stop planning.").stop
    s = parse_plan_turn("No, I will keep planning. Subgoal 3: Determine if X. ")
    assert not s.stop and s.subgoal == "Subgoal 3: Determine if X. "  # trailing space kept (training data)
    assert parse_plan_turn("Subgoal 1: Calculate a.").subgoal == "Subgoal 1: Calculate a."
    assert parse_plan_turn("").error and parse_plan_turn("No, I will keep planning.").error
    assert parse_onetime_plan("Subgoal 1: a; b.; Subgoal 2: c. ") == ["Subgoal 1: a; b.", "Subgoal 2: c. "]


def test_actions_parse_like_the_reference():
    a = parse_action("R5, R6 = SolveEquation(R4)")
    assert (a.outputs, a.tool, a.args, a.error) == (("R5", "R6"), "SolveEquation", "R4", None)
    a = parse_action("R2 = ParagraphRetrieve(R1, Query: How many kids did (he) have?)")
    assert a.args == "R1, Query: How many kids did (he) have?"
    a = parse_action("Output = R9 = 40")  # plain assignment, as in the reference's one-time data
    assert (a.outputs, a.tool, a.args) == (("Output",), "", "R9")
    assert parse_action("R1 = Calculator(2 - 0.5) = 1.5").args == "2 - 0.5"  # converted-data suffix
    a = parse_action("R4 = R1(R3)")  # "R1 with R3 substituted"
    assert (a.tool, a.args, a.error) == ("", "R1(R3)", None)
    assert parse_action("R1 = Calculator(2 + (3").error == "unbalanced parentheses"
    assert parse_action("R1 = 2x = Calc(3)").error  # bad tool name
    assert parse_action("X1 = Calculator(1)").error  # bad variable
    assert split_actions("R1 = QA([R2], Question: a; b); R3 = Calculator(R1)") == [
        "R1 = QA([R2], Question: a; b)", "R3 = Calculator(R1)"]
    assert [x.tool for x in parse_actions("R1 = CLICK(Env, QUERY: Rent a car); "
                                          "R2 = TYPE(R1, QUERY: pick-up location, TEXT: Brooklyn)")] == ["CLICK", "TYPE"]


def _random_output(rng: random.Random) -> str:
    pieces = ["R1", "R2", " = ", "(", ")", "; ", "Calculator", "SolveEquation", "QA", "KnowledgeQuery",
              "ParagraphRetrieve", "Code", "CLICK", "Query:", "TEXT:", ",", "[", "]", "=", "%", "^", "/",
              "x", "1e999", "9" * 30, "**", "Output", "\n", "R99", "If", "__import__('os')", "\x00", "é", " "]
    kind = rng.random()
    if kind < 0.3:
        return "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 80)))
    if kind < 0.9:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
    good = "R1 = Calculator(2 - 0.5); R2 = Calculator(R1 / 0.25)"
    i = rng.randint(0, len(good))
    return good[:i] + rng.choice(pieces) + good[i + rng.randint(0, 5):]


def test_reference_split_breaks_semicolons_inside_brackets():
    """gsm:163 / hotpotqa:296 split on every "; " (`actions[j].strip().split('; ')`); robust keeps
    a bracketed "; " inside its action."""
    text = "R1 = QA([R2], Question: a; b); R3 = Calculator(1 + 2)"
    assert [a.raw for a in parse_actions(text, plain_split=True)] == text.split("; ")
    assert [a.raw for a in parse_actions(text)] == ["R1 = QA([R2], Question: a; b)", "R3 = Calculator(1 + 2)"]


def test_fuzz_10000_malformed_grounding_outputs_never_raise():
    rng = random.Random(1234)
    registry = build_registry("complex_qa")  # no store / QA backend: those calls are error observations
    registry.register(build_registry("maths").get("SolveEquation"))
    executor = Executor(registry)
    errors = ok = 0
    for _ in range(10_000):
        text = _random_output(rng)
        actions = parse_actions(text)
        assert actions, text
        ctx = ToolContext(variables={"R2": "3"})
        records = executor.run([a for a in actions if a.tool != "Code"][:4] or actions[:1], ctx)
        for r in records:
            assert r.observation  # every action yields an observation
            if r.error_kind:
                errors += 1
                assert r.observation.startswith("Error (")
            else:
                ok += 1
    assert errors > 5000  # nearly all are malformed; each became an error observation
