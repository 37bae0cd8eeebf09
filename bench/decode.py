"""Decode benchmark: our engine vs HF transformers `generate`, same card, same run.

Llama-2-7B shape, random weights, bf16, prompt 512, 128 new tokens, batch 1 / 16 / 64.
Each side runs in its own subprocess (an OOM or crash loses only that side); every figure
is printed as soon as it is measured and the JSON (`--out`) is rewritten after each one
(temp file + rename). `--tiny` runs the same code on a tiny model for a CPU check.

    python bench/decode.py --out $OUT/decode.json            # GPU
    python bench/decode.py --tiny --out /tmp/decode.json      # CPU smoke test

Figures per batch B (both sides measured the same way, greedy, no early stop):
- prefill_tok_s: B * prompt_len / time of a generate with max_new_tokens=1;
- e2e_ms_per_token: wall time of the whole generate (prefill + all new tokens) / new_tokens;
- decode_ms_per_step: (whole generate - prefill-only generate) / (new_tokens - 1);
- e2e_tok_s: B * new_tokens / whole generate; decode_tok_s: B / decode_ms_per_step;
- memory: peak GPU bytes of the process.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.sides import emit, run_sides, write_json  # noqa: E402


def timed(fn, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def figures(b, prompt_len, new, prefill_s, total_s):
    step = (total_s - prefill_s) / max(new - 1, 1)
    return dict(prefill_s=round(prefill_s, 4), total_s=round(total_s, 4),
                prefill_tok_s=round(b * prompt_len / prefill_s, 1),
                e2e_ms_per_token=round(1000 * total_s / new, 3),
                decode_ms_per_step=round(1000 * step, 3),
                e2e_tok_s=round(b * new / total_s, 1), decode_tok_s=round(b / step, 1))


def model_config(args):
    from lumos_jax.models import PRESETS

    return PRESETS[args.preset].replace(param_dtype=args.dtype, dtype=args.dtype)


# -- our engine ------------------------------------------------------------------------------
def run_ours(args) -> None:
    import jax
    import numpy as np

    from lumos_jax.inference import Engine, SamplingParams
    from lumos_jax.models import create_model

    dev = jax.devices()[0]
    mem = lambda: (dev.memory_stats() or {}).get("peak_bytes_in_use")  # noqa: E731
    config = model_config(args)
    t0 = time.perf_counter()
    model = create_model(config, seed=0)
    base = Engine(model, num_slots=1, max_len=args.max_len or args.prompt_len + args.new_tokens,
                  steps_per_call=args.steps_per_call, max_prefill_tokens=args.max_prefill_tokens)
    del model
    gc.collect()
    jax.block_until_ready(base.params)
    emit(side="ours", event="setup", device=str(dev.device_kind), seconds=round(time.perf_counter() - t0, 1),
         weights_bytes=sum(x.nbytes for x in jax.tree.leaves(base.params)), peak_bytes=mem())
    rng = np.random.default_rng(0)
    plan = [(a, int(b)) for a, b in (x.split(":") for x in args.plan.split(","))] if args.plan else \
        [(a, int(b)) for a in args.attention.split(",") for b in args.batches.split(",")]
    for attention, b in plan:
        if True:
            engine = None
            gc.collect()
            engine = base.resized(num_slots=b, decode_attention=attention)
            prompts = rng.integers(3, config.vocab_size, size=(b, args.prompt_len)).tolist()
            one = SamplingParams(max_new_tokens=1)
            full = SamplingParams(max_new_tokens=args.new_tokens)
            t0 = time.perf_counter()
            engine.generate(prompts, full)                       # compiles prefill + decode
            compile_s = time.perf_counter() - t0
            prefill_s = timed(lambda: engine.generate(prompts, one), args.repeats)
            out = []
            total_s = timed(lambda: out.append(engine.generate(prompts, full)), args.repeats)
            assert all(len(r.tokens) == args.new_tokens for r in out[-1])
            emit(side="ours", batch=b, attention=attention, steps_per_call=args.steps_per_call,
                 max_len=engine.max_len,
                 first_call_s=round(compile_s, 1), peak_bytes=mem(),
                 bytes_in_use=(dev.memory_stats() or {}).get("bytes_in_use"),
                 **figures(b, args.prompt_len, args.new_tokens, prefill_s, total_s))
            del engine


# -- Hugging Face transformers ---------------------------------------------------------------
def run_hf(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model_config(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    hf_config = LlamaConfig(**{k: v for k, v in c.to_hf_dict().items()
                               if k not in ("torch_dtype", "dtype", "architectures")})
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(hf_config).eval()
    torch.set_default_dtype(torch.float32)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peak = (lambda: torch.cuda.max_memory_allocated()) if device == "cuda" else (lambda: None)
    emit(side="hf", event="setup", device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
         seconds=round(time.perf_counter() - t0, 1), peak_bytes=peak())
    gen = torch.Generator(device="cpu").manual_seed(0)
    for b in [int(x) for x in args.batches.split(",")]:
        ids = torch.randint(3, c.vocab_size, (b, args.prompt_len), generator=gen).to(device)
        mask = torch.ones_like(ids)

        def generate(n):
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, eos_token_id=None, pad_token_id=0)
            sync()
            return out

        generate(2)  # warm-up
        prefill_s = timed(lambda: generate(1))
        total_s = timed(lambda: generate(args.new_tokens))
        emit(side="hf", batch=b, peak_bytes=peak(),
             **figures(b, args.prompt_len, args.new_tokens, prefill_s, total_s))
        if device == "cuda":
            torch.cuda.empty_cache()


# -- driver ----------------------------------------------------------------------------------
def drive(args, argv) -> int:
    record = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "results": [], "errors": []}

    def on_result(res: dict) -> None:
        record["results"].append(res)
        write_json(args.out, record)

    status = run_sides(__file__, args, argv, REPO, record, on_result)
    print(json.dumps(record["results"], indent=1))
    return status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--preset", default="llama2_7b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--attention", default="dot", help="decode attention variants, e.g. dot,reduce")
    p.add_argument("--plan", help="ours only: attention:batch pairs in order, e.g. dot:1,dot:64,reduce:64")
    p.add_argument("--max_len", type=int, help="ours: cache length per slot (default prompt + new)")
    p.add_argument("--steps_per_call", type=int, default=32)
    p.add_argument("--max_prefill_tokens", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sides", default="ours,hf")
    p.add_argument("--timeout_ours", type=float, default=330)
    p.add_argument("--timeout_hf", type=float, default=200)
    p.add_argument("--tiny", action="store_true", help="tiny model, short prompts (CPU check)")
    p.add_argument("--out", help="JSON results file")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.dtype, args.prompt_len, args.new_tokens = "tiny", "float32", 24, 8
        args.batches = "1,4" if args.batches == "1,16,64" else args.batches
    if args.worker == "ours":
        run_ours(args)
        return 0
    if args.worker == "hf":
        run_hf(args)
        return 0
    return drive(args, [a for a in argv])


if __name__ == "__main__":
    sys.exit(main())
