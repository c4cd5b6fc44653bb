"""The leaderboard: logged runs (MLflow) -> ``leaderboard.html``, ``leaderboard.md``, ``leaderboard.tex``.

``bench leaderboard [--tracking-uri URI] [--experiment NAME] --output DIR`` calls :func:`build`:
cells are read back from MLflow (:mod:`.collect`), summarised by :func:`benchbench.analysis.summarize`
(intervals, dialogue bootstrap, Holm-corrected tests) and
rendered with the papers' reported numbers (:mod:`.render`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from benchbench.analysis import summarize

from .collect import Collected, collect, collect_folders
from .render import load_reported, render_html, render_latex, render_markdown, sections

__all__ = ["LeaderboardSpec", "build", "collect", "collect_folders", "Collected", "load_reported", "render_html", "render_latex", "render_markdown",
           "sections"]


def preset_section(preset: str) -> str:
    """How a section names a preset label: ``smoke preset``, ``default+n_train=160 preset``, and for
    ``--tune N`` cells ``default preset, tuned: N trials on dev`` (with ``--tune-seed S``: ``..., tuned:
    N trials on dev at seed S``)."""
    import re

    m = re.search(r"\+tune=(\d+)(?:@s(\d+))?", preset)
    base = re.sub(r"\+tune=\d+(@s\d+)?", "", preset)
    at = f" at seed {m.group(2)}" if m and m.group(2) is not None else ""
    return f"{base} preset" + (f", tuned: {m.group(1)} trials on dev{at}" if m else "")


def _relabel_presets(c: Collected) -> None:
    """Cells of a non-default preset get their own section (backbone ``tiny-qwen2-audio (smoke
    preset)``; tuned cells ``(default preset, tuned: 8 trials on dev)``): never pooled with, or
    compared against, cells of another preset or another tuning budget."""
    for df in (c.results, c.predictions):
        if len(df) and "preset" in df:
            other = df["preset"] != "default"
            df.loc[other, "backbone"] = df.loc[other, "backbone"] + " (" + df.loc[other, "preset"].map(preset_section) + ")"


@dataclass
class LeaderboardSpec:
    """What ``bench leaderboard`` was asked to do (the CLI's options, resolved)."""

    output: str | Path                   # folder for leaderboard.html, .md, .tex, .json
    tracking_uri: str | None = None      # MLflow tracking URI (None: MLflow's default)
    experiment: str = "benchbench"
    reference: str = "lora"              # method the significance marks compare against
    parent_run_ids: list[str] | None = None  # only these `bench run` invocations
    preset: str | None = None            # only cells of this preset
    tasks: list[str] | None = None       # only these tasks
    n_resamples: int = 2000              # dialogue-bootstrap resamples
    folders: list[str] | None = None     # read these run folders / committed runs instead of MLflow


def build(spec: LeaderboardSpec) -> dict[str, Path]:
    """Read the logged cells, compute the statistics and write the leaderboard files into ``spec.output``.

    Returns ``{"html", "md", "tex", "json"}`` paths. Raises ``ValueError`` (naming the tracking URI
    and experiment, or the folders) when there is nothing to show. With ``spec.folders`` the cells are
    read from run folders or committed runs (:func:`.collect.collect_folders`) instead of MLflow.
    """
    tracking_uri, experiment = spec.tracking_uri, spec.experiment
    if spec.folders:
        c = collect_folders(spec.folders)
        return _write(c, spec, provenance=_folder_provenance(c.sources))
    c = collect(tracking_uri, experiment, spec.parent_run_ids, spec.preset, spec.tasks)
    import mlflow

    uri = mlflow.get_tracking_uri()
    commits = sorted({s["git_commit"] for s in c.sources if s.get("git_commit")})
    provenance = (f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} from MLflow <code>{uri}</code>, "
                  f"experiment <code>{experiment}</code>: {len(c.results)} cells from {len(c.sources)} "
                  f"<code>bench run</code> invocation(s) (latest run of each configuration x task x backbone x seed x "
                  f"fold; an ablation has its own label); suite commit(s) {', '.join(f'<code>{x[:12]}</code>' for x in commits) or 'unknown'}.")
    if c.notes:
        provenance += " Told apart: " + "; ".join(c.notes) + "."
    if c.skipped:
        provenance += " Skipped: " + "; ".join(c.skipped)
    return _write(c, spec, provenance, {"tracking_uri": uri, "experiment": experiment})


def _folder_provenance(sources: list[dict]) -> str:
    """The page's provenance line for cells read from folders: each committed run's command, commit
    and machine (:func:`.collect.collect_folders`' sources, from its ``run.json``)."""
    import html

    parts = []
    for src in sources:
        what = (f"<code>{html.escape(src['command'])}</code> on commit <code>{src['git_commit'][:10]}</code>, "
                f"{html.escape(src['machine'] or 'machine unknown')}") if src.get("command") else "a bench run output folder"
        parts.append(f"<code>{html.escape(Path(src['folder']).name)}</code> ({what})")
    return "Rendered from the committed runs " + "; ".join(parts) + "."


def _write(c: Collected, spec: LeaderboardSpec, provenance: str, store: dict | None = None) -> dict[str, Path]:
    """Summarise ``c`` and write the four files (tuned and other presets in sections of their own)."""
    _relabel_presets(c)
    reference = spec.reference
    summary = summarize(c.results, c.predictions, c.task_info, reference, n_resamples=spec.n_resamples)
    reported = load_reported()
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / "leaderboard.html", "md": out / "leaderboard.md", "tex": out / "leaderboard.tex",
             "json": out / "leaderboard.json"}
    paths["html"].write_text(render_html(summary, reported, reference, provenance=provenance))
    paths["md"].write_text(render_markdown(summary, reported, reference))
    paths["tex"].write_text(render_latex(summary, reported, reference))
    paths["json"].write_text(json.dumps({"summary": summary.to_dict(), "sources": c.sources, "skipped": c.skipped,
                                         "notes": c.notes, **(store or {})}, indent=2, default=str))
    return paths
