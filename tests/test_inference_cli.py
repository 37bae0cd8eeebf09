"""`lumos-jax generate`: prompts file in, JSONL out, same tokens as HF greedy."""

import json

import pytest

from inference_helpers import STORIES, hf_greedy

from lumos_jax.cli import main as cli_main


def test_generate_cli_writes_jsonl_matching_hf(tmp_path):
    from transformers import LlamaForCausalLM

    from lumos_jax.tokenization import Tokenizer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Once upon a time", "id": 7}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    rc = cli_main(["generate", "--model", str(STORIES), "--prompts_file", str(prompts),
                   "--output", str(out), "--gin.generation_settings.max_new_tokens=10",
                   "--gin.engine_settings.max_len=128", "--gin.engine_settings.num_slots=4",
                   "--gin.engine_settings.steps_per_call=8",
                   "--gin.inference_dtypes.weights='float32'", "--gin.inference_dtypes.compute='float32'"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("id") for r in rows] == [7, None]
    tok = Tokenizer(STORIES)
    hf = LlamaForCausalLM.from_pretrained(STORIES).eval()
    assert rows[0]["completion_ids"] == hf_greedy(hf, tok.encode("Once upon a time", add_bos=True), 10)
    assert rows[0]["completion"] == tok.decode(rows[0]["completion_ids"])
    assert len(rows[1]["completion_ids"]) <= 10 and rows[1]["finish_reason"] in ("stop", "length")


def test_generate_cli_rejects_bad_prompts_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    rc = cli_main(["generate", "--model", str(STORIES), "--prompts_file", str(bad)])
    assert rc == 2
    assert "bad.jsonl:2: expected an object with a 'prompt'" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.partial"))
