"""`train()`: the whole run, from gin, on whatever mesh gin describes.

Order of work, so bad input fails fast: gin/mesh/shape checks -> data -> restore or
initialise the state -> compile -> steps. Checkpoints (async) every `save_every` steps,
a forced save on preemption and at the end; resuming restores params, optimizer, step,
RNG and the data iterator's position, so the resumed losses equal the uninterrupted ones.

The parts (model config, mesh, data, optimizer settings, checkpointer) are injected as
gin-configurable factories; the run's gin values go to `WORKDIR/operative_config.gin`.

The device is kept fed: a background thread (`DevicePrefetcher`) encodes and packs the
next batches and places them on the mesh ahead of the step, and the loop never waits on
the device between logs: metrics stay device arrays and are read one log interval late
(by then they are computed), so only log and save steps touch the host.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils

from lumos_jax.checkpoints.hf import save_hf_model
from lumos_jax.checkpoints.native import load_model, save_native
from lumos_jax.config import write_operative_config
from lumos_jax.models.config import model_config
from lumos_jax.sharding import make_mesh
from lumos_jax.training import state as state_lib
from lumos_jax.training.checkpointing import Checkpointer, PreemptionFlag
from lumos_jax.training.data import check_vocab, global_batch_array, training_data
from lumos_jax.training.distributed import initialize_distributed
from lumos_jax.training.metrics import (MetricsWriter, Progress, flops_per_token,
                                        peak_flops_per_device)
from lumos_jax.training.paths import resolve_dir
from lumos_jax.training.step import (batch_sharding, check_batch, make_eval_step,
                                     make_train_step)

logger = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised after the preemption / ctrl-C checkpoint is written (exit status 143 / 130)."""


@gin.configurable
def train(workdir: str = gin.REQUIRED, *, seq_len: int = 1024, global_batch: int = 128,
          grad_accum_steps: int = 1, num_epochs: float = 2, max_steps: int | None = None,
          init_from: str | None = None, seed: int = 0, save_every: int = 500,
          keep_checkpoints: int = 3, async_checkpoints: bool = True, log_every: int = 10,
          eval_every: int = 0, export_native: bool = True, export_hf_dir: str | None = None,
          tokenizer_dir_for_export: str | None = None, profile: bool = False,
          profile_steps: Sequence[int] = (3, 6), progress_bar: bool = True,
          prefetch: int = 2, config_factory: Callable = model_config,
          mesh_factory: Callable = make_mesh, data_factory: Callable = training_data,
          optimizer_factory: Callable = state_lib.optimizer_settings,
          checkpointer_factory: Callable = Checkpointer) -> dict:
    """Train one Lumos module; returns {"losses": {step: loss}, "eval": {...}, "step": n}.

    workdir gets checkpoints/ (resumable train state), model/ (the final weights as a
    lumos-jax checkpoint: `lumos-jax convert WORKDIR/model HF_DIR`), logs/ (metrics.jsonl,
    tensorboard/), profile/ and operative_config.gin.
    init_from: an HF directory or lumos-jax checkpoint (the importer shards it straight
    onto the mesh); None starts from random weights.
    prefetch: batches the data thread keeps ready on the devices.
    Factories (bind another with e.g. `train.data_factory = @my_data`): config_factory() ->
    LlamaConfig; mesh_factory() -> Mesh; data_factory(seq_len=, global_batch=, seed=) ->
    (train iterator, eval iterator factory or None); optimizer_factory() -> settings dict
    (`state.optimizer_settings`); checkpointer_factory(directory, save_every, keep,
    async_save) -> Checkpointer."""
    initialize_distributed()
    workdir = resolve_dir(workdir)  # local -> absolute Path; gs://... -> epath.Path, kept as is
    lead = jax.process_index() == 0
    if lead:  # again after the first step, once every configurable has been called
        write_operative_config(workdir)
    config = config_factory()
    mesh = mesh_factory()
    with jax.set_mesh(mesh):
        return _run(**locals())


