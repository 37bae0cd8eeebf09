"""An evaluation experiment as gin configures it: dataset + subset + agent factory + outputs.

`eval_experiment` (gin) holds the settings; `run_experiment()` loads the data, builds the
agent with `agent_factory(domain=, metric=, default_max_rounds=, examples=)` (the factory's own
gin `max_rounds`, when bound, wins over the dataset's reference default) and runs it.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gin
from tqdm import tqdm

from lumos_jax.config import write_operative_config
from lumos_jax.evaluation import datasets as ds
from lumos_jax.evaluation.agents import ScriptedAgent
from lumos_jax.evaluation.catalogue import DATASETS
from lumos_jax.evaluation.datasets import Example
from lumos_jax.evaluation.runner import evaluate
from lumos_jax.evaluation.scoring import check_protocol
from lumos_jax.evaluation.tfds_source import read_tfds
from lumos_jax.evaluation.user_datasets import USER_READERS


# datasets beyond the catalogue's: (domain, metric, max rounds, reference subset)
EXTRA_DATASETS = {
    "hotpotqa_distractor": ("complex_qa", "squad", 5, None),
    "aokvqa": ("multimodal", "choice", 5, None),
    "scienceqa": ("multimodal", "choice", 5, None),
    "intercode_sql": ("sql", "sql_execution", 5, None),
}
ALL_DATASETS = {**DATASETS, **EXTRA_DATASETS}


@gin.configurable
def eval_data_dir(path: str | None = None) -> Path:
    """Where the reference-format eval files live (gsm8k_test.jsonl, ...): gin, else
    $LUMOS_EVAL_DATA. They are not bundled (only small samples are: `lumos-jax assets`)."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get("LUMOS_EVAL_DATA")
    if env:
        return Path(env).expanduser()
    raise ValueError("eval data: set $LUMOS_EVAL_DATA or --gin.eval_data_dir.path to the folder holding the "
                     "reference's data/eval files, or eval_experiment.data_path to one file")


def resolve_path(path: str | Path) -> Path:
    """A relative data path is relative to the current folder (like every other path)."""
    return Path(path).expanduser()


def load_dataset(name: str, data_path: str | Path | None = None, start: int = 0,
                 limit: int | None = None, reader_kwargs: dict | None = None, source: str = "files",
                 tfds_data_dir: str | None = None) -> list[Example]:
    """Examples of a named dataset, from `data_path` or the default file in eval_data_dir().

    source='tfds' reads GSM8K/SVAMP/StrategyQA/HotpotQA through the data pipeline's tfds
    builders (built once under `tfds_data_dir` from the files in eval_data_dir())."""
    if name not in ALL_DATASETS:
        raise ValueError(f"unknown eval dataset {name!r}; known: {', '.join(sorted(ALL_DATASETS))}")
    if source not in ("files", "tfds"):
        raise ValueError(f"eval_experiment.source={source!r}: expected 'files' or 'tfds'")
    if source == "tfds":
        manual = resolve_path(data_path).parent if data_path else eval_data_dir()
        examples = read_tfds(name, tfds_data_dir or str(Path("runs") / "tfds"), manual)
    elif name in ds.READERS:
        reader, filename = ds.READERS[name][0], ds.READERS[name][1]
        path = resolve_path(data_path) if data_path else eval_data_dir() / filename
        examples = reader(path)
    else:
        if not data_path:
            raise ValueError(f"dataset {name!r} is user-supplied: set eval_experiment.data_path "
                             "(see docs/evaluation.md for the expected format)")
        examples = USER_READERS[name](resolve_path(data_path), **(reader_kwargs or {}))
    return ds.select_subset(examples, start, limit)


