"""int8 weights and an int8 KV cache for decoding: half the bytes a decode step reads.

A decode step is bound by memory bandwidth (every weight and every cached K/V is read once
per token), so storing them as int8 with float scales moves about half the bytes of bf16.

Weights: symmetric, per output channel (one scale per output element of the matmul, over
all of the contracted axes), or per group of `group_size` rows along a single contracted
axis. `qeinsum` dequantizes inside the matmul: the int8 operand is converted to the
activation dtype in the dot's operand (XLA fuses the convert, so no dequantized copy of the
weight is ever written) and the scale multiplies the fp32 *output*, which is exact:
    sum_e x_e (q_e s) = s * sum_e x_e q_e   (s constant over the contracted axes).

KV cache: one scale per token per kv head, the layout of the GPU Pallas kernel's
`k_scales_pages` (kv_heads, num_blocks, block_size) beside int8 pages
(kv_heads, num_blocks, block_size, head_dim): k = k_int8 * scale (a `QPages` per pool
array: the stacked pool's, or each layer's).
"""

from __future__ import annotations

import functools
import json
import string
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from lumos_jax.checkpoints.native import copy_tokenizer
from lumos_jax.inference.int8_matmul_gpu import MAX_ROWS, int8_matmul
from lumos_jax.inference.params import forward_spec, param_shardings
from lumos_jax.models.config import LlamaConfig

QMAX = 127.0
WEIGHT_DTYPES = ("bf16", "int8")


class Int8Array(NamedTuple):
    """int8 codes `q` and the fp32 `scale` they are multiplied by: the one pair behind int8
    weights (`QTensor`) and int8 KV pages (`QPages`). A pytree (a NamedTuple), so it jits,
    scans and shards; the two subclasses stay distinct types, since a weight and a page pool
    take different code paths."""
    q: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def _symmetric_int8(x, axis) -> tuple[jax.Array, jax.Array]:
    """(int8 codes, fp32 scale keeping `axis` as size 1): x ~ q * scale, |q| <= 127, one scale
    per slice over `axis` (the largest |x| maps to 127; an all-zero slice gets a tiny scale)."""
    amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    scale = jnp.maximum(amax, jnp.finfo(jnp.float32).tiny) / QMAX
    return jnp.clip(jnp.round(x / scale), -QMAX, QMAX).astype(jnp.int8), scale


def _dequantize(q, scale, dtype) -> jax.Array:
    """codes x scale (broadcast against q), in `dtype`."""
    return (q.astype(jnp.float32) * scale).astype(dtype)


class QTensor(Int8Array):
    """An int8 weight and its fp32 scales. `scale` has the weight's rank: contracted axes
    have size 1 (per channel) or `size // group_size` (per group); it shards like the weight
    (same logical axes: size-1 axes are replicated)."""
    __slots__ = ()


def quantize_weight(w, in_axes: Sequence[int], group_size: int | None = None) -> QTensor:
    """Symmetric int8 over `in_axes` (the axes the matmul contracts). With `group_size`,
    `in_axes` must be one axis divisible by it; each group of rows gets its own scale."""
    w = jnp.asarray(w, jnp.float32)
    axes = tuple(a % w.ndim for a in in_axes)
    if group_size is None:
        return QTensor(*_symmetric_int8(w, axes))
    if len(axes) != 1 or w.shape[axes[0]] % group_size:
        raise ValueError(f"quantize_weight: group_size={group_size} needs one contracted axis "
                         f"divisible by it; got axes {axes} of shape {w.shape}")
    a = axes[0]
    groups = w.shape[a] // group_size
    q, scale = _symmetric_int8(w.reshape(w.shape[:a] + (groups, group_size) + w.shape[a + 1:]), a + 1)
    return QTensor(q.reshape(w.shape), jnp.squeeze(scale, a + 1))


