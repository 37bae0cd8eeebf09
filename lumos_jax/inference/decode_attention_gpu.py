"""Paged decode attention on GPU for few query heads per KV head (MHA: one), in Pallas (Triton).

JAX's GPU paged-attention kernel is built for GQA: it pads the query heads of one KV head to
16 rows for tensor-core dots and writes 16 partial outputs per row (k_splits over the whole
table width), so with one query head per KV head most of its work and writes are padding.
A decode step only has to read each used page of K and V once; this kernel is shaped by that:

- one program per (row, KV head, split); it streams its share of the row's pages a compute
  block (`pages_per_block` pages) at a time with an online softmax in fp32 and stops at the
  row's length (pages past it are never loaded; the last page's tail is masked); with
  `prefetch` the next block's K/V are loaded by hand before the current one is computed
  (Triton pipelines only loads that feed a dot, and these feed none; off by default, PREFETCH);
- scores and the weighted sum of V are multiply + reduce over D and over the block, one
  query row at a time (G <= 8 rows reuse the loaded block), with no padding of G;
- splits: a static count from the batch and KV heads (enough programs to fill the card),
  each taking an equal share of the row's *used* pages (dynamic, from its length), so a wide
  table costs nothing; with one split the program writes the normalised output itself, with
  more their (acc, max, sum) are combined by a few XLA ops over (B, KV, splits, G, D) fp32.

Padding the query rows to 16 for tensor-core dots instead (JAX's way, so that Triton's
pipeliner streams the K/V loads) was tried and measured slower on an H200 (2026-12-02, 7B
shape, batch 64: 296-372 us a layer against 191-222; bench/results/decode_attention_sweep.json),
so it is gone. int8 pages (`QPages`' codes and per-token scales) are
read as codes and scaled in fp32.
On CPU it runs in interpret mode (tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

NEG = -1e30
LOG2E = math.log2(math.e)
BLOCK_TOKENS = 64        # default tokens per compute block (pages_per_block * block size)
TARGET_PROGRAMS = 1024   # splits are chosen so that B * KV * splits reaches about this many
MAX_SPLITS = 16
MAX_GROUPS = 8           # query heads per KV head handled by one program's loop
# The by-hand prefetch is off by default: on one H200 (2026-12-02, bench/decode_attention_sweep.py,
# 7B shape, batch 64, ctx 640) 4 pages x 4 warps took 191 us a layer without it against 216-222 us
# with it (8 x 8: 202 against 265 us); at batch 1 the two were within the run's noise (18-19 us).
PREFETCH = False


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def default_blocking(batch: int, kv_heads: int, width: int, block_size: int) -> tuple[int, int]:
    """(pages per compute block, splits) for a call's static shapes: blocks of about
    BLOCK_TOKENS tokens (a power of two: Triton's loads need one), and splits until the grid
    has about TARGET_PROGRAMS programs, never more than the table has compute blocks."""
    ppb = min(_pow2_at_most(max(1, BLOCK_TOKENS // block_size)), 1 << (width - 1).bit_length())
    splits = max(1, min(MAX_SPLITS, TARGET_PROGRAMS // max(1, batch * kv_heads), -(-width // ppb)))
    return ppb, splits


def _over_tokens(reduce, x, keep: int = 0):
    """`reduce` over x's leading axes until `keep` are left, one axis per op (Triton's)."""
    while x.ndim > keep:
        x = reduce(x, axis=0)
    return x


def _kernel(len_ref, table_ref, q_ref, k_ref, v_ref, *refs, groups: int, ppb: int, splits: int,
            quantized: bool, prefetch: bool, flat: bool):
    """One (row, KV head, split): its share of the row's used pages, online softmax (log2)."""
    if quantized:
        ks_ref, vs_ref, *outs = refs
        page_refs = (k_ref, v_ref, ks_ref, vs_ref)
    else:
        outs = refs
        page_refs = (k_ref, v_ref)
    bs, d = k_ref.shape[-2:]
    n = len_ref[0]
    pages = (n + bs - 1) // bs
    share = ((pages + splits - 1) // splits + ppb - 1) // ppb * ppb   # whole compute blocks
    first = pl.program_id(2) * share
    last = jnp.minimum(first + share, pages) - 1                      # the split's last page
    blocks = (jnp.clip(pages - first, 0, share) + ppb - 1) // ppb
    scale = LOG2E / math.sqrt(d)
    qs = [q_ref[g, :].astype(jnp.float32) * scale for g in range(groups)]
    lanes = jnp.arange(ppb, dtype=jnp.int32)
    if flat:                                                          # token within a block
        slot = jnp.arange(ppb * bs, dtype=jnp.int32)
    else:
        slot = lanes[:, None] * bs + jnp.arange(bs, dtype=jnp.int32)[None, :]

    def page_ids(i):
        """Block i's page ids; columns past the split's last page re-read that page (masked in
        `update`), so no page the row does not use is read and the table needs no padding."""
        return table_ref[jnp.minimum(first + i * ppb + lanes, last)]

    def fetch(ids):
        return tuple(ref[ids] for ref in page_refs)          # (ppb, bs, d) K, V [, (ppb, bs) scales]

    def update(i, block, state):
        # flat: the block as (ppb * bs, d) rows (a reshape, as JAX's kernel does); else kept
        # (ppb, bs, d) and reduced one axis at a time (Triton reduces one axis per op)
        tokens = (ppb * bs,) if flat else (ppb, bs)
        live = (first + i * ppb) * bs + slot < n
        # a used page's tail past the length holds zeros or an earlier row's K/V (finite): its
        # p is 0 (not sanitised, so that a read of an unused NaN page shows in the tests)
        k, v = (x.reshape(*tokens, d).astype(jnp.float32) for x in block[:2])
        ks, vs = (x.reshape(tokens) for x in block[2:]) if quantized else (None, None)
        out = []
        for g, (m, l, acc) in enumerate(state):
            s = jnp.sum(k * qs[g], axis=-1)                                    # tokens
            if quantized:
                s = s * ks
            s = jnp.where(live, s, NEG)
            m_new = jnp.maximum(m, _over_tokens(jnp.max, s))
            corr = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new)                                            # masked: 0
            w = p * vs if quantized else p
            out.append((m_new, l * corr + _over_tokens(jnp.sum, p),
                        acc * corr + _over_tokens(jnp.sum, w[..., None] * v, keep=1)))
        return out

    init = [(jnp.float32(NEG), jnp.float32(0.0), jnp.zeros((d,), jnp.float32)) for _ in range(groups)]
    if not prefetch:
        final = jax.lax.fori_loop(0, blocks, lambda i, st: update(i, fetch(page_ids(i)), st), init)
    else:
        # Triton pipelines only loads that feed dots, so the loop does it by hand: block i+1's
        # K/V loads and block i+2's page ids are issued before block i is computed.
        def body(i, carry):
            ids_next, block, state = carry
            return page_ids(i + 2), fetch(ids_next), update(i, block, state)

        def empty():
            return (jnp.zeros((ppb,), jnp.int32),
                    tuple(jnp.zeros((ppb, *ref.shape[1:]), ref.dtype) for ref in page_refs))

        ids1, block0 = jax.lax.cond(blocks > 0, lambda: (page_ids(1), fetch(page_ids(0))), empty)
        _, _, final = jax.lax.fori_loop(0, blocks, body, (ids1, block0, init))
    if splits == 1:
        (o_ref,) = outs
        for g, (_, l, acc) in enumerate(final):
            o_ref[g, :] = (acc / jnp.maximum(l, jnp.finfo(jnp.float32).tiny)).astype(o_ref.dtype)
    else:
        o_ref, m_ref, l_ref = outs
        for g, (m, l, acc) in enumerate(final):
            o_ref[g, :] = acc
            m_ref[g] = m
            l_ref[g] = l


