"""The agents of bench/reproduce_small.py: a one-turn direct answerer (base zero-shot and the
CoT-trained model) streamed through one engine, and Lumos planner + grounder engines shared by
the datasets' episode settings."""

from __future__ import annotations

import re
import time
from pathlib import Path

from lumos_jax.agent.gin_configurables import agent_episode
from lumos_jax.evaluation.experiment import ALL_DATASETS
from lumos_jax.evaluation.lumos_adapter import LumosEvalAgent, lumos_agent
from lumos_jax.inference import SamplingParams
from lumos_jax.inference.chat import chat_prompt_ids
from lumos_jax.inference.settings import load_engines
from lumos_jax.tokenization import Tokenizer

ZERO_SHOT = "{question}\nSolve it step by step, then give the final answer as a number after '####'."
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The number after the last '####', else the last number; '$' and commas dropped."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    value = (found[0] if "####" in text else found[-1]).replace("$", "").replace(",", "")
    return value.rstrip("0").rstrip(".") if "." in value else value  # "18.00" -> "18", as a gold reads


class DirectAnswerAgent:
    """Greedy answer to the question in one turn, streamed through one engine (continuous
    batching): the CoT model in the Lumos training format it was trained on, the base model
    in its own chat template."""

    def __init__(self, engine, tok: Tokenizer, chat_template: bool, max_new_tokens: int):
        self.engine, self.tok = engine, tok
        self.template = chat_template and tok.chat_template is not None
        stops = {tok.eos_id} | {tok.special_id(t) for t in ("<|im_end|>", "<|endoftext|>")} - {None}
        self.params = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=tuple(sorted(stops)))

    def prompt(self, question: str) -> list[int]:
        if self.template:
            msgs = [{"role": "user", "content": ZERO_SHOT.format(question=question)}]
            text = self.tok.apply_chat_template(msgs)
            return self.tok.encode(text, add_bos=self.tok.chat_bos)
        return chat_prompt_ids([{"role": "user", "content": question}], self.tok, "train")

    def result(self, tokens) -> dict:
        text = self.tok.decode(tokens)
        return {"answer": final_number(text), "trace": [{"output": text}], "stopped": True}

    def stream(self, examples, concurrency: int):
        """(index, result, seconds) as each answer ends; the engine admits queued prompts as
        slots free up (its slots bound the concurrency)."""
        tag, start = object(), {}
        for i, ex in enumerate(examples):
            try:
                self.engine.submit(self.prompt(ex.question), self.params, request_id=(tag, i))
            except ValueError as e:  # e.g. a prompt longer than max_len: that question fails alone
                yield i, {"answer": None, "trace": [], "stopped": False, "error": str(e).split(":")[0]}, 0.0
                continue
            start[i] = time.perf_counter()
        while start:
            for r in self.engine.step():
                owner, i = r.request_id
                if owner is tag:
                    yield i, self.result(r.tokens), time.perf_counter() - start.pop(i)

    def run_batch(self, examples):
        return [r for _, r, _ in sorted(self.stream(examples, len(examples)), key=lambda x: x[0])]


class LumosAgents:
    """One planner + grounder engine pair shared by the datasets' agents (the episode settings,
    e.g. max rounds, differ per dataset; the weights and KV pool do not)."""

    def __init__(self, args, base: Path, formulation: str, plan: Path, ground: Path, first: str):
        self.args, self.formulation = args, formulation
        self.first = lumos_agent(domain="maths", metric=ALL_DATASETS[first][1],
                                 default_max_rounds=ALL_DATASETS[first][2], examples=[],
                                 planner_path=str(plan), grounder_path=str(ground), tokenizer_path=str(base),
                                 formulation=formulation, prompt_style=args.prompt_style,
                                 max_new_tokens=args.max_new_tokens, engine_slots=args.concurrency,
                                 engine_max_len=args.max_len, max_concurrent=args.concurrency,
                                 protocol=args.protocol)

    def for_dataset(self, dataset: str):
        domain, metric, rounds, _ = ALL_DATASETS[dataset]
        cfg = agent_episode(domain=domain, formulation=self.formulation, style=self.args.prompt_style,
                            max_rounds=rounds, protocol=self.args.protocol, yes_no=metric == "yes_no")
        return LumosEvalAgent(self.first.generators, cfg, self.first.registry_for,
                              max_concurrent=self.args.concurrency)


def direct_agents(args, model: Path, base: Path, chat_template: bool):
    engine = load_engines([str(model)], num_slots=args.concurrency, max_len=args.max_len,
                          steps_per_call=args.steps_per_call)[str(model)]
    agent = DirectAnswerAgent(engine, Tokenizer(base), chat_template, args.cot_max_new_tokens)
    return lambda dataset: agent


def engine_counters(agent) -> dict:
    """Summed counters of the engines behind an agent's generators (the KV pool's work:
    prompt tokens seen, tokens prefilled, prefix tokens saved, evictions, preemptions)."""
    gens = getattr(agent, "generators", None)
    engines = [agent.engine] if hasattr(agent, "engine") else []
    for g in (gens or {}).values():
        engine = getattr(getattr(g, "backend", None), "engine", None)
        if engine is not None and all(engine is not e for e in engines):
            engines.append(engine)
    total: dict = {}
    for e in engines:
        for k, v in e.stats.items():
            if isinstance(v, (int, float)) and not k.startswith("blocks_"):
                total[k] = total.get(k, 0) + v
    return total
