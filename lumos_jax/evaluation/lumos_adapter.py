"""`lumos_agent`: the evaluator's agent built on the agent runtime (`lumos_jax.agent`).

Each batch of examples becomes one `EpisodeRunner.run` (episodes advance together, one
generation call per module per pass). Per example the tools get their own registry, so a
HotpotQA distractor question searches only its own 10 paragraphs (`meta["documents"]`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import gin

from lumos_jax.agent.execution import Executor
from lumos_jax.agent.gin_configurables import agent_episode, agent_models
from lumos_jax.agent.runner import EpisodeRunner
from lumos_jax.agent.tools.qa import GeneratorQA
from lumos_jax.agent.tools.registry import build_registry
from lumos_jax.agent.tools.retrieval import DocStore
from lumos_jax.evaluation.agents import AgentResult
from lumos_jax.evaluation.datasets import Example
from lumos_jax.evaluation.mind2web_agent import Mind2WebStepAgent


def episode_to_result(ep) -> AgentResult:
    """An agent `EpisodeResult` as the evaluator's `AgentResult` (trace = its events)."""
    reason = ep.reason or ""
    ok = reason in ("stopped", "max_rounds", "done")
    return AgentResult(answer=ep.answer, trace=list(ep.trace.events), rounds=max(int(ep.rounds), 0),
                       stopped=reason in ("stopped", "done"),
                       error=None if ok else reason.split(":")[0].strip() or "agent_error")


def documents_store(documents: Sequence[dict]):
    return DocStore([(str(d["title"]), str(d["text"])) for d in documents])


class LumosEvalAgent:
    """Runs Lumos-I / Lumos-O episodes for a batch of examples."""

    def __init__(self, generators: dict, cfg, registry_for: Callable[[Example], Any],
                 max_concurrent: int = 64, tool_workers: int = 4):
        self.generators, self.cfg, self.registry_for = generators, cfg, registry_for
        self.max_concurrent, self.tool_workers = max_concurrent, tool_workers
        self.last_stats = None

    def run_batch(self, examples: Sequence[Example]) -> list[AgentResult]:
        registries = [self.registry_for(ex) for ex in examples]
        runner = EpisodeRunner(self.generators, lambda i: (Executor(registries[i]), None), self.cfg,
                               max_concurrent=self.max_concurrent, tool_workers=self.tool_workers)
        results = runner.run([ex.question for ex in examples])
        self.last_stats = runner.stats
        return [episode_to_result(r) for r in results]

    def stream(self, examples: Sequence[Example], concurrency: int):
        """(index, result, seconds) as each episode ends; at most `concurrency` episodes live,
        each example's tools built only when its episode starts (the evaluator's streaming
        seam: no batch barriers)."""
        runner = EpisodeRunner(self.generators, lambda i: (Executor(self.registry_for(examples[i])), None),
                               self.cfg, max_concurrent=concurrency, tool_workers=self.tool_workers)
        self.last_stats = runner.stats
        for i, result, seconds in runner.stream(enumerate(ex.question for ex in examples)):
            yield i, episode_to_result(result), seconds

    def __call__(self, example: Example) -> AgentResult:
        return self.run_batch([example])[0]


def make_registry_factory(domain: str, qa_backend=None, use_example_documents: bool = True,
                          **tool_kwargs) -> Callable[[Example], Any]:
    """Tools per example: the domain's registry; with per-question documents when present."""
    kwargs = dict(tool_kwargs)
    if qa_backend is not None:
        kwargs["qa_backend"] = qa_backend

    def factory(example: Example):
        registry = build_registry(domain, **kwargs)
        docs = example.meta.get("documents") if use_example_documents else None
        if docs and "KnowledgeQuery" in registry:
            registry.get("KnowledgeQuery").store = documents_store(docs)
        return registry

    return factory


@gin.configurable(denylist=["engine_slots", "engine_max_len"])  # gin: engine_settings (config.MOVED)
def lumos_agent(domain: str, metric: str, default_max_rounds: int, examples: list,
                planner_path: str | None = None, grounder_path: str | None = None,
                qa_model_path: str | None = None, tokenizer_path: str | None = None,
                formulation: str = "iterative", max_rounds: int | None = None,
                prompt_style: str = "reference", max_new_tokens: int = 512, backend: str = "engine",
                engine_slots: int | None = None, engine_max_len: int | None = None, scripted_dir: str | None = None,
                doc_store: str | None = None, use_example_documents: bool = True,
                max_concurrent: int = 64, protocol: str = "robust"):
    """The Lumos agent of an eval experiment. `backend`: 'engine' (inference Engine with KV
    cache reuse), 'greedy' (plain generator) or 'scripted' (replays annotations from
    `scripted_dir`). `qa_model_path`: the model answering the QA tool (complex QA); the
    paper used GPT-3.5/4 there (`agent_tools.qa_endpoint` for an OpenAI-compatible one).
    `protocol` (set from `eval_experiment.protocol`): 'reference' runs the episodes, tools and
    Mind2Web steps as the reference's scripts do; 'robust' is ours (docs/evaluation.md).
    Engine sizes come from gin's `engine_settings`; `engine_slots` / `engine_max_len`
    override them for Python callers."""
    cfg = agent_episode(domain=domain, formulation=formulation, style=prompt_style,
                        max_rounds=max_rounds or default_max_rounds, protocol=protocol,
                        yes_no=metric == "yes_no")
    if backend == "scripted":
        gens = agent_models(cfg, backend="scripted", scripted_dir=scripted_dir)
    else:
        if not planner_path or not grounder_path:
            raise ValueError("lumos_agent: set planner_path and grounder_path (HF dirs or lumos-jax checkpoints)")
        gens = agent_models(cfg, backend=backend, plan_model=planner_path, ground_model=grounder_path,
                            qa_model=qa_model_path, tokenizer=tokenizer_path, max_new_tokens=max_new_tokens,
                            engine_slots=engine_slots, engine_max_len=engine_max_len)
    if metric == "mind2web_step_sr":  # the reference's teacher-forced step-level protocol

        return Mind2WebStepAgent(gens, style=prompt_style, protocol=protocol)
    qa = GeneratorQA(gens["qa"]) if "qa" in gens else None
    tool_kwargs = {"doc_store": doc_store} if doc_store else {}
    tool_kwargs.update(protocol=protocol, qa_yes_no=metric == "yes_no")
    registry_for = make_registry_factory(domain, qa, use_example_documents, **tool_kwargs)
    return LumosEvalAgent(gens, cfg, registry_for, max_concurrent=max_concurrent)
