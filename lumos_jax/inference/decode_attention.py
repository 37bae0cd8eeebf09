"""Attention of one new token per row over the paged KV pool, one function per `decode_attention`.

Every variant takes q (B, 1, KV, G, D), the pool pages k/v (KV, P, BS, D), block tables
(B, W) of page ids into them and `lengths` (B,) = tokens each row attends over (the new one
included; 0 for a row that is not generating) and returns (B, 1, KV, G, D):
  - 'dot': gather the row's W pages, masked softmax by matmuls (the reference path);
  - 'reduce': the same as multiply + reduce (one fused pass over the keys);
  - 'pallas': our Pallas TPU kernel (lumos_jax.models.attention_tpu), reads only the row's pages;
  - 'pallas_gpu': JAX's Pallas (Triton) GPU paged-attention kernel, same pool layout.
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


def attend(q, k, v, mask):
    """q (N, T, KV, G, D), k/v (KV, N, S, D), mask (N, T, S) -> (N, T, KV, G, D)."""
    scores = jnp.einsum("ntkgd,knsd->nkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None, None], scores, NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("nkgts,knsd->ntkgd", probs, v)


def _length_mask(lengths, width):
    return (jnp.arange(width)[None, :] < lengths[:, None])[:, None, :]          # (B, 1, S)


def _dot(q, kc, vc, table, lengths):
    k, v = gather_pages(kc, table, q.dtype), gather_pages(vc, table, q.dtype)
    return attend(q, k, v, _length_mask(lengths, k.shape[2]))


def _reduce(q, kc, vc, table, lengths):
    """Multiply + reduce instead of batched matrix-vector products; sometimes faster on GPU."""
    q1 = q[:, 0].astype(jnp.float32) / math.sqrt(q.shape[-1])               # (B, KV, G, D)
    kb = jnp.swapaxes(gather_pages(kc, table, jnp.float32), 0, 1)           # (B, KV, S, D)
    vb = jnp.swapaxes(gather_pages(vc, table, jnp.float32), 0, 1)
    scores = jnp.sum(q1[:, :, :, None, :] * kb[:, :, None], axis=-1)
    scores = jnp.where(_length_mask(lengths, kb.shape[2])[:, :, None, :], scores, NEG)
    probs = jax.nn.softmax(scores, axis=-1)                                 # (B, KV, G, S)
    out = jnp.sum(probs[..., None] * vb[:, :, None], axis=3)
    return out.astype(q.dtype)[:, None]


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


def pallas_gpu(q, kc, vc, table, lengths, *, interpret: bool | None = None):
    """JAX's GPU paged-attention kernel; under a mesh inside shard_map over rows and kv heads
    (the rules' cache_batch / cache_kv_heads axes), each device over its own pages."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    b, _, kv, g, d = q.shape
    qh = (q[:, 0].astype(jnp.float32) / math.sqrt(d)).astype(q.dtype).reshape(b, kv * g, d)
    local = functools.partial(_gpu_local, interpret=interpret)
    scales = ()
    if isinstance(kc, QPages):
        (kc, ks), (vc, vs) = kc, vc
        scales = (ks, vs)
    mesh = _mesh_or_none()
    if mesh is None:
        out = local(qh, kc, vc, table, lengths, *scales)
    else:
        q_spec = logical_to_spec(("cache_batch", "q_heads", "head_dim"), qh.shape, mesh)
        page_spec = logical_to_spec(("cache_kv_heads", None, None, None), kc.shape, mesh)
        if q_spec[1] != page_spec[0]:  # heads split unevenly: keep heads whole, split rows only
            q_spec, page_spec = PartitionSpec(q_spec[0], None, None), PartitionSpec()
        rows = PartitionSpec(q_spec[0])
        scale_specs = (PartitionSpec(*tuple(page_spec)[:3]),) * len(scales)
        out = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, page_spec, page_spec,
                                                        PartitionSpec(q_spec[0], None), rows,
                                                        *scale_specs),
                            out_specs=q_spec, check_vma=False)(qh, kc, vc, table, lengths, *scales)
    return out.reshape(b, 1, kv, g, d)


DECODE_ATTENTION = {"dot": _dot, "reduce": _reduce, "pallas": _pallas_tpu, "pallas_gpu": pallas_gpu}


def resolve_decode_attention(name: str) -> str:
    if name == "auto":
        return {"tpu": "pallas", "gpu": "pallas_gpu"}.get(jax.default_backend(), "dot")
    if name not in DECODE_ATTENTION:
        raise ValueError(f"decode_attention={name!r}; expected 'auto' or one of {sorted(DECODE_ATTENTION)}")
    return name
