"""Tokenizers load exactly (ids equal SentencePiece's) and the chat encoding equals the
reference's own output (fixtures/chat_encoding/expected.jsonl); with a byte-level BPE
tokenizer (SmolLM2's), the chat encoding, pad, stop ids and the agent's prompts equal what
the reference's code does with transformers' tokenizer."""

import json

import pytest
import sentencepiece as spm

from conftest import DATA, FIXTURES
from lumos_jax.jsonl import read_jsonl
from lumos_jax.tokenization import IGNORE_INDEX, Tokenizer, concat_messages, encode_conversation

ANN = DATA / "lumos" / "annotations"

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


def test_pieces_encode_as_sentencepiece_does_each_piece():
    """The public piece API the fast chat encoder uses: pieces cut at special-token strings,
    each encoded on its own by SentencePiece (the slow Llama tokenizer's rule)."""
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURES / "llama2-tokenizer" / "tokenizer.model"))
    tok = Tokenizer(FIXTURES / "llama2-tokenizer", add_pad_token=True)
    text = "User: hi</s>\nAssistant: a<pad> b</s></s>\n"
    pieces = tok.split_at_specials(text)
    assert "".join(pieces) == text and [p for p in pieces if p in ("</s>", "<pad>")] == ["</s>", "<pad>", "</s>", "</s>"]
    assert [text[s:e] for s, e in tok.special_spans(text)] == ["</s>", "<pad>", "</s>", "</s>"]
    want = [[sp.eos_id()] if p == "</s>" else [32000] if p == "<pad>" else sp.encode(p) for p in pieces if p]
    assert tok.encode_pieces([p for p in pieces if p]) == want
    assert tok.encode(text) == [i for ids in want for i in ids]


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


# -- A byte-level BPE tokenizer (SmolLM2's, rebuilt from its GGUF) ---------------------------
# The reference here is transformers' own tokenizer of the same GGUF, driven exactly as the
# reference's open-instruct code drives a tokenizer.

@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from smollm2 import gguf_path, transformers_reads_gguf_once
    from transformers import AutoTokenizer

    from lumos_jax.checkpoints.gguf import write_hf_sidecar

    path = gguf_path()
    out = tmp_path_factory.mktemp("smollm2_tok")
    write_hf_sidecar(path, out)
    with transformers_reads_gguf_once():
        reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return Tokenizer(out, add_pad_token=True), reference


def _open_instruct_encode(messages, tok, max_len):
    """model/finetune.py `encode_with_messages_format` of the Lumos reference, line for line."""
    def concat(ms):
        text = ""
        for m in ms:
            end = tok.eos_token if m["role"] == "assistant" else ""
            text += f"<|{m['role']}|>\n" + m["content"].strip() + end + "\n"
        return text

    def length(text):
        return len(tok(text, max_length=max_len, truncation=True).input_ids)

    input_ids = tok(concat(messages).strip(), max_length=max_len, truncation=True).input_ids
    labels = list(input_ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        start = 0 if i == 0 else length(concat(messages[:i]))
        nxt = i < len(messages) - 1 and messages[i + 1]["role"] == "assistant"
        end = length(concat(messages[: i + 1]) + ("<|assistant|>\n" if nxt else ""))
        labels[start:end] = [IGNORE_INDEX] * len(labels[start:end])
        if end >= max_len:
            break
    return input_ids, labels


def test_bpe_chat_encoding_equals_open_instruct(bpe):
    from lumos_jax.data.encoding import encode_fast

    tok, hf = bpe
    assert not tok.chat_bos and hf("a").input_ids == hf.encode("a", add_special_tokens=False)  # no BOS
    n = 0
    for path in sorted(ANN.glob("*.jsonl")):
        for row in read_jsonl(path):
            for max_len in (1024, 60):
                want_ids, want_labels = _open_instruct_encode(row["messages"], hf, max_len)
                ids, labels = encode_conversation(row["messages"], tok, max_len=max_len)
                assert ids.tolist() == want_ids and labels.tolist() == want_labels, (path.name, row["id"])
                fast = encode_fast(row["messages"], tok, max_len=max_len)
                assert fast.input_ids.tolist() == want_ids and fast.labels.tolist() == want_labels
            n += 1
    assert n >= 40


@pytest.mark.parametrize("which", ["sentencepiece", "bpe"])
def test_conversations_encoded_in_one_batch_equal_the_reference(which, llama2_tokenizer, bpe):
    """The data loader's batched encoding (all of a chunk's conversations in one tokenizer
    call) gives each conversation the reference rule's ids and labels."""
    from lumos_jax.data.encoding import encode_many

    tok = llama2_tokenizer if which == "sentencepiece" else bpe[0]
    convs = [row["messages"] for path in sorted(ANN.glob("*.jsonl")) for row in read_jsonl(path)]
    for max_len in (1024, 60):
        got = encode_many(convs, tok, max_len)
        for messages, enc in zip(convs, got, strict=True):
            if which == "bpe":
                want_ids, want_labels = _open_instruct_encode(messages, bpe[1], max_len)
            else:
                want_ids, want_labels = (a.tolist() for a in encode_conversation(messages, tok, max_len))
            assert enc.input_ids.tolist() == want_ids and enc.labels.tolist() == want_labels
            text = concat_messages(messages, tok.eos_token).strip()
            assert enc.full_length == len(tok.encode(text, add_bos=tok.chat_bos))


def test_bpe_chat_template_and_special_ids_equal_transformers(bpe):
    """The tokenizer's own chat template and special ids, as transformers gives them."""
    ours, hf = bpe
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    assert ours.chat_template == hf.chat_template and ours.chat_template
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)
    assert ours.special_id("<|im_end|>") == hf.convert_tokens_to_ids("<|im_end|>")
    assert ours.special_id("plain text") is None
    with pytest.raises(ValueError, match="has no chat template"):
        Tokenizer(FIXTURES / "llama2-tokenizer").apply_chat_template(messages)


