"""Training throughput: our jitted train step vs HF transformers PyTorch, same card.

    python bench/train_throughput.py --preset tinyllama_1b --seq 2048 --batch 8

Each side runs in its own subprocess (JAX preallocates GPU memory, torch caches it; a
crash on one side must not lose the other's figures). Every result is printed as soon as
it is measured and the JSON file (default $OUT/train_throughput.json) is rewritten after
each. On a GPU it first checks the cuDNN attention paths against the XLA path on packed,
padded rows, and benchmarks the best one that passed.

Ours: fp32 params + AdamW state, bf16 compute, the full step (loss, grads, clipping,
AdamW) as in training. HF: fp32 params, bf16 autocast, SDPA attention, fused AdamW,
clip_grad_norm. MFU uses 6N + 12*L*T*d_attn FLOPs per token over 989 TFLOP/s (H100
dense bf16) and over the card's measured matmul peak (--measured_peak_tflops).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def log(msg):
    print(msg, flush=True)


# ---------------------------------------------------------------- shared helpers
def model_shape(preset: str):
    from lumos_jax.models import PRESETS

    return PRESETS[preset]


def mfu_fields(config, seq, tokens_per_s, peak_tflops, measured_tflops):
    from lumos_jax.training.metrics import flops_per_token

    model_tflops = flops_per_token(config, seq) * tokens_per_s / 1e12
    out = {"model_tflops_per_s": round(model_tflops, 1)}
    if peak_tflops:
        out["mfu_vs_spec"] = round(model_tflops / peak_tflops, 4)
    if measured_tflops:
        out["mfu_vs_measured"] = round(model_tflops / measured_tflops, 4)
    return out


def time_steps(run_one, sync, warmup, steps):
    for _ in range(warmup):
        run_one()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run_one()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2], times


# ---------------------------------------------------------------- JAX side
def attention_check() -> dict:
    """cuDNN attention vs the XLA path on packed + padded rows: outputs and grads."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from lumos_jax.models import PRESETS
    from lumos_jax.models.llama import create_model

    base = PRESETS["tiny"].replace(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=512, dtype="bfloat16",
                                   max_position_embeddings=512)
    b, t = 2, 256
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for row, lens in enumerate([[100, 60, 50], [200]]):  # row 0: 3 segments + 46 pad; row 1: 56 pad
        at = 0
        for s, n in enumerate(lens, 1):
            seg[row, at:at + n] = s
            pos[row, at:at + n] = np.arange(n)
            at += n
    ids = np.random.default_rng(0).integers(0, 512, (b, t)).astype(np.int32)
    valid = seg != 0

    def run(impl):
        model = create_model(base.replace(attention_impl=impl), seed=0)
        graphdef, params = nnx.split(model)

        def loss(p):
            logits, _ = nnx.merge(graphdef, p)(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg))
            return jnp.sum(jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0) ** 2) / 1e4, logits

        (l, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(logits, np.float32)[valid], jax.tree.leaves(jax.device_get(g))

    ref_logits, ref_grads = run("xla")
    out = {}
    for impl in ("cudnn",):
        try:
            logits, grads = run(impl)
            ldiff = float(np.abs(logits - ref_logits).max() / (np.abs(ref_logits).max() + 1e-6))
            gdiff = max(float(np.abs(a - r).max() / (np.abs(r).max() + 1e-6))
                        for a, r in zip(grads, ref_grads))
            out[impl] = {"logits_rel_err": ldiff, "grads_rel_err": gdiff,
                         "ok": bool(ldiff < 2e-2 and gdiff < 5e-2)}
        except Exception as e:  # report and fall back; never lose the run
            out[impl] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        log(f"[attention-check] {impl}: {out[impl]}")
    return out


def jax_side(args) -> dict:
    import jax
    import numpy as np

    from lumos_jax.sharding import make_mesh
    from lumos_jax.training import state as state_lib
    from lumos_jax.training import step as step_lib
    from lumos_jax.training.data import global_batch_array

    result = {"side": "jax", "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    t0 = time.perf_counter()
    phase = lambda name: log(f"[phase] {name} at {time.perf_counter() - t0:.1f}s")  # noqa: E731
    impl = args.attention
    if impl == "auto":
        impl = "xla"
        if jax.default_backend() == "gpu":
            checks = attention_check()
            result["attention_check"] = checks
            impl = "cudnn" if checks.get("cudnn", {}).get("ok") else "xla"
    config = model_shape(args.preset).replace(
        param_dtype="float32", dtype=args.dtype, attention_impl=impl, remat_policy=args.remat,
        vocab_multiple=args.vocab_multiple)
    result.update(attention_impl=impl, remat=args.remat, batch=args.batch, seq=args.seq)
    mesh = make_mesh(1, -1, 1)
    with jax.set_mesh(mesh):
        phase("setup")
        setup = state_lib.build_setup(config, mesh, 1000, state_lib.optimizer_settings(learning_rate=1e-5))
        state = state_lib.init_state(setup, state_lib.random_params(setup, 0), 0)
        jax.block_until_ready(state)
        phase("state initialised")
        step = step_lib.make_train_step(setup, args.grad_accum)
        rng = np.random.default_rng(0)
        host = {"input_ids": rng.integers(0, config.vocab_size, (args.batch, args.seq)),
                "targets": rng.integers(0, config.vocab_size, (args.batch, args.seq)),
                "loss_mask": np.ones((args.batch, args.seq)), "segment_ids": np.ones((args.batch, args.seq)),
                "positions": np.broadcast_to(np.arange(args.seq), (args.batch, args.seq))}
        batch = global_batch_array(host, step_lib.batch_sharding(setup), args.batch)
        t = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        result["compile_s"] = round(time.perf_counter() - t, 1)
        phase("compiled")
        holder = {"state": state}

        def one():
            holder["state"], holder["metrics"] = compiled(holder["state"], batch)

        med, times = time_steps(one, lambda: jax.block_until_ready(holder["metrics"]), args.warmup, args.steps)
        result["final_loss"] = float(holder["metrics"]["loss"])
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_memory_gib"] = round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)
    result["s_per_step"] = round(med, 4)
    result["step_times_s"] = [round(x, 4) for x in times]
    result["tokens_per_s"] = round(args.batch * args.seq / med, 1)
    result.update(mfu_fields(config, args.seq, result["tokens_per_s"], args.peak_tflops,
                             args.measured_peak_tflops))
    return result


# ---------------------------------------------------------------- HF side
def hf_side(args) -> dict:
    import torch
    import transformers

    cfg = model_shape(args.preset)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=max(cfg.max_position_embeddings, args.seq),
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings)
    try:
        model = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    except TypeError:
        hf_cfg._attn_implementation = "sdpa"
        model = transformers.LlamaForCausalLM(hf_cfg)
    model = model.float().to(dev).train()
    result = {"side": "hf", "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "attn_implementation": getattr(model.config, "_attn_implementation", "?"),
              "batch": args.batch, "seq": args.seq}
    fused = dev == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0, fused=fused)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)
    labels = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)
    holder = {}
    amp = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32

    def one():
        with torch.autocast(device_type=dev, dtype=amp, enabled=amp != torch.float32):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        holder["loss"] = loss

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    med, times = time_steps(one, sync, args.warmup, args.steps)
    result["final_loss"] = float(holder["loss"])
    result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None
    result["s_per_step"] = round(med, 4)
    result["step_times_s"] = [round(x, 4) for x in times]
    result["tokens_per_s"] = round(args.batch * args.seq / med, 1)
    result.update(mfu_fields(cfg, args.seq, result["tokens_per_s"], args.peak_tflops,
                             args.measured_peak_tflops))
    return result


