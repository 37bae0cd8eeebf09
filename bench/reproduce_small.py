"""Small-scale reproduction of the paper's maths comparison, from SmolLM2-135M-Instruct.

From one base model and the same GSM8K training rationales it trains, in one process,
  Lumos-I: a planner + a grounder on the iterative conversations (`lumos-jax data convert gsm8k`),
  Lumos-O: a planner + a grounder on the one-time conversations,
  CoT:     one model on the rationales as plain answers (user: question; assistant: the rationale
           without its `<<...>>` marks, ending `#### N`): the paper's "CoT training",
and evaluates each on GSM8K test (1,319) and SVAMP (1,000), beside the base model zero-shot with
its own chat template. Lumos rows run the real agent (tools, the streaming `eval_experiment`
runner) under `--protocol` (default `reference`); CoT and base rows are scored by the same runner
on the number after `####` (else the last number of the answer).

Work runs in priority order, so a GPU call that ends early still has the rows that matter most:
  1. Lumos-I seed 0 (train plan + ground; SVAMP first, which also compiles the engine's programs,
     then GSM8K, timed alone: `eval_seconds`, `episodes_per_s`: issue 13's real-model figure)
  2. base zero-shot  3. CoT seed 0  4. Lumos-O seed 0  5. Lumos-I seed 1, CoT seed 1.
`--budget_s` stops starting an item (a training or an evaluation) whose estimate, from the items
measured so far, does not fit in what is left; skipped items are listed in the output. Every stage
resumes (a finished model or evaluation in --workdir is reused). After every row and training,
`--out` (default bench/results/reproduce_small.json) is rewritten:
`{"card","date","base_model","settings","rows":[{"method","dataset","seed","score","n","seconds"}],
"phases","skipped"}`.

Inputs (the GPU machine has no internet and no ../shared; bench/reproduce_small_gpu.md says what
to carry): --gguf or --gguf_parts (SmolLM2-135M-Instruct.Q4_1.gguf, sha256-checked),
--gsm8k_train (openai/grade-school-math train, 7,473 rows), --eval_data (gsm8k_test.jsonl and
svamp_test.json). `--tiny` checks the flow on CPU with the bundled stories260K model.

Training recipe (issue 15's run): 2 epochs, packed rows of 1024 tokens, batch 32, AdamW lr 1e-4,
3% warmup then linear decay, bf16 compute over fp32 weights (gin/runs/finetune_packed.gin), through
the public `train()`. Inference: bf16 weights and KV cache (`inference_dtypes`), one KV budget
(`--kv_gb`), `--concurrency` episodes in flight.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from bench.reproduce_agents import LumosAgents, direct_agents, engine_counters  # noqa: E402
from bench.sides import CompileClock  # noqa: E402
from lumos_jax.atomic import atomic_path, write_atomic  # noqa: E402
from lumos_jax.checkpoints.convert import main as convert  # noqa: E402
from lumos_jax.cli import main as lumos_cli  # noqa: E402
from lumos_jax.config import parse_gin  # noqa: E402
from lumos_jax.evaluation.experiment import eval_experiment, run_experiment  # noqa: E402
from lumos_jax.jsonl import read_jsonl  # noqa: E402
from lumos_jax.tokenization import Tokenizer  # noqa: E402
from lumos_jax.training.loop import train  # noqa: E402

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ASSETS = REPO / "lumos_jax" / "assets"
EVAL_FILES = {"gsm8k": "gsm8k_test.jsonl", "svamp": "svamp_test.json"}
DATASET_SIZE = {"gsm8k": 1319, "svamp": 1000}
# SVAMP first: its episodes (2 rounds) compile the engine's shape buckets, so the GSM8K run that
# follows is timed mostly without compilation.
DATASET_ORDER = ("svamp", "gsm8k")
MARK = re.compile(r"<<[^>]*>>")


def log(msg: str) -> None:
    print(f"[reproduce_small {datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# -- inputs -----------------------------------------------------------------------------------

def reassemble(parts: list[str], out: Path) -> Path:
    """Concatenate the GGUF's parts (sorted by name) and check the published sha256."""
    if not parts:
        raise SystemExit("--gguf_parts: no file matches")
    h = hashlib.sha256()
    with atomic_path(out) as tmp:  # a wrong checksum leaves no file behind
        with open(tmp, "wb") as f:
            for p in sorted(parts):
                data = Path(p).read_bytes()
                h.update(data)
                f.write(data)
        if h.hexdigest() != SHA256:
            raise SystemExit(f"--gguf_parts: sha256 {h.hexdigest()} is not the published {SHA256}")
    return out


