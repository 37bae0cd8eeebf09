"""`train()`: the whole run, from gin, on whatever mesh gin describes.

Order of work, so bad input fails fast: gin/mesh/shape checks -> data -> restore or
initialise the state -> compile -> steps. Checkpoints (async) every `save_every` steps,
a forced save on SIGTERM and at the end; resuming restores params, optimizer, step,
RNG and the data iterator's position, so the resumed losses equal the uninterrupted ones.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils

from lumos_jax.models.config import model_config
from lumos_jax.sharding import make_mesh
from lumos_jax.training import state as state_lib
from lumos_jax.training.checkpointing import Checkpointer, PreemptionFlag
from lumos_jax.training.data import check_vocab, global_batch_array, training_data
from lumos_jax.training.distributed import initialize_distributed
from lumos_jax.training.paths import resolve_dir
from lumos_jax.training.metrics import (MetricsWriter, Progress, flops_per_token,
                                        peak_flops_per_device)
from lumos_jax.training.step import (batch_sharding, check_batch, make_eval_step,
                                     make_train_step)


class Preempted(SystemExit):
    """Raised after the SIGTERM / ctrl-C checkpoint is written (exit status 143 / 130)."""


@gin.configurable
def train(workdir: str = gin.REQUIRED, *, seq_len: int = 1024, global_batch: int = 128,
          grad_accum_steps: int = 1, num_epochs: float = 2, max_steps: int | None = None,
          init_from: str | None = None, seed: int = 0, save_every: int = 500,
          keep_checkpoints: int = 3, async_checkpoints: bool = True, log_every: int = 10,
          eval_every: int = 0, export_native: bool = True, export_hf_dir: str | None = None,
          tokenizer_dir_for_export: str | None = None, profile: bool = False,
          profile_steps: Sequence[int] = (3, 6), progress_bar: bool = True) -> dict:
    """Train one Lumos module; returns {"losses": {step: loss}, "eval": {...}, "step": n}.

    workdir gets checkpoints/ (resumable train state), model/ (the final weights as a
    lumos-jax checkpoint: `lumos-jax convert WORKDIR/model HF_DIR`), logs/ (metrics.jsonl,
    tensorboard/) and profile/.
    init_from: an HF directory or lumos-jax checkpoint (the importer shards it straight
    onto the mesh); None starts from random weights."""
    initialize_distributed()
    workdir = resolve_dir(workdir)  # local -> absolute Path; gs://... -> epath.Path, kept as is
    lead = jax.process_index() == 0
    config = model_config()
    mesh = make_mesh()
    with jax.set_mesh(mesh):
        return _run(**locals())


def _run(workdir, seq_len, global_batch, grad_accum_steps, num_epochs, max_steps, init_from, seed,
         save_every, keep_checkpoints, async_checkpoints, log_every, eval_every, export_native,
         export_hf_dir,
         tokenizer_dir_for_export, profile, profile_steps, progress_bar, lead, config, mesh):
    data, eval_factory = training_data(seq_len=seq_len, global_batch=global_batch, seed=seed)
    check_vocab(data, config.vocab_size)
    if max_steps is None:
        max_steps = int(math.ceil(num_epochs * data.steps_per_epoch))
    setup = state_lib.build_setup(config, mesh, max_steps, state_lib.optimizer_settings())
    check_batch(setup, global_batch, grad_accum_steps)
    ckpt = Checkpointer(workdir / "checkpoints", save_every, keep_checkpoints, async_checkpoints)
    try:  # the newest intact step (verified against its digest; damaged ones set aside)
        restored = ckpt.restore_latest(state_lib.restore_target(setup))
    except Exception:
        ckpt.close()  # stop orbax's threads before the error propagates
        raise
    if restored is not None:
        start, state, data_state = restored
        data.set_state(data_state)
        if lead:
            print(f"lumos-jax train: resumed from {ckpt.directory / str(start)}")
    else:
        start = 0
        if init_from:
            from lumos_jax.checkpoints.native import load_model

            loaded = load_model(init_from, mesh, **_dtype_overrides(config))
            params = state_lib.params_from_model(setup, loaded, init_from)
            del loaded
        else:
            params = state_lib.random_params(setup, seed)
        state = state_lib.init_state(setup, params, seed)

    step_fn = make_train_step(setup, grad_accum_steps)
    eval_fn = make_eval_step(setup) if (eval_every and eval_factory) else None
    bsh = batch_sharding(setup)
    writer = MetricsWriter(workdir / "logs", enabled=lead, resume_step=start)
    progress = Progress(max_steps, start, enabled=lead and progress_bar)
    preempt = PreemptionFlag().install()
    peak = peak_flops_per_device()
    flops_step = flops_per_token(config, seq_len) * global_batch * seq_len
    losses, evals = {}, {}
    pending, t_last, step, tracing = [], time.perf_counter(), start, False
    try:
        while step < max_steps:
            if profile and lead and step == min(start + profile_steps[0], max_steps - 1):
                jax.profiler.start_trace(str(workdir / "profile"))
                tracing = True
            host = next(data)
            batch = global_batch_array(host, bsh, global_batch)
            state, metrics = step_fn(state, batch)
            step += 1
            pending.append((step, metrics))
            if ckpt.due(step) or len(pending) >= log_every or step == max_steps:
                _check_finite(pending, ckpt)  # stop on NaN/inf; never save such a state
            saved = ckpt.save(step, state, data.get_state())
            if tracing and (step == start + profile_steps[1] or step == max_steps):
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
                tracing = False
            if len(pending) >= log_every or step == max_steps:
                t_last = _log(pending, losses, writer, progress, t_last, flops_step, peak,
                              global_batch * seq_len, mesh.size)
                pending = []
            if eval_fn is not None and step % eval_every == 0:
                evals[step] = _evaluate(eval_fn, state["params"], eval_factory, bsh, global_batch)
                writer.write(step, evals[step], prefix="eval")
            if _any_process(preempt.is_set()):
                _check_finite(pending, ckpt)
                if not saved:
                    ckpt.save(step, state, data.get_state(), force=True)
                ckpt.wait()
                if lead:
                    print(f"lumos-jax train: {preempt.reason}; saved step {step} in {ckpt.directory}; "
                          "run the same command again to resume", flush=True)
                raise Preempted(preempt.exit_status)
        if pending:
            _log(pending, losses, writer, progress, t_last, flops_step, peak,
                 global_batch * seq_len, mesh.size)
        ckpt.wait()
        if step not in ckpt.manager.all_steps():
            ckpt.save(step, state, data.get_state(), force=True)
            ckpt.wait()
        if export_native:
            from lumos_jax.checkpoints.native import save_native

            save_native(state_lib.model_from_params(setup, state["params"]), workdir / "model",
                        tokenizer_dir=_tokenizer_dir(tokenizer_dir_for_export, init_from))
        if export_hf_dir:
            _export(setup, state["params"], export_hf_dir, _tokenizer_dir(tokenizer_dir_for_export, init_from))
    finally:
        if tracing:
            jax.profiler.stop_trace()
        preempt.uninstall()
        progress.close()
        writer.close()
        ckpt.close()
    return {"losses": losses, "eval": evals, "step": step, "state": state, "setup": setup}


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


def _log(pending, losses, writer, progress, t_last, flops_step, peak, tokens_step, n_devices):
    host = jax.device_get([m for _, m in pending])
    now = time.perf_counter()
    dt = (now - t_last) / len(pending)
    for (step, _), m in zip(pending, host):
        values = {k: float(v) for k, v in m.items()}
        values["step_time_s"] = dt
        values["tokens_per_s"] = tokens_step / dt
        if peak:
            values["mfu"] = flops_step / dt / (peak * n_devices)
        losses[step] = values["loss"]
        writer.write(step, values)
    progress.update(len(pending), {"loss": values["loss"], "lr": values["learning_rate"],
                                   "tok/s": values["tokens_per_s"]})
    return now


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


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _export(setup, params, directory, tokenizer_dir) -> None:
    from lumos_jax.checkpoints.hf import save_hf_model

    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        model = state_lib.model_from_params(setup, params)
        tok = tokenizer_dir if tokenizer_dir and Path(tokenizer_dir).is_dir() else None
        save_hf_model(model, directory, tokenizer_dir=tok)
