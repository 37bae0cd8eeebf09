"""Per-example scorers and their aggregation into one headline number per dataset.

A scorer maps (example, prediction) to `{"correct": c, "total": t, ...extras}`; the headline
is 100 * sum(correct) / sum(total) (t = 1 for a question, t = evaluated steps for a Mind2Web
task, so step SR is micro-averaged as in the reference). Extras (HotpotQA F1) are averaged
over examples.

Two protocols (docs/evaluation.md): `robust` scores leniently (numbers compared as numbers, a
missing StrategyQA answer reads as "no"); `reference` scores as the reference's
`eval/*/run_eval.py` would on the same predictions (string comparison, a missing answer is
never correct, Mind2Web counted per grounded action, WebShop averaged over finished episodes).
"""

from __future__ import annotations

from typing import Any, Callable

from lumos_jax.evaluation import metrics
from lumos_jax.evaluation.datasets import Example
from lumos_jax.evaluation.mind2web import score_actions_reference, score_steps
from lumos_jax.evaluation.user_datasets import sql_execution_match

Scorer = Callable[[Example, Any], dict]


def _as_text(prediction: Any) -> str:
    return "" if prediction is None else str(prediction)


PROTOCOLS = ("reference", "robust")


def check_protocol(protocol: str, where: str = "protocol") -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"{where}={protocol!r}: expected 'reference' or 'robust'")
    return protocol


def score_numeric(example: Example, prediction: Any) -> dict:
    return {"correct": float(metrics.numeric_match(prediction, example.answer)), "total": 1.0}


def score_yes_no(example: Example, prediction: Any) -> dict:
    """Robust: a missing answer (None) reads as "" and so as "no" — correct whenever the gold
    is False (55.7% of the first 300 StrategyQA questions). Kept so robust numbers stay
    comparable with earlier runs; the reference protocol scores it wrong."""
    return {"correct": float(metrics.yes_no_match(_as_text(prediction), example.answer)),
            "total": 1.0}


def score_squad(example: Example, prediction: Any) -> dict:
    pred = metrics.answer_after_marker(_as_text(prediction))
    return {"correct": float(metrics.squad_exact_match(pred, str(example.answer))), "total": 1.0,
            "f1": metrics.hotpot_f1(pred, str(example.answer))}


def score_mind2web(example: Example, prediction: Any) -> dict:
    return score_steps(prediction, example.answer)


def score_webshop(example: Example, prediction: Any) -> dict:
    """The prediction is the environment's reward for the purchase (None = nothing bought)."""
    if isinstance(prediction, dict):
        prediction = prediction.get("reward")
    reward = 0.0 if prediction is None else float(prediction)
    metrics.webshop_score([reward])  # validates the range
    return {"correct": reward, "total": 1.0}


def score_choice(example: Example, prediction: Any) -> dict:
    """Multiple choice (A-OKVQA MC, ScienceQA): the choice's text, its letter ("B", "(B)",
    "B.") or its index ("1"), after `Answer: ` if present."""
    choices = example.meta.get("choices", [])
    pred = metrics.answer_after_marker(_as_text(prediction)).strip()
    picked = None
    norm = metrics.squad_normalize(pred)
    texts = [metrics.squad_normalize(c) for c in choices]
    if norm and norm in texts:
        picked = texts.index(norm)
    else:
        bare = pred.strip("().").strip()
        if len(bare) == 1 and bare.isalpha():
            picked = ord(bare.upper()) - ord("A")
        elif bare.isdigit():
            picked = int(bare)
    return {"correct": float(picked is not None and picked == int(example.answer)), "total": 1.0}


def score_vqa_direct(example: Example, prediction: Any) -> dict:
    """A-OKVQA direct answer: min(1, matching human answers / 3) after SQuAD normalisation."""
    pred = metrics.squad_normalize(metrics.answer_after_marker(_as_text(prediction)))
    answers = [metrics.squad_normalize(a) for a in example.meta.get("direct_answers", [])]
    return {"correct": min(1.0, sum(a == pred for a in answers) / 3.0), "total": 1.0}


def score_sql(example: Example, prediction: Any) -> dict:
    """InterCode-SQL: execution match of the predicted query against the gold on the task's db."""
    return {"correct": float(sql_execution_match(_as_text(prediction), example)), "total": 1.0}


# -- reference protocol: what the reference's run_eval.py would count ---------------------------

