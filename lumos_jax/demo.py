"""`lumos-jax demo`: the whole Lumos pipeline on a CPU in minutes, offline.

1. data: the bundled Lumos maths annotations plus the bundled GSM8K training rationales,
   converted into Lumos-I plan/ground conversations by the data pipeline's GSM8K converter;
2. training: a tiny planner and a tiny grounder (Llama architecture, random init, the bundled
   512-piece stories260K tokenizer + `<pad>`), each trained by the real sharded trainer, saved
   as orbax checkpoints;
3. agent: Lumos-I on the first GSM8K test questions with the real offline tools (sympy
   Calculator & co.), many episodes batched through the inference engine;
4. evaluation: the resumable runner writes predictions (with traces), summary, table, plot;
   the demo prints one trace and the score table beside the paper's number.

The score of a model this small trained this briefly is near zero; every part is real. With a
real checkpoint on a GPU/TPU, `lumos-jax eval --gin_file=experiments/eval/<model>_<task>.gin`
runs the same agent and runner (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from lumos_jax.agent.cli import render_trace, use_colour
from lumos_jax.assets import ASSETS_DIR
from lumos_jax.config import parse_args, parse_gin
from lumos_jax.data.gsm8k import convert_file
from lumos_jax.data.reference_conversion import convert_rows
from lumos_jax.evaluation.datasets import read_gsm8k
from lumos_jax.evaluation.lumos_adapter import lumos_agent
from lumos_jax.evaluation.report import detail_tables, markdown_table
from lumos_jax.evaluation.runner import evaluate
from lumos_jax.jsonl import read_jsonl
from lumos_jax.tokenization import Tokenizer
from lumos_jax.training.loop import train

ASSETS = ASSETS_DIR
DEMO_DATA = ASSETS / "demo_data"
TOKENIZER = ASSETS / "stories260k"


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare_data(out_dir: Path, train_examples: int) -> dict[str, list[str]]:
    """Training files per module: bundled annotations + converted GSM8K rationales."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, report = convert_file(DEMO_DATA / "gsm8k_train_500.jsonl")
    rows = rows[:train_examples]
    _say(f"data: GSM8K rationales converted {report.converted}/{report.total} "
         f"(executed by {report.executor.rsplit('.', 1)[-1]}: {report.executed}); using {len(rows)}")
    files = {}
    for module in ("plan", "ground"):
        lines, stats = convert_rows(rows, "maths", module, "iterative")
        path = out_dir / f"gsm8k_{module}_iterative.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        bundled = DEMO_DATA / "annotations" / f"lumos_maths_{module}_iterative.jsonl"
        files[module] = [str(bundled), str(path)]
        _say(f"data: {module}: {stats.written} GSM8K conversations + "
             f"{sum(1 for _ in open(bundled))} bundled annotations")
    return files


def demo_bindings(files: list[str], lr: float, vocab_size: int) -> list[str]:
    """gin for the demo's trainer: tiny model, bundled tokenizer, the data pipeline, data-parallel."""
    return [
        "model_config.preset = 'tiny'",
        # the `tiny` preset (2 layers, 4 heads / 2 KV heads) widened to 128: at 64 the grounder
        # rarely writes a well-formed action within the demo's budget
        f"model_config.overrides = {{'vocab_size': {vocab_size}, 'max_position_embeddings': 4096, "
        "'hidden_size': 128, 'intermediate_size': 344, 'head_dim': 32}",
        f"training_data.files = {files!r}",
        f"training_data.tokenizer = {str(TOKENIZER)!r}",
        "training_data.source = 'pipeline'",
        "training_data.packing = True",
        f"optimizer_settings.learning_rate = {lr}",
        "optimizer_settings.warmup_ratio = 0.1",
        "make_mesh.data = -1", "make_mesh.fsdp = 1", "make_mesh.tensor = 1",  # every local device
    ]


