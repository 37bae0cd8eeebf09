"""Batches: layout, shuffling, host sharding, mixtures, and exact resume from saved state."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import DATA, FIXTURES, REPO

from lumos_jax.data.encoding import encode_fast
from lumos_jax.data.loader import make_eval_iterator, make_train_iterator
from lumos_jax.data.mixture import Mixture
from lumos_jax.jsonl import read_jsonl

ANN = DATA / "lumos" / "annotations"
FILES = [str(p) for p in sorted(ANN.glob("*.jsonl"))]
TOK = str(FIXTURES / "llama2-tokenizer")


def _it(**kw):
    args = dict(sources=FILES, tokenizer=TOK, seq_len=1024, batch_size=4, seed=0, num_epochs=2,
                process_index=0, process_count=1)
    args.update(kw)
    return make_train_iterator(**args)


def _segments(batch, b):
    """[(input_ids, targets, loss_mask, positions)] of each segment of row b."""
    out = []
    for s in sorted(set(batch["segment_ids"][b].tolist()) - {0}):
        sel = batch["segment_ids"][b] == s
        out.append(tuple(batch[k][b][sel] for k in ("input_ids", "targets", "loss_mask", "positions")))
    return out


def test_packed_rows_hold_each_conversation_shifted_with_restarting_positions(llama2_tokenizer):
    all_convs = {tuple(encode_fast(r["messages"], llama2_tokenizer, 1024).input_ids.tolist()):
                 encode_fast(r["messages"], llama2_tokenizer, 1024) for f in FILES for r in read_jsonl(f)}
    it = _it(num_epochs=1)
    seen = []
    for batch in it:
        assert set(batch) == {"input_ids", "targets", "loss_mask", "segment_ids", "positions"}
        assert all(v.dtype == np.int32 and v.shape == (4, 1024) for v in batch.values())
        for b in range(4):
            pad = batch["segment_ids"][b] == 0
            assert not batch["loss_mask"][b][pad].any()
            for inp, tgt, mask, pos in _segments(batch, b):
                ids = np.concatenate([inp, tgt[-1:]])
                enc = all_convs[tuple(ids.tolist())]  # the whole conversation, unchanged
                np.testing.assert_array_equal(tgt, enc.input_ids[1:])
                np.testing.assert_array_equal(mask, enc.labels[1:] != -100)
                np.testing.assert_array_equal(pos, np.arange(len(inp)))
                seen.append(tuple(ids.tolist()))
    assert sorted(seen) == sorted(tuple(e.input_ids.tolist()) for f in FILES for r in read_jsonl(f)
                                  for e in [encode_fast(r["messages"], llama2_tokenizer, 1024)])
    assert it.summary()["packing_efficiency"] > 0.8


def test_truncation_is_counted_and_unpacked_rows_hold_one_conversation():
    it = _it(seq_len=256, packing=False, num_epochs=1)
    batches = list(it)
    assert it.stats["truncated"] > 0 and it.stats["examples"] == 52
    # Conversations whose every assistant token lies past 256 are left out (and reported).
    assert it.stats["no_target"] == 19
    assert len(batches) == it.num_batches == -(-(52 - 19) // 4)
    for batch in batches:
        assert set(np.unique(batch["segment_ids"]).tolist()) <= {0, 1}
        assert (batch["segment_ids"][:, :255] == 1).any()


def test_shuffle_is_deterministic_by_seed_and_differs_by_epoch():
    def first_tokens(it, n):
        return [next(it)["input_ids"].tobytes() for _ in range(n)]
    a, b, c = _it(packing=False), _it(packing=False), _it(packing=False, seed=1)
    assert first_tokens(a, 5) == first_tokens(b, 5) != first_tokens(c, 5)
    m = Mixture([52], seed=0)
    assert sorted(m.epoch_order(0)[:, 1]) == list(range(52))
    assert m.epoch_order(0)[:, 1].tolist() != m.epoch_order(1)[:, 1].tolist()


def test_hosts_get_disjoint_equal_shards():
    seen, counts = [], []
    for host in range(3):
        it = _it(packing=False, num_epochs=1, batch_size=1, process_index=host, process_count=3)
        rows = [b["input_ids"][0].tobytes() for b in it]
        counts.append(len(rows))
        seen += rows
    assert counts == [17, 17, 17]  # 52 // 3 each; the remainder is dropped in training
    assert len(set(seen)) == len(seen)
    evs = [make_eval_iterator(FILES, TOK, seq_len=1024, batch_size=4, process_index=h, process_count=3)
           for h in range(3)]
    assert [e.num_batches for e in evs] == [5, 5, 5]
    assert [len(list(e)) for e in evs] == [5, 5, 5]  # equal batch counts: no host waits
    assert sum(e.stats["examples"] for e in evs) == 52  # nothing lost in eval
    with pytest.raises(ValueError, match="fewer than 64 hosts"):
        _it(sources=FILES[:1], process_index=0, process_count=64)


def test_mixture_weights_set_the_share_of_each_source():
    maths, web = str(ANN / "lumos_maths_plan_iterative.jsonl"), str(ANN / "lumos_web_agent_plan_iterative.jsonl")
    m = Mixture([6, 2], weights=[1, 3], epoch_size=40, seed=0)
    order = m.epoch_order(0)
    assert (order[:, 0] == 0).sum() == 10 and (order[:, 0] == 1).sum() == 30
    assert set(order[order[:, 0] == 1, 1].tolist()) == {0, 1}
    it = _it(sources=[maths, web], weights=[1, 3], epoch_size=40, packing=False, batch_size=40, num_epochs=1)
    assert next(it)["segment_ids"].shape == (40, 1024)
    assert it.stats["examples"] == 40
    with pytest.raises(ValueError, match="2 weights for 1 sources|weights"):
        _it(sources=[maths], weights=[1, 2])


def test_holdout_split_is_disjoint_from_training():
    train = _it(holdout_fraction=0.25, packing=False, num_epochs=1, batch_size=1)
    ev = make_eval_iterator(FILES, TOK, seq_len=1024, batch_size=1, holdout_fraction=0.25,
                            process_index=0, process_count=1)
    a = {b["input_ids"][0].tobytes() for b in train}
    e = {b["input_ids"][0].tobytes() for b in ev}
    assert a and e and not a & e and train.stats["examples"] + ev.stats["examples"] == 52


RESUME_SCRIPT = """
import json, sys
import numpy as np
from lumos_jax.data.loader import make_train_iterator
args = json.loads(sys.argv[1])
it = make_train_iterator(**args)
it.set_state(json.loads(open(sys.argv[2]).read()))
batch = next(it)
np.savez(sys.argv[3], **batch)
"""


@pytest.mark.parametrize("packing", [True, False])
def test_resume_in_a_new_process_gives_the_identical_next_batch(tmp_path, packing):
    args = dict(sources=FILES, tokenizer=TOK, seq_len=512, batch_size=3, seed=7, num_epochs=None,
                packing=packing, process_index=1, process_count=2)
    it = make_train_iterator(**args)
    for _ in range(9):  # crosses an epoch boundary (26 examples per host)
        next(it)
    state = it.get_state()
    (tmp_path / "state.json").write_text(json.dumps(state))
    expected = next(it)
    out = tmp_path / "next.npz"
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(args), str(tmp_path / "state.json"), str(out)],
                   check=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": ""})
    got = np.load(out)
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_state_from_other_settings_is_refused():
    state = _it().get_state()
    with pytest.raises(ValueError, match="different settings.*seed"):
        _it(seed=3).set_state(state)


def test_encoding_cache_changes_no_batch():
    """Encoded examples kept across epochs (all, some within a small budget, none) give the
    same batches: the cache only saves re-encoding (most of the loader's host time)."""
    runs = [list(_it(num_epochs=2, encode_cache_tokens=n)) for n in (1 << 25, 3000, 0)]
    assert len(runs[0]) > 2
    it = _it(num_epochs=2, encode_cache_tokens=3000)
    it.steps_per_epoch  # encodes every example once, into the cache while it lasts
    assert 0 < sum(len(e.input_ids) for e in it._by_example.values()) <= 3000
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for a, b in zip(runs[0], other):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
