"""Decode attention over the paged pool: JAX's Pallas GPU kernel (interpret mode on CPU) and
the XLA paths against attention over each row's tokens laid out contiguously (numpy), and
the engine with the GPU kernel against HF greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference_helpers import STORIES, hf_greedy

from lumos_jax.inference.decode_attention import DECODE_ATTENTION, gpu_blocking, resolve_decode_attention
from lumos_jax.sharding import axis_rules, make_mesh

D, BS, PAGES = 16, 4, 24
TABLES = np.array([[3, 7, 1, 0, 0, 0, 0, 0],          # 10 tokens: inside a block
                   [5, 2, 9, 11, 4, 8, 13, 14],      # 32: the full table
                   [6, 0, 0, 0, 0, 0, 0, 0],          # 0: not generating
                   [10, 12, 0, 0, 0, 0, 0, 0]], np.int32)  # 8: a block edge
LENGTHS = np.array([10, 32, 0, 8], np.int32)


def _inputs(kv, g, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((len(LENGTHS), 1, kv, g, D)).astype(np.float32)
    k = rng.standard_normal((kv, PAGES, BS, D)).astype(np.float32)
    v = rng.standard_normal((kv, PAGES, BS, D)).astype(np.float32)
    unused = sorted(set(range(PAGES)) - set(TABLES.ravel()))
    k[:, unused] = np.nan                               # never read: any read poisons the result
    v[:, unused] = np.nan
    return q, k, v


def _contiguous(q, k, v):
    """Per row: its tokens gathered in table order, plain softmax attention (numpy)."""
    out = np.zeros_like(q)
    for r, n in enumerate(LENGTHS):
        if n == 0:
            continue
        kr = np.concatenate([k[:, b] for b in TABLES[r]], axis=1)[:, :n]    # (KV, n, D)
        vr = np.concatenate([v[:, b] for b in TABLES[r]], axis=1)[:, :n]
        s = np.einsum("kgd,ksd->kgs", q[r, 0], kr) / np.sqrt(D)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[r, 0] = np.einsum("kgs,ksd->kgd", p / p.sum(-1, keepdims=True), vr)
    return out


@pytest.mark.parametrize("kv,g", [(4, 1), (2, 3)], ids=["mha", "gqa"])
@pytest.mark.parametrize("name", ["pallas_gpu", "dot", "reduce"])
def test_decode_attention_equals_contiguous_attention(name, kv, g):
    q, k, v = _inputs(kv, g)
    out = np.asarray(DECODE_ATTENTION[name](jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                            jnp.asarray(TABLES), jnp.asarray(LENGTHS)))
    want = _contiguous(q, k, v)
    live = LENGTHS > 0
    np.testing.assert_allclose(out[live], want[live], atol=1e-5, rtol=0)
    if name == "pallas_gpu":
        assert not out[~live].any()


def test_pallas_gpu_under_a_mesh_equals_one_device():
    q, k, v = (jnp.asarray(a) for a in _inputs(4, 2, seed=1))
    args = (q, k, v, jnp.asarray(TABLES), jnp.asarray(LENGTHS))
    single = np.asarray(DECODE_ATTENTION["pallas_gpu"](*args))
    with jax.set_mesh(make_mesh(data=1, fsdp=2, tensor=4)), axis_rules():
        sharded = jax.jit(DECODE_ATTENTION["pallas_gpu"])(*args)
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-6, rtol=0)


def test_gpu_blocking_fits_the_kernel_constraints():
    for width in (1, 3, 16, 20, 40, 128, 136, 257):
        for bs in (4, 16, 64):
            padded, ppcb, splits = gpu_blocking(width, bs)
            assert padded >= width and padded % splits == 0
            assert (padded // splits) % ppcb == 0 and padded - width < splits * ppcb
    assert resolve_decode_attention("auto") == {"tpu": "pallas", "gpu": "pallas_gpu"}.get(
        jax.default_backend(), "dot")
    with pytest.raises(ValueError, match="decode_attention='flash'"):
        resolve_decode_attention("flash")


def assert_engine_equals_hf_greedy(attention: str, scan_layers: bool) -> None:
    """stories260k (8 query heads over 4 KV heads), block size 8, through `attention`: greedy
    tokens equal HF's. Scanned: one pool of all layers; unrolled (the GPU default at 7B): the
    kernel over each layer's own page array."""
    from transformers import LlamaForCausalLM

    from lumos_jax.checkpoints.hf import load_hf_model
    from lumos_jax.inference import Engine, SamplingParams

    hf = LlamaForCausalLM.from_pretrained(STORIES).eval()
    engine = Engine(load_hf_model(STORIES), num_slots=2, max_len=64, steps_per_call=4, block_size=8,
                    decode_attention=attention, scan_layers=scan_layers)
    prompts = [[1, 403, 407, 261, 378], [1] + list(range(300, 320))]
    for p, r in zip(prompts, engine.generate(prompts, SamplingParams(max_new_tokens=8))):
        assert r.tokens == hf_greedy(hf, p, 8)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_engine_with_the_gpu_kernel_equals_hf_greedy(scan_layers):
    assert_engine_equals_hf_greedy("pallas_gpu", scan_layers)


@pytest.mark.parametrize("chunk_tokens", [4, 8, 512])
def test_chunked_prefill_attention_equals_causal_attention(chunk_tokens):
    """Queries at positions start..start+T-1 of rows with cached prefixes see keys <= their
    own position, whatever the chunking of the keys; padding queries (last = -1) get zeros."""
    from lumos_jax.inference.decode_attention import paged_attention

    kv, g, t = 2, 2, 6
    q, k, v = _inputs(kv, g, seed=2)
    rng = np.random.default_rng(3)
    qt = rng.standard_normal((len(LENGTHS), t, kv, g, D)).astype(np.float32)
    starts = np.array([4, 25, 0, 2])
    valid = np.array([6, 6, 0, 5])
    last = np.where(np.arange(t)[None] < valid[:, None], starts[:, None] + np.arange(t)[None], -1)
    out = np.asarray(paged_attention(jnp.asarray(qt), jnp.asarray(k), jnp.asarray(v), jnp.asarray(TABLES),
                                     jnp.asarray(last, jnp.int32), chunk_tokens=chunk_tokens))
    for r in range(len(LENGTHS)):
        kr = np.concatenate([k[:, b] for b in TABLES[r]], axis=1)
        vr = np.concatenate([v[:, b] for b in TABLES[r]], axis=1)
        for i in range(t):
            n = last[r, i] + 1
            if n == 0:
                assert not out[r, i].any()
                continue
            s = np.einsum("kgd,ksd->kgs", qt[r, i], kr[:, :n]) / np.sqrt(D)
            p = np.exp(s - s.max(-1, keepdims=True))
            want = np.einsum("kgs,ksd->kgd", p / p.sum(-1, keepdims=True), vr[:, :n])
            np.testing.assert_allclose(out[r, i], want, atol=1e-5, rtol=0, err_msg=f"row {r} query {i}")
