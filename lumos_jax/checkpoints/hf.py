"""Hugging Face Llama directories <-> our NNX model.

Names are HF's: row 3 of our stacked leaf `model.layers.mlp.up_proj.kernel` (layers, in,
out) is HF's `model.layers.3.mlp.up_proj.weight`, transposed. Import reads each tensor
from a memory map and builds every device's shard with `jax.make_array_from_callback`
(for a stacked leaf, that device's slice of every layer), so a checkpoint never needs
twice its size in host memory. Export writes a temporary
directory and renames it into place: a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lumos_jax.checkpoints.safetensors_io import DTYPES, SafetensorsFile, write_safetensors
from lumos_jax.models.config import LlamaConfig
from lumos_jax.models.llama import LlamaForCausalLM, abstract_model
from lumos_jax.sharding import state_shardings

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


def is_stacked(path: tuple) -> bool:
    """Leaves under model.layers hold every layer, stacked on a leading axis."""
    return tuple(map(str, path[:2])) == ("model", "layers")


def hf_name(path: tuple, layer: int | None = None) -> str:
    """('model', 'layers', 'mlp', 'up_proj', 'kernel'), layer 3 -> 'model.layers.3.mlp.up_proj.weight'."""
    parts = [str(p) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    if layer is not None:
        parts.insert(2, str(layer))
    return ".".join(parts)


def hf_names(path: tuple, num_layers: int) -> list[str]:
    """The HF tensor names one of our leaves holds: one per layer for a stacked leaf."""
    return [hf_name(path, i) for i in range(num_layers)] if is_stacked(path) else [hf_name(path)]


class HFCheckpoint:
    """Tensor name -> file for a single or index-sharded safetensors directory."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: not a directory")
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        self.files: dict[str, SafetensorsFile] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise ValueError(f"{index}: not a valid safetensors index (no weight_map)") from None
            self.location = {}
            for name, fname in weight_map.items():
                if fname not in self.files:
                    self.files[fname] = SafetensorsFile(self.dir / fname)
                self.location[name] = self.files[fname]
        elif single.exists():
            f = SafetensorsFile(single)
            self.files[single.name] = f
            self.location = {name: f for name in f.names}
        else:
            if any(self.dir.glob("*.bin")):
                raise FileNotFoundError(f"{self.dir}: only PyTorch .bin weights found; convert them "
                                        "to safetensors first (transformers save_pretrained)")
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        for name, f in self.location.items():
            if name not in f.names:
                raise ValueError(f"{f.path}: index lists tensor {name} but the file lacks it")

    def get(self, name: str) -> np.ndarray:
        if name not in self.location:
            raise KeyError(name)
        return self.location[name].array(name)

    def dtype(self) -> str:
        counts: dict[np.dtype, int] = {}
        for name, f in self.location.items():
            counts[f.dtype(name)] = counts.get(f.dtype(name), 0) + 1
        inv = {np.dtype(v): k for k, v in DTYPES.items()}
        return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(
            inv[max(counts, key=counts.get)], "float32")


def load_hf_model(directory: str | Path, mesh: Mesh | None = None, rules=None,
                  **config_overrides) -> LlamaForCausalLM:
    """Import an HF Llama directory as a model whose params sit on `mesh`'s shardings."""
    directory = Path(directory)
    config = LlamaConfig.from_hf_dir(directory, **config_overrides)
    return load_tensors(HFCheckpoint(directory), config, mesh, rules, directory)


def load_tensors(ckpt, config: LlamaConfig, mesh: Mesh | None = None, rules=None,
                 directory: str | Path = "") -> LlamaForCausalLM:
    """A model from any HF-named tensor source: `ckpt.get(name) -> np.ndarray` and
    `ckpt.location[name].path` (an HF directory, or a dequantizing GGUF reader)."""
    graphdef, abstract_state = nnx.split(abstract_model(config))
    if mesh is None:
        mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    shardings = state_shardings(abstract_state, mesh, rules)
    flat = nnx.to_flat_state(abstract_state)
    flat_shardings = dict(nnx.to_flat_state(shardings))
    expected = set()
    for path, var in flat:
        sharding = flat_shardings[path]
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        names = hf_names(path, config.num_hidden_layers)
        expected.update(names)
        value = var.get_value()
        # A stacked leaf (L, ...) is L HF tensors, each of the shape of one row.
        row_shape = tuple(value.shape[1:]) if is_stacked(path) else tuple(value.shape)
        tensors = [_oriented(ckpt, name, path, row_shape, config, directory) for name in names]
        var.set_value(_place(tensors, value, sharding, is_stacked(path)))
    unused = sorted(set(ckpt.location) - expected - {"lm_head.weight"} if config.tie_word_embeddings
                    else set(ckpt.location) - expected)
    unused = [n for n in unused if not n.endswith("rotary_emb.inv_freq")]
    if unused:
        raise ValueError(f"{directory}: tensors not used by LlamaConfig: {', '.join(unused[:5])}"
                         f"{' ...' if len(unused) > 5 else ''} (config/weights mismatch?)")
    state = nnx.from_flat_state(flat)
    return nnx.merge(graphdef, state)


