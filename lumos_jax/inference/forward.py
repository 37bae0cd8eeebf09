"""The Llama forward pass over a paged KV cache, specialised for prefill and decode.

Cache layout (vLLM-style, the layout of JAX's Pallas `paged_attention`): a pool of
num_blocks blocks of block_size positions shared by every row; a row's block table
(max_blocks,) int32 lists its blocks in order, so position p sits at block table[p // bs],
offset p % bs, in every layer. K and V are kept in one of two forms:
  - stacked (scanned layers, the TPU/CPU default): one array each, (kv_heads, layers,
    num_blocks, block_size, head_dim); the forward scans over the layers (compile time
    independent of depth) with the whole pool in the scan carry, so XLA updates it in
    place; the pool is viewed as (kv_heads, layers * num_blocks, ...) pages and layer i's
    block b is page i * num_blocks + b, which is what the attention kernels read (no
    per-layer slice is copied);
  - per layer (unrolled layers, the GPU default): a tuple of one array per layer each,
    (kv_heads, num_blocks, block_size, head_dim), so no single allocation is larger than
    pool / layers and the pool fits into a fragmented device heap (issue 13: a 20.67 GiB
    stacked pool of the 7B eval found no hole that large). Each array is donated and
    updated in place on its own.
Attention reads a row's first nb blocks (nb static, bucketed by the host) and masks
positions past the row's length: stale entries are never seen, so rewinding a row is just
lowering its length. Writes to block id num_blocks are dropped. Numerics follow
`lumos_jax.models.llama` (HF): RMSNorm in fp32, RoPE on halves, softmax in fp32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from lumos_jax.inference.decode_attention import DECODE_ATTENTION, NEG, paged_attention
from lumos_jax.inference.params import ForwardSpec
from lumos_jax.inference.quant import QPages, constrain_pages, qeinsum, set_pages, zero_pages
from lumos_jax.models.llama import apply_rope, rms_norm


class PagedCache(NamedTuple):
    """K and V pages: each one (kv_heads, layers, num_blocks, block_size, head_dim) array
    (stacked), or a tuple of per-layer (kv_heads, num_blocks, block_size, head_dim) arrays
    (`per_layer`). int8: `QPages` in place of each array."""
    k: Any
    v: Any

    @classmethod
    def init(cls, spec: ForwardSpec, num_blocks: int, block_size: int, dtype, shardings=None,
             per_layer: bool = False):
        """Zeros; `shardings` is each array's sharding (`logical_axes(per_layer)`)."""
        shape = cls.array_shape(spec, num_blocks, block_size, per_layer)
        if not per_layer:
            return cls(zero_pages(shape, dtype, shardings), zero_pages(shape, dtype, shardings))
        return cls(*(tuple(zero_pages(shape, dtype, shardings) for _ in range(spec.num_layers))
                     for _ in "kv"))

    @staticmethod
    def array_shape(spec: ForwardSpec, num_blocks: int, block_size: int, per_layer: bool = False):
        """The shape of each of K's (and V's) arrays."""
        layers = () if per_layer else (spec.num_layers,)
        return (spec.num_kv_heads, *layers, num_blocks, block_size, spec.head_dim)

    @staticmethod
    def logical_axes(per_layer: bool = False):
        """Per-layer arrays are sharded as the stacked pool's page view: blocks whole."""
        if per_layer:
            return ("cache_kv_heads", None, None, "head_dim")
        return ("cache_kv_heads", "layers", "cache_blocks", None, "head_dim")

    @property
    def per_layer(self) -> bool:
        return is_per_layer(self.k)

    @property
    def num_layers(self) -> int:
        return len(self.k) if self.per_layer else self.k.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[1] if self.per_layer else self.k.shape[2]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[2] if self.per_layer else self.k.shape[3]


def is_per_layer(pages) -> bool:
    """A tuple of per-layer pages (a `QPages` is a tuple too, but one array pair)."""
    return isinstance(pages, (tuple, list)) and not isinstance(pages, QPages)


