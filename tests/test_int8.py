"""int8 weights and int8 KV (lumos_jax.inference.quant) against float64 numpy.

Bounds: rounding to the nearest multiple of the scale errs by at most scale/2 per weight, so
an output of x @ w errs by at most 0.5 * sum_e s_e |x_e| (s_e the scale of the row e belongs
to: one per output channel, or one per group), plus fp32 accumulation rounding."""

import numpy as np
import pytest

import jax.numpy as jnp

from lumos_jax.inference.quant import (QPages, QTensor, dequantize_kv, dequantize_weight, qeinsum,
                                       quantize_kv, quantize_params, quantize_weight)

RNG = np.random.default_rng(0)


def _bound(x, qw: QTensor, group_size):
    """0.5 * sum_e s(e, o) |x_e| for x (N, E) and a weight (E, O)."""
    s = np.asarray(qw.scale, np.float64)
    if group_size:
        s = np.repeat(s, group_size, axis=0)                      # (E, O)
    return 0.5 * np.abs(x).astype(np.float64) @ np.broadcast_to(s, qw.q.shape)


@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_matmul_within_half_a_scale_step(group_size):
    x = RNG.normal(size=(6, 128)).astype(np.float32)
    w = (RNG.normal(size=(128, 48)) * RNG.uniform(0.1, 3, size=(1, 48))).astype(np.float32)
    w[:, 0] = 0.0                                                 # an all-zero channel
    qw = quantize_weight(w, (0,), group_size)
    assert qw.q.dtype == jnp.int8 and int(jnp.max(jnp.abs(qw.q))) == 127
    got = np.asarray(qeinsum("ne,eo->no", jnp.asarray(x), qw), np.float64)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    err = np.abs(got - exact)
    slack = 1e-5 * (np.abs(x) @ np.abs(w))
    bound = _bound(x, qw, group_size)
    assert np.all(err <= bound + slack)
    assert err.max() > 0.05 * bound.max()                         # the bound is not vacuous
    assert np.all(got[:, 0] == 0)
    # the scale multiplies the output exactly: same as the dequantized weight in float64
    deq = np.asarray(dequantize_weight(qw), np.float64)
    np.testing.assert_allclose(got, x.astype(np.float64) @ deq, rtol=1e-5, atol=1e-4)


def test_grouped_scales_are_finer():
    """A row block with 100x larger weights: per-group scales keep the other rows exact-ish."""
    w = RNG.normal(size=(64, 16)).astype(np.float32)
    w[:16] *= 100
    x = RNG.normal(size=(4, 64)).astype(np.float32)
    x[:, :16] = 0
    exact = x.astype(np.float64) @ w
    per_channel = np.abs(np.asarray(qeinsum("ne,eo->no", x, quantize_weight(w, (0,)))) - exact).max()
    grouped = np.abs(np.asarray(qeinsum("ne,eo->no", x, quantize_weight(w, (0,), 16))) - exact).max()
    assert grouped < per_channel / 20


@pytest.mark.parametrize("subscripts,x_shape,w_shape,axes,group", [
    ("nte,ekgd->ntkgd", (2, 3, 64), (64, 2, 3, 8), (0,), None),        # fused q/k/v
    ("nte,ekgd->ntkgd", (2, 3, 64), (64, 2, 3, 8), (0,), 16),
    ("ntkgd,kgde->nte", (2, 1, 2, 3, 8), (2, 3, 8, 40), (0, 1, 2), None),  # output projection
    ("nte,ewi->ntwi", (1, 4, 32), (32, 2, 24), (0,), 8),               # gate/up
    ("bte,ekd->bdkt", (2, 3, 16), (16, 5, 7), (0,), None),             # output axes permuted
    ("...e,ev->...v", (2, 3, 16), (16, 10), (0,), None),                # logits
    ("...e,ev->...v", (2, 16), (16, 10), (0,), 8),
])
def test_qeinsum_matches_the_dequantized_einsum(subscripts, x_shape, w_shape, axes, group):
    x = RNG.normal(size=x_shape).astype(np.float32)
    qw = quantize_weight(RNG.normal(size=w_shape).astype(np.float32), axes, group)
    deq = np.asarray(dequantize_weight(qw), np.float64)
    got = np.asarray(qeinsum(subscripts, jnp.asarray(x), qw))
    np.testing.assert_allclose(got, np.einsum(subscripts, x.astype(np.float64), deq), rtol=1e-5, atol=1e-5)