def base_model(args, work: Path) -> Path:
    """An HF directory with the tokenizer beside the weights: the converted GGUF, or (--tiny)
    the bundled stories260K model."""
    if args.tiny:
        return ASSETS / "stories260k"
    out = work / "base"
    if (out / "config.json").exists():
        return out
    if args.gguf:
        gguf = Path(args.gguf)
    elif args.gguf_parts:
        gguf = reassemble(glob.glob(args.gguf_parts), work / "base.gguf")
    else:
        raise SystemExit("set --gguf or --gguf_parts (or --tiny)")
    convert([str(gguf), str(out)])
    return out


def training_files(args, work: Path) -> dict[str, Path]:
    """The Lumos conversations (`lumos-jax data convert gsm8k`) and the CoT conversations of
    the same problems."""
    out = work / "data"
    cot = out / "cot_gsm8k.jsonl"
    if not cot.exists() or not (out / "gsm8k_converted.jsonl").exists():
        source = Path(args.gsm8k_train) if args.gsm8k_train else ASSETS / "demo_data" / "gsm8k_train_500.jsonl"
        rows = list(read_jsonl(source))[: args.train_examples]
    if not (out / "gsm8k_converted.jsonl").exists():
        out.mkdir(parents=True, exist_ok=True)
        subset = out / "gsm8k_train_used.jsonl"
        subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if lumos_cli(["data", "convert", "gsm8k", "--input", str(subset), "--out", str(out)]):
            raise SystemExit("lumos-jax data convert gsm8k failed")
        subset.unlink()
    if not cot.exists():
        kept = {r["task"] for r in read_jsonl(out / "gsm8k_converted.jsonl")}
        lines = []
        for i, r in enumerate(x for x in rows if x["question"] in kept):
            rationale = MARK.sub("", r["answer"]).strip()
            msgs = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": rationale}]
            lines.append(json.dumps({"dataset": "gsm8k_cot", "id": f"gsm8k_cot_{i}", "messages": msgs}))
        cot.write_text("\n".join(lines) + "\n")
    files = {f"{m}_{f}": out / f"lumos_gsm8k_{m}_{f}.jsonl" for m in ("plan", "ground")
             for f in ("iterative", "onetime")}
    return {**files, "cot": cot}


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


# -- evaluation -------------------------------------------------------------------------------

def eval_bindings(args) -> list[str]:
    """Inference settings of every engine: bf16 weights and cache, one KV budget per model pair,
    a slot per episode in flight."""
    return [f"engine_settings.kv_memory_gb = {args.kv_gb}", f"engine_settings.num_slots = {args.concurrency}",
            f"engine_settings.max_len = {args.max_len}", f"engine_settings.steps_per_call = {args.steps_per_call}",
            f"engine_settings.max_prefill_tokens = {args.prefill_tokens}",
            f"engine_settings.precompile_threads = {args.precompile_threads}",
            "inference_dtypes.weights = 'bfloat16'", "inference_dtypes.compute = 'bfloat16'"]


def evaluate(args, work: Path, name: str, dataset: str, agent) -> dict:
    data = str(Path(args.eval_data) / EVAL_FILES[dataset]) if args.eval_data else None
    cfg = eval_experiment(name=name, dataset=dataset, agent_factory=lambda **_: agent, data_path=data,
                          limit=args.limit, output_dir=str(work / "eval" / name), protocol=args.protocol,
                          concurrency=args.concurrency)
    summary = run_experiment(cfg, progress=False)
    t = summary["timing"]
    log(f"{name}: {summary['score']:.2f} ({summary['correct']:.0f}/{summary['n']}) "
        f"in {t['this_run_seconds']:.1f}s ({t['examples_this_run']} run now)")
    return summary


