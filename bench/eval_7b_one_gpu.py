"""The catalogue's 7B GSM8K evaluation on one GPU, released-checkpoint layout, to completion.

Two separate random-weight Llama-2-7B-shape HF checkpoint directories (bf16 safetensors,
vocab 32,001, the Llama-2 tokenizer beside the weights) stand in for the released
`ai2lumos/lumos_maths_{plan,ground}_iterative`; then, unchanged but for the paths, the
limit and the concurrency:

    lumos-jax eval --gin_file=experiments/eval/lumos_maths_iterative_7b_gsm8k.gin \\
        --gin.lumos_agent.planner_path=... --gin.lumos_agent.grounder_path=... \\
        --gin.eval_experiment.limit=256 --gin.eval_experiment.concurrency=256

runs in this process (reference prompt and protocol, as the catalogue sets them). With random
weights the episodes are short (the planner's output rarely parses), but every one runs its
turns on the real 7B pair to the end. Writing the checkpoints (torch) and the evaluation
(JAX) are separate subprocesses. Output JSON: {"card", "date", "episodes", "seconds",
"peak_gb", ...}.

    python bench/eval_7b_one_gpu.py --out $OUT/eval_7b_one_gpu.json           # GPU
    python bench/eval_7b_one_gpu.py --tiny --out /tmp/eval_7b.json            # CPU check
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.agent_rollouts import DEFAULT_GSM8K, DEFAULT_TOKENIZER, compilation_cache  # noqa: E402
from bench.sides import CompileClock, emit, run_side, write_json  # noqa: E402

GIN = "experiments/eval/lumos_maths_iterative_7b_gsm8k.gin"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def hf_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """HF Llama tensor names -> shapes ((out, in) for projections)."""
    e, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, e), "model.norm.weight": (e,),
              "lm_head.weight": (config.vocab_size, e)}
    for n in range(config.num_hidden_layers):
        pre = f"model.layers.{n}."
        shapes.update({pre + "input_layernorm.weight": (e,), pre + "post_attention_layernorm.weight": (e,),
                       pre + "self_attn.q_proj.weight": (q, e), pre + "self_attn.k_proj.weight": (kv, e),
                       pre + "self_attn.v_proj.weight": (kv, e), pre + "self_attn.o_proj.weight": (e, q),
                       pre + "mlp.gate_proj.weight": (i, e), pre + "mlp.up_proj.weight": (i, e),
                       pre + "mlp.down_proj.weight": (e, i)})
    return shapes


def write_checkpoints(args) -> None:
    """Two HF directories of random bf16 weights (seeds 0, 1): each tensor drawn by torch
    (on the GPU when there is one) and written straight to safetensors shards with an
    index, no model built (a 7B HF model's init takes minutes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from lumos_jax.models import PRESETS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS["tiny" if args.tiny else "llama2_7b"]
    fields = {k: v for k, v in preset.to_hf_dict().items() if k not in ("torch_dtype", "dtype", "architectures")}
    fields.update(vocab_size=32001, pad_token_id=32000, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    if args.tiny:
        fields["max_position_embeddings"] = 4096
    config = LlamaConfig(**fields)
    shapes = hf_tensor_shapes(preset.replace(vocab_size=32001))
    for seed, name in enumerate(("lumos_maths_plan_iterative", "lumos_maths_ground_iterative")):
        out = Path(args.workdir) / name
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        gen = torch.Generator(device=device).manual_seed(seed)
        config.save_pretrained(out)
        weight_map, shard, shard_bytes, files = {}, {}, 0, []

        def flush():
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, out / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            files.append(fname)

        for key, shape in shapes.items():
            if key.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
                     * config.initializer_range).to(torch.bfloat16).cpu()
            shard[key] = t
            shard_bytes += t.numel() * 2
            if shard_bytes >= 4 * 2**30:
                flush()
                shard, shard_bytes = {}, 0
        if shard:
            flush()
        total = sum((out / f).stat().st_size for f in files)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        for f in TOKENIZER_FILES:
            if (Path(args.tokenizer) / f).exists():
                shutil.copy(Path(args.tokenizer) / f, out / f)
        emit(event="checkpoint", path=str(out), gb=round(total / 2**30, 2), seconds=round(time.perf_counter() - t0, 1))


def _sample_memory(dev, predictions: Path, every_s: float = 10.0, abort_s: float = 180.0) -> None:
    """Device memory and finished episodes every `every_s`; the first time neither has moved
    for a minute, every thread's Python stack goes to stdout (on 2026-12-01 the run sat at
    107.93 GiB with 9 episodes done for 5 minutes and the log could not say where); after
    `abort_s` without change the stacks are printed again and the process exits (a stalled
    run would otherwise spend the card's time until its cap)."""
    last, still, dumped = None, 0, False
    while True:
        time.sleep(every_s)
        m = dev.memory_stats() or {}
        done = len(predictions.read_text().splitlines()) if predictions.exists() else 0
        print(f"[memory] in use {m.get('bytes_in_use', 0) / 2**30:.2f} GiB, peak "
              f"{m.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB, largest alloc "
              f"{m.get('largest_alloc_size', 0) / 2**30:.2f} GiB; {done} episodes", flush=True)
        now = (m.get("bytes_in_use"), done)
        still = still + 1 if now == last else 0
        last = now
        if still >= 6 and not dumped:
            print("[stall] no memory or episode change for 60 s: thread stacks follow", flush=True)
            faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
            sys.stdout.flush()
            dumped = True
        if still * every_s >= abort_s:
            print(f"[stall] still no change after {abort_s:.0f} s: stacks again, then exit", flush=True)
            faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
            sys.stdout.flush()
            os._exit(3)


def run_eval(args) -> None:
    """`lumos-jax eval` in this process, then the device's peak memory and the summary."""
    import jax

    from lumos_jax.cli import main as cli

    compilation_cache()
    clock = CompileClock()
    # a failed generator call is logged with its traceback; device memory is sampled every 10 s
    logging.getLogger("lumos_jax.agent.runner").setLevel(logging.DEBUG)
    work = Path(args.workdir)
    threading.Thread(target=_sample_memory, args=(jax.devices()[0], work / "eval_out" / "predictions.jsonl"),
                     daemon=True).start()
    os.environ["LUMOS_EVAL_DATA"] = str(Path(args.gsm8k).parent)
    out = work / "eval_out"
    argv = ["eval", f"--gin_file={GIN}", "--overwrite", f"--output_dir={out}",
            f"--gin.lumos_agent.planner_path='{work / 'lumos_maths_plan_iterative'}'",
            f"--gin.lumos_agent.grounder_path='{work / 'lumos_maths_ground_iterative'}'",
            f"--gin.eval_experiment.limit={args.limit}", f"--gin.eval_experiment.concurrency={args.concurrency}",
            f"--gin.engine_settings.num_slots={args.slots}"] + [f"--gin.{b}" for b in args.gin]
    print("lumos-jax " + " ".join(argv), flush=True)
    shutil.rmtree(out, ignore_errors=True)  # a failed run must not report an earlier run's summary
    t0 = time.perf_counter()
    rc = cli(argv)
    seconds = time.perf_counter() - t0
    if not (out / "summary.json").exists():
        raise SystemExit(f"lumos-jax eval exited with {rc} and wrote no summary")
    summary = json.loads((out / "summary.json").read_text())
    dev = jax.devices()[0]
    peak = (dev.memory_stats() or {}).get("peak_bytes_in_use")
    emit(event="eval", rc=rc, device=str(dev.device_kind), episodes=summary["n"], seconds=round(seconds, 1),
         eval_loop_seconds=summary["timing"]["this_run_seconds"],
         peak_gb=round(peak / 2**30, 2) if peak else None, error_kinds=summary["error_kinds"],
         score=summary["score"], command="lumos-jax " + " ".join(argv), **clock.read())


def drive(args, argv) -> int:
    record = {"card": None, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "episodes": None,
              "seconds": None, "peak_gb": None, "events": [], "errors": []}

    def on_result(res: dict) -> None:
        record["events"].append(res)
        if res.get("event") == "eval":
            record.update(card=res["device"], episodes=res["episodes"], seconds=res["seconds"],
                          peak_gb=res["peak_gb"], command=res["command"])
        write_json(args.out, record)

    for phase, timeout in (("write", args.timeout_write), ("eval", args.timeout_eval)):
        err = run_side([sys.executable, __file__, "--phase", phase] + argv, REPO, timeout, on_result)
        if err:
            record["errors"].append({"phase": phase, **err})
            pred = Path(args.workdir) / "eval_out" / "predictions.jsonl"
            if phase == "eval" and pred.exists():  # what a killed run finished (each record on disk)
                record["episodes_finished_before_the_error"] = len(pred.read_text().splitlines())
            break
    write_json(args.out, record)
    print(json.dumps({k: record[k] for k in ("card", "episodes", "seconds", "peak_gb")}))
    return 1 if record["errors"] else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["write", "eval"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="/tmp/lumos_eval_7b")
    p.add_argument("--limit", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--slots", type=int, default=512, help="engine slots (block-table rows) per model")
    p.add_argument("--gin", action="append", default=[], help="extra gin binding, e.g. engine_settings.kv_memory_gb=80")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--gsm8k", default=DEFAULT_GSM8K)
    p.add_argument("--timeout_write", type=float, default=240)
    p.add_argument("--timeout_eval", type=float, default=420)
    p.add_argument("--tiny", action="store_true", help="tiny checkpoints on CPU, few questions")
    p.add_argument("--out", help="JSON results file")
    args = p.parse_args(argv)
    if args.tiny:
        args.limit, args.concurrency, args.slots = min(args.limit, 4), min(args.concurrency, 4), 8
        args.gin = args.gin + ["lumos_agent.max_new_tokens=8", "engine_settings.max_len=2048"]
    if args.phase == "write":
        write_checkpoints(args)
        return 0
    if args.phase == "eval":
        run_eval(args)
        return 0
    return drive(args, argv)


if __name__ == "__main__":
    sys.exit(main())
