"""Pallas TPU attention in interpret mode on CPU: splash attention for training and the paged
decode kernel, against the XLA path (and HF transformers for the packed model's logits).

Interpret mode runs the same kernel code a TPU compiles, block by block, so the masks, the
GQA head grouping, the padding to whole blocks and the block-table walk are all exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import nnx

from lumos_jax.models import attention_tpu
from lumos_jax.models.attention_tpu import (paged_decode_attention, paged_decode_attention_xla,
                                            splash_attention, splash_block_sizes)
from lumos_jax.models.config import PRESETS, resolve_attention_impl
from lumos_jax.models.llama import attention_mask, create_model
from lumos_jax.sharding import axis_rules, make_mesh

STORIES = REPO / "lumos_jax" / "assets" / "stories260k"


@pytest.fixture(autouse=True)
def _no_gin_bindings():
    """Earlier tests' gin bindings (e.g. make_mesh.devices of mesh/single_device.gin) must
    not reach make_mesh or the block sizes here."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()


def _packed_batch(rng, b=2, t=40, vocab=512):
    """Rows of several conversations (segments 1..k, positions restart at 0) and padding."""
    ids = rng.integers(3, vocab, (b, t)).astype(np.int32)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    cuts = [[0, 11, 25, 33], [0, 7, 30]]  # row 0: 3 segments + 7 pad; row 1: 2 segments + 10 pad
    for r, c in enumerate(cuts[:b]):
        for s, (lo, hi) in enumerate(zip(c[:-1], c[1:]), start=1):
            seg[r, lo:hi], pos[r, lo:hi] = s, np.arange(hi - lo)
    return ids, pos, seg


def _xla_attention(q, k, v, seg, pos):
    """Plain masked softmax attention with the model's mask rule (fp32)."""
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    kk, vv = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(d)
    mask = attention_mask(seg, pos, seg, pos)[:, None]
    p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, vv)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)], ids=["gqa4/2", "mqa"])
def test_splash_equals_xla_fp32_values_and_grads(heads, kv_heads):
    ids, pos, seg = _packed_batch(np.random.default_rng(0))
    b, t, d = 2, ids.shape[1], 16
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (b, t, heads, d))
    k = jax.random.normal(keys[1], (b, t, kv_heads, d))
    v = jax.random.normal(keys[2], (b, t, kv_heads, d))
    valid = jnp.asarray(seg != 0)[:, :, None, None]
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    out = splash_attention(q, k, v, seg)
    ref = _xla_attention(q, k, v, seg, pos)
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref, 0), atol=1e-5, rtol=0)

    w = jax.random.normal(jax.random.key(2), out.shape)  # a loss that reads valid rows only
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.where(valid, f(q, k, v), 0.0) * w)  # noqa: E731
    g = jax.grad(loss(lambda q, k, v: splash_attention(q, k, v, seg)), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(lambda q, k, v: _xla_attention(q, k, v, seg, pos)), argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(g, g_ref):
        np.testing.assert_allclose(a, r, atol=1e-5, rtol=0)


def test_splash_bf16_within_bf16_rounding():
    ids, pos, seg = _packed_batch(np.random.default_rng(3))
    keys = jax.random.split(jax.random.key(4), 3)
    q, k, v = (jax.random.normal(kk, (2, ids.shape[1], n, 16)) for kk, n in zip(keys, (4, 2, 2)))
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    out = splash_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), seg)
    assert out.dtype == jnp.bfloat16
    ref = _xla_attention(q, k, v, seg, pos)
    valid = np.asarray(seg != 0)[:, :, None, None]
    # bf16 inputs carry 8 bits of mantissa: ~4e-3 relative per value, a few ulps after the sums.
    np.testing.assert_allclose(np.where(valid, np.asarray(out, np.float32), 0), np.where(valid, ref, 0),
                               atol=3e-2, rtol=0)


def _model_pair(config):
    xla = create_model(config.replace(attention_impl="xla"), seed=0)
    spl = create_model(config.replace(attention_impl="splash"), seed=0)
    nnx.update(spl, nnx.state(xla, nnx.Param))
    return xla, spl


