"""Files that ship inside the package, and the `bundled:` path prefix that names them.

A user installs the package and has no `../shared`, so every default a command reads lives
here. `bundled:stories260k` (on the command line or in a gin string) means this folder's
`stories260k`, wherever the package is installed; any other relative path is relative to the
current folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ASSETS_DIR = Path(__file__).resolve().parent
PREFIX = "bundled:"

# What `lumos-jax assets` lists: name -> one-line description.
CATALOGUE = {
    "stories260k": "tiny pretrained Llama (HF format) + its 512-piece tokenizer (llama2.c, MIT)",
    "demo_data/annotations": "the 12 sample Lumos annotation files (plan/ground x iterative/onetime)",
    "demo_data/gsm8k_train_500.jsonl": "first 500 GSM8K training problems",
    "demo_data/gsm8k_test_50.jsonl": "first 50 GSM8K test problems",
    "demo_data/converted": "the reference's converted few-shot plans (the LLM teacher's exemplars)",
    "demo_data/webshop_incontext_exemplars.jsonl": "the reference's two WebShop exemplars",
    "demo_data/mind2web_sample.jsonl": "20 Mind2Web train-split tasks with candidate elements",
}


def bundled(name: str) -> Path:
    """The absolute path of a bundled asset (`name` relative to lumos_jax/assets)."""
    return ASSETS_DIR / name


def expand(value: Any) -> Any:
    """`bundled:X` strings (also inside lists, tuples and dicts) -> absolute paths; the rest unchanged."""
    if isinstance(value, str):
        return str(bundled(value[len(PREFIX):])) if value.startswith(PREFIX) else value
    if isinstance(value, list):
        return [expand(v) for v in value]
    if isinstance(value, tuple):
        return tuple(expand(v) for v in value)
    if isinstance(value, dict):
        return {k: expand(v) for k, v in value.items()}
    return value


def expand_arg(arg: str) -> str:
    """One command-line argument: `bundled:X` or `--flag=bundled:X`."""
    flag, eq, value = arg.partition("=")
    if eq and flag.startswith("-"):
        return f"{flag}={expand(value)}"
    return expand(arg)


def main(argv) -> int:
    """`lumos-jax assets [NAME]`: list the bundled files, or print one's absolute path."""
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: lumos-jax assets [NAME]   (lists bundled files; with NAME prints its path)")
        return 0
    if argv:
        path = bundled(argv[0][len(PREFIX):] if argv[0].startswith(PREFIX) else argv[0])
        if not path.exists():
            raise FileNotFoundError(f"{PREFIX}{argv[0]}: not bundled (`lumos-jax assets` lists what is)")
        print(path)
        return 0
    for name, what in CATALOGUE.items():
        print(f"{PREFIX}{name:<45} {what}")
    print(f"(in {ASSETS_DIR}; provenance and licenses: {ASSETS_DIR / 'README.md'})")
    return 0
