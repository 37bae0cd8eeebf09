"""Stop strings: cut a turn right after the token that completes a stop string.

Stop strings are matched on decoded text, so they work whatever the tokenization (a
newline may be its own token or part of a larger one). Only the turn's new tokens are
searched, never the prompt.
"""

from __future__ import annotations

from typing import Sequence


def find_stop_string(tokenizer, generated: Sequence[int], stop_strings: Sequence[str],
                     already_checked: int = 0) -> tuple[int, str] | None:
    """(number of tokens to keep, the stop string) for the shortest prefix of `generated`
    whose text contains a stop string, or None. The first `already_checked` tokens are
    known not to complete one."""
    text = tokenizer.decode(list(generated))
    if not any(s in text for s in stop_strings):
        return None
    for n in range(max(1, already_checked + 1), len(generated) + 1):
        prefix = tokenizer.decode(list(generated[:n]))
        for s in stop_strings:
            if s in prefix:
                return n, s
    return None
