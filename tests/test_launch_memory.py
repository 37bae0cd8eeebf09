"""The memory estimate's parameter accounting: sizes against Hugging Face's Llama, and
per-device shards against the shardings JAX actually builds."""

import math
import re

import jax
import pytest

from launch.memory import GIB, estimate, sharded_param_elements
from launch.topology import Mesh
from lumos_jax.models import PRESETS, abstract_model
from lumos_jax.sharding import make_mesh, state_shardings


@pytest.mark.parametrize("preset", ["llama2_7b", "llama2_13b"])
def test_parameter_count_matches_hf(preset):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = PRESETS[preset]
    hf_config = LlamaConfig(**{k: v for k, v in ours.to_hf_dict().items()
                               if k not in ("architectures", "torch_dtype", "dtype")})
    with torch.device("meta"):
        hf_count = sum(p.numel() for p in LlamaForCausalLM(hf_config).parameters())
    per_device, _ = sharded_param_elements(ours, Mesh(1, 1, 1))
    assert per_device == hf_count
    assert estimate(ours, Mesh(1, 1, 1)).params == 4 * hf_count  # fp32


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 1, 4)])
def test_shard_sizes_match_jax(shape):
    from flax import nnx

    config = PRESETS["tiny"]
    mesh = make_mesh(*shape)
    state = nnx.state(abstract_model(config), nnx.Param)
    shardings = state_shardings(state, mesh)
    values = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    actual = sum(math.prod(s.shard_shape(v.get_value().shape)) for v, s in zip(values, specs))
    assert sharded_param_elements(config, Mesh(*shape))[0] == actual


def test_fsdp_divides_state_and_accumulation_adds_a_buffer():
    cfg = PRESETS["llama2_7b"]
    small, big = estimate(cfg, Mesh(1, 8, 1)), estimate(cfg, Mesh(1, 128, 1))
    assert small.accumulation_steps == 16 and big.accumulation_steps == 1
    assert small.gradients == 2 * small.params  # gradient + accumulator
    assert big.gradients == big.params
    assert small.params / big.params == pytest.approx(16, rel=0.01)
    # 7B on 8 devices: ~108 GB of fp32 state / 8 (+ an accumulator) plus activations
    assert 15 < small.total / GIB < 22


def test_measure_puts_xla_figures_beside_the_estimate(capsys, monkeypatch):
    """--measure compiles the real train step on the 8 CPU devices: XLA's argument bytes are
    the sharded fp32 state (params, AdamW m and v) plus the batch, as the estimate counts them."""
    import launch.memory as memory

    seq = 32
    result = memory.measure(PRESETS["tiny"], (1, 4, 2), seq_len=seq)
    assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    xla, analytic = result["xla"], result["analytic"]
    batch_bytes = 5 * 1 * seq * 4  # five int32 (rows, seq) arrays, one row per batch shard
    assert xla["arguments (state + batch)"] - batch_bytes == pytest.approx(analytic["params + optimizer"], rel=0.01)
    assert xla["aliased (donated state)"] > 0.9 * analytic["params + optimizer"]  # the state is donated
    assert 0.25 < xla["total"] / analytic["total"] < 4
    calls = []
    monkeypatch.setattr(memory, "measure", lambda *a: calls.append(a) or result)  # one compile is enough
    assert memory.main(["--model", "tiny", "--measure", "--seq_len", str(seq), "--mesh", "1,4,2"]) == 0
    assert calls == [(PRESETS["tiny"], (1, 4, 2), seq, 1, "xla")]
    out = capsys.readouterr().out
    assert out.startswith("mesh {'data': 1, 'fsdp': 4, 'tensor': 2} (cpu), MiB per device")
    assert re.search(r"^ +xla +total: +[0-9.]+$", out, re.M) and re.search(r"^ analytic +total: +[0-9.]+$", out, re.M)
