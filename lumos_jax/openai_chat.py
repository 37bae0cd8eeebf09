"""One OpenAI-compatible chat client for every caller (the QA tool, the data teacher).

The `openai` package speaks the protocol; the retry loop is ours, with the package's own
retries off, so that one backoff schedule covers what the package would not retry: a
malformed body, no choices, or an answer the caller cannot use (`accept`). Every failure
after the last attempt is one `ChatError` line naming the URL and the last cause.
"""

from __future__ import annotations

import json
import time
from typing import Callable

# statuses worth another attempt (rate limit, timeout, conflict, server side); others are final
RETRIED_STATUS = (408, 409, 429)


class ChatError(RuntimeError):
    """A chat request that failed for good (after all retries, or a status not retried)."""


class ChatClient:
    """`complete(messages) -> text` against `{base_url}/chat/completions`, with retries."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 5, backoff: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.max_retries, self.backoff, self.sleep = model, max_retries, backoff, sleep
        import openai  # ~1.5 s to import: only where a chat endpoint is used, not in every CLI start

        self._errors = openai.APIStatusError, openai.APIConnectionError
        # a local endpoint needs no key, but the package refuses to start without one
        self.client = openai.OpenAI(base_url=base_url.rstrip("/"), api_key=api_key or "no-key",
                                    timeout=timeout, max_retries=0)

    def complete(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 500,
                 accept: Callable[[str], bool] = bool) -> str:
        """The reply's text; `accept(text)` false (default: empty text) counts as a failed attempt."""
        last = "no attempt"
        status_error, connection_error = self._errors
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=temperature, max_tokens=max_tokens)
            except status_error as e:
                last = f"HTTP {e.status_code}"
                if e.status_code not in RETRIED_STATUS and e.status_code < 500:
                    raise ChatError(f"{self.url}: HTTP {e.status_code} (not retried)") from None
                continue
            except connection_error as e:  # timeouts included
                last = f"network error ({e})"
                continue
            except json.JSONDecodeError:
                last = "malformed response (not JSON)"
                continue
            message = getattr(reply.choices[0], "message", None) if reply.choices else None
            text = getattr(message, "content", None)
            if not isinstance(text, str):
                last = "malformed response (no message content)"
                continue
            if accept(text):
                return text
            last = "empty or unusable answer"
        raise ChatError(f"{self.url}: gave up after {self.max_retries + 1} attempts ({last})")
