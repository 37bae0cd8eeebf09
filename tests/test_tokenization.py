"""Tokenizers load exactly (ids equal SentencePiece's) and the chat encoding equals the
reference's own output (fixtures/chat_encoding/expected.jsonl)."""

import json

import pytest
import sentencepiece as spm

from conftest import DATA, FIXTURES
from lumos_jax.tokenization import IGNORE_INDEX, Tokenizer, encode_conversation, read_jsonl

TEXTS = [
    "Hello world",
    "I believe the meaning of life is",
    " leading space",
    "  two leading spaces",
    "repeated    spaces   inside",
    "trailing space ",
    "new\nlines\n\nand\ttabs",
    "R1 = Calculator(2 - 0.5); R2 = Calculator(R1 / 0.25)",
    "naïve café — ünïcödé ✓ 日本語",
    "Subgoal 1: Calculate how much the soda costs in total.",
]


@pytest.mark.parametrize("name", ["llama2-tokenizer", "stories260k"])
@pytest.mark.parametrize("backend", ["sentencepiece", "hf"])
def test_ids_equal_sentencepiece(name, backend):
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURES / name / "tokenizer.model"))
    tok = Tokenizer(FIXTURES / name, backend=backend)
    for text in TEXTS:
        assert tok.encode(text, add_bos=True) == [sp.bos_id()] + sp.encode(text), text
        assert tok.encode(text) == sp.encode(text), text


def test_known_ids():
    tok = Tokenizer(FIXTURES / "llama2-tokenizer")
    assert tok.encode("Hello world", add_bos=True) == [1, 15043, 3186]
    assert tok.encode(" leading space", add_bos=True) == [1, 29871, 8236, 2913]
    assert tok.encode("I believe the meaning of life is", add_bos=True) == [
        1, 306, 4658, 278, 6593, 310, 2834, 338]


def test_pad_token_is_32000(llama2_tokenizer):
    assert llama2_tokenizer.pad_id == 32000
    assert llama2_tokenizer.vocab_size == 32001
    assert llama2_tokenizer.encode("a<pad>b") == llama2_tokenizer.encode("a") + [32000] + \
        llama2_tokenizer.encode("b")
    assert Tokenizer(FIXTURES / "llama2-tokenizer").pad_id is None


def test_tokenizer_model_file_path_loads():
    tok = Tokenizer(FIXTURES / "llama2-tokenizer" / "tokenizer.model", add_pad_token=True)
    assert tok.encode("Hello world", add_bos=True) == [1, 15043, 3186] and tok.pad_id == 32000


def _expected_rows():
    return [json.loads(line) for line in open(FIXTURES / "chat_encoding" / "expected.jsonl")]


@pytest.mark.parametrize("backend", ["sentencepiece", "hf"])
def test_chat_encoding_equals_reference(backend):
    tok = Tokenizer(FIXTURES / "llama2-tokenizer", add_pad_token=True, backend=backend)
    rows = _expected_rows()
    assert len(rows) == 52
    files = {}
    for row in rows:
        if row["file"] not in files:
            files[row["file"]] = {r["id"]: r for r in read_jsonl(DATA / "lumos" / "annotations" / row["file"])}
        messages = files[row["file"]][row["id"]]["messages"]
        ids, labels = encode_conversation(messages, tok, max_len=1024)
        assert ids.tolist() == row["input_ids"], (row["file"], row["id"])
        assert labels.tolist() == row["labels"], (row["file"], row["id"])


def test_chat_encoding_truncates_and_masks(llama2_tokenizer):
    messages = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]
    ids, labels = encode_conversation(messages, llama2_tokenizer, max_len=20)
    assert len(ids) == 20 and (labels == IGNORE_INDEX).all()


def test_chat_encoding_rejects_unknown_role(llama2_tokenizer):
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        encode_conversation([{"role": "robot", "content": "x"}], llama2_tokenizer)