@dataclass
class ExperimentConfig:
    name: str
    dataset: str
    agent_factory: Callable[..., Any]
    data_path: str | None
    start: int
    limit: int | None
    output_dir: str
    batch_size: int | None           # deprecated alias of concurrency (gin files still bind it)
    paper_score: float | None
    paper_note: str
    reader_kwargs: dict
    source: str = "files"
    tfds_data_dir: str | None = None
    protocol: str = "robust"
    concurrency: int | None = None   # episodes in flight at once (default 64)

    @property
    def domain(self) -> str:
        return ALL_DATASETS[self.dataset][0]

    @property
    def metric(self) -> str:
        return ALL_DATASETS[self.dataset][1]

    @property
    def max_rounds(self) -> int:
        return ALL_DATASETS[self.dataset][2]


@gin.configurable
def eval_experiment(name: str = gin.REQUIRED, dataset: str = gin.REQUIRED,
                    agent_factory: Callable[..., Any] = gin.REQUIRED, data_path: str | None = None,
                    start: int = 0, limit: int | None = None, output_dir: str | None = None,
                    batch_size: int | None = None, paper_score: float | None = None, paper_note: str = "",
                    reader_kwargs: dict | None = None, source: str = "files",
                    tfds_data_dir: str | None = None, protocol: str = "robust",
                    concurrency: int | None = None) -> ExperimentConfig:
    """`concurrency`: episodes in flight at once, streamed (no batches; `batch_size` is its
    deprecated name).
    `protocol`: 'reference' reproduces the reference's inference and scoring (numbers
    comparable with the paper); 'robust' is ours (errors as observations, numeric comparison,
    every tool run). docs/evaluation.md lists every difference."""
    check_protocol(protocol, "eval_experiment.protocol")
    if dataset not in ALL_DATASETS:
        raise ValueError(f"eval_experiment.dataset: unknown {dataset!r}; known: {', '.join(sorted(ALL_DATASETS))}")
    return ExperimentConfig(name, dataset, agent_factory, data_path, start, limit,
                            output_dir or f"runs/eval/{name}", batch_size, paper_score, paper_note,
                            dict(reader_kwargs or {}), source, tfds_data_dir, protocol, concurrency)


@gin.configurable
def scripted_agent(domain: str, metric: str, default_max_rounds: int, examples: list[Example],
                   kind: str = "oracle", protocol: str = "robust") -> Any:
    """Gold (`oracle`) or always-wrong answers without a model: for tests and smoke runs."""
    return ScriptedAgent(metric, kind)


def run_experiment(cfg: ExperimentConfig, output_dir: str | None = None, limit: int | None = None,
                   progress: bool = True) -> dict:
    """Load, build the agent, evaluate; the output folder gets `operative_config.gin` (the
    gin values the run used: written once the agent is built, again at the end)."""
    lim = cfg.limit if limit is None else limit
    out = Path(output_dir or cfg.output_dir)
    examples = load_dataset(cfg.dataset, cfg.data_path, cfg.start, lim, cfg.reader_kwargs,
                            cfg.source, cfg.tfds_data_dir)
    extra = {"protocol": cfg.protocol} if _accepts(cfg.agent_factory, "protocol") else {}
    agent = cfg.agent_factory(domain=cfg.domain, metric=cfg.metric, default_max_rounds=cfg.max_rounds,
                              examples=examples, **extra)
    write_operative_config(out)
    info = {"experiment": cfg.name, "paper_score": cfg.paper_score, "paper_note": cfg.paper_note,
            "subset": {"start": cfg.start, "limit": lim}}
    # finished episodes out of all (a resumed run starts at what is already done); tqdm shows
    # nothing when stderr is not a terminal
    bar = tqdm(total=len(examples), desc=cfg.name, unit="episode", disable=None if progress else True,
               dynamic_ncols=True)

    def show(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        summary = evaluate(examples, agent, cfg.metric, out, cfg.dataset, concurrency=cfg.concurrency,
                           batch_size=cfg.batch_size, info=info, on_batch=show, protocol=cfg.protocol)
    finally:
        bar.close()
    write_operative_config(out)
    return summary


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether a (gin-wrapped) agent factory takes `name`: user factories may predate it."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
