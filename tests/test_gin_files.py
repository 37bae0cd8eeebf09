"""Every gin file we ship parses and binds through the CLI's own loading path.

gin checks at parse time that each configurable exists and takes each bound parameter,
so this catches a misspelt key, a renamed argument and a broken literal alike (the
complex-QA experiments once failed on `'paper's QA tool…'`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lumos_jax.config import GIN_DIR, ConfigError, check_required, parse_gin
from lumos_jax.evaluation import catalogue

GIN_FILES = sorted(p.relative_to(GIN_DIR).as_posix() for p in GIN_DIR.rglob("*.gin"))


def test_gin_tree_is_not_empty():
    assert len(GIN_FILES) > 50, GIN_FILES


@pytest.mark.parametrize("name", GIN_FILES)
def test_gin_file_parses_and_binds(name):
    try:
        parse_gin([name])
    except ConfigError as e:
        pytest.fail(f"gin/{name} does not load: {e}")


def test_a_broken_file_is_reported_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("eval_experiment.limit = 3\neval_experiment.paper_note = 'paper's note'\n")
    with pytest.raises(ConfigError) as e:
        parse_gin([str(bad)])
    msg = str(e.value)
    assert str(bad) in msg and re.search(r"line 2\b", msg), msg


@pytest.mark.parametrize("value", ["paper's QA tool: GPT-3.5 (72.4 with GPT-4)", 'say "hi"', "both ' and \"",
                                   "back\\slash", "", None, 0, 65.7, True, ("a", 1), ["x"], {"k": "v"}])
def test_gin_literal_round_trips(value, tmp_path):
    import gin

    text = catalogue.gin_literal(value)
    f = tmp_path / "one.gin"
    f.write_text(f"eval_experiment.paper_note = {text}\n")
    parse_gin([str(f)])
    assert gin.query_parameter("eval_experiment.paper_note") == value


def test_catalogue_files_equal_the_generator():
    written = {p.name for p in catalogue.CATALOGUE_DIR.glob("lumos_*.gin")}  # tiny_* are hand-written
    expected = {f"{e.name}.gin" for e in catalogue.experiments()}
    assert written == expected, f"stale or extra catalogue files: {sorted(written ^ expected)}"
    for e in catalogue.experiments():
        path = catalogue.CATALOGUE_DIR / f"{e.name}.gin"
        assert path.read_text(encoding="utf-8") == catalogue.gin_text(e), f"{path} is stale: run catalogue --write"


@pytest.mark.parametrize("exp", catalogue.experiments(), ids=lambda e: e.name)
def test_catalogue_experiment_gets_past_parsing(exp, tmp_path, monkeypatch, capsys):
    """As a user runs it, from a folder with no checkpoints: gin loads, then one line says
    what is missing (a checkpoint or the dataset), never a parse error."""
    from lumos_jax.cli import main as lumos_main

    monkeypatch.chdir(tmp_path)
    rc = lumos_main(["eval", f"--gin_file=experiments/eval/{exp.name}.gin", "--limit", "1",
                     f"--output_dir={tmp_path / 'out'}", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert ".gin:" not in err and ("not found" in err or "does not exist" in err), err


def test_experiments_load_from_a_folder_holding_runs_and_models(tmp_path, monkeypatch):
    """A folder with our own `runs/` outputs (and a `models/` folder) in it: includes such as
    'runs/finetune.gin' still resolve to the shipped files, with the folder on sys.path."""
    import sys

    for d in ("runs/eval", "models", "mesh"):
        (tmp_path / d).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    parse_gin(["experiments/lumos_maths_plan_iterative_7b.gin"])


def test_a_required_value_left_unset_stops_the_run_in_one_line(tmp_path, capsys):
    """Every 7B/13B training experiment marks its base model %gin.REQUIRED: forgetting it must
    not train from random weights, and gin alone would pass the REQUIRED marker through."""
    from lumos_jax.cli import main as lumos_main

    experiments = sorted((GIN_DIR / "experiments").glob("lumos_*.gin"))
    assert len(experiments) >= 12
    for f in experiments:
        assert "BASE_MODEL_DIR = %gin.REQUIRED" in f.read_text(encoding="utf-8"), f
    rc = lumos_main(["train", "--gin_file=experiments/lumos_maths_plan_iterative_7b.gin",
                     f"--workdir={tmp_path / 'w'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("lumos-jax train: error: gin: BASE_MODEL_DIR is required") and \
        "--gin.BASE_MODEL_DIR=" in err[0], err
    assert not (tmp_path / "w").exists()
    bad = tmp_path / "req.gin"
    bad.write_text("eval_experiment.name = %gin.REQUIRED\n")
    parse_gin([str(bad)])  # parsing alone accepts it (files are composed before values are given)
    with pytest.raises(ConfigError, match=r"^gin: eval_experiment.name is required"):
        check_required()
    parse_gin([str(bad)], ["eval_experiment.name = 'x'"])
    check_required()


@pytest.mark.parametrize("old, new", [("agent_models.engine_slots", "engine_settings.num_slots"),
                                      ("lumos_agent.engine_max_len", "engine_settings.max_len")])
def test_engine_size_lives_in_engine_settings_alone(old, new, tmp_path):
    """The old engine-size keys stop with one line naming the new one, in a file or a flag."""
    with pytest.raises(ConfigError) as e:
        parse_gin([], [f"{old} = 4"])
    assert str(e.value) == (f"--gin.{old}: {old} was moved: bind {new} "
                            "(one engine size for agent, eval, generate and serve)")
    f = tmp_path / "old.gin"
    f.write_text(f"{old} = 4\n")
    with pytest.raises(ConfigError, match=f"^{f}: {old} was moved: bind {new} "):
        parse_gin([str(f)])
    import gin

    parse_gin(["agent/engine.gin"])
    assert gin.query_parameter("engine_settings.num_slots") == 64
