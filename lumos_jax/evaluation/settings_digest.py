"""A digest of the settings that decide an evaluation's predictions, kept in its output folder.

`lumos-jax eval` resumes from the predictions already in its output folder. Predictions made
with other settings (another model, prompt style, protocol, dataset file, ...) must not be
reused silently, so the folder keeps `settings.json` and a run whose settings differ stops
with one line (`--overwrite` starts over, `--resume_anyway` keeps the old predictions).
How many examples run, where outputs go and how many episodes run at once change no
prediction, so they are left out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lumos_jax.atomic import write_atomic
from lumos_jax.config import gin_bindings

SETTINGS_FILE = "settings.json"
PREDICTION_FILES = ("predictions.jsonl",)

# eval_experiment parameters that change no individual prediction
NEUTRAL = {"name", "output_dir", "limit", "start", "batch_size", "concurrency", "paper_score", "paper_note"}


def current_settings() -> dict[str, str]:
    """Every gin binding now in force, as `configurable.param -> repr(value)`, minus NEUTRAL."""
    settings = {key: repr(value) for key, name, param, value in gin_bindings()
                if not (name == "eval_experiment" and param in NEUTRAL)}
    return dict(sorted(settings.items()))


def digest(settings: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_output_dir(output_dir: str | Path, settings: dict[str, str], overwrite: bool = False,
                     resume_anyway: bool = False) -> None:
    """Refuse (ValueError, one line) to resume predictions made with other settings; then
    record the settings. `overwrite` deletes the old predictions first."""
    out = Path(output_dir)
    predictions = [out / f for f in PREDICTION_FILES if (out / f).exists()]
    if overwrite:
        for p in predictions:
            p.unlink()
    elif predictions and not resume_anyway:
        old = _read(out / SETTINGS_FILE)
        if old is None:
            raise ValueError(f"{out}: holds predictions but no {SETTINGS_FILE} (made by an older run?): "
                             "--overwrite starts over, --resume_anyway keeps them")
        if old.get("digest") != digest(settings):
            before = old.get("settings", {})
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise ValueError(f"{out}: its predictions were made with other settings ({shown} changed): "
                             "--overwrite starts over, --resume_anyway keeps them")
    record = {"digest": digest(settings), "settings": settings}
    write_atomic(out / SETTINGS_FILE, json.dumps(record, indent=1) + "\n")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
