"""Read logged ``bench run`` cells back from MLflow into pandas.

Every cell of a ``bench run`` is an MLflow child run (params ``method``, ``task``, ``backbone``,
``seed``, ``fold``, ``preset``; metrics ``wa``, ``ua``, ``wf1``, ``macro_f1``, ``f1_<label>`` and the
costs; artifact ``predictions.csv``); its parent carries ``summary.json`` with each task's
reference figures. :func:`collect` gathers them so that the leaderboard is computed from the
tracking store alone, never from a run folder.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchbench.analysis import Summary, TaskSummary

CELL_KEY = ["task", "backbone", "method", "preset", "seed", "fold"]


@dataclass
class Collected:
    """What the leaderboard is built from.

    ``results``: one row per cell (the columns of a run's ``results.csv``, plus ``preset``,
    ``parent_run_id``, ``git_commit``, ``start_time``); ``predictions``: every test utterance of those
    cells (``predictions.csv`` rows); ``task_info``: per task a :class:`~benchbench.analysis.TaskSummary`
    (read from the runs' ``summary.json``) as :func:`~benchbench.analysis.summarize` expects;
    ``sources``: the parent runs used (id, name, git commit, start time); ``skipped``: what could not
    be read; ``notes``: labels told apart because they stood for more than one configuration.
    """

    results: pd.DataFrame
    predictions: pd.DataFrame
    task_info: dict[str, TaskSummary] = field(default_factory=dict)
    sources: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _num(col: pd.Series) -> pd.Series:
    return pd.to_numeric(col, errors="coerce")


def collect(tracking_uri: str | None = None, experiment: str = "benchbench",
            parent_run_ids: list[str] | None = None, preset: str | None = None,
            tasks: list[str] | None = None) -> Collected:
    """Finished cells of ``experiment``, the latest run of each (task, backbone, method, preset, seed,
    fold) key and configuration, with their predictions and the tasks' reference figures. ``method``
    is the cell's label (``mal``, ``mal[speaker]``, an ablation ``mal{layers=0}``); one label never
    stands for two configurations: where older runs of it logged another config, those rows are
    relabelled ``<label>@<config hash>`` (:attr:`Collected.notes` says so).

    ``parent_run_ids`` restricts to those ``bench run`` invocations; ``preset`` and ``tasks`` filter.
    Raises ``ValueError`` when the experiment does not exist or holds no finished cell (the message
    names the tracking URI and the experiment).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from benchbench.tracking import cell_artifact, read_predictions

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"{uri}: no MLflow experiment named {experiment!r} (run `bench run` first, "
                         f"or pass --tracking-uri / --experiment)")
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="pandas",
                              filter_string="attributes.status = 'FINISHED'")
    need = {"tags.mlflow.parentRunId", "params.method", "metrics.wa"}
    if runs.empty or not need <= set(runs.columns):
        raise ValueError(f"{uri}: experiment {experiment!r} holds no finished `bench run` cell")
    cells = runs[runs["tags.mlflow.parentRunId"].notna() & runs["metrics.wa"].notna()].copy()
    if parent_run_ids:
        cells = cells[cells["tags.mlflow.parentRunId"].isin(parent_run_ids)]
    if preset:
        cells = cells[cells["params.preset"] == preset]
    if tasks:
        cells = cells[cells["params.task"].isin(tasks)]
    if cells.empty:
        raise ValueError(f"{uri}: experiment {experiment!r} has no finished cell matching "
                         f"parents={parent_run_ids} preset={preset} tasks={tasks}")

    results = pd.DataFrame({
        "method": cells["params.method"], "task": cells["params.task"], "backbone": cells["params.backbone"],
        "preset": cells.get("params.preset", pd.Series("default", index=cells.index)).fillna("default"),
        "seed": _num(cells["params.seed"]).astype(int), "fold": _num(cells["params.fold"]).astype(int),
        "uses_context": cells.get("tags.uses_context", pd.Series("", index=cells.index)) == "True",
        "status": "ok", "mlflow_run_id": cells["run_id"], "parent_run_id": cells["tags.mlflow.parentRunId"],
        "git_commit": cells.get("tags.git_commit"), "start_time": cells["start_time"],
        # what the label stands for: a hash of the logged method config, task options and backbone key
        "config_id": _logged_configuration(cells),
    })
    for c in ("phases", "selected_phase", "selected_epoch"):  # model selection (tags; absent in older runs)
        if f"tags.{c}" in cells:
            results[c] = _num(cells[f"tags.{c}"])
    for c in sorted(cells.columns):  # MLflow's column order varies: sorted, the outputs are reproducible
        if c.startswith("metrics.") and "/" not in c:  # a cell's own (a parent's are task/backbone/method-named)
            results[c.removeprefix("metrics.")] = _num(cells[c])
    # the latest run of each cell key and configuration wins (a re-run replaces an earlier one); a
    # label that stood for another configuration in other runs is told apart, never replaced or pooled
    results = results.sort_values("start_time").drop_duplicates(CELL_KEY + ["config_id"], keep="last")
    results, notes = _split_configurations(results.reset_index(drop=True))

    preds, skipped, n_test = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in results.itertuples():
            try:
                run = client.get_run(r.mlflow_run_id)
                path = cell_artifact(client, uri, run, "predictions.csv", str(Path(tmp) / r.mlflow_run_id))
                p = read_predictions(path, _recorded_dtypes(client, uri, run, str(Path(tmp) / r.mlflow_run_id)))
            except Exception as e:  # noqa: BLE001 - an artifact store error must not lose the other cells
                skipped.append(f"run {r.mlflow_run_id} ({r.method} {r.task} s{r.seed} f{r.fold}): "
                               f"predictions.csv not readable: {e}")
                continue
            p["method"], p["preset"] = r.method, r.preset
            preds.append(p)
            n_test[r.mlflow_run_id] = len(p)
        task_info, sources = {}, []
        parents = results.groupby("parent_run_id")["start_time"].max().sort_values().index
        for pid in parents:  # later runs override earlier reference figures
            run = client.get_run(pid)
            sources.append({"run_id": pid, "name": run.info.run_name, "git_commit": run.data.tags.get("git_commit"),
                            "start_time": pd.Timestamp(run.info.start_time, unit="ms").isoformat()})
            try:
                path = cell_artifact(client, uri, run, "summary.json", str(Path(tmp) / pid))
            except Exception as e:  # noqa: BLE001
                skipped.append(f"parent run {pid}: summary.json not readable ({e}); its tasks show no ceilings")
                continue
            try:
                tasks = Summary.read(path).tasks
            except ValueError as e:
                skipped.append(f"parent run {pid}: {e}; its tasks show no ceilings")
                continue
            for t, info in tasks.items():
                task_info[t] = TaskSummary(info.labels, info.reference, info.manifest_sha256,
                                           transitions={**(task_info[t].transitions if t in task_info else {}),
                                                        **info.transitions})
    results["n_test"] = results["mlflow_run_id"].map(n_test)  # NaN where predictions were unreadable
    predictions = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame()
    for t in results["task"].unique():  # tasks whose parent summary was unreadable
        if t not in task_info:
            labels = sorted(predictions.loc[predictions["task"] == t, "label"].unique()) if len(predictions) else []
            task_info[t] = TaskSummary(list(labels))
    return Collected(results, predictions, task_info, sources, skipped, notes)


