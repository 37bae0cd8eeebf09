"""The real pretrained llama2.c stories260K: our logits and greedy output equal run.c's."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from lumos_jax.checkpoints.hf import load_hf_model
from lumos_jax.generation import greedy_generate
from lumos_jax.tokenization import Tokenizer

STORIES = FIXTURES / "stories260k"


@pytest.fixture(scope="module")
def model():
    return load_hf_model(STORIES)


@pytest.fixture(scope="module")
def reference():
    return json.loads((STORIES / "reference_greedy.json").read_text())


def test_logits_match_llama2c(model, reference):
    case = reference["once_upon_a_time"]
    ids = case["prompt_ids"] + case["generated_ids"][:-1]
    expected = np.load(STORIES / "reference_logits_once_upon_a_time.npy")
    logits = model(jnp.asarray([ids], jnp.int32))
    assert np.abs(np.asarray(logits[0]) - expected).max() <= 1e-4


@pytest.mark.parametrize("case", ["once_upon_a_time", "empty_prompt"])
def test_greedy_continuation_matches_llama2c(model, reference, case):
    ref = reference[case]
    tok = Tokenizer(STORIES)
    assert tok.encode(ref["prompt"], add_bos=True) == ref["prompt_ids"]
    out = greedy_generate(model, [ref["prompt_ids"]], len(ref["generated_ids"]))[0]
    assert out == ref["generated_ids"]
    assert tok.decode(ref["prompt_ids"] + out) == ref["text"]


def test_batched_greedy_with_mixed_lengths_matches_llama2c(model, reference):
    a, b = reference["once_upon_a_time"], reference["empty_prompt"]
    outs = greedy_generate(model, [a["prompt_ids"], b["prompt_ids"]], 40)
    assert outs[0] == a["generated_ids"][:40]
    assert outs[1] == b["generated_ids"][:40]


def test_vocab_padding_keeps_greedy_output(reference):
    padded = load_hf_model(STORIES, vocab_multiple=128 * 3)
    ref = reference["once_upon_a_time"]
    assert greedy_generate(padded, [ref["prompt_ids"]], 60)[0] == ref["generated_ids"]
