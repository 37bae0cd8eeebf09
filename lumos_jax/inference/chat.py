"""Chat prompts in the Lumos template, in either of the two formats (LUMOS_SPEC §4).

- "train": what our models are trained on: BOS, `<|user|>\\n{c}\\n`,
  `<|assistant|>\\n{c}</s>\\n` (`tokenization.concat_messages`), then `<|assistant|>\\n`.
- "reference": what the released Lumos checkpoints were prompted with: no BOS, turns
  `<|user|>\\n{c}\\n<|assistant|>\\n`, a previous answer followed by a blank line.

The names are the agent's prompt styles too (`tokenization.CHAT_FORMATS`); "training", this format's
first name, published in docs/inference.md, is still read, with a one-line warning.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import gin

from lumos_jax.tokenization import CHAT_FORMATS, ROLE_TAGS, concat_messages, reference_prompt_text

FORMATS = CHAT_FORMATS


def _format_name(name: str, where: str) -> str:
    if name == "training":
        warnings.warn(f"{where}='training' is deprecated; use 'train'", DeprecationWarning, stacklevel=3)
        return "train"
    if name not in FORMATS:
        raise ValueError(f"{where}={name!r}; expected one of {FORMATS}")
    return name


@gin.configurable
def chat_format(name: str = "train") -> str:
    return _format_name(name, "chat_format.name")


def chat_prompt_text(messages: Sequence[dict], eos_token: str, fmt: str = "train") -> str:
    """The prompt text for the next assistant turn (without BOS)."""
    if not messages:
        raise ValueError("messages: at least one message is required")
    fmt = _format_name(fmt, "chat format")
    if fmt == "train":
        return concat_messages(messages, eos_token) + ROLE_TAGS["assistant"]
    return reference_prompt_text(messages)


def chat_prompt_ids(messages: Sequence[dict], tokenizer, fmt: str = "train") -> list[int]:
    fmt = _format_name(fmt, "chat format")
    text = chat_prompt_text(messages, tokenizer.eos_token, fmt)
    return tokenizer.encode(text, add_bos=fmt == "train" and tokenizer.chat_bos)  # as trained
