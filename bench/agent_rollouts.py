"""Agent rollouts benchmark: GSM8K Lumos-I episodes, ours vs the reference's loop (HF generate).

Llama-2-7B-shape planner and grounder (two random bf16 weight sets), reference prompt style.
Every turn generates exactly as many tokens as the gold annotation turn it replays (min = max
new tokens, stop ids ignored) and then continues with the gold text, so the compute is real
and each episode follows its annotation; tools (the maths Calculator) run for real. The
gold conversations are the GSM8K test rationales converted by the data pipeline's
deterministic converter (`lumos_jax.data.gsm8k`, the reference's conversion format).

Sides, each in its own subprocess (an OOM or crash loses only that side):
- `ours`: streaming `EpisodeRunner` over two paged-KV engines (prefix sharing, extension);
- `reference`: as allenai/lumos `eval/gsm/run_eval.py` — per module turn, HF `generate` over
  batches of `concurrency` prompts (left-padded to the longest), the whole prompt recomputed
  every turn, planner and grounder alternating over the whole set (both models stay loaded;
  the reference reloads them every round, not counted here; finished episodes drop out);
- `hf_compiled`: the same loop with HF's static cache, whose decoding `generate` compiles
  with `torch.compile` (prompts padded to multiples of 128 and batches to a fixed size so
  the compiled graphs are reused).

Figures per (side, concurrency): episodes/hour, generated tokens/s (forced tokens only),
prefill tokens computed vs prompt tokens seen, peak GPU memory. Timed from the first turn
to the last episode's end (compilation after the warm-up included).

    python bench/agent_rollouts.py --out $OUT/agent_rollouts.json          # GPU
    python bench/agent_rollouts.py --tiny --out /tmp/agent_rollouts.json   # CPU check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.sides import CompileClock, emit, run_sides, write_json  # noqa: E402

SIDES = ("ours", "reference", "hf_compiled")


def first_existing(*paths: Path) -> str:
    for p in paths:
        if p.exists():
            return str(p)
    return str(paths[-1])


DEFAULT_TOKENIZER = first_existing(REPO / ".benchdata/llama2-tokenizer", REPO.parent / "shared/fixtures/llama2-tokenizer")
DEFAULT_GSM8K = first_existing(REPO / ".benchdata/gsm8k_test.jsonl", REPO.parent / "shared/data/eval/gsm8k_test.jsonl")


# -- episodes ----------------------------------------------------------------------------------
def gold_episodes(path: str, n: int):
    """(tasks, ScriptedGenerator over their gold plan/ground conversations) for the first n
    GSM8K test problems that convert."""
    from lumos_jax.agent.generators import ScriptedGenerator
    from lumos_jax.data.gsm8k import convert_problem
    from lumos_jax.data.reference_conversion import convert_rows
    from lumos_jax.jsonl import iter_jsonl

    rows = []
    for _, problem in iter_jsonl(path):
        conv = convert_problem(problem)
        if conv.row is not None:
            rows.append(conv.row)
        if len(rows) == n:
            break
    convs = {m: [json.loads(x)["messages"] for x in convert_rows(rows, "maths", m, "iterative")[0]]
             for m in ("plan", "ground")}
    tasks = [c[0]["content"].split("Task: ", 1)[1].rsplit("; Initial Environment", 1)[0] for c in convs["plan"]]
    return tasks, ScriptedGenerator(convs)


def episode_config():
    from lumos_jax.agent.loops import EpisodeConfig

    return EpisodeConfig(domain="maths", formulation="iterative", style="reference", max_rounds=8)


def token_counter(tok):
    """Tokens the reference model would generate for a gold turn: the text, then the newline stop."""
    return lambda text: len(tok.encode(text.strip())) + 1


def plan_for(args) -> list[tuple[int, int]]:
    """(concurrency, episodes) pairs of a side."""
    out = []
    for c in (int(x) for x in args.concurrency.split(",")):
        n = c * args.episodes_per_slot if args.worker == "ours" else max(c, args.min_reference_episodes)
        out.append((c, min(n, args.max_episodes)))
    return out


# -- ours ----------------------------------------------------------------------------------------
def compilation_cache() -> None:
    """A persistent XLA compilation cache ($JAX_COMPILATION_CACHE_DIR, default /tmp/jax_cache),
    so a second process (the next side, the next run) reuses the compiled programs."""
    import os

    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", "/tmp/jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def random_engine(config, seed: int, **settings):
    """An Engine over random decode weights made on the device in one jitted call
    (`random_decode_params`): seconds at 7B, where building a random model takes minutes."""
    import jax

    from lumos_jax.inference import Engine
    from lumos_jax.inference.params import random_decode_params

    params, spec = random_decode_params(config, jax.random.PRNGKey(seed), config.dtype)
    return Engine.from_params(config, params, spec, **settings)


def run_ours(args) -> None:
    import jax

    from lumos_jax.agent.backends import EngineBackend
    from lumos_jax.agent.execution import Executor
    from lumos_jax.agent.generators import ChatModelGenerator
    from lumos_jax.agent.replay import GoldForcing
    from lumos_jax.agent.runner import EpisodeRunner
    from lumos_jax.agent.tools.registry import build_registry
    from lumos_jax.tokenization import Tokenizer

    compilation_cache()
    clock = CompileClock()
    dev = jax.devices()[0]
    peak = lambda: (dev.memory_stats() or {}).get("peak_bytes_in_use")  # noqa: E731
    tok = Tokenizer(args.tokenizer)
    count = token_counter(tok)
    t0 = time.perf_counter()
    config = model_config(args)
    engines = {}
    for seed, m in enumerate(("plan", "ground")):
        engines[m] = random_engine(config, seed, num_slots=args.slots, max_len=args.max_len,
                                   steps_per_call=args.steps_per_call, max_prefill_tokens=args.max_prefill_tokens,
                                   kv_memory_gb=args.kv_memory_gb, decode_attention=args.attention,
                                   precompile_threads=args.precompile_threads)
    emit(side="ours", event="setup", device=str(dev.device_kind), seconds=round(time.perf_counter() - t0, 1),
         blocks=engines["plan"].num_blocks, peak_bytes=peak(), **clock.read())
    registry = build_registry("maths")
    plan = plan_for(args)
    tasks, gold = gold_episodes(args.gsm8k, max(n for _, n in plan) + args.warmup)

    def rollout(c: int, chosen: list[str]) -> dict:
        gens = {m: GoldForcing(ChatModelGenerator(EngineBackend(e), tok, style="reference", max_new_tokens=512),
                               gold, count) for m, e in engines.items()}
        before = {m: dict(e.stats) for m, e in engines.items()}
        runner = EpisodeRunner(gens, lambda i: (Executor(registry), None), episode_config(), max_concurrent=c)
        t = time.perf_counter()
        results = runner.run(chosen)
        seconds = time.perf_counter() - t
        delta = lambda k: sum(e.stats[k] - before[m][k] for m, e in engines.items())  # noqa: E731
        return dict(seconds=seconds, episodes=len(results),
                    failed=sum(not r.ok for r in results), tokens=sum(g.forced_tokens for g in gens.values()),
                    prefill=delta("prefill_tokens"), prompt=delta("prompt_tokens"),
                    saved=delta("prefix_saved_tokens"), evictions=delta("evictions"),
                    preemptions=delta("preemptions"), mismatches=len(gold.mismatches),
                    prefill_s=round(delta("prefill_s"), 2), decode_s=round(delta("decode_s"), 2),
                    decode_calls=delta("decode_calls"), decode_steps=delta("decode_steps"),
                    decode_row_steps=delta("decode_row_steps"))

    if args.warmup:
        w = rollout(min(args.warmup, plan[0][0]), tasks[-args.warmup:])
        emit(side="ours", event="warmup", seconds=round(w["seconds"], 1), episodes=w["episodes"], **clock.read())
    t = time.perf_counter()
    left = sum(e.programs.wait() for e in engines.values())   # no compile inside a timed window
    emit(side="ours", event="precompiled", seconds=round(time.perf_counter() - t, 1), still_building=left,
         **clock.read())
    for c, n in plan:
        before = clock.read()
        r = rollout(c, tasks[:n])
        after = clock.read()
        # where the time went: device calls (prefill_s, decode_s: launch to results on the host),
        # the rest is the host; decode_row_steps / decode_steps = rows busy per decode step
        extra = {k: r[k] for k in ("failed", "saved", "evictions", "preemptions", "mismatches", "prefill_s",
                                   "decode_s", "decode_calls", "decode_steps", "decode_row_steps")}
        extra.update(compiles=after["compiles"] - before["compiles"],
                     compile_s=round(after["compile_s"] - before["compile_s"], 1))
        emit(side="ours", **row(c, r, peak()), extra=extra)


def row(c: int, r: dict, peak_bytes) -> dict:
    return dict(concurrency=c, episodes=r["episodes"], seconds=round(r["seconds"], 2),
                episodes_per_hour=round(3600 * r["episodes"] / r["seconds"], 1),
                generated_tok_s=round(r["tokens"] / r["seconds"], 1), prefill_tokens=int(r["prefill"]),
                prompt_tokens=int(r["prompt"]),
                peak_gb=round(peak_bytes / 2**30, 2) if peak_bytes else None)


def model_config(args):
    from lumos_jax.models import PRESETS

    c = PRESETS[args.preset].replace(param_dtype=args.dtype, dtype=args.dtype)
    return c.replace(vocab_size=32001) if args.tiny else c


# -- the reference loop (HF transformers) --------------------------------------------------------
def run_hf(args) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lumos_jax.agent.execution import Executor
    from lumos_jax.agent.generators import GenOutput, GenRequest
    from lumos_jax.agent.loops import Generate, episode
    from lumos_jax.agent.tools.registry import build_registry
    from lumos_jax.tokenization import Tokenizer, reference_prompt_text

    compiled = args.worker == "hf_compiled"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    c = model_config(args)
    hf_config = LlamaConfig(**{k: v for k, v in c.to_hf_dict().items()
                               if k not in ("torch_dtype", "dtype", "architectures")})
    t0 = time.perf_counter()
    torch.set_default_dtype(dtype)
    models = {}
    for seed, m in enumerate(("plan", "ground")):
        torch.manual_seed(seed)
        with torch.device(device):
            models[m] = LlamaForCausalLM(hf_config).eval()
    torch.set_default_dtype(torch.float32)
    htok = AutoTokenizer.from_pretrained(args.tokenizer)
    htok.padding_side = "left"
    pad = 0
    peak = (lambda: torch.cuda.max_memory_allocated()) if device == "cuda" else (lambda: None)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    emit(side=args.worker, event="setup", seconds=round(time.perf_counter() - t0, 1), peak_bytes=peak())
    count = token_counter(Tokenizer(args.tokenizer))
    registry = build_registry("maths")
    plan = plan_for(args)
    tasks, gold = gold_episodes(args.gsm8k, max(n for _, n in plan))
    stats = {"prefill": 0, "prompt": 0, "tokens": 0}

    def generate(module: str, texts: list[str], n: int, rows: int) -> None:
        enc = htok(texts, add_special_tokens=False)["input_ids"]
        longest = max(len(x) for x in enc)
        width = -(-longest // 128) * 128 if compiled else longest
        batch = enc + [enc[0]] * (rows - len(enc))
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
        kw = dict(cache_implementation="static") if compiled else {}
        with torch.no_grad():
            models[module].generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                    eos_token_id=None, pad_token_id=pad, **kw)
        stats["prefill"] += rows * width
        stats["prompt"] += sum(len(x) for x in enc)

    def rollout(conc: int, chosen: list[str]) -> dict:
        """run_eval.py's loop: plan for every live episode (batches of `conc`), then ground,
        then tools; until every episode has ended."""
        for k in stats:
            stats[k] = 0
        eps = {i: episode(t, episode_config(), Executor(registry)) for i, t in enumerate(chosen)}
        pending = {i: next(g) for i, g in eps.items()}

        def advance(i: int, value) -> None:
            try:
                p = eps[i].send(value)
                while not isinstance(p, Generate):  # tool work runs inline, as in run_eval.py
                    p = eps[i].send(p.fn())
                pending[i] = p
            except StopIteration:
                del pending[i]

        t = time.perf_counter()
        while pending:
            for module in ("plan", "ground"):
                live = [i for i, p in pending.items() if isinstance(p, Generate) and p.module == module]
                for lo in range(0, len(live), conc):
                    chunk = live[lo: lo + conc]
                    reqs = [GenRequest(f"{i}/{module}", module, list(pending[i].messages)) for i in chunk]
                    golds = [gold.answer(r).text for r in reqs]
                    counts = [count(g) for g in golds]
                    rows = conc if compiled and len(chunk) > conc // 2 else len(chunk)
                    generate(module, [reference_prompt_text(r.messages) for r in reqs], max(counts), rows)
                    stats["tokens"] += sum(counts)
                    for i, g in zip(chunk, golds):
                        advance(i, GenOutput(text=g))
        sync()
        return dict(seconds=time.perf_counter() - t, episodes=len(chosen), tokens=stats["tokens"],
                    prefill=stats["prefill"], prompt=stats["prompt"])

    for conc, n in plan:
        if compiled:  # compile the decode graph for this batch size before timing
            w = time.perf_counter()
            generate("plan", ["warm up"], 4, conc)
            generate("ground", ["warm up"], 4, conc)
            emit(side=args.worker, event="warmup", concurrency=conc, seconds=round(time.perf_counter() - w, 1))
        try:
            r = rollout(conc, tasks[:n])
        except torch.OutOfMemoryError as e:
            emit(side=args.worker, concurrency=conc, episodes=n, error=f"out of memory: {str(e)[:120]}")
            torch.cuda.empty_cache()
            continue
        emit(side=args.worker, **row(conc, r, peak()))
        if device == "cuda":
            torch.cuda.empty_cache()


# -- driver --------------------------------------------------------------------------------------
def drive(args, argv) -> int:
    record = {"card": None, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "model": "tiny" if args.tiny else "llama2_7b", "command": "python bench/agent_rollouts.py " + " ".join(argv),
              "rows": [], "events": [], "errors": []}

    def on_result(res: dict) -> None:
        if res.get("event") == "setup" and res.get("device"):
            record["card"] = res["device"]
        (record["events"] if "event" in res or "error" in res else record["rows"]).append(res)
        write_json(args.out, record)

    status = run_sides(__file__, args, argv, REPO, record, on_result)
    print(json.dumps(record["rows"], indent=1))
    return status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--preset", default="llama2_7b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--concurrency", default="16,64,256")
    p.add_argument("--episodes_per_slot", type=int, default=2, help="ours: episodes = concurrency x this")
    p.add_argument("--min_reference_episodes", type=int, default=16)
    p.add_argument("--max_episodes", type=int, default=1319)
    p.add_argument("--warmup", type=int, default=16, help="ours: untimed episodes first (compilation)")
    p.add_argument("--slots", type=int, default=512, help="ours: engine slots (a slot is a block-table row)")
    p.add_argument("--max_len", type=int, default=4096)
    p.add_argument("--steps_per_call", type=int, default=16)
    p.add_argument("--max_prefill_tokens", type=int, default=16384)
    p.add_argument("--kv_memory_gb", type=float, default=40.0, help="ours: KV pool per engine")
    p.add_argument("--attention", default="auto", help="ours: engine decode_attention (auto: pallas_gpu on GPU)")
    p.add_argument("--precompile_threads", type=int, default=0,
                   help="ours: engine programs compiled ahead in this many threads (the second engine's "
                        "come from the persistent compilation cache)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--gsm8k", default=DEFAULT_GSM8K)
    p.add_argument("--timeout_ours", type=float, default=300)
    p.add_argument("--timeout_hf", type=float, default=200)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU, few episodes")
    p.add_argument("--out", help="JSON results file")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.dtype = "tiny", "float32"
        args.concurrency = "2,4" if args.concurrency == "16,64,256" else args.concurrency
        args.min_reference_episodes, args.max_episodes, args.warmup = 2, 8, 2
        args.slots, args.max_len, args.kv_memory_gb = 16, 2048, None
    if args.worker == "ours":
        run_ours(args)
        return 0
    if args.worker in ("reference", "hf_compiled"):
        run_hf(args)
        return 0
    return drive(args, argv)


if __name__ == "__main__":
    sys.exit(main())
