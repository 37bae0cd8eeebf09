"""`lumos-jax eval` end to end on gin experiments, and the checkpoint catalogue."""

import json

import pytest

from lumos_jax.cli import main as lumos_main
from lumos_jax.evaluation import catalogue


def test_eval_cli_oracle_and_wrong(tmp_path, capsys):
    rc = lumos_main(["eval", "--gin_file=experiments/eval/tiny_gsm8k_oracle.gin",
                     f"--output_dir={tmp_path / 'o'}", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| tiny_gsm8k_oracle | gsm8k | exact match (%) | 100.0 | 47.1 | 20 |" in out
    rc = lumos_main(["eval", "--gin_file=experiments/eval/tiny_gsm8k_oracle.gin",
                     "--gin.scripted_agent.kind='wrong'", f"--output_dir={tmp_path / 'w'}",
                     "--limit=5", "--quiet"])
    assert rc == 0
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["score"] == 0.0 and summary["n"] == 5


def test_eval_cli_writes_the_operative_config_and_fails_when_every_episode_does(tmp_path, capsys, monkeypatch):
    from lumos_jax.evaluation import agents

    rc = lumos_main(["eval", "--gin_file=experiments/eval/tiny_gsm8k_oracle.gin", f"--output_dir={tmp_path / 'o'}",
                     "--limit=3", "--quiet"])
    assert rc == 0
    operative = (tmp_path / "o" / "operative_config.gin").read_text()
    assert "eval_experiment.dataset = 'gsm8k'" in operative and "scripted_agent.kind = 'oracle'" in operative
    capsys.readouterr()

    def broken(self, example):
        raise RuntimeError("model not loaded")

    monkeypatch.setattr(agents.ScriptedAgent, "__call__", broken)
    rc = lumos_main(["eval", "--gin_file=experiments/eval/tiny_gsm8k_oracle.gin", f"--output_dir={tmp_path / 'b'}",
                     "--limit=3", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "every episode failed (3); first: gsm8k_0: RuntimeError: model not loaded" in err, err
    assert "3 of 3 episodes failed" in err  # the runner's warning, through the CLI's logging


def test_eval_cli_mind2web(tmp_path, capsys):
    assert lumos_main(["eval", "--gin_file=experiments/eval/tiny_mind2web_oracle.gin",
                       f"--output_dir={tmp_path}", "--quiet"]) == 0
    assert "| 100.0 | 27.6 | 20 (43 steps) |" in capsys.readouterr().out


def test_eval_cli_bad_input_is_one_line(tmp_path, capsys):
    assert lumos_main(["eval"]) == 2
    assert "needs --gin_file" in capsys.readouterr().err
    assert lumos_main(["eval", "--gin_file=experiments/eval/tiny_gsm8k_oracle.gin",
                       "--gin.eval_experiment.dataset='nope'", f"--output_dir={tmp_path}"]) == 2
    assert "unknown 'nope'" in capsys.readouterr().err
    full_set = ["--gin_file=experiments/eval/tiny_gsm8k_oracle.gin", "--gin.eval_experiment.data_path=None"]
    assert lumos_main(["eval", *full_set, f"--gin.eval_data_dir.path='{tmp_path}'",
                       f"--output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "gsm8k_test.jsonl" in err and len(err.strip().splitlines()) == 1


def test_eval_without_eval_data_names_the_settings(tmp_path, capsys, monkeypatch):
    """The full evaluation sets are not bundled: with no folder configured the error says
    which settings give one (no silent fallback to ../shared)."""
    monkeypatch.delenv("LUMOS_EVAL_DATA", raising=False)
    assert lumos_main(["eval", "--gin_file=experiments/eval/tiny_gsm8k_oracle.gin",
                       "--gin.eval_experiment.data_path=None", f"--output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LUMOS_EVAL_DATA" in err[0] and "eval_data_dir.path" in err[0], err


def test_catalogue_files_are_current_and_complete():
    exps = catalogue.experiments()
    assert len(exps) == 26
    names = {e.name for e in exps}
    # every released checkpoint pair appears with each of its datasets
    for (family, form, size), dss in catalogue.RELEASED.items():
        for d in dss:
            assert f"lumos_{family}_{form}_{size}_{d}" in names
    for e in exps:
        path = catalogue.CATALOGUE_DIR / f"{e.name}.gin"
        assert path.read_text() == catalogue.gin_text(e), f"{path} is stale: run catalogue --write"
    import gin

    from lumos_jax.config import check_required, parse_gin
    from lumos_jax.evaluation.experiment import eval_experiment

    # the shared recipe plus the experiment's macros give the reference's values
    parse_gin(["experiments/eval/lumos_complex_qa_iterative_13b_strategyqa.gin"])
    check_required()  # every %gin.REQUIRED macro of the recipe is set
    cfg = eval_experiment()
    assert (cfg.dataset, cfg.limit, cfg.protocol, cfg.concurrency) == ("strategyqa", 300, "reference", 64)
    assert gin.query_parameter("%PLANNER") == "checkpoints/lumos_complex_qa_plan_iterative-13B"
    assert gin.query_parameter("%MAX_ROUNDS") == 5 and gin.query_parameter("engine_settings.num_slots") == 64


@pytest.mark.parametrize("name", ["lumos_maths_iterative_7b_gsm8k", "lumos_unified_iterative_7b_webshop",
                                  "lumos_web_agent_iterative_13b_mind2web"])
def test_catalogue_gin_parses(name):
    from lumos_jax.config import parse_gin
    from lumos_jax.evaluation.experiment import eval_experiment

    parse_gin([f"experiments/eval/{name}.gin"])
    cfg = eval_experiment()
    assert cfg.name == name and cfg.concurrency == 64 and cfg.batch_size is None


def test_changed_settings_never_reuse_old_predictions(tmp_path, capsys):
    """The issue's case: an always-wrong agent run into the folder of an oracle run must not
    report the oracle's 100.0; it refuses in one line, and --overwrite / --resume_anyway decide."""
    base = ["eval", "--gin_file=experiments/eval/tiny_gsm8k_oracle.gin", f"--output_dir={tmp_path}",
            "--limit=4", "--quiet"]
    assert lumos_main(base) == 0
    assert lumos_main([*base, "--limit=6"]) == 0  # more examples, same settings: resumes
    capsys.readouterr()
    wrong = [*base, "--gin.scripted_agent.kind='wrong'"]
    assert lumos_main(wrong) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scripted_agent.kind" in err[0] and "--overwrite" in err[0], err
    assert lumos_main([*wrong, "--resume_anyway"]) == 0  # keeps the 6 oracle predictions
    assert json.loads((tmp_path / "summary.json").read_text())["score"] == 100.0
    assert lumos_main([*wrong, "--overwrite"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["score"] == 0.0 and summary["n"] == 4
    recorded = json.loads((tmp_path / "settings.json").read_text())["settings"]
    assert recorded["scripted_agent.kind"] == "'wrong'"
