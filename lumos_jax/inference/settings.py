"""gin-configurable inference settings and the one loader of `agent`, `eval`, `generate`
and `serve`: weights in inference dtypes on the inference mesh, KV pools sized from one
memory budget."""

from __future__ import annotations

from typing import Sequence

import gin
import jax

from lumos_jax.checkpoints.native import load_model
from lumos_jax.inference.engine import Engine
from lumos_jax.inference.paged import free_device_bytes, step_reserve_bytes
from lumos_jax.inference.params import decode_params, layer_layout, layer_weight_bytes, resolve_scan_layers
from lumos_jax.inference.program_cache import default_cache_dir
from lumos_jax.inference.quant import (check_int8_matmul, check_quant_dtype, convert_weights, is_int8_checkpoint,
                                      load_int8)
from lumos_jax.inference.sampling import SamplingParams
from lumos_jax.sharding import make_mesh


@gin.configurable
def engine_settings(num_slots: int = 8, max_len: int = 2048, steps_per_call: int = 16,
                    max_prefill_tokens: int = 16384, block_size: int = 16,
                    kv_memory_gb: float | None = None, kv_memory_fraction: float | None = 0.8,
                    decode_attention: str = "auto", weight_dtype: str = "bf16",
                    kv_dtype: str = "bf16", scan_layers="auto", precompile_threads: int = 0,
                    program_cache_dir: str | None = "default", int8_matmul: str = "xla") -> dict:
    """Engine size: slots (concurrent sequences; a slot costs only a block-table row),
    the longest sequence, decode steps per device call, the most tokens one prefill call
    may process, and the KV pool: `block_size` tokens per block, `kv_memory_gb` GiB per
    device for all engines together, else `kv_memory_fraction` of the free device memory
    after the weights (backends that report no memory, e.g. CPU: num_slots x max_len).
    `decode_attention`: 'auto' (the Pallas paged kernel on TPU, JAX's Pallas GPU paged kernel
    on GPU, 'dot' elsewhere), 'dot', 'reduce', 'pallas', 'pallas_gpu' or 'pallas_gpu_mha'
    (ours, for few query heads per KV head: 1.5x faster than JAX's at batch 64 on an H200,
    2026-12-02; not yet `auto`'s choice, its GPU correctness check is still to run).
    `weight_dtype='int8'`: every matmul weight int8 with per-channel scales, converted at
    load time (an int8 checkpoint loads as it is), multiplied by `int8_matmul`: 'xla' (the
    int8 operand converted inside XLA's dot) or 'pallas_gpu' (our Pallas kernel for decode's
    few rows, lumos_jax.inference.int8_matmul_gpu; one GPU; not yet measured); `kv_dtype='int8'`: int8 K/V pages with
    a scale per token and head ('bf16': the float dtypes of `inference_dtypes`).
    `scan_layers`: 'auto' (unrolled on GPU for layers of 32 MiB or more, else scanned), True or False; see
    `lumos_jax.inference.params.resolve_scan_layers`. `precompile_threads` > 0: the first
    device call starts compiling every program the engine can call in that many background
    threads (`lumos_jax.inference.precompile`); 0 compiles each on first use.
    `program_cache_dir`: where compiled programs are kept between runs, so a warm run neither
    traces nor compiles (`lumos_jax.inference.program_cache`); 'default' is
    `$LUMOS_PROGRAM_CACHE`, else ~/.cache/lumos_jax/programs; None or '' turns it off."""
    return dict(num_slots=num_slots, max_len=max_len, steps_per_call=steps_per_call,
                max_prefill_tokens=max_prefill_tokens, block_size=block_size,
                kv_memory_gb=kv_memory_gb, kv_memory_fraction=kv_memory_fraction,
                decode_attention=decode_attention,
                weight_dtype=check_quant_dtype(weight_dtype, "weight_dtype"),
                kv_dtype=check_quant_dtype(kv_dtype, "kv_dtype"),
                scan_layers=scan_layers, precompile_threads=int(precompile_threads),
                program_cache_dir=default_cache_dir() if program_cache_dir == "default" else program_cache_dir or None,
                int8_matmul=check_int8_matmul(int8_matmul))


