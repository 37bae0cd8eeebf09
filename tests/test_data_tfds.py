"""tfds builders: array_record files read back (tfds.data_source + grain) equal the sources."""

import json

import pytest
from conftest import DATA, FIXTURES

tfds = pytest.importorskip("tensorflow_datasets")


def test_annotation_builder_roundtrip_and_loader(tmp_path):
    from lumos_jax.data.loader import make_train_iterator
    from lumos_jax.data.tfds_builders import build
    from lumos_jax.jsonl import read_jsonl

    build("lumos_annotations/complex_qa_ground_iterative", tmp_path, DATA / "lumos" / "annotations")
    assert list((tmp_path / "lumos_annotations").rglob("*.array_record*"))
    source = tfds.data_source("lumos_annotations/complex_qa_ground_iterative", split="train", data_dir=str(tmp_path))
    expected = read_jsonl(DATA / "lumos" / "annotations" / "lumos_complex_qa_ground_iterative.jsonl")
    assert len(source) == len(expected)
    for i, record in enumerate(expected):
        assert source[i]["id"].decode() == record["id"]
        assert json.loads(source[i]["messages_json"].decode()) == record["messages"]
    tfds_it = make_train_iterator("tfds:lumos_annotations/complex_qa_ground_iterative", str(FIXTURES / "llama2-tokenizer"),
                                  tfds_data_dir=str(tmp_path), seq_len=1024, batch_size=2, num_epochs=1,
                                  process_index=0, process_count=1)
    jsonl_it = make_train_iterator(str(DATA / "lumos" / "annotations" / "lumos_complex_qa_ground_iterative.jsonl"),
                                   str(FIXTURES / "llama2-tokenizer"), seq_len=1024, batch_size=2, num_epochs=1,
                                   process_index=0, process_count=1)
    for a, b in zip(tfds_it, jsonl_it, strict=True):
        assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("name,count,first", [
    ("gsm8k", 1319, "Janet’s ducks lay 16 eggs per day."),
    ("strategyqa", 2290, None), ("svamp", 1000, None), ("hotpotqa", 7405, None)])
def test_eval_builders_keep_file_order(tmp_path, name, count, first):
    from lumos_jax.data.tfds_builders import EVAL_FILES, build

    build(f"lumos_eval/{name}", tmp_path, DATA / "eval")
    source = tfds.data_source(f"lumos_eval/{name}", split="test", data_dir=str(tmp_path))
    assert len(source) == count
    path = DATA / "eval" / EVAL_FILES[name]
    raw = [json.loads(l) for l in open(path)] if path.suffix == ".jsonl" else json.loads(path.read_text())
    for i in (0, 1, count - 1):
        q = source[i]["question"].decode()
        row = raw[i]
        ref_q = f"{row['Body'].strip()} {row['Question'].strip()}" if name == "svamp" else row["question"]
        assert q == ref_q
    if name == "gsm8k":
        assert source[0]["question"].decode().startswith(first) and source[0]["answer"].decode() == "18"
    if name == "strategyqa":
        assert source[0]["answer"].decode() == ("yes" if raw[0]["answer"] else "no")
