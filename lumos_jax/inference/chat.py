"""Chat prompts in the Lumos template, in either of the two formats (LUMOS_SPEC §4).

- "training": what our models are trained on: BOS, `<|user|>\\n{c}\\n`,
  `<|assistant|>\\n{c}</s>\\n` (`tokenization.concat_messages`), then `<|assistant|>\\n`.
- "reference": what the released Lumos checkpoints were prompted with: no BOS, turns
  `<|user|>\\n{c}\\n<|assistant|>\\n`, a previous answer followed by a blank line.
"""

from __future__ import annotations

from typing import Sequence

import gin

from lumos_jax.tokenization import ROLE_TAGS, concat_messages

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
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: expected an object with 'role' and 'content'")
    if fmt == "training":
        return concat_messages(messages, eos_token) + ROLE_TAGS["assistant"]
    if fmt != "reference":
        raise ValueError(f"chat format {fmt!r}; expected one of {FORMATS}")
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLE_TAGS:
            raise ValueError(f"messages[{i}]: unknown role {role!r} (expected system/user/assistant)")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]: content must be a string")
        if role == "assistant":
            out.append(ROLE_TAGS[role] + content + "\n\n")
        else:
            out.append(ROLE_TAGS[role] + content + "\n")
    return "".join(out) + ROLE_TAGS["assistant"]


def chat_prompt_ids(messages: Sequence[dict], tokenizer, fmt: str = "training") -> list[int]:
    text = chat_prompt_text(messages, tokenizer.eos_token, fmt)
    return tokenizer.encode(text, add_bos=(fmt == "training"))
