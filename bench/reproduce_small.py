"""Small-scale reproduction of the paper's maths comparison, from SmolLM2-135M-Instruct.

From one base model and the same GSM8K training rationales it trains
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
     then GSM8K)  2. base zero-shot  3. CoT seed 0  4. Lumos-O seed 0  5. Lumos-I seed 1, CoT seed 1.
`--jobs N` runs that work as N worker processes sharing the device (a training per model, an
evaluation per method as soon as its models exist; a 135M model keeps the GPU busy a fraction of
the time, so several overlap), then times Lumos-I seed 0 on GSM8K again with nothing else running
(`alone`, `eval_seconds`, `episodes_per_s`: issue 13's real-model figure). `--jobs 1` does it all
in this process, in order. `--budget_s` stops starting an item whose estimate, from the items
measured so far, does not fit in what is left (with --jobs: stops the workers when it is spent);
skipped items are listed in the output. Every stage resumes (a finished model, or an
evaluation's finished episodes, in --workdir are reused). After every row and training, `--out`
(default bench/results/reproduce_small.json) is rewritten:
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
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from bench.reproduce_agents import LumosAgents, direct_agents, engine_counters  # noqa: E402
from bench.reproduce_training import (Budget, compile_mark, compiles_since, log, model_done,  # noqa: E402
                                      run_in_parallel, train_model, train_one)
from lumos_jax.atomic import atomic_path, write_atomic  # noqa: E402
from lumos_jax.checkpoints.convert import main as convert  # noqa: E402
from lumos_jax.cli import main as lumos_cli  # noqa: E402
from lumos_jax.config import parse_gin  # noqa: E402
from lumos_jax.evaluation.experiment import eval_experiment, run_experiment  # noqa: E402
from lumos_jax.jsonl import read_jsonl  # noqa: E402

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ASSETS = REPO / "lumos_jax" / "assets"
EVAL_FILES = {"gsm8k": "gsm8k_test.jsonl", "svamp": "svamp_test.json"}
DATASET_SIZE = {"gsm8k": 1319, "svamp": 1000}
# SVAMP first: its episodes (2 rounds) compile the engine's shape buckets, so the GSM8K run that
# follows is timed mostly without compilation.
DATASET_ORDER = ("svamp", "gsm8k")
MARK = re.compile(r"<<[^>]*>>")


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
    p.add_argument("--jobs", "--train_jobs", dest="jobs", type=int, default=1,
                   help="worker processes at once, each with 1/jobs of the device: a training per model, then an "
                        "evaluation per method as soon as its models exist (a 135M model leaves the GPU idle while "
                        "its host works: several overlap); 1: everything in this process, in order")
    p.add_argument("--train_one", help=argparse.SUPPRESS)  # METHOD:MODULE:DATA_KEY:SEED, a --jobs worker
    p.add_argument("--eval_one", help=argparse.SUPPRESS)  # METHOD:SEED, a --jobs worker
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
    if args.jobs > 1:  # the workers share the device with this process
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    budget = Budget(args.budget_s)
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    if args.prepare_only:
        training_files(args, work)
        return 0
    phases: dict = {}
    t0 = time.perf_counter()
    base = base_model(args, work)
    phases["base_model"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    data = training_files(args, work)
    phases["training_data"] = round(time.perf_counter() - t0, 1)
    if args.train_one:
        return train_one(args, work, base, data)
    if args.eval_one:
        method, seed = args.eval_one.split(":")
        return eval_one(args, work, base, data, budget, method, None if seed == "None" else int(seed))
    items = plan_items(args)
    rows: list[dict] = []
    skipped: list[str] = []

    def save():
        write(args, rows, phases, skipped)

    if args.jobs > 1:
        def merge():
            rows[:], got = merged_rows(work, items)
            phases.update(got)
            save()
        run_in_parallel(args, argv, work, budget, phases, data, items, Path(__file__).resolve(),
                        lambda m, s: item_done(work, m, s), merge)
        merge()
        skipped += [f"{m} seed {s}: not finished in the budget" for m, s in items if not item_done(work, m, s)]
        time_alone(args, work, base, budget, rows, phases, skipped)
    else:
        for method, seed in items:
            evaluate_item(args, work, base, data, budget, method, seed, rows, phases, skipped, save)
    save()
    log(f"wrote {args.out}; skipped: {skipped or 'nothing'}")
    return 0


def item_rows_path(work: Path, method: str, seed) -> Path:
    return work / "rows" / f"{method}_seed{seed}.json"


def item_done(work: Path, method: str, seed) -> bool:
    path = item_rows_path(work, method, seed)
    return path.exists() and len(json.loads(path.read_text())["rows"]) == len(DATASET_ORDER)


def merged_rows(work: Path, items) -> tuple[list[dict], dict]:
    """The eval workers' rows in priority order, and their phases."""
    rows, phases = [], {}
    for method, seed in items:
        path = item_rows_path(work, method, seed)
        if path.exists():
            got = json.loads(path.read_text())
            rows += got["rows"]
            phases.update(got["phases"])
    return rows, phases


