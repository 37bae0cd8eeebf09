"""Slices and hosts we launch on, and the mesh preset chosen for each.

TPU accelerator types name TensorCores for v4/v5p (2 per chip) and chips for
v5e/v6e; hosts hold 4 chips except single-host v5e/v6e slices (up to 8 chips).
The mesh preset for a slice is `gin/mesh/<preset>.gin` (see `docs/launch.md`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lumos_jax.atomic import write_atomic

GLOBAL_BATCH = 128  # the reference recipe's global batch (sequences)


@dataclass(frozen=True)
class Generation:
    name: str            # v4, v5e, v5p, v6e
    type_prefix: str     # accelerator-type prefix: "v4-", "v5litepod-", ...
    cores_per_chip: int  # the accelerator-type number counts cores (v4, v5p) or chips
    hbm_gib: float       # per chip
    runtime_version: str  # TPU VM software version for `gcloud ... --version`
    max_single_host_chips: int


TPU_GENERATIONS = {
    "v4": Generation("v4", "v4-", 2, 32, "tpu-ubuntu2204-base", 4),
    "v5e": Generation("v5e", "v5litepod-", 1, 16, "v2-alpha-tpuv5-lite", 8),
    "v5p": Generation("v5p", "v5p-", 2, 95, "v2-alpha-tpuv5", 4),
    "v6e": Generation("v6e", "v6e-", 1, 32, "v2-alpha-tpuv6e", 8),
}
CHIPS_PER_HOST = 4  # every multi-host slice of these generations


@dataclass(frozen=True)
class Mesh:
    data: int
    fsdp: int
    tensor: int

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor


@dataclass(frozen=True)
class TpuSlice:
    generation: Generation
    accelerator_type: str  # e.g. "v4-32"
    chips: int

    @property
    def hosts(self) -> int:
        if self.chips <= self.generation.max_single_host_chips:
            return 1
        return self.chips // CHIPS_PER_HOST

    @property
    def preset(self) -> str:
        return f"tpu_{self.generation.name}_{self.accelerator_type.split('-')[-1]}"

    @property
    def hbm_gib(self) -> float:
        return self.generation.hbm_gib

    @property
    def mesh(self) -> Mesh:
        return default_mesh(self.chips, hosts=self.hosts, devices_per_host=self.chips // self.hosts,
                            fsdp_across_hosts=True)


def parse_accelerator_type(accelerator_type: str) -> TpuSlice:
    """`v4-32`, `v5litepod-16`, `v5p-8`, `v6e-64` -> TpuSlice; anything else: one-line error."""
    for gen in TPU_GENERATIONS.values():
        m = re.fullmatch(re.escape(gen.type_prefix) + r"(\d+)", accelerator_type)
        if m:
            n = int(m.group(1))
            chips, rem = divmod(n, gen.cores_per_chip)
            if rem or chips < 1 or chips & (chips - 1):
                break
            if chips > gen.max_single_host_chips and chips % CHIPS_PER_HOST:
                break
            return TpuSlice(gen, accelerator_type, chips)
    known = ", ".join(f"{g.type_prefix}N" for g in TPU_GENERATIONS.values())
    raise ValueError(f"unknown TPU accelerator type {accelerator_type!r}; expected one of {known} "
                     "with N a power of two (v4/v5p count TensorCores, 2 per chip)")


@dataclass(frozen=True)
class GpuCluster:
    nodes: int
    gpus_per_node: int
    hbm_gib: float = 80  # H100 SXM

    @property
    def devices(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def preset(self) -> str:
        return f"gpu_{self.nodes}x{self.gpus_per_node}"

    @property
    def mesh(self) -> Mesh:
        # FSDP inside a node (NVLink), data parallel across nodes (the slower network).
        return default_mesh(self.devices, hosts=self.nodes, devices_per_host=self.gpus_per_node,
                            fsdp_across_hosts=False)


def default_mesh(devices: int, *, hosts: int, devices_per_host: int, fsdp_across_hosts: bool) -> Mesh:
    """Pure FSDP where the interconnect allows, keeping data x fsdp <= the global batch.

    TPU ICI spans the whole slice, so FSDP covers every chip. GPU nodes talk over
    a slower network, so FSDP stays inside a node and nodes are data-parallel. When
    there are more devices than sequences in the global batch, the rest go to tensor.
    """
    if fsdp_across_hosts:
        data, fsdp = 1, devices
    else:
        data, fsdp = hosts, devices_per_host
    tensor = 1
    while data * fsdp > GLOBAL_BATCH:
        fsdp //= 2
        tensor *= 2
    return Mesh(data, fsdp, tensor)


# The slices and clusters that ship a preset (gin/mesh/<preset>.gin).
TPU_PRESET_TYPES = (
    "v4-8", "v4-16", "v4-32", "v4-64", "v4-128",
    "v5litepod-8", "v5litepod-16", "v5litepod-32", "v5litepod-64", "v5litepod-128", "v5litepod-256",
    "v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128",
    "v6e-8", "v6e-16", "v6e-32", "v6e-64", "v6e-128", "v6e-256",
)
GPU_PRESET_SHAPES = ((1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8))


def tpu_presets() -> list[TpuSlice]:
    return [parse_accelerator_type(t) for t in TPU_PRESET_TYPES]


def gpu_presets() -> list[GpuCluster]:
    return [GpuCluster(n, g) for n, g in GPU_PRESET_SHAPES]


def preset_gin_text(target: TpuSlice | GpuCluster) -> str:
    """The gin file for one slice / cluster (what `gin/mesh/<preset>.gin` holds)."""
    mesh = target.mesh
    if isinstance(target, TpuSlice):
        where = (f"TPU {target.accelerator_type}: {target.chips} chips on {target.hosts} "
                 f"host{'s' if target.hosts > 1 else ''}, {target.hbm_gib:g} GiB HBM per chip.")
        why = "FSDP over the whole slice (ICI is fast enough for per-layer all-gathers)"
    else:
        where = (f"GPUs: {target.nodes} node{'s' if target.nodes > 1 else ''} x "
                 f"{target.gpus_per_node} H100 80GB.")
        why = ("FSDP inside a node (NVLink), data parallel across nodes"
               if target.nodes > 1 else "FSDP over the node's GPUs")
    if mesh.tensor > 1:
        why += f"; tensor={mesh.tensor} keeps data x fsdp <= the global batch of {GLOBAL_BATCH}"
    lines = [
        f"# Mesh preset for {where}",
        f"# {why}.",
        "# Sizes are explicit (no -1) so running on the wrong slice fails before compiling.",
        "# Memory per device for 7B / 13B full fine-tunes: docs/launch.md.",
        f"make_mesh.data = {mesh.data}",
        f"make_mesh.fsdp = {mesh.fsdp}",
        f"make_mesh.tensor = {mesh.tensor}",
    ]
    if isinstance(target, TpuSlice):
        lines += ["# Pallas splash attention block sizes for this generation (docs/launch.md).",
                  f"splash_attention.generation = '{target.generation.name}'"]
    return "\n".join(lines) + "\n"


def write_presets(gin_dir) -> list[str]:
    """Write every preset file; returns their names. Run: python -m launch.topology."""
    out = []
    for target in [*tpu_presets(), *gpu_presets()]:
        path = Path(gin_dir) / "mesh" / f"{target.preset}.gin"
        write_atomic(path, preset_gin_text(target))
        out.append(path.name)
    return out


if __name__ == "__main__":
    names = write_presets(Path(__file__).resolve().parent.parent / "gin")
    print("\n".join(names))
