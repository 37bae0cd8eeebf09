"""Our checkpoint format: `config.json` (HF-style) + `params/` (orbax, sharded arrays).

Orbax writes to a temporary directory and commits by rename, so an interrupted save
is never mistaken for a checkpoint; restore places each array straight onto its
target sharding.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lumos_jax.checkpoints.gguf import is_gguf, load_gguf_model
from lumos_jax.checkpoints.hf import TOKENIZER_FILES, load_hf_model
from lumos_jax.models.config import LlamaConfig
from lumos_jax.models.llama import LlamaForCausalLM, abstract_model
from lumos_jax.sharding import state_shardings


def is_native_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / "params").is_dir() and (Path(directory) / "config.json").exists()


def save_native(model: LlamaForCausalLM, directory: str | Path,
                tokenizer_dir: str | Path | None = None) -> Path:
    """Writes params/ + config.json, and the tokenizer files of `tokenizer_dir` beside them, so
    generate, serve and agent work from the checkpoint alone."""
    if "://" in str(directory):  # gs://... stays a URI (etils.epath, as orbax expects)

        directory = epath.Path(str(directory))
    else:
        directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model, nnx.Param)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", nnx.to_pure_dict(state), force=True)
        ckptr.wait_until_finished()
    extra = {"lumos_jax": {"param_dtype": model.config.param_dtype, "dtype": model.config.dtype,
                           "vocab_multiple": model.config.vocab_multiple}}
    (directory / "config.json").write_text(json.dumps({**model.config.to_hf_dict(), **extra}, indent=2))
    copy_tokenizer(tokenizer_dir, directory)
    return directory


def copy_tokenizer(src: str | Path | None, directory) -> None:
    """Copies the tokenizer files (tokenizer.model / .json / configs) that `src` holds."""
    if not src or not Path(src).is_dir():
        return
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists() and Path(src).absolute() != Path(str(directory)).absolute():
            (directory / name).write_bytes((Path(src) / name).read_bytes())


def load_native(directory: str | Path, mesh: Mesh | None = None, rules=None,
                **config_overrides) -> LlamaForCausalLM:
    directory = Path(directory).absolute()
    if not is_native_checkpoint(directory):
        raise FileNotFoundError(f"{directory}: not a lumos-jax checkpoint (needs config.json and params/)")
    hf = json.loads((directory / "config.json").read_text())
    extra = hf.pop("lumos_jax", {})
    config = LlamaConfig.from_hf_dict(hf, **{**extra, **config_overrides})
    graphdef, abstract_state = nnx.split(abstract_model(config))
    if mesh is None:
        mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    shardings = state_shardings(abstract_state, mesh, rules)
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings))
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.metadata(directory / "params").item_metadata.tree
        try:
            if _per_layer(saved):
                restored = _restore_per_layer(ckptr, directory / "params", target)
            else:
                restored = ckptr.restore(directory / "params", target)
        except ValueError as e:
            raise ValueError(f"{directory}/params: does not match the config ({str(e).splitlines()[0]})") from None
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)


def _per_layer(saved: dict) -> bool:
    """Checkpoints written before the layers were stacked hold model.layers.0, .1, ..."""
    layers = saved.get("model", {}).get("layers", {})
    return isinstance(layers, dict) and "0" in layers


def _restore_per_layer(ckptr, path, target: dict) -> dict:
    """Converts on load: restores each old per-layer subtree onto its slice of the stacked
    sharding, then stacks the rows onto the target's sharding (an old checkpoint keeps
    loading; saving it again writes the stacked layout)."""
    stacked = target["model"]["layers"]
    count = jax.tree.leaves(stacked)[0].shape[0]

    def row(t):
        spec = tuple(t.sharding.spec)[1:]
        return jax.ShapeDtypeStruct(t.shape[1:], t.dtype,
                                    sharding=NamedSharding(t.sharding.mesh, PartitionSpec(*spec)))

    rows = jax.tree.map(row, stacked)
    old = {**target, "model": {**target["model"], "layers": {str(i): rows for i in range(count)}}}
    restored = ckptr.restore(path, old)
    per_layer = [restored["model"]["layers"][str(i)] for i in range(count)]
    layers = jax.tree.map(lambda t, *r: jax.device_put(jnp.stack(r), t.sharding), stacked, *per_layer)
    return {**restored, "model": {**restored["model"], "layers": layers}}


def load_model(path: str | Path, mesh: Mesh | None = None, rules=None, **overrides) -> LlamaForCausalLM:
    """An HF directory, a lumos-jax checkpoint or a llama.cpp `.gguf` file, whichever `path` holds."""
    if is_native_checkpoint(path):
        return load_native(path, mesh, rules, **overrides)
    if is_gguf(path):
        return load_gguf_model(path, mesh, rules, **overrides)
    return load_hf_model(path, mesh, rules, **overrides)
