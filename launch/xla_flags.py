"""Recommended XLA flags and environment for H100 training (FSDP over NVLink / InfiniBand).

Why each: the latency-hiding scheduler overlaps FSDP all-gathers and gradient
reduce-scatters with compute; pipelining moves a layer's collective into the previous
loop iteration (scan over layers); combine thresholds merge small collectives into
~128 MiB ones (a starting point: tune per model). JAX reserves 75% of GPU memory by
default; 90% leaves room for NCCL and cuDNN workspaces. One CUDA queue keeps XLA's
launch order, which the overlap relies on (NVIDIA's advice for Hopper, not Blackwell).
An unknown flag aborts XLA at start-up, so tests check that this jaxlib accepts them.
"""

from __future__ import annotations

import os

H100_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
)

H100_ENV = {
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
}

PROFILES = ("h100", "none")


def gpu_env(profile: str = "h100", existing_xla_flags: str | None = None) -> dict[str, str]:
    """Environment for GPU workers; user-set XLA_FLAGS come last so they win."""
    if profile not in PROFILES:
        raise ValueError(f"unknown XLA flag profile {profile!r}; expected one of {', '.join(PROFILES)}")
    if profile == "none":
        return {}
    existing = os.environ.get("XLA_FLAGS", "") if existing_xla_flags is None else existing_xla_flags
    flags = " ".join([*H100_XLA_FLAGS, *existing.split()])
    return {"XLA_FLAGS": flags, **H100_ENV}
