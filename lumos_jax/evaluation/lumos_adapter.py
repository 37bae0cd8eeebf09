"""`lumos_agent`: the evaluator's agent built from the agent runtime (lumos_jax.agent).

Placeholder until the runtime's loops land.
"""

from __future__ import annotations

from typing import Any

import gin


@gin.configurable
def lumos_agent(domain: str, metric: str, default_max_rounds: int, examples: list,
                planner_path: str = gin.REQUIRED, grounder_path: str = gin.REQUIRED,
                formulation: str = "iterative", max_rounds: int | None = None, prompt_style: str = "reference",
                max_new_tokens: int = 512, dtype: str = "bfloat16") -> Any:
    raise NotImplementedError("lumos_agent: the agent runtime is not available in this build")
