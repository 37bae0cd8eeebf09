"""Resumable evaluation: stream examples through an agent, one JSONL record per example.

Examples are fed to the agent continuously, at most `concurrency` in flight (an agent with
`stream(examples, concurrency)`: the Lumos runner), with no dataset-level batches.
Output folder:
- `predictions.jsonl`: one record per finished example (answer, scores, rounds, error kind,
  the agent's full trace); each record is appended in one write and fsync'ed as its episode
  ends, so a crash loses only the episodes in flight. On restart, finished ids are skipped
  and a torn last line is dropped. At the end the file is rewritten (temp file + rename)
  in dataset order.
- `summary.json`, `results.md`, `plot.png`: rebuilt from all records in dataset order, written
  to a temp file and renamed. The summary depends only on the records, so a killed-and-resumed
  run gives the same summary as an uninterrupted one (timings live under `timing`).

An exception inside the agent for one example is recorded as error kind `agent_exception`
(its one-line text under `error`; the traceback is logged at DEBUG); the run goes on. A batched
call or stream that fails is logged and its unfinished examples are retried one by one, each
record keeping the failure under `batch_error`. The summary's `failures` gives the count and
the first error, and the run ends with a warning naming them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from lumos_jax.atomic import write_atomic
from lumos_jax.evaluation.agents import AgentResult, as_result
from lumos_jax.evaluation.datasets import DatasetError, Example
from lumos_jax.evaluation.report import write_reports
from lumos_jax.evaluation.scoring import METRIC_LABELS, get_scorer, headline
from lumos_jax.jsonl import read_appended

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, tuples, sets and numpy scalars into plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def load_records(path: Path, dataset: str) -> dict[str, dict]:
    """Finished records by id. A torn final line (crash mid-write) is dropped and the file
    rewritten without it; a bad line elsewhere, or another dataset's records, is an error."""
    if not path.exists():
        return {}
    rows, torn = read_appended(path, error=DatasetError)
    records: dict[str, dict] = {}
    for n, rec in rows:
        if not isinstance(rec, dict) or rec.get("dataset") != dataset:
            got = rec.get("dataset") if isinstance(rec, dict) else None
            raise DatasetError(f"{path}:{n}: record of dataset {got!r}, not {dataset!r}; use another output_dir")
        records[rec["id"]] = rec
    if torn:
        write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values()))
    return records


def classify(result: AgentResult, correct: bool, crashed: bool) -> str:
    """One error kind per example, for the summary's histogram."""
    if crashed:
        return "agent_exception"
    if correct:
        return "correct"
    if result.error:
        return str(result.error)
    errors = [s for s in result.trace if isinstance(s, dict) and s.get("error")]
    if errors:  # the last failure is what the episode ended on (e.g. parse_error, tool_timeout)
        return str(errors[-1].get("error_kind") or "tool_error")
    if not result.stopped:
        return "max_rounds"
    if result.answer is None or (isinstance(result.answer, str) and not result.answer.strip()):
        return "no_answer"
    return "wrong_answer"


DEFAULT_CONCURRENCY = 64


def resolve_concurrency(concurrency: int | None, batch_size: int | None = None) -> int:
    """`concurrency`, else the deprecated `batch_size` (gin files still bind it), else 64."""
    n = concurrency if concurrency is not None else batch_size if batch_size is not None else DEFAULT_CONCURRENCY
    if int(n) != n or n < 1:
        raise ValueError(f"eval concurrency must be an integer >= 1, got {n}")
    return int(n)


def _one_line(e: BaseException) -> str:
    return traceback.format_exception_only(type(e), e)[-1].strip()


def _run_batch(agent: Any, batch: Sequence[Example]
               ) -> tuple[list[tuple[AgentResult, str | None]], str | None]:
    """Results for a batch, and the batched call's failure if it had one: then the batch is
    run one by one so a single bad example cannot take its neighbours down."""
    run_batch = getattr(agent, "run_batch", None)
    batch_error = None
    if run_batch is not None:
        try:
            results = list(run_batch(list(batch)))
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} examples")
            return [(as_result(r), None) for r in results], None
        except Exception as e:  # noqa: BLE001 - retried one by one below, and recorded
            batch_error = _one_line(e)
            log.warning("eval: a batch of %d failed (%s); running its examples one by one", len(batch), batch_error)
            log.debug("eval: batch failure", exc_info=True)
    out = []
    for ex in batch:
        try:
            out.append((as_result(agent(ex) if run_batch is None else run_batch([ex])[0]), None))
        except Exception as e:  # noqa: BLE001 - an agent bug must not end the evaluation
            log.debug("eval: example %s failed", ex.id, exc_info=True)
            out.append((AgentResult(answer=None, stopped=False), _one_line(e)))
    return out, batch_error