def _qkv(lyr, x, positions, inv_freq, spec: ForwardSpec):
    """x (N, T, E) -> q (N, T, KV, G, D), k, v (N, T, KV, D), RoPE applied."""
    n, t, _ = x.shape
    h = rms_norm(x, lyr["attn_norm"], spec.rms_norm_eps)
    qkv = qeinsum("nte,ekgd->ntkgd", h, lyr["wqkv"], matmul=spec.int8_matmul)
    g = spec.groups
    q = qkv[:, :, :, :g].reshape(n, t, spec.num_heads, spec.head_dim)
    q = apply_rope(q, positions, inv_freq).reshape(n, t, spec.num_kv_heads, g, spec.head_dim)
    k = apply_rope(qkv[:, :, :, g], positions, inv_freq)
    return q, k, qkv[:, :, :, g + 1]


def _mlp(lyr, x, spec: ForwardSpec):
    h = rms_norm(x, lyr["mlp_norm"], spec.rms_norm_eps)
    gu = qeinsum("nte,ewi->ntwi", h, lyr["w_gate_up"], matmul=spec.int8_matmul)
    return qeinsum("nti,ie->nte", jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1], lyr["w_down"],
                   matmul=spec.int8_matmul)


def _out(lyr, attn, x, spec: ForwardSpec):
    return x + qeinsum("ntkgd,kgde->nte", attn, lyr["wo"], matmul=spec.int8_matmul)


def embed(params, ids, dtype):
    return jnp.take(params["embed"], ids, axis=0).astype(dtype)


def logits(params, hidden, spec: ForwardSpec):
    """hidden (..., E) -> fp32 logits over the padded vocab, padding at -1e30."""
    h = rms_norm(hidden, params["norm"], spec.rms_norm_eps)
    out = qeinsum("...e,ev->...v", h, params["lm_head"], preferred_element_type=jnp.float32,
                  matmul=spec.int8_matmul)
    vocab_ok = jnp.arange(out.shape[-1]) < spec.vocab_size
    return jnp.where(vocab_ok, out, NEG)


def _pages_sharding(cache_sharding):
    """The sharding of the (KV, L * NB, BS, D) page view, from the cache's."""
    if cache_sharding is None:
        return None
    spec = tuple(cache_sharding.spec) + (None,) * 5
    return NamedSharding(cache_sharding.mesh, PartitionSpec(spec[0], None, None, spec[4]))


def _constrain(x, sharding):
    return constrain_pages(x, sharding)  # float pages, or int8 pages and their scales


def _write(pages, new, blocks, offsets, sharding):
    """pages (KV, P, BS, D) <- new (N, T, KV, D) at (blocks, offsets) (N, T); a page id
    of P (out of range) drops that write."""
    out = set_pages(pages, blocks, offsets, jnp.moveaxis(new, 2, 0))
    return _constrain(out, sharding)


