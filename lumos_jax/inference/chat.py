"""Chat prompts in the Lumos template, in either of the two formats (LUMOS_SPEC §4).

- "training": what our models are trained on: BOS, `<|user|>\\n{c}\\n`,
  `<|assistant|>\\n{c}</s>\\n` (`tokenization.concat_messages`), then `<|assistant|>\\n`.
- "reference": what the released Lumos checkpoints were prompted with: no BOS, turns
  `<|user|>\\n{c}\\n<|assistant|>\\n`, a previous answer followed by a blank line.
"""

from __future__ import annotations

from typing import Sequence

import gin

from lumos_jax.tokenization import ROLE_TAGS, concat_messages, reference_prompt_text

FORMATS = ("training", "reference")


@gin.configurable
def chat_format(name: str = "training") -> str:
    if name not in FORMATS:
        raise ValueError(f"chat_format.name={name!r}; expected one of {FORMATS}")
    return name


def chat_prompt_text(messages: Sequence[dict], eos_token: str, fmt: str = "training") -> str:
    """The prompt text for the next assistant turn (without BOS)."""
    if not messages:
        raise ValueError("messages: at least one message is required")
    if fmt == "training":
        return concat_messages(messages, eos_token) + ROLE_TAGS["assistant"]
    if fmt != "reference":
        raise ValueError(f"chat format {fmt!r}; expected one of {FORMATS}")
    return reference_prompt_text(messages)


def chat_prompt_ids(messages: Sequence[dict], tokenizer, fmt: str = "training") -> list[int]:
    text = chat_prompt_text(messages, tokenizer.eos_token, fmt)
    return tokenizer.encode(text, add_bos=fmt == "training" and tokenizer.chat_bos)  # as trained
