"""The train step: against HF transformers + torch AdamW, across mesh shapes, with
gradient accumulation, and the loss mask on a real Lumos conversation."""

import numpy as np
import pytest

import jax

from conftest import DATA
from lumos_jax.data.loader import make_memory_iterator
from lumos_jax.data.packing import render_rows
from lumos_jax.models import PRESETS
from lumos_jax.sharding import make_mesh
from lumos_jax.training import data as data_lib
from lumos_jax.training import state as state_lib
from lumos_jax.training import step as step_lib

TINY = PRESETS["tiny"]


def run_steps(config, mesh_shape, batches, grad_accum=1, lr=1e-3, total=10, params=None,
              warmup_steps=None, loss_chunk=None):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = make_mesh(*mesh_shape, devices=devices)
    with jax.set_mesh(mesh):
        settings = state_lib.optimizer_settings(learning_rate=lr, warmup_steps=warmup_steps)
        setup = state_lib.build_setup(config, mesh, total, settings)
        params = (state_lib.random_params(setup, 0) if params is None
                  else jax.device_put(params, setup.shardings["params"]))
        state = state_lib.init_state(setup, params, 0)
        fn = step_lib.make_train_step(setup, grad_accum, loss_chunk)
        bsh = step_lib.batch_sharding(setup)
        losses = []
        for host in batches:
            state, metrics = fn(state, data_lib.global_batch_array(host, bsh, len(host["input_ids"])))
            losses.append(float(metrics["loss"]))
        return np.array(losses), jax.device_get(state["params"])


def synthetic_batches(n, rows=8, seq=32, packing=True):
    it = make_memory_iterator(data_lib.synthetic_examples(64, TINY.vocab_size, 6, 30, 1),
                              seq_len=seq, global_batch=rows, packing=packing)
    return [next(it) for _ in range(n)]


def host_params(config):
    from flax import nnx

    from lumos_jax.models.llama import create_model

    return jax.device_get(nnx.to_pure_dict(nnx.state(create_model(config, 0))))


def test_losses_equal_across_mesh_shapes():
    batches = synthetic_batches(10)
    assert batches[0]["segment_ids"].max() > 1  # rows really are packed
    params = host_params(TINY)
    ref, _ = run_steps(TINY, (1, 1, 1), batches, params=params)
    assert ref[-1] < ref[0]  # it learns
    for shape in [(2, 2, 2), (1, 8, 1), (2, 1, 4)]:
        got, _ = run_steps(TINY, shape, batches, params=params)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5, err_msg=f"mesh {shape}")


def test_grad_accumulation_equals_one_big_batch():
    """4 microbatches of 2 rows = 1 batch of 8 (the accumulated run also recomputes each
    layer in the backward pass, remat 'full', which must not change the numbers either)."""
    batches = synthetic_batches(3)
    params = host_params(TINY)
    one, p_one = run_steps(TINY, (1, 1, 1), batches, grad_accum=1, params=params)
    four, p_four = run_steps(TINY.replace(remat_policy="full"), (1, 1, 1), batches, grad_accum=4,
                             params=params)
    np.testing.assert_allclose(four, one, rtol=0, atol=1e-6)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p_one, p_four))
    assert max(diffs) <= 1e-6


