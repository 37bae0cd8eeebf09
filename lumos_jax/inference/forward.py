"""The Llama forward pass over a paged KV cache, specialised for prefill and decode.

Cache layout (vLLM-style, the layout of JAX's Pallas `paged_attention`): per layer K and V
pages (kv_heads, num_blocks, block_size, head_dim) shared by every row; a row's block table
(max_blocks,) int32 lists its blocks in order, so position p sits at block table[p // bs],
offset p % bs. Attention gathers a row's first nb blocks (nb static, bucketed by the host)
and masks `index <= position`: stale entries past a row's length are never seen, so
rewinding a row is just lowering its length. Writes to block id num_blocks are dropped.
Numerics follow `lumos_jax.models.llama` (HF): RMSNorm in fp32, RoPE on halves, softmax in fp32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lumos_jax.inference.params import ForwardSpec
from lumos_jax.models.attention_tpu import paged_decode_attention
from lumos_jax.models.llama import apply_rope

_NEG = -1e30


class PagedCache(NamedTuple):
    """Per layer K and V pages (kv_heads, num_blocks, block_size, head_dim), the layout of
    `jax.experimental.pallas.ops.tpu.paged_attention` (k_pages / v_pages)."""
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def init(cls, spec: ForwardSpec, num_blocks: int, block_size: int, dtype, shardings=None):
        shape = (spec.num_kv_heads, num_blocks, block_size, spec.head_dim)

        def zeros():
            return jnp.zeros(shape, dtype)

        make = jax.jit(zeros, out_shardings=shardings) if shardings is not None else zeros
        return cls(tuple(make() for _ in range(spec.num_layers)),
                   tuple(make() for _ in range(spec.num_layers)))

    @staticmethod
    def logical_axes():
        return ("cache_kv_heads", "cache_blocks", None, "head_dim")

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[1]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[2]


def rms_norm(x, weight, eps):
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * h.astype(x.dtype)


def _qkv(lyr, x, positions, inv_freq, spec: ForwardSpec):
    """x (N, T, E) -> q (N, T, KV, G, D), k, v (N, T, KV, D), RoPE applied."""
    n, t, _ = x.shape
    h = rms_norm(x, lyr["attn_norm"], spec.rms_norm_eps)
    qkv = jnp.einsum("nte,ekgd->ntkgd", h, lyr["wqkv"])
    g = spec.groups
    q = qkv[:, :, :, :g].reshape(n, t, spec.num_heads, spec.head_dim)
    q = apply_rope(q, positions, inv_freq).reshape(n, t, spec.num_kv_heads, g, spec.head_dim)
    k = apply_rope(qkv[:, :, :, g], positions, inv_freq)
    return q, k, qkv[:, :, :, g + 1]


def _mlp(lyr, x, spec: ForwardSpec):
    h = rms_norm(x, lyr["mlp_norm"], spec.rms_norm_eps)
    gu = jnp.einsum("nte,ewi->ntwi", h, lyr["w_gate_up"])
    return jnp.einsum("nti,ie->nte", jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1], lyr["w_down"])


def _attend(q, k, v, mask, spec: ForwardSpec):
    """q (N, T, KV, G, D), k/v (KV, N, S, D), mask (N, T, S) -> (N, T, KV, G, D)."""
    scores = jnp.einsum("ntkgd,knsd->nkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(spec.head_dim)
    scores = jnp.where(mask[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("nkgts,knsd->ntkgd", probs, v)


def _attend_decode_reduce(q, k, v, mask, spec: ForwardSpec):
    """Decode attention as multiply + reduce (one fused pass over the keys) instead of
    batched matrix-vector products; same result, sometimes faster on GPU."""
    q1 = q[:, 0].astype(jnp.float32) / math.sqrt(spec.head_dim)          # (B, KV, G, D)
    kb = jnp.swapaxes(k, 0, 1).astype(jnp.float32)                       # (B, KV, S, D)
    vb = jnp.swapaxes(v, 0, 1).astype(jnp.float32)
    scores = jnp.sum(q1[:, :, :, None, :] * kb[:, :, None], axis=-1)
    scores = jnp.where(mask[:, :, None, :], scores, _NEG)               # (B, KV, G, S)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.sum(probs[..., None] * vb[:, :, None], axis=3)
    return out.astype(q.dtype)[:, None]                                 # (B, 1, KV, G, D)


def _attend_pallas(q, kc, vc, lengths, table, active):
    """The Pallas paged decode kernel (lumos_jax.models.attention_tpu) on the pool itself:
    it reads only each row's blocks, no gather. q (B, 1, KV, G, D) -> same shape."""
    b, _, kv, g, d = q.shape
    n = jnp.where(active, lengths + 1, 0)  # the new token is already written
    out = paged_decode_attention(q[:, 0].reshape(b, kv * g, d), kc, vc, n, table)
    return out.reshape(b, 1, kv, g, d)


# "pallas" is the TPU kernel (interpret mode elsewhere: tests only); "auto" picks it on TPU.
DECODE_ATTENTION = {"dot": _attend, "reduce": _attend_decode_reduce, "pallas": _attend_pallas}


def resolve_decode_attention(name: str) -> str:
    if name == "auto":
        return "pallas" if jax.default_backend() == "tpu" else "dot"
    if name not in DECODE_ATTENTION:
        raise ValueError(f"decode_attention={name!r}; expected 'auto' or one of {sorted(DECODE_ATTENTION)}")
    return name


