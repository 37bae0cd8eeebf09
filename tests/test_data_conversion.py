"""The reference conversion, checked against the reference code's own output files."""

import json

import pytest
from conftest import DATA

from lumos_jax.data.reference_conversion import (DOMAINS, convert_domain, convert_rows, parse_action_line,
                                                split_subgoal_plan)

ANNOTATIONS = DATA / "lumos" / "annotations"
CONVERTED = DATA / "lumos" / "converted"


def test_reproduces_all_twelve_reference_files_byte_for_byte(tmp_path):
    for domain in DOMAINS:
        convert_domain([CONVERTED / f"{domain}.jsonl"], domain, tmp_path)
    names = sorted(p.name for p in ANNOTATIONS.glob("*.jsonl"))
    assert len(names) == 12
    for name in names:
        assert (tmp_path / name).read_bytes() == (ANNOTATIONS / name).read_bytes(), name
    assert not list(tmp_path.glob("*.tmp"))


def _row(plan, task="T"):
    return {"task": task, "subgoal_plan": plan}


def test_output_renamed_to_next_r_in_iterative_ground_only():
    plan = ("Subgoal 1: A.\nAction 1-1: R1 = Calculator(1 + 1) = 2\n\n"
            "Subgoal 2: B.\nAction 2-1: Output = Calculator(R1 * 3) = 6")
    (it,), _ = convert_rows([_row(plan)], "maths", "ground", "iterative")
    assert json.loads(it)["messages"][-1]["content"] == "R2 = Calculator(R1 * 3)"
    (one,), _ = convert_rows([_row(plan)], "maths", "ground", "onetime")
    assert json.loads(one)["messages"][-1]["content"] == "R1 = Calculator(1 + 1); Output = Calculator(R1 * 3)"


def test_rows_without_actions_or_readable_variable_are_dropped_and_counted():
    no_action = "Subgoal 1: A.\n\nSubgoal 2: B.\nAction 2-1: R1 = Calculator(1) = 1"
    first_output = "Subgoal 1: A.\nAction 1-1: Output = Calculator(1) = 1"  # no earlier R index
    lines, stats = convert_rows([_row(no_action), _row(first_output)], "maths", "ground", "iterative")
    assert lines == [] and stats.dropped == 2
    lines, stats = convert_rows([_row(no_action)], "maths", "plan", "onetime")
    assert stats.written == 1  # one-time plans keep them, as the reference does


def test_web_feedback_and_complex_qa_results():
    web = ("Subgoal 1: Click the search box.\nAction 1-1: R1 = CLICK(Env, QUERY: search) \n\n"
           "Subgoal 2: Type the city.\nAction 2-1: R2 = TYPE(R1, QUERY: city, TEXT: Paris)")
    (line,), _ = convert_rows([_row(web)], "web_agent", "plan", "iterative")
    msgs = json.loads(line)["messages"]
    assert msgs[2]["content"] == "We have already click the search box. Should we stop planning?"
    qa = ("Subgoal 1: Find X.\nAction 1-1: R1 = KnowledgeQuery(X) = page\n\n"
          "Subgoal 2: Answer.\nAction 2-1: R2 = QA([R1], Question: q) = yes")
    (line,), _ = convert_rows([_row(qa)], "complex_qa", "ground", "iterative")
    msgs = json.loads(line)["messages"]
    assert msgs[2]["content"] == ("Subgoal to be grounded: Subgoal 2: Answer. The grounding could be based on "
                                  "the following results: The execution result for Subgoal 1 is page\n")


def test_action_parser_cases():
    a = parse_action_line("Action 3-1: R5, R6 = SolveEquation(R2=xy, R3=x/y) = -9/8, -3/5 ", "maths")
    assert (a.variables, a.name, a.args, a.result) == (["R5", "R6"], "SolveEquation", "R2=xy, R3=x/y", "-9/8, -3/5")
    a = parse_action_line("Action 9-1: Output = R9 = 40", "maths")
    assert (a.name, a.args, a.result) == ("", "R9", "40")
    subgoals, actions = split_subgoal_plan("noise Subgoal 1: x\nAction 1-1: R1 = Define(p) = p")
    assert subgoals == ["Subgoal 1: x"] and actions == [["Action 1-1: R1 = Define(p) = p"]]


def test_bad_converted_row_names_file_and_line(tmp_path):
    bad = tmp_path / "maths.jsonl"
    bad.write_text('{"task": "t", "subgoal_plan": "Subgoal 1: a"}\n{"task": 3}\n')
    with pytest.raises(ValueError, match=r"maths.jsonl:2: "):
        convert_domain([bad], "maths", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
