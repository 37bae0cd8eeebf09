"""Tokenizers loaded exactly, and the one Lumos chat encoder.

Two backends give the same ids on ordinary text:
- `sentencepiece` on a `tokenizer.model` — the reference trained with the slow
  (legacy) Llama tokenizer, which splits text at special-token strings such as
  `</s>` and encodes each piece with SentencePiece (so `</s>\\n` becomes `</s> ▁ \\n`);
- `PreTrainedTokenizerFast` on a `tokenizer.json` (transformers 5's AutoTokenizer
  rebuilds the pipeline and drops leading spaces; this class keeps the file's), e.g. a
  byte-level BPE vocabulary such as SmolLM2's.

This module is the single place that decides BOS/EOS: `encode(text)` never adds
them; callers ask for BOS explicitly (`chat_bos` says whether the tokenizer itself
would). `<pad>`: a tokenizer that has a pad token keeps it; one without gets `<pad>`
appended after its vocabulary, as the reference does for Llama-2.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Sequence

import gin
import numpy as np
import sentencepiece as spm


IGNORE_INDEX = -100
PAD_TOKEN = "<pad>"
# The two prompt formats (LUMOS_SPEC §4): "train" as encode_conversation lays turns out,
# "reference" as the released Lumos checkpoints were prompted (reference_prompt_text).
CHAT_FORMATS = ("train", "reference")


class Tokenizer:
    """encode/decode plus the special ids the rest of the library needs."""

    def __init__(self, path: str | Path, add_pad_token: bool = False, backend: str = "auto"):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer: {path} does not exist")
        model_file = path if path.is_file() else path / "tokenizer.model"
        json_file = None if path.is_file() else path / "tokenizer.json"
        if backend == "auto":
            backend = "sentencepiece" if model_file.exists() else "hf"
        self.backend = backend
        self.path = path
        if backend == "sentencepiece":
            if not model_file.exists():
                raise FileNotFoundError(f"tokenizer: no tokenizer.model in {path}")
            self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
            self.base_vocab_size = self._sp.get_piece_size()
            self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
            self.unk_id = self._sp.unk_id()
            self._specials = {self._sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id)}
            own_pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
            self.chat_bos = self.bos_id >= 0  # the slow Llama tokenizer's add_bos_token default
        elif backend == "hf":
            if json_file is None or not json_file.exists():
                raise FileNotFoundError(f"tokenizer: no tokenizer.json in {path}")
            # transformers takes seconds to import; only tokenizer.json folders need it
            from transformers import PreTrainedTokenizerFast

            self._hf = PreTrainedTokenizerFast.from_pretrained(str(path))
            self.base_vocab_size = len(self._hf)
            self.bos_id = self._hf.bos_token_id
            self.eos_id = self._hf.eos_token_id
            self.unk_id = self._hf.unk_token_id
            self._specials = {t: self._hf.convert_tokens_to_ids(t) for t in self._hf.all_special_tokens}
            own_pad = self._hf.pad_token_id
            # What the tokenizer's own post-processor does (open-instruct's encoding relies on it).
            self.chat_bos = self.bos_id is not None and \
                self._hf.encode("a", add_special_tokens=True)[:1] == [self.bos_id]
        else:
            raise ValueError(f"tokenizer backend {backend!r}: expected 'auto', 'sentencepiece' or 'hf'")
        self.pad_id, self._pad_added = None, False
        if add_pad_token and own_pad is not None:
            self.pad_id = own_pad  # e.g. SmolLM2's <|im_end|>: no new embedding row
        elif add_pad_token:
            # Like the reference: `<pad>` appended after the base vocabulary (id 32000 for Llama-2).
            self.pad_id, self._pad_added = self.base_vocab_size, True
            self._specials[PAD_TOKEN] = self.pad_id
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in
                                                   sorted(self._specials, key=len, reverse=True)) + ")")

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + (1 if self._pad_added else 0)

    @property
    def eos_token(self) -> str:
        return self.id_to_piece(self.eos_id)

    @functools.cached_property
    def newline_ids(self) -> tuple[int, ...]:
        """Every id whose text holds a newline: the reference's "stop at the first newline
        token". Llama-2 has one (`<0x0A>`); a byte-level BPE vocabulary has many (`Ċ`, `ĊĊ`,
        `.Ċ`, ...), any of which can end the first line."""
        ids = range(self.base_vocab_size)
        if self.backend == "sentencepiece":
            texts = [self._sp.id_to_piece(i) if self._sp.is_control(i) else self._sp.decode([i]) for i in ids]
        else:
            texts = self._hf.backend_tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
        return tuple(i for i, t in zip(ids, texts) if "\n" in t)

    def id_to_piece(self, i: int) -> str:
        if self._pad_added and i == self.pad_id:
            return PAD_TOKEN
        return self._sp.id_to_piece(i) if self.backend == "sentencepiece" else self._hf.convert_ids_to_tokens(i)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings (`</s>`, `<pad>`) become their ids."""
        if add_bos and (self.bos_id is None or self.bos_id < 0):
            raise ValueError(f"tokenizer {self.path}: has no BOS token to add")
        ids = [self.bos_id] if add_bos else []
        if self.backend == "hf":
            pieces = self._split_re.split(text) if self._pad_added else [text]
            for piece in pieces:
                if piece == PAD_TOKEN:
                    ids.append(self.pad_id)
                elif piece:
                    ids.extend(self._hf.encode(piece, add_special_tokens=False))
            return ids
        for piece_ids in self.encode_pieces([p for p in self.split_at_specials(text) if p]):
            ids.extend(piece_ids)
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """`[encode(t, add_bos) for t in texts]` in one tokenizer call (HF: the Rust tokenizer
        encodes the batch on all cores; sentencepiece: one batched call)."""
        if add_bos and (self.bos_id is None or self.bos_id < 0):
            raise ValueError(f"tokenizer {self.path}: has no BOS token to add")
        if self.backend == "hf":
            split = [self._split_re.split(t) if self._pad_added else [t] for t in texts]
            plain = [p for pieces in split for p in pieces if p and p != PAD_TOKEN]
            encoded = iter(e.ids for e in self._hf.backend_tokenizer.encode_batch(plain, add_special_tokens=False))
            pieces_ids = [[[self.pad_id] if p == PAD_TOKEN else next(encoded) for p in pieces if p]
                          for pieces in split]
        else:
            split = [[p for p in self.split_at_specials(t) if p] for t in texts]
            flat = iter(self.encode_pieces([p for pieces in split for p in pieces]))
            pieces_ids = [[next(flat) for _ in pieces] for pieces in split]
        head = [self.bos_id] if add_bos else []
        return [head + [i for ids in per_text for i in ids] for per_text in pieces_ids]

    def split_at_specials(self, text: str) -> list[str]:
        """`text` cut at special-token strings, each special its own piece (some pieces may be
        empty): the slow Llama tokenizer encodes every piece on its own."""
        return self._split_re.split(text)

    def special_spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of every special-token string in `text`, as `split_at_specials` cuts."""
        return [(m.start(), m.end()) for m in self._split_re.finditer(text)]

    def encode_pieces(self, pieces: Sequence[str]) -> list[list[int]]:
        """Ids of each non-empty piece encoded on its own: a special-token string gives its one
        id; other text is encoded (sentencepiece: all pieces in one batched call)."""
        plain = [p for p in pieces if p not in self._specials]
        if self.backend == "sentencepiece":
            encoded = iter(self._sp.encode(plain))
        else:
            encoded = iter(self._hf.encode(p, add_special_tokens=False) for p in plain)
        return [[self._specials[p]] if p in self._specials else next(encoded) for p in pieces]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids if not (skip_special and int(i) in self._special_ids)]
        ids = [i for i in ids if i < self.base_vocab_size]
        if self.backend == "sentencepiece":
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=skip_special)

    def special_id(self, token: str) -> int | None:
        """The id of a special-token string (`</s>`, `<|im_end|>`, `<pad>`), None if it is not one."""
        return self._specials.get(token)

    @property
    def chat_template(self) -> str | None:
        """The tokenizer.json folder's own chat template (a base model's), None without one."""
        return getattr(self._hf, "chat_template", None) if self.backend == "hf" else None

    def apply_chat_template(self, messages: Sequence[dict]) -> str:
        """`messages` in the folder's own chat template, ready for the assistant's turn (text)."""
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.path}: has no chat template")
        return self._hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    @functools.cached_property
    def _special_ids(self) -> set[int]:
        return set(self._specials.values())


@gin.configurable
def load_tokenizer(path: str = gin.REQUIRED, add_pad_token: bool = True,
                   backend: str = "auto") -> Tokenizer:
    return Tokenizer(path, add_pad_token=add_pad_token, backend=backend)


# -- The Lumos chat encoding (LUMOS_SPEC §1) ---------------------------------------

ROLE_TAGS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}


def _role_and_content(i: int, m) -> tuple[str, str]:
    role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
    if not isinstance(m, dict):
        raise ValueError(f"message {i}: expected an object with 'role' and 'content'")
    if role not in ROLE_TAGS:
        raise ValueError(f"message {i}: unknown role {role!r} (expected system/user/assistant)")
    if not isinstance(content, str):
        raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
    return role, content


def concat_messages(messages: Sequence[dict], eos_token: str) -> str:
    """Role-tagged text of a conversation, exactly as the reference's training code builds it."""
    out = []
    for i, m in enumerate(messages):
        role, content = _role_and_content(i, m)
        if role == "system":
            out.append(ROLE_TAGS[role] + content + "\n")
        elif role == "user":
            out.append(ROLE_TAGS[role] + content.strip() + "\n")
        else:
            out.append(ROLE_TAGS[role] + content.strip() + eos_token + "\n")
    return "".join(out)


