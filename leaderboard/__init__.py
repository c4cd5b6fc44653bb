"""The leaderboard: logged runs (MLflow) -> ``leaderboard.html``, ``leaderboard.md``, ``leaderboard.tex``.

``bench leaderboard [--tracking-uri URI] [--experiment NAME] --output DIR`` calls :func:`build`:
cells are read back from MLflow (:mod:`.collect`), summarised with the harness's statistics
(:func:`benchbench.harness.summarize`: intervals, dialogue bootstrap, Holm-corrected tests) and
rendered with the papers' reported numbers (:mod:`.render`).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from .collect import Collected, collect
from .render import load_reported, render_html, render_latex, render_markdown, sections

__all__ = ["build", "collect", "Collected", "load_reported", "render_html", "render_latex", "render_markdown",
           "sections"]


def _relabel_presets(c: Collected) -> None:
    """Cells of a non-default preset get their own section (backbone ``tiny-qwen2-audio (smoke
    preset)``): never pooled with, or compared against, cells of another preset."""
    for df in (c.results, c.predictions):
        if len(df) and "preset" in df:
            other = df["preset"] != "default"
            df.loc[other, "backbone"] = df.loc[other, "backbone"] + " (" + df.loc[other, "preset"] + " preset)"


def build(output: str | Path, tracking_uri: str | None = None, experiment: str = "benchbench",
          reference: str = "lora", parent_run_ids: list[str] | None = None, preset: str | None = None,
          tasks: list[str] | None = None, n_resamples: int = 2000) -> dict[str, Path]:
    """Read the logged cells, compute the statistics and write the leaderboard files into ``output``.

    Returns ``{"html", "md", "tex", "json"}`` paths. Raises ``ValueError`` (naming the tracking URI
    and experiment) when there is nothing to show.
    """
    from benchbench.harness import summarize

    c = collect(tracking_uri, experiment, parent_run_ids, preset, tasks)
    _relabel_presets(c)
    summary = summarize(c.results, c.predictions, c.task_info, reference, n_resamples=n_resamples)
    reported = load_reported()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    import mlflow

    uri = mlflow.get_tracking_uri()
    commits = sorted({s["git_commit"] for s in c.sources if s.get("git_commit")})
    provenance = (f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} from MLflow <code>{uri}</code>, "
                  f"experiment <code>{experiment}</code>: {len(c.results)} cells from {len(c.sources)} "
                  f"<code>bench run</code> invocation(s) (latest run of each method x task x backbone x seed x "
                  f"fold); suite commit(s) {', '.join(f'<code>{x[:12]}</code>' for x in commits) or 'unknown'}.")
    if c.skipped:
        provenance += " Skipped: " + "; ".join(c.skipped)
    paths = {"html": out / "leaderboard.html", "md": out / "leaderboard.md", "tex": out / "leaderboard.tex",
             "json": out / "leaderboard.json"}
    paths["html"].write_text(render_html(summary, reported, reference, provenance=provenance))
    paths["md"].write_text(render_markdown(summary, reported, reference))
    paths["tex"].write_text(render_latex(summary, reported, reference))
    paths["json"].write_text(json.dumps({"summary": summary, "sources": c.sources, "skipped": c.skipped,
                                         "tracking_uri": uri, "experiment": experiment}, indent=2, default=str))
    return paths
