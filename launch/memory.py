"""Expected memory per device for a full fine-tune: the table in docs/launch.md.

Assumptions (stated in docs/launch.md too):
- fp32 params, fp32 gradients, AdamW m and v in fp32; a second fp32 gradient buffer
  when microbatches are accumulated. Each is sharded exactly as the project's
  logical-axis rules shard the parameter (`lumos_jax.sharding`), so replicated
  pieces (norms, a vocabulary that tensor does not divide) count in full.
- bf16 activations with full remat: each layer keeps only its bf16 input; the
  backward pass recomputes one layer at a time (its projections, MLP and, for XLA's
  plain attention, fp32 scores, probabilities and their gradient), and the fp32
  logits plus their gradient exist once.
- FSDP gathers one layer's weights at a time in fp32, two layers in flight.
- one sequence of 1,024 tokens per device per microbatch; microbatches are
  accumulated up to the reference global batch of 128.
- no allocator slack or XLA scratch: keep >= 10% of HBM free.

Why an analytic model beside XLA's own figures: the table plans slices and clusters this
machine does not have (a v4-128 pod, 16 H100 nodes), and XLA can only compile for devices it
sees. Where the devices are at hand, `--measure` compiles the real train step on them
(`jit(step).lower(...).compile().memory_analysis()`) and prints XLA's figures beside the
model's, for the same model, mesh and microbatch.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from launch.topology import GLOBAL_BATCH, GpuCluster, Mesh, TpuSlice, gpu_presets, tpu_presets
from lumos_jax.models import PRESETS, abstract_model
from lumos_jax.sharding import logical_to_spec, make_mesh
from lumos_jax.training import state as state_lib
from lumos_jax.training import step as step_lib

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    params: float        # bytes per device
    optimizer: float
    gradients: float
    activations: float
    gathered_weights: float
    accumulation_steps: int

    @property
    def total(self) -> float:
        return self.params + self.optimizer + self.gradients + self.activations + self.gathered_weights


_SHAPES_CACHE: dict[str, tuple] = {}


def _param_shapes(config) -> tuple:
    """((shape, logical_axes), ...) of every parameter; built once per model (~1 s each)."""
    key = repr(config)  # LlamaConfig may hold a dict (rope_scaling), so it is not hashable
    if key not in _SHAPES_CACHE:
        state = nnx.state(abstract_model(config), nnx.Param)
        leaves = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
        _SHAPES_CACHE[key] = tuple((tuple(v.get_value().shape), v.get_metadata().get("logical_axes"))
                                   for v in leaves)
    return _SHAPES_CACHE[key]


def sharded_param_elements(config, mesh: Mesh) -> tuple[int, int]:
    """(parameter elements per device under the real sharding rules, elements of one layer)."""
    abstract_mesh = AbstractMesh((mesh.data, mesh.fsdp, mesh.tensor), ("data", "fsdp", "tensor"))
    per_device = 0
    for shape, names in _param_shapes(config):
        spec = logical_to_spec(names, shape, abstract_mesh)
        local = list(shape)
        for i, axes in enumerate(spec):
            for axis in (axes if isinstance(axes, tuple) else (axes,) if axes else ()):
                local[i] //= abstract_mesh.shape[axis]
        per_device += math.prod(local)
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    return per_device, layer


def attention_bytes(config, seq_len: int, micro_batch: int = 1, tensor: int = 1,
                    attention: str = "xla") -> float:
    """HBM for one recomputed layer's attention. XLA's plain path holds fp32 scores,
    probabilities and their gradient (3 x heads x T^2); a flash-style kernel (splash on
    TPU, cuDNN on GPU) keeps its blocks on chip and saves only the fp32 log-sum-exp and the
    backward's row sums per query (2 x heads x T)."""
    heads = config.num_attention_heads
    heads_local = heads // tensor if heads % tensor == 0 else heads
    if attention == "xla":
        return 3 * micro_batch * heads_local * seq_len * seq_len * 4
    if attention in ("splash", "cudnn"):
        return 2 * micro_batch * heads_local * seq_len * 4
    raise ValueError(f"attention={attention!r}; expected 'xla', 'splash' or 'cudnn'")


