"""Attention of one new token per row over the paged KV pool, one function per `decode_attention`.

Every variant takes q (B, 1, KV, G, D), the pool pages k/v (KV, P, BS, D), block tables
(B, W) of page ids into them and `lengths` (B,) = tokens each row attends over (the new one
included; 0 for a row that is not generating) and returns (B, 1, KV, G, D):
  - 'dot': `paged_attention` below (prefill uses it too): the table's pages a chunk at a
    time, online softmax, a loop that stops after the chunk holding the call's longest row;
    so the table may be as wide as max_len (one compiled shape) and only used pages are read;
  - 'reduce': the same with multiply + reduce instead of matmuls (one fused pass over keys);
  - 'pallas': our Pallas TPU kernel (lumos_jax.models.attention_tpu), reads only the row's pages;
  - 'pallas_gpu': JAX's Pallas (Triton) GPU paged-attention kernel, same pool layout;
  - 'pallas_gpu_mha': our Pallas (Triton) GPU kernel for 1..8 query heads per KV head
    (lumos_jax.inference.decode_attention_gpu): no 16-row padding, reads only used pages.
'auto' picks 'pallas' on TPU, 'pallas_gpu' on GPU, 'dot' elsewhere. The Pallas kernels run
on CPU in interpret mode (tests only).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as gpu_paged_attention
from jax.sharding import PartitionSpec

from lumos_jax.inference.decode_attention_gpu import mha_paged_attention
from lumos_jax.inference.quant import QPages, as_float, take_pages
from lumos_jax.models.attention_tpu import paged_decode_attention
from lumos_jax.sharding import logical_to_spec

NEG = -1e30
# The GPU kernel's work unit: pages per compute block so that a block covers this many
# tokens, and at most this many partitions of a row's table (split-K), combined after.
GPU_BLOCK_TOKENS = 128
GPU_MAX_SPLITS = 16
GPU_BLOCK_H = 16     # query heads per program (the kernel needs a multiple of 16; fewer are padded)


def gather_pages(pages, table, dtype):
    """The pages of each row, in order: pages (KV, P, BS, D), table (N, W) ->
    (KV, N, W * BS, D); key index s of a row holds its position s."""
    g = take_pages(pages, table)                                      # (KV, N, W, BS, D)
    kv, n, w, bs, d = g.shape
    return as_float(g.reshape(kv, n, w * bs, d), dtype)  # int8: codes x scales


# Keys per step of `paged_attention`'s loop (rounded to whole pages).
CHUNK_TOKENS = 512


def paged_attention(q, kc, vc, table, last, *, reduce: bool = False, chunk_tokens: int = CHUNK_TOKENS):
    """q (N, T, KV, G, D) attends to key positions s <= last (N, T) (-1: none) of rows whose
    pages are listed by `table` (N, W) in the pool kc/vc (KV, P, BS, D); -> (N, T, KV, G, D).
    The keys are taken `chunk_tokens` at a time with an online softmax (fp32), for as many
    chunks as the largest `last` needs: the cost follows the rows' lengths, not W, and no
    (T x W) score matrix is made. A query that sees no key gets zeros."""
    n, t, kv, g, d = q.shape
    bs = kc.shape[2]
    cb = max(1, min(chunk_tokens // bs, table.shape[1]))
    chunks = -(-table.shape[1] // cb)
    table = jnp.pad(table, ((0, 0), (0, chunks * cb - table.shape[1])))
    f32 = jnp.float32
    dtype = f32 if reduce else q.dtype          # matmuls in the compute dtype, fp32 accumulation
    qs = (q.astype(f32) / math.sqrt(d)).astype(dtype)
    limit = last[:, None, None, :, None]                                      # (N, 1, 1, T, 1)

    def step(c, carry):
        m, l, acc = carry
        cols = jax.lax.dynamic_slice_in_dim(table, c * cb, cb, axis=1)
        k = gather_pages(kc, cols, dtype)                                     # (KV, N, S, D)
        v = gather_pages(vc, cols, dtype)
        if reduce:
            s = jnp.sum(qs.transpose(0, 2, 3, 1, 4)[:, :, :, :, None] * jnp.swapaxes(k, 0, 1)[:, :, None, None],
                        axis=-1)                                              # (N, KV, G, T, S)
        else:
            s = jnp.einsum("ntkgd,knsd->nkgts", qs, k, preferred_element_type=f32)
        seen = (c * cb * bs + jnp.arange(cb * bs)) <= limit                 # (N, 1, 1, T, S)
        s = jnp.where(seen, s, NEG)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(seen, jnp.exp(s - m_new[..., None]), 0.0)
        scale = jnp.exp(m - m_new)
        if reduce:
            pv = jnp.sum(p[..., None] * jnp.swapaxes(v, 0, 1)[:, :, None, None], axis=-2)
        else:
            pv = jnp.einsum("nkgts,knsd->nkgtd", p.astype(dtype), v, preferred_element_type=f32)
        return m_new, l * scale + p.sum(-1), acc * scale[..., None] + pv

    needed = jnp.clip((jnp.max(last) + cb * bs) // (cb * bs), 0, chunks)
    init = (jnp.full((n, kv, g, t), NEG, f32), jnp.zeros((n, kv, g, t), f32), jnp.zeros((n, kv, g, t, d), f32))
    _, l, acc = jax.lax.fori_loop(0, needed, step, init)
    out = acc / jnp.maximum(l, jnp.finfo(f32).tiny)[..., None]
    return out.transpose(0, 3, 1, 2, 4).astype(q.dtype)


def _dot(q, kc, vc, table, lengths):
    return paged_attention(q, kc, vc, table, (lengths - 1)[:, None])


def _reduce(q, kc, vc, table, lengths):
    """Multiply + reduce instead of batched matrix-vector products; sometimes faster on GPU."""
    return paged_attention(q, kc, vc, table, (lengths - 1)[:, None], reduce=True)


def _pallas_tpu(q, kc, vc, table, lengths):
    if isinstance(kc, QPages):
        raise ValueError("decode_attention='pallas' (TPU) reads float pages only; "
                         "with kv_dtype='int8' use 'dot' or (GPU) 'pallas_gpu'")
    b, _, kv, g, d = q.shape
    out = paged_decode_attention(q[:, 0].reshape(b, kv * g, d), kc, vc, lengths, table)
    return out.reshape(b, 1, kv, g, d)


def gpu_blocking(width: int, block_size: int) -> tuple[int, int, int]:
    """(padded table width, pages per compute block, k splits) for the GPU kernel: the width
    must split into k_splits partitions of whole compute blocks. Padding columns point at
    page 0 and lie past every row's length, so only the last compute block may read them
    (masked)."""
    ppcb = max(1, min(GPU_BLOCK_TOKENS // block_size, width))
    chunks = -(-width // ppcb)
    splits = min(chunks, GPU_MAX_SPLITS)
    return -(-chunks // splits) * splits * ppcb, ppcb, splits


def _gpu_local(q, kc, vc, table, lengths, k_scales=None, v_scales=None, *, interpret: bool):
    """q (B, H, D) already scaled; the kernel does not scale. int8 pages come with their
    scales (KV, P, BS), which the kernel applies to the scores and the probabilities."""
    padded, ppcb, splits = gpu_blocking(table.shape[1], kc.shape[2])
    table = jnp.pad(table, ((0, 0), (0, padded - table.shape[1])))
    return gpu_paged_attention(q, kc, vc, table, lengths.astype(jnp.int32), k_scales, v_scales,
                               block_h=GPU_BLOCK_H,
                               pages_per_compute_block=ppcb, k_splits=splits, interpret=interpret)


def _mesh_or_none():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty or mesh.size == 1 else mesh


def _split_scales(kc, vc):
    """Float pages -> (kc, vc, ()); int8 `QPages` -> (codes, codes, (k scales, v scales)), the
    GPU kernels' positional arguments."""
    if isinstance(kc, QPages):
        (kc, ks), (vc, vs) = kc, vc
        return kc, vc, (ks, vs)
    return kc, vc, ()