_VOCAB_DIM = {"model.embed_tokens.weight": 0, "lm_head.weight": 1}


def _oriented(ckpt, name: str, path: tuple, shape: tuple, config: LlamaConfig, directory):
    """HF tensor `name` as a lazy view in our layout (kernels transposed to (in, out)),
    checked against `shape`; the vocabulary may be shorter (padded rows are zero-filled)."""
    try:
        tensor = ckpt.get(name)
    except KeyError:
        raise ValueError(f"{directory}: tensor {name} is missing from the checkpoint") from None
    kernel = path[-1] == "kernel"
    if kernel:
        tensor = tensor.T  # a view: HF (out, in) -> ours (in, out)
    src = tuple(tensor.shape)
    vocab_dim = _VOCAB_DIM.get(name)
    if vocab_dim is not None and src[vocab_dim] == config.vocab_size and shape[vocab_dim] > src[vocab_dim]:
        return tensor  # padded vocab rows are zero-filled by _read
    if src != shape:
        raise ValueError(f"{ckpt.location[name].path}: tensor {name} has shape "
                         f"{list(src[::-1] if kernel else src)}, config expects "
                         f"{list(shape[::-1] if kernel else shape)}")
    return tensor


def _read(tensor, index: tuple, shape: tuple, dtype) -> np.ndarray:
    """tensor[index] as `dtype`, where `shape` (the full target) may exceed the tensor's
    extent on the vocabulary axis: rows past it read as zeros."""
    if tuple(tensor.shape) == shape:
        return np.asarray(tensor[index], dtype=dtype)
    out = np.zeros(tuple(len(range(*s.indices(n))) for s, n in zip(index, shape)), dtype)
    take, put = [], []
    for s, have, n in zip(index, tensor.shape, shape):
        lo, hi, _ = s.indices(n)
        top = min(hi, have)
        take.append(slice(lo, max(top, lo)))
        put.append(slice(0, max(top - lo, 0)))
    if all(t.stop > t.start for t in take):
        out[tuple(put)] = tensor[tuple(take)]
    return out


def _place(tensors: list, target, sharding: NamedSharding, stacked: bool) -> jax.Array:
    """HF tensors -> one sharded jax.Array in our layout, each device reading only its
    shard (of every layer, for a stacked leaf)."""
    shape, dtype = tuple(target.shape), target.dtype

    def shard(index):
        if not stacked:
            return _read(tensors[0], index, shape, dtype)
        rows = range(*index[0].indices(shape[0]))
        return np.stack([_read(tensors[i], index[1:], shape[1:], dtype) for i in rows])

    return jax.make_array_from_callback(shape, sharding, shard)


def save_hf_model(model: LlamaForCausalLM, directory: str | Path, dtype: str | None = None,
                  tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` as an HF directory (config.json + safetensors, sharded when large)."""
    directory = Path(directory)
    config = model.config
    dtype = dtype or config.param_dtype
    np_dtype = {"float32": np.float32, "bfloat16": DTYPES["BF16"], "float16": np.float16}[dtype]
    tmp = directory.with_name(directory.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in hf_tensors(model):
        arr = arr.astype(np_dtype)
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        write_safetensors(tmp / "model.safetensors", shards[0])
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(tmp / fname, shard)
            for name, arr in shard.items():
                weight_map[name] = fname
                total += arr.nbytes
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(dtype), indent=2))
    if tokenizer_dir:
        for fname in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / fname).exists():
                shutil.copy(Path(tokenizer_dir) / fname, tmp / fname)
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    return directory


def hf_tensors(model: LlamaForCausalLM):
    """(HF name, array in HF's layout) for every weight, in HF's order (embeddings, layer
    by layer, final norm, lm_head): stacked leaves are split into their rows."""
    config = model.config
    entries = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = np.asarray(jax.device_get(var.get_value()))
        rows = list(arr) if is_stacked(path) else [arr]
        for layer, (name, row) in enumerate(zip(hf_names(path, config.num_hidden_layers), rows)):
            if path[-1] == "kernel":
                row = row.T
            if name in _VOCAB_DIM:
                row = row[: config.vocab_size]
            order = layer if is_stacked(path) else (-1 if name in _VOCAB_DIM and "embed" in name
                                                    else config.num_hidden_layers)
            entries.append((order, name, row))
    entries.sort(key=lambda e: (e[0], e[1]))
    return [(name, row) for _, name, row in entries]
