"""Our Pallas GPU int8 matmul (int8_matmul_gpu, interpret mode on CPU) against float64 numpy
x @ (q * scale), its Triton lowering at the Llama-2-7B shapes, `qeinsum(matmul='pallas_gpu')`
against XLA's, and the engine with `int8_matmul='pallas_gpu'` against 'xla'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumos_jax.inference.int8_matmul_gpu import MAX_ROWS, default_splits, int8_matmul, resolve_mode
from lumos_jax.inference.quant import check_int8_matmul, qeinsum, quantize_weight

RNG = np.random.default_rng(0)


def _operands(m, k, n, groups, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, k)).astype(dtype)
    q = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
    s = rng.uniform(0.005, 0.05, size=(groups, n)).astype(np.float32)
    want = np.asarray(x, np.float64) @ (q.astype(np.float64) * np.repeat(s, k // groups, axis=0))
    return jnp.asarray(x), jnp.asarray(q), jnp.asarray(s), want


@pytest.mark.parametrize("m,k,n,groups,params", [
    (1, 256, 384, 1, {}),                                          # fma, splits by default
    (1, 200, 100, 1, {}),                                          # K and N ragged
    (1, 256, 256, 4, dict(mode="reduce", k_splits=2)),             # per group of 64
    (1, 96, 72, 3, dict(mode="fma", block_k=16, block_n=32, prefetch=False)),
    (5, 200, 100, 1, {}),                                          # dot: 5 rows padded to 16
    (5, 128, 96, 2, dict(mode="fma", block_k=32, block_n=64)),     # 5 unrolled rows, groups
    (16, 256, 384, 4, dict(k_splits=3)),                          # a ragged last split
    (1, 256, 64, 1, dict(block_k=32, k_splits=3)),                 # 3 + 3 + 2 tiles, prefetched
    (2, 256, 64, 1, dict(mode="reduce", block_k=64, k_splits=3)),  # 2 + 2 + 0 tiles: an empty split
    (64, 256, 256, 1, dict(block_m=16, k_splits=2)),               # 4 row blocks
    (64, 136, 120, 1, dict(block_n=32, block_k=32)),               # everything ragged
], ids=["m1", "m1-ragged", "m1-reduce-g4", "m1-fma-g3", "m5-dot-ragged", "m5-fma-g2", "m16-g4-s3",
        "m1-s3-short-last", "m2-s3-empty-last",
        "m64-bm16", "m64-ragged"])
def test_kernel_equals_float64_matmul(m, k, n, groups, params):
    x, q, s, want = _operands(m, k, n, groups)
    got = np.asarray(int8_matmul(x, q, s, **params))
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("mode", ["dot", "fma"])
def test_bf16_activations_give_bf16_or_fp32_out(mode):
    x, q, s, _ = _operands(3, 128, 64, 1, seed=2)
    xb = x.astype(jnp.bfloat16)
    want = np.asarray(xb, np.float64) @ (np.asarray(q, np.float64) * np.asarray(s))
    got = int8_matmul(xb, q, s, mode=mode)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    f32 = int8_matmul(xb, q, s, mode=mode, out_dtype=jnp.float32, block_k=32, k_splits=2)
    np.testing.assert_allclose(np.asarray(f32), want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_defaults_and_bad_parameters_are_one_clear_error():
    assert resolve_mode("auto", 1) == "fma" and resolve_mode("auto", 16) == "dot"
    assert default_splits(32, 32, 1, 4096) == 8 and default_splits(1024, 32, 1, 4096) == 1
    assert default_splits(16, 344, 1, 11008) == 16       # 22 tiles a split, the last one 14
    assert default_splits(32, 32, 64, 4096) == 2         # the fp32 partials <= 1/4 of the codes' bytes
    x, q, s, _ = _operands(2, 64, 32, 2)
    for kw, match in [(dict(block_n=48), "powers of two"), (dict(block_k=64), "divide the group size"),
                      (dict(k_splits=9, block_k=8), "k_splits=9"), (dict(mode="dot", block_m=8), "block_m=8"),
                      (dict(mode="tiles"), "mode='tiles'")]:
        with pytest.raises(ValueError, match=match):
            int8_matmul(x, q, s, **kw)
    with pytest.raises(ValueError, match="at most 16"):
        int8_matmul(jnp.zeros((17, 64)), q, s, mode="fma")
    with pytest.raises(ValueError, match=f"1..{MAX_ROWS} rows"):
        int8_matmul(jnp.zeros((MAX_ROWS + 1, 64)), q, s)
    with pytest.raises(ValueError, match="scale must be"):
        int8_matmul(x, q, s[:, :3])
    with pytest.raises(ValueError, match="engine_settings.int8_matmul='triton'"):
        check_int8_matmul("triton")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tensor",))
    with pytest.raises(ValueError, match="runs on one GPU"):
        check_int8_matmul("pallas_gpu", mesh)


@pytest.mark.parametrize("m,k,n,groups,params", [
    (1, 4096, 12288, 1, {}), (1, 4096, 4096, 1, dict(mode="reduce", prefetch=False)),
    (64, 11008, 4096, 1, {}), (16, 4096, 22016, 32, {}), (256, 4096, 32000, 1, dict(block_n=256)),
    (5, 200, 100, 1, dict(mode="dot"))], ids=["qkv-m1", "o-m1-reduce", "down-m64", "gate-up-m16-g128",
                                             "head-m256", "ragged"])
def test_kernel_lowers_to_triton(m, k, n, groups, params):
    """JAX's Triton lowering (power-of-two loads, supported ops) accepts the kernel at the
    Llama-2-7B decode shapes, lowered for CUDA here on CPU, so the GPU run does not find out first."""
    args = [jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((k, n), jnp.int8),
            jax.ShapeDtypeStruct((groups, n), jnp.float32)]
    assert _triton_calls(lambda *a: int8_matmul(*a, interpret=False, **params), args) == 1


def _triton_calls(fn, args) -> int:
    try:  # newer JAX needs a GPU (or an abstract one) to lower Triton kernels
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton")
    except RuntimeError as e:
        pytest.skip(f"no Triton lowering without a GPU here: {e}")


@pytest.mark.parametrize("subscripts,x_shape,w_shape,axes,group,kernel", [
    ("nte,ekgd->ntkgd", (2, 1, 64), (64, 2, 3, 8), (0,), None, True),          # fused q/k/v
    ("nte,ekgd->ntkgd", (3, 1, 64), (64, 2, 3, 8), (0,), 16, True),
    ("ntkgd,kgde->nte", (2, 1, 2, 3, 8), (2, 3, 8, 40), (0, 1, 2), None, True),  # output projection
    ("nte,ewi->ntwi", (1, 4, 32), (32, 2, 24), (0,), 8, True),                 # gate/up, a prefill
    ("nti,ie->nte", (4, 1, 48), (48, 32), (0,), None, True),                   # down
    ("...e,ev->...v", (2, 16), (16, 10), (0,), None, True),                     # logits
    ("bte,ekd->bdkt", (2, 3, 16), (16, 5, 7), (0,), None, False),              # permuted: XLA
    ("ne,eo->no", (MAX_ROWS + 1, 16), (16, 8), (0,), None, False),             # too many rows: XLA
])
def test_qeinsum_pallas_equals_xla(subscripts, x_shape, w_shape, axes, group, kernel):
    x = jnp.asarray(RNG.normal(size=x_shape).astype(np.float32))
    qw = quantize_weight(RNG.normal(size=w_shape).astype(np.float32), axes, group)
    want = np.asarray(qeinsum(subscripts, x, qw))
    pallas = lambda a, w: qeinsum(subscripts, a, w, matmul="pallas_gpu")  # noqa: E731
    assert ("pallas_call" in str(jax.make_jaxpr(pallas)(x, qw))) is kernel
    got = np.asarray(pallas(x, qw))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="int8_matmul='cuda'"):
        qeinsum(subscripts, x, qw, matmul="cuda")


def test_engine_with_the_kernel_equals_xla_greedy():
    """stories260k with int8 weights: the engine's greedy tokens through the kernel (interpret
    mode: every matmul of prefill's few rows and of decode) equal those through XLA's dot."""
    from inference_helpers import STORIES, random_prompts

    from lumos_jax.checkpoints.hf import load_hf_model
    from lumos_jax.inference import Engine, SamplingParams
    from lumos_jax.inference.params import decode_params
    from lumos_jax.inference.quant import convert_weights

    model = load_hf_model(STORIES)
    params, spec = decode_params(model)
    xla = Engine.from_params(model.config, convert_weights(params, "int8"), spec, num_slots=2, max_len=48,
                             steps_per_call=4, block_size=8)
    prompts = [[1, 403, 407, 261, 378]] + random_prompts(np.random.default_rng(5), 1, 10, 20, 512)
    want = [r.tokens for r in xla.generate(prompts, SamplingParams(max_new_tokens=6))]
    kernel = xla.resized(int8_matmul="pallas_gpu")
    assert kernel.spec.int8_matmul == "pallas_gpu" and xla.spec.int8_matmul == "xla"
    assert [r.tokens for r in kernel.generate(prompts, SamplingParams(max_new_tokens=6))] == want