# -- parallel training ------------------------------------------------------------------------

def trainings(args) -> list[tuple[str, str, str, int]]:
    """(method, module, data key, seed) of every training `plan_items` needs, in priority order."""
    out = []
    for method, seed in plan_items(args):
        if method == "cot":
            out.append((method, "model", "cot", seed))
        elif method in ("lumos_i", "lumos_o"):
            f = "iterative" if method == "lumos_i" else "onetime"
            out += [(method, "plan", f"plan_{f}", seed), (method, "ground", f"ground_{f}", seed)]
    return out


def train_in_parallel(args, argv: list[str], work: Path, budget: Budget, phases: dict, data: dict) -> None:
    """Run the missing trainings `args.train_jobs` at a time, each a `--train_one` process with
    1/jobs of the device memory (nothing preallocated); their phase records are merged into
    `phases`. A worker still running when the budget is spent is stopped (its model stays
    missing and its rows are skipped)."""
    todo = [t for t in trainings(args)
            if not (work / "train" / f"{t[0]}_{t[1]}_seed{t[3]}" / "model" / "config.json").exists()]
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / args.train_jobs:.3f}", "PYTHONPATH": str(REPO)}
    env.pop("XLA_CLIENT_MEM_FRACTION", None)
    running: list[tuple[subprocess.Popen, tuple, float]] = []
    t0, total_bytes = time.perf_counter(), 0
    while todo or running:
        while todo and len(running) < args.train_jobs:
            t = todo.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve())] + argv + ["--train_one", ":".join(map(str, t))]
            log_file = open(work / f"train_{t[0]}_{t[1]}_seed{t[3]}.log", "w")
            running.append((subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT), t,
                            time.perf_counter()))
            total_bytes += data[t[2]].stat().st_size
            log(f"training {t[0]} {t[1]} seed {t[3]} (pid {running[-1][0].pid})")
        time.sleep(2)
        for proc, t, start in list(running):
            if proc.poll() is None and budget.left() > 0:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            running.remove((proc, t, start))
            name = f"train {t[0]}_{t[1]} seed {t[3]}"
            record = work / "train" / f"{t[0]}_{t[1]}_seed{t[3]}" / "phase.json"
            if proc.returncode == 0 and record.exists():
                phases[name] = {**json.loads(record.read_text()), "parallel_jobs": args.train_jobs}
            else:
                phases[name] = {"error": f"worker exited with {proc.returncode}",
                                "log": str(work / f"train_{t[0]}_{t[1]}_seed{t[3]}.log")}
            log(f"{name}: rc {proc.returncode} after {time.perf_counter() - start:.0f}s")
    if total_bytes:  # what the in-process estimate sees if a training is still to do
        budget.measured("train", time.perf_counter() - t0, total_bytes)
    phases["parallel_training_s"] = round(time.perf_counter() - t0, 1)


def train_one(args, work: Path, base: Path, data: dict) -> int:
    method, module, key, seed = args.train_one.split(":")
    phases: dict = {}
    train_model(args, work, base, f"{method}_{module}", data[key], int(seed), phases)
    run = work / "train" / f"{method}_{module}_seed{seed}"
    write_atomic(run / "phase.json", json.dumps(next(iter(phases.values()), {})))
    return 0