def _run(workdir, seq_len, global_batch, grad_accum_steps, num_epochs, max_steps, init_from, seed,
         save_every, keep_checkpoints, async_checkpoints, log_every, eval_every, export_native,
         export_hf_dir, tokenizer_dir_for_export, profile, profile_steps, progress_bar, prefetch,
         config_factory, mesh_factory, data_factory, optimizer_factory, checkpointer_factory,
         lead, config, mesh):
    data, eval_factory = data_factory(seq_len=seq_len, global_batch=global_batch, seed=seed)
    check_vocab(data, config.vocab_size)
    if max_steps is None:
        max_steps = int(math.ceil(num_epochs * data.steps_per_epoch))
    setup = state_lib.build_setup(config, mesh, max_steps, optimizer_factory())
    check_batch(setup, global_batch, grad_accum_steps)
    ckpt = checkpointer_factory(workdir / "checkpoints", save_every, keep_checkpoints, async_checkpoints)
    try:  # the newest intact step (verified against its digest; damaged ones set aside)
        restored = ckpt.restore_latest(state_lib.restore_target(setup))
    except Exception:
        ckpt.close()  # stop orbax's threads before the error propagates
        raise
    if restored is not None:
        start, state, data_state = restored
        data.set_state(data_state)
        if lead:
            logger.info("lumos-jax train: resumed from %s", ckpt.directory / str(start))
    else:
        start = 0
        if init_from:
            loaded = load_model(init_from, mesh, **_dtype_overrides(config))
            params = state_lib.params_from_model(setup, loaded, init_from)
            del loaded
            state = state_lib.init_state(setup, params, seed)
        else:  # one jitted program straight into the shards (issue 18's fast init)
            state = state_lib.random_state(setup, seed)

    step_fn = make_train_step(setup, grad_accum_steps)
    eval_fn = make_eval_step(setup) if (eval_every and eval_factory) else None
    bsh = batch_sharding(setup)
    writer = MetricsWriter(workdir / "logs", enabled=lead, resume_step=start)
    progress = Progress(max_steps, start, enabled=lead and progress_bar)
    preempt = PreemptionFlag().install()
    log = MetricsLog(writer, progress, flops_per_token(config, seq_len) * global_batch * seq_len,
                     peak_flops_per_device(), global_batch * seq_len, mesh.size)
    batches = DevicePrefetcher(data, bsh, global_batch, depth=prefetch)
    evals, step, tracing, data_state = {}, start, False, data.get_state()
    try:
        while step < max_steps:
            if profile and lead and step == min(start + profile_steps[0], max_steps - 1):
                jax.profiler.start_trace(str(workdir / "profile"))
                tracing = True
            t_wait = time.perf_counter()
            batch, data_state = next(batches)
            t_wait = time.perf_counter() - t_wait
            state, metrics = step_fn(state, batch)
            step += 1
            log.add(step, metrics, t_wait)
            due = ckpt.due(step)
            if due:
                log.check_finite(ckpt)  # stop on NaN/inf; never save such a state
            saved = ckpt.save(step, state, data_state)
            if tracing and (step == start + profile_steps[1] or step == max_steps):
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
                tracing = False
            if step % log_every == 0 or step == max_steps:
                log.flush_previous(ckpt)
            if lead and step == start + 1:
                write_operative_config(workdir)
            if eval_fn is not None and step % eval_every == 0:
                evals[step] = _evaluate(eval_fn, state["params"], eval_factory, bsh, global_batch)
                writer.write(step, evals[step], prefix="eval")
            if ckpt.preempted(step, preempt):
                log.check_finite(ckpt)
                if not saved:
                    ckpt.save(step, state, data_state, force=True)
                ckpt.wait()
                log.flush_all(ckpt)
                if lead:
                    logger.warning("lumos-jax train: %s; saved step %d in %s; run the same command again "
                                   "to resume", preempt.reason, step, ckpt.directory)
                raise Preempted(preempt.exit_status)
        log.flush_all(ckpt)
        ckpt.wait()
        if step not in ckpt.manager.all_steps():
            ckpt.save(step, state, data_state, force=True)
            ckpt.wait()
        if export_native:
            save_native(state_lib.model_from_params(setup, state["params"]), workdir / "model",
                        tokenizer_dir=_tokenizer_dir(tokenizer_dir_for_export, init_from))
        if export_hf_dir:
            _export(setup, state["params"], export_hf_dir, _tokenizer_dir(tokenizer_dir_for_export, init_from))
    finally:
        batches.close()
        if tracing:
            jax.profiler.stop_trace()
        preempt.uninstall()
        progress.close()
        writer.close()
        ckpt.close()
    return {"losses": log.losses, "eval": evals, "step": step, "state": state, "setup": setup}


