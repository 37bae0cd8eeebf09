"""Training metrics: model FLOPs and MFU, JSONL + TensorBoard logs, a lead-only progress bar.

MFU = achieved model FLOP/s over the devices' peak; model FLOPs per token are
6N (forward + backward of every weight) + 12 * layers * seq_len * (heads * head_dim)
(the attention scores and weighted sum, PaLM's accounting).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import gin
import jax

from lumos_jax.models.config import LlamaConfig

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


class MetricsWriter:
    """Appends one JSON line per record, and TensorBoard scalars when tensorboardX is
    installed; only the lead process writes."""

    def __init__(self, log_dir: str | Path | None, enabled: bool = True):
        self.enabled = enabled and log_dir is not None
        self._file = self._tb = None
        if not self.enabled:
            return
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(log_dir / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            print("lumos-jax train: tensorboardX not installed; metrics go to metrics.jsonl only")
        else:
            self._tb = SummaryWriter(str(log_dir / "tensorboard"))

    def write(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """tqdm bar with ETA on the lead process; silent elsewhere or when not a terminal."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            disable=None if not os.environ.get("LUMOS_PROGRESS") else False)

    def update(self, n: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