def _locate(table, positions, ok, num_blocks, block_size):
    """(block id, offset) of each position through the row's block table; NB where not ok."""
    col = jnp.minimum(positions // block_size, table.shape[1] - 1)
    blocks = jnp.take_along_axis(table, col, axis=1)
    return jnp.where(ok, blocks, num_blocks), positions % block_size


def _scan_layers(params, cache: PagedCache, spec: ForwardSpec, x, positions, blocks, offsets,
                 attend_fn, cache_sharding):
    """Run every layer over x (N, T, E): write each layer's K/V at (blocks, offsets) (block
    id NB: dropped) and attend with `attend_fn(q, k_pages, v_pages, layer_offset)`.
    `cache_sharding` is the sharding of each of the cache's arrays."""
    nb = cache.num_blocks
    unrolled = isinstance(params["layers"], (tuple, list))   # per-layer weight buffers

    def layer(x, kc, vc, lyr, base, pages):
        at = jnp.where(blocks < nb, blocks + base, kc.shape[1])   # page id P: dropped
        q, k, v = _qkv(lyr, x, positions, params["inv_freq"], spec)
        kc = _write(kc, k, at, offsets, pages)
        vc = _write(vc, v, at, offsets, pages)
        x = _out(lyr, attend_fn(q, kc, vc, base), x, spec)
        return x + _mlp(lyr, x, spec), kc, vc

    if cache.per_layer:
        if not unrolled or len(params["layers"]) != cache.num_layers:
            raise ValueError("a per-layer KV cache needs per-layer weights of as many layers "
                             "(params.layer_layout(params, scan=False))")
        ks, vs = [], []
        for lyr, kc, vc in zip(params["layers"], cache.k, cache.v):
            x, kc, vc = layer(x, kc, vc, lyr, jnp.int32(0), cache_sharding)
            ks.append(kc)
            vs.append(vc)
        return x, PagedCache(tuple(ks), tuple(vs))

    kv, n_layers, _, bs, d = cache.k.shape
    pages = _pages_sharding(cache_sharding)
    flat = lambda a: _constrain(a.reshape(kv, n_layers * nb, bs, d), pages)  # noqa: E731
    kc, vc = flat(cache.k), flat(cache.v)
    if unrolled:
        for i, lyr in enumerate(params["layers"]):
            x, kc, vc = layer(x, kc, vc, lyr, jnp.int32(i * nb), pages)
    else:
        def body(carry, xs):
            return layer(*carry, *xs, pages), None

        bases = jnp.arange(n_layers, dtype=jnp.int32) * nb
        (x, kc, vc), _ = jax.lax.scan(body, (x, kc, vc), (params["layers"], bases))
    shape = cache.k.shape
    return x, PagedCache(_constrain(kc.reshape(shape), cache_sharding),
                         _constrain(vc.reshape(shape), cache_sharding))


def prefill_forward(params, cache: PagedCache, spec: ForwardSpec, table, tokens, starts, valid,
                    cache_sharding=None):
    """Write `tokens` (N, T) at positions starts + t (t < valid) of rows whose block tables
    are `table` (N, nb) and return (logits at each row's last valid token (N, V), cache).
    Attention reads the nb blocks of each row only. Padding rows have valid = 0."""
    n, t = tokens.shape
    dtype = jnp.dtype(spec.dtype)
    steps = jnp.arange(t, dtype=jnp.int32)
    positions = starts[:, None] + steps[None, :]                      # (N, T)
    blocks, offsets = _locate(table, positions, steps[None, :] < valid[:, None],
                              cache.num_blocks, cache.block_size)
    last = jnp.where(steps[None, :] < valid[:, None], positions, -1)   # padding sees nothing

    def attend_rows(q, kc, vc, base):
        return paged_attention(q, kc, vc, table + base, last)

    x, cache = _scan_layers(params, cache, spec, embed(params, tokens, dtype), positions,
                            blocks, offsets, attend_rows, cache_sharding)
    final = jnp.take_along_axis(x, jnp.maximum(valid - 1, 0)[:, None, None], axis=1)[:, 0]
    return logits(params, final, spec), cache


def decode_forward(params, cache: PagedCache, spec: ForwardSpec, table, tokens, lengths, active,
                   cache_sharding=None, attention: str = "dot"):
    """One token per row: `tokens` (B,) sit at position `lengths` (B,) of the rows whose
    block tables are `table` (B, nb); inactive rows write nothing. Attention reads only
    the nb blocks of each row (every position must be < nb * block_size), by the
    `decode_attention` variant `attention`. Returns (logits (B, V), cache)."""
    dtype = jnp.dtype(spec.dtype)
    positions = lengths[:, None]                                       # (B, 1)
    blocks, offsets = _locate(table, positions, active[:, None], cache.num_blocks, cache.block_size)
    seen = jnp.where(active, lengths + 1, 0)                           # the new token is written first
    attend_fn = DECODE_ATTENTION[attention]

    def attend_rows(q, kc, vc, base):
        return attend_fn(q, kc, vc, table + base, seen)

    x, cache = _scan_layers(params, cache, spec, embed(params, tokens[:, None], dtype), positions,
                            blocks, offsets, attend_rows, cache_sharding)
    return logits(params, x[:, 0], spec), cache
