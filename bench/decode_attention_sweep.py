"""Decode attention alone over one layer's paged KV pool: JAX's Pallas GPU kernel
('pallas_gpu', a few of its k_splits / pages_per_compute_block / num_warps settings), ours
('pallas_gpu_mha', a small grid of its blocking and Triton settings) and 'dot'.

Llama-2-7B shape (32 KV heads, one query head each, head_dim 128, bf16, block 16), every row
of the batch `ctx` tokens long, its pages scattered over the pool; batch 1 / 16 / 64 / 256,
ctx 640 and 2048, table width 256 (the agent engine's, max_len 4096) and tight (ctx / 16).
A row's figure: microseconds per call (a jitted loop of calls, each fed the last one's output
as its query, best of --repeats after a warm-up; no dispatch in the timing), and the achieved
bandwidth: K + V bytes of the rows' used pages / time, also as a fraction of the H200's
measured copy bandwidth (3.36 TB/s). Every row's output is also checked against 'dot' (the
gathered-pages reference) on the same inputs: `rel_err` = max |out - dot| / max |dot|, and a row
past REL_TOL is marked `wrong` (so the sweep on the GPU doubles as the kernels' GPU check).

Rows run in a worker process; one that crashes (Triton shared memory, OOM) or runs past
--row-timeout loses only its row (the worker restarts after it); rows past --budget seconds
are recorded as skipped. JSON {"card", "date", "rows"} to --out after each row.

    python bench/decode_attention_sweep.py --out $OUT/decode_attention_sweep.json    # GPU, < 4 min
    python bench/decode_attention_sweep.py --tiny --out /tmp/sweep.json               # CPU check
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.sides import RESULT, emit, write_json  # noqa: E402

COPY_GBPS = 3360.0   # H200, measured copy bandwidth (docs/benchmarks.md)
REL_TOL = 2e-2       # bf16 pages and outputs: a few bf16 ulps of the largest output
FULL = dict(kv=32, d=128, bs=16, dtype="bfloat16")
TINY = dict(kv=2, d=16, bs=4, dtype="bfloat16")

# JAX's kernel beside the setting our 'pallas_gpu' wrapper picks (decode_attention.gpu_blocking)
JAX_GRID = [dict(k_splits=1, pages_per_compute_block=8, num_warps=8),
            dict(k_splits=4, pages_per_compute_block=8, num_warps=8),
            dict(k_splits=8, pages_per_compute_block=4, num_warps=4),
            dict(k_splits=2, pages_per_compute_block=16, num_warps=8)]
# ours: blocking x warps (the register use of each, ptxas for sm_90a: ppb 2/4/8 at 4 warps
# 112/186/255 registers, 8 at 2 warps spills); with the by-hand prefetch (off by default since
# the 2026-12-02 sweep); on unflattened (pages, block, D) blocks
MHA_GRID = ([dict(pages_per_block=p, num_warps=w) for p, w in ((2, 2), (2, 4), (2, 8), (4, 4), (4, 8), (8, 4), (8, 8))]
            + [dict(pages_per_block=p, num_warps=w, prefetch=True) for p, w in ((4, 4), (8, 8))]
            + [dict(pages_per_block=p, num_warps=4, flat=False) for p in (2, 4)])
MHA_SPLITS = {1: (4, 8, 32), 64: (2, 4)}   # batch -> splits tried beside the default


def plan(tiny: bool) -> list[dict]:
    """The rows, most wanted first: the defaults and the grids at the two target shapes
    (batch 1 and 64, ctx 640, the engine's width), then the defaults at every other shape."""
    if tiny:
        key, rest = [(2, 10, 8)], [(2, 10, 3)]   # a wide table (splits in the grid row) and a tight one
        jax_grid, mha_grid, mha_splits = JAX_GRID[2:3], [MHA_GRID[0], MHA_GRID[7], MHA_GRID[9], MHA_GRID[-1]], {}
    else:
        key = [(64, 640, 256), (1, 640, 256)]
        rest = [(b, ctx, w) for b in (64, 1, 256, 16) for ctx in (640, 2048) for w in (256, ctx // 16)]
        rest = [s for s in rest if s not in key]
        jax_grid, mha_grid, mha_splits = JAX_GRID, MHA_GRID, MHA_SPLITS

    def defaults(shape):
        return [dict(variant=v, params={}, shape=shape) for v in ("pallas_gpu", "pallas_gpu_mha", "dot")]

    rows = []
    for shape in key:
        rows += defaults(shape)
        rows += [dict(variant="pallas_gpu", params=p, shape=shape) for p in jax_grid]
        rows += [dict(variant="pallas_gpu_mha", params=p, shape=shape) for p in mha_grid]
        rows += [dict(variant="pallas_gpu_mha", params=dict(splits=s), shape=shape)
                 for s in mha_splits.get(shape[0], ())]
    for shape in rest:
        rows += defaults(shape)
    return rows


# -- worker ----------------------------------------------------------------------------------
def attention_fn(variant: str, params: dict):
    """(q, k, v, table, lengths) -> out, the decode_attention interface."""
    import jax

    from lumos_jax.inference.decode_attention import DECODE_ATTENTION

    if variant == "pallas_gpu" and params:
        return functools.partial(jax_kernel, interpret=jax.default_backend() != "gpu", **params)
    return functools.partial(DECODE_ATTENTION[variant], **params)


def jax_kernel(q, kc, vc, table, lengths, *, k_splits, pages_per_compute_block, num_warps,
               num_stages=2, interpret=False):
    """JAX's kernel at a given setting, its q prepared as our 'pallas_gpu' wrapper does."""
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    b, _, kv, g, d = q.shape
    qh = (q[:, 0].astype(jnp.float32) / math.sqrt(d)).astype(kc.dtype).reshape(b, kv * g, d)
    unit = k_splits * pages_per_compute_block
    table = jnp.pad(table, ((0, 0), (0, -table.shape[1] % unit)))
    out = paged_attention(qh, kc, vc, table, lengths, block_h=16, pages_per_compute_block=pages_per_compute_block,
                          k_splits=k_splits, num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    return out.reshape(q.shape)


def make_inputs(shape, kv, d, bs, dtype, seed=0):
    """q (B, 1, KV, 1, D); a pool of exactly the rows' pages (+ page 0, the table's padding),
    scattered; table (B, width); every row `ctx` tokens long."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    b, ctx, width = shape
    used = -(-ctx // bs)
    pages = b * used + 1
    kq, kk, kvk = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (b, 1, kv, 1, d), dtype)
    k, v = (tiled_normal(key, (kv, pages, bs, d), dtype) for key in (kk, kvk))
    table = np.zeros((b, width), np.int32)
    table[:, :used] = np.random.default_rng(seed).permutation(np.arange(1, pages)).reshape(b, used)
    lengths = jnp.full((b,), ctx, jnp.int32)
    kv_bytes = 2 * b * used * bs * kv * d * jnp.dtype(dtype).itemsize
    return (q, k, v, jnp.asarray(table), lengths), kv_bytes


def tiled_normal(key, shape, dtype, tile: int = 4096):
    """Random pages, `tile` of them drawn and repeated along the page axis: a pool of 2^31+
    elements (batch 256 x 2048 tokens) is never one random draw."""
    import jax
    import jax.numpy as jnp

    kv, pages, *rest = shape
    base = jax.random.normal(key, (kv, min(pages, tile), *rest), dtype)
    reps = -(-pages // base.shape[1])
    return jnp.broadcast_to(base[:, None], (kv, reps, *base.shape[1:])).reshape(kv, -1, *rest)[:, :pages]


def time_row(attn, inputs, kv_bytes, tiny: bool, repeats: int) -> float:
    """Seconds per call: a jitted loop of `iters` calls (each one's output the next query)."""
    import jax

    iters = 2 if tiny else max(3, min(100, round(0.01 / (kv_bytes / 1.5e12 + 5e-6))))

    @jax.jit
    def loop(q, k, v, table, lengths):
        return jax.lax.fori_loop(0, iters, lambda _, x: attn(x, k, v, table, lengths).astype(x.dtype), q)

    jax.block_until_ready(loop(*inputs))                      # compile + warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(*inputs))
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def relative_error(out, ref) -> float:
    """max |out - ref| / max |ref|, in fp32."""
    import jax.numpy as jnp

    out, ref = (jnp.asarray(a, jnp.float32) for a in (out, ref))
    return float(jnp.max(jnp.abs(out - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def run_worker(args) -> None:
    import jax

    from lumos_jax.inference.decode_attention import DECODE_ATTENTION

    dims = TINY if args.tiny else FULL
    rows = plan(args.tiny)
    cached = None
    for i in range(args.start, len(rows)):
        row = rows[i]
        emit(event="start", row=i)
        try:
            if cached is None or cached[0] != row["shape"]:
                cached = inputs = None                        # free the last pool first
                inputs, kv_bytes = make_inputs(row["shape"], **dims)
                cached = (row["shape"], inputs, kv_bytes, jax.jit(DECODE_ATTENTION["dot"])(*inputs))
            _, inputs, kv_bytes, reference = cached
            attn = attention_fn(row["variant"], row["params"])
            err = relative_error(jax.jit(attn)(*inputs), reference)
            t = time_row(attn, inputs, kv_bytes, args.tiny, args.repeats)
            gbps = kv_bytes / t / 1e9
            emit(row=i, us_per_call=round(t * 1e6, 2), gb_s=round(gbps, 1),
                 fraction_of_copy=round(gbps / COPY_GBPS, 3), kv_bytes=kv_bytes,
                 rel_err=float(f"{err:.3g}"), wrong=bool(not err <= REL_TOL),
                 device=jax.devices()[0].device_kind)
        except Exception as e:  # noqa: BLE001 - one bad setting loses only its row
            emit(row=i, error=f"{type(e).__name__}: {str(e)[:1000]}")


# -- driver ----------------------------------------------------------------------------------
def describe(row: dict) -> dict:
    b, ctx, width = row["shape"]
    return dict(variant=row["variant"], params=row["params"], batch=b, ctx=ctx, width=width)


def table_line(rec: dict) -> str:
    params = ",".join(f"{k}={v}" for k, v in rec["params"].items()) or "default"
    head = f"{rec['variant']:<15} {params:<60} b={rec['batch']:<4} ctx={rec['ctx']:<5} w={rec['width']:<4}"
    if "error" in rec:
        return f"{head} ERROR {rec['error'][:100]}"
    flag = "  WRONG" if rec.get("wrong") else ""
    return (f"{head} {rec['us_per_call']:>10.1f} us {rec['gb_s']:>8.1f} GB/s {rec['fraction_of_copy']:>6.3f}"
            f"  err {rec.get('rel_err', float('nan')):.2g}{flag}")


def start_worker(args, start: int):
    argv = [sys.executable, __file__, "--worker", "--start", str(start), "--repeats", str(args.repeats)]
    argv += ["--tiny"] if args.tiny else []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def drive(args) -> int:
    rows = plan(args.tiny)
    record = dict(card=None, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  rows=[])
    t0, start = time.monotonic(), 0

    def add(i, **kw):
        device = kw.pop("device", None)
        record["card"] = record["card"] or device
        rec = {**describe(rows[i]), **kw}
        record["rows"].append(rec)
        print(table_line(rec), flush=True)
        write_json(args.out, record)

    def skip_from(i):
        for j in range(i, len(rows)):
            add(j, error="skipped: past --budget")
        return len(rows)

    while start < len(rows):
        if time.monotonic() - t0 > args.budget:
            start = skip_from(start)
            break
        proc, lines = start_worker(args, start)
        current, done, tail = start, set(), []
        while True:
            left = args.budget - (time.monotonic() - t0)
            try:
                line = lines.get(timeout=max(1.0, min(args.row_timeout, left)))
            except queue.Empty:                               # a row hangs, or the budget is spent
                proc.kill()
                proc.wait()
                if time.monotonic() - t0 < args.budget:
                    add(current, error=f"timed out after {args.row_timeout:.0f}s")
                    start = current + 1
                else:
                    start = skip_from(current)
                break
            if line is None:                                  # the worker ended
                rc = proc.wait()
                if current not in done:                       # ... inside a row: that row failed
                    add(current, error=f"worker exited with {rc}: {' | '.join(tail[-3:])}")
                start = current + 1
                break
            if not line.startswith(RESULT):
                tail = (tail + [line.rstrip()])[-10:]
            else:
                msg = json.loads(line[len(RESULT):])
                if msg.pop("event", None) == "start":
                    current = msg["row"]
                else:
                    done.add(msg["row"])
                    add(msg.pop("row"), **msg)
    failed = sum("error" in r for r in record["rows"])
    wrong = sum(bool(r.get("wrong")) for r in record["rows"])
    print(f"{len(record['rows'])} rows, {failed} failed or skipped, {wrong} wrong (rel_err > {REL_TOL}), "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    return 1 if wrong else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, interpret mode on CPU (a check)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--row-timeout", type=float, default=60.0, help="seconds one row may take (compile included)")
    p.add_argument("--budget", type=float, default=220.0, help="seconds for the whole sweep")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
