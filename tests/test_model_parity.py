"""Logit parity with transformers.LlamaForCausalLM (torch CPU, fp32, random weights).

The HF model is saved with `save_pretrained` and imported through our HF loader, so
these tests also cover the importer."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from lumos_jax.checkpoints.hf import load_hf_model  # noqa: E402

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)

CASES = {
    "mha": {},
    "gqa_8q_2kv": dict(num_attention_heads=8, num_key_value_heads=2),
    "tied_embeddings": dict(tie_word_embeddings=True),
    "llama3_rope_scaling": dict(rope_theta=500000.0, max_position_embeddings=512,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64}),
    "vocab_32001": dict(vocab_size=32001, hidden_size=32, intermediate_size=64,
                        num_attention_heads=2, num_key_value_heads=1, pad_token_id=32000),
}


def make_hf(tmp_path, seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**BASE, **overrides})
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    # Randomise the norms too: HF initialises them to ones, which would hide a mix-up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def padded_batch(vocab, lengths, total, left, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for i, n in enumerate(lengths):
        sl = slice(total - n, total) if left else slice(0, n)
        ids[i, sl] = rng.integers(0, vocab, n)
        mask[i, sl] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, positions


def hf_logits(model, ids, mask, positions):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_logits_match_hf(tmp_path, case, left):
    overrides = CASES[case]
    hf = make_hf(tmp_path, **overrides)
    ours = load_hf_model(tmp_path)
    vocab = hf.config.vocab_size
    ids, mask, positions = padded_batch(vocab, [13, 7, 1], 16, left)
    expected = hf_logits(hf, ids, mask, positions)
    got = ours(jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32),
               jnp.asarray(mask, jnp.int32))
    got = np.asarray(got)
    assert got.shape == expected.shape
    valid = mask.astype(bool)
    assert np.abs(got[valid] - expected[valid]).max() <= 1e-4


def test_unrolled_layers_match_hf(tmp_path):
    """scan_layers=False runs the same stacked weights layer by layer: still HF's logits."""
    hf = make_hf(tmp_path, **CASES["gqa_8q_2kv"])
    ours = load_hf_model(tmp_path, scan_layers=False)
    ids, mask, positions = padded_batch(256, [13, 7, 1], 16, left=True)
    got = np.asarray(ours(jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32),
                          jnp.asarray(mask, jnp.int32)))
    valid = mask.astype(bool)
    assert np.abs(got[valid] - hf_logits(hf, ids, mask, positions)[valid]).max() <= 1e-4


def test_vocab_padding_to_multiple_of_128_changes_no_output(tmp_path):
    hf = make_hf(tmp_path, **CASES["vocab_32001"])
    plain = load_hf_model(tmp_path)
    padded = load_hf_model(tmp_path, vocab_multiple=128)
    assert padded.model.embed_tokens.weight.shape[0] == 32128
    ids, mask, positions = padded_batch(32001, [9, 5], 12, left=False)
    args = (jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32), jnp.asarray(mask, jnp.int32))
    a, b = np.asarray(plain(*args)), np.asarray(padded(*args))
    assert b.shape[-1] == 32001
    # Same function; a wider matmul may round differently in the last bit only.
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))
    assert np.abs(a[mask == 1] - hf_logits(hf, ids, mask, positions)[mask == 1]).max() <= 1e-4


def test_index_sharded_bf16_checkpoint_imports(tmp_path):
    hf = make_hf(tmp_path, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_hf_model(tmp_path)  # bf16 file -> fp32 params (exact widening)
    w = ours.model.layers.mlp.down_proj.kernel[...][1]  # row 1 of the stacked layers
    expected = hf.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(w), expected)



@pytest.mark.parametrize("remat,layout", [("none", {}), ("full", {}), ("dots", {}), ("none", dict(scan_unroll=2)),
                                          ("none", dict(scan_layers=False))],
                         ids=["none", "full", "dots", "none-unroll2", "none-unrolled"])
def test_grads_match_hf_per_layer(tmp_path, remat, layout):
    """d(masked cross-entropy)/d(weights) against torch autograd on the HF model: row i of
    each stacked leaf is HF's model.layers.{i} tensor's gradient, for every remat policy and
    layer layout (scanned, two layers per scan iteration, unrolled)."""
    import jax
    from flax import nnx

    from lumos_jax.checkpoints.hf import hf_tensors

    hf = make_hf(tmp_path, **CASES["gqa_8q_2kv"])
    ours = load_hf_model(tmp_path, remat_policy=remat, **layout)
    ids, mask, positions = padded_batch(256, [11, 6], 12, left=False, seed=2)
    targets = np.roll(ids, -1, axis=1)
    logits = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions)).logits
    xent = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(targets).flatten(),
                                             reduction="none")
    (xent * torch.tensor(mask).flatten()).sum().backward()
    expected = {n: p.grad.numpy() for n, p in hf.named_parameters()}

    graphdef, params = nnx.split(ours)

    def loss(p):
        out = nnx.merge(graphdef, p)(jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32),
                                     jnp.asarray(mask, jnp.int32))
        lp = jax.nn.log_softmax(out.astype(jnp.float32))
        picked = jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], -1)[..., 0]
        return -jnp.sum(picked * mask)

    grads = jax.grad(loss)(params)
    got = dict(hf_tensors(nnx.merge(graphdef, grads)))
    assert sorted(got) == sorted(expected)
    for name, g in got.items():
        np.testing.assert_allclose(g, expected[name], rtol=0, atol=2e-5, err_msg=name)  # seen: <= 2.4e-6
