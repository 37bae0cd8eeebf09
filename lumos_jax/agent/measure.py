"""Measured shares for docs/agent.md: retrieval on HotpotQA, element ranking on Mind2Web.

    python -m lumos_jax.agent.measure [--dense] [--shared ../shared]

Prints one JSON object. Read-only on the shared data; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lumos_jax.agent.tools.base import ToolContext
from lumos_jax.agent.tools.retrieval import BM25Ranker, DenseRanker, DocStore, KnowledgeQuery, Passage
from lumos_jax.agent.tools.retrieval import tokenize
from lumos_jax.agent.tools.web import ElementRanker, Mind2WebReplay, load_mind2web
from lumos_jax.jsonl import read_jsonl


def retrieval(shared: Path, dense: bool) -> dict:
    store = DocStore.from_jsonl(shared / "data/corpus/hotpotqa_wiki_paragraphs.jsonl")
    rows = read_jsonl(shared / "data/eval/hotpotqa_dev_distractor_sample.jsonl")
    kq, kq_bm25_only, total = 0, 0, 0
    tool = KnowledgeQuery(store)
    for r in rows:
        for title in {t for t, _ in r["supporting_facts"]}:
            total += 1
            kq += tool(title, ToolContext(variables={}))[0].title == title
            # Without the exact-title shortcut: BM25 over titles and texts alone.
            kq_bm25_only += store.titles[_bm25_only(store, title)] == title
    out = {"questions": len(rows), "knowledge_query_gold_title_first": f"{kq}/{total}",
           "knowledge_query_bm25_without_title_match": f"{kq_bm25_only}/{total}"}
    rankers = {"bm25": BM25Ranker()}
    if dense:
        rankers["dense_all_minilm_l6_v2"] = DenseRanker()
    random_hits = 0.0
    for name, ranker in rankers.items():
        t0, hits = time.perf_counter(), 0
        for r in rows:
            gold = {t for t, _ in r["supporting_facts"]}
            passages = [str(Passage(t, "".join(s))) for t, s in r["context"]]
            titles = [t for t, _ in r["context"]]
            hits += titles[ranker.rank(r["question"], passages)[0]] in gold
            if name == "bm25":
                random_hits += sum(t in gold for t in titles) / len(titles)
        out[f"paragraph_retrieve_{name}_gold_first"] = f"{hits}/{len(rows)} = {hits / len(rows):.3f}"
        out[f"paragraph_retrieve_{name}_seconds"] = round(time.perf_counter() - t0, 2)
    out["paragraph_retrieve_random_gold_first_expected"] = round(random_hits / len(rows), 3)
    return out


def _bm25_only(store: DocStore, query: str) -> int:
    q = tokenize(query)
    scores = 2.0 * store._title_bm25.get_scores(q) + store._text_bm25.get_scores(q)  # noqa: SLF001
    return int(np.argmax(scores))


def web(shared: Path) -> dict:
    tasks = load_mind2web(str(shared / "data/eval/mind2web_sample.jsonl"))
    ranker = ElementRanker()
    res = {}
    for variant in ("task+value+previous3", "task+value"):
        hits, rnd, steps = 0, 0.0, 0
        for t in tasks:
            for st in Mind2WebReplay(t, seed=0).steps:
                k, op = st["index"], st["operation"].get("op", "CLICK")
                prev = "; ".join(t["action_reprs"][max(0, k - 3):k]) if variant.endswith("previous3") else ""
                q = f"{t['confirmed_task']} {st['operation'].get('value', '')} {prev}"
                hits += ranker.rank(q, st["elements"], op)[0] in st["positives"]
                rnd += len(st["positives"]) / len(st["elements"])
                steps += 1
        res[f"element_accuracy_{variant}"] = f"{hits}/{steps} = {hits / steps:.3f}"
        res["element_accuracy_random_expected"] = round(rnd / steps, 3)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[2].parent / "shared"))
    p.add_argument("--dense", action="store_true", help="also measure the dense ranker (slow on CPU)")
    a = p.parse_args(argv)
    shared = Path(a.shared)
    print(json.dumps({"retrieval": retrieval(shared, a.dense), "web": web(shared)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