def _logged_configuration(cells: pd.DataFrame) -> pd.Series:
    """Per cell run, 12 hex digits of the sha256 of its logged ``method.*`` and ``task.*`` params (the
    data folder left out: its content is the manifest) and ``backbone_key``: equal for two runs of one
    configuration, in every version of the suite that logged those params. A tuned cell (``--tune N``)
    logs the values it trained with, which differ by fold: its configuration is the preset's
    (``config_id``, with the task and backbone params), not the tuned values."""
    import hashlib

    cols = sorted(c for c in cells.columns if c.startswith(("params.method.", "params.task.")) or
                  c == "params.backbone_key")
    cols = [c for c in cols if c != "params.task.data_dir"]

    def tuned(row) -> bool:
        return "params.tuning_trials" in row and pd.notna(row["params.tuning_trials"]) and \
            str(row["params.tuning_trials"]) not in ("0", "")

    def one(row) -> str:
        if tuned(row) and pd.notna(row.get("params.config_id")):
            items = [(c, row[c]) for c in cols if not c.startswith("params.method.") and pd.notna(row[c])]
            items.append(("params.config_id", row["params.config_id"]))
        else:
            items = [(c, row[c]) for c in cols if pd.notna(row[c])]
        return hashlib.sha256(repr(items).encode()).hexdigest()[:12]

    return cells.apply(one, axis=1) if len(cells) else pd.Series([], dtype=str)


