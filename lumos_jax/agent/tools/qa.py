"""QA: answer a question from context with an LLM — ours (through a Generator) or any
OpenAI-compatible endpoint. The prompt is the reference's QA prompt (`eval/*/qa_tool.py`);
the answer is the text after "Answer: ".
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from typing import Protocol, Sequence

from lumos_jax.agent.tools.base import BadArguments, Tool, ToolContext, ToolError, VARIABLE_RE, value_text

QA_PROMPT = ("Please answer the following question according to the context. Please answer with one brief "
             "entity, beginning with 'Answer: '. If the answer can't be found in the context, answer 'No "
             "answer'. No more details and explanations.\n\nQuestion: {question}\nContext: {context}\n")


class QABackend(Protocol):
    def complete(self, prompts: Sequence[str]) -> list[str]:
        """One completion per prompt (a single user turn each)."""


class GeneratorQA:
    """Our own model through a `Generator` (module "qa"); each question is a fresh session."""

    def __init__(self, generator, module: str = "qa"):
        self.generator, self.module = generator, module
        self._n = 0

    def complete(self, prompts: Sequence[str]) -> list[str]:
        from lumos_jax.agent.generators import GenRequest

        reqs = []
        for p in prompts:
            self._n += 1
            reqs.append(GenRequest(session=f"qa-{id(self)}-{self._n}", module=self.module,
                                   messages=[{"role": "user", "content": p}]))
        outs = self.generator.generate(reqs)
        for r in reqs:
            self.generator.release(r.session)
        return [o.text for o in outs]


class OpenAIQA:
    """An OpenAI-compatible `/v1/chat/completions` endpoint (off unless configured)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 max_tokens: int = 100):
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.timeout_s, self.max_tokens = timeout_s, max_tokens

    def complete(self, prompts: Sequence[str]) -> list[str]:
        out = []
        key = os.environ.get(self.api_key_env, "")
        for p in prompts:
            body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                               "messages": [{"role": "user", "content": p}]}).encode()
            req = urllib.request.Request(self.base_url + "/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {key}"} if key else {})})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:  # noqa: S310
                    data = json.loads(r.read().decode("utf-8"))
                out.append(data["choices"][0]["message"]["content"])
            except (OSError, KeyError, IndexError, json.JSONDecodeError) as e:
                raise ToolError(f"QA endpoint {self.base_url}: {type(e).__name__}: {e}") from None
        return out


def extract_answer(text: str) -> str:
    """"Answer: X" -> X (first line); text without the marker is returned stripped."""
    t = (text or "").strip()
    m = re.search(r"Answer:\s*(.*)", t)
    ans = (m.group(1) if m else t).split("\n")[0].strip()
    return ans


_QUESTION_SPLIT = re.compile(r",\s*(?:question|query)\s*:\s*", re.I)


class QA(Tool):
    """`QA([R2], Question: q)`; also records (question, answer) for the final-answer step."""

    name = "QA"
    description = "Given context, answer the given query"

    def __init__(self, backend: QABackend | None = None):
        self.backend = backend

    def __call__(self, args: str, ctx: ToolContext) -> str:
        parts = _QUESTION_SPLIT.split(args, maxsplit=1)
        if len(parts) != 2 or not parts[1].strip():
            raise BadArguments(f"QA expects '([context], Question: q)', got {args[:80]!r}")
        context_ref, question = parts[0].strip(), ctx.substitute(parts[1].strip())
        names = VARIABLE_RE.findall(context_ref)
        context = "\n".join(value_text(ctx.value(n)) for n in names) if names else context_ref.strip("[] ")
        answer = self.ask(question, context)
        ctx.qa_pairs.append((question, answer))
        return answer

    def ask(self, question: str, context: str) -> str:
        if self.backend is None:
            raise ToolError("QA: no backend configured (set agent_models.qa_model or agent_tools.qa_endpoint)")
        raw = self.backend.complete([QA_PROMPT.format(question=question, context=context.strip())])[0]
        return extract_answer(raw)


def final_answer(qa: QA, task: str, qa_pairs: list[tuple[str, str]]) -> str:
    """The reference's last step for complex QA: QA over every "Question: ...; Answer: ..."
    result with the original question."""
    context = " ".join(f"Question: {q}; Answer: {a};" for q, a in qa_pairs)
    return qa.ask(task, context)
