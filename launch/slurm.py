"""A SLURM batch job for GPU clusters: writes the sbatch script, then submits it.

    python -m launch.slurm --nodes=2 --gpus_per_node=8 --partition=gpu \
        --gin_file=experiments/x.gin --gin_file=mesh/gpu_2x8.gin

One JAX process per GPU (`--mode=per_gpu`, default) or per node (`per_node`). The
coordinator is the job's first node; process count and id come from SLURM
(`SLURM_NTASKS`, `SLURM_PROCID`, `SLURM_LOCALID`) through the variables of
`launch.env`. The job requeues itself shortly before its time limit and on
preemption; training then resumes from its last checkpoint (keep it on shared storage).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Sequence

from launch import cli_args
from launch.commands import LaunchError, Shell
from launch.xla_flags import PROFILES, gpu_env
from lumos_jax.atomic import write_atomic

REQUEUE_SIGNAL_SECONDS = 300  # USR1 this long before the time limit: time to save and requeue


def render_script(args, forwarded: Sequence[str]) -> str:
    per_gpu = args.mode == "per_gpu"
    tasks_per_node = args.gpus_per_node if per_gpu else 1
    out = args.output_dir.rstrip("/")
    lines = [
        "#!/bin/bash",
        f"# lumos-jax training, written by `python -m launch.slurm` ({args.mode}: "
        f"{args.nodes} node(s) x {args.gpus_per_node} GPU(s), {args.nodes * tasks_per_node} JAX processes).",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        f"#SBATCH --ntasks-per-node={tasks_per_node}",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
    ]
    if args.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={args.cpus_per_task}")
    lines.append(f"#SBATCH --time={args.time}")
    for flag, value in (("partition", args.partition), ("account", args.account), ("qos", args.qos)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [
        f"#SBATCH --output={out}/%x-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{REQUEUE_SIGNAL_SECONDS}",
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(args.workdir)}",
    ]
    if args.venv:
        lines.append(f"source {shlex.quote(args.venv.rstrip('/') + '/bin/activate')}")
    lines.append("")
    env = gpu_env(args.xla_flags)
    if env:
        lines.append("# Recommended XLA flags / env for H100 (launch/xla_flags.py).")
        lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    port = "$((61440 + SLURM_JOB_ID % 4096))"
    lines += [
        "# Multi-controller JAX (launch/env.py): process 0 on the first node coordinates.",
        'export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):'
        f'{port}"',
        'export JAX_NUM_PROCESSES="$SLURM_NTASKS"',
        "",
        "# Near the time limit SLURM sends USR1: requeue; SLURM then SIGTERMs the tasks,",
        "# training saves a checkpoint, and the requeued job resumes from it.",
        'requeue() { echo "lumos-jax: requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"; }',
        "trap requeue USR1",
        "",
        f"mkdir -p {shlex.quote(out)}",
    ]
    if per_gpu:
        device_ids = "$SLURM_LOCALID"
    else:
        # JAX's own SLURM detection would give each process only GPU $SLURM_LOCALID (= 0).
        device_ids = ",".join(str(i) for i in range(args.gpus_per_node))
    worker = shlex.join([args.python, "-m", *shlex.split(args.entry), *forwarded])
    task = f"export JAX_PROCESS_ID=$SLURM_PROCID JAX_LOCAL_DEVICE_IDS={device_ids}; exec {worker}"
    srun = ["srun", "--kill-on-bad-exit=1", f"--output={out}/%x-%j-%t.log"]
    if per_gpu:
        srun.append("--gpu-bind=none")  # each task sees all GPUs and picks its own
    lines += [
        f"{shlex.join(srun)} bash -c {shlex.quote(task)} &",
        'SRUN_PID=$!',
        "# `wait` returns early when USR1 arrives; keep waiting until srun has exited.",
        "while true; do",
        '  rc=0; wait "$SRUN_PID" || rc=$?',
        '  kill -0 "$SRUN_PID" 2>/dev/null || break',
        "done",
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None):
    """(launcher options, arguments for the training command)."""
    parser = cli_args.make_parser("python -m launch.slurm", __doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--mode", choices=("per_gpu", "per_node"), default="per_gpu")
    parser.add_argument("--job_name", default="lumos-jax")
    parser.add_argument("--time", default="24:00:00", help="SLURM time limit")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--cpus_per_task", type=int)
    parser.add_argument("--workdir", default=str(Path.cwd()),
                        help="the lumos-jax checkout on shared storage (default: here)")
    parser.add_argument("--venv", help="virtualenv to activate on the nodes, e.g. .venv")
    parser.add_argument("--output_dir", default="runs/slurm", help="script and logs (relative to --workdir)")
    parser.add_argument("--xla_flags", choices=PROFILES, default="h100")
    parser.add_argument("--python", default="python", help="Python on the compute nodes")
    parser.add_argument("--entry", default=cli_args.DEFAULT_ENTRY)
    args, forwarded = cli_args.parse(parser, argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus_per_node must be >= 1")
    return args, forwarded


def main(argv: Sequence[str] | None = None) -> int:
    args, forwarded = parse_args(argv)
    shell = Shell(dry_run=args.dry_run)
    script = render_script(args, forwarded)
    path = Path(args.output_dir) / f"{args.job_name}.sbatch"
    shell.note(f"SLURM job {args.job_name!r}: {args.nodes} node(s) x {args.gpus_per_node} GPU(s), {args.mode}")
    if args.dry_run:
        shell.show(f"cd {shlex.quote(args.workdir)}")
        shell.show(f"mkdir -p {shlex.quote(str(path.parent))}")
        shell.show(f"cat > {shlex.quote(str(path))} <<'SBATCH_EOF'\n{script}SBATCH_EOF")
    else:
        target = Path(args.workdir) / path if not path.is_absolute() else path
        write_atomic(target, script)
        print(f"wrote {target}")
    try:
        shell.run(["sbatch", str(path)], cwd=None if args.dry_run else args.workdir)
    except LaunchError as e:
        print(f"launch.slurm: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
