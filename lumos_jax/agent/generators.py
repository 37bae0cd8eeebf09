"""The agent's generation seam: non-blocking generators over conversations, per session.

A request names a session (one conversation: an episode's planner or grounder) and carries
the whole conversation so far; a generator may keep that session's state (a KV cache) so
only the new turn is computed. Every generator is driven the same way: `submit(request)`
returns a handle at once, `poll(handles)` advances the model one step and returns the turns
that finished (so a runner resumes each episode the moment its own turn ends), and
`generate(requests)` is the blocking form built on the two. Implementations:
- `ScriptedGenerator`: replays annotation files; it checks every request's conversation
  against the annotation byte for byte (tests, dry runs);
- `ChatModelGenerator`: renders conversations to token ids in the `train` or `reference`
  style and drives a token backend (`backends.py`: the plain greedy generator, or the
  inference Engine with cache extension);
- `BatchedGenerator`: wraps any object with only a blocking `generate(requests)`.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from lumos_jax.jsonl import iter_jsonl
from lumos_jax.tokenization import ROLE_TAGS, concat_messages, reference_prompt_text


@dataclasses.dataclass
class GenRequest:
    session: str
    module: str                 # "plan", "ground" or "qa"
    messages: list[dict]        # the conversation so far; the last turn is the user's
    max_new_tokens: int | None = None   # this turn's cap (None: the generator's own)
    ignore_stop: bool = False   # no stop ids: exactly max_new_tokens tokens (benchmarks)
    # Text the assistant turn already starts with (the reference's WebShop "R1 = ",
    # webshop:145): put after the prompt, not part of the returned text.
    prefill: str = ""


@dataclasses.dataclass
class GenOutput:
    text: str
    tokens: list[int] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0      # length of the prompt this turn
    new_tokens: int = 0         # prompt tokens handed to the backend this turn (the extension)
    finish_reason: str = "stop"
    error: str | None = None
    seconds: float = 0.0        # wall time from submit to finish of this turn


class Generator(Protocol):
    def submit(self, request: GenRequest) -> Any: ...

    def poll(self, handles: Collection | None = None) -> list[tuple[Any, GenOutput]]: ...

    def generate(self, requests: Sequence[GenRequest]) -> list[GenOutput]: ...

    def release(self, session: str) -> None: ...


def error_output(e: BaseException) -> GenOutput:
    return GenOutput(text="", error=f"{type(e).__name__}: {e}", finish_reason="error")


class Polling:
    """submit/poll bookkeeping shared by every generator. Subclasses implement `_start(handle,
    request)` (queue the work) and `_advance()` (one step; finished turns go to `_finish`).
    Finished turns wait in `_done` until their own caller polls for them, so a blocking
    caller (a QA tool thread) and the runner can share one generator."""

    def __init__(self):
        self._done: dict[Any, GenOutput] = {}
        self._submitted: dict[Any, float] = {}
        self._handles = itertools.count()
        self._lock = threading.RLock()

    def submit(self, request: GenRequest) -> Any:
        with self._lock:
            h = next(self._handles)
            self._submitted[h] = time.perf_counter()
            try:
                self._start(h, request)
            except Exception as e:  # noqa: BLE001 - this request alone fails (e.g. too long)
                self._finish(h, error_output(e))
            return h

    def _finish(self, handle, out: GenOutput) -> None:
        out.seconds = time.perf_counter() - self._submitted.pop(handle, time.perf_counter())
        self._done[handle] = out

    def poll(self, handles: Collection | None = None) -> list[tuple[Any, GenOutput]]:
        with self._lock:
            wanted = self._done.keys() if handles is None else handles
            if not any(h in self._done for h in wanted):
                self._advance()
            keys = list(self._done) if handles is None else [h for h in handles if h in self._done]
            return [(h, self._done.pop(h)) for h in keys]

    @property
    def in_flight(self) -> int:
        return len(self._submitted)

    def generate(self, requests: Sequence[GenRequest]) -> list[GenOutput]:
        handles = [self.submit(r) for r in requests]
        got: dict[Any, GenOutput] = {}
        while len(got) < len(handles):
            got.update(self.poll([h for h in handles if h not in got]))
        return [got[h] for h in handles]

    def _start(self, handle, request: GenRequest) -> None:
        raise NotImplementedError

    def _advance(self) -> None:
        raise NotImplementedError


class BatchedGenerator(Polling):
    """A blocking `generate_batch(requests) -> outputs` as a polling generator: each poll
    answers everything queued in one call (what the runner did before streaming)."""

    def __init__(self, generate_batch: Callable[[list[GenRequest]], list[GenOutput]],
                 release: Callable[[str], None] | None = None):
        super().__init__()
        self._generate_batch, self._release = generate_batch, release
        self._queue: list[tuple[Any, GenRequest]] = []

    def _start(self, handle, request):
        self._queue.append((handle, request))

    def _advance(self):
        batch, self._queue = self._queue, []
        if not batch:
            return
        try:
            outs = list(self._generate_batch([r for _, r in batch]))
            if len(outs) != len(batch):
                raise RuntimeError(f"generator returned {len(outs)} outputs for {len(batch)} requests")
        except Exception as e:  # noqa: BLE001 - every request of the batch gets the error
            outs = [error_output(e) for _ in batch]
        for (h, _), out in zip(batch, outs):
            self._finish(h, out)

    def release(self, session: str) -> None:
        if self._release is not None:
            self._release(session)


def as_polling(gen) -> Generator:
    """`gen` itself when it polls, else wrapped in a BatchedGenerator."""
    if hasattr(gen, "submit") and hasattr(gen, "poll"):
        return gen
    return BatchedGenerator(gen.generate, getattr(gen, "release", None))


# -- Scripted model ---------------------------------------------------------------------------

class ScriptedGenerator(Polling):
    """Answers from annotation conversations, looked up by their first user turn.

    `mismatches` lists every request whose conversation differs from the annotation's
    (module, session, turn, expected, got); the scripted answer is still returned so a run
    goes on. `override(request, scripted_text) -> text` can rewrite answers (fuzzing).
    Each poll answers every request submitted before it."""

    def __init__(self, conversations: dict[str, list[list[dict]]],
                 override: Callable[[GenRequest, str], str] | None = None):
        super().__init__()
        self._by_first = {m: {c[0]["content"]: c for c in convs} for m, convs in conversations.items()}
        self.override = override
        self.mismatches: list[dict] = []
        self.calls = 0
        self._queue: list[tuple[Any, GenRequest]] = []

    @classmethod
    def from_files(cls, plan: str | Path, ground: str | Path, **kw) -> "ScriptedGenerator":
        return cls({"plan": _read_conversations(plan), "ground": _read_conversations(ground)}, **kw)

    def _start(self, handle, request):
        self._queue.append((handle, request))

    def _advance(self):
        batch, self._queue = self._queue, []
        for h, r in batch:
            self._finish(h, self.answer(r))

    def answer(self, r: GenRequest) -> GenOutput:
        self.calls += 1
        conv = self._by_first.get(r.module, {}).get(r.messages[0]["content"] if r.messages else None)
        if conv is None:
            self.mismatches.append({"module": r.module, "session": r.session, "turn": 0,
                                    "expected": None, "got": r.messages[:1]})
            return GenOutput(text="", error="no scripted conversation for this task")
        n = len(r.messages)
        for i, m in enumerate(r.messages):
            if i >= len(conv) or conv[i] != m:
                self.mismatches.append({"module": r.module, "session": r.session, "turn": i,
                                        "expected": conv[i] if i < len(conv) else None, "got": m})
                break
        text = conv[n]["content"] if n < len(conv) and conv[n]["role"] == "assistant" else ""
        if r.prefill and text.startswith(r.prefill):  # a model continues after the prefill
            text = text[len(r.prefill):]
        if self.override is not None:
            text = self.override(r, text)
        return GenOutput(text=text)

    def release(self, session: str) -> None:
        pass


def _read_conversations(path: str | Path) -> list[list[dict]]:
    convs = []
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict) or "messages" not in row:
            raise ValueError(f"{path}:{n}: expected a record with 'messages'")
        convs.append(row["messages"])
    return convs


# -- Rendering conversations to tokens ------------------------------------------------------

class TokenBackend(Protocol):
    """Token generation per session. `submit(session, ids, max_new_tokens, stop_ids)`
    returns a handle; `poll(handles)` advances one step and returns (handle, result) for
    finished ones, result = (new tokens, prompt tokens computed now) or (tokens, computed,
    error message) when that request alone failed. A backend with only the blocking
    `generate_tokens(batch, max_new_tokens, stop_ids)` is wrapped (`PollingTokens`)."""

    def submit(self, session: str, ids: list[int], max_new_tokens: int, stop_ids: Sequence[int]) -> Any: ...

    def poll(self, handles: Collection) -> list[tuple[Any, tuple]]: ...

    def release(self, session: str) -> None: ...


class PollingTokens:
    """A blocking `generate_tokens` backend behind submit/poll: each poll runs everything
    queued, one `generate_tokens` call per (max_new_tokens, stop ids) group."""

    def __init__(self, backend):
        self.backend = backend
        self._queue: list[tuple[Any, str, list[int], int, tuple]] = []
        self._done: dict[Any, tuple] = {}
        self._handles = itertools.count()
        self._lock = threading.RLock()

    def submit(self, session, ids, max_new_tokens, stop_ids):
        with self._lock:
            h = next(self._handles)
            self._queue.append((h, session, list(ids), int(max_new_tokens), tuple(stop_ids)))
            return h

    def poll(self, handles):
        with self._lock:
            if not any(h in self._done for h in handles):
                batch, self._queue = self._queue, []
                groups: dict[tuple, list] = {}
                for item in batch:
                    groups.setdefault(item[3:], []).append(item)
                for (max_new, stops), items in groups.items():
                    try:
                        results = self.backend.generate_tokens([(s, ids) for _, s, ids, _, _ in items],
                                                               max_new, list(stops))
                    except Exception as e:  # noqa: BLE001 - the group's requests fail, not the run
                        results = [([], 0, f"{type(e).__name__}: {e}")] * len(items)
                    for item, result in zip(items, results):
                        self._done[item[0]] = tuple(result)
            return [(h, self._done.pop(h)) for h in list(handles) if h in self._done]

    def release(self, session):
        self.backend.release(session)

    def __getattr__(self, name):  # counters of the wrapped backend (prefilled_tokens, ...)
        return getattr(self.backend, name)


@dataclasses.dataclass
class _Session:
    ids: list[int]
    n_messages: int             # messages covered by `ids` (the last assistant turn included)
    held: int = 0               # tokens the backend holds for this session (prompt + generated)
    generated: int = 0          # tokens the model generated in this session, all turns


class ChatModelGenerator(Polling):
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
        super().__init__()
        self.backend, self.tok, self.style, self.max_new_tokens = backend, tokenizer, style, max_new_tokens
        self.tokens = backend if hasattr(backend, "submit") and hasattr(backend, "poll") else PollingTokens(backend)
        self._inflight: dict[Any, tuple] = {}
        self._unencoded: list[tuple] = []     # (handle, request, prompt text) until the next poll
        self.incremental = style == "train" or not retokenize
        self._sessions: dict[str, _Session] = {}
        self.newline_id = tokenizer.encode("\n")[-1]
        # Reference style stops at the first newline: with a BPE vocabulary, at any token holding one;
        # and, as HF `generate` does with the checkpoint's eos_token_id (eval/utils.py:47-52), at EOS.
        self.stop_ids = [tokenizer.eos_id] if style == "train" else list(tokenizer.newline_ids) + [tokenizer.eos_id]
        self.supplied_tokens = 0    # prompt tokens handed over (new ones only), summed over turns
        # Per released session: (tokens of its final sequence, of which generated by the model).
        self.closed: list[tuple[int, int]] = []

    def _reference_text(self, r: GenRequest) -> str | None:
        """The whole prompt text when the reference style tokenizes it from scratch (a session's
        first turn, or every turn with `retokenize`): one string, as the reference tokenizes
        prompt + "R1 = " (webshop:145). None when the turn extends the session's tokens."""
        if self.style == "reference" and (r.session not in self._sessions or not self.incremental):
            return reference_prompt_text(r.messages) + r.prefill
        return None

    def _extended_ids(self, r: GenRequest) -> list[int]:
        """The prompt built from the session's held tokens plus the new turn's (train style,
        or reference style with retokenize=False after the first turn)."""
        s = self._sessions.get(r.session)
        if self.style == "train":
            if s is None:
                text = concat_messages(r.messages, self.tok.eos_token) + ROLE_TAGS["assistant"]
                ids = self.tok.encode(text, add_bos=self.tok.chat_bos)
            else:
                new = r.messages[s.n_messages:]
                text = "\n" + concat_messages(new, self.tok.eos_token) + ROLE_TAGS["assistant"]
                ids = s.ids + self.tok.encode(text)
        else:
            # The held tokens end with the newline stop: "\n" + "\n<|user|>..." is the "\n\n" join.
            ids = list(s.ids)
            if not ids or ids[-1] not in self.stop_ids:
                ids.append(self.newline_id)
            ids += self._encode_continuation("\n" + reference_prompt_text(r.messages[s.n_messages:]))
        return ids + self._encode_continuation(r.prefill) if r.prefill else ids

    def _encode_continuation(self, text: str) -> list[int]:
        """Tokens of text that continues a sequence: without SentencePiece's leading '▁'."""
        ids = self.tok.encode(text)
        if ids and self.tok.backend == "sentencepiece" and self.tok.id_to_piece(ids[0]) == "\u2581":
            ids = ids[1:]
        return ids

    def _start(self, handle, r: GenRequest) -> None:
        text = self._reference_text(r)
        if text is not None:
            # encoded with the others of this poll in one batched call (7B rollouts, c256:
            # one-by-one encoding was 8.5 of the host's 11.4 s)
            self._unencoded.append((handle, r, text))
            return
        self._submit_tokens(handle, r, self._extended_ids(r))

    def _submit_tokens(self, handle, r: GenRequest, prompt: list[int]) -> None:
        stops = () if r.ignore_stop else tuple(self.stop_ids)
        bh = self.tokens.submit(r.session, prompt, r.max_new_tokens or self.max_new_tokens, stops)
        self._inflight[bh] = (handle, r, prompt, stops)

    def _encode_queued(self) -> None:
        queued, self._unencoded = self._unencoded, []
        if not queued:
            return
        try:
            prompts = self.tok.encode_batch([text for _, _, text in queued])
        except Exception as e:  # noqa: BLE001 - these requests fail, the run goes on
            for handle, _, _ in queued:
                self._finish(handle, error_output(e))
            return
        for (handle, r, _), prompt in zip(queued, prompts):
            try:
                self._submit_tokens(handle, r, prompt)
            except Exception as e:  # noqa: BLE001 - this request alone fails
                self._finish(handle, error_output(e))

    def _advance(self) -> None:
        self._encode_queued()
        if not self._inflight:
            return
        try:
            finished = self.tokens.poll(list(self._inflight))
        except Exception as e:  # noqa: BLE001 - every request in flight fails, the run goes on
            for bh, (handle, r, _, _) in list(self._inflight.items()):
                self._sessions.pop(r.session, None)
                self._finish(handle, error_output(e))
            self._inflight.clear()
            return
        for bh, result in finished:
            handle, r, prompt, stops = self._inflight.pop(bh)
            self._finish(handle, self._output(r, prompt, stops, result))

    def _output(self, r: GenRequest, prompt: list[int], stops, result) -> GenOutput:
        tokens, computed = list(result[0]), result[1]
        if len(result) > 2 and result[2]:  # the backend failed this request only
            self._sessions.pop(r.session, None)
            return GenOutput(text="", error=str(result[2]), finish_reason="error")
        prev = self._sessions.get(r.session)
        self.supplied_tokens += len(prompt) - (prev.held if prev and self.incremental else 0)
        finish = "stop" if tokens and tokens[-1] in stops else "length"
        body = [t for t in tokens if t not in self.stop_ids]
        text = self.tok.decode(body)
        if self.style == "reference" and finish == "stop":  # a BPE stop token may hold text before "\n"
            text = self.tok.decode(tokens).split("\n", 1)[0]
        ids = prompt + tokens
        if self.style == "train" and finish == "length":
            ids.append(self.tok.eos_id)  # keep the training format; sent with the next turn
        self._sessions[r.session] = _Session(ids=ids, n_messages=len(r.messages) + 1,
                                             held=len(prompt) + len(tokens),
                                             generated=(prev.generated if prev else 0) + len(tokens))
        return GenOutput(text=text, tokens=tokens, prompt_tokens=len(prompt),
                         new_tokens=computed, finish_reason=finish)

    def release(self, session: str) -> None:
        s = self._sessions.pop(session, None)
        if s is not None:
            self.closed.append((s.held, s.generated))
        self.backend.release(session)

