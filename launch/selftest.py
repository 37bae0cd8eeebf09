"""Check a multi-process JAX job before spending hours on it: every process joins,
sees every device, and a sum across all devices comes back right on every process.

    python -m launch.local --num_processes=2 --entry=launch.selftest      # CPU
    python -m launch.tpu_vm ... --entry="launch.selftest --auto"          # TPU slice
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from launch.env import initialize_args_from_env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--auto", action="store_true",
                        help="jax.distributed.initialize() with no arguments (TPU VM / SLURM detection)")
    args, _ = parser.parse_known_args(argv)

    kwargs = initialize_args_from_env()
    if kwargs is not None:
        jax.distributed.initialize(**kwargs)
    elif args.auto:
        jax.distributed.initialize()
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("all",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("all"))
    values = np.arange(n, dtype=np.float32)
    x = jax.make_array_from_callback((n,), sharding, lambda idx: values[idx])
    total = float(jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(x))
    expected = n * (n - 1) / 2
    ok = total == expected
    print(f"selftest: process {jax.process_index()}/{jax.process_count()} "
          f"local_devices={jax.local_device_count()} devices={n} sum={total:g} "
          f"expected={expected:g} {'ok' if ok else 'WRONG'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