def test_packed_model_logits_splash_vs_xla_and_hf():
    """stories260k (8 heads over 4 kv heads) on packed rows: splash == XLA (fp32) and each
    segment equals HF transformers on that conversation alone. (Gradients: the kernel test.)"""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lumos_jax.checkpoints.hf import load_hf_model

    ids, pos, seg = _packed_batch(np.random.default_rng(5))
    xla = load_hf_model(STORIES, dtype="float32", param_dtype="float32")
    spl = create_model(xla.config.replace(attention_impl="splash"), seed=0)
    nnx.update(spl, nnx.state(xla, nnx.Param))
    lx = np.asarray(xla(ids, positions=pos, segment_ids=seg))
    ls = np.asarray(spl(ids, positions=pos, segment_ids=seg))
    valid = seg != 0
    # Attention itself agrees to 1e-5 (above); through 5 (scanned) layers, logits of size ~15
    # keep ~1e-6 relative from fp32 summation order (1 of 32k logits reaches 1.4e-5 absolute).
    np.testing.assert_allclose(ls[valid], lx[valid], atol=2e-5, rtol=2e-6)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(STORIES), torch_dtype=torch.float32).eval()
    for r in range(ids.shape[0]):
        for s in sorted(set(seg[r].tolist()) - {0}):
            sel = seg[r] == s
            with torch.no_grad():
                ref = hf(input_ids=torch.tensor(ids[r][sel][None], dtype=torch.long)).logits[0].numpy()
            np.testing.assert_allclose(ls[r][sel], ref, atol=1e-4, rtol=0)


def test_splash_under_a_2x4_mesh_equals_one_device():
    """fsdp=2 x tensor=4 over 8 fake devices: batch split in 2, heads in 4 (kv heads 2 are
    repeated to the query heads, since 2 kv heads cannot split 4 ways)."""
    config = PRESETS["tiny"].replace(num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    xla, spl = _model_pair(config)
    ids, pos, seg = _packed_batch(np.random.default_rng(6))
    single = np.asarray(spl(ids, positions=pos, segment_ids=seg))
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    with jax.set_mesh(mesh), axis_rules():
        sharded = jax.jit(lambda m, i, p, s: m(i, positions=p, segment_ids=s))(spl, ids, pos, seg)
    ref = np.asarray(xla(ids, positions=pos, segment_ids=seg))
    valid = seg != 0
    np.testing.assert_allclose(np.asarray(sharded)[valid], single[valid], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(sharded)[valid], ref[valid], atol=1e-5, rtol=0)


def _pool(rng, kv, blocks, block_size, d):
    return (jnp.asarray(rng.standard_normal((kv, blocks, block_size, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((kv, blocks, block_size, d)), jnp.float32))


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)], ids=["gqa4/2", "mqa"])
def test_paged_decode_equals_contiguous_attention(heads, kv_heads):
    """Rows of different lengths (0, inside a block, block edge, full table) over scattered
    blocks equal attention over each row's tokens laid out contiguously."""
    rng = np.random.default_rng(7)
    d, bs, blocks = 16, 8, 20
    kp, vp = _pool(rng, kv_heads, blocks, bs, d)
    tables = jnp.asarray([[3, 0, 0, 0], [9, 1, 0, 0], [0, 0, 0, 0], [4, 5, 6, 8]], jnp.int32)
    lengths = jnp.asarray([5, 16, 0, 29], jnp.int32)
    q = jnp.asarray(rng.standard_normal((4, heads, d)), jnp.float32)
    out = np.asarray(paged_decode_attention(q, kp, vp, lengths, tables))
    for r in range(4):
        n = int(lengths[r])
        if n == 0:
            assert not out[r].any()
            continue
        k = np.concatenate([np.asarray(kp[:, b]) for b in np.asarray(tables[r])], axis=1)[:, :n]  # (KV, n, D)
        v = np.concatenate([np.asarray(vp[:, b]) for b in np.asarray(tables[r])], axis=1)[:, :n]
        g = heads // kv_heads
        qh = np.asarray(q[r]).reshape(kv_heads, g, d) / np.sqrt(d)
        s = np.einsum("kgd,ksd->kgs", qh, k)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ref = np.einsum("kgs,ksd->kgd", p, v).reshape(heads, d)
        np.testing.assert_allclose(out[r], ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out, np.asarray(paged_decode_attention_xla(q, kp, vp, lengths, tables)),
                               atol=1e-5, rtol=0)


