"""Model definitions (Llama family)."""

from lumos_jax.models.config import PRESETS, LlamaConfig, model_config
from lumos_jax.models.llama import LlamaForCausalLM, abstract_model, create_model

__all__ = ["PRESETS", "LlamaConfig", "model_config", "LlamaForCausalLM", "abstract_model",
           "create_model"]
