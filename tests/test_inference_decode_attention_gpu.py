"""Our Pallas GPU decode-attention kernel ('pallas_gpu_mha', interpret mode on CPU) against
attention over each row's tokens laid out contiguously (numpy: the helpers of
test_inference_decode_attention), int8 pages, a mesh, and the engine with it against HF greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_inference_decode_attention import (BS, LENGTHS, PAGES, TABLES, _contiguous, _inputs,
                                             assert_engine_equals_hf_greedy)

from lumos_jax.inference.decode_attention import DECODE_ATTENTION
from lumos_jax.inference.decode_attention_gpu import (BLOCK_TOKENS, MAX_SPLITS, TARGET_PROGRAMS,
                                                      default_blocking, mha_paged_attention)
from lumos_jax.inference.quant import QPages, quantize_kv
from lumos_jax.sharding import axis_rules, make_mesh

MHA = DECODE_ATTENTION["pallas_gpu_mha"]


def _poisoned_tables():
    """TABLES (rows inside a block, the full table, length 0, a block edge) with every column
    past a row's used pages pointing at a NaN page: reading any page a row does not use shows."""
    unused = sorted(set(range(PAGES)) - set(TABLES.ravel()))
    tables = TABLES.copy()
    for r, pages in enumerate(-(-LENGTHS // BS)):
        tables[r, pages:] = unused[r % len(unused)]
    return jnp.asarray(tables)


def _check(out, want):
    out, live = np.asarray(out), LENGTHS > 0
    np.testing.assert_allclose(out[live], want[live], atol=2e-5, rtol=0)
    assert not out[~live].any()        # length 0: zeros (not NaN)


@pytest.mark.parametrize("kv,g,ppb,splits,extra", [
    (4, 1, None, None, {}),      # defaults: one compute block of 4 pages, splits from B * KV
    (4, 1, 1, 1, {}),            # one page at a time, the program normalises its own output
    (4, 1, 2, 3, {}),            # shares of 4 pages: the third split of the full row is empty
    (4, 1, 2, 3, dict(prefetch=True)),    # the same with the next block loaded ahead (by hand)
    (4, 1, 2, 3, dict(flat=False)),       # ... and on (pages, block size, D) blocks
    (4, 1, 1, 8, {}),            # a split per page of the full row
    (2, 3, 2, 2, dict(flat=False)),       # G = 3 query rows per KV head
    (1, 8, 4, 1, dict(prefetch=True)),    # G = 8, a compute block wider than the 10-token row
], ids=["mha-default", "mha-ppb1", "mha-ppb2-s3", "mha-ppb2-s3-prefetch", "mha-ppb2-s3-paged", "mha-s8",
        "g3", "g8"])
def test_mha_kernel_equals_contiguous_attention(kv, g, ppb, splits, extra):
    q, k, v = _inputs(kv, g)
    out = MHA(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), _poisoned_tables(), jnp.asarray(LENGTHS),
              pages_per_block=ppb, splits=splits, **extra)
    _check(out, _contiguous(q, k, v))


@pytest.mark.parametrize("layout", [dict(pages_per_block=2), dict(pages_per_block=2, flat=False),
                                    dict(pages_per_block=4, prefetch=True)], ids=["flat", "paged", "prefetch"])
def test_mha_kernel_reads_int8_pages(layout):
    """QPages: codes x per-token scales, against numpy attention over the dequantized K/V; the
    unused pages' scales are NaN."""
    q, k, v = _inputs(2, 2, seed=4)
    unused = np.isnan(k[:, :, 0, 0])                                   # (KV, P)
    pools, deq = [], []
    for x in (k, v):
        codes, scale = (np.asarray(a) for a in quantize_kv(np.nan_to_num(x)))
        scale = np.where(unused[:, :, None], np.nan, scale)
        pools.append(QPages(jnp.asarray(codes), jnp.asarray(scale)))
        deq.append(codes.astype(np.float32) * scale[..., None])
    out = MHA(jnp.asarray(q), *pools, _poisoned_tables(), jnp.asarray(LENGTHS), splits=2, **layout)
    _check(out, _contiguous(q, *deq))


def test_mha_kernel_under_a_mesh_equals_contiguous_attention():
    """Rows and KV heads sharded (fsdp=2 x tensor=4 devices), each device over its own pages."""
    q, k, v = _inputs(4, 2, seed=1)
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), _poisoned_tables(), jnp.asarray(LENGTHS))
    with jax.set_mesh(make_mesh(data=1, fsdp=2, tensor=4)), axis_rules():
        out = jax.jit(MHA)(*args)
    _check(out, _contiguous(q, k, v))


