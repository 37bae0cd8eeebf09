"""The released Lumos checkpoints, the reference's evaluation settings and the paper's numbers.

`gin/experiments/eval/lumos_*.gin` is generated from this table (`python -m
lumos_jax.evaluation.catalogue --write`); a test checks the files are current. Each file is
the shared recipe (`released_checkpoints.gin`, hand-written) and its experiment's macros.

Sources: checkpoint list from the reference README (`ai2lumos/…` on the HF hub, 7B and the
`-13B` variants); max rounds from the loops of `eval/*/run_eval.py` (GSM8K `range(16)` = 8
plan/ground rounds, SVAMP `range(4)` = 2, StrategyQA/HotpotQA/WebShop `range(10)` = 5,
Mind2Web 15); subsets from the scripts (first 300 StrategyQA, first 1,000 HotpotQA, first 500
WebShop instructions); paper numbers (7B) from LUMOS_SPEC §5. Numbers the spec does not give
are left out (shown as n/a) rather than guessed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import gin.config
import gin.config_parser

# dataset -> (domain of the agent, metric, max rounds, reference subset size)
DATASETS = {
    "gsm8k": ("maths", "numeric_match", 8, None),
    "svamp": ("maths", "numeric_match", 2, None),
    "strategyqa": ("complex_qa", "yes_no", 5, 300),
    "hotpotqa": ("complex_qa", "squad", 5, 1000),
    "mind2web": ("web_agent", "mind2web_step_sr", 15, None),
    "webshop": ("webshop", "webshop_reward", 5, 500),
}

# Released checkpoint pairs: (task family, formulation, size) -> datasets it is evaluated on.
RELEASED = {
    ("maths", "iterative", "7b"): ("gsm8k", "svamp"),
    ("maths", "onetime", "7b"): ("gsm8k", "svamp"),
    ("maths", "onetime", "13b"): ("gsm8k", "svamp"),
    ("complex_qa", "iterative", "7b"): ("strategyqa", "hotpotqa"),
    ("complex_qa", "iterative", "13b"): ("strategyqa", "hotpotqa"),
    ("complex_qa", "onetime", "7b"): ("strategyqa", "hotpotqa"),
    ("web_agent", "iterative", "7b"): ("mind2web",),
    ("web_agent", "iterative", "13b"): ("mind2web",),
    ("unified", "iterative", "7b"): ("gsm8k", "svamp", "strategyqa", "hotpotqa", "mind2web", "webshop"),
    ("unified", "iterative", "13b"): ("gsm8k", "svamp", "strategyqa", "hotpotqa", "mind2web", "webshop"),
}

# (family, formulation, size, dataset) -> (paper number, note)
PAPER = {
    ("maths", "onetime", "7b", "gsm8k"): (50.5, ""),
    ("maths", "iterative", "7b", "gsm8k"): (47.1, ""),
    ("maths", "onetime", "7b", "svamp"): (65.5, ""),
    ("maths", "iterative", "7b", "svamp"): (63.6, ""),
    ("complex_qa", "iterative", "7b", "strategyqa"): (65.7, "paper's QA tool: GPT-3.5 (72.4 with GPT-4)"),
    ("complex_qa", "iterative", "7b", "hotpotqa"): (29.4, "paper's QA tool: GPT-3.5 (36.0 with GPT-4)"),
    ("web_agent", "iterative", "7b", "mind2web"): (27.6, "paper: Mind2Web test splits"),
    ("unified", "iterative", "7b", "webshop"): (39.8, "Lumos-I-All, unseen task"),
}


@dataclass(frozen=True)
class Experiment:
    family: str
    formulation: str
    size: str
    dataset: str

    @property
    def name(self) -> str:
        return f"lumos_{self.family}_{self.formulation}_{self.size}_{self.dataset}"

    def hub_name(self, module: str) -> str:
        suffix = "-13B" if self.size == "13b" else ""
        return f"lumos_{self.family}_{module}_{self.formulation}{suffix}"


def experiments() -> list[Experiment]:
    return [Experiment(f, form, size, ds) for (f, form, size), dss in RELEASED.items() for ds in dss]


def gin_literal(value) -> str:
    """`value` as gin source text. Parsed back before it is written, so a quote in a note
    (`paper's QA tool`) can never end a string early and break the generated file."""
    text = repr(value)
    parser = gin.config_parser.ConfigParser(f"_.v = {text}\n", gin.config.ParserDelegate())
    parsed = [stmt.value for stmt in parser]
    if parsed != [value]:
        raise ValueError(f"catalogue: {value!r} does not round-trip as a gin literal (got {parsed!r})")
    return text


def _binding(key: str, value) -> str:
    return f"{key} = {gin_literal(value)}"


BASE_GIN = "experiments/eval/released_checkpoints.gin"  # the recipe every experiment shares


def gin_text(exp: Experiment) -> str:
    """The experiment's file: the shared recipe (BASE_GIN) and this experiment's macros."""
    domain, metric, rounds, subset = DATASETS[exp.dataset]
    paper, note = PAPER.get((exp.family, exp.formulation, exp.size, exp.dataset), (None, ""))
    data_path = {"mind2web": "data/mind2web/test_domain", "webshop": "data/webshop/goals.json"}
    lines = [
        f"# {exp.name}: released ai2lumos checkpoints {exp.hub_name('plan')} + {exp.hub_name('ground')}",
        f"# on {exp.dataset} with the reference's settings. Download both HF directories first, e.g.",
        f"#   huggingface-cli download ai2lumos/{exp.hub_name('plan')} --local-dir checkpoints/{exp.hub_name('plan')}",
        "# then: lumos-jax eval --gin_file=experiments/eval/" + exp.name + ".gin",
        "# (override paths with --gin.PLANNER=\"'...'\" / --gin.GROUNDER). Generated by",
        "# lumos_jax/evaluation/catalogue.py; edit that file, not this one.",
        f"include '{BASE_GIN}'",
        "",
        _binding("NAME", exp.name),
        _binding("DATASET", exp.dataset),
        _binding("LIMIT", subset),
        _binding("PAPER_SCORE", paper),
        _binding("PAPER_NOTE", note),
        _binding("OUTPUT_DIR", f"runs/eval/{exp.name}"),
        _binding("PLANNER", f"checkpoints/{exp.hub_name('plan')}"),
        _binding("GROUNDER", f"checkpoints/{exp.hub_name('ground')}"),
        _binding("FORMULATION", exp.formulation),
        _binding("MAX_ROUNDS", rounds),
    ]
    if exp.dataset in data_path:
        lines.append(_binding("eval_experiment.data_path", data_path[exp.dataset]))
    if domain == "complex_qa":
        lines += ["# The paper's QA tool was GPT-3.5/4: point this at an HF dir (our model answers), or set",
                  "# agent_tools.qa_endpoint to an OpenAI-compatible URL.",
                  _binding("lumos_agent.qa_model_path", None)]
    lines.append("")
    return "\n".join(lines)


CATALOGUE_DIR = Path(__file__).resolve().parents[2] / "gin" / "experiments" / "eval"


def write_catalogue(directory: Path = CATALOGUE_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for exp in experiments():
        path = directory / f"{exp.name}.gin"
        path.write_text(gin_text(exp), encoding="utf-8")
        out.append(path)
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        for p in write_catalogue():
            print(p)
    else:
        for e in experiments():
            print(e.name)