def agent_results(agent: Any, todo: Sequence[Example], concurrency: int
                  ) -> Iterator[tuple[Example, AgentResult, str | None, float, str | None]]:
    """(example, result, crash text, seconds, batch failure) as each example finishes. A
    streaming agent yields in completion order; if its stream itself fails, the examples it
    did not finish are retried one by one. Other agents run in chunks of `concurrency`."""
    left = list(range(len(todo)))
    stream = getattr(agent, "stream", None)
    stream_error = None
    if stream is not None:
        finished: set[int] = set()
        try:
            for i, result, seconds in stream(list(todo), concurrency):
                if i in finished or not 0 <= i < len(todo):
                    raise RuntimeError(f"agent stream gave example index {i} twice or out of range")
                finished.add(i)
                yield todo[i], as_result(result), None, float(seconds), None
        except Exception as e:  # noqa: BLE001 - the unfinished ones are retried one by one below
            stream_error = _one_line(e)
            log.warning("eval: the agent's stream failed after %d of %d examples (%s); running the rest "
                        "one by one", len(finished), len(todo), stream_error)
            log.debug("eval: stream failure", exc_info=True)
        left = [i for i in left if i not in finished]
        concurrency = 1
    for b in range(0, len(left), concurrency):
        chunk = [todo[i] for i in left[b:b + concurrency]]
        t0 = time.perf_counter()
        results, batch_error = _run_batch(agent, chunk)
        per_example = (time.perf_counter() - t0) / len(chunk)
        for ex, (result, crash) in zip(chunk, results):
            yield ex, result, crash, per_example, batch_error or stream_error


def make_record(example: Example, dataset: str, metric: str, result: AgentResult,
                crash: str | None, seconds: float, protocol: str = "robust",
                batch_error: str | None = None) -> dict:
    scores = get_scorer(metric, protocol)(example, result.answer) if crash is None else {"correct": 0.0, "total": float(
        len(example.answer) if metric == "mind2web_step_sr" else 1)}
    correct = scores["correct"] >= scores["total"] > 0
    return {
        "id": example.id, "dataset": dataset, "question": example.question,
        "gold": to_jsonable(example.answer), "prediction": to_jsonable(result.answer),
        "scores": scores, "correct": correct, "rounds": int(result.rounds or 0),
        "stopped": bool(result.stopped), "error_kind": classify(result, correct, crash is not None),
        "error": crash or result.error, "trace": to_jsonable(result.trace),
        "seconds": round(seconds, 4),
        **({"batch_error": batch_error} if batch_error else {}),
    }


def summarize(records: list[dict], metric: str, info: dict) -> dict:
    """Everything derived from records only (deterministic); no timings here."""
    scores = [r["scores"] for r in records]
    by_rounds: dict[str, dict] = {}
    for r in records:
        slot = by_rounds.setdefault(str(r["rounds"]), {"n": 0, "correct": 0.0, "total": 0.0})
        slot["n"] += 1
        slot["correct"] += r["scores"]["correct"]
        slot["total"] += r["scores"]["total"]
    for slot in by_rounds.values():
        slot["score"] = 100.0 * slot["correct"] / slot["total"] if slot["total"] else 0.0
    extras = sorted({k for s in scores for k in s} - {"correct", "total"})
    summary = {
        **info,
        "metric": metric, "metric_label": METRIC_LABELS.get(metric, metric),
        "score": headline(scores), "n": len(records),
        "correct": sum(s["correct"] for s in scores), "total": sum(s["total"] for s in scores),
        "extras": {k: 100.0 * sum(s.get(k, 0.0) for s in scores) / len(scores) for k in extras} if scores else {},
        "by_rounds": dict(sorted(by_rounds.items(), key=lambda kv: int(kv[0]))),
        "error_kinds": dict(sorted(Counter(r["error_kind"] for r in records).items())),
        "failures": failures(records),
    }
    return summary


def failures(records: list[dict]) -> dict:
    """How many episodes crashed (error kind `agent_exception`) and the first one's error."""
    crashed = [r for r in records if r["error_kind"] == "agent_exception"]
    return {"count": len(crashed), "first_error": f"{crashed[0]['id']}: {crashed[0]['error']}" if crashed else None}


def evaluate(examples: Sequence[Example], agent: Any, metric: str, output_dir: str | Path,
             dataset: str, concurrency: int | None = None, info: dict | None = None,
             on_batch: Callable[[int, int], None] | None = None, protocol: str = "robust",
             batch_size: int | None = None) -> dict:
    """Run (or resume) an evaluation and write all outputs; returns the summary. `protocol`
    picks the scorers ('reference' or 'robust', see scoring.py) and is kept in the summary.
    `on_batch(done, total)` is called as each example ends; `batch_size` is the deprecated
    name of `concurrency`."""
    concurrency = resolve_concurrency(concurrency, batch_size)
    get_scorer(metric, protocol)
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise DatasetError(f"{dataset}: example id {dup!r} occurs twice")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / PREDICTIONS
    done = load_records(pred_path, dataset)
    todo = [ex for ex in examples if ex.id not in done]
    start = time.perf_counter()
    with open(pred_path, "a", encoding="utf-8") as f:
        for ex, result, crash, seconds, batch_error in agent_results(agent, todo, concurrency):
            rec = make_record(ex, dataset, metric, result, crash, seconds, protocol, batch_error)
            done[ex.id] = rec
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if on_batch is not None:
                on_batch(len(done), len(examples))
    records = [done[i] for i in ids if i in done]
    if todo:  # completion order -> dataset order, atomically
        write_atomic(pred_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    summary = summarize(records, metric, {"dataset": dataset, "protocol": protocol, **(info or {})})
    summary["timing"] = {"this_run_seconds": round(time.perf_counter() - start, 3),
                         "examples_this_run": len(todo),
                         "agent_seconds_total": round(sum(r["seconds"] for r in records), 3)}
    write_atomic(out / SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_reports(summary, out)
    if summary["failures"]["count"]:
        log.warning("eval %s: %d of %d episodes failed; first: %s", dataset, summary["failures"]["count"],
                    len(records), summary["failures"]["first_error"])
    return summary