def test_qeinsum_bf16_activations_keep_bf16_output():
    x = jnp.asarray(RNG.normal(size=(3, 32)), jnp.bfloat16)
    qw = quantize_weight(RNG.normal(size=(32, 8)).astype(np.float32), (0,))
    assert qeinsum("ne,eo->no", x, qw).dtype == jnp.bfloat16
    assert qeinsum("ne,eo->no", x, qw, preferred_element_type=jnp.float32).dtype == jnp.float32


def test_bad_group_size_and_subscripts_are_one_clear_error():
    qw = quantize_weight(np.ones((16, 4), np.float32), (0,))
    with pytest.raises(ValueError, match="only leading"):
        qeinsum("ne,...o->no", np.ones((2, 16), np.float32), qw)
    with pytest.raises(ValueError, match="group_size=5"):
        quantize_weight(np.ones((16, 4), np.float32), (0,), 5)


def test_kv_round_trip_per_token_per_head():
    """Pages (KV, NB, BS, D) -> int8 pages + scales (KV, NB, BS) (the GPU kernel's
    k_scales_pages layout); each element within half a step of its token-head scale."""
    k = (RNG.normal(size=(2, 5, 4, 16)) * RNG.uniform(0.01, 10, size=(2, 5, 4, 1))).astype(np.float32)
    k[1, 2, 3] = 0.0
    q, scale = quantize_kv(k)
    assert q.dtype == jnp.int8 and scale.shape == (2, 5, 4)
    back = np.asarray(dequantize_kv(q, scale, jnp.float32), np.float64)
    s = np.asarray(scale, np.float64)[..., None]
    err = np.abs(back - k)
    assert np.all(err <= 0.5 * s * (1 + 1e-6))
    np.testing.assert_allclose(s[..., 0], np.abs(k).max(-1) / 127, rtol=1e-6, atol=1e-30)
    assert np.all(back[1, 2, 3] == 0)
    # a token's codes do not depend on its neighbours (what makes the extension exact)
    q1, s1 = quantize_kv(k[:, :, :1])
    np.testing.assert_array_equal(np.asarray(q1), np.asarray(q[:, :, :1]))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(scale[:, :, :1]))


def test_int8_pages_write_and_gather():
    """set_pages / take_pages / as_float on an int8 pool (KV, P, BS, D) + scales (KV, P, BS):
    the written tokens come back within half a step, a block id past the pool is dropped."""
    from lumos_jax.inference.quant import QPages, as_float, set_pages, take_pages, zero_pages

    kv, p, bs, d = 2, 4, 4, 8
    pool = zero_pages((kv, p, bs, d), jnp.int8)
    assert isinstance(pool, QPages) and pool.scale.shape == (kv, p, bs)
    new = RNG.normal(size=(kv, 1, 3, d)).astype(np.float32)             # one row, 3 tokens
    blocks, offsets = np.array([[2, 2, p]]), np.array([[1, 2, 3]])      # the third is dropped
    pool = set_pages(pool, blocks, offsets, new)
    got = np.asarray(as_float(take_pages(pool, np.array([[2]])), jnp.float32))  # (KV, 1, 1, BS, D)
    s = np.abs(new).max(-1, keepdims=True) / 127
    assert np.all(np.abs(got[:, 0, 0, 1:3] - new[:, 0, :2]) <= 0.5 * s[:, 0, :2] * (1 + 1e-6))
    assert np.all(got[:, 0, 0, [0, 3]] == 0) and int(jnp.abs(pool.q[:, :2]).max()) == 0
    flat = pool.reshape(kv * p, bs, d)
    assert flat.q.shape == (kv * p, bs, d) and flat.scale.shape == (kv * p, bs)


