"""Malformed training records (issue 12): the in-memory loader (`training_data.source=
'memory'`) and the data pipeline report each one the same way — `file:line: what` — and
records with no trained token are counted, reported and left out, never trained silently."""

import json

import numpy as np
import pytest
from conftest import FIXTURES

from lumos_jax.data.loader import make_train_iterator
from lumos_jax.data.records import BadRecordError
from lumos_jax.tokenization import Tokenizer
from lumos_jax.training.data import encode_files

TOK = str(FIXTURES / "llama2-tokenizer")
GOOD = {"dataset": "t", "id": "1", "messages": [{"role": "user", "content": "What is 2+2?"},
                                                 {"role": "assistant", "content": "It is 4."}]}


def line(record) -> bytes:
    return json.dumps(record).encode() + b"\n"


def with_messages(*messages):
    return line({"dataset": "t", "id": "x", "messages": list(messages)})


USER = {"role": "user", "content": "hello"}
NON_UTF8 = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
BAD = {
    "non_utf8": (NON_UTF8, f"not valid UTF-8 (byte {NON_UTF8.index(bytes([0xE9]))})"),
    "invalid_json": (b'{"messages": [}\n', "invalid JSON"),
    "unknown_role": (with_messages({"role": "robot", "content": "hi"}, {"role": "assistant", "content": "ok"}),
                     "message 0 has unknown role 'robot'"),
    "missing_assistant": (with_messages(USER), "does not end with an assistant turn"),
    "empty_assistant": (with_messages(USER, {"role": "assistant", "content": "  "}),
                        "message 1 (assistant) has empty content"),
    "content_not_text": (with_messages(USER, {"role": "assistant", "content": None}), "content must be a string"),
    "not_an_object": (b"[1, 2]\n", "expected a JSON object"),
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOK, add_pad_token=True)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_both_loaders_name_file_line_and_what(tmp_path, tok, kind):
    raw, what = BAD[kind]
    path = tmp_path / "ann.jsonl"
    path.write_bytes(line(GOOD) + b"\n" + raw)  # the bad record is on line 3
    with pytest.raises(BadRecordError) as memory:
        encode_files([path], tok, 128)
    with pytest.raises(BadRecordError) as pipeline:
        make_train_iterator(sources=[str(path)], tokenizer=tok, seq_len=128, batch_size=1,
                            process_index=0, process_count=1)
    # (gin adds an "In call to configurable" line to the pipeline's; the CLI shows line one)
    assert str(memory.value) == str(pipeline.value).splitlines()[0]
    assert str(memory.value).startswith(f"{path}:3: ") and what in str(memory.value)


def test_python_agrees_the_bytes_are_bad():
    """The reasons above are what the standard library says of the same bytes."""
    with pytest.raises(UnicodeDecodeError) as e:
        BAD["non_utf8"][0].decode("utf-8")
    assert e.value.start == NON_UTF8.index(b"\xe9")
    with pytest.raises(json.JSONDecodeError):
        json.loads(BAD["invalid_json"][0])


def untrained_file(tmp_path, tok, max_len):
    """Lines 1, 3 and 5 are fine; 2 and 4 have a user turn longer than max_len, so every
    assistant token is cut off."""
    long_user = {"role": "user", "content": " ".join(["word"] * (2 * max_len))}
    lost = with_messages(long_user, {"role": "assistant", "content": "lost"})
    path = tmp_path / "ann.jsonl"
    path.write_bytes(line(GOOD) + lost + line(GOOD) + lost + line(GOOD))
    return path


def test_memory_loader_leaves_out_and_reports_untrained_records(tmp_path, tok, caplog):
    path = untrained_file(tmp_path, tok, 64)
    examples = encode_files([path], tok, 64)
    err = [r.getMessage() for r in caplog.records]
    assert len(examples) == 3
    assert all(np.any(labels[1:] != -100) for _, labels in examples)
    assert len(err) == 1 and "2 record(s) have no trained tokens" in err[0]
    assert f"{path}:2, {path}:4" in err[0] and "max_len 64" in err[0]


def test_pipeline_leaves_out_and_reports_untrained_records(tmp_path, tok, caplog):
    path = untrained_file(tmp_path, tok, 64)
    it = make_train_iterator(sources=[str(path)], tokenizer=tok, seq_len=64, batch_size=1,
                             packing=False, num_epochs=1, process_index=0, process_count=1)
    batches = list(it)
    err = [r.getMessage() for r in caplog.records]
    assert len(batches) == 3  # only the three good records
    assert all(b["loss_mask"].sum() > 0 for b in batches)
    assert it.summary()["no_target"] == 2
    assert any(f"{path}:" in e and "no trained tokens" in e and "left out" in e for e in err[:1]), err
    epoch_lines = [e for e in err if e.startswith("epoch 0: ")]
    assert len(epoch_lines) == 1 and "2 record(s) have no trained tokens" in epoch_lines[0]
    assert f"{path}:2" in epoch_lines[0] and f"{path}:4" in epoch_lines[0]


def test_memory_source_through_training_data(tmp_path):
    """`training_data.source='memory'` goes through the same checks."""
    from lumos_jax.training.data import training_data

    path = tmp_path / "bad.jsonl"
    path.write_bytes(line(GOOD) + BAD["empty_assistant"][0])
    with pytest.raises(BadRecordError, match=rf"^{path}:2: message 1 \(assistant\) has empty content\n"):
        training_data(seq_len=64, global_batch=1, source="memory", files=[str(path)], tokenizer=TOK)


def test_pipeline_with_no_trainable_record_stops_in_one_line(tmp_path, tok):
    """Every record loses its assistant turn to truncation: a clear error, not an endless
    loop of empty epochs (num_epochs=None trains forever otherwise)."""
    long = {"role": "user", "content": "word " * 200}
    path = tmp_path / "all_long.jsonl"
    path.write_bytes(b"".join(with_messages(long, {"role": "assistant", "content": "ok"}) for _ in range(3)))
    it = make_train_iterator(sources=[str(path)], tokenizer=tok, seq_len=64, batch_size=1,
                             packing=False, num_epochs=None, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"none of the 3 records .* trained token within max_len 64") as e:
        next(it)
    assert f"{path}:1" in str(e.value) and "\n" not in str(e.value)
