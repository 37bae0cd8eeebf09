"""Training metrics: model FLOPs and MFU, JSONL + TensorBoard logs, a lead-only progress bar.

MFU = achieved model FLOP/s over the devices' peak; model FLOPs per token are
6N (forward + backward of every weight) + 12 * layers * seq_len * (heads * head_dim)
(the attention scores and weighted sum, PaLM's accounting).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import gin
import jax
from tqdm import tqdm

from lumos_jax.atomic import write_atomic
from lumos_jax.models.config import LlamaConfig
from lumos_jax.training.paths import copy_tree, is_remote, resolve_dir

logger = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device from the vendors' data sheets.
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
              "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
              "tpu v6": 918e12}


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    attn = 12 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 6.0 * config.num_params() + attn


@gin.configurable
def peak_flops_per_device(override: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device (gin `peak_flops_per_device.override` to set it); None
    when unknown (CPU), in which case MFU is not reported."""
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind.lower()
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops
    return None


def local_mirror_for(remote_dir) -> Path:
    """Where a remote log dir (gs://b/run/logs) is written locally before being copied up:
    $TMPDIR/lumos_jax_logs/gs/b/run/logs."""
    scheme, rest = str(remote_dir).split("://", 1)
    return Path(tempfile.gettempdir()) / "lumos_jax_logs" / scheme / rest.strip("/")


def _tensorboardx_writer():
    """tensorboardX's SummaryWriter, imported without torch when torch is not loaded yet: its
    writer imports torch only to accept torch tensors (~1 s of every `lumos-jax train` start);
    we log Python floats. Torch stays importable as usual once this returns."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows
    try:
        from tensorboardX import SummaryWriter  # only with tensorboard on
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends one JSON line per record, and TensorBoard scalars when tensorboardX is
    installed; only the lead process writes.

    Object stores can't append, so a remote log_dir (gs://...) is written to a local
    mirror (`mirror_dir`, default `local_mirror_for(log_dir)`) and the mirror's files are
    copied up through etils.epath every `sync_every_s` seconds and on close; a resumed run
    first copies an existing remote metrics.jsonl down, so the history is kept."""

    def __init__(self, log_dir, enabled: bool = True, mirror_dir: str | Path | None = None,
                 sync_every_s: float = 300.0, resume_step: int | None = None):
        self.enabled = enabled and log_dir is not None
        self._file = self._tb = None
        self._remote = None
        if not self.enabled:
            return
        if mirror_dir is None and is_remote(log_dir):
            mirror_dir = local_mirror_for(log_dir)
        if mirror_dir is not None:
            self._remote = resolve_dir(log_dir)
            self._sync_every, self._last_sync = sync_every_s, time.monotonic()
            log_dir = Path(mirror_dir)
        log_dir = Path(log_dir)
        self.local_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        if self._remote is not None and not (log_dir / "metrics.jsonl").exists():
            remote_file = self._remote / "metrics.jsonl"
            if remote_file.exists():
                (log_dir / "metrics.jsonl").write_bytes(remote_file.read_bytes())
        if resume_step is not None:
            drop_rows_after(log_dir / "metrics.jsonl", resume_step)
        self._file = open(log_dir / "metrics.jsonl", "a", encoding="utf-8")
        try:
            SummaryWriter = _tensorboardx_writer()
        except ImportError:
            logger.info("lumos-jax train: tensorboardX not installed; metrics go to metrics.jsonl only")
        else:
            self._tb = SummaryWriter(str(log_dir / "tensorboard"))

    def write(self, step: int, values: dict, prefix: str = "train") -> None:
        self.write_rows([(step, values)], prefix)

    def write_rows(self, rows: list[tuple[int, dict]], prefix: str = "train") -> None:
        """Several steps' records with one write and one flush (a log interval at a time)."""
        if not self.enabled or not rows:
            return
        now = time.time()
        self._file.write("".join(json.dumps({"step": step, "split": prefix, "time": now, **values}) + "\n"
                                 for step, values in rows))
        self._file.flush()
        if self._tb is not None:
            for step, values in rows:
                for k, v in values.items():
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if self._remote is not None and time.monotonic() - self._last_sync >= self._sync_every:
            self.sync()

    def sync(self) -> None:
        """Copy the local mirror's files to the remote log dir (no-op for a local log dir)."""
        if self._remote is None:
            return
        if self._tb is not None:
            self._tb.flush()
        copy_tree(self.local_dir, self._remote)
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self.enabled:
            self.sync()


def drop_rows_after(path: Path, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint: drop their old rows (no duplicates)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) != len(lines):
        write_atomic(path, "".join(kept))


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")  # a torn last line (the run was killed mid-write)


class Progress:
    """tqdm bar with ETA on the lead process; silent elsewhere or when not a terminal."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            disable=None if not os.environ.get("LUMOS_PROGRESS") else False)

    def update(self, n: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
