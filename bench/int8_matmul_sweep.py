"""x @ int8 weight alone at the Llama-2-7B decode shapes: our Pallas GPU kernel
(lumos_jax.inference.int8_matmul_gpu, its defaults and a small grid of its parameters) against
XLA's int8 path (`quant.qeinsum`: the codes converted inside XLA's dot, the engine's 'xla') and
a bf16 dot of the same shape (what bf16 weights cost).

Shapes: M (rows: the decode batch) 1 / 64 first, with the grids, then 16 / 256 (defaults
only); (K, N) = (4096, 12288) fused q/k/v, (4096, 4096) o_proj, (4096, 22016) gate/up,
(11008, 4096) down; x bf16, per-channel fp32 scales. A row's figure: microseconds per call (a
jitted loop of calls, each one's input nudged by the last one's output so that none is hoisted
or merged; best of --repeats after a warm-up), and the weight bandwidth: the weight's bytes
(int8 codes + scales; bf16 for the bf16 dot) / time, also as a fraction of the H200's measured
copy bandwidth (3.36 TB/s). Each row's output is checked against XLA's int8 path on the same
inputs (`rel_err` = max |out - xla| / max |xla|; past REL_TOL the row is marked `wrong`; the
bf16 dot multiplies the dequantized weight rounded to bf16).

Rows run in a worker process; a row past --row-timeout (SIGALRM, which also ends a hung
compile) or a crash loses only that row (the worker restarts after it); rows past --budget
seconds are recorded as skipped. JSON {"card", "date", "rows"} to --out after each row.

    python bench/int8_matmul_sweep.py --out $OUT/int8_matmul_sweep.json     # GPU, < 3 min
    python bench/int8_matmul_sweep.py --tiny --out /tmp/int8_sweep.json      # CPU check (interpret mode)
"""

from __future__ import annotations

import argparse
import datetime
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.decode_attention_sweep import COPY_GBPS, REL_TOL, relative_error  # noqa: E402
from bench.decode import timed  # noqa: E402
from bench.sides import emit, run_side, write_json  # noqa: E402
SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]   # (K, N)
# M = 1: each way of multiplying a tile, a few tiles and warps, splits off / doubled
M1_GRID = [dict(mode="fma", block_n=256, block_k=32, num_warps=4), dict(mode="fma", block_n=128, block_k=64),
           dict(mode="fma", block_n=512, block_k=16, num_warps=8), dict(mode="fma", block_n=256, block_k=32, num_warps=8),
           dict(mode="fma", prefetch=False), dict(mode="fma", k_splits=1),
           dict(mode="reduce", block_n=256, block_k=64), dict(mode="reduce", block_n=128, block_k=128, num_warps=8),
           dict(mode="dot", block_n=128, block_k=128, num_stages=3), dict(mode="dot", block_n=64, block_k=256, num_stages=4)]
# M = 64: tensor-core tiles, pipelining depth, row blocks, splits
M64_GRID = [dict(block_n=128, block_k=128, num_stages=4), dict(block_n=64, block_k=128, num_stages=3),
            dict(block_n=128, block_k=64, num_stages=5, num_warps=8), dict(block_n=256, block_k=64, num_warps=8),
            dict(block_m=16), dict(block_m=32, block_n=64), dict(k_splits=1), dict(k_splits=4),
            dict(block_n=64, k_splits=4)]


def plan(tiny: bool) -> list[dict]:
    """The rows, most wanted first: M = 1 and 64 with the grids, then 16 and 256."""
    if tiny:
        shapes, key, rest = [(256, 384), (136, 120)], (1, 5), ()
        grids = {1: [M1_GRID[0], M1_GRID[6], M1_GRID[8]], 5: [dict(block_n=32, block_k=32, k_splits=2)]}
    else:
        shapes, key, rest, grids = SHAPES, (1, 64), (16, 256), {1: M1_GRID, 64: M64_GRID}
    rows = []
    for m in key + rest:
        for k, n in shapes:
            rows += [dict(variant=v, params={}, m=m, k=k, n=n) for v in ("pallas_gpu", "xla", "bf16")]
            rows += [dict(variant="pallas_gpu", params=p, m=m, k=k, n=n) for p in grids.get(m, ())]
    return rows


# -- worker ----------------------------------------------------------------------------------
def make_inputs(m, k, n, seed=0):
    import jax
    import jax.numpy as jnp

    kx, kq, ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    q = jax.random.randint(kq, (k, n), -127, 128, jnp.int32).astype(jnp.int8)
    scale = jax.random.uniform(ks, (1, n), jnp.float32, 0.5, 1.5) / (127 * k ** 0.5)
    return x, q, scale


def matmul_fn(variant: str, params: dict):
    """(x, q, scale) -> (M, N) bf16."""
    import jax.numpy as jnp

    from lumos_jax.inference.int8_matmul_gpu import int8_matmul
    from lumos_jax.inference.quant import QTensor, qeinsum

    if variant == "pallas_gpu":
        return lambda x, q, s: int8_matmul(x, q, s, **params)
    if variant == "xla":
        return lambda x, q, s: qeinsum("mk,kn->mn", x, QTensor(q, s))
    return lambda x, w, _: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)   # bf16 weight