def estimate(config, mesh: Mesh, seq_len: int = 1024, micro_batch: int = 1,
             global_batch: int = GLOBAL_BATCH, attention: str = "xla") -> MemoryEstimate:
    """Bytes per device for one full fine-tuning step of `config` on `mesh`."""
    per_device, layer_params = sharded_param_elements(config, mesh)
    batch_shards = mesh.data * mesh.fsdp
    accumulation = max(1, global_batch // (batch_shards * micro_batch))
    f32, bf16 = 4, 2
    params = per_device * f32
    gradients = per_device * f32 * (2 if accumulation > 1 else 1)
    optimizer = 2 * per_device * f32

    b, t, tp = micro_batch, seq_len, mesh.tensor
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    heads_local = heads // tp if heads % tp == 0 else heads
    inter_local = inter // tp if inter % tp == 0 else inter
    vocab = config.padded_vocab_size
    vocab_local = vocab // tp if vocab % tp == 0 else vocab
    saved_inputs = layers * b * t * h * bf16
    q_local = heads_local * config.head_dim
    kv_local = q_local * config.num_key_value_heads // heads
    # one recomputed layer: activations and their gradients (x2), bf16
    layer_work = 2 * b * t * (2 * h + q_local + 2 * kv_local + q_local + 4 * inter_local) * bf16
    attn = attention_bytes(config, t, b, tp, attention)
    logits = 2 * b * t * vocab_local * f32
    activations = saved_inputs + layer_work + attn + logits
    gathered = 2 * layer_params * f32 / tp
    return MemoryEstimate(params, optimizer, gradients, activations, gathered, accumulation)


def memory_table(models=("llama2_7b", "llama2_13b")) -> str:
    """Markdown: one row per preset, GiB per device for each model (fits = under 90% of HBM)."""
    head = ["preset", "slice / cluster", "devices", "hosts", "mesh (data, fsdp, tensor)", "HBM GiB"]
    head += [f"{m} GiB/device" for m in models]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    targets: list[TpuSlice | GpuCluster] = [*tpu_presets(), *gpu_presets()]
    for target in targets:
        mesh = target.mesh
        if isinstance(target, TpuSlice):
            name, devices, hosts = target.accelerator_type, target.chips, target.hosts
        else:
            name, devices, hosts = f"{target.nodes} x {target.gpus_per_node} H100", target.devices, target.nodes
        cells = [f"`{target.preset}`", name, str(devices), str(hosts),
                 f"({mesh.data}, {mesh.fsdp}, {mesh.tensor})", f"{target.hbm_gib:g}"]
        for model in models:
            est = estimate(PRESETS[model], mesh)
            gib = est.total / GIB
            mark = "" if gib <= 0.9 * target.hbm_gib else " ✗"
            cells.append(f"{gib:.1f}{mark}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def attention_table(models=("llama2_7b", "llama2_13b"), seqs=(1024, 2048),
                    presets=("tpu_v4_32", "tpu_v5e_16")) -> str:
    """Markdown: attention memory of one recomputed layer and GiB per device on two TPU
    presets, XLA's plain attention against Pallas splash, one sequence per device."""
    targets = {t.preset: t for t in tpu_presets()}
    head = ["model", "seq", "attention", "one layer's attention MiB"] + [f"`{p}` GiB/device" for p in presets]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in models:
        for seq in seqs:
            for impl in ("xla", "splash"):
                cells = [model, str(seq), impl, f"{attention_bytes(PRESETS[model], seq, attention=impl) / 2**20:.1f}"]
                for p in presets:
                    t = targets[p]
                    gib = estimate(PRESETS[model], t.mesh, seq_len=seq, attention=impl).total / GIB
                    cells.append(f"{gib:.1f}{'' if gib <= 0.9 * t.hbm_gib else ' ✗'}")
                rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def training_config(config):
    """The model as the estimate assumes it: fp32 params, bf16 activations, full remat."""
    return config.replace(param_dtype="float32", dtype="bfloat16", remat_policy="full")


def measure(config, mesh_shape: tuple[int, int, int] = (1, -1, 1), seq_len: int = 1024,
            micro_batch: int = 1, attention: str = "xla") -> dict[str, dict[str, float]]:
    """Bytes per device for one train step on the local devices: XLA's compiled figures
    (nothing is allocated: the step is lowered on abstract state) beside the analytic ones,
    for one microbatch of `micro_batch` sequences per batch shard (no accumulation)."""
    config = training_config(config).replace(attention_impl=attention)
    mesh = make_mesh(*mesh_shape)
    shape = Mesh(*(mesh.shape[a] for a in ("data", "fsdp", "tensor")))
    with jax.set_mesh(mesh):
        setup = state_lib.build_setup(config, mesh, 1000, state_lib.optimizer_settings())
        rows = step_lib.batch_shards(setup) * micro_batch
        batch = {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=step_lib.batch_sharding(setup))
                 for k in step_lib.BATCH_KEYS}
        stats = step_lib.make_train_step(setup).lower(state_lib.restore_target(setup), batch) \
            .compile().memory_analysis()
    est = estimate(config, shape, seq_len, micro_batch, global_batch=rows, attention=attention)
    xla = {"arguments (state + batch)": stats.argument_size_in_bytes,
           "outputs": stats.output_size_in_bytes, "aliased (donated state)": stats.alias_size_in_bytes,
           "temporaries": stats.temp_size_in_bytes,
           "total": stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
           + stats.temp_size_in_bytes}
    analytic = {"params + optimizer": est.params + est.optimizer,
                "gradients + activations + gathered": est.gradients + est.activations + est.gathered_weights,
                "total": est.total}
    return {"mesh": dict(mesh.shape), "xla": xla, "analytic": analytic}


