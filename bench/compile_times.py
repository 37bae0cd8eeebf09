"""Compile time of the train step (ahead of time, no weights allocated) per model preset.

The step is lowered on abstract state and batch (ShapeDtypeStructs carrying their
shardings), so a 7B step compiles on any card whether or not its state would fit.
Issue 17 wants the 7B train step's compile time before and after scanning the layers;
run it from the old tree and the new one on the same card.

    python bench/compile_times.py --presets llama2_7b,tinyllama_1b --seq 1024 --batch 8 --out $OUT/compile.json
    python bench/compile_times.py --presets tiny --seq 64 --batch 2            # CPU check
    python bench/compile_times.py --presets tinyllama_1b --seq 2048 --batch 8 --attention cudnn \
        --scan_layers 1,0 --scan_unroll 1,2,4     # scanned (unroll 1, 2, 4) and unrolled

Each row also has the compiled step's memory_analysis (temp, argument, output GiB): what
XLA plans to hold, before anything runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.sides import layer_layouts  # noqa: E402
from lumos_jax.models import PRESETS  # noqa: E402
from lumos_jax.sharding import make_mesh  # noqa: E402
from lumos_jax.training import state as state_lib  # noqa: E402
from lumos_jax.training import step as step_lib  # noqa: E402


def train_step_compile_s(preset: str, seq: int, batch: int, remat: str, scan_layers: bool = True,
                         scan_unroll: int = 1, attention: str = "auto") -> dict:
    config = PRESETS[preset].replace(param_dtype="float32", dtype="bfloat16", remat_policy=remat,
                                     scan_layers=scan_layers, scan_unroll=scan_unroll,
                                     attention_impl=attention)
    mesh = make_mesh(1, -1, 1)
    with jax.set_mesh(mesh):
        setup = state_lib.build_setup(config, mesh, 1000, state_lib.optimizer_settings(learning_rate=1e-5))
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             setup.abstract_state, setup.shardings)
        bsh = step_lib.batch_sharding(setup)
        dtypes = {"loss_mask": jnp.float32}
        batch_abs = {k: jax.ShapeDtypeStruct((batch, seq), dtypes.get(k, jnp.int32), sharding=bsh)
                     for k in step_lib.BATCH_KEYS}
        step = step_lib.make_train_step(setup)
        t0 = time.perf_counter()
        lowered = step.lower(state, batch_abs)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    gib = lambda name: (None if getattr(mem, name, None) is None  # noqa: E731
                        else round(getattr(mem, name) / 2**30, 2))
    return {"preset": preset, "layers": config.num_hidden_layers, "seq": seq, "batch": batch,
            "remat": remat, "scan_layers": scan_layers, "scan_unroll": scan_unroll,
            "attention": config.attention_impl, "lower_s": round(t1 - t0, 2),
            "compile_s": round(t2 - t1, 2), "temp_gib": gib("temp_size_in_bytes"),
            "argument_gib": gib("argument_size_in_bytes"), "output_gib": gib("output_size_in_bytes"),
            "alias_gib": gib("alias_size_in_bytes"), "device": jax.devices()[0].device_kind}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="llama2_7b,tinyllama_1b")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--remat", default="none")
    p.add_argument("--scan_layers", default="1", help="1 = scanned, 0 = unrolled; a list (1,0) runs each")
    p.add_argument("--scan_unroll", default="1", help="scanned: layers per scan iteration; a list runs each")
    p.add_argument("--attention", default="auto", help="attention_impl: auto | xla | cudnn")
    p.add_argument("--tag", default="", help="e.g. old / new: which tree this run measured")
    p.add_argument("--out", help="JSON file (rewritten after every row)")
    args = p.parse_args(argv)
    rows = []
    layouts = layer_layouts(args.scan_layers.split(","), args.scan_unroll.split(","))
    for preset, (scan, unroll) in ((p_, lay) for p_ in args.presets.split(",") for lay in layouts):
        row = train_step_compile_s(preset, args.seq, args.batch, args.remat, scan, unroll, args.attention)
        row["tag"] = args.tag
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
