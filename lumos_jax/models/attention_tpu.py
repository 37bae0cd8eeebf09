"""Pallas TPU attention: splash attention for training and prefill, a paged decode kernel.

On a TPU the XLA attention path materialises a (T x T) score matrix per head; JAX's
splash attention streams blocks instead (MaxText's default there). We use it with our
mask rule — a query sees keys of its own non-zero segment at positions <= its own — which
is splash's causal mask plus segment ids, because within a segment our positions rise with
the index (packing and padding both lay rows out that way).

`paged_decode_attention` is ours: one query token per row against a block-paged KV pool
laid out as JAX's `paged_attention` expects (`(kv_heads, num_blocks, block_size,
head_dim)` pages, a `(rows, blocks_per_row)` block table, per-row lengths). Its grid walks a
row's table and fetches only the blocks that row uses: past the row's last block the index
map repeats that block, which the pipeline does not fetch again.

Both run on CPU in Pallas interpret mode (`interpret=True`), which is how the tests check
them against the XLA path. Under a mesh they run inside `shard_map`, split over the batch
and head axes the logical rules give, so each device attends over its own rows and heads.
"""

from __future__ import annotations

import functools
import math

import gin
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from lumos_jax.sharding import logical_to_spec

# Starting points per TPU generation (query block, key/value block), MaxText-like; not tuned
# here (no TPU on this project's machines). v5e/v6e have more VMEM, so larger kv blocks.
GENERATION_BLOCKS = {
    "v4": (512, 512),
    "v5e": (512, 1024),
    "v5p": (512, 1024),
    "v6e": (1024, 1024),
    "cpu": (128, 128),
}
_DEVICE_KINDS = (("v6", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"), ("v5", "v5p"), ("v4", "v4"))


def tpu_generation() -> str:
    """'v4' / 'v5e' / 'v5p' / 'v6e' from the first device's kind; 'cpu' off TPU."""
    dev = jax.devices()[0]
    if dev.platform != "tpu":
        return "cpu"
    kind = dev.device_kind.lower()
    for needle, gen in _DEVICE_KINDS:
        if needle in kind:
            return gen
    return "v5p"


@gin.configurable("splash_attention")
def splash_block_sizes(seq_len: int, generation: str = "auto", block_q: int | None = None,
                       block_kv: int | None = None, block_kv_compute: int | None = None,
                       use_fused_bwd_kernel: bool = False) -> splash.BlockSizes:
    """Block sizes for one sequence length: gin overrides, else the generation's defaults,
    each capped at the (padded) sequence length."""
    gen = tpu_generation() if generation == "auto" else generation
    if gen not in GENERATION_BLOCKS:
        raise ValueError(f"splash_attention.generation={generation!r}; expected 'auto' or one of "
                         f"{sorted(GENERATION_BLOCKS)}")
    dq, dkv = GENERATION_BLOCKS[gen]
    bq, bkv = min(block_q or dq, seq_len), min(block_kv or dkv, seq_len)
    bkc = min(block_kv_compute or bkv, bkv)
    return splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkc, block_q_dkv=bq,
                             block_kv_dkv=bkv, block_kv_dkv_compute=bkc, block_q_dq=bq, block_kv_dq=bkv,
                             use_fused_bwd_kernel=use_fused_bwd_kernel)


def _padded_length(t: int, blocks: int = 128) -> int:
    return int(math.ceil(t / blocks) * blocks)


@functools.lru_cache(maxsize=64)
def _splash_kernel(groups: int, seq_len: int, interpret: bool):
    """Cached per shape; built as concrete arrays (the mask tables) even when first asked
    for inside a trace, so a cached kernel never holds another trace's values."""
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq_len, seq_len)) for _ in range(groups)])
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mqa_single_device(mask, block_sizes=splash_block_sizes(seq_len),
                                                    interpret=interpret)


def _splash_local(q, k, v, segment_ids, interpret: bool):
    """One device's rows and heads: q (B, T, H, D) pre-scaled, k/v (B, T, KV, D)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    groups = h // kv
    tp = _padded_length(t)
    if tp != t:  # padding rows get segment 0, which no real query attends
        pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, tp - t)))
    kernel = _splash_kernel(groups, tp, interpret)
    qh = q.reshape(b, tp, kv, groups, d).transpose(0, 2, 3, 1, 4)  # (B, KV, G, T, D)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)     # (B, KV, T, D)

    def row(qr, kr, vr, seg):
        ids = splash.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qg, kg, vg: kernel(qg, kg, vg, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(row)(qh, kh, vh, segment_ids)                    # (B, KV, G, T, D)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)[:, :t]


def _mesh_or_none():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty or mesh.size == 1 else mesh


def _heads_alike(q, k, v, q_spec, kv_spec):
    """When the rules shard query heads but cannot shard the (fewer) kv heads the same way,
    repeat kv heads up to the query heads so every device holds its own groups' keys."""
    if q_spec[2] == kv_spec[2]:
        return k, v, kv_spec
    groups = q.shape[2] // k.shape[2]
    return jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2), q_spec