class DevicePrefetcher:
    """A thread that pulls host batches from `iterator`, lays them out as global arrays on
    `sharding` and keeps `depth` of them queued, each with the iterator's state *after* it
    (what a checkpoint taken after that batch's step must record). Encoding, packing and
    the host-to-device copy thus overlap the running step. Errors in the thread (bad
    records, exhaustion) come out of `next()` in the loop's thread."""

    _END = object()

    def __init__(self, iterator, sharding, global_rows: int, depth: int = 2):
        self._it, self._sharding, self._rows = iterator, sharding, global_rows
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True, name="batch-prefetch")
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                host = next(self._it)
                item = (global_batch_array(host, self._sharding, self._rows),
                        copy.deepcopy(self._it.get_state()))
                if not self._put(item):
                    return
        except StopIteration:
            self._put(self._END)
        except BaseException as e:  # handed to the loop's thread, raised there
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class MetricsLog:
    """Step metrics kept as device arrays and read one log interval late, when they are
    long computed, so the host never waits on the step it has just dispatched; a save
    (or the end, or a preemption) reads everything first. Each row also records
    `data_wait_s`, how long the loop waited for that step's batch: when the waits fill most
    of the step time, training is input-bound, which is said once in the log."""

    INPUT_BOUND = 0.5  # share of the step time spent waiting for batches that is warned about

    def __init__(self, writer, progress, flops_step, peak, tokens_step, n_devices):
        self.writer, self.progress = writer, progress
        self.flops_step, self.peak, self.tokens_step, self.n_devices = flops_step, peak, tokens_step, n_devices
        self.losses: dict[int, float] = {}
        self.pending: list = []   # (step, metrics) since the last log step
        self.previous: list = []  # the interval before, its copy to the host under way
        self.previous_dt = 0.0    # its wall time per step
        self.waits: dict[int, float] = {}
        self.warned = False
        self.t_last = time.perf_counter()

    def add(self, step: int, metrics: dict, data_wait_s: float = 0.0) -> None:
        self.pending.append((step, metrics))
        self.waits[step] = data_wait_s

    def flush_previous(self, ckpt) -> None:
        """At a log step: write the previous interval, start copying this one. An interval's
        step time is its wall time between log steps over its steps (the host runs at most
        an interval ahead of the device, so in steady state that is the device's pace)."""
        now = time.perf_counter()
        dt, self.t_last = (now - self.t_last) / max(len(self.pending), 1), now
        self._write(self.previous, self.previous_dt, ckpt)
        for _, m in self.pending:
            for v in m.values():
                v.copy_to_host_async()
        self.previous, self.previous_dt, self.pending = self.pending, dt, []

    def flush_all(self, ckpt) -> None:
        """Everything, the last interval timed until the device has computed it."""
        self._write(self.previous, self.previous_dt, ckpt)
        self._write(self.pending, None, ckpt)
        self.previous, self.pending = [], []

    def check_finite(self, ckpt) -> None:
        _check_finite(self.previous + self.pending, ckpt)

    def _write(self, rows, dt, ckpt) -> None:
        if not rows:
            return
        host = jax.device_get([m for _, m in rows])
        _check_finite(list(zip([s for s, _ in rows], host)), ckpt)
        if dt is None:
            now = time.perf_counter()
            dt, self.t_last = (now - self.t_last) / len(rows), now
        records = []
        for (step, _), m in zip(rows, host):
            values = {k: float(v) for k, v in m.items()}
            values["step_time_s"] = dt
            values["data_wait_s"] = self.waits.pop(step, 0.0)
            values["tokens_per_s"] = self.tokens_step / dt
            if self.peak:
                values["mfu"] = self.flops_step / dt / (self.peak * self.n_devices)
            self.losses[step] = values["loss"]
            records.append((step, values))
        self.writer.write_rows(records)
        self._warn_if_input_bound(records, dt)
        self.progress.update(len(rows), {"loss": values["loss"], "lr": values["learning_rate"],
                                         "tok/s": values["tokens_per_s"]})

    def _warn_if_input_bound(self, records, dt) -> None:
        wait = sum(v["data_wait_s"] for _, v in records) / len(records)
        if self.warned or len(records) < 2 or wait < self.INPUT_BOUND * dt:
            return
        self.warned = True
        logger.warning("lumos-jax train: input-bound: steps %d-%d waited %.0f%% of their %.1f ms for batches "
                       "(the data iterator is slower than the step; training_data.source='memory' "
                       "encodes the files once up front)", records[0][0], records[-1][0],
                       100 * wait / dt, 1e3 * dt)


