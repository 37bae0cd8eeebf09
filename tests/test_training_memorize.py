"""End to end on the reference's own data format: a tiny model trained, through the data
pipeline (lumos_jax.data.loader), on Lumos annotation conversations
(../shared/data/lumos/annotations) reaches loss < 0.05 and then greedily reproduces each
assistant turn from its prompt (encoded by the reference-exact chat encoder)."""

import json

import numpy as np

from conftest import DATA, FIXTURES
from lumos_jax.config import parse_gin
from lumos_jax.generation import greedy_generate
from lumos_jax.jsonl import read_jsonl
from lumos_jax.tokenization import encode_conversation
from lumos_jax.training import state as state_lib
from lumos_jax.training.loop import train


def test_tiny_model_memorises_and_reproduces_assistant_turns(tmp_path, llama2_tokenizer):
    records = read_jsonl(DATA / "lumos/annotations/lumos_maths_plan_onetime.jsonl")
    records = sorted(records, key=lambda r: len(json.dumps(r)))[:2]
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    parse_gin(["mesh/single_device.gin"], [
        "model_config.preset = 'tiny'",
        "model_config.overrides = {'vocab_size': 32001, 'pad_token_id': 32000}",
        "training_data.source = 'pipeline'", f"training_data.files = ['{data}']",
        f"training_data.tokenizer = '{FIXTURES / 'llama2-tokenizer'}'",
        "training_data.packing = False",
        "optimizer_settings.learning_rate = 1e-2", "optimizer_settings.schedule = 'constant'",
        "optimizer_settings.warmup_steps = 0"])
    result = train(workdir=str(tmp_path / "run"), seq_len=160, global_batch=2, max_steps=64,
                   save_every=1000, log_every=10, progress_bar=False)
    assert result["losses"][64] < 0.05, result["losses"]
    model = state_lib.model_from_params(result["setup"], result["state"]["params"])
    for record in records:
        ids, labels = encode_conversation(record["messages"], llama2_tokenizer, 1024)
        first = int(np.argmax(labels != -100))
        prompt, expected = ids[:first].tolist(), ids[first:].tolist()
        assert expected[-1] == llama2_tokenizer.eos_id
        out = greedy_generate(model, [prompt], len(expected) + 4, stop_ids=[llama2_tokenizer.eos_id])[0]
        assert out == expected
        assert llama2_tokenizer.decode(out) == record["messages"][1]["content"].strip()