def measure_table(result: dict) -> str:
    lines = [f"mesh {result['mesh']} ({jax.devices()[0].platform}), MiB per device"]
    for side in ("xla", "analytic"):
        lines += [f"{side:>9} {name:>36}: {value / 2**20:11.2f}" for name, value in result[side].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a lumos_jax.models preset; with --mesh prints the breakdown")
    parser.add_argument("--mesh", help="data,fsdp,tensor, e.g. 1,16,1")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--attention", default="xla", choices=("xla", "splash", "cudnn"))
    parser.add_argument("--attention_table", action="store_true", help="print docs/launch.md's attention table")
    parser.add_argument("--measure", action="store_true",
                        help="compile the train step on the local devices and print XLA's memory figures "
                             "beside the estimate (needs --model; --mesh defaults to all devices as fsdp)")
    parser.add_argument("--micro_batch", type=int, default=1, help="sequences per batch shard (--measure)")
    args = parser.parse_args(argv)
    if args.attention_table:
        print(attention_table())
        return 0
    if not args.model:
        if args.measure:
            parser.error("--measure needs --model")
        print(memory_table())
        return 0
    if args.model not in PRESETS:
        parser.error(f"unknown model {args.model!r}; known: {', '.join(PRESETS)}")
    try:
        sizes = tuple(int(x) for x in (args.mesh or ("1,-1,1" if args.measure else "1,8,1")).split(","))
        mesh = Mesh(*sizes)
    except (TypeError, ValueError):
        parser.error(f"--mesh={args.mesh!r}: expected three integers data,fsdp,tensor")
    if args.measure:
        print(measure_table(measure(PRESETS[args.model], sizes, args.seq_len, args.micro_batch, args.attention)))
        return 0
    est = estimate(PRESETS[args.model], mesh, seq_len=args.seq_len, attention=args.attention)
    for field in ("params", "optimizer", "gradients", "activations", "gathered_weights", "total"):
        print(f"{field:>17}: {getattr(est, field) / GIB:7.2f} GiB")
    print(f"{'accumulation':>17}: {est.accumulation_steps} microbatches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
