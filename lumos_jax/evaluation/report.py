"""Human-readable outputs of an evaluation: a markdown table beside the paper's number, and a
PNG with accuracy by number of planning rounds and the histogram of error kinds."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from lumos_jax.atomic import write_atomic

log = logging.getLogger(__name__)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def markdown_table(summaries: list[dict]) -> str:
    """One row per summary: experiment, dataset, metric, ours, paper, n, extras."""
    lines = ["| experiment | dataset | metric | ours | paper | n | notes |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        extras = ", ".join(f"{k} {v:.1f}" for k, v in s.get("extras", {}).items())
        note = s.get("paper_note", "")
        # Only a 'reference'-protocol score is comparable with the paper's (docs/evaluation.md).
        proto = f"protocol {s['protocol']}" if s.get("protocol") else ""
        notes = "; ".join(x for x in (proto, extras, note) if x)
        n = f"{s['n']}" if s["total"] == s["n"] else f"{s['n']} ({s['total']:.0f} steps)"
        lines.append(f"| {s.get('experiment', '-')} | {s['dataset']} | {s['metric_label']} | "
                     f"{_fmt(s['score'])} | {_fmt(s.get('paper_score'))} | {n} | {notes} |")
    return "\n".join(lines) + "\n"


def detail_tables(summary: dict) -> str:
    rows = ["| rounds | n | score |", "|---|---|---|"]
    rows += [f"| {k} | {v['n']} | {v['score']:.1f} |" for k, v in summary["by_rounds"].items()]
    kinds = ["| error kind | count |", "|---|---|"]
    kinds += [f"| {k} | {v} |" for k, v in summary["error_kinds"].items()]
    return "\n".join(rows) + "\n\n" + "\n".join(kinds) + "\n"


def plot_png(summary: dict) -> bytes | None:
    """Two bar charts as PNG bytes; None (and a warning) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("lumos-jax eval: matplotlib not installed; skipping plot.png")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = list(summary["by_rounds"].keys())
    ax1.bar(rounds, [summary["by_rounds"][r]["score"] for r in rounds], color="#4C72B0")
    for i, r in enumerate(rounds):
        ax1.annotate(f"n={summary['by_rounds'][r]['n']}", (i, summary["by_rounds"][r]["score"]),
                     ha="center", va="bottom", fontsize=8)
    ax1.set_xlabel("planning rounds")
    ax1.set_ylabel(summary["metric_label"])
    ax1.set_ylim(0, 105)
    ax1.set_title(f"{summary['dataset']}: score by rounds")
    kinds = list(summary["error_kinds"].keys())
    ax2.barh(kinds, [summary["error_kinds"][k] for k in kinds], color="#DD8452")
    ax2.set_xlabel("examples")
    ax2.set_title("outcome / error kind")
    fig.suptitle(f"{summary.get('experiment', summary['dataset'])}: {summary['score']:.1f} "
                 f"(paper {_fmt(summary.get('paper_score'))}), n={summary['n']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_reports(summary: dict, out_dir: Path) -> None:
    text = f"# {summary.get('experiment', summary['dataset'])}\n\n" + markdown_table([summary]) + \
        "\n" + detail_tables(summary)
    write_atomic(out_dir / "results.md", text)
    png = plot_png(summary)
    if png is not None:
        write_atomic(out_dir / "plot.png", png)
