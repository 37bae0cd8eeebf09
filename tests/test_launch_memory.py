"""The memory estimate's parameter accounting: sizes against Hugging Face's Llama, and
per-device shards against the shardings JAX actually builds."""

import math

import jax
import pytest

from launch.memory import GIB, estimate, sharded_param_elements
from launch.topology import Mesh
from lumos_jax.models import PRESETS, abstract_model
from lumos_jax.sharding import make_mesh, state_shardings


@pytest.mark.parametrize("preset", ["llama2_7b", "llama2_13b"])
def test_parameter_count_matches_hf(preset):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = PRESETS[preset]
    hf_config = LlamaConfig(**{k: v for k, v in ours.to_hf_dict().items()
                               if k not in ("architectures", "torch_dtype", "dtype")})
    with torch.device("meta"):
        hf_count = sum(p.numel() for p in LlamaForCausalLM(hf_config).parameters())
    per_device, _ = sharded_param_elements(ours, Mesh(1, 1, 1))
    assert per_device == hf_count
    assert estimate(ours, Mesh(1, 1, 1)).params == 4 * hf_count  # fp32


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 1, 4)])
def test_shard_sizes_match_jax(shape):
    from flax import nnx

    config = PRESETS["tiny"]
    mesh = make_mesh(*shape)
    state = nnx.state(abstract_model(config), nnx.Param)
    shardings = state_shardings(state, mesh)
    values = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    actual = sum(math.prod(s.shard_shape(v.get_value().shape)) for v, s in zip(values, specs))
    assert sharded_param_elements(config, Mesh(*shape))[0] == actual


def test_fsdp_divides_state_and_accumulation_adds_a_buffer():
    cfg = PRESETS["llama2_7b"]
    small, big = estimate(cfg, Mesh(1, 8, 1)), estimate(cfg, Mesh(1, 128, 1))
    assert small.accumulation_steps == 16 and big.accumulation_steps == 1
    assert small.gradients == 2 * small.params  # gradient + accumulator
    assert big.gradients == big.params
    assert small.params / big.params == pytest.approx(16, rel=0.01)
    # 7B on 8 devices: ~108 GB of fp32 state / 8 (+ an accumulator) plus activations
    assert 15 < small.total / GIB < 22
