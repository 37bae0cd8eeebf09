"""The multi-controller environment contract between launchers and training.

Every launcher hands each JAX process these variables; the training code passes
them to `jax.distributed.initialize()` (TPU VMs need none: JAX detects the slice).
`JAX_COORDINATOR_ADDRESS` and `JAX_LOCAL_DEVICE_IDS` are read by JAX itself;
`JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` follow the same naming (JAX 0.10 does not read them).
"""

from __future__ import annotations

import os
import socket
from typing import Mapping, Sequence

COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"  # host:port of process 0
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"
LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"  # comma-separated, e.g. "3" (one GPU per process)


def distributed_env(coordinator: str, num_processes: int, process_id: int,
                    local_device_ids: Sequence[int] | None = None) -> dict[str, str]:
    """The variables one process of a `num_processes` job needs."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is outside 0..{num_processes - 1}")
    env = {COORDINATOR_ADDRESS: coordinator, NUM_PROCESSES: str(num_processes),
           PROCESS_ID: str(process_id)}
    if local_device_ids is not None:
        env[LOCAL_DEVICE_IDS] = ",".join(str(i) for i in local_device_ids)
    return env


def initialize_args_from_env(environ: Mapping[str, str] | None = None) -> dict | None:
    """kwargs for `jax.distributed.initialize` from the contract, or None when absent.

    Partial settings are an error: a job with a coordinator but no process id would
    otherwise hang waiting for peers.
    """
    environ = os.environ if environ is None else environ
    names = (COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID)
    present = [n for n in names if environ.get(n)]
    if not present:
        return None
    if len(present) != len(names):
        missing = ", ".join(n for n in names if n not in present)
        raise ValueError(f"multi-process environment is incomplete: {missing} not set "
                         f"(have {', '.join(present)})")
    try:
        num, pid = int(environ[NUM_PROCESSES]), int(environ[PROCESS_ID])
    except ValueError:
        raise ValueError(f"{NUM_PROCESSES}={environ[NUM_PROCESSES]!r} and {PROCESS_ID}="
                         f"{environ[PROCESS_ID]!r} must be integers") from None
    if not 0 <= pid < num:
        raise ValueError(f"{PROCESS_ID}={pid} is outside 0..{num - 1}")
    kwargs = dict(coordinator_address=environ[COORDINATOR_ADDRESS], num_processes=num,
                  process_id=pid)
    if environ.get(LOCAL_DEVICE_IDS):
        kwargs["local_device_ids"] = [int(i) for i in environ[LOCAL_DEVICE_IDS].split(",")]
    return kwargs


def free_port() -> int:
    """A TCP port free right now on this machine (for a local coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
