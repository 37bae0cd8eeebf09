"""All GPUs of one host: one process driving every GPU, or one process per GPU.

    python -m launch.gpu_local --num_gpus=8 --gin_file=experiments/x.gin --gin_file=mesh/gpu_1x8.gin
    python -m launch.gpu_local --num_gpus=8 --mode=per_gpu ...   # like SLURM's one task per GPU

`single` is the simple default (no coordinator; XLA drives all GPUs from one
process). `per_gpu` starts one JAX process per GPU (`JAX_LOCAL_DEVICE_IDS=i`),
which avoids one Python thread launching work on 8 GPUs and rehearses a multi-node job.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from launch import cli_args
from launch.commands import Shell
from launch.env import distributed_env, free_port
from launch.procs import Worker, run_workers
from launch.xla_flags import PROFILES, gpu_env


def build_workers(args, forwarded: Sequence[str]) -> list[Worker]:
    visible = ",".join(str(i) for i in range(args.num_gpus))
    base = {"CUDA_VISIBLE_DEVICES": visible, **gpu_env(args.xla_flags)}
    argv = cli_args.worker_argv(args, forwarded)
    log_dir = Path(args.log_dir)
    if args.mode == "single":
        return [Worker(argv, base, str(log_dir / "process_0.log"))]
    coordinator = f"127.0.0.1:{args.port or free_port()}"
    return [Worker(argv, {**base, **distributed_env(coordinator, args.num_gpus, i, [i])},
                   str(log_dir / f"process_{i}.log")) for i in range(args.num_gpus)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli_args.make_parser("python -m launch.gpu_local", __doc__.splitlines()[0])
    parser.add_argument("--num_gpus", type=int, required=True)
    parser.add_argument("--mode", choices=("single", "per_gpu"), default="single")
    parser.add_argument("--xla_flags", choices=PROFILES, default="h100",
                        help="recommended XLA flags and env (launch/xla_flags.py); your XLA_FLAGS are appended")
    parser.add_argument("--port", type=int, default=0, help="coordinator port for per_gpu (default: a free one)")
    parser.add_argument("--log_dir", default="runs/gpu_local")
    parser.add_argument("--echo", choices=("lead", "all", "none"), default="lead")
    cli_args.add_entry_argument(parser)
    args, forwarded = cli_args.parse(parser, argv)
    if args.num_gpus < 1:
        parser.error("--num_gpus must be >= 1")
    if args.dry_run and not args.port:
        args.port = 12355
    shell = Shell(dry_run=args.dry_run)
    workers = build_workers(args, forwarded)
    if args.mode == "single":
        shell.note(f"one process driving {args.num_gpus} GPU(s)")
    else:
        shell.note(f"{args.num_gpus} processes, one GPU each (JAX_LOCAL_DEVICE_IDS), coordinator "
                   f"{workers[0].env['JAX_COORDINATOR_ADDRESS']}")
    return run_workers(shell, workers, echo=args.echo)


if __name__ == "__main__":
    sys.exit(main())
