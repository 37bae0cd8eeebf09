"""Unrolled (per-layer buffers, the GPU default) and scanned layers give HF's tokens."""

import jax
import numpy as np
import pytest

from inference_helpers import STORIES, hf_greedy, random_prompts

from lumos_jax.checkpoints.hf import load_hf_model
from lumos_jax.inference import Engine, SamplingParams
from lumos_jax.inference.engine import STAT_KEYS
from lumos_jax.inference.params import decode_params, layer_layout, param_shardings, resolve_scan_layers
from lumos_jax.sharding import make_mesh


@pytest.fixture(scope="module")
def stories():
    from transformers import LlamaForCausalLM

    return load_hf_model(STORIES), LlamaForCausalLM.from_pretrained(STORIES).eval()


def test_unrolled_and_scanned_engines_both_match_hf_greedy(stories):
    model, hf = stories
    rng = np.random.default_rng(3)
    prompts = [[1, 403, 407, 261]] + random_prompts(rng, 3, 2, 30, 512)
    n = 16
    scanned = Engine(model, num_slots=4, max_len=96, steps_per_call=8, scan_layers=True)
    unrolled = scanned.resized(scan_layers=False)
    assert scanned.scan_layers and not unrolled.scan_layers
    assert isinstance(unrolled.params["layers"], tuple) and len(unrolled.params["layers"]) == model.config.num_hidden_layers
    a = scanned.generate(prompts, SamplingParams(max_new_tokens=n))
    b = unrolled.generate(prompts, SamplingParams(max_new_tokens=n))
    for p, ra, rb in zip(prompts, a, b):
        want = hf_greedy(hf, p, n)
        assert ra.tokens == want and rb.tokens == want


def test_layouts_give_the_same_tokens_under_prefix_sharing_eviction_and_sharding(stories):
    """One array per layer (unrolled; also split over tensor=2) and the stacked pool
    (scanned) run the same streaming batch: more sessions than the pool holds (preemption,
    recompute) with a common 20-token prefix (shared blocks); tokens, the host's
    bookkeeping and HF greedy all agree."""
    model, hf = stories
    rng = np.random.default_rng(4)
    shared = random_prompts(rng, 1, 20, 21, 512)[0]
    prompts = [shared + tail[1:] for tail in random_prompts(rng, 6, 2, 6, 512)]
    small = dict(num_slots=4, max_len=64, steps_per_call=4, block_size=4, num_blocks=14)  # 56 tokens
    mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
    runs = {}
    for name, kw in (("scanned", dict(scan_layers=True)), ("unrolled", dict(scan_layers=False)),
                     ("unrolled_tp2", dict(scan_layers=False, mesh=mesh))):
        e = Engine.from_path(STORIES, **small, **kw) if "mesh" in kw else Engine(model, **small, **kw)
        assert e.cache.per_layer is (name != "scanned")
        results = e.generate(prompts, SamplingParams(max_new_tokens=12))
        runs[name] = [r.tokens for r in results], {k: e.stats[k] for k in STAT_KEYS}
    assert e.cache.k[0].sharding.spec[0] == "tensor"          # kv heads split in every layer
    assert runs["unrolled"] == runs["scanned"] == runs["unrolled_tp2"]
    tokens, stats = runs["scanned"]
    assert stats["prefix_saved_tokens"] > 0 and stats["preemptions"] > 0, stats
    for p, t in zip(prompts, tokens):
        assert t == hf_greedy(hf, p, 12)


def test_layer_layout_round_trip_and_shardings(stories):
    params, _ = decode_params(stories[0])
    per_layer = layer_layout(params, scan=False)
    back = layer_layout(per_layer, scan=True)
    for k, v in params["layers"].items():
        np.testing.assert_array_equal(np.asarray(back["layers"][k]), np.asarray(v))
        np.testing.assert_array_equal(np.asarray(per_layer["layers"][1][k]), np.asarray(v[1]))
    mesh = make_mesh(1, 1, -1)
    sh = param_shardings(per_layer, mesh)
    assert len(sh["layers"]) == len(per_layer["layers"])
    assert tuple(sh["layers"][0]["wqkv"].spec) == tuple(param_shardings(params, mesh)["layers"]["wqkv"].spec)[1:]


def test_scan_layers_setting_is_checked():
    assert resolve_scan_layers(True) is True and resolve_scan_layers(False) is False
    with pytest.raises(ValueError, match="scan_layers"):
        resolve_scan_layers("sometimes")


def test_auto_unrolls_only_large_layers_on_gpu(monkeypatch):
    """'auto': scanned off-GPU; on GPU unrolled for 7B-sized layers (the scanned weight copy
    costs decode time) and scanned for small ones (unrolling costs compile time)."""
    from lumos_jax.inference import params as params_mod
    from lumos_jax.models import PRESETS

    small, _ = params_mod.random_decode_params(PRESETS["tiny"], jax.random.PRNGKey(0), "float32")
    per_layer = layer_layout(small, False)
    assert params_mod.layer_weight_bytes(small) == params_mod.layer_weight_bytes(per_layer) > 0
    one_layer = sum(x.nbytes for x in jax.tree.leaves(per_layer["layers"][0]))
    assert params_mod.layer_weight_bytes(small) == one_layer
    assert resolve_scan_layers("auto", one_layer) is True            # this test runs on CPU
    monkeypatch.setattr(params_mod.jax, "default_backend", lambda: "gpu")
    assert resolve_scan_layers("auto", one_layer) is True
    assert resolve_scan_layers("auto", params_mod.UNROLL_MIN_LAYER_BYTES) is False
    assert resolve_scan_layers("auto", None) is False
    assert resolve_scan_layers(True, 10**12) is True
