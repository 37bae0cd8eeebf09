"""GGUF import on small files written here the way llama.cpp's converter writes them (q/k rows
permuted, ggml names, `tokenizer.ggml.*`), checked against outside references: transformers'
torch dequantizer for every block type, the original HF weights for the lossless ones,
transformers' own GGUF loader for the whole model, and SentencePiece for the vocabulary."""

import gguf
import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from conftest import FIXTURES
from smollm2 import transformers_reads_gguf_once
from test_tokenization import TEXTS

from lumos_jax.checkpoints.gguf import GGUFFile, load_gguf_model, write_hf_sidecar
from lumos_jax.tokenization import Tokenizer

Q = gguf.GGMLQuantizationType
# (float16 scale fields' byte offsets in one block, block bytes) for the types built from random bytes.
K_BLOCKS = {Q.Q4_K: ((0, 2), 144), Q.Q6_K: ((208,), 210)}
# Per tensor of the tiny model: every type the importer is asked to read, each at least once.
LAYER_TYPES = [
    {"attn_q": Q.F32, "attn_k": Q.F16, "attn_v": Q.BF16, "attn_output": Q.Q4_0,
     "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K},
    {"attn_q": Q.Q4_K, "attn_k": Q.Q6_K, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1,
     "ffn_gate": Q.Q4_0, "ffn_up": Q.F16, "ffn_down": Q.F32},
]
HF_PARTS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`: HF rotate-half rows -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode_tensor(w: np.ndarray, qtype, rng) -> np.ndarray:
    """Bytes of `w` (rows, cols) as `qtype`; K-quants get random blocks with sane scales."""
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype == Q.BF16:
        top = (np.ascontiguousarray(w, np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return top.view(np.uint8).reshape(w.shape[0], -1)
    if qtype in K_BLOCKS:
        offsets, size = K_BLOCKS[qtype]
        blocks = rng.integers(0, 256, (w.shape[0] * w.shape[1] // 256, size), dtype=np.uint8)
        for o in offsets:
            blocks[:, o:o + 2] = rng.uniform(0.0005, 0.002, (len(blocks), 1)).astype(np.float16).view(np.uint8)
        return blocks.reshape(w.shape[0], -1)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def sentencepiece_vocab(model_file):
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(open(model_file, "rb").read())
    return [p.piece for p in proto.pieces], [p.score for p in proto.pieces], [int(p.type) for p in proto.pieces]


def add_llama_vocab(w: gguf.GGUFWriter, model_file):
    tokens, scores, types = sentencepiece_vocab(model_file)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def finish(w: gguf.GGUFWriter):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random HF Llama (untied, GQA 4/2) and its GGUF in mixed block types."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      initializer_range=0.05)
    hf = LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(256)
    w.add_feed_forward_length(512)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(64)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    add_llama_vocab(w, FIXTURES / "stories260k" / "tokenizer.model")

    def put(name, arr, qtype):
        data = encode_tensor(arr, qtype, rng)
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)

    put("token_embd.weight", sd["model.embed_tokens.weight"], Q.Q8_0)
    put("output.weight", sd["lm_head.weight"], Q.Q6_K)
    put("output_norm.weight", sd["model.norm.weight"], Q.F32)
    for i, types in enumerate(LAYER_TYPES):
        pre = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[pre + "input_layernorm.weight"], Q.F32)
        put(f"blk.{i}.ffn_norm.weight", sd[pre + "post_attention_layernorm.weight"] + 0.1, Q.F32)
        for part, qtype in types.items():
            weight = sd[pre + HF_PARTS[part] + ".weight"]
            if part in ("attn_q", "attn_k"):
                weight = llama_cpp_permute(weight, 4 if part == "attn_q" else 2)
            put(f"blk.{i}.{part}.weight", weight, qtype)
    finish(w)
    return hf, sd, path


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K, Q.F16, Q.BF16])
def test_dequantize_equals_transformers_torch_dequantizer(tiny, qtype):
    """Each block type, read through our importer, against transformers' own torch kernels
    (integrations/gguf/dequant.py; float types against torch's casts)."""
    import torch

    f = GGUFFile(tiny[2])
    hits = 0
    for t in f.reader.tensors:
        if t.tensor_type != qtype:
            continue
        hf_name = f.hf_name(t.name)
        ours = f.get(hf_name)
        if ".attn_q." in t.name or ".attn_k." in t.name:  # compare in the file's row order
            ours = llama_cpp_permute(ours, 4 if ".attn_q." in t.name else 2)
        raw = torch.from_numpy(np.array(t.data))
        if qtype == Q.F16:
            ref = raw.float()
        elif qtype == Q.BF16:
            ref = raw.contiguous().view(torch.bfloat16).float()
        else:
            from transformers.integrations.gguf.dequant import dequantize

            ref = dequantize(raw.reshape(-1), int(qtype))
        np.testing.assert_array_equal(ours, ref.numpy().reshape(ours.shape))
        hits += 1
    assert hits >= 1


def test_lossless_tensors_equal_the_original_weights(tiny):
    """F32 q/k (permuted by llama.cpp's rule, un-permuted by ours) are the HF tensors bit for bit."""
    _, sd, path = tiny
    f = GGUFFile(path)
    np.testing.assert_array_equal(f.get("model.layers.0.self_attn.q_proj.weight"),
                                  sd["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(f.get("model.layers.1.mlp.down_proj.weight"),
                                  sd["model.layers.1.mlp.down_proj.weight"])
    np.testing.assert_array_equal(f.get("model.layers.0.self_attn.k_proj.weight"),
                                  sd["model.layers.0.self_attn.k_proj.weight"].astype(np.float16).astype(np.float32))
    q4 = f.get("model.layers.0.self_attn.o_proj.weight")  # Q4_0: within half a quantization step
    ref = sd["model.layers.0.self_attn.o_proj.weight"]
    step = np.abs(ref).reshape(-1, 32).max(1) / 8
    assert (np.abs(q4 - ref).reshape(-1, 32).max(1) <= step * 1.01 + 1e-6).all()


def test_model_equals_transformers_gguf_loader(tiny):
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    _, _, path = tiny
    with transformers_reads_gguf_once():
        ref_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32).eval()
    ours = load_gguf_model(path)
    c = ours.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.rope_theta, c.tie_word_embeddings,
            c.rms_norm_eps, c.vocab_size) == (4, 2, 50000.0, False, pytest.approx(1e-6), 512)
    ids = np.random.default_rng(1).integers(3, 512, (2, 40))
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids, dtype=jnp.int32)))
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name", ["stories260k", "llama2-tokenizer"])
def test_sentencepiece_vocabulary_tokenizes_like_the_original(tmp_path, name):
    """A GGUF's llama vocabulary (pieces, scores, types) becomes a tokenizer.model with the
    original SentencePiece model's ids. GGUF keeps no normalizer: llama.cpp never collapses
    whitespace, so the original is read with `remove_extra_whitespaces` off (Llama-2's own
    setting; stories260k's model has it on)."""
    model_file = FIXTURES / name / "tokenizer.model"
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    add_llama_vocab(w, model_file)
    finish(w)
    out = tmp_path / "tok"
    files = write_hf_sidecar(path, out)
    assert {"tokenizer.model", "tokenizer_config.json"} <= set(files)
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = False
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    tok = Tokenizer(out)
    for text in TEXTS + ["12345 digits", "  \n\n  ", "😀 emoji falls back to bytes"]:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
    assert (tok.bos_id, tok.eos_id, tok.chat_bos) == (1, 2, True)


def _vocab_only(tmp_path, arch="llama", **fields):
    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model(fields.get("model", "gpt2"))
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    if "pre" in fields:
        w.add_tokenizer_pre(fields["pre"])
    finish(w)
    return path


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"GGUF architecture 'qwen2' is not supported"):
        GGUFFile(_vocab_only(tmp_path, arch="qwen2"))
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre 'jais' is not supported"):
        write_hf_sidecar(_vocab_only(tmp_path, pre="jais"), tmp_path / "out")
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model 'bert' is not supported"):
        write_hf_sidecar(_vocab_only(tmp_path, model="bert"), tmp_path / "out")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        GGUFFile(junk)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        GGUFFile(tmp_path / "missing.gguf")
