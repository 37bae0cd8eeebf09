"""VQA (Lumos's multimodal domain): an interface only, no backend ships.

The reference answers `VQA([image], Question: q)` with LLaVA. A backend needs: the image
(path or bytes, taken from the episode's environment as `ctx.env.image`), a question, and
returns a short answer string. Plug one in with `VQA(backend=MyBackend())`, where
`MyBackend.answer(image, question) -> str`; until then the tool reports a clear error
observation and the episode goes on.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from lumos_jax.agent.tools.base import BadArguments, Tool, ToolContext, ToolError


class VQABackend(Protocol):
    def answer(self, image: Any, question: str) -> str: ...


class VQA(Tool):
    name = "VQA"
    description = "Answer a question about the given image"

    def __init__(self, backend: VQABackend | None = None):
        self.backend = backend

    def __call__(self, args: str, ctx: ToolContext) -> str:
        parts = re.split(r",\s*(?:question|query)\s*:\s*", args, maxsplit=1, flags=re.I)
        if len(parts) != 2 or not parts[1].strip():
            raise BadArguments("VQA expects '([image], Question: q)'")
        if self.backend is None:
            raise ToolError("VQA: no backend configured (see lumos_jax/agent/tools/vqa.py)")
        image = getattr(ctx.env, "image", None)
        if image is None:
            raise ToolError("VQA: the episode has no image (ctx.env.image)")
        return str(self.backend.answer(image, ctx.substitute(parts[1].strip())))
