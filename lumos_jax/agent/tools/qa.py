"""QA: answer a question from context with an LLM — ours (through a Generator) or any
OpenAI-compatible endpoint. The prompt is the reference's QA prompt (`eval/*/qa_tool.py`);
the answer is the text after "Answer: ".

Under the reference protocol the tool behaves as the reference's inference does: it returns
`"Question: {q}; {raw reply}"` (qa_tool:110), retries a "No answer" without the context or,
for a `Must answer yes/no` question, with a forced answer (qa_tool:82-108), and the caller's
fallbacks (hotpotqa:137-170, strategyqa:82-109) end in `"No answer."` unless a search backend
is configured.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Iterable, Protocol, Sequence

from lumos_jax.agent.generators import GenRequest
from lumos_jax.agent.tools.base import BadArguments, Tool, ToolContext, ToolError, VARIABLE_RE, value_text
from lumos_jax.openai_chat import ChatClient, ChatError

QA_PROMPT = ("Please answer the following question according to the context. Please answer with one brief "
             "entity, beginning with 'Answer: '. If the answer can't be found in the context, answer 'No "
             "answer'. No more details and explanations.\n\nQuestion: {question}\nContext: {context}\n")
# qa_tool:88 and :101, byte for byte: the retry without context, and the forced answer.
QA_RETRY_PROMPT = ("Please answer the following question. Please answer with one brief entity, beginning with "
                   "'Answer: '. If the answer can't be answered, output 'No answer'. No more details and "
                   "explanations.\n\nQuestion: {question}\n")
QA_FORCED_PROMPT = ("Please answer the following question. Please answer with one brief entity, beginning with "
                    "'Answer: '.\n\nQuestion: {question}\n")
YES_NO_SUFFIX = " Must answer yes/no."      # strategyqa:22,79,120
NO_ANSWER = "No answer."                    # hotpotqa:170, strategyqa:109


class QABackend(Protocol):
    def complete(self, prompts: Sequence[str]) -> list[str]:
        """One completion per prompt (a single user turn each)."""


class GeneratorQA:
    """Our own model through a `Generator` (module "qa"); each question is a fresh session."""

    def __init__(self, generator, module: str = "qa"):
        self.generator, self.module = generator, module
        self._n = 0

    def complete(self, prompts: Sequence[str]) -> list[str]:
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
    """An OpenAI-compatible `/v1/chat/completions` endpoint (off unless configured), through
    the one chat client (lumos_jax.openai_chat): HTTP 429/5xx and network errors retried."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 max_tokens: int = 100, max_retries: int = 2):
        self.base_url, self.max_tokens = base_url.rstrip("/"), max_tokens
        self.client = ChatClient(base_url, model, api_key=os.environ.get(api_key_env), timeout=timeout_s,
                                 max_retries=max_retries)

    def complete(self, prompts: Sequence[str]) -> list[str]:
        out = []
        for p in prompts:
            try:  # an empty reply is an answer ("" -> no answer), not a failure
                out.append(self.client.complete([{"role": "user", "content": p}], max_tokens=self.max_tokens,
                                                accept=lambda text: True))
            except ChatError as e:
                raise ToolError(f"QA endpoint {e}") from None
        return out


def extract_answer(text: str) -> str:
    """"Answer: X" -> X (first line); text without the marker is returned stripped."""
    t = (text or "").strip()
    m = re.search(r"Answer:\s*(.*)", t)
    ans = (m.group(1) if m else t).split("\n")[0].strip()
    return ans


_QUESTION_SPLIT = re.compile(r",\s*(?:question|query)\s*:\s*", re.I)


