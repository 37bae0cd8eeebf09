"""Decode benchmark: our engine (bf16 / int8 weights, bf16 / int8 KV) vs HF transformers
`generate`, eager and compiled, same card, same run.

Llama-2-7B shape, random weights, prompt 512, 128 new tokens, batch 1 / 16 / 64. Sides:
- `ours`, once per `--variants` entry (weights/kv, e.g. `int8/int8`), each in its own process;
- `hf_compiled`: HF `generate` with `cache_implementation="static"`, whose decoding forward
  `generate` itself compiles with `torch.compile` (HF's CompileConfig: inductor,
  "reduce-overhead", i.e. CUDA graphs) - the strongest plain PyTorch setup;
- `hf_eager`: HF `generate` with its default dynamic cache, no compilation.
Each side runs in its own subprocess (an OOM or crash loses only that side; bench/sides.py);
every figure is printed as soon as it is measured and the JSON (`--out`, default
bench/results/decode.json) is rewritten after each row (temp file + rename). `--tiny` runs
the same code on a tiny model on CPU (a check, not a figure).

    python bench/decode.py --out $OUT/decode.json            # GPU
    python bench/decode.py --tiny --out /tmp/decode.json      # CPU check

Figures per batch B (every side measured the same way, greedy, no early stop, best of
--repeats after a warm-up call with the timed shapes, so compilation is excluded):
- decode_ms_per_step: (whole generate - prefill-only generate) / (new_tokens - 1);
- decode_tok_s: B / decode_ms_per_step; e2e_tok_s: B * new_tokens / whole generate;
- prefill_tok_s: B * prompt_len / time of a generate with max_new_tokens=1;
- compile_s: ours, seconds XLA spent compiling during the warm-up (JAX's compile events;
  prefill + decode programs); HF, warm-up time minus the timed generate's time;
- peak_gb: the process's peak device memory (1e9 bytes) so far, weight conversion included.
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
from bench.sides import CompileClock, emit, run_sides, write_json  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "decode.json"
ROW_KEYS = ("side", "weights", "kv", "batch", "decode_ms_per_step", "decode_tok_s", "e2e_tok_s",
            "peak_gb", "compile_s")
HF_SIDES = ("hf_compiled", "hf_eager")


def timed(fn, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def figures(b, prompt_len, new, prefill_s, total_s):
    step = (total_s - prefill_s) / max(new - 1, 1)
    return dict(decode_ms_per_step=round(1000 * step, 3), decode_tok_s=round(b / step, 1),
                e2e_tok_s=round(b * new / total_s, 1), prefill_s=round(prefill_s, 4),
                total_s=round(total_s, 4), prefill_tok_s=round(b * prompt_len / prefill_s, 1),
                e2e_ms_per_token=round(1000 * total_s / new, 3))


def gb(n):
    return None if n is None else round(n / 1e9, 3)


def model_config(args):
    from lumos_jax.models import PRESETS

    return PRESETS[args.preset].replace(param_dtype=args.dtype, dtype=args.dtype)


def label(kind: str, dtype: str) -> str:
    """A row's weights / kv name: int8, else the model dtype (bf16; fp32 in --tiny)."""
    return "int8" if kind == "int8" else {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)


def drop_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without `--name value` / `--name=value` for each name."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not any(a.startswith(n + "=") for n in names):
            out.append(a)
    return out


def parse_variant(text: str) -> tuple[str, str]:
    from lumos_jax.inference.quant import WEIGHT_DTYPES

    weights, _, kv = text.partition("/")
    if weights not in WEIGHT_DTYPES or kv not in WEIGHT_DTYPES:
        raise SystemExit(f"--variants: {text!r}; expected WEIGHTS/KV, each one of {WEIGHT_DTYPES}")
    return weights, kv