def test_quantize_params_tree():
    """Every matmul weight of the decode params becomes int8 (embedding and norms stay)."""
    e, kv, g, d, i, v = 16, 2, 2, 4, 24, 40
    lyr = {"attn_norm": np.ones(e, np.float32), "mlp_norm": np.ones(e, np.float32),
           "wqkv": RNG.normal(size=(e, kv, g + 2, d)), "wo": RNG.normal(size=(kv, g, d, e)),
           "w_gate_up": RNG.normal(size=(e, 2, i)), "w_down": RNG.normal(size=(i, e))}
    params = {"embed": RNG.normal(size=(v, e)), "norm": np.ones(e), "lm_head": RNG.normal(size=(e, v)),
              "inv_freq": np.ones(d // 2), "layers": (lyr, lyr)}
    out = quantize_params(params, group_size=8)
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        assert isinstance(out["layers"][1][name], QTensor), name
    assert out["layers"][0]["wqkv"].scale.shape == (2, kv, g + 2, d)      # 16 / 8 groups
    assert out["layers"][0]["wo"].scale.shape == (1, 1, 1, e)
    assert isinstance(out["lm_head"], QTensor) and not isinstance(out["embed"], QTensor)
    stacked = {k: np.stack([lyr[k]] * 3) for k in lyr}                   # (L, ...) layers
    out = quantize_params({**params, "layers": stacked})
    assert out["layers"]["wqkv"].scale.shape == (3, 1, kv, g + 2, d)
    assert out["layers"]["wo"].scale.shape == (3, 1, 1, 1, e)


# -- the engine with int8 weights / int8 KV (stories260k, fp32 activations) ------------------
@pytest.fixture(scope="module")
def stories():
    from inference_helpers import STORIES
    from transformers import LlamaForCausalLM

    from lumos_jax.checkpoints.hf import load_hf_model

    return load_hf_model(STORIES), LlamaForCausalLM.from_pretrained(STORIES).eval()


def _int8_engine(model, **kw):
    from lumos_jax.inference import Engine
    from lumos_jax.inference.params import decode_params
    from lumos_jax.inference.quant import convert_weights

    params, spec = decode_params(model)
    return Engine.from_params(model.config, convert_weights(params, "int8"), spec, **kw)


def _hf_int8(hf, group_size=None):
    """The HF model with every linear weight replaced by its per-output-row int8 rounding
    (our quantizer's rule written again in torch: scale = max|row| / 127, round half to
    even, clip to +-127), or per `group_size` consecutive inputs of a row (o_proj, whose
    inputs are our three contracted axes, stays per row): the outside reference for int8."""
    import copy

    import torch

    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight
                g = w.shape[1] if group_size is None or name.endswith("o_proj") else group_size
                wg = w.reshape(w.shape[0], -1, g)
                s = wg.abs().amax(dim=2, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
                mod.weight.copy_((torch.clamp(torch.round(wg / s), -127, 127) * s).reshape(w.shape))
    return ref


def test_int8_weights_greedy_equals_hf_on_the_int8_rounded_weights(stories):
    from inference_helpers import hf_greedy, random_prompts

    from lumos_jax.inference import SamplingParams

    model, hf = stories
    ref = _hf_int8(hf)
    engine = _int8_engine(model, num_slots=4, max_len=96, steps_per_call=8)
    prompts = [[1, 403, 407, 261, 378]] + random_prompts(np.random.default_rng(3), 3, 2, 30, 512)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=20))
    differs = 0
    for p, r in zip(prompts, results):
        assert r.tokens == hf_greedy(ref, p, 20), f"prompt of {len(p)} tokens"
        differs += r.tokens != hf_greedy(hf, p, 20)
    # and the weights really are int8: the int8 weights' logits differ from fp32's
    import torch

    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        full, q8 = hf(ids).logits[0, -1].numpy(), ref(ids).logits[0, -1].numpy()
    assert 0 < np.abs(full - q8).max() < 0.05 * np.abs(full).max()


def test_int8_kv_extension_equals_recompute(stories):
    """The int8 cache written during decode + extend gives the same greedy tokens as a
    fresh prefill of the whole history into an int8 cache (per-token scales: a token's
    codes never depend on when it was written)."""
    from inference_helpers import hf_greedy, run_until_done

    from lumos_jax.inference import Engine, SamplingParams

    model, hf = stories
    eng = Engine(model, num_slots=2, max_len=128, steps_per_call=8, cache_dtype="int8")
    assert isinstance(eng.cache.k, QPages) and eng.cache.k.q.dtype == jnp.int8
    a, b = [1, 403, 407, 261, 378], [266, 268, 388, 13, 300, 301]
    slot = eng.start(a, SamplingParams(max_new_tokens=12))
    (r1,) = run_until_done(eng)
    eng.extend(slot, b, SamplingParams(max_new_tokens=16))
    (r2,) = run_until_done(eng)
    eng.release(slot)
    fresh = eng.generate([a + r1.tokens + b], SamplingParams(max_new_tokens=16))[0]
    assert r2.tokens == fresh.tokens
    # int8 K/V (about 0.4% error per element) keeps stories260k's fp32 greedy tokens here
    want = hf_greedy(hf, a, 12)
    assert sum(x == y for x, y in zip(r1.tokens, want)) >= 10


def test_int8_checkpoint_round_trip(stories, tmp_path):
    """save_int8 / load_int8: the same int8 codes, scales and config come back, and the
    loader's engine reads them (no bf16 copy)."""
    import jax

    from lumos_jax.inference.params import decode_params
    from lumos_jax.inference.quant import convert_weights, is_int8_checkpoint, load_int8, save_int8

    model = stories[0]
    params = convert_weights(decode_params(model)[0], "int8")
    save_int8(params, model.config, tmp_path / "q8")
    assert is_int8_checkpoint(tmp_path / "q8") and not is_int8_checkpoint(tmp_path)
    config, back, spec = load_int8(tmp_path / "q8")
    assert config == model.config and spec.num_layers == 5
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="not int8"):
        save_int8(decode_params(model)[0], model.config, tmp_path / "bf")


