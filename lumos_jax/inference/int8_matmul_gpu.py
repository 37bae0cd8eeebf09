"""x @ int8 weight on GPU in Pallas (Triton), streaming the int8 codes at memory bandwidth.

A decode step multiplies a few rows (the batch) by every weight once, so it is bound by
reading the weights. XLA's fusion of convert(int8 -> bf16) + dot does not stream the int8
operand at bandwidth (Llama-2-7B on one H200, 2026-12-02: 5.84 ms/step at batch 1 with int8
weights against 4.29 ms with bf16 ones, whose bytes are twice as many). This kernel is shaped
by the bytes: x (M, K) is tiny and re-read from cache; the codes q (K, N) are read once, a
(block_k, block_n) tile at a time, converted in registers and never written back.

- grid (row blocks, column blocks, K splits): a program owns `block_n` output columns of a
  block of rows and its split's share of K (`k_splits` shares of whole `block_k` tiles); with
  one split it scales and writes the output itself, with more the splits' fp32 partials
  (k_splits, M, N) are added by one small XLA reduction. Splits are what fill the card at
  M = 1: a (4096, 4096) weight has only 32 column blocks of 128 for 132 SMs.
- three ways to multiply a tile (`mode`):
  'dot': x rows padded to a block of >= 16 (masked loads of zeros: Triton's smallest dot) and
  a tensor-core dot per tile; loads feeding a dot are what Triton's pipeliner streams through
  shared memory, `num_stages` deep. The default from 3 rows on.
  'fma': per row, a (block_k, block_n) fp32 accumulator of elementwise products (no reduction
  in the loop), summed over block_k once at the end; the next tile's loads are issued before
  the current one is computed (`prefetch`: Triton pipelines only loads that feed dots). The
  default for 1-2 rows (one accumulator per row: registers grow with M).
  'reduce': the same loads, each tile's products summed over block_k at once (an accumulator
  of block_n per row; a cross-thread reduction every tile).
- scales: per output channel (scale (1, N)) multiply the accumulated sums once per column;
  per group (scale (K // group_size, N), block_k dividing group_size) each tile's partial sum
  is scaled by its group's row before it is added (as `quant.qeinsum` does in XLA).
- ragged shapes: K and N need not be multiples of the blocks, M need not be of the row block;
  out-of-range rows / columns / K are masked loads (zeros) and masked stores, switched on only
  where a dimension is ragged (the Llama-2-7B shapes are not, with the default blocks).

Parameters are the sweep's to choose (bench/int8_matmul_sweep.py); the defaults are unmeasured
guesses. On CPU it runs in interpret mode (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MODES = ("dot", "fma", "reduce")
MAX_ROWS = 256           # qeinsum sends larger M (prefill) to XLA
DOT_ROWS = 16            # Triton's smallest dot: rows are padded (masked) to this
MAX_BLOCK_M = 64         # 'dot': row block for M > 16 (larger M: more row blocks)
FMA_MAX_ROWS = 2         # 'auto' picks 'fma' up to this many rows, else 'dot'
MAX_UNROLLED_ROWS = 16   # 'fma' / 'reduce' unroll the rows in the program
TARGET_PROGRAMS = 512    # default k_splits: about this many programs (132 SMs on an H200)
MAX_SPLITS = 16
MIN_STEPS = 4            # default k_splits: at least this many K tiles per program
DEFAULT_BLOCKS = {"dot": (128, 128), "fma": (256, 32), "reduce": (256, 64)}   # (block_n, block_k)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def resolve_mode(mode: str, rows: int) -> str:
    if mode == "auto":
        return "fma" if rows <= FMA_MAX_ROWS else "dot"
    if mode not in MODES:
        raise ValueError(f"int8_matmul mode={mode!r}; expected 'auto' or one of {MODES}")
    return mode


def default_splits(programs: int, k_blocks: int, rows: int, k: int) -> int:
    """K splits for a grid of `programs` column x row blocks: the grid up to about
    TARGET_PROGRAMS, every split at least MIN_STEPS tiles of K, and the fp32 partials
    (splits x rows x N x 4 bytes, written and read back) at most a quarter of the codes'
    K x N bytes; then as few splits as give the same tiles per split (no empty split)."""
    want = max(1, TARGET_PROGRAMS // max(1, programs))
    splits = max(1, min(MAX_SPLITS, want, k_blocks // MIN_STEPS, k // (32 * rows)))
    return -(-k_blocks // -(-k_blocks // splits))


def _kernel(x_ref, q_ref, s_ref, o_ref, *, mode, rows, block_m, block_n, block_k, steps, k_splits, k_blocks,
            group, k_size, n_size, mask_m, mask_k, mask_n, scale_out, prefetch, precision):
    """One (row block, column block, K split): its (up to `steps`) tiles of K, then the scaled
    or partial sums."""
    m0 = pl.program_id(0) * block_m
    n0 = pl.multiple_of(pl.program_id(1) * block_n, block_n)
    first = pl.program_id(2) * steps                        # the split's first K tile
    ragged = steps * k_splits != k_blocks
    # the last split's share may be shorter (or empty): a dynamic trip count, and tile ids
    # clamped to the last tile (a prefetch past the share re-reads a valid tile, never used)
    count = jnp.clip(k_blocks - first, 0, steps) if ragged else steps
    cols = n0 + jnp.arange(block_n, dtype=jnp.int32)
    col_ok = cols < n_size if mask_n else None
    cdt = jnp.float32 if mode != "dot" else x_ref.dtype      # what the codes convert to

    def k_tile(i):
        tile = jnp.minimum(first + i, k_blocks - 1) if ragged else first + i
        k0 = pl.multiple_of(tile * block_k, block_k)
        ks = k0 + jnp.arange(block_k, dtype=jnp.int32)
        return k0, (ks < k_size if mask_k else None)

    def load_q(i):
        k0, k_ok = k_tile(i)
        mask = _and(None if k_ok is None else k_ok[:, None], None if col_ok is None else col_ok[None, :])
        q = _load(q_ref.at[pl.ds(k0, block_k), pl.ds(n0, block_n)], mask)
        if not group:
            return q, None
        row = jnp.minimum(k0 // group, k_size // group - 1)     # a tile past K (zeros) stays in range
        return q, _load(s_ref.at[row, pl.ds(n0, block_n)], col_ok)

    def load_x_rows(i):
        k0, k_ok = k_tile(i)
        return tuple(_load(x_ref.at[jnp.int32(r), pl.ds(k0, block_k)], k_ok) for r in range(rows))

    if mode == "dot":
        row_ids = m0 + jnp.arange(block_m, dtype=jnp.int32)
        row_ok = row_ids < rows if mask_m else None

        def body(i, acc):
            k0, k_ok = k_tile(i)
            xm = _and(None if row_ok is None else row_ok[:, None], None if k_ok is None else k_ok[None, :])
            xt = _load(x_ref.at[pl.ds(m0, block_m), pl.ds(k0, block_k)], xm)
            q, s = load_q(i)
            d = plgpu.dot(xt.astype(cdt), q.astype(cdt), precision=precision)
            return acc + (d * s[None, :] if group else d)

        acc = jax.lax.fori_loop(0, count, body, jnp.zeros((block_m, block_n), jnp.float32))
        if scale_out:
            acc = acc * _load(s_ref.at[jnp.int32(0), pl.ds(n0, block_n)], col_ok)[None, :]
        mask = _and(None if row_ok is None else row_ok[:, None], None if col_ok is None else col_ok[None, :])
        plgpu.store(o_ref.at[pl.ds(m0, block_m), pl.ds(n0, block_n)], acc.astype(o_ref.dtype), mask=mask)
        return

    def update(tile, accs):
        xs, (q, s) = tile
        w = q.astype(jnp.float32)
        if group:
            w = w * s[None, :]
        if mode == "fma":
            return tuple(a + x.astype(jnp.float32)[:, None] * w for x, a in zip(xs, accs))
        return tuple(a + jnp.sum(x.astype(jnp.float32)[:, None] * w, axis=0) for x, a in zip(xs, accs))

    def fetch(i):
        return load_x_rows(i), load_q(i)

    shape = (block_k, block_n) if mode == "fma" else (block_n,)
    init = tuple(jnp.zeros(shape, jnp.float32) for _ in range(rows))
    if prefetch and steps > 1:
        # tile i + 1 is loaded before tile i is computed; the last step re-reads its own tile
        def body(i, carry):
            tile, accs = carry
            return fetch(jnp.minimum(i + 1, count - 1)), update(tile, accs)

        _, accs = jax.lax.fori_loop(0, count, body, (fetch(0), init))
    else:
        accs = jax.lax.fori_loop(0, count, lambda i, a: update(fetch(i), a), init)
    out_scale = _load(s_ref.at[jnp.int32(0), pl.ds(n0, block_n)], col_ok) if scale_out else None
    for r, acc in enumerate(accs):
        if mode == "fma":
            acc = jnp.sum(acc, axis=0)
        if scale_out:
            acc = acc * out_scale
        plgpu.store(o_ref.at[jnp.int32(r), pl.ds(n0, block_n)], acc.astype(o_ref.dtype), mask=col_ok)


def _and(a, b):
    if a is None or b is None:
        return b if a is None else a
    return a & b


def _load(ref, mask):
    return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0)


def int8_matmul(x, q, scale, *, out_dtype=None, mode: str = "auto", block_n: int | None = None,
                block_k: int | None = None, block_m: int | None = None, k_splits: int | None = None,
                prefetch: bool = True, num_warps: int = 4, num_stages: int = 3,
                interpret: bool | None = None):
    """x (M, K) float @ (q (K, N) int8 x scale) -> (M, N) in `out_dtype` (default x's), fp32
    accumulation. `scale` (1, N) is per output channel, (K // group_size, N) per group.

    `mode`: 'auto' ('fma' for M <= 2, else 'dot'), 'dot', 'fma' or 'reduce' (module doc).
    `block_n`, `block_k`: the tile of codes a step reads (powers of two; defaults per mode,
    DEFAULT_BLOCKS; per group, block_k must divide the group size); `block_m`: 'dot' rows per
    program (a power of two >= 16; default the rows rounded up, at most 64); `k_splits`: K
    shares per column block (default `default_splits`: enough programs to fill the card);
    `prefetch` ('fma' / 'reduce'): load the next tile while computing this one; num_warps /
    num_stages go to Triton. interpret: None is interpret mode off GPU."""
    m, k = x.shape
    if q.ndim != 2 or q.shape[0] != k or q.dtype != jnp.int8:
        raise ValueError(f"int8_matmul: q must be int8 ({k}, N) for x {x.shape}; got {q.dtype} {q.shape}")
    n = q.shape[1]
    if scale.ndim != 2 or scale.shape[1] != n or k % scale.shape[0]:
        raise ValueError(f"int8_matmul: scale must be (1 or K // group_size, {n}); got {scale.shape} for K={k}")
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"int8_matmul: 1..{MAX_ROWS} rows (decode); got {m} (use the XLA path)")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    mode = resolve_mode(mode, m)
    group = k // scale.shape[0] if scale.shape[0] > 1 else 0
    dn, dk = DEFAULT_BLOCKS[mode]
    block_n = block_n or min(dn, _next_pow2(n))
    if block_k is None:   # the default tile never straddles two groups
        block_k = min(dk, _next_pow2(k), (group & -group) if group else dk)
    if not (_pow2(block_n) and _pow2(block_k)):
        raise ValueError(f"int8_matmul: block_n={block_n}, block_k={block_k} must be powers of two (Triton's loads)")
    if group and group % block_k:
        raise ValueError(f"int8_matmul: block_k={block_k} must divide the group size {group} (one scale row per tile)")
    if mode == "dot":
        block_m = block_m or min(MAX_BLOCK_M, max(DOT_ROWS, _next_pow2(m)))
        if not _pow2(block_m) or block_m < DOT_ROWS:
            raise ValueError(f"int8_matmul: block_m={block_m} must be a power of two >= {DOT_ROWS} (Triton's dot)")
    else:
        if m > MAX_UNROLLED_ROWS:
            raise ValueError(f"int8_matmul: mode={mode!r} unrolls its rows: at most {MAX_UNROLLED_ROWS}; got {m}")
        block_m = m
    m_blocks, n_blocks, k_blocks = -(-m // block_m), -(-n // block_n), -(-k // block_k)
    k_splits = k_splits or default_splits(m_blocks * n_blocks, k_blocks, m, k)
    if not 1 <= k_splits <= k_blocks:
        raise ValueError(f"int8_matmul: k_splits={k_splits} must be in 1..{k_blocks} (K tiles of {block_k})")
    steps = -(-k_blocks // k_splits)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    kernel = functools.partial(
        _kernel, mode=mode, rows=m, block_m=block_m, block_n=block_n, block_k=block_k, steps=steps,
        k_splits=k_splits, k_blocks=k_blocks,
        group=group, k_size=k, n_size=n, mask_m=mode == "dot" and m % block_m != 0,
        mask_k=k % block_k != 0, mask_n=n % block_n != 0,
        scale_out=not group, prefetch=prefetch, precision=precision)
    whole = lambda a: pl.BlockSpec(a.shape, lambda i, j, s: (0,) * a.ndim)  # noqa: E731
    if k_splits == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
        out_spec = pl.BlockSpec((m, n), lambda i, j, s: (0, 0))
    else:
        out_shape = jax.ShapeDtypeStruct((k_splits, m, n), jnp.float32)
        out_spec = pl.BlockSpec((None, m, n), lambda i, j, s: (s, 0, 0))
    out = pl.pallas_call(
        kernel, grid=(m_blocks, n_blocks, k_splits), in_specs=[whole(x), whole(q), whole(scale)],
        out_specs=out_spec, out_shape=out_shape, interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=f"int8_matmul_{mode}_n{block_n}_k{block_k}_s{k_splits}",
    )(x, q, scale.astype(jnp.float32))
    return out if k_splits == 1 else jnp.sum(out, axis=0).astype(out_dtype)
