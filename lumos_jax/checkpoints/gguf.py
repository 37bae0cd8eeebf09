"""llama.cpp GGUF files -> our Llama model, an HF config and a tokenizer beside it.

GGUF stores each weight in ggml's layout (`ne0` = input features), often quantized in
blocks; `gguf.quants.dequantize` (the gguf package's own reference code) turns the raw
blocks into float32 rows in HF's (out, in) layout. llama.cpp's converter permutes the
rows of `attn_q` / `attn_k` from HF's rotate-half RoPE order into its interleaved order;
`unpermute_qk` undoes that so the tensors are HF's again and the rest of the import is
the HF one (`hf.load_tensors`). The tokenizer is rebuilt from `tokenizer.ggml.*`: a
byte-level BPE vocabulary becomes a `tokenizer.json`, a SentencePiece one a
`tokenizer.model` (the SentencePiece library then tokenizes exactly as llama.cpp's SPM).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
from jax.sharding import Mesh
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from lumos_jax.checkpoints.hf import load_tensors
from lumos_jax.models.config import LlamaConfig
from lumos_jax.models.llama import LlamaForCausalLM

# GGUF tensor name (block index stripped) -> HF name.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type; SentencePiece numbers them alike).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the splits llama.cpp applies before byte-level BPE, in order.
PRE_TOKENIZER_SPLITS = {
    "default": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT], "gpt-2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT], "llama3": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` of q/k rows: per head, rows (pair, half) -> (half, pair)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"attention weight with {rows} rows does not split into {n_heads} heads")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """A Llama GGUF: metadata, HF-named float32 tensors (dequantized on demand), tokenizer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, IndexError) as e:
            raise ValueError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.meta = {k: f.contents() for k, f in self.reader.fields.items()
                     if not k.startswith("GGUF.")}
        arch = self.meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"{self.path}: GGUF architecture {arch!r} is not supported (only 'llama': "
                             "Llama, Mistral-style, TinyLlama, SmolLM)")
        self._by_gguf = {t.name: t for t in self.reader.tensors}
        self._to_gguf = {self.hf_name(n): n for n in self._by_gguf if self.hf_name(n) is not None}
        self.location = {hf: self for hf in self._to_gguf}  # the interface of hf.HFCheckpoint
        if "rope_freqs.weight" in self._by_gguf:
            raise ValueError(f"{self.path}: has rope_freqs (Llama-3.1 RoPE scaling factors), which this "
                             "importer does not map; convert the original HF checkpoint instead")
        unknown = sorted(n for n in self._by_gguf if self.hf_name(n) is None)
        if unknown:
            raise ValueError(f"{self.path}: tensors with no Llama mapping: {', '.join(unknown[:5])}")

    def _m(self, key: str, default=None):
        return self.meta.get(f"llama.{key}", default)

    @staticmethod
    def hf_name(name: str) -> str | None:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        m = _BLOCK_RE.fullmatch(name)
        if m and m.group(2) in _LAYER_NAMES:
            return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        return None

    def hf_config(self) -> dict:
        """The HF `config.json` this file describes."""
        heads = self._m("attention.head_count")
        hidden = self._m("embedding_length")
        if not heads or not hidden:
            raise ValueError(f"{self.path}: metadata lacks llama.embedding_length / attention.head_count")
        head_dim = self._m("attention.key_length", hidden // heads)
        if self._m("rope.dimension_count", head_dim) != head_dim:
            raise ValueError(f"{self.path}: rope.dimension_count {self._m('rope.dimension_count')} != head "
                             f"dim {head_dim} (partial rotary embeddings are not supported)")
        vocab = self._by_gguf["token_embd.weight"].shape[1] if "token_embd.weight" in self._by_gguf \
            else len(self.meta.get("tokenizer.ggml.tokens", ()))
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": int(vocab), "hidden_size": int(hidden),
            "intermediate_size": int(self._m("feed_forward_length")),
            "num_hidden_layers": int(self._m("block_count")),
            "num_attention_heads": int(heads),
            "num_key_value_heads": int(self._m("attention.head_count_kv", heads)),
            "head_dim": int(head_dim),
            "max_position_embeddings": int(self._m("context_length", 4096)),
            "rms_norm_eps": float(self._m("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self._m("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in self._by_gguf,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        }
        scaling = self._m("rope.scaling.type")
        if scaling == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(self._m("rope.scaling.factor"))}
        elif scaling not in (None, "none"):
            raise ValueError(f"{self.path}: rope.scaling.type {scaling!r} is not supported (none, linear)")
        for key in ("bos", "eos", "padding"):
            value = self.meta.get(f"tokenizer.ggml.{key}_token_id")
            if value is not None:
                config[f"{'pad' if key == 'padding' else key}_token_id"] = int(value)
        return config

    def config(self, **overrides) -> LlamaConfig:
        return LlamaConfig.from_hf_dict(self.hf_config(), **overrides)

    def get(self, hf_name: str) -> np.ndarray:
        """One tensor, float32, in HF's layout and row order."""
        gguf_name = self._to_gguf[hf_name]  # KeyError for a missing tensor, as HFCheckpoint
        t = self._by_gguf[gguf_name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{self.path}: tensor {gguf_name} has ggml type {t.tensor_type.name}, "
                             "which the gguf package cannot dequantize") from None
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if gguf_name.endswith("attn_q.weight"):
            w = unpermute_qk(w, int(self._m("attention.head_count")))
        elif gguf_name.endswith("attn_k.weight"):
            w = unpermute_qk(w, int(self._m("attention.head_count_kv", self._m("attention.head_count"))))
        return w

    def quant_types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.reader.tensors:
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
        return out

    # -- tokenizer ------------------------------------------------------------------------
    def write_tokenizer(self, directory: str | Path) -> list[str]:
        """Write the vocabulary as HF tokenizer files in `directory`; returns the file names."""
        directory = Path(directory)
        kind = self.meta.get("tokenizer.ggml.model")
        tokens = self.meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError(f"{self.path}: no tokenizer.ggml.tokens; pass a tokenizer directory instead")
        types = self.meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if kind == "gpt2":
            files = [self._write_bpe(directory, tokens, types)]
        elif kind == "llama":
            files = [self._write_sentencepiece(directory, tokens, types)]
        else:
            raise ValueError(f"{self.path}: tokenizer.ggml.model {kind!r} is not supported "
                             "(gpt2 byte-level BPE or llama SentencePiece)")
        (directory / "tokenizer_config.json").write_text(json.dumps(self._tokenizer_config(tokens), indent=2))
        return files + ["tokenizer_config.json"]

    def _special(self, tokens, key):
        i = self.meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    def _tokenizer_config(self, tokens) -> dict:
        config = {"tokenizer_class": ("LlamaTokenizer" if self.meta.get("tokenizer.ggml.model") == "llama"
                                      else "PreTrainedTokenizerFast"),
                  "bos_token": self._special(tokens, "bos"), "eos_token": self._special(tokens, "eos"),
                  "unk_token": self._special(tokens, "unknown"), "pad_token": self._special(tokens, "padding"),
                  "add_bos_token": bool(self.meta.get("tokenizer.ggml.add_bos_token",
                                                      self.meta.get("tokenizer.ggml.model") == "llama")),
                  "add_eos_token": bool(self.meta.get("tokenizer.ggml.add_eos_token", False)),
                  "clean_up_tokenization_spaces": False,
                  "model_max_length": int(self._m("context_length", 4096))}
        if "tokenizer.chat_template" in self.meta:
            config["chat_template"] = self.meta["tokenizer.chat_template"]
        return config

    def _write_bpe(self, directory: Path, tokens, types) -> str:
        pre = self.meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZER_SPLITS:
            raise ValueError(f"{self.path}: tokenizer.ggml.pre {pre!r} is not supported (known: "
                             f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}); pass a tokenizer.json instead")
        merges = [tuple(m.split(" ", 1)) for m in self.meta.get("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError(f"{self.path}: tokenizer.ggml.tokens has duplicate entries")
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        added = [AddedToken(t, special=ty == CONTROL, normalized=False)
                 for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)]
        tok.add_special_tokens([a for a in added if a.special])
        tok.add_tokens([a for a in added if not a.special])
        tok.save(str(directory / "tokenizer.json"))
        return "tokenizer.json"

    def _write_sentencepiece(self, directory: Path, tokens, types) -> str:
        scores = self.meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        proto = spm_pb2.ModelProto()
        for t, s, ty in zip(tokens, scores, types):
            piece = proto.pieces.add()
            piece.piece, piece.score, piece.type = t, float(s), int(ty) if 1 <= int(ty) <= 6 else NORMAL
        spec = proto.trainer_spec
        spec.model_type = spm_pb2.TrainerSpec.BPE
        spec.vocab_size = len(tokens)
        spec.byte_fallback = BYTE in types
        ids = {"unk_id": "unknown", "bos_id": "bos", "eos_id": "eos", "pad_id": "padding"}
        for field, key in ids.items():
            value = self.meta.get(f"tokenizer.ggml.{key}_token_id")
            setattr(spec, field, int(value) if value is not None and key != "padding" else -1)
        norm = proto.normalizer_spec
        norm.name = "identity"
        norm.add_dummy_prefix = bool(self.meta.get("tokenizer.ggml.add_space_prefix", True))
        norm.remove_extra_whitespaces = False
        norm.escape_whitespaces = True
        (directory / "tokenizer.model").write_bytes(proto.SerializeToString())
        return "tokenizer.model"


def is_gguf(path: str | Path) -> bool:
    return str(path).endswith(".gguf") and Path(path).is_file()


def _open(source: str | Path | GGUFFile) -> GGUFFile:
    return source if isinstance(source, GGUFFile) else GGUFFile(source)


def load_gguf_model(source: str | Path | GGUFFile, mesh: Mesh | None = None, rules=None,
                    **config_overrides) -> LlamaForCausalLM:
    """Import a Llama GGUF (weights dequantized to float32, then cast to param_dtype)."""
    f = _open(source)
    return load_tensors(f, f.config(**config_overrides), mesh, rules, f.path)


def write_hf_sidecar(source: str | Path | GGUFFile, directory: str | Path) -> list[str]:
    """Tokenizer files and generation_config.json of a GGUF into `directory` (beside the weights)."""
    f = _open(source)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = f.write_tokenizer(directory)
    generation = {f"{k}_token_id": int(f.meta[f"tokenizer.ggml.{k}_token_id"]) for k in ("bos", "eos")
                  if f"tokenizer.ggml.{k}_token_id" in f.meta}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return files + ["generation_config.json"]