# -- driver -----------------------------------------------------------------------------------

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/reproduce_small")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "reproduce_small.json"))
    p.add_argument("--gguf"), p.add_argument("--gguf_parts", help="glob of the GGUF's parts, in name order")
    p.add_argument("--gsm8k_train"), p.add_argument("--eval_data", help="default $LUMOS_EVAL_DATA")
    p.add_argument("--tiny", action="store_true", help="CPU check: stories260K, a few steps and questions")
    p.add_argument("--budget_s", type=float, help="start no item whose estimate exceeds what is left")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of Lumos-I and CoT")
    p.add_argument("--methods", nargs="+", default=["lumos_i", "base", "cot", "lumos_o"])
    p.add_argument("--protocol", default="reference", choices=["reference", "robust"])
    p.add_argument("--prompt_style", default="reference", choices=["reference", "train"])
    p.add_argument("--lr", type=float, default=1e-4), p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch", type=int, default=32), p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--max_steps", type=int, help="cap on steps per training (default: the epochs')")
    p.add_argument("--mesh", default="mesh/single_device.gin")
    p.add_argument("--train_examples", type=int, help="first N GSM8K training problems (default all)")
    p.add_argument("--limit", type=int, help="first N questions of each test set (default all)")
    p.add_argument("--max_new_tokens", type=int, default=512, help="per planner/grounder turn")
    p.add_argument("--cot_max_new_tokens", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=512, help="episodes in flight (engine slots)")
    p.add_argument("--max_len", type=int, default=4096, help="longest sequence of a slot (paged: no reservation)")
    p.add_argument("--kv_gb", type=float, default=48.0, help="KV pool GiB, all engines of a model pair")
    p.add_argument("--prefill_tokens", type=int, default=32768, help="most tokens per prefill call")
    p.add_argument("--steps_per_call", type=int, default=16, help="decode steps per device call")
    p.add_argument("--cache_dir", default="/tmp/jax_cache", help="persistent compilation cache")
    p.add_argument("--precompile_threads", type=int, default=4,
                   help="engine programs compiled ahead in this many threads (engine_settings.precompile_threads)")
    p.add_argument("--train_jobs", type=int, default=1,
                   help="trainings run at once, each in its own process (a 135M training leaves the GPU idle "
                        "while its host works: several overlap); then the evaluations, in this process")
    p.add_argument("--train_one", help=argparse.SUPPRESS)  # METHOD:MODULE:DATA_KEY:SEED, a --train_jobs worker
    p.add_argument("--prepare_only", action="store_true",
                   help="only convert the training data into WORKDIR/data (to carry it to the GPU machine)")
    args = p.parse_args(argv)
    if args.tiny:
        for k, v in dict(train_examples=12, limit=2, batch=2, max_new_tokens=12, cot_max_new_tokens=12,
                         concurrency=4, max_len=1024, kv_gb=0.05, max_steps=2).items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    shared_eval = REPO.parent / "shared" / "data" / "eval"
    if not args.eval_data and not os.environ.get("LUMOS_EVAL_DATA") and shared_eval.is_dir():
        args.eval_data = str(shared_eval)
    return args


