"""bench/reproduce_small.py's trainings: the budget, compile accounting, one `train()` per model
and `--train_jobs` worker processes (split from the driver; see its docstring)."""

from __future__ import annotations

import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax

from bench.sides import CompileClock
from lumos_jax.atomic import write_atomic
from lumos_jax.config import parse_gin
from lumos_jax.jsonl import read_jsonl
from lumos_jax.tokenization import Tokenizer
from lumos_jax.training.loop import train

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[reproduce_small {datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# -- budget -----------------------------------------------------------------------------------

class Budget:
    """Wall-clock budget of the whole process, with estimates from what was measured: a
    training costs (seconds per byte of its JSONL) x its bytes, the slowest rate seen; an
    evaluation (seconds per question) x questions, of its kind ('lumos' or 'direct'), else of
    the other kind. Nothing measured yet: the item runs."""

    def __init__(self, total_s: float | None):
        self.t0, self.total = time.perf_counter(), total_s
        self.rates: dict[str, float] = {}

    def left(self) -> float:
        return float("inf") if self.total is None else self.total - (time.perf_counter() - self.t0)

    def measured(self, kind: str, seconds: float, amount: float) -> None:
        self.rates[kind] = max(self.rates.get(kind, 0.0), seconds / max(amount, 1e-9))

    def estimate(self, kind: str, amount: float) -> float:
        rate = self.rates.get(kind)
        if rate is None and kind in ("lumos", "direct"):
            rate = self.rates.get("direct" if kind == "lumos" else "lumos")
        return 0.0 if rate is None else rate * amount

    def fits(self, kind: str, amount: float) -> tuple[bool, float]:
        est = self.estimate(kind, amount)
        return est <= self.left(), est


COMPILES = CompileClock()  # each row and training says how much of its time was compiling
TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
_traced = [0.0]  # tracing + lowering seconds: paid per new shape even on a persistent-cache hit


def _on_trace(event: str, duration: float, **_) -> None:
    if event in TRACE_EVENTS:
        _traced[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_trace)


def compile_mark() -> dict:
    return {**COMPILES.read(), "trace_lower_s": _traced[0]}


def compiles_since(mark: dict) -> dict:
    now = compile_mark()
    return {"compiles": now["compiles"] - mark["compiles"], "compile_s": round(now["compile_s"] - mark["compile_s"], 1),
            "trace_lower_s": round(now["trace_lower_s"] - mark["trace_lower_s"], 1)}


# -- training ---------------------------------------------------------------------------------

def train_bindings(args, base: Path, data: Path, seed: int, run: Path) -> list[str]:
    vocab = Tokenizer(base, add_pad_token=True).vocab_size
    model_vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    b = {"BASE_MODEL_DIR": repr(str(base)), "model_config.hf_dir": repr(str(base)),
         "train.workdir": repr(str(run)), "train.init_from": repr(str(base)),
         "training_data.files": repr([str(data)]), "train.seed": seed, "training_data.seed": seed,
         "optimizer_settings.learning_rate": args.lr, "train.num_epochs": args.epochs,
         "train.global_batch": args.batch, "train.seq_len": args.seq_len,
         "training_data.max_seq_length": args.seq_len, "train.save_every": 100_000,
         "train.progress_bar": False, "train.log_every": 20, "train.max_steps": args.max_steps}
    overrides = {"vocab_size": vocab} if vocab > model_vocab else {}  # <pad> appended to its vocabulary
    if args.tiny:  # stories260K has 512 positions; a grounding conversation is ~800 of its tokens
        overrides["max_position_embeddings"] = 4096
        b.update({"model_config.dtype": "'float32'", "model_config.remat_policy": "'none'",
                  "train.log_every": 1})
    if overrides:
        b["model_config.overrides"] = repr(overrides)
    return [f"{k} = {v}" for k, v in b.items()]


def train_model(args, work: Path, base: Path, name: str, data: Path, seed: int, phases: dict) -> Path:
    """One `train()` in this process (gin reparsed for it); its state is dropped afterwards so
    the next training or engine gets the device memory."""
    run = work / "train" / f"{name}_seed{seed}"
    if (run / "model" / "config.json").exists():
        return run / "model"
    parse_gin(["runs/finetune_packed.gin", args.mesh], train_bindings(args, base, data, seed, run))
    log(f"train {name} seed {seed} on {data.name}")
    t0, compiled = time.perf_counter(), compile_mark()
    result = train()
    seconds = time.perf_counter() - t0
    steps, losses = result["step"], result["losses"]
    phases[f"train {name} seed {seed}"] = {
        "seconds": round(seconds, 1), "steps": steps,
        "final_loss": round(losses[max(losses)], 4) if losses else None,
        "step_time_s": _median_step_time(run), **compiles_since(compiled)}
    del result
    gc.collect()
    log(f"trained {name} seed {seed}: {steps} steps in {seconds:.1f}s")
    return run / "model"


def _median_step_time(run: Path) -> float | None:
    """Median `step_time_s` from the run's metrics log (compile excluded by the median)."""
    path = run / "logs" / "metrics.jsonl"
    if not path.exists():
        return None
    times = sorted(r["step_time_s"] for r in read_jsonl(path) if "step_time_s" in r)
    return round(times[len(times) // 2], 4) if times else None


# -- worker processes -------------------------------------------------------------------------

def trainings(items) -> list[tuple[str, str, str, int]]:
    """(method, module, data key, seed) of every training the (method, seed) items need, in order."""
    out = []
    for method, seed in items:
        if method == "cot":
            out.append((method, "model", "cot", seed))
        elif method in ("lumos_i", "lumos_o"):
            f = "iterative" if method == "lumos_i" else "onetime"
            out += [(method, "plan", f"plan_{f}", seed), (method, "ground", f"ground_{f}", seed)]
    return out


def model_done(work: Path, method: str, module: str, seed) -> bool:
    return (work / "train" / f"{method}_{module}_seed{seed}" / "model" / "config.json").exists()


def run_in_parallel(args, argv: list[str], work: Path, budget: Budget, phases: dict, data: dict,
                    items, script: Path, evals_done, on_eval_done) -> None:
    """Run the missing trainings and evaluations `args.jobs` processes at a time, each with
    1/jobs of the device memory (nothing preallocated): a `--train_one` worker per model, then
    an `--eval_one` worker per (method, seed) as soon as its models exist, so evaluations of
    finished methods overlap the remaining trainings. Work starts in priority order. A worker
    still running when the budget is spent is stopped (a training restarts next call; an
    evaluation resumes from its saved episodes). `evals_done(method, seed)` says an item has all
    its rows; `on_eval_done()` merges a finished evaluation's rows."""
    tasks = []  # (kind, key, worker argument, the models it needs): each item's trainings, then its eval
    for method, seed in items:
        needs = trainings([(method, seed)])
        tasks += [("train", t, ":".join(map(str, t)), []) for t in needs if not model_done(work, t[0], t[1], t[3])]
        if not evals_done(method, seed):
            tasks.append(("eval", (method, seed), f"{method}:{seed}", [(m, mod, s) for m, mod, _, s in needs]))
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / args.jobs:.3f}", "PYTHONPATH": str(REPO)}
    env.pop("XLA_CLIENT_MEM_FRACTION", None)
    failed: set = set()
    running: list = []
    t0, train_bytes = time.perf_counter(), 0
    while tasks or running:
        for task in list(tasks):
            if len(running) >= args.jobs or budget.left() <= 0:
                break
            kind, key, arg, needs = task
            if any((m, mod, s) in failed for m, mod, s in needs):
                tasks.remove(task)
                phases[f"eval {arg}"] = {"error": "a training it needs failed"}
                continue
            if not all(model_done(work, *n) for n in needs):
                continue
            tasks.remove(task)
            name = f"{kind}_{arg.replace(':', '_')}"
            cmd = [sys.executable, str(script)] + argv + [f"--{kind}_one", arg]
            log_file = open(work / f"{name}.log", "w")
            proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
            running.append((proc, kind, key, name, time.perf_counter()))
            if kind == "train":
                train_bytes += data[key[2]].stat().st_size
            log(f"started {name} (pid {proc.pid}, {len(running)} running)")
        if budget.left() <= 0 and not running:
            break
        time.sleep(2)
        for entry in list(running):
            proc, kind, key, name, start = entry
            if proc.poll() is None and budget.left() > 0:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            running.remove(entry)
            if kind == "train":
                method, module, _, seed = key
                record = work / "train" / f"{method}_{module}_seed{seed}" / "phase.json"
                label = f"train {method}_{module} seed {seed}"
                if proc.returncode == 0 and record.exists():
                    phases[label] = {**json.loads(record.read_text()), "parallel_jobs": args.jobs}
                else:
                    failed.add((method, module, seed))
                    phases[label] = {"error": f"worker exited with {proc.returncode}", "log": str(work / f"{name}.log")}
            else:
                if proc.returncode != 0:
                    phases[f"eval {key[0]} seed {key[1]}"] = {"error": f"worker exited with {proc.returncode}",
                                                              "log": str(work / f"{name}.log")}
                on_eval_done()
            log(f"{name}: rc {proc.returncode} after {time.perf_counter() - start:.0f}s")
    if train_bytes:  # the in-process estimate, should a training be left to do
        budget.measured("train", time.perf_counter() - t0, train_bytes)
    phases["parallel_s"] = round(time.perf_counter() - t0, 1)


def train_one(args, work: Path, base: Path, data: dict) -> int:
    method, module, key, seed = args.train_one.split(":")
    phases: dict = {}
    train_model(args, work, base, f"{method}_{module}", data[key], int(seed), phases)
    run = work / "train" / f"{method}_{module}_seed{seed}"
    write_atomic(run / "phase.json", json.dumps(next(iter(phases.values()), {})))
    return 0