def train_module(module: str, files: list[str], workdir: Path, steps: int, batch: int, seq_len: int,
                 lr: float, user_bindings: Sequence[str]) -> Path:
    """Train one module from scratch; returns its lumos-jax checkpoint (tokenizer included).

    Checkpoints every ~tenth of the stage, so an interrupted stage (ctrl-C) resumes there."""
    vocab = Tokenizer(TOKENIZER, add_pad_token=True).vocab_size
    parse_gin([], demo_bindings(files, lr, vocab) + list(user_bindings))
    t0 = time.perf_counter()
    result = train(workdir=str(workdir / module), seq_len=seq_len, global_batch=batch, max_steps=steps,
                   save_every=max(1, steps // 10), keep_checkpoints=1, log_every=max(1, steps // 20),
                   progress_bar=True)
    losses = result["losses"]
    trained = (f"loss {losses[min(losses)]:.2f} -> {losses[max(losses)]:.2f}" if losses
               else f"already trained to step {result['step']} (resumed)")
    out = workdir / module / "model"  # train's final export (train.export_native), with the tokenizer
    _say(f"train {module}: {steps} steps in {time.perf_counter() - t0:.0f}s, {trained}; "
         f"orbax checkpoints in {workdir / module / 'checkpoints'}, model in {out}")
    return out


def run_agent(planner: Path, grounder: Path, out_dir: Path, num_questions: int, max_new_tokens: int,
              batch: int) -> dict:
    examples = read_gsm8k(DEMO_DATA / "gsm8k_test_50.jsonl")[:num_questions]
    # the checkpoints carry their tokenizer: no tokenizer path needed
    agent = lumos_agent(domain="maths", metric="numeric_match", default_max_rounds=8, examples=examples,
                        planner_path=str(planner), grounder_path=str(grounder),
                        prompt_style="train", max_new_tokens=max_new_tokens, backend="engine",
                        engine_slots=max(batch, 1), engine_max_len=3072)
    t0 = time.perf_counter()
    # a live count of finished episodes (tqdm shows nothing when stderr is not a terminal)
    bar = tqdm(total=len(examples), unit="episode", desc="agent", disable=None, dynamic_ncols=True)
    try:
        summary = evaluate(examples, agent, "numeric_match", out_dir, "gsm8k", concurrency=batch,
                           info={"experiment": "demo_tiny_lumos_i", "paper_score": 47.1,
                                 "paper_note": "paper: Lumos-I 7B, all 1,319 questions"},
                           on_batch=lambda done, total: bar.update(done - bar.n))
    finally:
        bar.close()
    _say(f"agent: Lumos-I on {len(examples)} GSM8K test questions in {time.perf_counter() - t0:.0f}s "
         f"(outputs in {out_dir})")
    return summary


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lumos-jax demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_out", help="data, checkpoints and eval outputs go here")
    parser.add_argument("--plan_steps", type=int, default=120, help="planner training steps")
    parser.add_argument("--ground_steps", type=int, default=200, help="grounder training steps (it "
                        "must learn the action syntax, so it gets more)")
    parser.add_argument("--steps", type=int, default=None, help="sets both --plan_steps and --ground_steps")
    parser.add_argument("--batch", type=int, default=4, help="training batch (conversations per step)")
    parser.add_argument("--seq_len", type=int, default=1024, help="training row length; the grounding "
                        "prompts take ~800 tokens of the 512-piece tokenizer, so keep it >= 1024")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--train_examples", type=int, default=500, help="GSM8K rationales to train on")
    parser.add_argument("--num_questions", type=int, default=20, help="GSM8K test questions (max 50 bundled)")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--no_color", action="store_true")
    args = parse_args(parser, argv)
    if not 1 <= args.num_questions <= 50:
        raise ValueError("--num_questions must be between 1 and 50 (50 test questions are bundled)")
    start = time.perf_counter()
    work = Path(args.workdir).absolute()
    files = prepare_data(work / "data", args.train_examples)
    steps = {"plan": args.steps or args.plan_steps, "ground": args.steps or args.ground_steps}
    models = {m: train_module(m, files[m], work, steps[m], args.batch, args.seq_len, args.lr,
                              args.gin_bindings) for m in ("plan", "ground")}
    summary = run_agent(models["plan"], models["ground"], work / "eval", args.num_questions,
                        args.max_new_tokens, batch=args.num_questions)
    records = read_jsonl(work / "eval" / "predictions.jsonl")
    def tool_calls_ok(r: dict) -> int:
        return sum(e["event"] == "action" and e.get("error_kind") is None for e in r["trace"])

    # show the most telling episode: a right answer, else one where tools really ran
    shown = max(records, key=lambda r: (r["correct"], tool_calls_ok(r), -r["rounds"]))
    print("\n--- one episode's trace " + "-" * 50)
    print(render_trace(shown["trace"], colour=use_colour(args.no_color)))
    print(f"gold: {shown['gold']}   correct: {shown['correct']}")
    print("\n--- score " + "-" * 64)
    print(markdown_table([summary]) + "\n" + detail_tables(summary))
    _say(f"done in {time.perf_counter() - start:.0f}s; plot: {work / 'eval' / 'plot.png'}")
    return 0
