"""Training throughput: our jitted train step beside HF transformers, eager and compiled.

    python bench/train_throughput.py --model tinyllama_1b            # seq 2048, batch 8
    python bench/train_throughput.py --model smollm2_135m --loop     # seq 1024, batch 32
    python bench/train_throughput.py --model llama2_7b               # full fine-tune, one card
    python bench/train_throughput.py --tiny --skip_torch_compile     # CPU check
    python bench/train_throughput.py --sides ours --scan_layers 1,0 --scan_unroll 1,2,4
                                     # ours scanned (unroll 1, 2, 4) and unrolled: 4 rows

Sides, each in its own subprocess (bench/sides.py `run_sides`: an OOM loses one side):
- ours: fp32 params + AdamW state, bf16 compute, the whole step (loss, grads, clipping,
  AdamW) as `lumos-jax train` runs it; layers scanned (LlamaConfig.scan_layers, scan_unroll:
  `--scan_layers 1,0 --scan_unroll 1,2` runs one ours subprocess per combination, each its
  own row); `--loop` also times `train()` itself (prefetching
  thread, metrics read every log_every steps) on in-memory packed data, as `loop_*` fields.
- hf_eager / hf_compiled: fp32 params, bf16 autocast, SDPA, fused AdamW (CUDA), clip 1.0;
  hf_compiled adds `torch.compile(model)`. llama2_7b turns on HF gradient checkpointing
  (our side: remat 'full'), as a full fine-tune of 6.7B needs on one card.

Per row: tokens_per_s (median step), peak_gib (the device's peak), mfu_measured (model
FLOPs 6N + 12*L*T*d_attn per token over the measured bf16 matmul peak,
--measured_peak_tflops), init_s (random-weight state on the device), compile_s (ours:
lowering + XLA compile; HF: the warm-up steps, where torch.compile does its work).
`--out` (default bench/results/train_throughput.json) is rewritten after every row; rows of
other models or shapes already in it are kept, a re-measured row replaces its old one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.sides import emit, layer_layouts, run_sides, write_json  # noqa: E402

SIDES = ("ours", "hf_eager", "hf_compiled")
# name -> (seq, batch, remat, shape overrides on a preset, or a full shape)
MODELS = {
    "tinyllama_1b": dict(seq=2048, batch=8, remat="none"),
    # SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json): tied embeddings, GQA 9/3.
    "smollm2_135m": dict(seq=1024, batch=32, remat="none", shape=dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=None)),
    # fp32 master + AdamW = 16 bytes/param = 108 GB: batch 1 x 2048 with full remat.
    "llama2_7b": dict(seq=2048, batch=1, remat="full"),
    "tiny": dict(seq=64, batch=4, remat="none"),
}


def model_shape(name: str):
    from lumos_jax.models import PRESETS, LlamaConfig

    spec = MODELS[name]
    return LlamaConfig(**spec["shape"]) if "shape" in spec else PRESETS[name]


def figures(args, config, s_per_step: float) -> dict:
    from lumos_jax.training.metrics import flops_per_token

    tokens_per_s = args.batch * args.seq / s_per_step
    tflops = flops_per_token(config, args.seq) * tokens_per_s / 1e12
    return dict(s_per_step=round(s_per_step, 4), tokens_per_s=round(tokens_per_s, 1),
                model_tflops_per_s=round(tflops, 1),
                mfu_measured=round(tflops / args.measured_peak_tflops, 4))


def median_step(run_one, sync, steps: int) -> tuple[float, list]:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run_one()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], [round(x, 4) for x in times]


def row(args, side: str, **kw) -> dict:
    return dict(side=side, model=args.model, seq=args.seq, batch=args.batch, **kw)


def is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return "out of memory" in text or "resource_exhausted" in text or "outofmemory" in text


# ---------------------------------------------------------------- ours
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
    seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    for r, lens in enumerate([[100, 60, 50], [200]]):  # row 0: 3 segments + 46 pad; row 1: 56 pad
        at = 0
        for s, n in enumerate(lens, 1):
            seg[r, at:at + n], pos[r, at:at + n] = s, np.arange(n)
            at += n
    ids = np.random.default_rng(0).integers(0, 512, (b, t)).astype(np.int32)
    valid = seg != 0

    def run(impl):
        graphdef, params = nnx.split(create_model(base.replace(attention_impl=impl), seed=0))

        def loss(p):
            logits = nnx.merge(graphdef, p)(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg))
            return jnp.sum(jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0) ** 2) / 1e4, logits

        (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(logits, np.float32)[valid], jax.tree.leaves(jax.device_get(g))

    ref_logits, ref_grads = run("xla")
    try:
        logits, grads = run("cudnn")
    except Exception as e:  # report and fall back; never lose the run
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    ldiff = float(np.abs(logits - ref_logits).max() / (np.abs(ref_logits).max() + 1e-6))
    gdiff = max(float(np.abs(a - r).max() / (np.abs(r).max() + 1e-6)) for a, r in zip(grads, ref_grads))
    return {"logits_rel_err": ldiff, "grads_rel_err": gdiff, "ok": bool(ldiff < 2e-2 and gdiff < 5e-2)}


def synthetic_host_batch(vocab: int, batch: int, seq: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(0, vocab, (batch, seq)), "targets": rng.integers(0, vocab, (batch, seq)),
            "loss_mask": np.ones((batch, seq)), "segment_ids": np.ones((batch, seq)),
            "positions": np.broadcast_to(np.arange(seq), (batch, seq))}


def run_ours(args) -> None:
    # JAX takes 75% of the card by default: too little for 7B's 108 GB of state on 141 GB.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
    import jax

    from lumos_jax.sharding import make_mesh
    from lumos_jax.training import state as state_lib
    from lumos_jax.training import step as step_lib
    from lumos_jax.training.data import global_batch_array

    dev = jax.devices()[0]
    impl, extra = args.attention, {}
    if impl == "auto":
        impl = "xla"
        if jax.default_backend() == "gpu":
            check = attention_check()
            extra["attention_check"] = check
            impl = "cudnn" if check.get("ok") else "xla"
    config = model_shape(args.model).replace(param_dtype="float32", dtype=args.dtype, attention_impl=impl,
                                             remat_policy=args.remat, vocab_multiple=args.vocab_multiple,
                                             scan_layers=bool(args.scan_layers[0]),
                                             scan_unroll=args.scan_unroll[0])
    mesh = make_mesh(1, -1, 1)
    peak = lambda: round((dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30, 2)  # noqa: E731
    base = dict(device=dev.device_kind, attention_impl=impl, remat=args.remat, grad_accum=args.grad_accum,
                scan_layers=config.scan_layers, scan_unroll=config.scan_unroll,
                mu_dtype=args.mu_dtype or "float32",
                jax=jax.__version__, **extra)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        setup = state_lib.build_setup(config, mesh, 1000,
                                      state_lib.optimizer_settings(learning_rate=1e-5, mu_dtype=args.mu_dtype))
        timings: dict = {}
        state = state_lib.random_state(setup, 0, timings=timings)
        jax.block_until_ready(state)
        init_s = round(time.perf_counter() - t0, 1)
        base.update(init_compile_s=timings.get("compile_s"), init_run_s=timings.get("run_s"))
        step = step_lib.make_train_step(setup, args.grad_accum)
        batch = global_batch_array(synthetic_host_batch(config.vocab_size, args.batch, args.seq),
                                   step_lib.batch_sharding(setup), args.batch)
        t0 = time.perf_counter()
        try:
            compiled = step.lower(state, batch).compile()
        except Exception as e:
            if not is_oom(e):
                raise
            emit(**row(args, "ours", init_s=init_s, error=f"out of memory: {str(e)[:200]}", **base))
            return
        compile_s = round(time.perf_counter() - t0, 1)
        holder = {"state": state}
        del state

        def one():
            holder["state"], holder["metrics"] = compiled(holder["state"], batch)

        for _ in range(args.warmup):
            one()
        jax.block_until_ready(holder["metrics"])
        med, times = median_step(one, lambda: jax.block_until_ready(holder["metrics"]), args.steps)
        loss = float(holder["metrics"]["loss"])
    emit(**row(args, "ours", peak_gib=peak(), init_s=init_s, compile_s=compile_s, final_loss=loss,
               step_times_s=times, **figures(args, config, med), **base))
    if args.loop:
        del holder, compiled
        gc.collect()
        emit(**row(args, "ours", measure="train_loop", **run_loop(args, config, mesh), **base))


def run_loop(args, config, mesh) -> dict:
    """`train()` itself on in-memory packed synthetic conversations (the parts injected):
    its logged tokens/s, median over the log intervals after the first (compile)."""
    import tempfile

    from lumos_jax.data.loader import make_memory_iterator
    from lumos_jax.jsonl import read_jsonl
    from lumos_jax.training import data as data_lib
    from lumos_jax.training.loop import train

    steps = args.loop_steps
    examples = data_lib.synthetic_examples(2 * steps * args.batch, config.vocab_size, args.seq // 4,
                                           args.seq + 1, seed=0)

    def data(seq_len, global_batch, seed):
        return make_memory_iterator(examples, seq_len=seq_len, global_batch=global_batch, seed=seed,
                                    token_vocab_size=config.vocab_size), None

    log_every = max(1, steps // 8)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        train(work, seq_len=args.seq, global_batch=args.batch, grad_accum_steps=args.grad_accum,
              max_steps=steps, save_every=10 * steps, log_every=log_every, export_native=False,
              progress_bar=False, config_factory=lambda: config, mesh_factory=lambda: mesh,
              data_factory=data)
        wall = time.perf_counter() - t0
        rows = read_jsonl(Path(work) / "logs/metrics.jsonl")
    dts = sorted(r["step_time_s"] for r in rows if r["split"] == "train" and r["step"] > 2 * log_every)
    med = dts[len(dts) // 2]
    out = figures(args, config, med)
    return {"loop_steps": steps, "loop_log_every": log_every, "loop_wall_s": round(wall, 1), **out}


# ---------------------------------------------------------------- HF
def run_hf(args) -> None:
    import torch
    import transformers

    compiled = args.worker == "hf_compiled"
    cfg = model_shape(args.model)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                transformers=transformers.__version__, grad_checkpointing=args.hf_grad_checkpointing)
    t0 = time.perf_counter()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=max(cfg.max_position_embeddings, args.seq), rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="sdpa")
    with torch.device(dev):
        model = transformers.LlamaForCausalLM(hf_cfg).float().train()
    if args.hf_grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            fused=dev == "cuda")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    init_s = round(time.perf_counter() - t0, 1)
    base["attn_implementation"] = getattr(model.config, "_attn_implementation", "?")
    forward = model
    if compiled and not args.skip_torch_compile:
        forward = torch.compile(model)
    base["torch_compile"] = compiled and not args.skip_torch_compile
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev, generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev, generator=gen)
    amp = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    holder = {}

    def one():
        with torch.autocast(device_type=dev, dtype=amp, enabled=amp != torch.float32):
            logits = forward(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        holder["loss"] = loss.detach()

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.perf_counter()
        for _ in range(max(1, args.warmup)):
            one()
        sync()
        compile_s = round(time.perf_counter() - t0, 1)
        med, times = median_step(one, sync, args.steps)
    except torch.cuda.OutOfMemoryError as e:
        emit(**row(args, args.worker, init_s=init_s, error=f"out of memory: {str(e)[:200]}", **base))
        return
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None
    emit(**row(args, args.worker, peak_gib=peak, init_s=init_s, compile_s=compile_s,
               final_loss=float(holder["loss"]), step_times_s=times, **figures(args, cfg, med), **base))


# ---------------------------------------------------------------- driver
def row_key(r: dict) -> tuple:
    """A re-measured row replaces its old one; ours rows differ by layer layout too (rows from
    before the fields existed were the scanned model, unroll 1)."""
    layout = (r.get("scan_layers", True), r.get("scan_unroll", 1)) if r.get("side") == "ours" else None
    return (r.get("side"), r.get("model"), r.get("seq"), r.get("batch"), r.get("measure", "step"), layout)


def with_option(argv: list[str], name: str, value) -> list[str]:
    """argv with every `name X` / `name=X` dropped and `name value` appended."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out + [name, str(value)]