def test_bpe_pad_and_stop_ids(bpe):
    tok, hf = bpe
    assert (tok.pad_id, tok.vocab_size) == (hf.pad_token_id, len(hf)) == (2, 49152)  # reused, not added
    with_newline = {i for i in range(len(hf)) if "\n" in hf.decode([i])}
    assert set(tok.newline_ids) == with_newline and len(with_newline) > 100
    assert tok.encode("\n") == [hf.convert_tokens_to_ids("Ċ")]


def test_bpe_agent_prompts(bpe):
    """Train style: each turn's prompt is the prefix `encode_conversation` trains on. Reference
    style: the reference's inference string as transformers tokenizes it; the answer ends at
    the first newline even when the stop token carries more whitespace."""
    from lumos_jax.agent.generators import ChatModelGenerator, GenRequest
    from lumos_jax.tokenization import reference_prompt_text

    tok, hf = bpe

    class Teacher:
        def __init__(self, answers):
            self.answers = list(answers)

        def generate_tokens(self, batch, max_new_tokens, stop_ids):
            return [(self.answers.pop(0), len(ids)) for _, ids in batch]

        def release(self, session):
            pass

    row = next(r for r in read_jsonl(ANN / "lumos_maths_plan_iterative.jsonl"))
    msgs = row["messages"]
    ids, labels = encode_conversation(msgs, tok, max_len=100_000)
    ids = ids.tolist()
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    spans = [tok.encode(msgs[i]["content"].strip()) + [tok.eos_id] for i in turns]
    gen = ChatModelGenerator(Teacher(spans), tok, style="train")
    for k, i in enumerate(turns):
        out = gen.generate([GenRequest("s", "plan", msgs[:i])])[0]
        assert out.text == msgs[i]["content"].strip()
        assert gen._sessions["s"].ids[: out.prompt_tokens] == ids[: out.prompt_tokens], k
    assert gen._sessions["s"].ids == ids

    first = msgs[:1]
    prompt = hf.encode(reference_prompt_text(first), add_special_tokens=False)
    answer = tok.encode("Subgoal 1: Add 2 and 3.") + [hf.convert_tokens_to_ids("ĊĠĠĠ")]
    gen = ChatModelGenerator(Teacher([answer]), tok, style="reference")
    out = gen.generate([GenRequest("r", "plan", first)])[0]
    assert (out.text, out.finish_reason, out.prompt_tokens) == ("Subgoal 1: Add 2 and 3.", "stop", len(prompt))
    assert gen._sessions["r"].ids[: len(prompt)] == prompt


def test_chat_format_train_and_its_old_name(llama2_tokenizer):
    """One name for the training chat format, "train" (the agent's style name); "training" is
    still read, with a DeprecationWarning; anything else is a one-line error."""
    from lumos_jax.inference.chat import chat_format, chat_prompt_ids

    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    ids = chat_prompt_ids(messages, llama2_tokenizer, "train")
    # the training encoder's ids for the same user turn, then the assistant tag
    want = llama2_tokenizer.encode("<|user|>\nWhat is 2 + 3?\n<|assistant|>\n", add_bos=True)
    assert ids == want
    with pytest.warns(DeprecationWarning, match="'training' is deprecated; use 'train'"):
        assert chat_prompt_ids(messages, llama2_tokenizer, "training") == ids
    with pytest.warns(DeprecationWarning):
        assert chat_format("training") == "train"
    with pytest.raises(ValueError, match="chat_format.name='chat'; expected one of"):
        chat_format("chat")


@pytest.mark.parametrize("which", ["sentencepiece", "bpe"])
def test_encode_batch_equals_encode_one_by_one(which, llama2_tokenizer, bpe):
    """The batched call the chat encoding uses gives each text's own ids (specials and the
    added <pad> included), checked against the tokenizer library's own ids as well."""
    tok = llama2_tokenizer if which == "sentencepiece" else bpe[0]
    texts = ["", "plain text", f"a{tok.eos_token}\nb", "<pad>x<pad>", "  two  spaces\n\nand 12,345.6",
             "<|user|>\nQ: 3 + 4?\n<|assistant|>\nSubgoal 1: add." + tok.eos_token]
    for bos in ([False, True] if tok.bos_id is not None and tok.bos_id >= 0 else [False]):
        assert tok.encode_batch(texts, add_bos=bos) == [tok.encode(t, add_bos=bos) for t in texts]
    if which == "bpe":
        ref = bpe[1]
        assert tok.encode_batch(texts[1:3]) == [ref(t, add_special_tokens=False).input_ids for t in texts[1:3]]