def test_matches_hf_transformers_and_torch_adamw(tmp_path):
    """Loss and three AdamW updates (clip 1.0, linear warmup/decay) against the HF model
    trained with torch.optim.AdamW and transformers' linear schedule."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lumos_jax.checkpoints.hf import load_hf_model

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=128)
    hf = transformers.LlamaForCausalLM(hf_config).float()
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path)
    from flax import nnx

    params = nnx.to_pure_dict(nnx.state(ours))
    it = make_memory_iterator(data_lib.synthetic_examples(40, 256, 5, 24, 3), seq_len=24, global_batch=4,
                              packing=False)
    batches = [next(it) for _ in range(4)]
    lr, total = 3e-3, 4
    # loss in chunks of 7 positions (24 = 3 x 7 + 3 padded): the chunked cross-entropy vs torch
    got, _ = run_steps(ours.config, (1, 1, 1), batches, lr=lr, total=total, params=params,
                       warmup_steps=1, loss_chunk=7)

    opt = torch.optim.AdamW(hf.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = transformers.get_linear_schedule_with_warmup(opt, 1, total)
    expected = []
    for b in batches:
        mask = torch.tensor(b["segment_ids"] != 0).long()
        logits = hf(input_ids=torch.tensor(b["input_ids"]).long(), attention_mask=mask,
                    position_ids=torch.tensor(b["positions"]).long()).logits
        xent = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(b["targets"]).long().flatten(),
                                                 reduction="none")
        w = torch.tensor(b["loss_mask"]).float().flatten()
        loss = (xent * w).sum() / w.sum()
        expected.append(loss.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        sched.step()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
    assert abs(got[-1] - got[0]) > 1e-3  # the updates really changed the model


def test_user_turn_targets_do_not_change_the_loss(llama2_tokenizer):
    from lumos_jax.jsonl import read_jsonl
    from lumos_jax.tokenization import encode_conversation

    record = read_jsonl(DATA / "lumos/annotations/lumos_maths_plan_iterative.jsonl")[0]
    ids, labels = encode_conversation(record["messages"], llama2_tokenizer, 512)
    batch = render_rows([[(ids, labels)]], 512, 1, pad_id=0)
    config = TINY.replace(vocab_size=llama2_tokenizer.vocab_size)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        setup = state_lib.build_setup(config, mesh, 1, state_lib.optimizer_settings())
        params = state_lib.random_params(setup, 0)
        loss = jax.jit(lambda p, b: step_lib.summed_loss(setup.graphdef, p, b))
        base_sum, base_n = loss(params, batch)
        user = (batch["loss_mask"] == 0) & (batch["segment_ids"] != 0)
        assert user.sum() > 50 and batch["loss_mask"].sum() > 10
        rng = np.random.default_rng(0)
        changed = dict(batch, targets=np.where(user, rng.integers(3, 32000, user.shape), batch["targets"]))
        same_sum, same_n = loss(params, changed)
        assert float(same_sum) == float(base_sum) and float(same_n) == float(base_n)
        assistant = batch["loss_mask"] == 1
        moved = dict(batch, targets=np.where(assistant, (batch["targets"] + 7) % 32000, batch["targets"]))
        assert abs(float(loss(params, moved)[0]) - float(base_sum)) > 1e-3


def test_init_from_hf_grows_vocab_with_mean_rows(tmp_path):
    """Llama-2 (32,000 rows) -> Lumos (32,001 with <pad>): HF's resize_token_embeddings
    fills new rows with the mean of the old ones; other mismatches are one-line errors."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lumos_jax.checkpoints.hf import load_hf_model

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=250, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    hf.save_pretrained(tmp_path)
    hf.resize_token_embeddings(251)  # the reference's step after adding <pad>
    mesh = make_mesh(1, 2, 1, devices=jax.devices()[:2])
    loaded = load_hf_model(tmp_path, mesh)
    with jax.set_mesh(mesh):
        setup = state_lib.build_setup(loaded.config.replace(vocab_size=251), mesh, 1,
                                      state_lib.optimizer_settings())
        params = jax.device_get(state_lib.params_from_model(setup, loaded))
    # HF draws the new row around the old rows' mean with 1e-9-scaled covariance: ~the mean.
    emb, want = params["model"]["embed_tokens"]["weight"], hf.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(emb[:250], want[:250])
    np.testing.assert_allclose(emb[250], want[250], atol=1e-5)
    head, want = params["lm_head"]["kernel"], hf.lm_head.weight.detach().numpy().T
    np.testing.assert_array_equal(head[:, :250], want[:, :250])
    np.testing.assert_allclose(head[:, 250], want[:, 250], atol=1e-5)
    with jax.set_mesh(mesh):
        wrong = state_lib.build_setup(loaded.config.replace(vocab_size=251, intermediate_size=32), mesh, 1,
                                      state_lib.optimizer_settings())
        with pytest.raises(ValueError, match="do not fit the configured model"):
            state_lib.params_from_model(wrong, loaded)