def plan_items(args) -> list[tuple[str, int | None]]:
    """(method, seed) in priority order."""
    order = [("lumos_i", args.seeds[0]), ("base", None), ("cot", args.seeds[0]), ("lumos_o", args.seeds[0])]
    order += [(m, s) for s in args.seeds[1:] for m in ("lumos_i", "cot")]
    return [(m, s) for m, s in order if m in args.methods]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.train_jobs > 1 and not args.train_one:  # the workers share the device with this process
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    budget = Budget(args.budget_s)
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    phases: dict = {}
    rows: list[dict] = []
    skipped: list[str] = []
    if args.prepare_only:
        training_files(args, work)
        return 0
    t0 = time.perf_counter()
    base = base_model(args, work)
    phases["base_model"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    data = training_files(args, work)
    phases["training_data"] = round(time.perf_counter() - t0, 1)
    if args.train_one:
        return train_one(args, work, base, data)
    if args.train_jobs > 1:
        train_in_parallel(args, argv, work, budget, phases, data)
    n_eval = {d: args.limit or DATASET_SIZE[d] for d in DATASET_ORDER}

    def save():
        write(args, rows, phases, skipped)

    def trained(method, seed, files) -> list[Path] | None:
        models = []
        for module, key in files:
            fits, est = budget.fits("train", data[key].stat().st_size)
            done = (work / "train" / f"{method}_{module}_seed{seed}" / "model" / "config.json").exists()
            if not fits and not done:
                skipped.append(f"{method} seed {seed}: training {module} (estimate {est:.0f}s, "
                               f"{budget.left():.0f}s left)")
                save()
                return None
            t = time.perf_counter()
            models.append(train_model(args, work, base, f"{method}_{module}", data[key], seed, phases))
            if not done:
                budget.measured("train", time.perf_counter() - t, data[key].stat().st_size)
            save()
        return models

    for method, seed in plan_items(args):
        kind = "direct" if method in ("base", "cot") else "lumos"
        if method == "base":
            models = [base]
        elif method == "cot":
            models = trained(method, seed, [("model", "cot")])
        else:
            formulation = "iterative" if method == "lumos_i" else "onetime"
            models = trained(method, seed, [("plan", f"plan_{formulation}"), ("ground", f"ground_{formulation}")])
        if models is None:
            continue
        parse_gin([args.mesh], eval_bindings(args))
        t = time.perf_counter()
        if kind == "lumos":
            agents = LumosAgents(args, base, formulation, *models, first=DATASET_ORDER[0]).for_dataset
        else:
            agents = direct_agents(args, models[0], base, chat_template=method == "base")
        phases[f"load {method}" + ("" if seed is None else f" seed {seed}")] = round(time.perf_counter() - t, 1)
        agent = None
        for dataset in DATASET_ORDER:
            fits, est = budget.fits(kind, n_eval[dataset])
            if not fits:
                skipped.append(f"{method} seed {seed} {dataset} (estimate {est:.0f}s, {budget.left():.0f}s left)")
                continue
            name = f"{method}_seed{seed}_{dataset}" if seed is not None else f"{method}_{dataset}"
            agent = agents(dataset)
            before, compiled = engine_counters(agent), compile_mark()
            s = evaluate(args, work, name, dataset, agent)
            counters = {k: v - before.get(k, 0) for k, v in engine_counters(agent).items()}
            seconds = s["timing"]["this_run_seconds"]
            if s["timing"]["examples_this_run"]:
                budget.measured(kind, seconds, s["timing"]["examples_this_run"])
            row = {"method": "base_zero_shot" if method == "base" else method, "dataset": dataset,
                   "seed": seed, "score": round(s["score"], 2), "n": s["n"], "seconds": round(seconds, 1),
                   **compiles_since(compiled), "error_kinds": s["error_kinds"], "engine": counters}
            stats = getattr(agent, "last_stats", None)
            if stats is not None:
                row["runner"] = {k: getattr(stats, k) for k in ("max_live", "max_batch", "generate_calls",
                                                                 "tool_jobs")}
            if method == "lumos_i" and dataset == "gsm8k":  # issue 13's real-model figure
                warm = max(seconds - row["compile_s"] - row["trace_lower_s"], 1e-9)
                row.update(eval_seconds=round(seconds, 1), episodes_per_s=round(s["n"] / max(seconds, 1e-9), 2),
                           eval_seconds_excluding_compile=round(warm, 1),
                           episodes_per_s_excluding_compile=round(s["n"] / warm, 2))
            rows.append(row)
            save()
        del agents, agent
        gc.collect()
    log(f"wrote {args.out}; skipped: {skipped or 'nothing'}")
    return 0


def write(args, rows, phases, skipped):
    card = os.environ.get("LUMOS_CARD") or _card()
    out = {"card": card, "date": datetime.date.today().isoformat(),
           "base_model": "stories260K (--tiny)" if args.tiny else "SmolLM2-135M-Instruct",
           "settings": {k: getattr(args, k) for k in ("protocol", "prompt_style", "lr", "epochs", "batch",
                                                      "seq_len", "max_steps", "train_examples", "limit",
                                                      "seeds", "concurrency", "kv_gb", "budget_s")},
           "rows": rows, "phases": phases, "skipped": skipped}
    write_atomic(args.out, json.dumps(out, indent=1) + "\n")


def _card() -> str:
    d = jax.devices()[0]
    return f"{jax.device_count()} x {getattr(d, 'device_kind', d.platform)}"


if __name__ == "__main__":
    sys.exit(main())
