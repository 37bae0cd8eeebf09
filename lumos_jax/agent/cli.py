"""`lumos-jax agent`: run Lumos-I / Lumos-O episodes and print a readable trace.

    lumos-jax agent --gin_file=agent/maths.gin --gin_file=agent/iterative.gin \\
        --task "Peter goes to the store ..."
    lumos-jax agent --gin_file=agent/complex_qa.gin --tasks_file=questions.jsonl --trace_out=t.jsonl

Models, style, loop and tools come from gin (`agent_episode.*`, `agent_models.*`,
`agent_tools.*`; see docs/agent.md). The default backend replays the bundled annotations.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Sequence

import gin

from lumos_jax.agent.execution import Executor
from lumos_jax.agent.gin_configurables import agent_episode, agent_models, scripted_files
from lumos_jax.agent.prompts import plan_first
from lumos_jax.agent.runner import EpisodeRunner
from lumos_jax.agent.tools.qa import GeneratorQA
from lumos_jax.agent.tools.registry import build_registry
from lumos_jax.agent.trace import write_traces
from lumos_jax.config import parse_args
from lumos_jax.jsonl import iter_jsonl, read_jsonl

_COLOURS = {"plan": "\033[36m", "ground": "\033[35m", "ok": "\033[32m", "err": "\033[31m", "dim": "\033[2m",
            "bold": "\033[1m", "end": "\033[0m"}


def _paint(on: bool):
    def paint(kind: str, text: str) -> str:
        return f"{_COLOURS[kind]}{text}{_COLOURS['end']}" if on else text
    return paint


def render_trace(events: list[dict], colour: bool = True) -> str:
    """A human-readable view of one episode's trace events."""
    p = _paint(colour)
    lines = []
    for e in events:
        kind = e["event"]
        if kind == "start":
            lines.append(p("bold", f"Task: {e['task']}") + p("dim", f"  [{e['domain']}, {e['formulation']}, "
                                                                    f"{e['style']}]"))
        elif kind == "generate":
            mod = e["module"]
            lines.append(p(mod, f"[{mod} {e['round']}] ") + e["raw_output"].strip() +
                         p("dim", f"  ({e['seconds']:.2f}s, +{e['new_prompt_tokens']} prompt tokens)"))
            if e.get("error"):
                lines.append(p("err", f"    generation error: {e['error']}"))
        elif kind == "action":
            if e["error_kind"]:
                lines.append("    " + e["raw"] + p("err", f"  -> {e['observation']}"))
            else:
                obs = e["observation"].replace("\n", " ")
                lines.append("    " + e["raw"] + p("ok", f"  -> {obs[:200]}") + p("dim", f"  ({e['seconds']:.3f}s)"))
        elif kind == "final_answer":
            lines.append(p("ok", f"  final QA: {e['answer']}") + (p("err", f" ({e['error']})") if e.get("error") else ""))
        elif kind == "end":
            style = "ok" if e["reason"] in ("stopped", "done", "max_rounds") else "err"
            lines.append(p(style, f"=> answer: {e['answer']}  ({e['reason']}, {e['rounds']} rounds)"))
    return "\n".join(lines)


def use_colour(no_color: bool = False) -> bool:
    """Colour only on a terminal: redirected logs stay plain text (also --no_color, $NO_COLOR)."""
    return not no_color and sys.stdout.isatty() and os.environ.get("NO_COLOR") is None


def _read_tasks(path: str) -> list[str]:
    if path.endswith(".jsonl"):
        tasks = []
        for n, row in iter_jsonl(path):
            task = (row.get("task") or row.get("question") or row.get("confirmed_task")
                    if isinstance(row, dict) else None)
            if task is None:
                raise ValueError(f"{path}:{n}: expected a JSON object with 'task' or 'question'")
            tasks.append(str(task))
    else:
        with open(path, encoding="utf-8") as f:
            tasks = [line.strip() for line in f if line.strip()]
    if not tasks:
        raise ValueError(f"--tasks_file {path}: no tasks in it (one task a line, or JSONL with 'task')")
    return tasks


