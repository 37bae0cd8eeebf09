"""The user turns of the planning and grounding conversations, per domain (LUMOS_SPEC §1, §4).

The strings are the reference's, byte for byte: `train` style reproduces the training
annotations (`data/process_for_train.py`), `reference` style the reference's inference
scripts (`eval/*/run_eval.py`). They differ only in small ways, noted where they occur; how a
conversation becomes tokens (BOS, joins, stops) is `chat.py`'s job.
"""

from __future__ import annotations

from pathlib import Path

from lumos_jax.agent.parsing import subgoal_body
from lumos_jax.jsonl import iter_jsonl
from lumos_jax.tokenization import CHAT_FORMATS

STYLES = CHAT_FORMATS
DOMAINS = ("maths", "complex_qa", "web_agent", "webshop")

PLAN_INSTRUCTION = "Please provide a reasonable subgoal-based plan to solve the given task.\n"
GROUND_INSTRUCTION = ("Please ground the given subgoal to corresponding executable actions for solving the "
                      "given task. The grounded actions must be the one in available action list.\n\n")
ACTION_LISTS = {
    "maths": (
        "The available action list is 'Calculator', 'SetEquation', 'SolveEquation', 'Count', "
        "'SolveInequality', 'Code', and 'Define'.\nCalculator(formula): Calculate the input formula; "
        "SetEquation(equation): Set up an equation to be solved; SolveEquation(equation): Solve the "
        "previous set equation; Count(list): Count the number of elements in the given list; "
        "SolveInequality(inequality): Solve the previous set inequality; Code(pseudo_code): Generate a "
        "Python function that corresponds to the pseudo code; Define(variable/number): Define a variable "
        "or a number for latter usage.\n\n"),
    "complex_qa": (
        "The available action list is 'KnowledgeQuery', 'ParagraphRetrieve', 'QA', 'Calculator', and "
        "'Code'.\nCalculator(formula): Calculate the input formula; KnowledgeQuery(query): Capture the "
        "relevant webpages according to the query; ParagraphRetrieve(context, query): Given a query, "
        "retrieve the most relevant paragraphs from the given context; QA(context, query): Given context, "
        "answer the given query; Calculator(formula): Calculate the input formula; Code(pseudo_code): "
        "Generate a Python function that corresponds to the pseudo code.\n\n"),
    "web_agent": (
        "The available action list is 'CLICK', 'TYPE', 'SELECT'.\nCLICK(Env, Query): Click the relevant "
        "html region in Env according to Query; TYPE(Env, Query, Text): Type Text into the relevant html "
        "region in Env according to Query; SELECT(Env, Query, Text): Select the value Text of the relevant "
        "selection box in Env according to Query.\n\n"),
    "webshop": (
        "The available action list is 'Search', 'FeatureRetrieve', 'Pick' and 'Click'.\nSearch(Query): "
        "Search related items according to the Query; FeatureRetrieve(Feature_list, Query): Select the most "
        "relevant features from Feature_list according to Query; Pick(Item_names, Item_features, Query): "
        "Pick the most relevant item from Item_names according to Query, Item_names and Item_features; "
        "Click(Item): Click the Item to check more information.\n\n"),
}


def check(domain: str, style: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"agent domain {domain!r}: expected one of {', '.join(DOMAINS)}")
    if style not in STYLES:
        raise ValueError(f"agent prompt style {style!r}: expected one of {', '.join(STYLES)}")


def plan_first(task: str) -> str:
    return f"{PLAN_INSTRUCTION}Task: {task.strip()}; Initial Environment Description: None."


def plan_feedback(domain: str, style: str, k: int, subgoal: str, result: str) -> str:
    """The user turn after subgoal k was executed (iterative planning)."""
    if domain == "webshop":  # the reference's WebShop loop asks no stop question
        return f"The executed result for Subgoal {k} is {str(result).strip()}"
    if domain == "web_agent":
        # process_for_train: "We have already {lower-cased subgoal}".strip('.') + ". Should ..."
        body = subgoal_body(subgoal)
        body = body[:1].lower() + body[1:]
        return f"We have already {body}".strip(".").strip() + ". Should we stop planning?"
    if style == "train":
        return f"The executed result for Subgoal {k} is {str(result).strip().strip('.')}".strip() + \
            ". Should we stop planning?"
    # run_eval.py: the last action's text after its last '=', unstripped of dots.
    return f"The executed result for Subgoal {k} is {str(result).strip()}. Should we stop planning?"


