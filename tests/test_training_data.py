"""Training batches: ids fit the model's vocab (the bundled 512-piece stories260k
tokenizer's <pad> is id 512, past a 512-row embedding: NaN losses, no error), and packed
epochs after the first keep the full batch shape; the loop's data thread places batches on
the device ahead of the step, and the loop reads the device only on log and save steps."""

import json
import threading

import jax
import numpy as np
import pytest
from jax._src.array import ArrayImpl
from jax.sharding import NamedSharding, PartitionSpec

from conftest import DATA, REPO
from lumos_jax.config import parse_gin
from lumos_jax.data.loader import make_memory_iterator
from lumos_jax.jsonl import read_jsonl
from lumos_jax.tokenization import Tokenizer
from lumos_jax.training import data as data_lib
from lumos_jax.training import loop
from lumos_jax.training.loop import DevicePrefetcher

STORIES_TOKENIZER = REPO / "lumos_jax" / "assets" / "stories260k"


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    records = read_jsonl(DATA / "lumos/annotations/lumos_maths_plan_onetime.jsonl")
    records = sorted(records, key=lambda r: len(json.dumps(r)))[:3]
    path = tmp_path_factory.mktemp("data") / "three.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _memory_batches(small_file):
    it, _ = data_lib.training_data(seq_len=512, global_batch=3, source="memory", packing=False,
                                   files=[str(small_file)], tokenizer=str(STORIES_TOKENIZER))
    return it


def test_memory_rows_pad_with_an_id_inside_the_base_vocab(small_file):
    tok = Tokenizer(STORIES_TOKENIZER, add_pad_token=True)
    assert (tok.base_vocab_size, tok.pad_id) == (512, 512)  # the reported setup
    batch = next(_memory_batches(small_file))
    pad = batch["segment_ids"] == 0
    assert pad.any(), "the test needs padded positions"
    assert batch["input_ids"].max() < tok.base_vocab_size
    assert (batch["input_ids"][pad] == 0).all() and (batch["loss_mask"][pad] == 0).all()


def test_vocab_check_names_both_sizes_and_the_gin_key(small_file):
    it = _memory_batches(small_file)
    assert data_lib.data_vocab_size(it) == 513
    with pytest.raises(ValueError, match=r"vocab_size 513.*vocab_size is 512.*model_config\.overrides"):
        data_lib.check_vocab(it, 512)
    data_lib.check_vocab(it, 513)


def test_train_rejects_pipeline_data_past_the_model_vocab_before_compiling(small_file, tmp_path,
                                                                          monkeypatch):
    """The data pipeline pads input_ids with the tokenizer's <pad> (512 here): same check."""
    def boom(*a, **k):
        raise AssertionError("got to compiling despite the vocab mismatch")
    monkeypatch.setattr(loop, "make_train_step", boom)
    monkeypatch.setattr(loop.state_lib, "build_setup", boom)

    parse_gin(["mesh/single_device.gin"], [
        "model_config.preset = 'tiny'", "training_data.source = 'pipeline'",
        f"training_data.files = ['{small_file}']", f"training_data.tokenizer = '{STORIES_TOKENIZER}'"])
    with pytest.raises(ValueError, match=r"up to 512 .*vocab_size is 512"):
        loop.train(workdir=str(tmp_path / "run"), seq_len=256, global_batch=2, max_steps=1)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_packed_memory_epochs_give_full_batches_and_every_target_once_per_epoch():
    """Each epoch's shuffle packs into a different number of rows and rows stay open across
    epochs: every batch still has the full shape, there are exactly num_batches of them, and
    each example's trained tokens are trained once per epoch (none lost, none repeated)."""
    examples = data_lib.synthetic_examples(40, 512, 5, 60, seed=3)
    seq_len, batch, epochs = 64, 11, 12
    it = make_memory_iterator(examples, seq_len=seq_len, global_batch=batch, packing=True, num_epochs=epochs,
                              process_index=0, process_count=1)
    batches = list(it)
    assert len(batches) == it.num_batches > epochs
    for n, b in enumerate(batches):
        for k, v in b.items():
            assert v.shape == (batch, seq_len), (n, k, v.shape)
    targets = sum(int((labels[1:] >= 0).sum()) for _, labels in examples)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == epochs * targets
    last = batches[-1]  # rows missing from the last batch are empty: id 0, no target
    empty = last["segment_ids"].max(axis=1) == 0
    assert (last["input_ids"][empty] == 0).all() and (last["loss_mask"][empty] == 0).all()