def drive(args, argv) -> int:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    record = {"card": args.card or old.get("card"), "date": time.strftime("%Y-%m-%d", time.gmtime()),
              "command": "python bench/train_throughput.py " + " ".join(argv),
              "measured_peak_tflops": args.measured_peak_tflops, "rows": list(old.get("rows", [])),
              "errors": []}
    args.out = str(out)

    def on_result(res: dict) -> None:
        if record["card"] is None and res.get("device"):
            record["card"] = res["device"]
        record["rows"] = [r for r in record["rows"] if row_key(r) != row_key(res)] + [res]
        write_json(args.out, record)

    for side in args.sides.split(","):
        one = argparse.Namespace(**{**vars(args), "sides": side})
        for layout in (layer_layouts(args.scan_layers, args.scan_unroll) if side == "ours" else [None]):
            side_argv = argv if layout is None else with_option(
                with_option(argv, "--scan_layers", int(layout[0])), "--scan_unroll", layout[1])
            run_sides(__file__, one, side_argv, REPO, record, on_result)
    status = 1 if record["errors"] else 0
    print("\n| side | model | seq x batch | tokens/s | MFU (measured) | peak GiB | init s | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in record["rows"]:
        side = r["side"] + (" (train loop)" if r.get("measure") == "train_loop" else "")
        if r["side"] == "ours":
            side += (f" scanned, unroll {r.get('scan_unroll', 1)}" if r.get("scan_layers", True)
                     else " unrolled")
        print(f"| {side} | {r['model']} | {r['seq']} x {r['batch']} | {r.get('tokens_per_s', r.get('error'))} "
              f"| {r.get('mfu_measured')} | {r.get('peak_gib')} | {r.get('init_s')} | {r.get('compile_s')} |")
    return status


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    return values


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--model", "--preset", dest="model", default="tinyllama_1b", choices=sorted(MODELS))
    p.add_argument("--seq", type=int, help="default: the model's (see MODELS)")
    p.add_argument("--batch", type=int, help="default: the model's")
    p.add_argument("--remat", help="ours: none | dots | full (default: the model's)")
    p.add_argument("--hf_grad_checkpointing", type=int, help="1/0 (default: on where ours uses remat)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--vocab_multiple", type=int, default=1)
    p.add_argument("--attention", default="auto", help="ours: auto (cudnn if it passes the check) | xla | cudnn")
    p.add_argument("--mu_dtype", choices=["float32", "bfloat16"],
                   help="ours: Adam's first moment in bf16 (optimizer_settings.mu_dtype; 7B on one card)")
    p.add_argument("--scan_layers", default="1", type=int_list,
                   help="ours: 1 = layers scanned, 0 = unrolled; a list (1,0) runs each")
    p.add_argument("--scan_unroll", default="1", type=int_list,
                   help="ours, scanned: layers per scan iteration (LlamaConfig.scan_unroll); a list runs each")
    p.add_argument("--loop", action="store_true", help="ours: also time train() itself")
    p.add_argument("--loop_steps", type=int, default=80)
    p.add_argument("--skip_torch_compile", action="store_true",
                   help="hf_compiled without torch.compile (a quick CPU check of the code path)")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--measured_peak_tflops", type=float, default=808.0,
                   help="the card's measured dense bf16 matmul peak (H200: 808)")
    p.add_argument("--card", help="card name for the record (default: the device's)")
    p.add_argument("--timeout_ours", type=float, default=540)
    p.add_argument("--timeout_hf", type=float, default=420)
    p.add_argument("--tiny", action="store_true", help="tiny model, few steps, fp32: a CPU check")
    p.add_argument("--out", help="default: bench/results/train_throughput.json "
                   "($TMPDIR/train_throughput_tiny.json with --tiny)")
    args = p.parse_args(argv)
    if any(v not in (0, 1) for v in args.scan_layers) or any(v < 1 for v in args.scan_unroll):
        p.error(f"--scan_layers takes 1/0, --scan_unroll integers >= 1 (got {args.scan_layers}, "
                f"{args.scan_unroll})")
    if args.out is None:
        args.out = (os.path.join(os.environ.get("TMPDIR", "/tmp"), "train_throughput_tiny.json") if args.tiny
                    else str(REPO / "bench/results/train_throughput.json"))
    if args.tiny:
        args.model, args.dtype, args.steps, args.warmup = "tiny", "float32", 2, 1
        args.loop_steps = min(args.loop_steps, 8)
    spec = MODELS[args.model]
    args.seq = args.seq or spec["seq"]
    args.batch = args.batch or spec["batch"]
    args.remat = args.remat or spec["remat"]
    if args.hf_grad_checkpointing is None:
        args.hf_grad_checkpointing = int(args.remat != "none")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.worker:  # one side, in the subprocess run_sides started
        {"ours": run_ours, "hf_eager": run_hf, "hf_compiled": run_hf}[args.worker](args)
        return 0
    return drive(args, argv)


if __name__ == "__main__":
    sys.exit(main())
