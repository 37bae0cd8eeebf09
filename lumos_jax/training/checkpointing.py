"""Orbax CheckpointManager for the whole train state plus the data iterator's position.

Each step directory holds `state` (params, optimizer, step, RNG; sharded arrays) and
`data` (the iterator's JSON state). Orbax writes into a temporary directory and renames
it when the save is complete, so a save killed midway is never seen as a checkpoint.
Saves are asynchronous: training continues while arrays are written.

Integrity: orbax checksums only its index, not the array bytes, so once a save has
finished we seal it with `lumos_digest.json` (sha256 and size of every file of the step,
written atomically). `restore_latest` verifies a step against its digest before reading
it and falls back to the newest intact step, moving a damaged one aside as
`damaged-STEP` with one line naming it; with no intact step it refuses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lumos_jax.atomic import write_atomic
from lumos_jax.training.paths import resolve_dir

logger = logging.getLogger(__name__)

DIGEST_FILE = "lumos_digest.json"


class DamagedCheckpoint(ValueError):
    """A step whose files do not match their digest (or that has none)."""


class Checkpointer:
    def __init__(self, directory: str | Path, save_every: int, keep: int = 3, async_save: bool = True):
        self.directory = resolve_dir(directory)  # gs://... stays a URI (epath)
        options = ocp.CheckpointManagerOptions(save_interval_steps=max(1, save_every),
                                               max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"), item_handlers=handlers)
        self._unsealed: list[int] = []
        self._sealer: threading.Thread | None = None
        self._lead = jax.process_index() == 0

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` without force would write a checkpoint."""
        return self.manager.should_save(step)

    def save(self, step: int, state: dict, data_state: dict | None, force: bool = False) -> bool:
        """Called every step: seals a finished save in the background as soon as orbax has
        committed it (so a killed run loses at most the save in flight), then saves if due."""
        self._seal_in_background()
        if not (force or self.due(step)):
            return False
        self.wait()  # orbax waits for the previous save anyway; seal it first
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}))
        saved = self.manager.save(step, args=args, force=force)
        if saved:
            self._unsealed.append(step)
        return saved

    # -- integrity --------------------------------------------------------------------
    def _seal_in_background(self) -> None:
        """Hash committed steps off the training thread (a 7B state is tens of GB)."""
        if not self._unsealed or (self._sealer is not None and self._sealer.is_alive()):
            return
        if self.manager.is_saving_in_progress():
            return
        steps, self._unsealed = self._unsealed, []
        self._sealer = threading.Thread(target=self._seal_steps, args=(steps,), daemon=True,
                                        name="checkpoint-sealer")
        self._sealer.start()

    def _seal(self) -> None:
        """Write the digest of every finished, unsealed step (after orbax committed it)."""
        if self._sealer is not None:
            self._sealer.join()
            self._sealer = None
        steps, self._unsealed = self._unsealed, []
        self._seal_steps(steps)

    def _seal_steps(self, steps) -> None:
        if not self._lead:
            return
        for step in steps:
            step_dir = self.directory / str(step)
            try:
                digest = json.dumps({"step": step, "files": _digest(step_dir)}, indent=1, sort_keys=True)
                write_atomic(step_dir / DIGEST_FILE, digest)
            except FileNotFoundError:  # rotated away meanwhile (max_to_keep)
                continue

    def verify(self, step: int, legacy_ok: bool = False) -> None:
        """DamagedCheckpoint naming the first file that differs from the step's digest."""
        step_dir = self.directory / str(step)
        where = f"{self.directory}/{step}"
        manifest = step_dir / DIGEST_FILE
        if not manifest.exists():
            if legacy_ok:
                return
            raise DamagedCheckpoint(f"{where}: no {DIGEST_FILE} (the save did not finish)")
        try:
            expected = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise DamagedCheckpoint(f"{where}: {DIGEST_FILE} is unreadable ({e})") from None
        found = _digest(step_dir)
        for name in sorted(set(expected) | set(found)):
            if name not in found:
                raise DamagedCheckpoint(f"{where}: file {name} is missing")
            if name not in expected:
                raise DamagedCheckpoint(f"{where}: file {name} is not in the digest")
            if found[name] != expected[name]:
                size, want = found[name]["size"], expected[name]["size"]
                what = (f"{size} bytes, the digest says {want}" if size != want
                        else "its sha256 differs from the digest")
                raise DamagedCheckpoint(f"{where}: file {name}: {what}")

    def restore_latest(self, target: dict) -> tuple[int, dict, dict] | None:
        """(step, state, data state) of the newest intact step; None when there is none to
        restore. Damaged steps are moved aside (one line each); all damaged -> ValueError."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        legacy = not any((self.directory / str(s) / DIGEST_FILE).exists() for s in steps)
        if legacy and self._lead:
            logger.warning("lumos-jax train: warning: %s has no checkpoint digests (written by an older "
                           "version); restoring without verification", self.directory)
        problems = []
        for step in steps:
            try:
                self.verify(step, legacy_ok=legacy)
            except DamagedCheckpoint as e:
                problems.append(str(e))
                self._set_aside(step, str(e))
                continue
            state, data_state = self.restore(step, target)
            return step, state, data_state
        raise ValueError(f"no intact checkpoint in {self.directory} ({'; '.join(problems)}); "
                         "each was moved aside as damaged-STEP; use a fresh workdir to start afresh")

    def _set_aside(self, step: int, reason: str) -> None:
        """Rename a damaged step to damaged-STEP[-n] so orbax no longer lists it (and a
        later save of that step number can be written)."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"lumos_checkpoint_verify_{step}")
        if self._lead:
            aside = self.directory / f"damaged-{step}"
            if aside.exists():
                aside = self.directory / f"damaged-{step}-{int(time.time())}"
            (self.directory / str(step)).rename(aside)
            logger.warning("lumos-jax train: checkpoint step %d is damaged (%s); moved to %s, trying the "
                           "previous step", step, reason.split(": ", 1)[-1], aside.name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"lumos_checkpoint_aside_{step}")
        self.manager.reload()

    def restore(self, step: int, target: dict) -> tuple[dict, dict]:
        """(state placed on target's shardings, data iterator state)."""
        self._check_shapes(step, target)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], dict(restored["data"] or {})

    def _check_shapes(self, step: int, target: dict) -> None:
        """Compare stored array shapes with this run's before reading any data, so a workdir
        left by another model fails with one clear line (and no half-started async reads)."""
        stored = self.manager.item_metadata(step)["state"]
        if stored is None:
            return
        # keystr's simple form spells a dict key and a list index alike ('params.model.layers.0...'):
        # the stored metadata and the live target spell list levels differently
        def key_of(path):
            return jax.tree_util.keystr(path, simple=True, separator=".")

        have = {key_of(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(stored)}
        for path, leaf in jax.tree_util.tree_leaves_with_path(target):
            key = key_of(path)
            if key in have and have[key] != tuple(leaf.shape):
                raise ValueError(f"{self.directory}/{step}: checkpoint array {key} has shape "
                                 f"{list(have[key])}, this run needs {list(leaf.shape)}; resume "
                                 "with the gin that wrote it or use a fresh workdir")

    def preempted(self, step: int, flag: "PreemptionFlag") -> bool:
        """Whether to save and stop after `step`. Several processes: orbax's
        `reached_preemption` (JAX's preemption service takes SIGTERM on any host and agrees
        on one step for all, with no collective of ours per step); one process: our flag."""
        if jax.process_count() > 1:
            return self.manager.reached_preemption(step)
        return flag.is_set()

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._seal()

    def close(self) -> None:
        self.wait()
        self.manager.close()


class PreemptionFlag:
    """Set by SIGTERM (TPU/GPU-cluster preemption) or ctrl-C (SIGINT); the loop finishes the
    step, saves and exits cleanly (143 / 130). A second ctrl-C interrupts at once.
    Single process only: with several, JAX's preemption service owns SIGTERM (see
    `Checkpointer.preempted`), and a ctrl-C on one host could not stop the others at the
    same step, so no handler is installed."""

    def __init__(self):
        self.event = threading.Event()
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.event.is_set():
            raise KeyboardInterrupt
        self.signum = signum
        self.event.set()

    @property
    def exit_status(self) -> int:
        return 130 if self.signum == signal.SIGINT else 143

    @property
    def reason(self) -> str:
        return "interrupted (ctrl-C)" if self.signum == signal.SIGINT else "SIGTERM"

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def is_set(self) -> bool:
        return self.event.is_set()


def _digest(step_dir) -> dict:
    """{relative path: {"sha256", "size"}} for every file under a step directory."""
    out = {}
    root = str(step_dir).rstrip("/")
    for path in sorted(step_dir.rglob("*"), key=str):
        if path.is_dir() or path.name in (DIGEST_FILE, DIGEST_FILE + ".tmp"):
            continue
        h, size = hashlib.sha256(), 0
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                size += len(block)
        out[str(path)[len(root) + 1:]] = {"sha256": h.hexdigest(), "size": size}
    return out
