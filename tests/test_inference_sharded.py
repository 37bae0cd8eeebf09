"""Tensor-parallel decode on fake CPU devices gives the same tokens as one device, for the
Engine and for the agent path (gin mesh files through the one inference loader)."""

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
    # weights and KV pages really are split: kv heads over `tensor`
    assert engine.params["layers"]["wqkv"].sharding.spec[2] == "tensor"
    assert engine.params["lm_head"].sharding.spec[1] == "tensor"
    cache_sharding = engine.cache.k.sharding
    assert cache_sharding.spec[0] == "tensor"
    results = engine.generate(PROMPTS, PARAMS)
    assert [r.tokens for r in results] == single_device_tokens
    assert engine.cache.k.sharding.is_equivalent_to(cache_sharding, 4)


QUESTIONS = ["Tom has 3 apples and buys 4 more. How many now?", "What is 12 times 7?",
             "A train goes 60 miles in 2 hours. Speed?"]


def _agent_plan_tokens(mesh_gin: str):
    """`agent_models` (backend engine) as `lumos-jax agent` builds it from gin files."""
    import gin

    from lumos_jax.agent.generators import GenRequest
    from lumos_jax.agent.gin_configurables import agent_episode, agent_models
    from lumos_jax.config import parse_gin

    parse_gin([mesh_gin, "agent/engine.gin"], [
        f"agent_models.plan_model='{STORIES}'", f"agent_models.ground_model='{STORIES}'",
        "engine_settings.num_slots=4", "engine_settings.max_len=256",
        "agent_models.max_new_tokens=12",
        "inference_dtypes.weights='float32'", "inference_dtypes.compute='float32'"])
    try:
        gens = agent_models(agent_episode())
        requests = [GenRequest(f"ep{i}", "plan", [{"role": "user", "content": q}])
                    for i, q in enumerate(QUESTIONS)]
        outs = gens["plan"].generate(requests)
        assert gens["plan"].backend is gens["ground"].backend    # one path: one engine
        return [o.tokens for o in outs], gens["plan"].backend.engine
    finally:
        gin.clear_config()


def test_agent_path_with_fsdp_tensor_mesh_matches_one_device():
    one, engine1 = _agent_plan_tokens("mesh/single_device.gin")
    assert engine1.mesh.size == 1 and all(len(t) > 0 for t in one)
    sharded, engine8 = _agent_plan_tokens("mesh/fsdp_tensor.gin")
    assert dict(engine8.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert engine8.params["layers"]["wqkv"].sharding.spec[1:3] == ("fsdp", "tensor")
    assert engine8.cache.k.sharding.spec[0] == "tensor"
    assert sharded == one
