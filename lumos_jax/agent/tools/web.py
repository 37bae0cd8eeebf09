"""Web actions: CLICK / TYPE / SELECT over Mind2Web-style candidate elements, and a WebShop
text-environment interface.

The reference ranks page elements with MindAct's cross-encoder (a hub model); offline we
rank with BM25 between the action's query (plus the task) and each element's tag and
attribute words, plus a small prior for elements that can take the operation (TYPE: text
inputs, SELECT: select boxes). A `WebEnvironment` supplies pages and applies actions; the
replay environment over `mind2web_sample.jsonl` steps through recorded pages.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Protocol, Sequence

import numpy as np
from rank_bm25 import BM25Okapi

from lumos_jax.agent.tools.base import BadArguments, Tool, ToolContext, ToolError
from lumos_jax.agent.tools.retrieval import tokenize
from lumos_jax.jsonl import read_jsonl

_ATTR = re.compile(r'([\w-]+)=(?:"([^"]*)"|(\S+))')
_TAG = re.compile(r"<\s*([\w-]+)")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
OPS = ("CLICK", "TYPE", "SELECT")
_TYPEABLE = {"input", "textarea", "searchbox", "textbox", "combobox"}
_SELECTABLE = {"select", "option", "combobox", "listbox"}


def element_words(element: str) -> str:
    """The searchable words of a rendered element `<tag attr=value ...>` (ids excluded)."""
    tag = (_TAG.search(element) or [None, ""])[1]
    words = [tag]
    for name, quoted, bare in _ATTR.findall(element):
        if name in ("bnid", "backend_node_id"):
            continue
        value = quoted or bare
        words.append(_CAMEL.sub(" ", value).replace("-", " ").replace("_", " "))
    text = re.sub(r"<[^>]*>", " ", element)
    return " ".join(words + [text])


def element_tag(element: str) -> str:
    m = _TAG.search(element)
    tag = m.group(1).lower() if m else ""
    t = re.search(r'type="?(\w+)', element)
    return f"{tag}:{t.group(1).lower()}" if t else tag


class ElementRanker:
    """BM25 over element words + an operation prior."""

    def __init__(self, prior: float = 1.0):
        self.prior = prior

    def scores(self, query: str, elements: Sequence[str], op: str = "CLICK") -> np.ndarray:
        if not elements:
            return np.zeros(0)
        bm25 = BM25Okapi([tokenize(element_words(e)) or ["_"] for e in elements])
        s = np.asarray(bm25.get_scores(tokenize(query)), dtype=np.float64)
        for i, e in enumerate(elements):
            tag = element_tag(e)
            base, _, typ = tag.partition(":")
            if op == "TYPE" and (base in ("textarea",) or (base == "input" and typ in ("", "text", "search",
                                                                                      "email", "tel", "number"))):
                s[i] += self.prior
            elif op == "SELECT" and base in _SELECTABLE:
                s[i] += self.prior
            elif op == "CLICK" and base in ("button", "a", "input", "label", "span", "div", "li", "option"):
                s[i] += 0.1 * self.prior
        return s

    def rank(self, query: str, elements: Sequence[str], op: str = "CLICK") -> list[int]:
        return [int(i) for i in np.argsort(-self.scores(query, elements, op), kind="stable")]


@dataclasses.dataclass
class WebPage:
    elements: list[str]
    url: str = ""


class WebEnvironment(Protocol):
    """What CLICK/TYPE/SELECT need from a browser (live or replayed)."""

    def page(self) -> WebPage: ...

    def act(self, op: str, element_index: int, value: str = "") -> WebPage: ...


class Mind2WebReplay:
    """Replays one Mind2Web task: page k is step k's candidate elements (shuffled with a
    fixed seed: the file lists positives first). `act` records the choice and moves on."""

    def __init__(self, task: dict, seed: int = 0, only_with_candidates: bool = True):
        self.task = task
        rng = np.random.default_rng(seed)
        self.steps = []
        for k, step in enumerate(task["actions"]):
            if only_with_candidates and "candidates" not in step:
                continue
            cands = list(step.get("candidates", []))
            order = rng.permutation(len(cands))
            elements = [cands[i] for i in order]
            pos_ids = set(step.get("pos_candidate_ids", []))
            self.steps.append({"index": k, "elements": elements,
                               "positives": {j for j, e in enumerate(elements) if _bnid(e) in pos_ids},
                               "operation": step.get("operation", {}), "action_repr": step.get("action_repr", "")})
        self.k = 0
        self.choices: list[dict] = []

    def page(self) -> WebPage:
        if self.k >= len(self.steps):
            raise ToolError("web: the recorded task has no more pages")
        return WebPage(self.steps[self.k]["elements"])

    def act(self, op: str, element_index: int, value: str = "") -> WebPage:
        step = self.steps[self.k]
        self.choices.append({"step": step["index"], "op": op, "element": element_index, "value": value,
                             "correct_element": element_index in step["positives"]})
        self.k += 1
        return WebPage([]) if self.k >= len(self.steps) else WebPage(self.steps[self.k]["elements"])


def _bnid(element: str) -> str:
    m = re.search(r'bnid="([^"]*)"', element)
    return m.group(1) if m else ""


def parse_web_args(op: str, args: str) -> tuple[str, str, str]:
    """`(Env, QUERY: q)` / `(R1, QUERY: q, TEXT: t)` -> (env ref, query, text)."""
    m = re.match(r"\s*([^,]*?)\s*,\s*query\s*:\s*(.*)$", args, re.I | re.S)
    if not m:
        raise BadArguments(f"{op} expects '(Env, QUERY: ...{', TEXT: ...' if op != 'CLICK' else ''})'")
    env_ref, rest = m.group(1), m.group(2)
    text = ""
    if op in ("TYPE", "SELECT"):
        pos = rest.lower().rfind(", text:")
        if pos < 0:
            raise BadArguments(f"{op} needs ', TEXT: value'")
        rest, text = rest[:pos], rest[pos + len(", text:"):].strip()
    return env_ref, rest.strip(), text


class WebAction(Tool):
    """CLICK / TYPE / SELECT: pick the best element for the query on the current page."""

    def __init__(self, op: str, ranker: ElementRanker | None = None):
        if op not in OPS:
            raise ValueError(f"web action {op!r}: expected one of {OPS}")
        self.name, self.op = op, op
        self.ranker = ranker or ElementRanker()

    def __call__(self, args: str, ctx: ToolContext) -> dict:
        env_ref, query, text = parse_web_args(self.op, args)
        if env_ref not in ("Env", "") and env_ref not in ctx.variables and re.fullmatch(r"R\d+", env_ref):
            ctx.value(env_ref)  # raises: undefined variable
        result = {"op": self.op, "query": query, "value": text, "element": None,
                  "summary": f"{self.op}({query}{', ' + text if text else ''})"}
        if ctx.env is None:
            return result  # no browser: the action is recorded, not performed
        page = ctx.env.page()
        if not page.elements:
            raise ToolError(f"{self.op}: the page has no candidate elements")
        rank_query = f"{query} {text} {ctx.task}".strip()
        best = self.ranker.rank(rank_query, page.elements, self.op)[0]
        ctx.env.act(self.op, best, text)
        result.update(element=page.elements[best], element_index=best,
                      summary=f"{self.op} {page.elements[best][:120]}{' -> ' + text if text else ''}")
        return result


# -- WebShop (text environment) --------------------------------------------------------------

class WebShopEnv(Protocol):
    """The WebShop text environment's interface (`web_agent_text_env`): actions are
    `search[query]` / `click[item]`; observations are text with ` [SEP] ` separators."""

    def step(self, action: str) -> tuple[str, float, bool]: ...


class WebShopTool(Tool):
    """Search / Click / FeatureRetrieve / Pick for the WebShop unseen task."""

    def __init__(self, name: str):
        if name not in ("Search", "Click", "FeatureRetrieve", "Pick"):
            raise ValueError(f"WebShop tool {name!r}")
        self.name = name

    def __call__(self, args: str, ctx: ToolContext):
        if self.name in ("Search", "Click"):
            if ctx.env is None:
                raise ToolError(f"{self.name}: no WebShop environment configured")
            target = ctx.substitute(args).strip()
            obs, reward, done = ctx.env.step(f"{self.name.lower()}[{target}]")
            return reward if done else obs
        query = re.split(r",\s*query\s*:\s*", args, flags=re.I)
        if len(query) != 2:
            raise BadArguments(f"{self.name} expects '(..., Query: ...)'")
        if self.name == "FeatureRetrieve":
            options = [o.strip() for o in ctx.substitute(query[0]).split(" [SEP] ") if o.strip()]
            if not options:
                raise BadArguments("FeatureRetrieve: empty feature list")
            order = ElementRanker(prior=0).rank(query[1], options)
            return ", ".join(options[i] for i in order[:3])
        items = re.search(r"item_names\s*:\s*(R\d+)", query[0], re.I)
        if not items:
            raise BadArguments("Pick expects 'Item_names: R<n>'")
        names = [n.strip() for n in str(ctx.value(items.group(1))).split(" ** ") if n.strip()]
        if not names:
            raise BadArguments("Pick: no items")
        best = ElementRanker(prior=0).rank(query[1], names)[0]
        return names[best].split(" - ")[0].strip()


def web_tools(ranker: ElementRanker | None = None) -> list[Tool]:
    return [WebAction(op, ranker) for op in OPS]


def webshop_tools() -> list[Tool]:
    return [WebShopTool(n) for n in ("Search", "Click", "FeatureRetrieve", "Pick")]


def load_mind2web(path: str) -> list[dict]:
    return read_jsonl(path)
