"""Maths tools under `protocol="reference"` against the reference's recorded results, as text.

The gold actions of the reference's maths exemplars (`converted/maths.jsonl`, from
allenai/lumos data/incontext.py) run in sequence, each result stored as the reference stores
it, then normalised only as the reference itself does:

- eval/gsm/run_eval.py:296-299 (one-time): every stored result is `.strip()`-ed;
- eval/gsm/run_eval.py:180-182 then :105 (iterative): the action string becomes
  `action + " = " + result` (multi-outputs joined with ", ") and the planner is told the
  text after its last `=`, stripped. That feedback must equal, byte for byte, the user
  turns of the reference's training annotations (`lumos_maths_plan_iterative.jsonl`).
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import DATA
from lumos_jax.agent.execution import Executor
from lumos_jax.agent.parsing import parse_action
from lumos_jax.agent.tools.base import ToolContext, ToolRegistry
from lumos_jax.agent.tools.maths import maths_tools

CONVERTED = DATA / "lumos" / "converted" / "maths.jsonl"
PLAN_ANNOTATIONS = DATA / "lumos" / "annotations" / "lumos_maths_plan_iterative.jsonl"
_ACTION = re.compile(r"^Action (\d+)-\d+: (.*?) = ([^=]*?)\s*$")


def _rows() -> list[dict]:
    if not CONVERTED.exists() or not PLAN_ANNOTATIONS.exists():
        pytest.skip(f"{CONVERTED} or {PLAN_ANNOTATIONS.name} is not available (../shared)")
    with open(CONVERTED, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(PLAN_ANNOTATIONS, encoding="utf-8") as f:
        plans = {r["id"]: r for r in map(json.loads, f)}
    for i, row in enumerate(rows):
        row["feedback"] = [m["content"] for m in plans[f"maths_{i}"]["messages"] if m["role"] == "user"][1:]
    return rows


def _gold(row: dict) -> list[tuple[int, str, str]]:
    """(subgoal number, action text, recorded result) per action line."""
    out = []
    for line in row["subgoal_plan"].split("\n"):
        m = _ACTION.match(line.strip())
        if m:
            out.append((int(m.group(1)), m.group(2), m.group(3)))
    return out


def _action_string(action: str, value) -> str:
    """gsm/run_eval.py:179-182: the executed action as the iterative loop records it."""
    return action + " = " + (value if isinstance(value, str) else ", ".join(value))


def _feedback(action_string: str) -> str:
    """gsm/run_eval.py:105: the planner sees the text after the last '=' of the last action."""
    return action_string.split("=")[-1].strip()


def test_gold_maths_actions_reproduce_recorded_results_as_text():
    executor = Executor(ToolRegistry(maths_tools(protocol="reference")))
    checked = 0
    for row in _rows():
        ctx = ToolContext(variables={})
        last_of_subgoal: dict[int, str] = {}
        for subgoal, action, recorded in _gold(row):
            rec = executor.run_one(parse_action(action), ctx)
            assert rec.ok, (action, rec.observation)
            values = rec.result if isinstance(rec.result, list) else [rec.result]
            assert ", ".join(v.strip() for v in values) == recorded, (action, rec.result)  # gsm:296-299
            last_of_subgoal[subgoal] = _action_string(action, rec.result)
            checked += 1
        feedback = [f"The executed result for Subgoal {k} is {_feedback(a)}. Should we stop planning?"
                    for k, a in sorted(last_of_subgoal.items())]
        assert feedback == row["feedback"]
    assert checked == 27  # every action of the 6 exemplars


def test_solve_equation_values_are_stored_unstripped_as_the_reference_does():
    """gsm:47-51 keeps the text after '=' of `p = 1000`: ` 1000` (stored so at gsm:171); an
    expression without '=' has no '=' to cut at (find() = -1), so `110` stays whole."""
    executor = Executor(ToolRegistry(maths_tools(protocol="reference")))
    ctx = ToolContext(variables={"R2": "2p/5", "R4": "(p + 600)/4"})
    assert executor.run_one(parse_action("R5 = SolveEquation(R2 = R4)"), ctx).result == " 1000"
    ctx = ToolContext(variables={"R2": "60", "R4": "50"})
    assert executor.run_one(parse_action("R5 = SolveEquation(R2 + R4)"), ctx).result == "110"
    ctx = ToolContext(variables={})
    rec = executor.run_one(parse_action("R5, R6 = SolveEquation(x + y = 10, x - y = 2)"), ctx)
    assert rec.result == [" 6", " 4"] and _feedback(_action_string(rec.raw, rec.result)) == "6,  4"


# The reference's competition-maths exemplars (data/incontext.py:12-20 and 44-61 at 146dd9d),
# where its annotations rely on WolframAlpha reading `xy` as x*y and on `Expand`.
PRM_EXEMPLARS = [
    [("R1 = Calculator((x-y) - (x+y))", "-2y"), ("R2 = Calculator((x+y) + 2*R1)", "x-3y"),
     ("R3 = Calculator((x+y) + 3*R1)", "x-5y"), ("R4 = Calculator((x+y) + 4*R1)", "x-7y"),
     ("R5, R6 = SolveEquation(R2=xy, R3=x/y)", "-9/8, -3/5"), ("Output = Calculator(R4(R5, R6))", "123/40")],
    [("R1 = Define(n-2)", "n-2"), ("R2 = Define(n)", "n"), ("R3 = Define(n+2)", "n+2"),
     ("R4 = Calculator(R1^2)", "n^2-4n+4"), ("R5 = Calculator(R2^2)", "n^2"), ("R6 = Calculator(R3^2)", "n^2+4n+4"),
     ("R9 = Define(64)", "64"),  # stands for `Code(If R8 > 0, R8, -R8)`, which the reference never runs
     ("R10 = Calculator(R1(R9))", "62"), ("R11 = Calculator(R2(R9))", "64"), ("R12 = Calculator(R3(R9))", "66"),
     ("R13 = Calculator(R10 * R11 * R12)", "261888"), ("Output = Calculator(R13 / 8)", "32736")],
]


def test_competition_exemplars_expand_and_read_implicit_products():
    """Those annotations write symbolic results without spaces (`n^2-4n+4`) where the GSM
    ones use them (`p + 600`); spaces are therefore ignored here, nothing else."""
    executor = Executor(ToolRegistry(maths_tools(protocol="reference")))
    for plan in PRM_EXEMPLARS:
        ctx = ToolContext(variables={})
        for action, recorded in plan:
            rec = executor.run_one(parse_action(action), ctx)
            assert rec.ok, (action, rec.observation)
            got = _feedback(_action_string(action, rec.result))
            assert got.replace(" ", "") == recorded.replace(" ", ""), (action, rec.result)
    # Robust mode keeps results unexpanded and reads `xy` as x*y only because x and y occur alone.
    robust = Executor(ToolRegistry(maths_tools(protocol="robust")))
    ctx = ToolContext(variables={"R1": "n-2"})
    assert robust.run_one(parse_action("R4 = Calculator(R1^2)"), ctx).observation == "(n - 2)^2"
    ctx = ToolContext(variables={"R2": "x - 3y", "R3": "x - 5y"})
    assert robust.run_one(parse_action("R5, R6 = SolveEquation(R2=xy, R3=x/y)"), ctx).result == ["-9/8", "-3/5"]


def test_plus_minus_roots_keep_the_plus_root():
    """gsm:44-46: WolframAlpha's `n = ± 64` becomes `terms[0] + terms[1]`, one root; the
    text after '=' (gsm:47-51) is then ` + 64` where robust mode gives both roots."""
    ctx = {"R4": "n^2-4n+4", "R5": "n^2", "R6": "n^2+4n+4"}
    action = parse_action("R8 = SolveEquation(R4 + R5 + R6 = 12296)")
    rec = Executor(ToolRegistry(maths_tools(protocol="reference"))).run_one(action, ToolContext(variables=dict(ctx)))
    assert rec.result == " + 64"
    rec = Executor(ToolRegistry(maths_tools(protocol="robust"))).run_one(action, ToolContext(variables=dict(ctx)))
    assert rec.result == "-64, 64"
    rec = Executor(ToolRegistry(maths_tools(protocol="reference"))).run_one(
        parse_action("R1 = SolveEquation(x^2 - 2x - 1 = 0)"), ToolContext(variables={}))
    assert isinstance(rec.result, str) and rec.result.startswith(" 1 + 1.41421")  # `x = 1 ± sqrt(2)`: one root