# -- our engine ------------------------------------------------------------------------------
def ours_params(args, config):
    """Random decode params for the preset, int8 when asked (converted on device)."""
    import jax

    from lumos_jax.inference import params as decode_params_mod
    from lumos_jax.inference.quant import convert_weights

    fast = getattr(decode_params_mod, "random_decode_params", None)
    if fast is not None:
        params, spec = fast(config, jax.random.key(0))
    else:
        from lumos_jax.models import create_model

        model = create_model(config, seed=0)
        params, spec = decode_params_mod.decode_params(model)
        del model
        gc.collect()
    if args.weights == "int8":
        params = convert_weights(params, "int8")
    return jax.block_until_ready(params), spec


def run_ours(args) -> None:
    import jax
    import numpy as np

    from lumos_jax.inference import Engine, SamplingParams
    from lumos_jax.inference.quant import params_bytes

    clock = CompileClock()
    dev = jax.devices()[0]
    mem = lambda: gb((dev.memory_stats() or {}).get("peak_bytes_in_use"))  # noqa: E731
    config = model_config(args)
    variant = dict(side="ours", weights=label(args.weights, args.dtype), kv=label(args.kv, args.dtype))
    t0 = time.perf_counter()
    params, spec = ours_params(args, config)
    base = Engine.from_params(config, params, spec, num_slots=1,
                              max_len=args.max_len or args.prompt_len + args.new_tokens,
                              steps_per_call=args.steps_per_call,
                              max_prefill_tokens=args.max_prefill_tokens,
                              cache_dtype="int8" if args.kv == "int8" else None,
                              int8_matmul=args.int8_matmul)
    emit(**variant, event="setup", device=str(dev.device_kind), seconds=round(time.perf_counter() - t0, 1),
         weights_gb=gb(params_bytes(params)), peak_gb=mem())
    rng = np.random.default_rng(0)
    for b in [int(x) for x in args.batches.split(",")]:
        gc.collect()
        engine = base.resized(num_slots=b, decode_attention=args.attention)
        prompts = rng.integers(3, config.vocab_size, size=(b, args.prompt_len)).tolist()
        one = SamplingParams(max_new_tokens=1)
        full = SamplingParams(max_new_tokens=args.new_tokens)
        before = clock.read()["compile_s"]
        t0 = time.perf_counter()
        engine.generate(prompts, full)                       # compiles prefill + decode
        engine.generate(prompts, one)
        first_call_s = time.perf_counter() - t0
        compile_s = clock.read()["compile_s"] - before
        prefill_s = timed(lambda: engine.generate(prompts, one), args.repeats)
        out = []
        total_s = timed(lambda: out.append(engine.generate(prompts, full)), args.repeats)
        assert all(len(r.tokens) == args.new_tokens for r in out[-1])
        emit(**variant, batch=b, peak_gb=mem(), compile_s=round(compile_s, 1),
             first_call_s=round(first_call_s, 1), attention=engine.decode_attention,
             int8_matmul=engine.spec.int8_matmul,
             steps_per_call=args.steps_per_call, max_len=engine.max_len,
             **figures(b, args.prompt_len, args.new_tokens, prefill_s, total_s))
        del engine


# -- Hugging Face transformers ---------------------------------------------------------------
def run_hf(args) -> None:
    import torch
    from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

    compiled = args.worker == "hf_compiled"
    c = model_config(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // 2))
    t0 = time.perf_counter()
    hf_config = LlamaConfig(**{k: v for k, v in c.to_hf_dict().items()
                               if k not in ("torch_dtype", "dtype", "architectures")})
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(hf_config).eval()
    torch.set_default_dtype(torch.float32)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peak = (lambda: gb(torch.cuda.max_memory_allocated())) if device == "cuda" else (lambda: None)
    variant = dict(side=args.worker, weights=label("bf16", args.dtype), kv=label("bf16", args.dtype))
    emit(**variant, event="setup", device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
         seconds=round(time.perf_counter() - t0, 1), peak_gb=peak())
    kw = {}
    if compiled:
        # generate compiles its decoding forward itself when the cache is static; on CPU
        # (the --tiny check) CUDA graphs do not exist, so plain inductor, forced on.
        cc = CompileConfig(fullgraph=True) if device == "cuda" else CompileConfig(fullgraph=True, mode="default")
        if device == "cpu":
            cc._compile_all_devices = True
        kw = dict(cache_implementation="static", compile_config=cc)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for b in [int(x) for x in args.batches.split(",")]:
        ids = torch.randint(3, c.vocab_size, (b, args.prompt_len), generator=gen).to(device)
        mask = torch.ones_like(ids)

        def generate(n):
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, eos_token_id=None, pad_token_id=0, **kw)
            sync()
            return out

        t0 = time.perf_counter()
        generate(args.new_tokens)  # warm-up with the timed shapes (compiles, records graphs)
        generate(1)
        warm_s = time.perf_counter() - t0
        prefill_s = timed(lambda: generate(1), args.repeats)
        total_s = timed(lambda: generate(args.new_tokens), args.repeats)
        emit(**variant, batch=b, peak_gb=peak(), compile_s=round(max(warm_s - total_s - prefill_s, 0.0), 1),
             **figures(b, args.prompt_len, args.new_tokens, prefill_s, total_s))
        if device == "cuda":
            torch.cuda.empty_cache()


