"""Metric rules of the Lumos reference on hand-worked cases (LUMOS_SPEC §5)."""

import pytest

from lumos_jax.evaluation import metrics as m


@pytest.mark.parametrize("pred,gold,ok", [
    ("18", "18", True),
    ("18.0", "18", True),          # our sympy tools may print a float
    ("18.000000000000", "18", True),
    ("$18", "18", True),           # currency sign
    ("$18.00", "18", True),
    ("1,000", "1000", True),       # thousands separator on either side
    ("1000", "1,000", True),
    ("1,234,567", "1234567", True),
    ("18.", "18", True),           # trailing period of a sentence
    (" 18 ", "18", True),
    ("3/4", "0.75", True),         # exact fraction
    ("-5", "-5", True),
    ("\u22125", "-5", True),       # unicode minus
    ("17.999999999", "18", True),  # float noise from a tool backend
    ("18.5", "18", False),
    ("17", "18", False),
    ("-18", "18", False),
    ("18 apples", "18", False),    # not a bare number: the reference compares the whole value
    ("x = 18", "18", False),
    ("", "18", False),
    (None, "18", False),
    ("1/0", "0", False),
    ("eighteen", "18", False),
])
def test_numeric_match(pred, gold, ok):
    assert m.numeric_match(pred, gold) is ok


def test_numeric_match_python_numbers():
    assert m.numeric_match(18.0, "18")
    assert m.numeric_match(18, "18")
    assert not m.numeric_match(True, "1")


def test_gsm8k_gold_is_reference_normalised():
    assert m.gsm8k_gold("so 1,000 + 234 = <<1000+234=1234>>1,234\n#### 1,234") == "1234"
    assert m.gsm8k_gold("#### 1,000,000") == "1000000"
    with pytest.raises(ValueError):
        m.gsm8k_gold("no marker")


@pytest.mark.parametrize("pred,gold,ok", [
    ("Answer: yes", True, True),
    ("Answer: Yes.", True, True),
    ("YES", True, True),
    ("Answer: No", True, False),
    ("Answer: no", False, True),
    ("no", "False", True),
    ("", False, True),                  # no "yes" -> false, as in the reference
    ("Answer: yesterday", True, True),  # the reference's substring rule, kept on purpose
    ("Question: is it yes? Answer: no", False, True),  # only the part after "Answer: "
])
def test_yes_no(pred, gold, ok):
    assert m.yes_no_match(pred, gold) is ok


def test_yes_no_gold_rejects_garbage():
    with pytest.raises(ValueError):
        m.yes_no_gold("maybe")


@pytest.mark.parametrize("text,norm", [
    ("The Beatles", "beatles"),
    ("An apple, a day!", "apple day"),
    ("  U.S.A.  ", "usa"),
    ("Theatre of the Absurd", "theatre of absurd"),  # "the" only as a word
    ("a", ""),
])
def test_squad_normalize(text, norm):
    assert m.squad_normalize(text) == norm


def test_squad_em_and_f1_hand_worked():
    assert m.squad_exact_match("the Eiffel Tower.", "Eiffel Tower")
    assert not m.squad_exact_match("Eiffel", "Eiffel Tower")
    # pred {eiffel}, gold {eiffel, tower}: P=1, R=1/2, F1=2/3
    assert m.hotpot_f1("Eiffel", "the Eiffel Tower") == pytest.approx(2 / 3)
    # pred {paris, france, city}, gold {paris}: P=1/3, R=1 -> 0.5
    assert m.hotpot_f1("Paris, France city", "Paris") == pytest.approx(0.5)
    assert m.hotpot_f1("yes", "no") == 0.0
    assert m.hotpot_f1("yes it is", "yes") == 0.0  # yes/no must match exactly
    assert m.hotpot_f1("Yes.", "yes") == 1.0
    assert m.hotpot_f1("", "Paris") == 0.0


def test_answer_after_marker():
    assert m.answer_after_marker("Question: who? Answer: Paris") == "Paris"
    assert m.answer_after_marker("Paris") == "Paris"
    assert m.answer_after_marker(None) == ""


def test_webshop_score():
    assert m.webshop_score([1.0, 0.5, None, 0.0]) == pytest.approx(37.5)
    assert m.webshop_score([]) == 0.0
    with pytest.raises(ValueError):
        m.webshop_score([1.5])


def test_choice_and_vqa_direct_scoring():
    from lumos_jax.evaluation.datasets import Example
    from lumos_jax.evaluation.scoring import score_choice, score_vqa_direct

    ex = Example("q", "What is the man awaiting?", 3, "multimodal",
                 {"choices": ["skateboarder", "train", "delivery", "cab"],
                  "direct_answers": ["ride"] * 4 + ["cab"] * 2 + ["taxi"] * 4})
    for pred, ok in [("cab", 1.0), ("Answer: The cab.", 1.0), ("D", 1.0), ("(D)", 1.0), ("3", 1.0),
                     ("train", 0.0), ("B", 0.0), ("", 0.0), ("a cab driver", 0.0)]:
        assert score_choice(ex, pred)["correct"] == ok, pred
    # direct answers: min(1, matches / 3): 2 annotators said "cab", 4 said "taxi"
    assert score_vqa_direct(ex, "cab")["correct"] == pytest.approx(2 / 3)
    assert score_vqa_direct(ex, "Taxi")["correct"] == 1.0
    assert score_vqa_direct(ex, "bus")["correct"] == 0.0