def ground_first(domain: str, task: str, subgoals_text: str, onetime: bool = False) -> str:
    head = "Subgoals to be grounded" if onetime else "Subgoal to be grounded"
    return f"{GROUND_INSTRUCTION}{ACTION_LISTS[domain]}Task: {task.strip()} \n{head}: {subgoals_text}\n"


def ground_next(domain: str, style: str, subgoal: str, earlier: list[tuple[str, str, bool]]) -> str:
    """A later grounding turn (iterative). `earlier` holds (subgoal head "Subgoal j",
    result text, came-from-QA) for every executed subgoal; complex_qa lists them."""
    if domain != "complex_qa":
        return f"Subgoal to be grounded: {subgoal}\n"
    text = f"Subgoal to be grounded: {subgoal} The grounding could be based on the following results:"
    for head, result, from_qa in earlier:
        if style == "train":
            text += f" The execution result for {head} is {result_with_period(result)}"
        elif from_qa:  # the reference lists only results holding "Answer: "
            text += f" The execution result for {head} is {result}"
    return text + "\n"


def ground_next_reference_qa(subgoal: str, subgoal_results: dict) -> str:
    """hotpotqa:242-246 / strategyqa:173-177: every earlier subgoal's last result that holds
    "Answer: ", shown as the text after it, keys ("Subgoal k") sorted as strings."""
    text = f"Subgoal to be grounded: {subgoal} The grounding could be based on the following results:"
    for head in sorted(subgoal_results):
        result = subgoal_results[head]
        if isinstance(result, str) and "Answer: " in result:
            text += f" The execution result for {head} is {result.split('Answer: ')[1]}"
    return text + "\n"


def result_with_period(result: str) -> str:
    """Training data's results end with "." (the converted plans write `= 3. `)."""
    r = str(result).strip()
    return r if r.endswith(".") else r + "."


# -- WebShop: an unseen task solved with the reference's two in-context exemplars -----------

def load_webshop_exemplars(path: str | Path) -> list[dict]:
    rows = []
    for n, row in iter_jsonl(path):
        try:
            rows.append({"instruction": row["instruction"], "subgoals": row["subgoals"],
                         "actions": row["actions"]})
        except (KeyError, TypeError):
            raise ValueError(f"{path}:{n}: expected a JSON object with instruction, subgoals, actions") from None
    return rows


def webshop_exemplar_conversations(exemplars: list[dict]) -> tuple[list[list[dict]], list[list[dict]]]:
    """(plan conversations, ground conversations) built from the exemplars the way the
    reference's WebShop script builds its two-shot prefix."""
    plans, grounds = [], []
    for ex in exemplars:
        plan = [{"role": "user", "content": plan_first(ex["instruction"])}]
        subgoals = []
        for i, piece in enumerate(ex["subgoals"].split("; Subgoal ")):
            piece = piece if i == 0 else f"Subgoal {piece}"
            subgoal, _, result = piece.partition(" || Results: ")
            subgoals.append(subgoal)
            plan.append({"role": "assistant", "content": subgoal.strip()})
            plan.append({"role": "user",
                         "content": f"The execution result for Subgoal {i + 1} is {result.strip('.')}."})
        # The reference leaves an empty assistant turn after each exemplar ("<|assistant|>\n\n\n").
        plans.append(plan + [{"role": "assistant", "content": ""}])
        ground = []
        for i, action in enumerate(ex["actions"].split("; Action ")):
            user = (ground_first("webshop", ex["instruction"], subgoals[i]) if i == 0
                    else f"Subgoal to be grounded: {subgoals[i]}\n")
            acts = [a[a.find(":") + 1:].strip() for a in f"Action {action}".split(" || ")]
            ground += [{"role": "user", "content": user}, {"role": "assistant", "content": "; ".join(acts)}]
        grounds.append(ground)
    return plans, grounds