def eval_one(args, work: Path, base: Path, data: dict, budget: Budget, method: str, seed) -> int:
    """An `--eval_one` worker: one (method, seed) on every dataset, its rows saved after each
    (in `work/rows/`) for the driver to merge. The KV pool is capped to half of this process's
    share of the device."""
    limit = jax.devices()[0].memory_stats() or {}
    if limit.get("bytes_limit"):
        args.kv_gb = min(args.kv_gb, round(0.5 * limit["bytes_limit"] / 2**30, 2))
    rows: list[dict] = []
    phases: dict = {}
    skipped: list[str] = []
    path = item_rows_path(work, method, seed)

    def save():
        write_atomic(path, json.dumps({"rows": rows, "phases": phases, "skipped": skipped}, indent=1) + "\n")

    evaluate_item(args, work, base, data, budget, method, seed, rows, phases, skipped, save, jobs=args.jobs)
    return 0


def evaluate_item(args, work: Path, base: Path, data: dict, budget: Budget, method: str, seed, rows: list,
                  phases: dict, skipped: list, save, jobs: int = 1) -> None:
    """Train what (method, seed) needs (in this process, unless a worker did) and evaluate it on
    every dataset, appending a row per dataset and calling `save()` after each."""
    kind = "direct" if method in ("base", "cot") else "lumos"
    if method == "base":
        models = [base]
    elif method == "cot":
        models = trained(args, work, base, data, budget, method, seed, [("model", "cot")], phases, skipped, save)
    else:
        formulation = "iterative" if method == "lumos_i" else "onetime"
        models = trained(args, work, base, data, budget, method, seed,
                         [("plan", f"plan_{formulation}"), ("ground", f"ground_{formulation}")], phases, skipped, save)
    if models is None:
        return
    parse_gin([args.mesh], eval_bindings(args))
    t = time.perf_counter()
    if kind == "lumos":
        agents = LumosAgents(args, base, formulation, *models, first=DATASET_ORDER[0]).for_dataset
    else:
        agents = direct_agents(args, models[0], base, chat_template=method == "base")
    phases[f"load {method}" + ("" if seed is None else f" seed {seed}")] = round(time.perf_counter() - t, 1)
    for dataset in DATASET_ORDER:
        n = args.limit or DATASET_SIZE[dataset]
        fits, est = budget.fits(kind, n)
        if not fits:
            skipped.append(f"{method} seed {seed} {dataset} (estimate {est:.0f}s, {budget.left():.0f}s left)")
            continue
        name = f"{method}_seed{seed}_{dataset}" if seed is not None else f"{method}_{dataset}"
        row = eval_row(args, work, name, dataset, agents(dataset), budget, kind)
        rows.append({"method": "base_zero_shot" if method == "base" else method, "dataset": dataset, "seed": seed,
                     **row, "concurrent_jobs": jobs})
        if method == "lumos_i" and dataset == "gsm8k":  # issue 13's real-model figure
            rows[-1].update(timing_fields(rows[-1]))
        save()
    gc.collect()