def reference_prompt_text(messages: Sequence[dict]) -> str:
    """The reference's *inference* prompt (LUMOS_SPEC §4), ending with the assistant header:
    no BOS, no EOS, each earlier answer followed by a blank line
    (`<|user|>\\n{u}\\n<|assistant|>\\n{answer}\\n\\n<|user|>\\n...`)."""
    out = []
    for i, m in enumerate(messages):
        role, content = _role_and_content(i, m)
        if role == "assistant":
            out.append(ROLE_TAGS[role] + content.strip() + "\n\n")
        else:
            out.append(ROLE_TAGS[role] + (content if role == "system" else content.strip()) + "\n")
    return "".join(out) + ROLE_TAGS["assistant"]


def encode_conversation(messages: Sequence[dict], tokenizer: Tokenizer,
                        max_len: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) for one conversation; labels are -100 outside assistant turns.

    Same rule as the reference (open-instruct's `encode_with_messages_format`): the
    whole text is stripped, tokenized as the tokenizer does by default (BOS first when it
    adds one: Llama yes, SmolLM2 no) and truncated to `max_len`; each non-assistant
    turn, and the `<|assistant|>\\n` header after it, is masked, its boundaries found by
    tokenizing the text up to that point (kept literal: the quirks at `</s>\\n` and at
    truncation come from exactly this rule).
    """
    input_ids, labels, _ = encode_conversation_with_length(messages, tokenizer, max_len)
    return input_ids, labels


def encode_conversation_with_length(messages: Sequence[dict], tokenizer: Tokenizer,
                                    max_len: int = 1024) -> tuple[np.ndarray, np.ndarray, int]:
    """`encode_conversation` plus the untruncated token count."""
    return encode_conversations([messages], tokenizer, max_len)[0]


def _mask_bounds(messages: Sequence[dict]) -> list[tuple[int, int, str]]:
    """(message, prefix message count, suffix) of each mask boundary: where a non-assistant
    turn starts (the prefix before it) and ends (with the assistant header after it)."""
    bounds = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        suffix = ROLE_TAGS["assistant"] if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant" else ""
        bounds += [(i, i, ""), (i, i + 1, suffix)]
    return bounds


def encode_conversations(conversations: Sequence[Sequence[dict]], tokenizer: Tokenizer,
                         max_len: int = 1024) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(input_ids, labels, untruncated length) of each conversation, by `encode_conversation`'s
    rule. Every whole text and every prefix whose length sets a mask boundary, of all the
    conversations, is tokenized in one batched call (the reference tokenizes them one by
    one: same ids; the HF tokenizer spreads the batch over all cores)."""
    eos = tokenizer.eos_token
    texts, plans = [], []
    for messages in conversations:
        if not messages:
            raise ValueError("conversation has no messages")
        for i, m in enumerate(messages):
            _role_and_content(i, m)
        bounds = _mask_bounds(messages)
        plans.append((messages, bounds, len(texts)))
        texts.append(concat_messages(messages, eos).strip())
        texts += [concat_messages(messages[:n], eos) + suffix for _, n, suffix in bounds if n > 0]
    encoded = tokenizer.encode_batch(texts, add_bos=tokenizer.chat_bos)
    out = []
    for messages, bounds, at in plans:
        full, prefix, j = encoded[at], {}, at + 1
        for _, n, suffix in bounds:                 # the texts were queued in this order
            prefix[(n, suffix)] = len(encoded[j]) if n > 0 else 0
            j += n > 0
        input_ids = np.asarray(full[:max_len], dtype=np.int32)
        labels = input_ids.copy()
        for i, n, suffix in bounds[1::2]:           # each turn's (end) boundary; its start is prefix[(i, "")]
            end = prefix[(n, suffix)]
            labels[prefix[(i, "")]:min(end, max_len)] = IGNORE_INDEX
            if end >= max_len:
                break
        out.append((input_ids, labels, len(full)))
    return out