def test_paged_decode_under_a_mesh_equals_one_device():
    rng = np.random.default_rng(8)
    kp, vp = _pool(rng, 4, 16, 8, 16)
    tables = jnp.asarray(rng.integers(0, 16, (8, 3)), jnp.int32)
    lengths = jnp.asarray(rng.integers(1, 25, 8), jnp.int32)
    q = jnp.asarray(rng.standard_normal((8, 8, 16)), jnp.float32)
    single = np.asarray(paged_decode_attention(q, kp, vp, lengths, tables))
    with jax.set_mesh(make_mesh(data=1, fsdp=2, tensor=4)), axis_rules():
        sharded = jax.jit(paged_decode_attention)(q, kp, vp, lengths, tables)
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-6, rtol=0)


def test_paged_decode_reads_only_the_blocks_a_row_uses():
    """Block-table entries past a row's length may point anywhere (even at garbage): the
    result does not change, because those blocks are never read."""
    rng = np.random.default_rng(9)
    kp, vp = _pool(rng, 2, 12, 8, 16)
    q = jnp.asarray(rng.standard_normal((2, 4, 16)), jnp.float32)
    lengths = jnp.asarray([6, 12], jnp.int32)
    a = paged_decode_attention(q, kp, vp, lengths, jnp.asarray([[2, 0, 0], [5, 7, 0]], jnp.int32))
    poisoned_k = kp.at[:, 11].set(jnp.nan)
    b = paged_decode_attention(q, poisoned_k, vp.at[:, 11].set(jnp.nan), lengths,
                               jnp.asarray([[2, 11, 11], [5, 7, 11]], jnp.int32))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_block_sizes_and_auto_selection():
    import gin

    assert resolve_attention_impl("auto") == ("splash" if jax.default_backend() == "tpu" else "xla")
    assert resolve_attention_impl("cudnn") == "cudnn"
    assert splash_block_sizes(4096, generation="v6e").block_q == 1024
    assert splash_block_sizes(4096, generation="v4").block_kv == 512
    assert splash_block_sizes(256, generation="v5e").block_kv == 256  # capped at the sequence
    with gin.unlock_config():
        gin.bind_parameter("splash_attention.block_q", 256)
    try:
        assert splash_block_sizes(4096, generation="v5p").block_q == 256
    finally:
        gin.clear_config()
    with pytest.raises(ValueError, match="splash_attention.generation='v9'"):
        splash_block_sizes(1024, generation="v9")
    assert attention_tpu.tpu_generation() == "cpu"


def test_engine_with_the_pallas_decode_kernel_equals_hf_greedy():
    """The engine's decode on the paged pool through the Pallas kernel (interpret mode):
    greedy tokens equal transformers' on stories260k, prompts spanning several blocks."""
    pytest.importorskip("torch")
    from inference_helpers import hf_greedy
    from transformers import LlamaForCausalLM

    from lumos_jax.checkpoints.hf import load_hf_model
    from lumos_jax.inference import Engine, SamplingParams

    model = load_hf_model(STORIES)
    hf = LlamaForCausalLM.from_pretrained(STORIES).eval()
    engine = Engine(model, num_slots=2, max_len=64, steps_per_call=4, block_size=8,
                    decode_attention="pallas")
    assert engine.decode_attention == "pallas"
    prompts = [[1, 403, 407, 261, 378], [1] + list(range(300, 320))]
    for p, r in zip(prompts, engine.generate(prompts, SamplingParams(max_new_tokens=10))):
        assert r.tokens == hf_greedy(hf, p, 10)
