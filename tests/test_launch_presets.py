"""Mesh presets in gin/mesh/: one per slice/cluster in launch.topology, each parsing
through gin into a mesh of exactly that many devices, and a usable shape for 7B/13B."""

import re
from pathlib import Path

import gin
import jax
import pytest

from launch.topology import GLOBAL_BATCH, gpu_presets, preset_gin_text, tpu_presets
from lumos_jax.config import GIN_DIR, parse_gin
from lumos_jax.models import PRESETS
from lumos_jax.sharding import make_mesh

TARGETS = [*tpu_presets(), *gpu_presets()]


def _devices(target):
    return getattr(target, "chips", None) or target.devices


def test_every_preset_file_is_the_table_and_nothing_else():
    on_disk = {p.stem for p in (GIN_DIR / "mesh").glob("*.gin") if re.match(r"(tpu|gpu)_", p.name)}
    assert on_disk == {t.preset for t in TARGETS}
    for t in TARGETS:
        assert (GIN_DIR / "mesh" / f"{t.preset}.gin").read_text() == preset_gin_text(t), \
            f"gin/mesh/{t.preset}.gin is stale: run python -m launch.topology"


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.preset)
def test_preset_builds_a_mesh_of_the_slice_size(target):
    parse_gin([f"mesh/{target.preset}.gin"])
    try:
        sizes = [gin.query_parameter(f"make_mesh.{axis}") for axis in ("data", "fsdp", "tensor")]
        n = _devices(target)
        assert sizes[0] * sizes[1] * sizes[2] == n
        assert GLOBAL_BATCH % (sizes[0] * sizes[1]) == 0  # the batch splits over data x fsdp
        for model in ("llama2_7b", "llama2_13b"):  # tensor splits heads evenly
            assert PRESETS[model].num_attention_heads % sizes[2] == 0
        if n <= len(jax.devices()):
            mesh = make_mesh(devices=jax.devices()[:n])
            assert dict(mesh.shape) == dict(zip(("data", "fsdp", "tensor"), sizes))
        else:  # on the wrong (too small) machine it must fail before any compile
            with pytest.raises(ValueError, match="make_mesh"):
                make_mesh()
    finally:
        gin.clear_config()


def test_docs_table_is_current():
    from launch.memory import memory_table

    doc = (Path(__file__).resolve().parent.parent / "docs" / "launch.md").read_text()
    assert memory_table() in doc, "docs/launch.md memory table is stale: python -m launch.memory"


def test_docs_attention_table_is_current():
    from launch.memory import attention_table

    doc = (Path(__file__).resolve().parent.parent / "docs" / "launch.md").read_text()
    assert attention_table() in doc, "docs/launch.md attention table is stale: python -m launch.memory --attention_table"
