"""GSM8K rationales → converted plans → training files, with every action executed."""

import json
from fractions import Fraction

import pytest
from conftest import DATA

from lumos_jax.data.gsm8k import convert_file, convert_problem, parse_number, sympy_calculator, sympy_executor
from lumos_jax.data.reference_conversion import convert_rows, parse_action_line, split_subgoal_plan

TRAIN = DATA / "train" / "gsm8k_train.jsonl"


@pytest.fixture(scope="module")
def converted():
    return convert_file(TRAIN)


def test_rates_on_all_training_problems(converted):
    rows, report = converted
    assert report.total == 7473
    assert report.converted / report.total >= 0.95
    assert report.executed / report.total >= 0.95
    assert report.executor == "lumos_jax.agent.tools.maths.Calculator"  # the agent's own tool
    failed = report.total - report.executed
    assert sum(report.failures.values()) == failed  # every failure has a reason
    assert set(report.failures) <= {"no_calculation_marks", "final_value_differs_from_answer",
                                    "final_step_unmarked", "answer_is_an_earlier_result",
                                    "unparsable_mark", "missing_question_or_answer_line",
                                    "unreadable_final_answer"} | {k for k in report.failures if k.startswith("calculator_error")}


def test_plans_execute_independently_to_the_gold_answer(converted):
    """Re-execute the written actions with a separate evaluator: the final value is `#### N`."""
    rows, _ = converted
    gold = {json.loads(line)["question"]: json.loads(line)["answer"].split("####")[1] for line in open(TRAIN)}
    ok = 0
    for row in rows[:400]:
        values = {}
        _, actions = split_subgoal_plan(row["subgoal_plan"])
        for line in (a for block in actions for a in block):
            act = parse_action_line(line, "maths")
            assert act.name == "Calculator"
            expr = act.args
            for name in sorted(values, key=lambda n: -len(n)):
                expr = expr.replace(name, f"({values[name]})")
            values[act.variables[0]] = Fraction(eval(expr, {"__builtins__": {}}))  # plain arithmetic only
        ok += values[act.variables[0]] == Fraction(gold[row["task"]].strip().replace(",", ""))
    assert ok >= 0.95 * 400


def test_first_problem_in_detail():
    problem = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                           "clips in May. How many clips did Natalia sell altogether in April and May?",
               "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                         "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"}
    result = convert_problem(problem)
    assert result.ok and result.executed and result.reason == ""
    assert result.row["subgoal_plan"] == (
        "Subgoal 1: Natalia sold 48/2 clips in May.\nAction 1-1: R1 = Calculator(48/2) = 24\n\n"
        "Subgoal 2: Natalia sold 48+24 clips altogether in April and May.\n"
        "Action 2-1: R2 = Calculator(48+R1) = 72")
    (line,), _ = convert_rows([result.row], "maths", "ground", "iterative")
    msgs = json.loads(line)["messages"]
    assert [m["content"] for m in msgs if m["role"] == "assistant"] == ["R1 = Calculator(48/2)", "R2 = Calculator(48+R1)"]


def test_unmarked_calculation_and_failure_reasons():
    problem = {"question": "Sam has 24 cards.", "answer": "Carlos has 24/6=<<24/6=4>>4.\nSam has 4+6=10.\n#### 10"}
    r = convert_problem(problem)
    assert r.executed and "R2 = Calculator(R1+6) = 10" in r.row["subgoal_plan"]
    assert convert_problem({"question": "q", "answer": "no marks\n#### 3"}).reason == "no_calculation_marks"
    assert convert_problem({"question": "q", "answer": "a <<2*3=6>>6\nthen it is seven\n#### 7"}
                           ).reason == "final_step_unmarked"
    assert convert_problem({"question": "q", "answer": "a <<2*3=6>>6\nb <<6+1=7>>7\nso 6\n#### 6"}
                           ).reason == "answer_is_an_earlier_result"
    wrong = convert_problem({"question": "q", "answer": "a <<2*3=6>>6\n#### 7"})
    assert wrong.ok and not wrong.executed and wrong.reason == "final_value_differs_from_answer"
    assert convert_problem({"question": "q"}).reason == "missing_question_or_answer_line"
    assert sympy_calculator("1/3 + 1/6") == Fraction(1, 2)
    with pytest.raises(ValueError):
        sympy_calculator("__import__('os')")


def test_agent_calculator_and_plain_sympy_agree():
    def results(conversion):
        return [parse_number(l.rsplit(" = ", 1)[1]) for l in conversion.row["subgoal_plan"].split("\n")
                if l.startswith("Action")]
    for line in open(TRAIN).readlines()[:150]:
        problem = json.loads(line)
        a, b = convert_problem(problem), convert_problem(problem, sympy_executor)
        assert (a.reason, a.executed) == (b.reason, b.executed)
        if a.row:
            assert results(a) == results(b)
