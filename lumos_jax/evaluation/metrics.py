"""Answer metrics of the Lumos paper (LUMOS_SPEC §5), one pure function each.

The reference scripts (allenai/lumos `eval/*/run_eval.py`) define the rules we follow:

- GSM8K / SVAMP: the gold answer has its thousands commas removed (`re.sub(r"(\\d),(\\d)")`)
  and the final tool value is compared with it. The reference compares *strings* (its
  WolframAlpha backend prints `18`, never `18.0`); our offline tools may print `18.0`, `$18` or
  `1,000`, so we compare the *numbers* after the same normalisation (documented in
  docs/evaluation.md). A prediction with no number is wrong.
- StrategyQA: take the text after `Answer: ` if present; it is "true" when `yes` occurs in it
  (case-insensitive), else "false"; compare with the gold boolean.
- HotpotQA: SQuAD normalisation (lower-case, drop punctuation, drop a/an/the, squeeze spaces),
  exact match, and HotpotQA's F1 (a yes/no/noanswer on either side scores 0 unless equal).
- Mind2Web: a step succeeds when the element, the operation and (for TYPE/SELECT) the value,
  case-insensitively, are all right (see mind2web.py).
- WebShop: the environment's reward in [0, 1] for the purchase, 0 when nothing was bought;
  reported as the mean x 100.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_DIGIT_COMMA = re.compile(r"(\d),(\d)")
# The whole (cleaned) prediction must be one number: a signed decimal or a/b fraction.
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)(\s*/\s*[-+]?(\d+(\.\d*)?|\.\d+))?")


def reference_gold_number(answer: str) -> str:
    """The reference's gold normalisation: strip and remove commas between digits ("1,000")."""
    text = answer.strip()
    # Applied until stable: "1,000,000" needs two passes of the reference's regex.
    while True:
        new = _DIGIT_COMMA.sub(r"\1\2", text)
        if new == text:
            return text
        text = new


def gsm8k_gold(answer_field: str) -> str:
    """The number after `####` in a GSM8K answer, normalised as the reference does."""
    if "####" not in answer_field:
        raise ValueError("GSM8K answer has no '####' line")
    return reference_gold_number(answer_field.split("####")[1])


def parse_number(text: object) -> Fraction | None:
    """The value of a prediction that *is* a number, or None.

    Accepted: surrounding spaces, a leading `$`, thousands commas, a trailing period, a
    unicode minus, fractions `a/b`, Python numbers. "18 apples" or "x = 18" are not numbers:
    the reference compares the whole final value too.
    """
    if text is None or isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        try:
            return Fraction(Decimal(repr(text))) if isinstance(text, float) else Fraction(text)
        except (InvalidOperation, ValueError, OverflowError):
            return None
    cleaned = reference_gold_number(str(text)).replace("\u2212", "-").strip()
    cleaned = cleaned.rstrip(".").strip()
    if cleaned.startswith("-$"):
        cleaned = "-" + cleaned[2:]
    elif cleaned.startswith("$"):
        cleaned = cleaned[1:].strip()
    if not _NUMBER.fullmatch(cleaned):
        return None
    try:
        if "/" in cleaned:
            num, den = (Fraction(Decimal(t.strip())) for t in cleaned.split("/"))
            return None if den == 0 else num / den
        return Fraction(Decimal(cleaned))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def numeric_match(prediction: object, gold: object, rel_tol: float = 1e-6) -> bool:
    """Exact numeric match after normalisation: "18.0" == "18", "$18" == "18", "1,000" == "1000".

    `rel_tol` only absorbs binary-float noise from a tool backend (17.999999999 for 18); it is
    far below any difference a GSM8K/SVAMP answer can have (their golds are integers or
    short decimals).
    """
    p, g = parse_number(prediction), parse_number(gold)
    if p is None or g is None:
        return False
    if p == g:
        return True
    return abs(p - g) <= Fraction(rel_tol) * max(Fraction(1), abs(g))


def answer_after_marker(prediction: str, marker: str = "Answer: ") -> str:
    """The reference's QA-tool convention: the text after the first `Answer: `, else all."""
    prediction = "" if prediction is None else str(prediction)
    return prediction.split(marker)[1] if marker in prediction else prediction


def yes_no_prediction(prediction: str) -> bool:
    """StrategyQA: True when "yes" occurs (any case) in the answer part of the prediction."""
    return "yes" in answer_after_marker(prediction).lower()


def yes_no_gold(gold: object) -> bool:
    """Gold booleans come as JSON bools or strings ("True", "yes", "false")."""
    if isinstance(gold, bool):
        return gold
    text = str(gold).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ValueError(f"not a yes/no gold answer: {gold!r}")


def yes_no_match(prediction: str, gold: object) -> bool:
    return yes_no_prediction(prediction) == yes_no_gold(gold)


def squad_normalize(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lower, no punctuation, no a/an/the, single spaces."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, gold: str) -> bool:
    return squad_normalize(prediction) == squad_normalize(gold)


def hotpot_f1(prediction: str, gold: str) -> float:
    """HotpotQA's token F1: yes/no/noanswer must match exactly, otherwise bag-of-token F1."""
    pred, ref = squad_normalize(prediction), squad_normalize(gold)
    special = ("yes", "no", "noanswer")
    if (pred in special or ref in special) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def webshop_score(rewards: list[float | None]) -> float:
    """Mean WebShop reward x 100; an episode that never bought anything (None) counts 0."""
    if not rewards:
        return 0.0
    values = []
    for r in rewards:
        value = 0.0 if r is None else float(r)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"WebShop reward must be in [0, 1], got {r!r}")
        values.append(value)
    return 100.0 * sum(values) / len(values)