def _tokenizer_dir(explicit: str | None, init_from: str | None) -> str | None:
    """What the exported model carries as its tokenizer: the explicit one, else the data's
    (`training_data.tokenizer`), else the base model's."""
    try:
        data_tok = gin.query_parameter("training_data.tokenizer")
    except ValueError:  # not bound
        data_tok = None
    return explicit or (data_tok if isinstance(data_tok, str) else None) or init_from


def _dtype_overrides(config) -> dict:
    return dict(param_dtype=config.param_dtype, dtype=config.dtype, remat_policy=config.remat_policy,
                attention_impl=config.attention_impl, vocab_multiple=config.vocab_multiple)


class NonFiniteLoss(ValueError):
    """Training diverged: stopped before saving the state."""


def _check_finite(pending, ckpt) -> None:
    """NonFiniteLoss (one line, naming the step and the last good checkpoint) when a pending
    step's loss or gradient norm is NaN/inf; the state after it is never saved."""
    host = jax.device_get([{k: m[k] for k in ("loss", "grad_norm") if k in m} for _, m in pending])
    for (step, _), m in zip(pending, host):
        bad = {k: float(m[k]) for k in ("loss", "grad_norm") if k in m and not np.isfinite(m[k])}
        if bad:
            shown = ", ".join(f"{k} {v}" for k, v in bad.items())
            last = ckpt.latest_step()
            keep = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None
                    else "no checkpoint has been saved yet")
            raise NonFiniteLoss(f"training diverged at step {step} ({shown}); stopped without saving "
                                f"that state, {keep} (lower optimizer_settings.learning_rate?)")


def _evaluate(eval_fn, params, eval_factory, bsh, global_batch) -> dict:
    total, count = 0.0, 0.0
    for host in eval_factory():
        s, c = jax.device_get(eval_fn(params, global_batch_array(host, bsh, global_batch)))
        total, count = total + float(s), count + float(c)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "target_tokens": count}


def _export(setup, params, directory, tokenizer_dir) -> None:
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        model = state_lib.model_from_params(setup, params)
        tok = tokenizer_dir if tokenizer_dir and Path(tokenizer_dir).is_dir() else None
        save_hf_model(model, directory, tokenizer_dir=tok)
