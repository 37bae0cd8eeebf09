"""`lumos-jax generate`, and `greedy_generate`, a one-call wrapper over the engine.

Both run on `lumos_jax.inference.Engine` (jitted prefill, while-loop decode, KV cache
slots, continuous batching). Prompts come from `--prompt`, a text/JSONL file or stdin;
results are JSONL, written to a temporary file and renamed so no half file is left.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import gin

from lumos_jax.atomic import write_atomic
from lumos_jax.config import parse_args
from lumos_jax.inference import Engine, SamplingParams
from lumos_jax.inference.chat import chat_format, chat_prompt_ids
from lumos_jax.inference.paged_slots import pow2_at_least as _pow2
from lumos_jax.inference.settings import load_engines, make_sampling
from lumos_jax.jsonl import iter_jsonl
from lumos_jax.models.llama import LlamaForCausalLM
from lumos_jax.tokenization import Tokenizer


def greedy_generate(model: LlamaForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """Greedy continuations of token-id prompts (each row stops at its first stop id,
    which is included in its output)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token")
    longest = max(len(p) for p in prompts) + max_new_tokens
    engine = Engine(model, num_slots=min(_pow2(len(prompts)), 64),
                    max_len=max(16, _pow2(longest)), steps_per_call=32)
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids))
    return [r.tokens for r in engine.generate(prompts, params)]


@gin.configurable
def generation_settings(max_new_tokens: int = 128, stop_at_eos: bool = True,
                        add_bos: bool = True) -> dict:
    return dict(max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos, add_bos=add_bos)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lumos-jax generate", description=__doc__)
    parser.add_argument("--model", required=True, help="HF directory or lumos-jax checkpoint")
    parser.add_argument("--tokenizer", help="tokenizer directory or tokenizer.model (default: --model)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts_file", help="text file, one prompt per line, or JSONL with "
                        "'prompt' (text) or 'messages' (chat) per line")
    parser.add_argument("--chat", action="store_true",
                        help="wrap plain prompts as one user turn in the Lumos chat template")
    parser.add_argument("--output", help="JSONL output (default stdout)")
    args = parse_args(parser, argv)
    settings = generation_settings()
    records = [{"prompt": p} for p in args.prompt]
    if args.prompts_file:
        records += _read_prompts(args.prompts_file)
    if not records:
        records = [{"prompt": line.rstrip("\n")} for line in sys.stdin if line.strip()]
    if not records:
        raise ValueError("generate: no prompts (use --prompt, --prompts_file or stdin)")
    tok = Tokenizer(args.tokenizer or args.model, add_pad_token=False)
    fmt = chat_format()
    ids = []
    for rec in records:
        if "messages" in rec or args.chat:
            messages = rec.get("messages") or [{"role": "user", "content": rec["prompt"]}]
            ids.append(chat_prompt_ids(messages, tok, fmt))
        else:
            ids.append(tok.encode(rec["prompt"], add_bos=settings["add_bos"]))
    (engine,) = load_engines([args.model], tokenizer=tok).values()
    sampling = make_sampling(settings["max_new_tokens"],
                             [tok.eos_id] if settings["stop_at_eos"] else [])
    results = engine.generate(ids, sampling)
    lines = []
    for rec, r in zip(records, results):
        lines.append(json.dumps({**rec, "completion": r.text, "completion_ids": r.tokens,
                                 "finish_reason": r.finish_reason}, ensure_ascii=False))
    text = "".join(line + "\n" for line in lines)
    if args.output:
        write_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def _read_prompts(path: str) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: prompts file does not exist")
    if not path.endswith(".jsonl"):
        return [{"prompt": line} for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for n, rec in iter_jsonl(p):
        ok = isinstance(rec, dict) and (isinstance(rec.get("prompt"), str)
                                        or isinstance(rec.get("messages"), list))
        if not ok:
            raise ValueError(f"{path}:{n}: expected an object with a 'prompt' string or a "
                             "'messages' list")
        records.append(rec)
    return records
