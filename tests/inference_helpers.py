"""Shared helpers for the inference tests: HF reference generation and small models."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "fixtures" / "stories260k"


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    """HF transformers generate(do_sample=False), exactly n new tokens (no EOS stop)."""
    import torch

    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            do_sample=False, max_new_tokens=n, min_new_tokens=n,
                            eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def random_hf_dir(tmp: Path, seed: int, **cfg) -> Path:
    """A randomly initialised HF Llama saved as safetensors (the outside reference)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
                            "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "max_position_embeddings": 256,
                            "initializer_range": 0.15, **cfg})
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp)
    return tmp


def random_prompts(rng: np.random.Generator, n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    return [[1] + rng.integers(3, vocab, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def run_until_done(engine, limit: int = 200):
    """Step `engine` until some turn finishes; its TurnResults."""
    for _ in range(limit):
        done = engine.step()
        if done:
            return done
    raise AssertionError("engine did not finish")


def compile_as_deployed(lowered):
    """Compile with XLA:CPU's default fusion emitters: the test session turns them off to
    compile faster (conftest.py), but memory checks must see the programs users get."""
    return lowered.compile(compiler_options={"xla_cpu_use_fusion_emitters": True})