def test_weight_decay_skips_exactly_what_hf_trainer_skips():
    """AdamW's decay mask names the same weights as transformers' Trainer (norms excluded,
    by name: stacked norm weights are 2-D)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flax import nnx

    from lumos_jax.checkpoints.hf import hf_names
    from lumos_jax.models.llama import abstract_model

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1))
    expected = set(transformers.Trainer.get_decay_parameter_names(None, hf))
    config = TINY.replace(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                          num_attention_heads=2, num_key_value_heads=1)
    params = nnx.to_pure_dict(nnx.state(abstract_model(config)))
    mask = state_lib.decay_mask(params)
    got = set()
    for path, decayed in jax.tree_util.tree_flatten_with_path(mask)[0]:
        if decayed:
            got.update(hf_names(tuple(k.key for k in path), config.num_hidden_layers))
    assert got == expected and len(expected) == 2 + 3 * 7


@pytest.mark.parametrize("remat", ["none", "full"])
def test_train_step_program_does_not_grow_with_depth(remat):
    """Layers are scanned, not unrolled: the lowered train step at 2 and 16 layers is the same
    program up to the layer count (unrolled, 16 layers was ~6x the text of 2)."""
    sizes = []
    for layers in (2, 16):
        config = TINY.replace(num_hidden_layers=layers, remat_policy=remat)
        mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
        with jax.set_mesh(mesh):
            setup = state_lib.build_setup(config, mesh, 10, state_lib.optimizer_settings())
            batch = {k: jax.ShapeDtypeStruct((2, 16), np.int32) for k in step_lib.BATCH_KEYS}
            text = step_lib.make_train_step(setup).lower(state_lib.restore_target(setup), batch).as_text()
        sizes.append(len(text))
    assert abs(sizes[1] - sizes[0]) <= 0.02 * sizes[0], sizes


def test_random_state_is_hf_init_made_on_device():
    """One jitted call makes the whole state with no device-to-host copy: weights drawn as
    HF's LlamaForCausalLM initialises them (normal(0, initializer_range), norms 1), each
    stacked layer its own draw; zero Adam moments, step 0, each array on its sharding."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lumos_jax.checkpoints.hf import hf_tensors

    config = TINY.replace(hidden_size=128, intermediate_size=256, num_hidden_layers=3, head_dim=None)
    mesh = make_mesh(1, 4, 2, devices=jax.devices()[:8])
    with jax.set_mesh(mesh):
        setup = state_lib.build_setup(config, mesh, 10, state_lib.optimizer_settings())
        with jax.transfer_guard_device_to_host("disallow"):
            state = state_lib.random_state(setup, 7)
            jax.block_until_ready(state)
    assert jax.tree.map(lambda a, s: a.sharding == s, state, setup.shardings) == jax.tree.map(
        lambda _: True, setup.shardings)
    assert int(state["step"]) == 0
    adam = state["opt_state"][1][0]
    assert all(float(np.abs(np.asarray(m)).max()) == 0 for m in jax.tree.leaves((adam.mu, adam.nu)))

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads))
    want = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    got = dict(hf_tensors(state_lib.model_from_params(setup, jax.device_get(state["params"]))))
    assert sorted(got) == sorted(want)
    for name, ours in got.items():
        ref = want[name]
        assert ours.shape == ref.shape, name
        if "norm" in name:
            assert (ours == 1).all() and (ref == 1).all(), name
        else:
            assert abs(ours.std() - ref.std()) <= 0.1 * ref.std() and abs(ours.mean()) < 3e-3, name
    q = np.asarray(state["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"])
    assert not np.allclose(q[0], q[1])  # layers are independent draws


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_plain_loss_and_grads(tied):
    """Chunked cross-entropy (5 positions at a time over 23, so the last chunk is padded; a
    padded vocabulary) == optax's plain cross-entropy on full logits: value and gradients."""
    from flax import nnx

    from lumos_jax.models.llama import create_model

    config = TINY.replace(vocab_size=300, vocab_multiple=128, tie_word_embeddings=tied,
                          num_hidden_layers=1)
    graphdef, params = nnx.split(create_model(config, seed=1))
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, 300, (3, 23)), "targets": rng.integers(0, 300, (3, 23)),
             "loss_mask": rng.integers(0, 2, (3, 23)), "segment_ids": np.ones((3, 23), np.int32),
             "positions": np.broadcast_to(np.arange(23), (3, 23))}
    batch = {k: jax.numpy.asarray(v, jax.numpy.int32) for k, v in batch.items()}
    results = []
    for chunk in (0, 5):
        fn = jax.jit(jax.value_and_grad(lambda p: step_lib.summed_loss(graphdef, p, batch, chunk)[0]))
        results.append(fn(params))
    (plain, g_plain), (chunked, g_chunked) = results
    assert abs(float(chunked) - float(plain)) <= 1e-5 * abs(float(plain))
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