def scripted_tasks(plan_file: Path) -> list[str]:
    """The task texts the scripted backend knows: the tasks of the plan annotation file."""
    tasks = []
    for row in read_jsonl(plan_file):
        first = row["messages"][0]["content"]
        m = _TASK.search(first)
        if m and plan_first(m.group(1)) == first:
            tasks.append(m.group(1))
    return tasks


_TASK = re.compile(r"Task: (.*); Initial Environment Description: None\.$", re.S)


def _gin(name: str, default):
    try:
        return gin.query_parameter(name)
    except ValueError:  # not bound
        return default


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lumos-jax agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", action="append", default=[], help="a task (repeatable)")
    parser.add_argument("--tasks_file", help="text file (one task a line) or JSONL with 'task'/'question'")
    parser.add_argument("--list_scripted_tasks", action="store_true",
                        help="print the tasks the scripted backend can replay (domain and loop from gin)")
    parser.add_argument("--trace_out", help="write every episode's trace here (one JSONL file)")
    parser.add_argument("--trace_dir", help="write one JSONL trace per episode here (episode_<i>.jsonl)")
    parser.add_argument("--no_color", action="store_true", help="plain text output")
    parser.add_argument("--quiet", action="store_true", help="print answers only")
    parser.add_argument("--max_concurrent", type=int, default=64)
    args = parse_args(parser, argv)
    scripted = _gin("agent_models.backend", "scripted") == "scripted"
    try:
        cfg = agent_episode()
        if args.list_scripted_tasks:
            if not scripted:
                raise ValueError("--list_scripted_tasks: the backend is not 'scripted' (add --gin_file=agent/scripted.gin)")
            print("\n".join(scripted_tasks(scripted_files(cfg, _gin("agent_models.scripted_dir", None))[0])))
            return 0
        tasks = list(args.task) + (_read_tasks(args.tasks_file) if args.tasks_file else [])
        if not tasks:
            parser.error("give --task or --tasks_file (or --list_scripted_tasks)")
        if scripted:
            plan_file = scripted_files(cfg, _gin("agent_models.scripted_dir", None))[0]
            known = scripted_tasks(plan_file)
            for t in tasks:
                if t.strip() not in known:
                    raise ValueError(f"task {t[:60]!r} is not in the scripted set: the scripted backend replays "
                                     f"only the {len(known)} annotated tasks of {plan_file.name} "
                                     "(`--list_scripted_tasks` prints them); real models: --gin_file=agent/engine.gin")
        gens = agent_models(cfg)
        qa_backend = GeneratorQA(gens["qa"]) if "qa" in gens else None
        registry = build_registry(cfg.domain, **({"qa_backend": qa_backend} if qa_backend else {}))
    except ValueError as e:  # gin appends "In call to configurable ..." lines
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(first) from None
    no_qa = "QA" in registry and registry.get("QA").backend is None
    runner = EpisodeRunner(gens, lambda i: (Executor(registry), None), cfg, max_concurrent=args.max_concurrent)
    results = runner.run(tasks)
    colour = use_colour(args.no_color)
    for r in results:
        if args.quiet:
            print(r.answer)
        else:
            print(render_trace(r.trace.events, colour) + "\n")
    if args.trace_out:
        write_traces(Path(args.trace_out), [r.trace for r in results])
    if args.trace_dir:
        for i, r in enumerate(results):
            write_traces(Path(args.trace_dir) / f"episode_{i}.jsonl", [r.trace])
    if no_qa and any(r.answer is None for r in results):
        print("lumos-jax agent: no QA backend (set agent_models.qa_model or agent_tools.qa_endpoint), so every "
              "QA action failed and the answer is None", file=sys.stderr)
        return 1
    return 0 if all(r.ok for r in results) else 1
