"""HF <-> ours round trips, checked with transformers and raw safetensors bytes."""

import numpy as np
import pytest
from safetensors import safe_open

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from lumos_jax.checkpoints.hf import load_hf_model, save_hf_model  # noqa: E402
from lumos_jax.checkpoints.native import load_native, save_native  # noqa: E402
from lumos_jax.models import PRESETS, create_model  # noqa: E402
from test_model_parity import make_hf  # noqa: E402


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out


def test_our_params_to_hf_dir_load_in_transformers(tmp_path):
    config = PRESETS["tiny"].replace(num_key_value_heads=2, vocab_multiple=128, vocab_size=300)
    ours = create_model(config, seed=3)
    save_hf_model(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = np.random.default_rng(0).integers(0, 300, (2, 11))
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids, jnp.int32)))
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tied", [False, True])
def test_hf_to_ours_to_hf_is_bit_identical(tmp_path, dtype, tied):
    make_hf(tmp_path / "src", dtype=dtype, tie_word_embeddings=tied)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    ours = load_hf_model(tmp_path / "src")
    save_hf_model(ours, tmp_path / "out", dtype=name)
    a, b = _tensors(tmp_path / "src"), _tensors(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def test_native_checkpoint_round_trip(tmp_path):
    make_hf(tmp_path / "src", num_attention_heads=8, num_key_value_heads=2)
    ours = load_hf_model(tmp_path / "src", vocab_multiple=128)
    save_native(ours, tmp_path / "native")
    back = load_native(tmp_path / "native")
    assert back.config == ours.config
    ids = jnp.asarray([[1, 5, 9, 200]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(ours(ids)), np.asarray(back(ids)))
    save_hf_model(back, tmp_path / "hf")
    a, b = _tensors(tmp_path / "src"), _tensors(tmp_path / "hf")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_large_export_is_index_sharded(tmp_path):
    ours = create_model(PRESETS["tiny"])
    save_hf_model(ours, tmp_path / "hf", max_shard_bytes=100_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    back = load_hf_model(tmp_path / "hf")
    ids = jnp.asarray([[1, 2, 3]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(ours(ids)), np.asarray(back(ids)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.num_hidden_layers == 2


def test_per_layer_native_checkpoint_converts_on_load(tmp_path):
    """A native checkpoint of the old layout (model.layers.0, .1, ... each unstacked),
    written here straight from the HF tensors, loads into the stacked model: exporting it
    back gives the HF source bit for bit."""
    import json

    import orbax.checkpoint as ocp

    make_hf(tmp_path / "src", num_attention_heads=8, num_key_value_heads=2)
    hf = _tensors(tmp_path / "src")
    tree: dict = {"model": {"layers": {}}}
    for name, t in hf.items():
        kernel = name.endswith("proj.weight") or name == "lm_head.weight"  # Linear: (in, out)
        arr = t.numpy().T if kernel else t.numpy()
        parts = name.split(".")
        if kernel:
            parts[-1] = "kernel"
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = arr
    assert sorted(tree["model"]["layers"]) == ["0", "1"]
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "old" / "params", tree)
        ckptr.wait_until_finished()
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    back = load_native(tmp_path / "old")
    save_hf_model(back, tmp_path / "hf")
    out = _tensors(tmp_path / "hf")
    assert sorted(out) == sorted(hf)
    for k in hf:
        assert torch.equal(hf[k], out[k]), k
