"""The tool set per domain, configured in gin (`agent_tools.*`)."""

from __future__ import annotations

import gin

from lumos_jax.agent.tools.base import Tool, ToolRegistry
from lumos_jax.agent.tools.code import Code
from lumos_jax.agent.tools.maths import maths_tools
from lumos_jax.agent.tools.qa import QA, OpenAIQA
from lumos_jax.agent.tools.retrieval import (BM25Ranker, DenseRanker, DocStore, KnowledgeQuery,
                                             ParagraphRetrieve, WikipediaClient)
from lumos_jax.agent.tools.vqa import VQA
from lumos_jax.agent.tools.web import ElementRanker, web_tools, webshop_tools


@gin.configurable("agent_tools")
def build_registry(domain: str, doc_store: str | None = None, knowledge_top_k: int = 3,
                   retrieve_top_k: int = 5, ranker: str = "bm25", live_wikipedia: bool = False,
                   qa_backend=None, qa_endpoint: str | None = None, qa_endpoint_model: str = "gpt-3.5-turbo",
                   code_cpu_seconds: float = 2.0, code_wall_seconds: float = 5.0, code_memory_mb: int = 512,
                   timeout_s: float = 30.0, extra_tools: list[Tool] | None = None) -> ToolRegistry:
    """Tools for `domain`. `qa_backend` (an object with `complete(prompts)`) wins over
    `qa_endpoint` (an OpenAI-compatible base URL); `ranker` is 'bm25' (default: it ranked
    better on HotpotQA, see docs/agent.md) or 'dense'."""
    code = Code(code_cpu_seconds, code_wall_seconds, code_memory_mb)
    tools: list[Tool]
    if domain == "maths":
        tools = maths_tools() + [code]
    elif domain == "complex_qa":
        if ranker not in ("bm25", "dense"):
            raise ValueError(f"agent_tools.ranker={ranker!r}: expected 'bm25' or 'dense'")
        store = DocStore.from_jsonl(doc_store) if doc_store else None
        backend = qa_backend or (OpenAIQA(qa_endpoint, qa_endpoint_model) if qa_endpoint else None)
        calc = [t for t in maths_tools() if t.name == "Calculator"]
        tools = calc + [code,
                        KnowledgeQuery(store, knowledge_top_k, WikipediaClient() if live_wikipedia else None),
                        ParagraphRetrieve(DenseRanker() if ranker == "dense" else BM25Ranker(), retrieve_top_k),
                        QA(backend)]
    elif domain == "web_agent":
        tools = web_tools(ElementRanker())
    elif domain == "webshop":
        tools = webshop_tools()
    elif domain == "multimodal":
        tools = [VQA()]
    else:
        raise ValueError(f"agent_tools: unknown domain {domain!r}")
    return ToolRegistry(tools + list(extra_tools or []), default_timeout_s=timeout_s)