def splash_attention(q, k, v, segment_ids, *, interpret: bool | None = None):
    """Causal + segment attention: q (B, T, H, D), k/v (B, T, KV, D) → (B, T, H, D).
    Scaled by 1/sqrt(D) as the XLA path is; padding queries (segment 0) give unspecified
    values, as nothing reads them."""
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    scale = 1.0 / math.sqrt(q.shape[-1])
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    mesh = _mesh_or_none()
    if mesh is None:
        return _splash_local(q, k, v, segment_ids, interpret)
    q_spec = logical_to_spec(("batch", "length", "q_heads", "head_dim"), q.shape, mesh)
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k.shape, mesh)
    k, v, kv_spec = _heads_alike(q, k, v, q_spec, kv_spec)
    if q_spec[1] is not None or q_spec[3] is not None:
        raise ValueError("splash attention: the logical rules shard 'length' or 'head_dim'; "
                         "shard batch and heads only")
    seg_spec = PartitionSpec(q_spec[0], None)
    fn = jax.shard_map(functools.partial(_splash_local, interpret=interpret), mesh=mesh,
                       in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False)
    return fn(q, k, v, segment_ids)


# ---------------------------------------------------------------- paged decode attention

def _decode_kernel(tables_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *,
                   block_size: int, blocks_per_row: int):
    b, i = pl.program_id(0), pl.program_id(2)
    length = lengths_ref[b]

    @pl.when(i == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(i * block_size < length)
    def _block():
        q = q_ref[...].astype(jnp.float32)                      # (G, D), pre-scaled
        k = k_ref[...].astype(jnp.float32)                      # (BS, D)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        pos = i * block_size + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(pos < length, s, -jnp.inf)
        m_prev = m_sc[...]
        m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        p = jnp.exp(s - m_next)
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=-1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + jax.lax.dot_general(
            p, v_ref[...].astype(jnp.float32), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        m_sc[...] = m_next

    @pl.when(i == blocks_per_row - 1)
    def _write():
        l = l_sc[...]
        o_ref[...] = jnp.where(l > 0, acc_sc[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def _paged_local(q, k_pages, v_pages, lengths, block_tables, interpret: bool):
    rows, h, d = q.shape
    kv, _, block_size, _ = k_pages.shape
    groups = h // kv
    blocks_per_row = block_tables.shape[1]
    q = q.reshape(rows, kv, groups, d)

    def kv_index(b, hh, i, tables, lens):
        last = jnp.maximum(lens[b] - 1, 0) // block_size   # repeat the last used block: no fetch
        return hh, tables[b * blocks_per_row + jnp.minimum(i, last)], 0, 0

    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(rows, kv, blocks_per_row),
        in_specs=[pl.BlockSpec((None, None, groups, d), lambda b, hh, i, t, n: (b, hh, 0, 0)),
                  pl.BlockSpec((None, None, block_size, d), kv_index),
                  pl.BlockSpec((None, None, block_size, d), kv_index)],
        out_specs=pl.BlockSpec((None, None, groups, d), lambda b, hh, i, t, n: (b, hh, 0, 0)),
        scratch_shapes=[pltpu.VMEM((groups, 1), jnp.float32), pltpu.VMEM((groups, 1), jnp.float32),
                        pltpu.VMEM((groups, d), jnp.float32)])
    kernel = functools.partial(_decode_kernel, block_size=block_size, blocks_per_row=blocks_per_row)
    out = pl.pallas_call(kernel, grid_spec=spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
                         interpret=pltpu.InterpretParams() if interpret else False)(
        block_tables.reshape(-1).astype(jnp.int32), lengths.astype(jnp.int32), q, k_pages, v_pages)
    return out.reshape(rows, h, d)


def paged_decode_attention(q, k_pages, v_pages, lengths, block_tables, *, interpret: bool | None = None):
    """One new token per row: q (rows, H, D); pages (KV, num_blocks, block_size, D); lengths
    (rows,) = cached tokens including the new one; block_tables (rows, blocks_per_row) int32.
    A row with length 0 returns zeros. Scaled by 1/sqrt(D)."""
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    q = (q.astype(jnp.float32) / math.sqrt(q.shape[-1])).astype(q.dtype)
    mesh = _mesh_or_none()
    if mesh is None:
        return _paged_local(q, k_pages, v_pages, lengths, block_tables, interpret)
    q_spec = logical_to_spec(("cache_batch", "q_heads", "head_dim"), q.shape, mesh)
    page_spec = logical_to_spec(("cache_kv_heads", None, None, None), k_pages.shape, mesh)
    if q_spec[1] != page_spec[0]:  # heads split unevenly: keep heads whole, split rows only
        q_spec, page_spec = PartitionSpec(q_spec[0], None, None), PartitionSpec()
    row_spec = PartitionSpec(q_spec[0])
    fn = jax.shard_map(functools.partial(_paged_local, interpret=interpret), mesh=mesh,
                       in_specs=(q_spec, page_spec, page_spec, row_spec, PartitionSpec(q_spec[0], None)),
                       out_specs=q_spec, check_vma=False)
    return fn(q, k_pages, v_pages, lengths, block_tables)


def paged_decode_attention_xla(q, k_pages, v_pages, lengths, block_tables):
    """The same contract by gather + masked softmax (any backend; the tests' reference)."""
    rows, h, d = q.shape
    kv, _, block_size, _ = k_pages.shape
    k = k_pages[:, block_tables].reshape(kv, rows, -1, d).astype(jnp.float32)
    v = v_pages[:, block_tables].reshape(kv, rows, -1, d).astype(jnp.float32)
    qg = q.reshape(rows, kv, h // kv, d).astype(jnp.float32) / math.sqrt(d)
    s = jnp.einsum("rkgd,krsd->rkgs", qg, k)
    valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]
    p = jax.nn.softmax(jnp.where(valid[:, None, None], s, -1e30), axis=-1)
    p = jnp.where((lengths > 0)[:, None, None, None], p, 0.0)
    out = jnp.einsum("rkgs,krsd->rkgd", p, v).reshape(rows, h, d)
    return out.astype(q.dtype)
