"""The tool set per domain, configured in gin (`agent_tools.*`)."""

from __future__ import annotations

import gin

from lumos_jax.agent.tools.base import Tool, ToolRegistry
from lumos_jax.agent.tools.code import Code
from lumos_jax.agent.tools.maths import maths_tools
from lumos_jax.agent.tools.qa import QA, OpenAIQA, OperandsQA
from lumos_jax.agent.tools.retrieval import (BM25Ranker, DenseRanker, DocStore, KnowledgeQuery,
                                             ParagraphRetrieve, WikipediaClient)
from lumos_jax.agent.tools.vqa import VQA
from lumos_jax.agent.tools.web import ElementRanker, web_tools, webshop_tools


@gin.configurable("agent_tools")
def build_registry(domain: str, doc_store: str | None = None, knowledge_top_k: int = 3,
                   retrieve_top_k: int = 5, ranker: str = "bm25", live_wikipedia: bool = False,
                   qa_backend=None, qa_endpoint: str | None = None, qa_endpoint_model: str = "gpt-3.5-turbo",
                   code_cpu_seconds: float = 2.0, code_wall_seconds: float = 5.0, code_memory_mb: int = 512,
                   timeout_s: float = 30.0, extra_tools: list[Tool] | None = None, protocol: str = "robust",
                   qa_yes_no: bool = False) -> ToolRegistry:
    """Tools for `domain`. `qa_backend` (an object with `complete(prompts)`) wins over
    `qa_endpoint` (an OpenAI-compatible base URL); `ranker` is 'bm25' (default: it ranked
    better on HotpotQA, see docs/agent.md) or 'dense'.

    `protocol='reference'`: the maths tools in WolframAlpha's output form, the QA tool's
    `Question: …; …` return with the reference's fallbacks (web search only with
    `live_wikipedia`), and complex QA's Calculator as QA over its operands (`qa_yes_no`: with
    StrategyQA's rules). The reference never runs Code; the executor voids a sample using it."""
    if protocol not in ("reference", "robust"):
        raise ValueError(f"agent_tools.protocol={protocol!r}: expected 'reference' or 'robust'")
    code = Code(code_cpu_seconds, code_wall_seconds, code_memory_mb)
    tools: list[Tool]
    if domain == "maths":
        tools = maths_tools(protocol=protocol) + [code]
    elif domain == "complex_qa":
        if ranker not in ("bm25", "dense"):
            raise ValueError(f"agent_tools.ranker={ranker!r}: expected 'bm25' or 'dense'")
        store = DocStore.from_jsonl(doc_store) if doc_store else None
        backend = qa_backend or (OpenAIQA(qa_endpoint, qa_endpoint_model) if qa_endpoint else None)
        wiki = WikipediaClient() if live_wikipedia else None
        retrieve = ParagraphRetrieve(DenseRanker() if ranker == "dense" else BM25Ranker(), retrieve_top_k)
        qa = QA(backend, protocol, search=_web_search(wiki, retrieve) if protocol == "reference" and wiki else None)
        calc = ([OperandsQA(qa, yes_no_dataset=qa_yes_no)] if protocol == "reference"
                else [t for t in maths_tools() if t.name == "Calculator"])
        tools = calc + [code, KnowledgeQuery(store, knowledge_top_k, wiki), retrieve, qa]
    elif domain == "web_agent":
        tools = web_tools(ElementRanker())
    elif domain == "webshop":
        tools = webshop_tools()
    elif domain == "multimodal":
        tools = [VQA()]
    else:
        raise ValueError(f"agent_tools: unknown domain {domain!r}")
    return ToolRegistry(tools + list(extra_tools or []), default_timeout_s=timeout_s)


def _web_search(wiki: WikipediaClient, retrieve: ParagraphRetrieve):
    """The reference's last-resort search (hotpotqa:147-169) on the live Wikipedia client:
    per page, the top paragraphs for the question as "Evidence i: ..." lines."""
    def search(question: str):
        by_title: dict[str, list[str]] = {}
        for p in wiki.search(question, 3):
            by_title.setdefault(p.title, []).append(p.text)
        for texts in by_title.values():
            order = retrieve.ranker.rank(question, texts)[: retrieve.top_k]
            yield "".join(f"Evidence {i + 1}: {texts[j]}\n" for i, j in enumerate(order)).strip()
    return search