def dequantize_weight(w: QTensor, dtype=jnp.float32) -> jax.Array:
    """The weight int8 stands for (tests and conversions; the forward never builds it)."""
    return _dequantize(w.q, _expand_scale(w.scale, w.q.shape), dtype)


def _expand_scale(scale, shape):
    for axis, (n, s) in enumerate(zip(shape, scale.shape)):
        if s not in (1, n):
            scale = jnp.repeat(scale, n // s, axis=axis)
    return scale


def _parse(subscripts: str, x_ndim: int):
    """'xs,ws->out' with a leading '...' of x and out spelled out as letters."""
    ins, out = subscripts.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    if "." in ws or "." in xs.replace("...", "") or (("..." in xs) != ("..." in out)):
        raise ValueError(f"qeinsum: {subscripts!r}: '...' only leading, in x and the output")
    if "..." in xs:
        free = [c for c in string.ascii_letters if c not in subscripts]
        lead = "".join(free[: x_ndim - (len(xs) - 3)])
        xs, out = xs.replace("...", lead), out.replace("...", lead)
    return xs, ws, out


def _broadcast_to_output(scale, ws: str, out: str, drop: str):
    """scale (ws's axes, `drop` axes of size 1) -> an array that broadcasts against `out`."""
    keep = [c for c in ws if c not in drop]
    s = jnp.squeeze(scale, tuple(i for i, c in enumerate(ws) if c in drop))
    s = jnp.transpose(s, sorted(range(len(keep)), key=lambda i: out.index(keep[i])))
    shape = [s.shape[sorted(keep, key=out.index).index(c)] if c in keep else 1 for c in out]
    return s.reshape(shape)


def qeinsum(subscripts: str, x, w, preferred_element_type=None, matmul: str = "xla"):
    """`jnp.einsum(subscripts, x, w)` for a plain or a `QTensor` weight (second operand).
    For int8 the weight converts to x's dtype inside the dot, the dot accumulates in fp32
    and the scale multiplies its output; the result is `preferred_element_type` or x's
    dtype. `matmul='pallas_gpu'` (engine_settings.int8_matmul): an einsum that is a plain
    2-D matmul after reshapes, of at most int8_matmul_gpu.MAX_ROWS rows, goes to the Pallas
    GPU kernel (int8_matmul_gpu); anything else stays on XLA's dot."""
    if not isinstance(w, QTensor):
        return jnp.einsum(subscripts, x, w, preferred_element_type=preferred_element_type)
    out_dtype = preferred_element_type or x.dtype
    xs, ws, out = _parse(subscripts, x.ndim)
    if matmul == "pallas_gpu":
        y = _pallas_matmul(xs, ws, out, x, w, out_dtype)
        if y is not None:
            return y
    elif matmul != "xla":
        raise ValueError(f"int8_matmul={matmul!r}; expected one of {INT8_MATMULS}")
    subscripts = f"{xs},{ws}->{out}"
    contracted = "".join(c for c in ws if c not in out)
    grouped = [c for c in contracted if w.scale.shape[ws.index(c)] != 1]
    if not grouped:
        y = jnp.einsum(subscripts, x, w.q.astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * _broadcast_to_output(w.scale, ws, out, contracted)).astype(out_dtype)
    # per group: split the grouped axis into (groups, group_size), keep groups in the dot's
    # output, scale each group's partial sums, then add the groups up.
    (c,) = grouped
    g = next(ch for ch in string.ascii_letters if ch not in subscripts)
    ia, wa = xs.index(c), ws.index(c)
    groups = w.scale.shape[wa]
    xg = x.reshape(x.shape[:ia] + (groups, x.shape[ia] // groups) + x.shape[ia + 1:])
    wq = w.q.reshape(w.q.shape[:wa] + (groups, w.q.shape[wa] // groups) + w.q.shape[wa + 1:])
    xs_g, ws_g = xs.replace(c, g + c), ws.replace(c, g + c)
    y = jnp.einsum(f"{xs_g},{ws_g}->{g}{out}", xg, wq.astype(x.dtype),
                   preferred_element_type=jnp.float32)
    ws_s = ws.replace(c, g)
    drop = "".join(ch for ch in contracted if ch != c)
    s = _broadcast_to_output(w.scale, ws_s, g + out, drop)
    return jnp.sum(y * s, axis=0).astype(out_dtype)


INT8_MATMULS = ("xla", "pallas_gpu")


def check_int8_matmul(value: str, mesh=None) -> str:
    """`engine_settings.int8_matmul`: 'xla' anywhere; 'pallas_gpu' on one GPU (interpret
    mode on CPU: tests), never on TPU or over a mesh of several devices (the kernel is not
    sharded)."""
    if value not in INT8_MATMULS:
        raise ValueError(f"engine_settings.int8_matmul={value!r}; expected one of {INT8_MATMULS}")
    if value == "pallas_gpu" and (jax.default_backend() not in ("gpu", "cpu")
                                  or (mesh is not None and mesh.size > 1)):
        raise ValueError(f"engine_settings.int8_matmul='pallas_gpu' runs on one GPU; got backend "
                         f"{jax.default_backend()!r}, {1 if mesh is None else mesh.size} devices (use 'xla')")
    return value


def _pallas_matmul(xs, ws, out, x, w: QTensor, out_dtype):
    """x @ w by int8_matmul_gpu when the einsum is x (lead..., C...) x w (C..., free...) ->
    (lead..., free...) with per-channel scales, or per-group scales over a single contracted
    axis, and at most MAX_ROWS rows; else None."""
    c = "".join(ch for ch in ws if ch not in out)
    lead, free = xs[: len(xs) - len(c)], ws[len(c):]
    if not c or not xs.endswith(c) or not ws.startswith(c) or out != lead + free:
        return None
    lead_shape, free_shape = x.shape[: len(lead)], w.q.shape[len(c):]
    rows, k, n = int(np.prod(lead_shape)), int(np.prod(w.q.shape[: len(c)])), int(np.prod(free_shape))
    groups = w.scale.shape[: len(c)]
    if not 1 <= rows <= MAX_ROWS or (len(c) > 1 and any(g != 1 for g in groups)):
        return None
    y = int8_matmul(x.reshape(rows, k), w.q.reshape(k, n), w.scale.reshape(int(np.prod(groups)), n),
                    out_dtype=out_dtype)
    return y.reshape(*lead_shape, *free_shape)


# -- the KV cache --------------------------------------------------------------------------
def quantize_kv(x) -> tuple[jax.Array, jax.Array]:
    """x (..., head_dim) -> (int8 (..., head_dim), fp32 scale (...)): one scale per token
    per head, so a row's stored K/V never depend on other rows or later tokens (the cache
    extension equals a recomputation)."""
    q, scale = _symmetric_int8(jnp.asarray(x, jnp.float32), -1)
    return q, scale[..., 0]


def dequantize_kv(q, scale, dtype) -> jax.Array:
    return _dequantize(q, scale[..., None], dtype)


class QPages(Int8Array):
    """int8 K or V pages (KV, ..., BS, D) and their scales (KV, ..., BS), one per token per
    head. Quacks like the float pages where the forward handles them whole (shape, dtype,
    reshape), so the page pool's code paths stay one."""
    __slots__ = ()

    @property
    def dtype(self):
        return self.q.dtype

    def reshape(self, *shape) -> "QPages":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return QPages(self.q.reshape(shape), self.scale.reshape(shape[:-1]))


KV_SCALE_BYTES = 4  # fp32 scale per token per head beside the int8 page entries


def zero_pages(shape, dtype, sharding=None):
    """A page pool of zeros: float `dtype`, or `QPages` (int8 + fp32 scales) for int8."""
    return _zeros_program(tuple(shape), jnp.dtype(dtype), sharding)()


@functools.lru_cache(maxsize=16)
def _zeros_program(shape, dtype, sharding):
    """One compiled program per pool shape: a per-layer pool makes 2 x layers arrays."""
    if dtype != jnp.int8:
        make = lambda: jnp.zeros(shape, dtype)  # noqa: E731
        out = sharding
    else:
        make = lambda: QPages(jnp.zeros(shape, jnp.int8), jnp.zeros(shape[:-1], jnp.float32))  # noqa: E731
        out = None if sharding is None else QPages(sharding, drop_last_axis(sharding))
    return make if sharding is None else jax.jit(make, out_shardings=out)


def drop_last_axis(sharding):
    """The sharding of a scale array: the pages' sharding without head_dim."""
    if sharding is None:
        return None
    spec = tuple(sharding.spec) + (None,) * (len(sharding.spec) == 0)
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[:-1]))


def constrain_pages(pages, sharding):
    if sharding is None:
        return pages
    if isinstance(pages, QPages):
        return QPages(jax.lax.with_sharding_constraint(pages.q, sharding),
                      jax.lax.with_sharding_constraint(pages.scale, drop_last_axis(sharding)))
    return jax.lax.with_sharding_constraint(pages, sharding)


def set_pages(pages, blocks, offsets, new):
    """pages[:, blocks, offsets] = new (KV, N, T, D); an out-of-range block drops the
    write. int8 pages store new's codes and per-token-per-head scales."""
    if not isinstance(pages, QPages):
        return pages.at[:, blocks, offsets].set(new.astype(pages.dtype), mode="drop")
    q, s = quantize_kv(new)
    return QPages(pages.q.at[:, blocks, offsets].set(q, mode="drop"),
                  pages.scale.at[:, blocks, offsets].set(s, mode="drop"))


def take_pages(pages, table):
    """jnp.take(pages, table, axis=1) (clipped) in the pages' own form (int8 stays QPages)."""
    if isinstance(pages, QPages):
        return QPages(jnp.take(pages.q, table, axis=1, mode="clip"),
                      jnp.take(pages.scale, table, axis=1, mode="clip"))
    return jnp.take(pages, table, axis=1, mode="clip")


def as_float(pages, dtype):
    """Float pages in `dtype` (int8 dequantized: codes x scale)."""
    if isinstance(pages, QPages):
        return dequantize_kv(pages.q, pages.scale, dtype)
    return pages.astype(dtype)


# -- decode params -------------------------------------------------------------------------
# The contracted axes of each matmul weight of the decode params (lumos_jax.inference.params),
# counted from the end so that a leading stacked-layer axis (L, ...) changes nothing.
CONTRACTED = {"wqkv": (-4,), "wo": (-4, -3, -2), "w_gate_up": (-3,), "w_down": (-2,),
              "lm_head": (-2,)}


def quantize_params(params: dict, group_size: int | None = None) -> dict:
    """bf16 decode params -> the same tree with every matmul weight (attention, MLP, logits)
    a `QTensor`; norms, the embedding table (only gathered) and RoPE stay as they are.
    `layers` may be a tuple of per-layer dicts or one dict of stacked (L, ...) arrays."""
    def layer(lyr):
        return {k: quantize_weight(v, CONTRACTED[k], _group(k, group_size)) if k in CONTRACTED else v
                for k, v in lyr.items()}

    layers = params["layers"]
    layers = tuple(layer(lyr) for lyr in layers) if isinstance(layers, (tuple, list)) else layer(layers)
    out = {**params, "layers": layers}
    out["lm_head"] = quantize_weight(params["lm_head"], CONTRACTED["lm_head"], group_size)
    return out


def _group(name: str, group_size: int | None) -> int | None:
    """Groups need one contracted axis; `wo` contracts three (heads, groups, head_dim) and
    stays per channel."""
    return group_size if len(CONTRACTED[name]) == 1 else None


def params_bytes(params) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(params))


def check_quant_dtype(value: str, what: str) -> str:
    """'bf16' (the float dtypes of `inference_dtypes`) or 'int8'; anything else is one error."""
    if value not in WEIGHT_DTYPES:
        raise ValueError(f"{what}={value!r}; expected one of {WEIGHT_DTYPES}")
    return value


def convert_weights(params: dict, weight_dtype: str, group_size: int | None = None,
                    mesh: Mesh | None = None, rules=None) -> dict:
    """The decode params in `weight_dtype` ('bf16': unchanged; 'int8': `quantize_params`,
    on device, jitted so each weight's fp32 temporaries live only inside the program;
    with `mesh`, straight into the decode params' shardings)."""
    if check_quant_dtype(weight_dtype, "weight_dtype") == "bf16":
        return params
    convert = lambda p: quantize_params(p, group_size)  # noqa: E731
    shardings = None
    if mesh is not None:
        shardings = param_shardings(jax.eval_shape(convert, params), mesh, rules)
    return jax.jit(convert, out_shardings=shardings)(params)


# -- int8 checkpoints ----------------------------------------------------------------------
# Our checkpoint format with int8 decode params: `config.json` (HF-style, with
# lumos_jax.weight_dtype = "int8") + `params_int8/` (orbax: the decode-params tree, each
# QTensor stored as {"q": int8, "scale": fp32}). No bf16 copy is read or built to load it.
INT8_DIR = "params_int8"


def is_int8_checkpoint(directory) -> bool:
    d = Path(str(directory))
    return (d / INT8_DIR).is_dir() and (d / "config.json").exists()


def _to_storage(tree):
    if isinstance(tree, QTensor):
        return {"q": tree.q, "scale": tree.scale}
    if isinstance(tree, dict):
        return {k: _to_storage(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return [_to_storage(v) for v in tree]
    return tree


def _from_storage(tree):
    if isinstance(tree, dict) and set(tree) == {"q", "scale"}:
        return QTensor(tree["q"], tree["scale"])
    if isinstance(tree, dict):
        return {k: _from_storage(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return tuple(_from_storage(v) for v in tree)
    return tree


def save_int8(params: dict, config, directory, tokenizer_dir=None) -> Path:
    """Write int8 decode params (`convert_weights(..., 'int8')`) and their config."""
    if not isinstance(params.get("lm_head"), QTensor):
        raise ValueError("save_int8: params are not int8 (convert_weights(params, 'int8') first)")
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / INT8_DIR, _to_storage(params), force=True)
        ckptr.wait_until_finished()
    extra = {"lumos_jax": {"param_dtype": config.param_dtype, "dtype": config.dtype,
                           "vocab_multiple": config.vocab_multiple, "weight_dtype": "int8"}}
    (directory / "config.json").write_text(json.dumps({**config.to_hf_dict(), **extra}, indent=2))
    copy_tokenizer(tokenizer_dir, directory)
    return directory


def load_int8(directory, mesh: Mesh | None = None, rules=None, **config_overrides):
    """(config, params, spec) of an int8 checkpoint, each array read straight into its
    shard on `mesh` (one device when None)."""
    directory = Path(directory).absolute()
    if not is_int8_checkpoint(directory):
        raise FileNotFoundError(f"{directory}: not an int8 lumos-jax checkpoint (needs config.json and {INT8_DIR}/)")
    hf = json.loads((directory / "config.json").read_text())
    extra = {k: v for k, v in hf.pop("lumos_jax", {}).items() if k != "weight_dtype"}
    config = LlamaConfig.from_hf_dict(hf, **{**extra, **config_overrides})
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(directory / INT8_DIR).item_metadata.tree
        abstract = _from_storage(jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta))
        if mesh is None:
            mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
        shardings = param_shardings(abstract, mesh, rules)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
        params = _from_storage(ckptr.restore(directory / INT8_DIR, _to_storage(target)))
    return config, params, forward_spec(config)