def mha_paged_attention(q, k_pages, v_pages, table, lengths, k_scales=None, v_scales=None, *,
                        pages_per_block: int | None = None, splits: int | None = None,
                        prefetch: bool = PREFETCH, flat: bool = True, num_warps: int = 4,
                        num_stages: int = 2, interpret: bool | None = None):
    """q (B, KV * G, D) unscaled, pages (KV, P, BS, D) (int8 codes with `k_scales`/`v_scales`
    (KV, P, BS)), table (B, W) page ids, lengths (B,) tokens per row (0: zeros out) ->
    (B, KV * G, D) in q's dtype. `pages_per_block` (a power of two) and `splits` default to
    `default_blocking`; `prefetch`: load the next block while computing this one (by hand:
    Triton's pipeliner, num_stages, leaves loads that feed no dot alone); `flat`: compute on
    the block as (tokens, D) rows (else as (pages, block size, D), no reshape); num_warps /
    num_stages go to Triton."""
    b, h, d = q.shape
    kv, _, bs, _ = k_pages.shape
    g = h // kv
    if h % kv or g > MAX_GROUPS:
        raise ValueError(f"decode_attention='pallas_gpu_mha' handles 1..{MAX_GROUPS} query heads per "
                         f"KV head; got {h} query heads over {kv} KV heads (use 'pallas_gpu')")
    if bs & (bs - 1) or d & (d - 1):
        raise ValueError(f"decode_attention='pallas_gpu_mha' needs a power-of-two block_size and "
                         f"head_dim (Triton's loads); got block_size={bs}, head_dim={d}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    ppb, auto_splits = default_blocking(b, kv, table.shape[1], bs)
    ppb = pages_per_block or ppb
    if ppb & (ppb - 1):
        raise ValueError(f"pages_per_block={ppb} must be a power of two (Triton's loads)")
    splits = splits or auto_splits
    width = table.shape[1]
    quantized = k_scales is not None
    page_spec = pl.BlockSpec((None, *k_pages.shape[1:]), lambda r, j, s: (j, 0, 0, 0))
    scale_spec = pl.BlockSpec((None, *k_pages.shape[1:3]), lambda r, j, s: (j, 0, 0))
    in_specs = [pl.BlockSpec((None, 1), lambda r, j, s: (r, 0)),              # length
                pl.BlockSpec((None, width), lambda r, j, s: (r, 0)),          # table row
                pl.BlockSpec((None, None, g, d), lambda r, j, s: (r, j, 0, 0)),
                page_spec, page_spec] + [scale_spec] * (2 * quantized)
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((b, kv, g, d), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, g, d), lambda r, j, s: (r, j, 0, 0))]
    else:
        part = (b, kv, splits, g)
        out_shape = [jax.ShapeDtypeStruct((*part, d), jnp.float32),
                     jax.ShapeDtypeStruct(part, jnp.float32), jax.ShapeDtypeStruct(part, jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, g, d), lambda r, j, s: (r, j, s, 0, 0)),
                     pl.BlockSpec((None, None, None, g), lambda r, j, s: (r, j, s, 0)),
                     pl.BlockSpec((None, None, None, g), lambda r, j, s: (r, j, s, 0))]
    kernel = functools.partial(_kernel, groups=g, ppb=ppb, splits=splits, quantized=quantized,
                               prefetch=prefetch, flat=flat)
    scales = (k_scales, v_scales) if quantized else ()
    outs = pl.pallas_call(
        kernel, grid=(b, kv, splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=interpret, compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=f"mha_paged_attention_ppb{ppb}_s{splits}",
    )(lengths.astype(jnp.int32).reshape(b, 1), table.astype(jnp.int32), q.reshape(b, kv, g, d),
      k_pages, v_pages, *scales)
    if splits == 1:
        return outs[0].reshape(b, h, d)
    return combine_splits(*outs).astype(q.dtype).reshape(b, h, d)


def combine_splits(acc, m, l):
    """Partials (B, KV, S, G, D), maxima and sums (B, KV, S, G) in log2 units -> (B, KV, G, D);
    an empty split has m = NEG and l = 0, a row with no keys gets zeros."""
    w = jnp.exp2(m - m.max(axis=2, keepdims=True))
    total = jnp.sum(l * w, axis=2)
    return jnp.sum(acc * w[..., None], axis=2) / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]
