"""The LLM-teacher path: natural-language plans → subgoal plans via any OpenAI-compatible API.

Sends the reference's conversion prompt (system line + instruction + worked examples +
`Task: …` + `Natural language plan: …`, temperature 0) to `{endpoint}/chat/completions`
through the `openai` package (lumos_jax.openai_chat.ChatClient). Requests are retried with
exponential backoff on network errors, HTTP 429/5xx, malformed responses and answers without
"Subgoal 1". Results are appended one JSON line per item (flushed), keyed by `source_index`,
so an interrupted run resumes where it stopped; a half-written last line from a crash is
dropped on resume.

The worked examples are the reference's in-context exemplars, rebuilt from a converted
file (`../shared/data/lumos/converted/<domain>.jsonl` by default) with uniform spacing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, NamedTuple

from lumos_jax.atomic import write_atomic
from lumos_jax.jsonl import iter_jsonl, iter_jsonl_lines, parse_line
from lumos_jax.openai_chat import ChatClient, ChatError

SYSTEM = ("You are a helpful assist to convert natural language plans or structural action list"
          "into subgoal-based plans and their corresponding structured actions.")
_HEADER = ("Please convert natural language plans into a series of subgoals and their corresponding actions"
           "that lead to the successful implementation with respect to the given instructions. "
           "Please use 'R[number]' to represent the intermediate results for each subgoal, without generating"
           "any exact values. Please also use functions to represent the corresponding actions. "
           "For the actions, they must be one of {actions}.\n\n")
ACTIONS = {"maths": "'Calculator', 'SolveEquation', 'Count', and 'Define'",
           "maths_prm": "'Calculator', 'SetEquation', 'SolveEquation', 'Count', 'SolveInequality', 'Code', and 'Define'",
           "complex_qa": "'KnowledgeQuery', 'ParagraphRetrieve', 'QA', 'Calculator' and 'Code'",
           "web_agent": "'TYPE', 'CLICK', and 'SELECT'"}
_CLOSING = ("Now please help us generate a plan consisting of subgoals according to the following instruction "
            "and its natural language plan!\n\n")


def instruction(domain: str, exemplars: Iterable[dict]) -> str:
    if domain not in ACTIONS:
        raise ValueError(f"teacher domain {domain!r}: expected one of {', '.join(ACTIONS)}")
    parts = [_HEADER.format(actions=ACTIONS[domain])]
    for k, ex in enumerate(exemplars, 1):
        nlp = ex["natural_language_plan"]
        nlp = "; ".join(nlp) if isinstance(nlp, list) else nlp
        parts.append(f"Example {k}:\nTask: {ex['task']}\n\nNatural language plan:\n{nlp}\n\n"
                     f"Subgoal-based plan:\n{ex['subgoal_plan'].strip()} \n\n")
    parts.append(_CLOSING)
    return "".join(parts)


def build_messages(instruction_text: str, task: str, natural_language_plan) -> list[dict]:
    if isinstance(natural_language_plan, list):
        natural_language_plan = "; ".join(natural_language_plan)
    user = instruction_text + f"Task: {task}\n\n" + f"Natural language plan: {natural_language_plan}\n\n"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# the one OpenAI-compatible client (lumos_jax.openai_chat); TeacherError kept as the name callers catch
TeacherError = ChatError


def _done_indices(out_path: Path) -> set[int]:
    """Indices already converted; rewrites the file without a line an interrupted run left
    half-written (that item is redone)."""
    if not out_path.exists():
        return set()
    good, done = [], set()
    for n, raw in iter_jsonl_lines(out_path):
        row, problem = parse_line(raw, f"{out_path}:{n}")
        try:
            index = int(row["source_index"])
        except (KeyError, TypeError, ValueError):  # not JSON (problem set) or not our row
            continue
        done.add(index)
        good.append(raw if raw.endswith(b"\n") else raw + b"\n")
    write_atomic(out_path, b"".join(good))
    return done


class TeacherReport(NamedTuple):
    total: int
    skipped_done: int
    converted: int
    failed: dict  # source_index → reason


def convert_with_teacher(items: list[dict], domain: str, out_path: str | Path, client: ChatClient,
                         exemplars: Iterable[dict], max_items: int | None = None,
                         max_tokens: int | None = None) -> TeacherReport:
    """Convert `items` ({task, natural_language_plan}) appending to out_path; resumable."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    text = instruction(domain, exemplars)
    done = _done_indices(out_path)
    max_tokens = max_tokens or (800 if domain == "web_agent" else 500)
    converted, failed = 0, {}
    with open(out_path, "a", encoding="utf-8") as f:
        for index, item in enumerate(items):
            if index in done:
                continue
            if max_items is not None and converted + len(failed) >= max_items:
                break
            messages = build_messages(text, item["task"], item["natural_language_plan"])
            try:
                plan = client.complete(messages, max_tokens=max_tokens, accept=lambda t: "Subgoal 1" in t)
            except TeacherError as e:
                failed[index] = str(e)
                continue
            row = {"task": item["task"], "natural_language_plan": item["natural_language_plan"],
                   "subgoal_plan": plan, "source_index": index}
            f.write(json.dumps(row) + "\n")
            f.flush()
            converted += 1
    return TeacherReport(len(items), len(done), converted, failed)


def gsm8k_items(path: str | Path) -> list[dict]:
    """{task, natural_language_plan} from GSM8K-format rows (the rationale before `####`)."""
    items = []
    for n, row in iter_jsonl(path):
        try:
            items.append({"task": row["question"],
                          "natural_language_plan": " ".join(row["answer"].split("####")[0].strip().split("\n"))})
        except (KeyError, AttributeError, TypeError):
            raise ValueError(f"{path}:{n}: expected a GSM8K row with 'question' and 'answer'") from None
    return items
