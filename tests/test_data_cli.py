"""`lumos-jax data convert|build|inspect` end to end (in-process, via lumos_jax.cli)."""

import json

from conftest import DATA, FIXTURES

from lumos_jax.cli import main as lumos_main

ANN = DATA / "lumos" / "annotations"


def test_convert_reference_reproduces_files(tmp_path, capsys):
    rc = lumos_main(["data", "convert", "reference", "--domain", "complex_qa",
                     "--input", str(DATA / "lumos" / "converted" / "complex_qa.jsonl"), "--out", str(tmp_path)])
    assert rc == 0 and "5 written, 0 dropped" in capsys.readouterr().out
    for p in tmp_path.glob("*.jsonl"):
        assert p.read_bytes() == (ANN / p.name).read_bytes()


def test_convert_gsm8k_writes_training_files_and_report(tmp_path, capsys):
    src = tmp_path / "small.jsonl"
    src.write_text("".join(open(DATA / "train" / "gsm8k_train.jsonl").readlines()[:40]))
    assert lumos_main(["data", "convert", "gsm8k", "--input", str(src), "--out", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "gsm8k_report.json").read_text())
    assert report["total"] == 40 and report["executed"] >= 36
    ground = [json.loads(l) for l in open(tmp_path / "o" / "lumos_gsm8k_ground_iterative.jsonl")]
    assert len(ground) == report["converted"]
    assert ground[0]["messages"][1]["content"] == "R1 = Calculator(48/2)"


def test_inspect_marks_trained_spans_and_prints_stats(capsys):
    rc = lumos_main(["data", "inspect", str(ANN / "lumos_maths_ground_iterative.jsonl"),
                     "--tokenizer", str(FIXTURES / "llama2-tokenizer"), "--index", "0", "--seq_len", "512"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "<|assistant|>\n⟦R1 = Calculator(2 - 0.5)</s>\n⟧<|user|>" in out
    stats = json.loads(out.split("== stats\n", 1)[1])
    assert stats["examples"] == 6 and stats["truncated"] == 3 and 0 < stats["packing_efficiency"] <= 1


def test_bad_input_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    rc = lumos_main(["data", "inspect", str(bad), "--tokenizer", str(FIXTURES / "llama2-tokenizer")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}:1: conversation does not end with an assistant turn" in err
    assert len(err.strip().splitlines()) == 1
    assert lumos_main(["data", "bogus"]) == 2


def test_build_eval_set(tmp_path, capsys):
    rc = lumos_main(["data", "build", "lumos_eval/svamp", "--manual_dir", str(DATA / "eval"),
                     "--data_dir", str(tmp_path)])
    assert rc == 0 and "lumos_eval/svamp test: 1000 examples" in capsys.readouterr().out


def test_gin_data_files_parse_and_the_sample_config_builds_batches(monkeypatch):
    import gin

    from conftest import REPO
    from lumos_jax.data.loader import make_eval_iterator, make_train_iterator
    from lumos_jax.config import parse_gin

    monkeypatch.chdir(REPO)
    files = sorted((REPO / "gin" / "data").glob("*.gin"))
    assert len(files) >= 4
    try:
        for f in files:
            parse_gin([str(f)])
            assert gin.query_parameter("make_train_iterator.sources")
        parse_gin([str(REPO / "gin" / "data" / "lumos_samples.gin")],
                  ["LLAMA2_TOKENIZER = '../shared/fixtures/llama2-tokenizer'"])
        it = make_train_iterator(process_index=0, process_count=1)
        assert next(it)["input_ids"].shape == (8, 1024)
        assert make_eval_iterator(process_index=0, process_count=1).num_batches == 4
    finally:
        gin.clear_config()