def on_rows_and_heads(local, qh, kc, vc, table, lengths, *scales):
    """local(qh (B, H, D), kc, vc, table, lengths, *scales) -> (B, H, D), a GPU kernel on one
    device; under a mesh inside shard_map over rows and kv heads (the rules' cache_batch /
    cache_kv_heads axes), each device over its own pages."""
    mesh = _mesh_or_none()
    if mesh is None:
        return local(qh, kc, vc, table, lengths, *scales)
    q_spec = logical_to_spec(("cache_batch", "q_heads", "head_dim"), qh.shape, mesh)
    page_spec = logical_to_spec(("cache_kv_heads", None, None, None), kc.shape, mesh)
    if q_spec[1] != page_spec[0]:  # heads split unevenly: keep heads whole, split rows only
        q_spec, page_spec = PartitionSpec(q_spec[0], None, None), PartitionSpec()
    rows = PartitionSpec(q_spec[0])
    scale_specs = (PartitionSpec(*tuple(page_spec)[:3]),) * len(scales)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, page_spec, page_spec,
                                                     PartitionSpec(q_spec[0], None), rows,
                                                     *scale_specs),
                         out_specs=q_spec, check_vma=False)(qh, kc, vc, table, lengths, *scales)


def pallas_gpu(q, kc, vc, table, lengths, *, interpret: bool | None = None):
    """JAX's GPU paged-attention kernel (sharded by `on_rows_and_heads`)."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    b, _, kv, g, d = q.shape
    kc, vc, scales = _split_scales(kc, vc)
    # the kernel's dots need q in the pages' dtype (fp32 compute over a bf16 cache); int8
    # pages are converted to q's dtype inside it
    q_dtype = q.dtype if scales else kc.dtype
    qh = (q[:, 0].astype(jnp.float32) / math.sqrt(d)).astype(q_dtype).reshape(b, kv * g, d)
    out = on_rows_and_heads(functools.partial(_gpu_local, interpret=interpret), qh, kc, vc, table, lengths,
                            *scales)
    return out.reshape(b, 1, kv, g, d).astype(q.dtype)


def pallas_gpu_mha(q, kc, vc, table, lengths, **params):
    """Our Pallas GPU kernel for few query heads per KV head (decode_attention_gpu), sharded
    by `on_rows_and_heads`; `params` are its blocking and Triton settings (bench sweeps them)."""
    b, _, kv, g, d = q.shape
    kc, vc, scales = _split_scales(kc, vc)
    out = on_rows_and_heads(functools.partial(mha_paged_attention, **params), q[:, 0].reshape(b, kv * g, d),
                            kc, vc, table, lengths, *scales)
    return out.reshape(b, 1, kv, g, d)


DECODE_ATTENTION = {"dot": _dot, "reduce": _reduce, "pallas": _pallas_tpu, "pallas_gpu": pallas_gpu,
                    "pallas_gpu_mha": pallas_gpu_mha}


def resolve_decode_attention(name: str) -> str:
    if name == "auto":
        return {"tpu": "pallas", "gpu": "pallas_gpu"}.get(jax.default_backend(), "dot")
    if name not in DECODE_ATTENTION:
        raise ValueError(f"decode_attention={name!r}; expected 'auto' or one of {sorted(DECODE_ATTENTION)}")
    return name
