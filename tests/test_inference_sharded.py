"""Tensor-parallel decode on fake CPU devices gives the same tokens as one device."""

import jax
import numpy as np
import pytest

from inference_helpers import STORIES, random_prompts

from lumos_jax.checkpoints.hf import load_hf_model
from lumos_jax.inference import Engine, SamplingParams
from lumos_jax.sharding import make_mesh

PROMPTS = random_prompts(np.random.default_rng(4), 5, 1, 15, 512)
PARAMS = SamplingParams(max_new_tokens=10)


@pytest.fixture(scope="module")
def single_device_tokens():
    engine = Engine(load_hf_model(STORIES), num_slots=4, max_len=128, steps_per_call=8)
    return [r.tokens for r in engine.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("data,tensor,source", [(1, 2, "orbax"), (2, 4, "hf")])
def test_sharded_decode_matches_single_device(single_device_tokens, tmp_path, data, tensor, source):
    assert len(jax.devices()) >= 8, "conftest sets 8 fake CPU devices"
    path = STORIES
    if source == "orbax":
        from lumos_jax.checkpoints.native import save_native

        path = save_native(load_hf_model(STORIES), tmp_path / "native")
    mesh = make_mesh(data=data, fsdp=1, tensor=tensor, devices=jax.devices()[: data * tensor])
    engine = Engine.from_path(path, mesh=mesh, num_slots=4, max_len=64, steps_per_call=8)
    # weights and cache really are split: kv heads over `tensor`, slots over `data`
    assert engine.params["layers"][0]["wqkv"].sharding.spec[1] == "tensor"
    assert engine.params["lm_head"].sharding.spec[1] == "tensor"
    cache_sharding = engine.cache.k[0].sharding
    cache_spec = cache_sharding.spec
    assert cache_spec[1] == "tensor" and (data == 1 or cache_spec[0] in ("data", ("data",)))
    results = engine.generate(PROMPTS, PARAMS)
    assert [r.tokens for r in results] == single_device_tokens
    assert engine.cache.k[0].sharding.is_equivalent_to(cache_sharding, 4)