def test_int8_kv_gpu_kernel_equals_dot(stories):
    """JAX's Pallas GPU paged kernel (interpret mode here) on int8 pages + scales gives the
    dot path's greedy tokens, over the stacked pool and over per-layer pools (unrolled)."""
    from inference_helpers import random_prompts

    from lumos_jax.inference import Engine, SamplingParams

    eng = Engine(stories[0], num_slots=2, max_len=64, steps_per_call=4, cache_dtype="int8",
                 decode_attention="dot")
    prompts = random_prompts(np.random.default_rng(5), 2, 3, 20, 512)
    want = [r.tokens for r in eng.generate(prompts, SamplingParams(max_new_tokens=6))]
    for scan_layers in (True, False):
        gpu = eng.resized(decode_attention="pallas_gpu", scan_layers=scan_layers)
        assert gpu.cache.per_layer is not scan_layers
        got = gpu.generate(prompts, SamplingParams(max_new_tokens=6))
        assert [r.tokens for r in got] == want


def test_gin_switches_load_int8_sharded_and_from_an_int8_checkpoint(stories, tmp_path):
    """`engine_settings.weight_dtype / kv_dtype = 'int8'` through the one loader (generate,
    serve, agent, eval): int8 weights and pages on a tensor=4 mesh, same greedy tokens as
    the one-device int8 engine; an int8 checkpoint loads as int8 with no conversion."""
    import gin
    import jax
    from inference_helpers import STORIES, random_prompts
    from jax.sharding import Mesh

    from lumos_jax.inference import SamplingParams
    from lumos_jax.inference.quant import save_int8
    from lumos_jax.inference.settings import load_engines

    model = stories[0]
    prompts = random_prompts(np.random.default_rng(7), 3, 2, 25, 512)
    want = [r.tokens for r in _int8_engine(model, num_slots=4, max_len=64, cache_dtype="int8")
            .generate(prompts, SamplingParams(max_new_tokens=10))]
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 1, 4), ("data", "fsdp", "tensor"))
    gin.parse_config(["engine_settings.weight_dtype = 'int8'", "engine_settings.kv_dtype = 'int8'",
                      "inference_dtypes.weights = 'float32'", "inference_dtypes.compute = 'float32'"])
    try:
        (eng,) = load_engines([str(STORIES)], mesh=mesh, num_slots=4, max_len=64).values()
        wqkv = eng.params["layers"]["wqkv"]
        assert isinstance(wqkv, QTensor) and "tensor" in wqkv.q.sharding.spec
        assert isinstance(eng.cache.k, QPages) and eng.cache.k.q.sharding.spec[0] == "tensor"
        assert eng.cache.k.scale.sharding.spec[0] == "tensor"
        assert [r.tokens for r in eng.generate(prompts, SamplingParams(max_new_tokens=10))] == want
        save_int8(eng.params, eng.config, tmp_path / "q8")
        gin.clear_config()
        gin.parse_config(["engine_settings.kv_dtype = 'int8'", "inference_dtypes.compute = 'float32'"])
        (eng,) = load_engines([str(tmp_path / "q8")], mesh=mesh, num_slots=4, max_len=64).values()
        assert isinstance(eng.params["lm_head"], QTensor)
        assert [r.tokens for r in eng.generate(prompts, SamplingParams(max_new_tokens=10))] == want
        with pytest.raises(ValueError, match="weight_dtype='int4'"):
            load_engines([str(STORIES)], mesh=mesh, weight_dtype="int4")
    finally:
        gin.clear_config()


