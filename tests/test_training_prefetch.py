"""The step loop's feeding (batches prefetched onto the devices by a thread, metrics read a
log interval late): the losses are those of the bare jitted step over the same iterator's
batches in order, and each step's wait for its batch is logged, with one warning when the
run is input-bound."""

import logging
import time

import jax
import numpy as np
import pytest

from lumos_jax.data.loader import make_memory_iterator
from lumos_jax.jsonl import read_jsonl
from lumos_jax.models import PRESETS
from lumos_jax.sharding import make_mesh
from lumos_jax.training import data as data_lib
from lumos_jax.training import state as state_lib
from lumos_jax.training import step as step_lib
from lumos_jax.training.loop import train

CONFIG = PRESETS["tiny"].replace(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=None)
SEQ, ROWS = 32, 4
EXAMPLES = data_lib.synthetic_examples(200, CONFIG.vocab_size, 6, SEQ + 1, seed=3)


def memory_data(seq_len, global_batch, seed):
    return make_memory_iterator(EXAMPLES, seq_len=seq_len, global_batch=global_batch, seed=seed,
                                token_vocab_size=CONFIG.vocab_size), None


def run(tmp_path, steps, data_factory, **kw):
    mesh = make_mesh(2, 1, 1, devices=jax.devices()[:2])
    result = train(str(tmp_path), seq_len=SEQ, global_batch=ROWS, max_steps=steps, save_every=1000,
                   progress_bar=False, export_native=False, config_factory=lambda: CONFIG,
                   mesh_factory=lambda: mesh, data_factory=data_factory, **kw)
    return result, [r for r in read_jsonl(tmp_path / "logs/metrics.jsonl") if r["split"] == "train"]


STEPS = 12


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory):
    """One train() on the in-memory iterator, a deep prefetch queue, logs every 3 steps."""
    return run(tmp_path_factory.mktemp("memory"), STEPS, memory_data, prefetch=3, log_every=3, seed=5)


def test_loop_losses_are_the_bare_steps_over_the_same_batches(memory_run):
    """train() with a deep prefetch queue and late metric reads: bitwise the losses of the
    jitted step called on the iterator's batches one by one, in order."""
    steps = STEPS
    result, rows = memory_run
    mesh = make_mesh(2, 1, 1, devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        setup = state_lib.build_setup(CONFIG, mesh, steps, state_lib.optimizer_settings())
        state = state_lib.random_state(setup, 5)
        fn, bsh = step_lib.make_train_step(setup), step_lib.batch_sharding(setup)
        it, _ = memory_data(SEQ, ROWS, 5)
        want = []
        for _ in range(steps):
            state, metrics = fn(state, data_lib.global_batch_array(next(it), bsh, ROWS))
            want.append(float(metrics["loss"]))
    assert [result["losses"][s] for s in range(1, steps + 1)] == want
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["loss"] for r in rows] == want


class SlowData:
    """The memory iterator, `delay` seconds per batch: a data source slower than the step."""

    def __init__(self, delay, seed):
        self.it, _ = memory_data(SEQ, ROWS, seed)
        self.delay, self.steps_per_epoch = delay, self.it.steps_per_epoch

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.delay)
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def test_batch_waits_are_logged_and_an_input_bound_run_is_said_once(memory_run, tmp_path, caplog):
    """A 40 ms-per-batch iterator with a ~1 ms step: every steady step waits most of the
    40 ms (data_wait_s), and the log says once that the run is input-bound; the in-memory
    iterator's steps wait a small fraction of that. Each log interval's rows carry its own
    wall time per step, the last one's too (timed until the device has computed it)."""
    with caplog.at_level(logging.WARNING, logger="lumos_jax.training.loop"):
        _, slow = run(tmp_path, STEPS, lambda seq_len, global_batch, seed: (SlowData(0.04, seed), None),
                      log_every=3)
    warned = [r.getMessage() for r in caplog.records if "input-bound" in r.getMessage()]
    assert len(warned) == 1 and "training_data.source='memory'" in warned[0], warned
    _, fast = memory_run
    slow_wait = np.median([r["data_wait_s"] for r in slow[3:]])
    fast_wait = np.median([r["data_wait_s"] for r in fast[3:]])
    assert slow_wait > 0.02, slow_wait
    assert fast_wait < slow_wait / 5, (fast_wait, slow_wait)
    for first in range(0, STEPS, 3):  # an interval's waits are inside its wall time (its rows' step_time_s)
        interval = slow[first:first + 3]
        assert sum(r["data_wait_s"] for r in interval) <= 3 * interval[0]["step_time_s"] + 1e-6, interval
        assert len({r["step_time_s"] for r in interval}) == 1
