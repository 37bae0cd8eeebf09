"""Chat encoding: the fast encoder equals the reference rule, and the mask is right."""

import random

import pytest
from conftest import DATA, FIXTURES

from lumos_jax.data.encoding import encode_fast
from lumos_jax.jsonl import read_jsonl
from lumos_jax.tokenization import Tokenizer, concat_messages, encode_conversation

ANNOTATIONS = DATA / "lumos" / "annotations"


def _annotations():
    return [(p.name, r) for p in sorted(ANNOTATIONS.glob("*.jsonl")) for r in read_jsonl(p)]


def test_fast_encoder_reproduces_reference_fixture(llama2_tokenizer):
    by_key = {(name, r["id"]): r["messages"] for name, r in _annotations()}
    rows = read_jsonl(FIXTURES / "chat_encoding" / "expected.jsonl")
    assert len(rows) == 52
    for row in rows:
        enc = encode_fast(by_key[(row["file"], row["id"])], llama2_tokenizer, 1024)
        assert enc.input_ids.tolist() == row["input_ids"], row["id"]
        assert enc.labels.tolist() == row["labels"], row["id"]


@pytest.mark.parametrize("max_len", [17, 64, 301, 1024])
def test_fast_encoder_equals_reference_function_on_annotations(llama2_tokenizer, max_len):
    for name, r in _annotations():
        ids, labels = encode_conversation(r["messages"], llama2_tokenizer, max_len)
        enc = encode_fast(r["messages"], llama2_tokenizer, max_len)
        assert enc.input_ids.tolist() == ids.tolist() and enc.labels.tolist() == labels.tolist(), (name, r["id"])
        text = concat_messages(r["messages"], llama2_tokenizer.eos_token).strip()
        assert enc.full_length == len(llama2_tokenizer.encode(text, add_bos=True))


def _random_conversation(rng):
    words = ["R1 = Calculator(2 - 0.5)", "Subgoal 1:", "</s>", "<s>", " leading", "trailing ", "\n", "é 日本",
             "  ", "<|user|>", "<pad>", "x", "12.5", ";", "\n\n", "<unk>"]
    def text():
        return "".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + rng.choice(["a", "b c"])
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(["  sys", "sys\n", " "]) + text()})
    for _ in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": text()})
        if rng.random() < 0.2:
            messages.append({"role": "user", "content": text()})
        messages.append({"role": "assistant", "content": text()})
    return messages


@pytest.mark.parametrize("tokenizer_dir", ["llama2", "stories"])
def test_fast_encoder_equals_reference_function_on_random_conversations(tokenizer_dir):
    from conftest import REPO
    path = FIXTURES / "llama2-tokenizer" if tokenizer_dir == "llama2" else REPO / "lumos_jax/assets/stories260k"
    tok = Tokenizer(path, add_pad_token=True)
    rng = random.Random(0)
    for _ in range(150):
        messages = _random_conversation(rng)
        max_len = rng.choice([8, 40, 100, 4096])
        ids, labels = encode_conversation(messages, tok, max_len)
        enc = encode_fast(messages, tok, max_len)
        assert enc.input_ids.tolist() == ids.tolist(), messages
        assert enc.labels.tolist() == labels.tolist(), messages


def test_unmasked_targets_decode_to_assistant_contents_plus_eos(llama2_tokenizer):
    """Each unmasked span reads `content</s>` (+ the newline after it, the reference's quirk:
    its boundary is where the next `<|user|>` prefix starts; the last turn has no newline)."""
    tok = llama2_tokenizer
    for name, r in _annotations():
        enc = encode_fast(r["messages"], tok, 1024)
        keep = enc.labels != -100
        spans, start = [], None
        for i, k in enumerate(list(keep) + [False]):
            if k and start is None:
                start = i
            if not k and start is not None:
                spans.append(enc.input_ids[start:i])
                start = None
        assistants = [m["content"].strip() for m in r["messages"] if m["role"] == "assistant"]
        assert len(spans) == len(assistants), (name, r["id"])
        for j, (span, content) in enumerate(zip(spans, assistants)):
            last = j == len(assistants) - 1
            body = span if last else span[:-2]
            assert body[-1] == tok.eos_id
            assert tok.decode(body[:-1]) == content
            if not last:  # `</s>` is followed by the pieces `▁` and `\n`
                assert [tok.id_to_piece(int(t)) for t in span[-2:]] == ["▁", "<0x0A>"]