@pytest.mark.parametrize("group_size", [None, 4])
def test_quantize_command_writes_a_checkpoint_every_loader_reads_as_int8(stories, tmp_path, group_size):
    """`lumos-jax quantize SRC DST` on the HF fixture: DST loads through the one loader as int8
    (no conversion), and its greedy tokens are HF generate's on the int8-rounded weights
    (per channel, or per group of 4 inputs)."""
    import gin
    from inference_helpers import STORIES, hf_greedy, random_prompts

    from lumos_jax.cli import main
    from lumos_jax.inference import SamplingParams
    from lumos_jax.inference.quant import is_int8_checkpoint
    from lumos_jax.inference.settings import load_engines

    dst = tmp_path / "q8"
    extra = [] if group_size is None else ["--group_size", str(group_size)]
    assert main(["quantize", str(STORIES), str(dst), "--dtype", "float32", *extra]) == 0
    assert is_int8_checkpoint(dst) and (dst / "tokenizer.model").exists()
    gin.parse_config(["inference_dtypes.compute = 'float32'"])
    try:
        (eng,) = load_engines([str(dst)], num_slots=4, max_len=96).values()
    finally:
        gin.clear_config()
    wqkv = eng.params["layers"]["wqkv"]
    assert isinstance(wqkv, QTensor) and wqkv.q.dtype == jnp.int8
    assert wqkv.scale.size == wqkv.q.size // (group_size or 64)  # hidden 64: one scale per row or per 4
    ref = _hf_int8(stories[1], group_size)
    prompts = [[1, 403, 407, 261, 378]] + random_prompts(np.random.default_rng(11), 3, 2, 30, 512)
    for p, r in zip(prompts, eng.generate(prompts, SamplingParams(max_new_tokens=16))):
        assert r.tokens == hf_greedy(ref, p, 16), f"prompt of {len(p)} tokens"


def test_quantize_command_bad_group_size_is_one_clear_error(tmp_path, capsys):
    from inference_helpers import STORIES

    from lumos_jax.cli import main

    assert main(["quantize", str(STORIES), str(tmp_path / "q"), "--group_size", "5"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "group_size=5" in err[0], err
    assert not (tmp_path / "q").exists()
