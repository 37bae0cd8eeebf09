"""N CPU processes on this machine: a real multi-controller JAX job, for testing.

Each process gets `--devices_per_process` fake CPU devices and the coordinator
settings of `launch.env`; together they see num_processes x devices_per_process
devices, exactly like hosts of a pod. Collectives between processes use gloo.

    python -m launch.local --num_processes=2 --gin_file=experiments/tiny.gin
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from launch import cli_args
from launch.commands import Shell
from launch.env import distributed_env, free_port
from launch.procs import Worker, run_workers


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def worker_xla_flags(devices_per_process: int, existing: str | None = None) -> str:
    """The fake-device count, then the user's own XLA_FLAGS (default: this process's), kept
    and appended; a device count among them is dropped (--devices_per_process decides it)."""
    existing = os.environ.get("XLA_FLAGS", "") if existing is None else existing
    kept = [f for f in existing.split() if f.split("=", 1)[0] != DEVICE_COUNT_FLAG]
    return " ".join([f"{DEVICE_COUNT_FLAG}={devices_per_process}", *kept])


def build_workers(args, forwarded: Sequence[str]) -> list[Worker]:
    port = args.port or free_port()
    coordinator = f"127.0.0.1:{port}"
    workers = []
    for i in range(args.num_processes):
        env = {
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": worker_xla_flags(args.devices_per_process),
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            **distributed_env(coordinator, args.num_processes, i),
        }
        log = str(Path(args.log_dir) / f"process_{i}.log")
        workers.append(Worker(cli_args.worker_argv(args, forwarded), env, log))
    return workers


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli_args.make_parser("python -m launch.local", __doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1,
                        help="fake CPU devices in each process")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("--log_dir", default="runs/local", help="process_<i>.log go here")
    parser.add_argument("--echo", choices=("lead", "all", "none"), default="lead",
                        help="whose output to copy to the console")
    parser.add_argument("--timeout", type=float, default=None, help="stop all after this many seconds")
    cli_args.add_entry_argument(parser)
    args, forwarded = cli_args.parse(parser, argv)
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be >= 1")
    if args.dry_run and not args.port:
        args.port = 12355  # a dry run must print the same thing every time
    shell = Shell(dry_run=args.dry_run)
    workers = build_workers(args, forwarded)
    shell.note(f"{args.num_processes} CPU processes x {args.devices_per_process} devices, "
               f"coordinator {workers[0].env['JAX_COORDINATOR_ADDRESS']}")
    return run_workers(shell, workers, echo=args.echo, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