def _out(lyr, attn, x):
    return x + jnp.einsum("ntkgd,kgde->nte", attn, lyr["wo"])


def embed(params, ids, dtype):
    return jnp.take(params["embed"], ids, axis=0).astype(dtype)


def logits(params, hidden, spec: ForwardSpec):
    """hidden (..., E) -> fp32 logits over the padded vocab, padding at -1e30."""
    h = rms_norm(hidden, params["norm"], spec.rms_norm_eps)
    out = jnp.einsum("...e,ev->...v", h, params["lm_head"], preferred_element_type=jnp.float32)
    vocab_ok = jnp.arange(out.shape[-1]) < spec.vocab_size
    return jnp.where(vocab_ok, out, _NEG)


def _constrain(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _write(pages, new, blocks, offsets, sharding):
    """pages (KV, NB, BS, D) <- new (N, T, KV, D) at (blocks, offsets) (N, T); a block id
    of NB (out of range) drops that write."""
    out = pages.at[:, blocks, offsets].set(jnp.moveaxis(new, 2, 0).astype(pages.dtype), mode="drop")
    return _constrain(out, sharding)


def _gather(pages, table, dtype):
    """The blocks of each row, in order: pages (KV, NB, BS, D), table (N, nb) ->
    (KV, N, nb * BS, D); key index s of a row holds its position s."""
    g = jnp.take(pages, table, axis=1, mode="clip")                   # (KV, N, nb, BS, D)
    kv, n, nb, bs, d = g.shape
    return g.reshape(kv, n, nb * bs, d).astype(dtype)


def _locate(table, positions, ok, num_blocks, block_size):
    """(block id, offset) of each position through the row's block table; NB where not ok."""
    col = jnp.minimum(positions // block_size, table.shape[1] - 1)
    blocks = jnp.take_along_axis(table, col, axis=1)
    return jnp.where(ok, blocks, num_blocks), positions % block_size


def prefill_forward(params, cache: PagedCache, spec: ForwardSpec, table, tokens, starts, valid,
                    cache_sharding=None):
    """Write `tokens` (N, T) at positions starts + t (t < valid) of rows whose block tables
    are `table` (N, nb) and return (logits at each row's last valid token (N, V), cache).
    Attention reads the nb blocks of each row only. Padding rows have valid = 0."""
    n, t = tokens.shape
    dtype = jnp.dtype(spec.dtype)
    nb, bs = cache.num_blocks, cache.block_size
    steps = jnp.arange(t, dtype=jnp.int32)
    positions = starts[:, None] + steps[None, :]                      # (N, T)
    blocks, offsets = _locate(table, positions, steps[None, :] < valid[:, None], nb, bs)
    seen = table.shape[1] * bs
    mask = jnp.arange(seen)[None, None, :] <= positions[:, :, None]   # (N, T, S)
    x = embed(params, tokens, dtype)
    new_k, new_v = [], []
    for i, lyr in enumerate(params["layers"]):
        q, k, v = _qkv(lyr, x, positions, params["inv_freq"], spec)
        kc = _write(cache.k[i], k, blocks, offsets, cache_sharding)
        vc = _write(cache.v[i], v, blocks, offsets, cache_sharding)
        new_k.append(kc)
        new_v.append(vc)
        attn = _attend(q, _gather(kc, table, dtype), _gather(vc, table, dtype), mask, spec)
        x = _out(lyr, attn, x)
        x = x + _mlp(lyr, x, spec)
    last = jnp.take_along_axis(x, jnp.maximum(valid - 1, 0)[:, None, None], axis=1)[:, 0]
    return logits(params, last, spec), PagedCache(tuple(new_k), tuple(new_v))


def decode_forward(params, cache: PagedCache, spec: ForwardSpec, table, tokens, lengths, active,
                   cache_sharding=None, attention: str = "dot"):
    """One token per row: `tokens` (B,) sit at position `lengths` (B,) of the rows whose
    block tables are `table` (B, nb); inactive rows write nothing. Attention reads only
    the nb blocks of each row (every position must be < nb * block_size).
    Returns (logits (B, V), cache)."""
    dtype = jnp.dtype(spec.dtype)
    nb, bs = cache.num_blocks, cache.block_size
    positions = lengths[:, None]                                       # (B, 1)
    blocks, offsets = _locate(table, positions, active[:, None], nb, bs)
    seen = table.shape[1] * bs
    mask = (jnp.arange(seen)[None, :] <= lengths[:, None])[:, None, :]  # (B, 1, S)
    x = embed(params, tokens[:, None], dtype)
    new_k, new_v = [], []
    attend = DECODE_ATTENTION[attention]
    for i, lyr in enumerate(params["layers"]):
        q, k, v = _qkv(lyr, x, positions, params["inv_freq"], spec)
        kc = _write(cache.k[i], k, blocks, offsets, cache_sharding)
        vc = _write(cache.v[i], v, blocks, offsets, cache_sharding)
        new_k.append(kc)
        new_v.append(vc)
        if attention == "pallas":
            a = _attend_pallas(q, kc, vc, lengths, table, active)
        else:
            a = attend(q, _gather(kc, table, dtype), _gather(vc, table, dtype), mask, spec)
        x = _out(lyr, a, x)
        x = x + _mlp(lyr, x, spec)
    return logits(params, x[:, 0], spec), PagedCache(tuple(new_k), tuple(new_v))
