"""Multi-host start-up: `jax.distributed.initialize` from gin or the environment.

TPU pods: `auto=True` lets JAX find the coordinator itself. GPU/CPU clusters: a
coordinator address, process count and id, from gin or LUMOS_COORDINATOR_ADDRESS /
LUMOS_NUM_PROCESSES / LUMOS_PROCESS_ID (or the JAX_* equivalents). Single process
when none is given.
"""

from __future__ import annotations

import os

import gin
import jax


def _env(*names):
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None


@gin.configurable
def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False,
                           local_device_ids=None) -> bool:
    """Join the job's processes; True when running multi-process. Call before any jax op."""
    address = coordinator_address or _env("LUMOS_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
    count = num_processes if num_processes is not None else _env("LUMOS_NUM_PROCESSES", "JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env("LUMOS_PROCESS_ID", "JAX_PROCESS_ID")
    if address is None and not auto:
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if address is not None:
        if count is None or pid is None:
            raise ValueError("initialize_distributed: a coordinator address needs num_processes and "
                             "process_id (gin or LUMOS_NUM_PROCESSES / LUMOS_PROCESS_ID)")
        if (os.environ.get("JAX_PLATFORMS") or "").startswith("cpu"):
            # CPU processes need a collectives backend to run cross-process computations.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, int(count), int(pid), local_device_ids=local_device_ids)
    else:
        jax.distributed.initialize()
    return jax.process_count() > 1


@gin.configurable
def single_device_list() -> list:
    """[the first device]: for `make_mesh.devices` in gin/mesh/single_device.gin."""
    return jax.devices()[:1]
