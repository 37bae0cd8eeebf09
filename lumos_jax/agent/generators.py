"""The agent's generation seam: a batched `Generator` over conversations, per session.

A request names a session (one conversation: an episode's planner or grounder) and carries
the whole conversation so far; a generator may keep that session's state (a KV cache) so
only the new turn is computed. Implementations:
- `ScriptedGenerator`: replays annotation files; it checks every request's conversation
  against the annotation byte for byte (tests, dry runs);
- `ChatModelGenerator`: renders conversations to token ids in the `train` or `reference`
  style and calls a token backend (`backends.py`: the plain greedy generator, or the
  inference Engine with cache extension).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Protocol, Sequence

from lumos_jax.tokenization import ROLE_TAGS, concat_messages, reference_prompt_text


@dataclasses.dataclass
class GenRequest:
    session: str
    module: str                 # "plan", "ground" or "qa"
    messages: list[dict]        # the conversation so far; the last turn is the user's


@dataclasses.dataclass
class GenOutput:
    text: str
    tokens: list[int] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0      # length of the prompt this turn
    new_tokens: int = 0         # prompt tokens handed to the backend this turn (the extension)
    finish_reason: str = "stop"
    error: str | None = None
    seconds: float = 0.0        # wall time of the batched call that produced it


class Generator(Protocol):
    def generate(self, requests: Sequence[GenRequest]) -> list[GenOutput]: ...

    def release(self, session: str) -> None: ...


# -- Scripted model ---------------------------------------------------------------------------

class ScriptedGenerator:
    """Answers from annotation conversations, looked up by their first user turn.

    `mismatches` lists every request whose conversation differs from the annotation's
    (module, session, turn, expected, got); the scripted answer is still returned so a run
    goes on. `override(request, scripted_text) -> text` can rewrite answers (fuzzing)."""

    def __init__(self, conversations: dict[str, list[list[dict]]],
                 override: Callable[[GenRequest, str], str] | None = None):
        self._by_first = {m: {c[0]["content"]: c for c in convs} for m, convs in conversations.items()}
        self.override = override
        self.mismatches: list[dict] = []
        self.calls = 0

    @classmethod
    def from_files(cls, plan: str | Path, ground: str | Path, **kw) -> "ScriptedGenerator":
        return cls({"plan": _read_conversations(plan), "ground": _read_conversations(ground)}, **kw)

    def generate(self, requests: Sequence[GenRequest]) -> list[GenOutput]:
        out = []
        for r in requests:
            self.calls += 1
            conv = self._by_first.get(r.module, {}).get(r.messages[0]["content"] if r.messages else None)
            if conv is None:
                self.mismatches.append({"module": r.module, "session": r.session, "turn": 0,
                                        "expected": None, "got": r.messages[:1]})
                out.append(GenOutput(text="", error="no scripted conversation for this task"))
                continue
            n = len(r.messages)
            for i, m in enumerate(r.messages):
                if i >= len(conv) or conv[i] != m:
                    self.mismatches.append({"module": r.module, "session": r.session, "turn": i,
                                            "expected": conv[i] if i < len(conv) else None, "got": m})
                    break
            text = conv[n]["content"] if n < len(conv) and conv[n]["role"] == "assistant" else ""
            if self.override is not None:
                text = self.override(r, text)
            out.append(GenOutput(text=text))
        return out

    def release(self, session: str) -> None:
        pass


def _read_conversations(path: str | Path) -> list[list[dict]]:
    convs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    convs.append(json.loads(line)["messages"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{n}: expected a record with 'messages'") from None
    return convs


# -- Rendering conversations to tokens ------------------------------------------------------

class TokenBackend(Protocol):
    def generate_tokens(self, batch: Sequence[tuple[str, list[int]]], max_new_tokens: int,
                        stop_ids: Sequence[int]) -> list[tuple[list[int], int]]:
        """For each (session, full prompt ids): (new tokens, prompt tokens computed now), or
        (tokens, computed, error message) when that request alone failed."""

    def release(self, session: str) -> None: ...


@dataclasses.dataclass
class _Session:
    ids: list[int]
    n_messages: int             # messages covered by `ids` (the last assistant turn included)
    held: int = 0               # tokens the backend holds for this session (prompt + generated)
    generated: int = 0          # tokens the model generated in this session, all turns


class ChatModelGenerator:
    """Conversations -> token ids in one of two styles, then a token backend.

    train: BOS + `<|user|>\\n{u}\\n<|assistant|>\\n`; the model's answer ends with EOS; the
      next turn appends `\\n<|user|>\\n{u}\\n<|assistant|>\\n` after that EOS — exactly the
      token sequence `encode_conversation` trains on, built incrementally (no re-tokenizing).
    reference: no BOS; turns joined `{answer.strip()}\\n\\n<|user|>\\n...`; generation stops at
      the first newline; the whole text is tokenized as the reference does (the backend then
      reuses the cached prefix that still matches).
    """

    def __init__(self, backend: TokenBackend, tokenizer, style: str = "train", max_new_tokens: int = 512,
                 retokenize: bool = True):
        """`retokenize=False` (reference style only) builds later turns from the model's own
        tokens plus the new turn's, like `train` does: the same text, no cache restarts, but
        not the reference's exact tokenization."""
        if style not in ("train", "reference"):
            raise ValueError(f"prompt style {style!r}: expected 'train' or 'reference'")
        self.backend, self.tok, self.style, self.max_new_tokens = backend, tokenizer, style, max_new_tokens
        self.incremental = style == "train" or not retokenize
        self._sessions: dict[str, _Session] = {}
        self.newline_id = tokenizer.encode("\n")[-1]
        self.stop_ids = [tokenizer.eos_id] if style == "train" else [self.newline_id]
        self.supplied_tokens = 0    # prompt tokens handed over (new ones only), summed over turns
        # Per released session: (tokens of its final sequence, of which generated by the model).
        self.closed: list[tuple[int, int]] = []

    def _prompt_ids(self, r: GenRequest) -> list[int]:
        s = self._sessions.get(r.session)
        if self.style == "train":
            if s is None:
                text = concat_messages(r.messages, self.tok.eos_token) + ROLE_TAGS["assistant"]
                return self.tok.encode(text, add_bos=True)
            new = r.messages[s.n_messages:]
            text = "\n" + concat_messages(new, self.tok.eos_token) + ROLE_TAGS["assistant"]
            return s.ids + self.tok.encode(text)
        if s is None or not self.incremental:
            return self.tok.encode(reference_prompt_text(r.messages))
        # The held tokens end with the newline stop: "\n" + "\n<|user|>..." is the "\n\n" join.
        ids = list(s.ids)
        if not ids or ids[-1] != self.newline_id:
            ids.append(self.newline_id)
        new = r.messages[s.n_messages:]
        return ids + self._encode_continuation("\n" + reference_prompt_text(new))

    def _encode_continuation(self, text: str) -> list[int]:
        """Tokens of text that continues a sequence: without SentencePiece's leading '▁'."""
        ids = self.tok.encode(text)
        if ids and self.tok.backend == "sentencepiece" and self.tok.id_to_piece(ids[0]) == "\u2581":
            ids = ids[1:]
        return ids

    def generate(self, requests: Sequence[GenRequest]) -> list[GenOutput]:
        if not requests:
            return []
        prompts = [self._prompt_ids(r) for r in requests]
        results = self.backend.generate_tokens([(r.session, p) for r, p in zip(requests, prompts)],
                                               self.max_new_tokens, self.stop_ids)
        outs = []
        for r, prompt, result in zip(requests, prompts, results):
            tokens, computed = result[0], result[1]
            if len(result) > 2 and result[2]:  # the backend failed this request only
                self._sessions.pop(r.session, None)
                outs.append(GenOutput(text="", error=str(result[2]), finish_reason="error"))
                continue
            prev = self._sessions.get(r.session)
            self.supplied_tokens += len(prompt) - (prev.held if prev and self.incremental else 0)
            finish = "stop" if tokens and tokens[-1] in self.stop_ids else "length"
            body = [t for t in tokens if t not in self.stop_ids]
            text = self.tok.decode(body)
            ids = prompt + tokens
            if self.style == "train" and finish == "length":
                ids.append(self.tok.eos_id)  # keep the training format; sent with the next turn
            self._sessions[r.session] = _Session(ids=ids, n_messages=len(r.messages) + 1,
                                                 held=len(prompt) + len(tokens),
                                                 generated=(prev.generated if prev else 0) + len(tokens))
            outs.append(GenOutput(text=text, tokens=tokens, prompt_tokens=len(prompt), new_tokens=computed,
                                  finish_reason=finish))
        return outs

    def release(self, session: str) -> None:
        s = self._sessions.pop(session, None)
        if s is not None:
            self.closed.append((s.held, s.generated))
        self.backend.release(session)

