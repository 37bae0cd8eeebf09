"""Bad annotation input: one clear error naming file:line, or skipped and counted."""

import json

import pytest
from conftest import DATA, FIXTURES

from lumos_jax.data.loader import make_train_iterator
from lumos_jax.data.records import BadRecordError, BadRecordReport, read_annotations

GOOD = {"dataset": "maths", "id": "m0", "messages": [{"role": "user", "content": "q"},
                                                       {"role": "assistant", "content": "a"}]}
BAD_LINES = {
    "bad_json": b'{"dataset": "maths", "messages": [',
    "missing_role": json.dumps({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}).encode(),
    "unknown_role": json.dumps({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}).encode(),
    "empty_content": json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}).encode(),
    "not_ending_with_assistant": json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(),
    "not_utf8": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "no_messages": b'{"dataset": "maths"}',
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_each_bad_record_is_an_error_naming_file_and_line(tmp_path, reason):
    path = tmp_path / "ann.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + BAD_LINES[reason] + b"\n")
    with pytest.raises(BadRecordError, match=rf"^{path}:3: "):
        read_annotations(path)
    report = BadRecordReport()
    assert read_annotations(path, skip_bad_records=True, report=report) == [GOOD]
    assert dict(report.counts) == {reason: 1} and f"{path}:3" in report.examples[0]


def test_loader_skips_and_counts_bad_records(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([json.dumps(GOOD).encode(), *BAD_LINES.values(), json.dumps(GOOD).encode()]))
    tok = str(FIXTURES / "llama2-tokenizer")
    with pytest.raises(BadRecordError, match="mixed.jsonl:2: invalid JSON"):
        make_train_iterator([str(path)], tok, seq_len=64, batch_size=2, process_index=0, process_count=1)
    it = make_train_iterator([str(path)], tok, seq_len=64, batch_size=2, num_epochs=1, skip_bad_records=True,
                             process_index=0, process_count=1)
    assert sum(1 for _ in it) == 1
    assert it.summary()["bad_records"] == len(BAD_LINES) and it.stats["examples"] == 2
    assert "7 bad records skipped" in it.report.summary()


def test_released_style_files_read_cleanly():
    for path in sorted((DATA / "lumos" / "annotations").glob("*.jsonl")):
        assert read_annotations(path)


def test_missing_file_and_bad_settings_are_clear(tmp_path):
    tok = str(FIXTURES / "llama2-tokenizer")
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        read_annotations(tmp_path / "nope.jsonl")
    ann = str(DATA / "lumos" / "annotations" / "lumos_maths_plan_onetime.jsonl")
    with pytest.raises(ValueError, match="max_seq_length"):
        make_train_iterator([ann], tok, seq_len=64, max_seq_length=500, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="weights"):
        make_train_iterator([ann], tok, weights=[-1.0], process_index=0, process_count=1)