def test_default_blocking_and_its_limits():
    for batch, kv, width, bs in [(1, 32, 256, 16), (64, 32, 256, 16), (16, 32, 40, 16), (4, 2, 3, 4),
                                 (256, 8, 128, 64)]:
        ppb, splits = default_blocking(batch, kv, width, bs)
        assert ppb & (ppb - 1) == 0 and (ppb * bs <= BLOCK_TOKENS or ppb == 1)
        assert 1 <= splits <= min(MAX_SPLITS, -(-width // ppb))
        assert batch * kv * splits <= max(TARGET_PROGRAMS, batch * kv)
    assert default_blocking(1, 32, 256, 16)[1] > 1 and default_blocking(64, 32, 256, 16)[1] == 1
    q, k, v = (jnp.asarray(a) for a in _inputs(1, 1))
    q = q[:, 0, :, 0]                                                  # (B, H = 1, D)
    with pytest.raises(ValueError, match="1..8 query heads per KV head"):
        mha_paged_attention(jnp.zeros((4, 9, k.shape[-1])), k, v, jnp.asarray(TABLES), jnp.asarray(LENGTHS))
    with pytest.raises(ValueError, match="block_size=3"):
        mha_paged_attention(q, k[:, :, :3], v[:, :, :3], jnp.asarray(TABLES), jnp.asarray(LENGTHS))
    with pytest.raises(ValueError, match="pages_per_block=3"):
        mha_paged_attention(q, k, v, jnp.asarray(TABLES), jnp.asarray(LENGTHS), pages_per_block=3)


@pytest.mark.parametrize("groups,quantized,params", [
    (1, False, {}), (1, True, dict(splits=3)), (1, True, dict(flat=False)),
    (4, False, dict(pages_per_block=8, prefetch=True)), (2, False, dict(flat=False, prefetch=True))],
    ids=["mha-bf16", "mha-int8-splits", "mha-int8-paged", "g4-prefetch", "g2-paged-prefetch"])
def test_mha_kernel_lowers_to_triton(groups, quantized, params):
    """JAX's Triton lowering (power-of-two loads, supported ops) accepts the kernel at the
    Llama-2-7B shape, lowered for CUDA here on CPU, so the GPU run does not find out first."""
    b, kv, d, bs, pages = 64, 32 // groups, 128, 16, 64 * 40
    args = [jax.ShapeDtypeStruct((b, kv * groups, d), jnp.bfloat16),
            *[jax.ShapeDtypeStruct((kv, pages, bs, d), jnp.int8 if quantized else jnp.bfloat16)] * 2,
            jax.ShapeDtypeStruct((b, 256), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32)]
    args += [jax.ShapeDtypeStruct((kv, pages, bs), jnp.float32)] * (2 * quantized)
    fn = jax.jit(lambda *a: mha_paged_attention(*a, interpret=False, **params))
    try:
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:  # newer JAX needs a GPU (or an abstract one) to lower Triton kernels
        pytest.skip(f"no Triton lowering without a GPU here: {e}")
    assert text.count("xla.gpu.triton") == 1


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_engine_with_the_mha_kernel_equals_hf_greedy(scan_layers):
    assert_engine_equals_hf_greedy("pallas_gpu_mha", scan_layers)
