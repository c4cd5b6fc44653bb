"""Leaderboard rendering from a run's ``summary.json`` (significance groups come with issue 4)."""

from __future__ import annotations

from benchbench.metrics import METRICS


def render_markdown(summary: dict) -> str:
    """A Markdown table per task: mean ± sd (in %) over seeds x folds, sorted by WA, with n and costs."""
    out = []
    for task in dict.fromkeys(c["task"] for c in summary["cells"]):
        cells = sorted((c for c in summary["cells"] if c["task"] == task), key=lambda c: -c["wa"]["mean"])
        out.append(f"### {task}\n")
        out.append("| method | backbone | n | " + " | ".join(m.upper() for m in METRICS) + " | fit s | ms/utt |")
        out.append("|---|---|---|" + "---|" * (len(METRICS) + 2))
        for c in cells:
            vals = " | ".join(f"{100 * c[m]['mean']:.2f} ± {100 * c[m]['sd']:.2f}" for m in METRICS)
            out.append(f"| {c['method']} | {c['backbone']} | {c['n']} | {vals} | "
                       f"{c['fit_seconds']['mean']:.1f} | {c['eval_ms_per_utterance']['mean']:.1f} |")
        ceil = summary["tasks"].get(task, {}).get("ceilings")
        if ceil:
            out.append("\nReference ceilings (WA %): " + ", ".join(f"{k} {100 * v:.2f}" for k, v in ceil.items()))
        out.append("")
    return "\n".join(out)