def eval_row(args, work: Path, name: str, dataset: str, agent, budget: Budget, kind: str) -> dict:
    """Evaluate one agent on one dataset: score, n, seconds, compiles and the engines' counters."""
    before, compiled = engine_counters(agent), compile_mark()
    s = evaluate(args, work, name, dataset, agent)
    counters = {k: v - before.get(k, 0) for k, v in engine_counters(agent).items()}
    seconds = s["timing"]["this_run_seconds"]
    if s["timing"]["examples_this_run"]:
        budget.measured(kind, seconds, s["timing"]["examples_this_run"])
    row = {"score": round(s["score"], 2), "n": s["n"], "seconds": round(seconds, 1), **compiles_since(compiled),
           "examples_this_run": s["timing"]["examples_this_run"], "error_kinds": s["error_kinds"],
           "engine": counters}
    stats = getattr(agent, "last_stats", None)
    if stats is not None:
        row["runner"] = {k: getattr(stats, k) for k in ("max_live", "max_batch", "generate_calls", "tool_jobs")}
    return row


def timing_fields(row: dict) -> dict:
    warm = max(row["seconds"] - row["compile_s"] - row["trace_lower_s"], 1e-9)
    return {"eval_seconds": row["seconds"], "episodes_per_s": round(row["n"] / max(row["seconds"], 1e-9), 2),
            "eval_seconds_excluding_compile": round(warm, 1),
            "episodes_per_s_excluding_compile": round(row["n"] / warm, 2)}


def time_alone(args, work: Path, base: Path, budget: Budget, rows: list, phases: dict, skipped: list) -> None:
    """Issue 13's real-model figure, timed with nothing else on the device: Lumos-I seed 0 on all
    of GSM8K again, in this process, after the parallel work (its programs come from the
    persistent compilation cache). Recorded as `alone` in that row."""
    seed = args.seeds[0]
    row = next((r for r in rows if r["method"] == "lumos_i" and r["dataset"] == "gsm8k" and r["seed"] == seed), None)
    if row is None or "alone" in row:
        return
    fits, est = budget.fits("lumos", args.limit or DATASET_SIZE["gsm8k"])
    if not fits:
        skipped.append(f"lumos_i seed {seed} gsm8k timed alone (estimate {est:.0f}s, {budget.left():.0f}s left)")
        return
    plan, ground = (work / "train" / f"lumos_i_{m}_seed{seed}" / "model" for m in ("plan", "ground"))
    shutil.rmtree(work / "eval" / f"lumos_i_seed{seed}_gsm8k_alone", ignore_errors=True)  # timed whole, not resumed
    parse_gin([args.mesh], eval_bindings(args))
    t = time.perf_counter()
    agents = LumosAgents(args, base, "iterative", plan, ground, first="gsm8k").for_dataset
    load_s = round(time.perf_counter() - t, 1)
    alone = eval_row(args, work, f"lumos_i_seed{seed}_gsm8k_alone", "gsm8k", agents("gsm8k"), budget, "lumos")
    alone.update(timing_fields(alone), load_s=load_s)
    row["alone"] = alone
    row.update({k: alone[k] for k in timing_fields(alone)})
    phases["lumos_i gsm8k timed alone"] = {"seconds": alone["seconds"], "score": alone["score"]}
    path = item_rows_path(work, "lumos_i", seed)  # kept with the worker's rows for a resumed call
    got = json.loads(path.read_text())
    got["rows"] = [row if (r["dataset"], r["seed"]) == ("gsm8k", seed) else r for r in got["rows"]]
    write_atomic(path, json.dumps(got, indent=1) + "\n")


def trained(args, work: Path, base: Path, data: dict, budget: Budget, method: str, seed, files, phases: dict,
            skipped: list, save) -> list[Path] | None:
    """The models of (method, seed), trained here if missing and the budget allows."""
    models = []
    for module, key in files:
        fits, est = budget.fits("train", data[key].stat().st_size)
        done = model_done(work, method, module, seed)
        if not fits and not done:
            skipped.append(f"{method} seed {seed}: training {module} (estimate {est:.0f}s, {budget.left():.0f}s left)")
            save()
            return None
        t = time.perf_counter()
        models.append(train_model(args, work, base, f"{method}_{module}", data[key], seed, phases))
        if not done:
            budget.measured("train", time.perf_counter() - t, data[key].stat().st_size)
        save()
    return models


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