# -- driver ----------------------------------------------------------------------------------
def drive(args, argv) -> int:
    """Every side in its own process; `rows` in the issue's schema (first ROW_KEYS, then the
    extra figures), rewritten after each one."""
    out = args.out or str(DEFAULT_OUT)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    record = {"card": None, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "args": vars(args), "rows": [], "setup": [], "errors": []}

    def on_result(res: dict) -> None:
        if res.get("event") == "setup":
            record["setup"].append(res)
            record["card"] = record["card"] or res.get("device")
        else:
            record["rows"].append({**{k: res.get(k) for k in ROW_KEYS}, **res})
        write_json(out, record)

    status = 0
    args.out = out
    base = drop_options(argv, ("--sides", "--variants", "--out"))
    for side in args.sides.split(","):
        if side == "ours":
            for v in args.variants.split(","):
                weights, kv = parse_variant(v)
                one = argparse.Namespace(**{**vars(args), "sides": "ours"})
                status |= run_sides(__file__, one, base + ["--weights", weights, "--kv", kv],
                                    REPO, record, on_result)
        elif side in HF_SIDES:
            one = argparse.Namespace(**{**vars(args), "sides": side})
            status |= run_sides(__file__, one, base, REPO, record, on_result)
        else:
            raise SystemExit(f"--sides: unknown side {side!r}; expected ours or one of {HF_SIDES}")
    print(json.dumps(record["rows"], indent=1))
    return status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["ours", *HF_SIDES], help=argparse.SUPPRESS)
    p.add_argument("--weights", default="bf16", help=argparse.SUPPRESS)
    p.add_argument("--kv", default="bf16", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="llama2_7b")
    p.add_argument("--dtype", default="bfloat16", help="activations (and HF's weights)")
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--variants", default="bf16/bf16,int8/bf16,int8/int8",
                   help="ours: WEIGHTS/KV pairs, each bf16 or int8")
    p.add_argument("--attention", default="auto", help="ours: decode attention (engine_settings names)")
    p.add_argument("--int8_matmul", default="xla", help="ours: how int8 weights multiply (engine_settings.int8_matmul: "
                   "xla or pallas_gpu)")
    p.add_argument("--max_len", type=int, help="ours: cache length per slot (default prompt + new)")
    p.add_argument("--steps_per_call", type=int, default=32)
    p.add_argument("--max_prefill_tokens", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sides", default="ours,hf_compiled,hf_eager")
    p.add_argument("--timeout_ours", type=float, default=240)
    p.add_argument("--timeout_hf", type=float, default=240)
    p.add_argument("--tiny", action="store_true", help="tiny model, short prompts (CPU check)")
    p.add_argument("--out", help=f"JSON results file (default {DEFAULT_OUT.relative_to(REPO)})")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.dtype, args.prompt_len, args.new_tokens = "tiny", "float32", 24, 8
        args.batches = "1,4" if args.batches == "1,16,64" else args.batches
        args.repeats = max(args.repeats, 3)
    if args.worker == "ours":
        run_ours(args)
        return 0
    if args.worker in HF_SIDES:
        run_hf(args)
        return 0
    return drive(args, argv)


if __name__ == "__main__":
    sys.exit(main())
