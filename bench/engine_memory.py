"""Compiled memory of the engine's device programs at the buckets a run uses, on this device.

For each (kind, rows, tokens) it compiles the engine's prefill or decode program as the engine
calls it and prints XLA's memory analysis (temporaries, the donated pool aliased to the
output) and how much the device's high-water mark rose while compiling (XLA:GPU autotunes on
real buffers). A program that copies the pool shows temporaries near the pool's size.

    python bench/engine_memory.py --preset llama2_7b --kv_gb 20 --out $OUT/engine_memory.json   # GPU
    python bench/engine_memory.py --preset tiny --kv_gb 0.01                                    # CPU check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lumos_jax.inference import Engine, SamplingParams  # noqa: E402
from lumos_jax.inference.paged_slots import Slot, row_controls  # noqa: E402
from lumos_jax.inference.params import random_decode_params  # noqa: E402
from lumos_jax.inference.steps import decode_loop, prefill_step  # noqa: E402
from lumos_jax.models import PRESETS  # noqa: E402

# the 7B eval's buckets (num_slots 512, max_prefill_tokens 16384)
SHAPES = [("decode", r, 1) for r in (16, 64, 256, 512)] + [
    ("prefill", r, t) for r, t in ((4, 64), (256, 64), (16, 1024), (4, 4096), (64, 256))]


def compile_program(e: Engine, kind: str, rows: int, tokens: int):
    controls = row_controls([Slot(SamplingParams(), None, False)] * rows)
    z = np.zeros(rows, np.int32)
    table = np.zeros((rows, e.memory.max_blocks), np.int32)
    if kind == "prefill":
        return prefill_step.lower(e.params, e.cache, table, np.zeros((rows, tokens), np.int32), z, z, controls,
                                  spec=e.spec, cache_sharding=e.cache_sharding).compile()
    return decode_loop.lower(e.params, e.cache, table, z, z, z, np.zeros(rows, bool), z, controls, spec=e.spec,
                             steps=e.steps_per_call, cache_sharding=e.cache_sharding,
                             attention=e.decode_attention).compile()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama2_7b")
    p.add_argument("--kv_gb", type=float, default=20.0, help="the pool (K + V), GiB")
    p.add_argument("--num_slots", type=int, default=512)
    p.add_argument("--max_len", type=int, default=4096)
    p.add_argument("--max_prefill_tokens", type=int, default=16384)
    p.add_argument("--scan_layers", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--out")
    args = p.parse_args(argv)
    cfg = PRESETS[args.preset].replace(dtype="bfloat16", param_dtype="bfloat16")
    if args.preset == "llama2_7b":
        cfg = cfg.replace(vocab_size=32001)
    params, spec = random_decode_params(cfg, jax.random.PRNGKey(0), "bfloat16")
    scan = {"auto": "auto", "true": True, "false": False}[args.scan_layers]
    e = Engine.from_params(cfg, params, spec, num_slots=args.num_slots, max_len=args.max_len,
                           max_prefill_tokens=args.max_prefill_tokens, kv_memory_gb=args.kv_gb,
                           cache_dtype="bfloat16", scan_layers=scan)
    jax.block_until_ready(e.cache)
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)
    pool = sum(x.nbytes for x in jax.tree.leaves(e.cache))
    record = {"device": jax.devices()[0].device_kind, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "preset": args.preset, "pool_gib": round(pool / 2**30, 3), "reserve_gib": round(e.reserve_bytes / 2**30, 3),
              "attention": e.decode_attention, "scan_layers": e.scan_layers, "rows": []}
    shapes = [(k, min(r, args.num_slots), min(t, args.max_len)) for k, r, t in SHAPES]
    for kind, rows, tokens in dict.fromkeys(shapes):
        before = (stats() or {}).get("peak_bytes_in_use", 0)
        t0 = time.perf_counter()
        m = compile_program(e, kind, rows, tokens).memory_analysis()
        row = dict(kind=kind, rows=rows, tokens=tokens, compile_s=round(time.perf_counter() - t0, 1),
                   temp_gib=round(m.temp_size_in_bytes / 2**30, 3), alias_gib=round(m.alias_size_in_bytes / 2**30, 3),
                   compile_peak_rise_gib=round(((stats() or {}).get("peak_bytes_in_use", 0) - before) / 2**30, 3))
        record["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