def test_memory_batches_are_the_same_global_batches_on_two_processes_and_resume_exactly():
    """global_rows: process p of 2 gets rows [p * 4, p * 4 + 4) of the batch one process
    builds, and a state saved mid-epoch (rows still open in the packer) resumes on a fresh
    iterator with the batches that would have followed."""
    examples = data_lib.synthetic_examples(40, 512, 5, 60, seed=4)
    make = lambda p, n: make_memory_iterator(examples, seq_len=64, global_batch=8, packing=True,  # noqa: E731
                                             num_epochs=3, process_index=p, process_count=n)
    one, two = list(make(0, 1)), [list(make(p, 2)) for p in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) > 4
    for b, b0, b1 in zip(one, *two):
        for k in b:
            np.testing.assert_array_equal(b[k], np.concatenate([b0[k], b1[k]]), err_msg=k)
    it = make(1, 2)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["open_rows"], "no open rows at the save: the resume test exercises little"
    fresh = make(1, 2)
    fresh.set_state(state)
    rest = list(fresh)
    assert len(rest) == len(two[1]) - 3
    for got, want in zip(rest, two[1][3:]):
        for k in got:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    with pytest.raises(ValueError, match="older lumos-jax's in-memory iterator"):
        fresh.set_state({"epoch": 1, "index": 0})


def test_prefetcher_gives_the_iterators_batches_on_device_with_the_state_after_each():
    """The loop's data thread: same rows as the iterator itself, already laid out on the batch
    sharding, each with the iterator state a checkpoint after that step must hold; an error in
    the thread comes out of next() in the caller's thread."""
    examples = data_lib.synthetic_examples(30, 512, 5, 40, seed=2)
    make = lambda: make_memory_iterator(examples, seq_len=32, global_batch=4, packing=True,  # noqa: E731
                                        num_epochs=2, process_index=0, process_count=1)
    direct = make()
    expected = [(next(direct), direct.get_state()) for _ in range(5)]
    sharding = NamedSharding(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), PartitionSpec("data"))
    fetch = DevicePrefetcher(make(), sharding, 4, depth=2)
    try:
        for want, want_state in expected:
            batch, state = next(fetch)
            assert state == want_state
            for k, v in want.items():
                assert isinstance(batch[k], jax.Array) and batch[k].sharding == sharding
                np.testing.assert_array_equal(np.asarray(batch[k]), v)
    finally:
        fetch.close()

    class Broken:
        def __next__(self):
            raise data_lib.BadRecordError("x.jsonl:3: not JSON")
    fetch = DevicePrefetcher(Broken(), sharding, 4)
    with pytest.raises(data_lib.BadRecordError, match="x.jsonl:3"):
        next(fetch)
    fetch.close()


def test_loop_reads_the_device_only_on_log_and_save_steps(tmp_path, monkeypatch):
    """Between log steps the host never waits on the device: every device-to-host read in the
    loop's thread (`ArrayImpl._value`, behind np.asarray / float / device_get, and
    block_until_ready) comes right after a log or save step. (JAX's transfer guard cannot
    see this on CPU, where device arrays are host memory, so the reads are counted.)"""
    dispatched, reads = [0], []
    main = threading.main_thread()

    def record():
        if threading.current_thread() is main:
            reads.append(dispatched[0])

    real_value, real_block = ArrayImpl._value, ArrayImpl.block_until_ready

    def value(self):
        record()
        return real_value.fget(self)

    def block(self):
        record()
        return real_block(self)
    real_make = loop.make_train_step

    def counting_step(*a, **k):
        fn = real_make(*a, **k)

        def step(*args):
            dispatched[0] += 1
            return fn(*args)
        return step
    parse_gin(["mesh/single_device.gin"], [
        "model_config.preset = 'tiny'", "training_data.source = 'synthetic'",
        "training_data.synthetic_vocab = 512"])
    monkeypatch.setattr(loop, "make_train_step", counting_step)
    monkeypatch.setattr(ArrayImpl, "_value", property(value))
    monkeypatch.setattr(ArrayImpl, "block_until_ready", block)
    result = loop.train(workdir=str(tmp_path / "run"), seq_len=32, global_batch=4, max_steps=13,
                        save_every=6, log_every=4, progress_bar=False, export_native=False)
    monkeypatch.undo()
    assert sorted(result["losses"]) == list(range(1, 14))
    # orbax saves the first step of a fresh run, then every save_every; logs every 4 and at the end
    # (steps 1-4 are read at step 8, 5-8 at 12)
    allowed = {1, 4, 6, 8, 12, 13}
    assert {8, 12}.issubset(reads), "the counter saw no log reads: it tests nothing"
    assert set(reads) <= allowed, sorted(set(reads) - allowed)
    assert 4 not in reads  # step 4's interval is read at step 8, once computed
