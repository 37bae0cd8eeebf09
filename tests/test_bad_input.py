"""Bad input -> one clear error line naming the file or key, never a traceback."""

import json
import shutil

import pytest

from conftest import FIXTURES
from lumos_jax import cli
from lumos_jax.config import ConfigError, parse_gin
from lumos_jax.models import model_config

STORIES = FIXTURES / "stories260k"


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def hf_copy(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(STORIES, dst, ignore=shutil.ignore_patterns("llama2c"))
    return dst


def assert_one_line(code, err, *needles):
    assert code == 2
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert str(n) in err, (n, err)


def test_missing_safetensors(capsys, hf_copy, tmp_path):
    (hf_copy / "model.safetensors").unlink()
    code, err = run_cli(capsys, "convert", str(hf_copy), str(tmp_path / "out"))
    assert_one_line(code, err, hf_copy, "no model.safetensors")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(capsys, hf_copy, tmp_path):
    f = hf_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    code, err = run_cli(capsys, "convert", str(hf_copy), str(tmp_path / "out"))
    assert_one_line(code, err, f, "truncated")


def test_shard_missing_from_index(capsys, hf_copy, tmp_path):
    f = hf_copy / "model.safetensors"
    f.rename(hf_copy / "model-00001-of-00002.safetensors")
    names = json.loads(json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(names))
    code, err = run_cli(capsys, "convert", str(hf_copy), str(tmp_path / "out"))
    assert_one_line(code, err, "model-00002-of-00002.safetensors", "missing")


def test_config_weight_shape_mismatch(capsys, hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(capsys, "convert", str(hf_copy), str(tmp_path / "out"))
    assert_one_line(code, err, "model.safetensors", "mlp.down_proj.weight", "[64, 172]", "[64, 128]")


def test_missing_tensor(capsys, hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["num_hidden_layers"] = 6
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(capsys, "convert", str(hf_copy), str(tmp_path / "out"))
    assert_one_line(code, err, "model.layers.5.", "missing")


def test_unknown_gin_binding(capsys, tmp_path):
    code, err = run_cli(capsys, "convert", str(STORIES), str(tmp_path / "out"), "--gin.no_such_thing.x=1")
    assert_one_line(code, err, "no_such_thing")


def test_bad_gin_file(capsys, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("model_config.preset = 'tiny'\nmodel_config.no_param = 3\n")
    code, err = run_cli(capsys, "convert", str(STORIES), str(tmp_path / "out"), f"--gin_file={bad}")
    assert_one_line(code, err, str(bad), "no_param")


def test_missing_gin_file():
    with pytest.raises(ConfigError, match="gin file not found: nope.gin"):
        parse_gin(["nope.gin"])


def test_unknown_preset():
    parse_gin([], ["model_config.preset = 'llama9_70b'"])
    with pytest.raises(ValueError, match="unknown model preset 'llama9_70b'"):
        model_config()
    parse_gin(["models/llama2_7b.gin"])
    assert model_config().num_hidden_layers == 32


def test_unknown_command(capsys):
    code = cli.main(["frobnicate"])
    assert code == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err


# -- issue 16, item 8: errors that named the wrong thing or read badly -------------------------

def test_missing_model_folder_is_not_blamed_on_the_tokenizer(capsys, tmp_path):
    code, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert_one_line(code, err, tmp_path / "nope", "no such model folder", "--model")
    assert "tokenizer" not in err


def test_unquoted_gin_string_says_so(capsys, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("model_config.preset = 'tiny'\nmodel_config.dtype = bfloat16\n")
    code, err = run_cli(capsys, "convert", str(STORIES), str(tmp_path / "out"), f"--gin_file={bad}")
    assert_one_line(code, err, f"gin: unquoted string bfloat16 in {bad}:2; quote it: 'bfloat16'")
    assert "<ast." not in err
    code, err = run_cli(capsys, "convert", str(STORIES), str(tmp_path / "out"), "--gin.model_config.dtype=float32")
    assert_one_line(code, err, "unquoted string float32 in --gin.model_config.dtype", "\"'float32'\"")


def test_json_error_keeps_its_position(capsys, tmp_path):
    """The column comes from Python's own json parser (an outside reference), not cut off."""
    line = '{"question": "q", "answer": 3,, "x": 1}'
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(line)
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 3"}\n' + line + "\n")
    code, err = run_cli(capsys, "eval", "--gin_file=experiments/eval/tiny_gsm8k_oracle.gin",
                        f"--gin.eval_experiment.data_path='{bad}'", f"--output_dir={tmp_path / 'o'}")
    assert_one_line(code, err, f"{bad}:2", f"at column {want.value.colno}", want.value.msg)


def test_empty_tasks_file(capsys, tmp_path):
    empty = tmp_path / "tasks.txt"
    empty.write_text("\n\n")
    code, err = run_cli(capsys, "agent", "--gin_file=agent/maths.gin", "--gin_file=agent/scripted.gin",
                        f"--tasks_file={empty}")
    assert_one_line(code, err, f"--tasks_file {empty}: no tasks in it")


def test_missing_file_names_its_flag_or_gin_binding(capsys, tmp_path):
    code, err = run_cli(capsys, "agent", "--gin_file=agent/maths.gin", "--gin_file=agent/scripted.gin",
                        f"--tasks_file={tmp_path / 'none.txt'}")
    assert_one_line(code, err, f"{tmp_path / 'none.txt'}: not found (from --tasks_file)")
    task = "Are more people today related to Genghis Khan than Julius Caesar?"
    code, err = run_cli(capsys, "agent", "--gin_file=agent/complex_qa.gin", "--gin_file=agent/scripted.gin",
                        f"--gin.agent_tools.doc_store='{tmp_path / 'wiki.jsonl'}'", "--task", task)
    assert_one_line(code, err, tmp_path / "wiki.jsonl", "from gin agent_tools.doc_store")