def _split_configurations(results: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Rows whose (task, backbone, method, preset) held more than one ``config_id``: the newest
    configuration keeps the label, each older one becomes ``<label>@<config_id[:6]>`` (a method's
    preset that changed between suite versions), with a note per relabelled configuration."""
    notes = []
    group = ["task", "backbone", "method", "preset"]
    for key, g in results.groupby(group, sort=False):
        if g["config_id"].nunique() < 2:
            continue
        newest = g.loc[g["start_time"].idxmax(), "config_id"]
        for cid in g["config_id"].unique():
            if cid == newest:
                continue
            label = f"{key[2]}@{cid[:6]}"
            results.loc[g.index[g["config_id"] == cid], "method"] = label
            notes.append(f"{key[0]} · {key[1]} · preset {key[3]}: earlier runs of {key[2]} had another configuration "
                         f"(logged config {cid}); shown apart as {label}")
    return results, notes


def _recorded_dtypes(client, uri: str, run, dst: str) -> dict | None:
    """The dtypes a cell's predictions.csv was written with (its ``row.json``), or ``None`` (an older run)."""
    import json

    from benchbench.tracking import cell_artifact

    try:
        return json.loads(cell_artifact(client, uri, run, "row.json", dst).read_text()).get("prediction_dtypes")
    except Exception:  # noqa: BLE001 - no row.json: read with pandas' own inference
        return None


def collect_folders(folders: list[str | Path]) -> Collected:
    """The same as :func:`collect`, read from ``bench run`` output folders or committed runs
    (``results/<name>/``: ``results.csv``, ``predictions.csv`` or ``predictions.csv.gz`` with its
    ``predictions-dtypes.json``, and ``summary.json`` for the tasks' reference figures) instead of an
    MLflow store: what the committed leaderboard is rendered from. Later folders override earlier
    ones' reference figures; each cell keeps its folder's preset label, so tuned and untuned cells
    stay in sections of their own; a cell found in several folders (one cell key) is kept once, from
    the last.

    Raises ``FileNotFoundError`` naming a folder without ``results.csv``, predictions or
    ``summary.json``, and ``ValueError`` when the folders hold no finished cell.
    """
    import json

    from benchbench.tracking import read_folder_predictions

    results, preds, task_info, sources = [], [], {}, []
    for folder in map(Path, folders):
        pred_path = next((folder / n for n in ("predictions.csv.gz", "predictions.csv") if (folder / n).is_file()), None)
        for f in (folder / "results.csv", pred_path or folder / "predictions.csv", folder / "summary.json"):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: not found (is {folder} a `bench run --output` folder or a committed run?)")
        rows = pd.read_csv(folder / "results.csv", dtype={"cell_key": str})
        rows = rows[rows["status"] == "ok"].copy()
        if "preset" not in rows:
            rows["preset"] = "default"
        rows["preset"] = rows["preset"].fillna("default")
        p = read_folder_predictions(pred_path)
        if "preset" not in p:  # predictions of a suite before 0.2 name no preset: their cell's row does
            p = p.merge(rows[["cell_key", "preset"]], on="cell_key", how="inner")
        p = p[p["cell_key"].isin(rows["cell_key"])]
        results.append(rows.assign(_folder=len(results)))
        preds.append(p.assign(_folder=len(preds)))
        meta = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
        sources.append({"folder": str(folder), "command": meta.get("command"), "git_commit": meta.get("commit"),
                        "machine": meta.get("machine", {}).get("cpu")})
        for t, info in Summary.read(folder / "summary.json").tasks.items():
            task_info[t] = TaskSummary(info.labels, info.reference, info.manifest_sha256,
                                       transitions={**(task_info[t].transitions if t in task_info else {}),
                                                    **info.transitions})
    res = pd.concat(results, ignore_index=True) if results else pd.DataFrame()
    if res.empty:
        raise ValueError(f"{', '.join(map(str, folders))}: no finished cell")
    # a cell in several folders (the same cell key: identical by construction) is kept once, the last
    res = res.drop_duplicates("cell_key", keep="last").reset_index(drop=True)
    kept = set(zip(res["cell_key"], res["_folder"]))
    p = pd.concat(preds, ignore_index=True)
    p = p[[k in kept for k in zip(p["cell_key"], p["_folder"])]].drop(columns="_folder").reset_index(drop=True)
    return Collected(res.drop(columns="_folder"), p, task_info, sources)
