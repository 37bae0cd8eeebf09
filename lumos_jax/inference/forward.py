"""The Llama forward pass over slot caches, specialised for prefill and decode.

Cache layout: per layer `k`, `v` of shape (slots, kv_heads, max_len, head_dim). A slot's
tokens sit contiguously at cache index = position, so a row's length is all the bookkeeping
it needs: attention masks `index <= position` (stale entries past the length are never
seen), and rewinding a row is just lowering its length. Keeping max_len next to head_dim
makes q·k and p·v plain batched matmuls over (slot, kv_head) with no transposes of the cache.
Numerics follow `lumos_jax.models.llama` (HF): RMSNorm in fp32, RoPE on halves, softmax in fp32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lumos_jax.inference.params import ForwardSpec
from lumos_jax.models.llama import apply_rope

_NEG = -1e30


class SlotCache(NamedTuple):
    k: tuple[jax.Array, ...]  # per layer (slots, kv_heads, max_len, head_dim)
    v: tuple[jax.Array, ...]

    @classmethod
    def init(cls, spec: ForwardSpec, num_slots: int, max_len: int, dtype, shardings=None):
        shape = (num_slots, spec.num_kv_heads, max_len, spec.head_dim)

        def zeros():
            return jnp.zeros(shape, dtype)

        make = jax.jit(zeros, out_shardings=shardings) if shardings is not None else zeros
        return cls(tuple(make() for _ in range(spec.num_layers)),
                   tuple(make() for _ in range(spec.num_layers)))

    @staticmethod
    def logical_axes():
        return ("cache_batch", "cache_kv_heads", "cache_length", "head_dim")


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
    """q (N, T, KV, G, D), k/v (N, KV, S, D), mask (N, T, S) -> (N, T, KV, G, D)."""
    scores = jnp.einsum("ntkgd,nksd->nkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(spec.head_dim)
    scores = jnp.where(mask[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("nkgts,nksd->ntkgd", probs, v)


def _attend_decode_reduce(q, k, v, mask, spec: ForwardSpec):
    """Decode attention as multiply + reduce (one fused pass over the cache) instead of
    batched matrix-vector products; same result, sometimes faster on GPU."""
    q1 = q[:, 0].astype(jnp.float32) / math.sqrt(spec.head_dim)          # (B, KV, G, D)
    scores = jnp.sum(q1[:, :, :, None, :] * k[:, :, None].astype(jnp.float32), axis=-1)
    scores = jnp.where(mask[:, :, None, :], scores, _NEG)               # (B, KV, G, S)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.sum(probs[..., None] * v[:, :, None].astype(jnp.float32), axis=3)
    return out.astype(q.dtype)[:, None]                                 # (B, 1, KV, G, D)


DECODE_ATTENTION = {"dot": _attend, "reduce": _attend_decode_reduce}


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


def prefill_forward(params, cache: SlotCache, spec: ForwardSpec, slots, tokens, starts, valid,
                    cache_sharding=None):
    """Write `tokens` (N, T) of rows `slots` (N,) at cache index starts + t (t < valid) and
    return (logits at each row's last valid token (N, V), cache). Rows with slot id
    >= num_slots are padding: their writes are dropped."""
    n, t = tokens.shape
    dtype = jnp.dtype(spec.dtype)
    max_len = cache.k[0].shape[2]
    steps = jnp.arange(t, dtype=jnp.int32)
    positions = starts[:, None] + steps[None, :]                      # (N, T)
    write_at = jnp.where(steps[None, :] < valid[:, None], positions, max_len)
    mask = jnp.arange(max_len)[None, None, :] <= positions[:, :, None]  # (N, T, S)
    rows = slots[:, None]
    x = embed(params, tokens, dtype)
    new_k, new_v = [], []
    for i, lyr in enumerate(params["layers"]):
        q, k, v = _qkv(lyr, x, positions, params["inv_freq"], spec)
        kc = cache.k[i].at[rows, :, write_at].set(k.astype(cache.k[i].dtype), mode="drop")
        vc = cache.v[i].at[rows, :, write_at].set(v.astype(cache.v[i].dtype), mode="drop")
        kc, vc = _constrain(kc, cache_sharding), _constrain(vc, cache_sharding)
        new_k.append(kc)
        new_v.append(vc)
        k_rows = jnp.take(kc, slots, axis=0, mode="clip").astype(dtype)
        v_rows = jnp.take(vc, slots, axis=0, mode="clip").astype(dtype)
        x = _out(lyr, _attend(q, k_rows, v_rows, mask, spec), x)
        x = x + _mlp(lyr, x, spec)
    last = jnp.take_along_axis(x, jnp.maximum(valid - 1, 0)[:, None, None], axis=1)[:, 0]
    return logits(params, last, spec), SlotCache(tuple(new_k), tuple(new_v))


def decode_forward(params, cache: SlotCache, spec: ForwardSpec, tokens, lengths, active,
                   cache_sharding=None, attention: str = "dot", window: int | None = None):
    """One token per slot: `tokens` (B,) sit at position `lengths` (B,); inactive rows
    write nothing. Attention reads only the first `window` cache entries (static; every
    position must be < window), so short sequences in a long cache read little of it.
    Returns (logits (B, V), cache)."""
    b = tokens.shape[0]
    dtype = jnp.dtype(spec.dtype)
    max_len = cache.k[0].shape[2]
    window = min(window or max_len, max_len)
    positions = lengths[:, None]                                       # (B, 1)
    write_at = jnp.where(active, lengths, max_len)
    mask = (jnp.arange(window)[None, :] <= lengths[:, None])[:, None, :]  # (B, 1, W)
    rows = jnp.arange(b)
    x = embed(params, tokens[:, None], dtype)
    new_k, new_v = [], []
    for i, lyr in enumerate(params["layers"]):
        q, k, v = _qkv(lyr, x, positions, params["inv_freq"], spec)
        kc = cache.k[i].at[rows, :, write_at].set(k[:, 0].astype(cache.k[i].dtype), mode="drop")
        vc = cache.v[i].at[rows, :, write_at].set(v[:, 0].astype(cache.v[i].dtype), mode="drop")
        kc, vc = _constrain(kc, cache_sharding), _constrain(vc, cache_sharding)
        new_k.append(kc)
        new_v.append(vc)
        attend = DECODE_ATTENTION[attention]
        k_seen, v_seen = kc[:, :, :window].astype(dtype), vc[:, :, :window].astype(dtype)
        x = _out(lyr, attend(q, k_seen, v_seen, mask, spec), x)
        x = x + _mlp(lyr, x, spec)
    return logits(params, x[:, 0], spec), SlotCache(tuple(new_k), tuple(new_v))