def score_numeric_reference(example: Example, prediction: Any) -> dict:
    """gsm:194,317 / svamp: `results[final_variable] == answer`, a string comparison with the
    comma-free gold; " 1000" or "18.0" is wrong. No prediction (a voided sample) is wrong."""
    ok = prediction is not None and str(prediction) == str(example.answer)
    return {"correct": float(ok), "total": 1.0}


def score_yes_no_reference(example: Example, prediction: Any) -> dict:
    """strategyqa:243-253,345-365: only a sample with an answer is scored, so no answer is
    never correct; otherwise "yes" in the text after `Answer: ` means true."""
    if prediction is None:
        return {"correct": 0.0, "total": 1.0}
    return score_yes_no(example, prediction)


def score_squad_reference(example: Example, prediction: Any) -> dict:
    """hotpotqa:308-328: samples without a final answer are not scored (EM 0, F1 0)."""
    if prediction is None:
        return {"correct": 0.0, "total": 1.0, "f1": 0.0}
    return score_squad(example, prediction)


def score_mind2web_reference(example: Example, prediction: Any) -> dict:
    """mind2web:55-61,122: counted per grounded CLICK/TYPE/SELECT action of steps 0-14."""
    return score_actions_reference(prediction, example)


def score_webshop_reference(example: Example, prediction: Any) -> dict:
    """webshop:205-210: `tot_reward / len(solved_idx)`, so an episode that never finished
    (no purchase and no crash within the rounds) is left out of the denominator. A prediction
    is a reward (finished), a dict {reward, finished}, or None (not finished)."""
    finished = prediction is not None
    if isinstance(prediction, dict):
        finished = bool(prediction.get("finished", prediction.get("reward") is not None))
        prediction = prediction.get("reward")
    if not finished:
        return {"correct": 0.0, "total": 0.0}
    reward = 0.0 if prediction is None else float(prediction)
    metrics.webshop_score([reward])
    return {"correct": reward, "total": 1.0}


REFERENCE_SCORERS: dict[str, Scorer] = {
    "numeric_match": score_numeric_reference,
    "yes_no": score_yes_no_reference,
    "squad": score_squad_reference,
    "mind2web_step_sr": score_mind2web_reference,
    "webshop_reward": score_webshop_reference,
}

SCORERS: dict[str, Scorer] = {
    "numeric_match": score_numeric,
    "yes_no": score_yes_no,
    "squad": score_squad,
    "mind2web_step_sr": score_mind2web,
    "webshop_reward": score_webshop,
    "choice": score_choice,
    "vqa_direct": score_vqa_direct,
    "sql_execution": score_sql,
}

METRIC_LABELS = {
    "numeric_match": "exact match (%)",
    "yes_no": "accuracy (%)",
    "squad": "EM (%)",
    "mind2web_step_sr": "step success rate (%)",
    "webshop_reward": "reward (x100)",
    "choice": "accuracy (%)",
    "vqa_direct": "direct-answer accuracy (%)",
    "sql_execution": "execution accuracy (%)",
}


def get_scorer(name: str, protocol: str = "robust") -> Scorer:
    """The metric's scorer under `protocol`; metrics the reference has no code for (A-OKVQA,
    ScienceQA, InterCode-SQL) score the same under both."""
    if name not in SCORERS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(SCORERS)}")
    if check_protocol(protocol) == "reference":
        return REFERENCE_SCORERS.get(name, SCORERS[name])
    return SCORERS[name]


def headline(scores: list[dict]) -> float:
    total = sum(s["total"] for s in scores)
    return 100.0 * sum(s["correct"] for s in scores) / total if total else 0.0


def rescore(records: list[dict], metric: str, protocol: str, examples: dict[str, Example] | None = None) -> dict:
    """Score saved prediction records (`predictions.jsonl`) again under `protocol`: the same
    predictions, the other protocol's rules. `examples` (by id) are needed only where the
    scorer reads more than the gold (Mind2Web pages); otherwise the record's gold is used.
    Returns {score, correct, total, n}."""
    scorer = get_scorer(metric, protocol)
    scores = []
    for r in records:
        ex = (examples or {}).get(r["id"]) or Example(r["id"], r.get("question", ""), r["gold"], "")
        scores.append(scorer(ex, r.get("prediction")))
    return {"score": headline(scores), "correct": sum(s["correct"] for s in scores),
            "total": sum(s["total"] for s in scores), "n": len(scores)}
