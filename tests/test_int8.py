"""int8 weights and int8 KV (lumos_jax.inference.quant) against float64 numpy.

Bounds: rounding to the nearest multiple of the scale errs by at most scale/2 per weight, so
an output of x @ w errs by at most 0.5 * sum_e s_e |x_e| (s_e the scale of the row e belongs
to: one per output channel, or one per group), plus fp32 accumulation rounding."""

import numpy as np
import pytest

import jax.numpy as jnp

from lumos_jax.inference.quant import (QTensor, dequantize_kv, dequantize_weight, qeinsum,
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
    ("...e,ev->...v", (2, 16), (16, 10), (0,), None),
])
def test_qeinsum_matches_the_dequantized_einsum(subscripts, x_shape, w_shape, axes, group):
    x = RNG.normal(size=x_shape).astype(np.float32)
    qw = quantize_weight(RNG.normal(size=w_shape).astype(np.float32), axes, group)
    deq = np.asarray(dequantize_weight(qw), np.float64)
    if "..." in subscripts:
        with pytest.raises(ValueError, match="no '...'"):
            qeinsum(subscripts, x, qw)
        return
    got = np.asarray(qeinsum(subscripts, jnp.asarray(x), qw))
    np.testing.assert_allclose(got, np.einsum(subscripts, x.astype(np.float64), deq), rtol=1e-5, atol=1e-5)


def test_qeinsum_bf16_activations_keep_bf16_output():
    x = jnp.asarray(RNG.normal(size=(3, 32)), jnp.bfloat16)
    qw = quantize_weight(RNG.normal(size=(32, 8)).astype(np.float32), (0,))
    assert qeinsum("ne,eo->no", x, qw).dtype == jnp.bfloat16
    assert qeinsum("ne,eo->no", x, qw, preferred_element_type=jnp.float32).dtype == jnp.float32


def test_bad_group_size_is_one_clear_error():
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
