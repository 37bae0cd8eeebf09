"""gin entry points of the agent: episode settings, models/generators, tools.

Imported up front by `lumos_jax.config` so gin files may bind `agent_episode.*`,
`agent_models.*` and `agent_tools.*` (the latter lives in `tools/registry.py`).
"""

from __future__ import annotations

from pathlib import Path

import gin

from lumos_jax.agent.backends import EngineBackend, GreedyBackend
from lumos_jax.agent.generators import ChatModelGenerator, ScriptedGenerator
from lumos_jax.agent.loops import EpisodeConfig
from lumos_jax.agent.prompts import check, load_webshop_exemplars, webshop_exemplar_conversations
from lumos_jax.agent.tools import registry as _registry  # noqa: F401 - registers agent_tools
from lumos_jax.assets import bundled
from lumos_jax.checkpoints.native import load_model
from lumos_jax.inference.settings import load_engines
from lumos_jax.tokenization import Tokenizer

DEFAULT_MAX_ROUNDS = {"maths": 8, "complex_qa": 5, "web_agent": 15, "webshop": 5}
BUNDLED_ANNOTATIONS = bundled("demo_data/annotations")  # the 12 sample annotation files
BUNDLED_WEBSHOP_EXEMPLARS = bundled("demo_data/webshop_incontext_exemplars.jsonl")


@gin.configurable
def agent_episode(domain: str = "maths", formulation: str = "iterative", style: str = "train",
                  max_rounds: int | None = None, final_answer_qa: bool = True,
                  webshop_exemplars: str | None = None, protocol: str = "robust",
                  yes_no: bool = False) -> EpisodeConfig:
    """Max rounds default to the reference's: GSM8K 8, StrategyQA/HotpotQA 5, WebShop 5, Mind2Web 15.
    WebShop puts the reference's two exemplars (`webshop_exemplars`, default the bundled
    copy) before the task, as the reference's unseen-task prompt does."""
    check(domain, style)
    if protocol not in ("reference", "robust"):
        raise ValueError(f"agent_episode.protocol={protocol!r}: expected 'reference' or 'robust'")
    if formulation not in ("iterative", "onetime"):
        raise ValueError(f"agent_episode.formulation={formulation!r}: expected 'iterative' or 'onetime'")
    rounds = max_rounds if max_rounds is not None else DEFAULT_MAX_ROUNDS.get(domain, 8)
    if rounds < 1:
        raise ValueError(f"agent_episode.max_rounds={rounds}: must be >= 1")
    plan_prefix, ground_prefix = [], []
    if domain == "webshop":
        path = webshop_exemplars or str(BUNDLED_WEBSHOP_EXEMPLARS)
        plans, grounds = webshop_exemplar_conversations(load_webshop_exemplars(path))
        plan_prefix = [m for c in plans for m in c]
        ground_prefix = [m for c in grounds for m in c]
    return EpisodeConfig(domain=domain, formulation=formulation, style=style, max_rounds=rounds,
                         final_answer_qa=final_answer_qa, plan_prefix=plan_prefix, ground_prefix=ground_prefix,
                         protocol=protocol, yes_no=yes_no)


# engine sizes are gin's `engine_settings` alone (lumos_jax.config.MOVED names the old keys);
# these keyword arguments stay for Python callers (the demo, benchmarks) as overrides
@gin.configurable(denylist=["engine_slots", "engine_max_len", "engine_steps_per_call"])
def agent_models(cfg: EpisodeConfig, backend: str = "scripted", plan_model: str | None = None,
                 ground_model: str | None = None, qa_model: str | None = None, tokenizer: str | None = None,
                 max_new_tokens: int = 512, scripted_dir: str | None = None, engine_slots: int | None = None,
                 engine_max_len: int | None = None, engine_steps_per_call: int | None = None,
                 reference_retokenize: bool = True) -> dict:
    """Generators per module ("plan", "ground", optionally "qa").

    backend: 'scripted' (replay `lumos_{domain}_{plan,ground}_{formulation}.jsonl` from
    `scripted_dir`), 'greedy' (lumos_jax.generation, recomputes prompts), or 'engine'
    (lumos_jax.inference.Engine, cache extension; loaded by `inference.settings.load_engines`:
    inference dtypes and mesh, one KV budget for all models; sizes from `engine_settings`,
    `engine_*` arguments override them). Model paths are HF dirs or our
    checkpoints; one path may serve several modules (a unified model).
    `reference_retokenize` (reference style): True re-tokenizes each whole prompt as the
    reference does; False appends the new turn's tokens (no cache restarts)."""
    if backend == "scripted":
        g = ScriptedGenerator.from_files(*scripted_files(cfg, scripted_dir))
        return {"plan": g, "ground": g}
    if backend not in ("greedy", "engine"):
        raise ValueError(f"agent_models.backend={backend!r}: expected 'scripted', 'greedy' or 'engine'")
    if not plan_model or not ground_model:
        raise ValueError("agent_models: set plan_model and ground_model (HF dirs or lumos-jax checkpoints)")

    tok = Tokenizer(tokenizer or plan_model)
    modules = [(m, str(p)) for m, p in (("plan", plan_model), ("ground", ground_model), ("qa", qa_model)) if p]
    loaded: dict[str, object] = {}
    if backend == "engine":
        sizes = dict(num_slots=engine_slots, max_len=engine_max_len, steps_per_call=engine_steps_per_call)
        engines = load_engines([p for _, p in modules], **{k: v for k, v in sizes.items() if v is not None})
        loaded = {p: EngineBackend(e) for p, e in engines.items()}
    gens: dict[str, object] = {}
    for module, path in modules:
        if path not in loaded:
            loaded[path] = GreedyBackend(load_model(path))
        gens[module] = ChatModelGenerator(loaded[path], tok, style=cfg.style if module != "qa" else "train",
                                          max_new_tokens=max_new_tokens if module != "qa" else 100,
                                          retokenize=reference_retokenize)
    return gens


def scripted_files(cfg: EpisodeConfig, scripted_dir: str | None = None) -> tuple[Path, Path]:
    """The plan and ground annotation files the scripted backend replays (default: bundled)."""
    base = Path(scripted_dir) if scripted_dir else BUNDLED_ANNOTATIONS
    name = f"lumos_{cfg.domain}_{{}}_{cfg.formulation}.jsonl"
    plan, ground = base / name.format("plan"), base / name.format("ground")
    for p in (plan, ground):
        if not p.exists():
            raise FileNotFoundError(f"agent_models.scripted_dir: {p} not found")
    return plan, ground