class QA(Tool):
    """`QA([R2], Question: q)`; also records (question, answer) for the final-answer step.

    `protocol='reference'` gives the reference's behaviour (module docstring); `search(q)`
    (optional) yields context texts for the reference's last-resort web search."""

    name = "QA"
    description = "Given context, answer the given query"

    def __init__(self, backend: QABackend | None = None, protocol: str = "robust",
                 search: Callable[[str], Iterable[str]] | None = None):
        self.backend, self.protocol, self.search = backend, protocol, search

    def __call__(self, args: str, ctx: ToolContext) -> str:
        if self.protocol == "reference":
            return self.reference_call(args, ctx)
        parts = _QUESTION_SPLIT.split(args, maxsplit=1)
        if len(parts) != 2 or not parts[1].strip():
            raise BadArguments(f"QA expects '([context], Question: q)', got {args[:80]!r}")
        context_ref, question = parts[0].strip(), ctx.substitute(parts[1].strip())
        names = VARIABLE_RE.findall(context_ref)
        context = "\n".join(value_text(ctx.value(n)) for n in names) if names else context_ref.strip("[] ")
        answer = self.ask(question, context)
        ctx.qa_pairs.append((question, answer))
        return answer

    def _complete(self, prompt: str) -> str:
        if self.backend is None:
            raise ToolError("QA: no backend configured (set agent_models.qa_model or agent_tools.qa_endpoint)")
        return self.backend.complete([prompt])[0]

    def ask(self, question: str, context: str) -> str:
        return extract_answer(self._complete(QA_PROMPT.format(question=question, context=context.strip())))

    # -- reference protocol ---------------------------------------------------------------

    def reference_answer(self, question: str, context: str) -> str:
        """qa_tool:69-110: `Question: {q}; {reply}`, with its own "No answer" retry."""
        raw = self._complete(QA_PROMPT.format(question=question, context=context))
        if "No answer" in raw:
            retry = QA_FORCED_PROMPT if "Must answer yes/no" in question else QA_RETRY_PROMPT
            raw = self._complete(retry.format(question=question))
        return f"Question: {question}; {raw}"

    def reference_call(self, args: str, ctx: ToolContext, orig_question: str | None = None,
                       yes_no: bool = False) -> str:
        """The reference's QA action (hotpotqa:126-170, strategyqa:70-109): the question is the
        text after ", Question: " (not substituted), the context the listed variables' texts.
        `orig_question` (HotpotQA one-time, last action) is asked first; `yes_no` (StrategyQA
        one-time, last action) appends " Must answer yes/no." and skips the fallbacks."""
        parts = args.split(", Question: ")
        if len(parts) < 2:
            raise BadArguments(f"QA expects '[context], Question: q' (reference split), got {args[:80]!r}")
        question = parts[1]
        context = ""
        for name in parts[0][1:-1].split(", "):
            value = ctx.value(name)
            if not isinstance(value, str):  # the reference's `str + "\n"` raises here
                raise BadArguments(f"QA context {name} is a {type(value).__name__}, not text")
            context += value + "\n"
        context = context.strip()
        if yes_no:
            return self.reference_answer(question + YES_NO_SUFFIX, context)
        pred = self.reference_answer(orig_question or question, context)
        if "no answer" not in pred.lower():
            return pred
        if orig_question:
            pred = self.reference_answer(question, context)
            if "no answer" not in pred.lower():
                return pred
        return self.search_fallback(question)

    def search_fallback(self, question: str) -> str:
        """hotpotqa:147-170: ask again over searched pages; offline (no `search`) "No answer."."""
        for context in (self.search(question) if self.search is not None else ()):
            pred = self.reference_answer(question, context)
            if "no answer" not in pred.lower():
                return pred
        return NO_ANSWER


class OperandsQA(Tool):
    """Complex-QA `Calculator` under the reference protocol: QA over the operands
    (hotpotqa:171-191, strategyqa:110-122). Each variable becomes its text plus ".", the
    operators are dropped, and the question is the last subgoal's text after its "Subgoal k: "."""

    name = "Calculator"
    description = "Calculate the input formula"

    def __init__(self, qa: QA, yes_no_dataset: bool = False):
        self.qa, self.yes_no_dataset = qa, yes_no_dataset

    def __call__(self, args: str, ctx: ToolContext, orig_question: str | None = None,
                 yes_no: bool = False) -> str | None:
        context = args
        for name in re.findall(r"R[0-9]+", args):  # str.replace in order, as the reference
            context = context.replace(name, str(ctx.value(name)) + ".")
        for op in "*/+-^=<>":
            context = context.replace(op, "")
        subgoal = ctx.subgoal.split("; ")[-1]
        subgoal = subgoal[subgoal.find(":") + 2:]
        if self.yes_no_dataset:  # strategyqa: the reply as it is
            return self.qa.reference_answer(subgoal + (YES_NO_SUFFIX if yes_no else ""), context)
        pred = self.qa.reference_answer(subgoal, context)
        if "no answer" not in pred.lower():
            return pred
        if orig_question:
            pred = self.qa.reference_answer(orig_question, context)
            return pred if "no answer" not in pred.lower() else NO_ANSWER
        return None  # hotpotqa:171-191 falls through: the caller's unpack fails, the sample is void


def reference_final_answer(qa: QA, task: str, variables: dict, yes_no: bool) -> str:
    """hotpotqa:70-78 / strategyqa:14-22: QA over every text result holding "Question: ",
    joined by "; ", asked with the original question (+ " Must answer yes/no." for StrategyQA)."""
    context = ""
    for value in variables.values():
        if isinstance(value, str) and "Question: " in value:
            context += value + "; "
    return qa.reference_answer(task + (YES_NO_SUFFIX if yes_no else ""), context.strip())


def final_answer(qa: QA, task: str, qa_pairs: list[tuple[str, str]]) -> str:
    """The reference's last step for complex QA: QA over every "Question: ...; Answer: ..."
    result with the original question."""
    context = " ".join(f"Question: {q}; Answer: {a};" for q, a in qa_pairs)
    return qa.ask(task, context)
