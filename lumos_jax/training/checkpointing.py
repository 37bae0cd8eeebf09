"""Orbax CheckpointManager for the whole train state plus the data iterator's position.

Each step directory holds `state` (params, optimizer, step, RNG; sharded arrays) and
`data` (the iterator's JSON state). Orbax writes into a temporary directory and renames
it when the save is complete, so a save killed midway is never seen as a checkpoint.
Saves are asynchronous: training continues while arrays are written.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from lumos_jax.training.paths import resolve_dir


class Checkpointer:
    def __init__(self, directory: str | Path, save_every: int, keep: int = 3, async_save: bool = True):
        self.directory = resolve_dir(directory)  # gs://... stays a URI (epath)
        options = ocp.CheckpointManagerOptions(save_interval_steps=max(1, save_every),
                                               max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"), item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: dict | None, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}))
        return self.manager.save(step, args=args, force=force)

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
        have = {_path_key(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(stored)}
        for path, leaf in jax.tree_util.tree_leaves_with_path(target):
            key = _path_key(path)
            if key in have and have[key] != tuple(leaf.shape):
                raise ValueError(f"{self.directory}/{step}: checkpoint array {key} has shape "
                                 f"{list(have[key])}, this run needs {list(leaf.shape)}; resume "
                                 "with the gin that wrote it or use a fresh workdir")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionFlag:
    """Set by SIGTERM (TPU/GPU-cluster preemption) or ctrl-C (SIGINT); the loop finishes the
    step, saves and exits cleanly (143 / 130). A second ctrl-C interrupts at once."""

    def __init__(self):
        self.event = threading.Event()
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
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


def _path_key(path) -> str:
    """'params.model.layers.0.mlp.up_proj.kernel' whether a level is a dict key or an index
    (stored metadata and the live target spell list levels differently)."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return ".".join(parts)