@gin.configurable
def inference_dtypes(weights: str = "bfloat16", compute: str = "bfloat16",
                     cache: str | None = None) -> dict:
    """dtypes for inference (whatever the checkpoint stores): weights, activations and the
    KV cache (None: the compute dtype)."""
    return dict(param_dtype=weights, dtype=compute, cache_dtype=cache or compute)


def _mesh_bound() -> bool:
    for name in ("data", "fsdp", "tensor", "devices"):
        try:
            gin.query_parameter(f"make_mesh.{name}")
            return True
        except ValueError:
            continue
    return False


def inference_mesh():
    """The gin mesh when a `mesh/*.gin` (or any `make_mesh.*`) is bound; otherwise tensor
    parallelism over each host's devices (decode is bound by reading weights: split them
    over fast links), hosts as `data` replicas."""
    if _mesh_bound():
        return make_mesh()
    local = jax.local_device_count()
    return make_mesh(data=len(jax.devices()) // local, fsdp=1, tensor=local)


def load_engines(paths: Sequence[str], tokenizer=None, mesh=None, **overrides) -> dict[str, Engine]:
    """One engine per distinct path (HF directory or lumos-jax checkpoint), all weights
    placed first, then the KV budget (`engine_settings`, `overrides` win) split evenly
    between the engines' pools. Weights are read straight into their shards in
    `inference_dtypes`; the model copy is dropped once regrouped for decoding."""
    mesh = mesh if mesh is not None else inference_mesh()
    settings = {**engine_settings(), **overrides}
    dtypes = inference_dtypes()
    cache_dtype = dtypes.pop("cache_dtype")
    weight_dtype = check_quant_dtype(settings.pop("weight_dtype", "bf16"), "weight_dtype")
    if check_quant_dtype(settings.pop("kv_dtype", "bf16"), "kv_dtype") == "int8":
        cache_dtype = "int8"
    scan = settings.get("scan_layers", "auto")
    built = {}
    for path in dict.fromkeys(str(p) for p in paths):
        if is_int8_checkpoint(path):
            built[path] = load_int8(path, mesh, dtype=dtypes["dtype"])
            continue
        model = load_model(path, mesh, **dtypes)
        params, spec = decode_params(model, mesh)
        params = convert_weights(params, weight_dtype, mesh=mesh)
        # unrolled layers are split here, leaf by leaf, while nothing else holds the stacked tree
        scanned = resolve_scan_layers(scan, layer_weight_bytes(params))
        built[path] = (model.config, layer_layout(params, scanned), spec)
        del model, params
    share = max(1, len(built))
    if settings.get("kv_memory_gb") is not None:
        settings["kv_memory_gb"] = settings["kv_memory_gb"] / share
    elif settings.get("kv_memory_fraction") is not None:
        free = free_device_bytes(list(mesh.devices.flat))
        if free is not None:  # the pools never take the room of the largest call's temporaries
            reserve = max(step_reserve_bytes(config, spec, num_slots=settings["num_slots"],
                                             max_len=settings["max_len"],
                                             max_prefill_tokens=settings["max_prefill_tokens"])
                          for config, _, spec in built.values())
            budget = min(settings["kv_memory_fraction"] * free, free - reserve)
            settings["kv_memory_gb"] = budget / share / 2**30
    settings.pop("kv_memory_fraction", None)
    return {path: Engine.from_params(config, params, spec, mesh=mesh, tokenizer=tokenizer,
                                     cache_dtype=cache_dtype, **settings)
            for path, (config, params, spec) in built.items()}


@gin.configurable
def sampling_settings(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                      seed: int = 0) -> dict:
    """Default sampling (greedy). The reference agent stops at the first newline:
    bind `sampling_settings.stop_strings = ["\\n"]`."""
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=tuple(stop_ids),
                stop_strings=tuple(stop_strings), seed=seed)


def make_sampling(max_new_tokens: int, extra_stop_ids: Sequence[int] = (), **overrides) -> SamplingParams:
    s = sampling_settings()
    s.update({k: v for k, v in overrides.items() if v is not None})
    s["stop_ids"] = tuple(s["stop_ids"]) + tuple(i for i in extra_stop_ids if i not in s["stop_ids"])
    return SamplingParams(max_new_tokens=max_new_tokens, **s)