# ---------------------------------------------------------------- driver
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tinyllama_1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="none")
    p.add_argument("--vocab_multiple", type=int, default=1)
    p.add_argument("--attention", default="auto", help="auto (cudnn if it passes the check) | xla | cudnn")
    p.add_argument("--sides", default="hf,jax", help="comma list of hf, jax")
    p.add_argument("--extra", action="append", default=[],
                   help="extra runs, e.g. 'batch=16,remat=dots' or 'side=hf,batch=16' (repeatable)")
    p.add_argument("--peak_tflops", type=float, default=989.0)
    p.add_argument("--measured_peak_tflops", type=float, default=802.0)
    p.add_argument("--timeout", type=int, default=300, help="seconds per side")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "train_throughput.json"))
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--result_file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args) -> int:
    try:
        res = jax_side(args) if args.side == "jax" else hf_side(args)
    except Exception as e:
        res = {"side": args.side, "error": f"{type(e).__name__}: {str(e)[:2000]}",
               "traceback": traceback.format_exc()[-4000:]}
    Path(args.result_file).write_text(json.dumps(res))
    return 0 if "error" not in res else 1


def run_side(argv, side, extra_args, timeout, tag) -> dict:
    rf = Path(os.environ.get("TMPDIR", "/tmp")) / f"train_throughput_{tag}_{os.getpid()}.json"
    cmd = [sys.executable, __file__, *argv, *extra_args, "--side", side, "--result_file", str(rf)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        return {"side": side, "tag": tag, "error": f"timed out after {timeout}s",
                "output_tail": str(e.stdout or "")[-2000:]}
    res = json.loads(rf.read_text()) if rf.exists() else {"side": side, "error": f"exit {proc.returncode}"}
    res["tag"], res["wall_s"] = tag, round(time.perf_counter() - t, 1)
    for line in proc.stdout.splitlines():
        if line.startswith(("[attention-check]", "[phase]")):
            log(line)
    if "error" in res:
        res["output_tail"] = tail
    return res


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.side:
        return child(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": "python bench/train_throughput.py " + " ".join(argv),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": []}
    base = [f"--{k}={v}" for k, v in vars(args).items()
            if k not in ("extra", "side", "result_file", "out") and v is not None]
    runs = [(s, [], s) for s in args.sides.split(",")]
    for extra in args.extra:
        kv = dict(x.split("=") for x in extra.split(","))
        side = kv.pop("side", "jax")
        runs.append((side, [f"--{k}={v}" for k, v in kv.items()], f"{side}_{extra}"))
    for side, extra_args, tag in runs:
        res = run_side(base, side, extra_args, args.timeout, tag)
        report["results"].append(res)
        short = {k: v for k, v in res.items() if k not in ("step_times_s", "traceback", "output_tail", "attention_check")}
        log(f"[result] {json.dumps(short)}")
        if "error" in res:
            log(f"[error-tail {tag}] {res.get('traceback') or res.get('output_tail', '')}"[-3000:])
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, out)
    by = {r["tag"]: r for r in report["results"] if "error" not in r}
    if "hf" in by and "jax" in by:
        ratio = by["jax"]["tokens_per_s"] / by["hf"]["tokens_per_s"]
        report["speedup_jax_over_hf"] = round(ratio, 3)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, out)
    log("\n| run | tokens/s | s/step | model TFLOP/s | MFU (spec) | peak GiB |")
    log("|---|---|---|---|---|---|")
    for r in report["results"]:
        if "error" in r:
            log(f"| {r['tag']} | error: {r['error'][:80]} | | | | |")
        else:
            log(f"| {r['tag']} | {r['tokens_per_s']} | {r['s_per_step']} | {r.get('model_tflops_per_s')} "
                f"| {r.get('mfu_vs_spec')} | {r.get('peak_memory_gib')} |")
    if "speedup_jax_over_hf" in report:
        log(f"speedup jax/hf: {report['speedup_jax_over_hf']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
