"""LlamaConfig: the Llama family's hyperparameters, HF-shaped, plus named presets."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")


def resolve_attention_impl(impl: str) -> str:
    """'auto' → 'splash' on TPU (Pallas), 'xla' elsewhere; other names as given."""
    if impl != "auto":
        return impl
    return "splash" if jax.default_backend() == "tpu" else "xla"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # Pad the embedding / lm_head rows to a multiple (e.g. 128) for sharding and
    # matmul speed; logits are sliced back to vocab_size, so outputs never change.
    vocab_multiple: int = 1
    param_dtype: str = "float32"
    dtype: str = "float32"
    # "none" (no matmul or attention recomputed; scanned, the elementwise ops between them are
    # remade in the backward pass: llama.save_matmuls_and_attention), "full" (recompute each
    # layer) or "dots" (save the non-batched matmul outputs and the attention kernel's:
    # llama.save_dots_and_attention).
    remat_policy: str = "none"
    # "xla" (einsum + mask, any backend), "cudnn" (cuDNN flash attention on NVIDIA GPUs,
    # same segment/causal mask; bf16/fp16 only), "splash" (Pallas splash attention on TPU;
    # interpret mode elsewhere, for tests) or "auto" (splash on TPU, xla otherwise). Used
    # without a KV cache (training, prefill-free scoring); decoding has its own path.
    attention_impl: str = "auto"
    # The stacked decoder layers run as one lax.scan (compile time independent of depth) or,
    # False, unrolled over static slices of the same stacked weights (a switch to measure:
    # in decode on GPU, XLA copied each scanned layer's dynamic slice of the weights).
    scan_layers: bool = True
    # Layers per scan iteration (lax.scan's unroll): 1 = one layer body, compile time flat in
    # depth; k > 1 lets XLA schedule and fuse across k layers, compile time ~k times the body.
    scan_unroll: int = 1

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: num_attention_heads={self.num_attention_heads} is not a "
                             f"multiple of num_key_value_heads={self.num_key_value_heads}")
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(f"LlamaConfig.{field}={getattr(self, field)!r}; "
                                 f"expected one of {sorted(_DTYPES)}")
        if self.remat_policy not in ("none", "full", "dots"):
            raise ValueError(f"LlamaConfig.remat_policy={self.remat_policy!r}; "
                             "expected 'none', 'full' or 'dots'")
        if not isinstance(self.scan_unroll, int) or isinstance(self.scan_unroll, bool) or self.scan_unroll < 1:
            raise ValueError(f"LlamaConfig.scan_unroll={self.scan_unroll!r}; expected an integer >= 1")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"LlamaConfig.attention_impl={self.attention_impl!r}; "
                             f"expected one of {ATTENTION_IMPLS}")
        if self.attention_impl == "cudnn" and self.dtype == "float32":
            raise ValueError(f"LlamaConfig.attention_impl={self.attention_impl!r} needs "
                             "dtype 'bfloat16' or 'float16' (cuDNN flash attention has no fp32)")

    @property
    def padded_vocab_size(self) -> int:
        return int(math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple)

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h

    # -- Hugging Face config.json -------------------------------------------------
    _HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")

    @classmethod
    def from_hf_dict(cls, hf: dict, **overrides) -> "LlamaConfig":
        kw: dict[str, Any] = {k: hf[k] for k in cls._HF_KEYS if k in hf and hf[k] is not None}
        # transformers 5 may keep rope settings under "rope_parameters".
        rope = hf.get("rope_parameters")
        if isinstance(rope, dict):
            kw.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                kw.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        if isinstance(kw.get("rope_scaling"), dict):
            scaling = dict(kw["rope_scaling"])
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            kw["rope_scaling"] = None if scaling["rope_type"] == "default" else scaling
        for bad in ("attention_bias", "mlp_bias"):
            if hf.get(bad):
                raise ValueError(f"config.json: {bad}=true is not supported (Llama has no biases)")
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_hf_dir(cls, path: str | Path, **overrides) -> "LlamaConfig":
        path = Path(path) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no config.json in this Hugging Face directory")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(hf, **overrides)

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict:
        out = {k: getattr(self, k) for k in self._HF_KEYS}
        out.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                   attention_bias=False, mlp_bias=False, torch_dtype=torch_dtype, dtype=torch_dtype)
        return out


def _preset(**kw) -> LlamaConfig:
    return LlamaConfig(**kw)


PRESETS: dict[str, LlamaConfig] = {
    # tests: small enough to compile in a second on CPU, still GQA.
    "tiny": _preset(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    # llama2.c stories260K (../shared/fixtures/stories260k).
    "stories260k": _preset(vocab_size=512, hidden_size=64, intermediate_size=172,
                           num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4,
                           max_position_embeddings=512),
    "tinyllama_1b": _preset(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                            num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                            max_position_embeddings=2048),
    # Lumos checkpoints are Llama-2 with <pad> added: vocab 32,001.
    "llama2_7b": _preset(vocab_size=32001, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=4096,
                         pad_token_id=32000),
    "llama2_13b": _preset(vocab_size=32001, hidden_size=5120, intermediate_size=13824,
                          num_hidden_layers=40, num_attention_heads=40,
                          max_position_embeddings=4096, pad_token_id=32000),
    "llama3_8b": _preset(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
}


@gin.configurable
def model_config(preset: str = "tiny", hf_dir: str | None = None, overrides: dict | None = None,
                 param_dtype: str | None = None, dtype: str | None = None,
                 remat_policy: str | None = None, vocab_multiple: int | None = None,
                 attention_impl: str | None = None, scan_layers: bool | None = None,
                 scan_unroll: int | None = None) -> LlamaConfig:
    """The config a run uses: a named preset or an HF directory's config.json, plus overrides."""
    overrides = dict(overrides or {})
    for key, value in dict(param_dtype=param_dtype, dtype=dtype, remat_policy=remat_policy,
                           vocab_multiple=vocab_multiple, attention_impl=attention_impl,
                           scan_layers=scan_layers, scan_unroll=scan_unroll).items():
        if value is not None:
            overrides[key] = value
    bad = set(overrides) - {f.name for f in dataclasses.fields(LlamaConfig)}
    if bad:
        raise ValueError(f"model_config.overrides: unknown LlamaConfig field(s) {sorted(bad)}")
    if hf_dir:
        return LlamaConfig.from_hf_dir(hf_dir, **overrides)
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[preset].replace(**overrides)