def time_row(fn, args, weight_bytes, tiny: bool, repeats: int):
    """(seconds per call, the last call's output): a jitted loop of `iters` calls, x nudged by
    each output (a dependency; 1e-30 of an output leaves bf16 x as it is), one compile a row."""
    import jax

    iters = 2 if tiny else max(3, min(200, round(0.01 / (weight_bytes / 3e12 + 5e-6))))

    @jax.jit
    def loop(x, w, s):
        def body(_, carry):
            y = fn(carry[0], w, s)
            return carry[0] + (y[:1, :1] * 1e-30).astype(x.dtype), y
        return jax.lax.fori_loop(0, iters, body, (x, fn(x, w, s)))[1]

    out = []
    run = lambda: out.append(jax.block_until_ready(loop(*args)))  # noqa: E731
    run()                                                      # compile + warm-up
    return timed(run, repeats) / iters, out[0]


def figures(seconds: float, weight_bytes: int, err: float) -> dict:
    gbps = weight_bytes / seconds / 1e9
    return dict(us_per_call=round(seconds * 1e6, 2), gb_s=round(gbps, 1), fraction_of_copy=round(gbps / COPY_GBPS, 3),
                weight_bytes=weight_bytes, rel_err=float(f"{err:.3g}"), wrong=bool(not err <= REL_TOL))


def run_worker(args) -> None:
    import jax
    import jax.numpy as jnp

    signal.signal(signal.SIGALRM, signal.SIG_DFL)            # the alarm ends the process, even in C++
    rows = plan(args.tiny)
    cached = None
    for i in range(args.start, len(rows)):
        row = rows[i]
        emit(event="start", row=i)
        signal.alarm(max(1, int(args.row_timeout)))
        try:
            shape = (row["m"], row["k"], row["n"])
            if cached is None or cached[0] != shape:
                cached = None
                x, q, s = make_inputs(*shape)
                cached = (shape, (x, q, s), jax.jit(matmul_fn("xla", {}))(x, q, s))
            _, (x, q, s), reference = cached
            fn = matmul_fn(row["variant"], row["params"])
            bf16 = row["variant"] == "bf16"     # the dequantized weight in bf16
            args_ = (x, (q.astype(jnp.float32) * s).astype(jnp.bfloat16), s) if bf16 else (x, q, s)
            weight_bytes = args_[1].nbytes + (0 if bf16 else s.nbytes)
            seconds, out = time_row(fn, args_, weight_bytes, args.tiny, args.repeats)
            err = relative_error(out, reference)
            emit(row=i, device=jax.devices()[0].device_kind, **figures(seconds, weight_bytes, err))
        except Exception as e:  # noqa: BLE001 - one bad setting loses only its row
            emit(row=i, error=f"{type(e).__name__}: {str(e)[:1000]}")
        signal.alarm(0)


# -- driver ----------------------------------------------------------------------------------
LINE = "{variant:<11} {p:<58} m={m:<4} k={k:<6} n={n:<6} "
FIGURES = "{us_per_call:>9.1f} us {gb_s:>8.1f} GB/s {fraction_of_copy:>6.3f}  err {rel_err:.2g}"


def table_line(rec: dict) -> str:
    head = LINE.format(p=",".join(f"{k}={v}" for k, v in rec["params"].items()) or "default", **rec)
    if "error" in rec:
        return head + "ERROR " + rec["error"][:100]
    return head + FIGURES.format(**rec) + "  WRONG" * rec["wrong"]


def drive(args) -> int:
    rows = plan(args.tiny)
    record = dict(card=None, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  rows=[])
    t0, start, lines = time.monotonic(), 0, []

    def add(i, **kw):
        record["card"] = record["card"] or kw.pop("device", None)
        kw.pop("device", None)
        rec = {**rows[i], **kw}
        record["rows"].append(rec)
        lines.append(table_line(rec))
        write_json(args.out, record)

    while start < len(rows):
        left = args.budget - (time.monotonic() - t0)
        if left <= 0:
            for j in range(start, len(rows)):
                add(j, error="skipped: past --budget")
            break
        state = dict(current=start, done=set())

        def on_result(msg):
            if msg.pop("event", None) == "start":
                state["current"] = msg["row"]
            else:
                state["done"].add(msg["row"])
                add(msg.pop("row"), **msg)

        argv = [sys.executable, __file__, "--worker", "--start", str(start), "--repeats", str(args.repeats),
                "--row-timeout", str(args.row_timeout)] + ["--tiny"] * args.tiny
        err = run_side(argv, REPO, left, on_result)
        current = state["current"]
        if current not in state["done"]:                     # the worker ended inside a row
            rc = (err or {}).get("rc")
            why = (f"past --row-timeout ({args.row_timeout:.0f}s)" if rc == -signal.SIGALRM
                   else "past --budget" if "error" in (err or {}) else f"worker exited with {rc}")
            add(current, error=f"{why}: {' | '.join((err or {}).get('tail', [])[-3:])}"[:1000])
        start = current + 1
    recs = record["rows"]
    wrong = sum(bool(r.get("wrong")) for r in recs)
    lines.append(f"{len(recs)} rows, {sum('error' in r for r in recs)} failed or skipped, {wrong} wrong "
                 f"(rel_err > {REL_TOL}), {time.monotonic() - t0:.0f} s")
    print("\n".join(lines), flush=True)   # the table again, after the workers' output
    return 1 if wrong else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="JSON results file")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, interpret mode on CPU (a check)")
    p.add_argument("--repeats", type=int, default=3, help="timed loops per row (the best counts)")
    p.add_argument("--row-timeout", type=float, default=30.0, help="seconds a row may take, compiles included")
    p.add_argument("--budget", type=float, default=170.0, help="seconds for all rows (the rest: skipped)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return run_worker(args) or 0 if args.worker else drive(args)


if __name__ == "__main__":
    sys.exit(main())
