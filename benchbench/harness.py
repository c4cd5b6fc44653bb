"""The benchmark runner: methods x tasks x backbone x seeds x folds, one cell at a time.

Each cell (:class:`Cell`: method, task, backbone, seed, fold) builds the method from its preset
config, fits it on the fold's train dialogues with dev-only model selection, streams the fold's test
dialogues through it (label-free inputs), scores WA / UA / WF1 / Macro-F1 / per-class F1, keeps every
per-utterance prediction, and logs everything to MLflow. ``results.csv`` and ``predictions.csv`` are
rewritten after every cell, so a crash or Ctrl-C loses nothing already computed; a failing cell is
recorded (status ``failed``, with its error) and the run goes on. The statistics are
:mod:`benchbench.analysis`'s; the run's ``summary.json`` and ``leaderboard.md`` are written from its
:class:`~benchbench.analysis.Summary` at the end, however the run ends.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm.auto import tqdm

from .analysis import Summary, TaskSummary, summarize
from .backbone import AudioLLMBackbone, backbone_factory, backbone_label, make_backbone
from .data import Fold, hash_json, speaker_history_counts
from .measure import peak_memory_mb, reset_peak_memory, test_time_costs
from .method import METHODS
from .metrics import compute_metrics, confusion, scored_only, stream_predict
from .task import TASKS, Task, check_task_options, preset_label
from .training import seed_everything

log = logging.getLogger(__name__)


@dataclass
class RunSpec:
    """What ``bench run`` was asked to do (the CLI's options, resolved)."""

    methods: list[str]
    tasks: list[str]
    backbone: str = "tiny-qwen2-audio"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    preset: str = "default"
    data_dir: str | None = None
    tracking_uri: str | None = None
    output: str | None = None
    folds: list[int] | None = None           # None: all folds of each task
    method_overrides: dict = field(default_factory=dict)  # method -> config overrides
    task_options: dict = field(default_factory=dict)      # task -> constructor options (e.g. n_train)
    backbone_options: dict = field(default_factory=dict)  # weights, dtype, device, device_map, allow_download
    baseline: str = "lora"                   # reference method for paired comparisons


def validate(spec: RunSpec) -> None:
    """Resolve every name up front so a typo fails before any training (``KeyError`` with hints)."""
    for m in spec.methods:
        METHODS.get(m).make_config(spec.preset, spec.method_overrides.get(m))
    for t in spec.tasks:
        cls = TASKS.get(t)
        if cls.needs_data_dir and not spec.data_dir:
            raise ValueError(f"task {t!r} reads files: pass --data-dir")
    for t, options in spec.task_options.items():
        if t not in spec.tasks:
            raise ValueError(f"--task-set {t}.*: task {t!r} is not in --tasks {spec.tasks}")
        check_task_options(t, options)
    backbone_factory(spec.backbone, spec.backbone_options)
    if not spec.seeds:
        raise ValueError("no seeds given")


def run(spec: RunSpec, show_progress: bool = True) -> Summary:
    """Run the benchmark; returns its :class:`~benchbench.analysis.Summary` (also written to
    ``<output>/summary.json``, with ``leaderboard.md`` beside it).

    Raises (before any output folder or MLflow run exists): ``KeyError`` for an unknown method,
    task or backbone; ``ValueError`` for a bad option (:func:`validate`).
    """
    from .tracking import Tracker  # MLflow import is slow: only when running

    validate(spec)
    out = Path(spec.output) if spec.output else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec.__dict__, indent=2))
    tracker = Tracker(spec.tracking_uri, f"bench-{out.name}",
                      params={k: v for k, v in spec.__dict__.items() if k != "method_overrides"},
                      tags={"output_dir": str(out.resolve())})
    rows: list[dict] = []
    predictions: list[pd.DataFrame] = []
    task_info: dict[str, TaskSummary] = {}
    status = "FINISHED"
    backbone = None
    try:
        backbone = make_backbone(spec.backbone, spec.backbone_options)
        for task_name in spec.tasks:
            task = TASKS.get(task_name)(data_dir=spec.data_dir, preset=spec.preset,
                                        **spec.task_options.get(task_name, {}))  # checked in validate()
            folds = task.folds()
            if spec.folds is not None:
                folds = [f for f in folds if f.index in spec.folds]
            manifest = task.manifest()
            (out / f"manifest-{task_name}.json").write_text(json.dumps(manifest, indent=2))
            tracker.log_artifact(out / f"manifest-{task_name}.json")
            for notice in task.notices:
                tqdm.write(f"NOTICE {task_name}: {notice}")
            task_info[task_name] = TaskSummary(list(task.labels), task.reference(), manifest["sha256"],
                                               list(task.notices))
            label = preset_label(spec.preset, spec.task_options.get(task_name))
            cells = [Cell(m, task, f, s, backbone, backbone_label(spec.backbone, spec.backbone_options), label,
                          spec.preset,
                          spec.method_overrides.get(m) or {}, manifest)
                     for f in folds for m in spec.methods for s in spec.seeds]
            bar = tqdm(cells, desc=f"{task_name}", disable=not show_progress, unit="cell")
            for cell in bar:
                bar.set_postfix_str(f"{cell.method} seed={cell.seed} fold={cell.fold.index}")
                tag = f"  [{cell.method} s{cell.seed} f{cell.fold.index}] "
                row, preds = run_cell(cell, tracker, lambda msg, d, tag=tag: bar.write(
                    tag + msg + " " + " ".join(f"{k}={v:.3f}" for k, v in d.items())))
                rows.append(row)
                if preds is not None:
                    predictions.append(preds)
                pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
                if predictions:
                    pd.concat(predictions).to_csv(out / "predictions.csv", index=False)
    except BaseException as e:  # the parent run records how it ended; results so far are kept below
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        results = pd.DataFrame(rows)
        preds_df = pd.concat(predictions) if predictions else pd.DataFrame()
        summary = summarize(results, preds_df, task_info, spec.baseline)
        summary.run = {"output": str(out), "mlflow_tracking_uri": tracker.tracking_uri,
                       "mlflow_parent_run_id": tracker.parent_run_id, "spec": spec.__dict__,
                       "backbone_key": backbone.key if backbone is not None else None}
        summary.write(out / "summary.json")
        from .leaderboard.render import render_markdown  # the run's own table, as the leaderboard renders it

        (out / "leaderboard.md").write_text(render_markdown(summary, reference=spec.baseline))
        if rows and any(r["status"] == "failed" for r in rows):
            status = "FAILED"
        tracker.finish(out / "summary.json", status)
    return summary


@dataclass
class Cell:
    """One unit of the benchmark: a method on a task's fold, on a backbone, under a seed.

    ``preset``: the cell's preset label (:func:`benchbench.task.preset_label`); ``overrides``: the method's config
    overrides on top of that preset; ``manifest``: the task's data manifest (its hash tags the cell).
    """

    method: str
    task: Task
    fold: Fold
    seed: int
    backbone: AudioLLMBackbone
    backbone_name: str
    preset: str
    config_preset: str
    overrides: dict
    manifest: dict

    @property
    def name(self) -> str:
        return f"{self.method}-{self.task.name}-s{self.seed}-f{self.fold.index}"


def run_cell(cell: Cell, tracker, progress: Callable[[str, dict], None] | None = None
             ) -> tuple[dict, pd.DataFrame | None]:
    """Fit, stream the test split, score and log one cell.

    Returns ``(row, predictions)``: the ``results.csv`` row (``status`` ``ok`` with metrics and
    costs, or ``failed`` with the error and traceback, in which case predictions are ``None``) and
    the scored test utterances' ``predictions.csv`` rows. Never raises for a failure inside the
    method: other cells are independent.
    """
    cls = METHODS.get(cell.method)
    config = cls.make_config(cell.config_preset, cell.overrides)
    task, fold, seed, backbone = cell.task, cell.fold, cell.seed, cell.backbone
    base = {"method": cell.method, "task": task.name, "backbone": cell.backbone_name, "seed": seed,
            "fold": fold.index}
    params = {**base, "preset": cell.preset, "backbone_key": backbone.key,
              **{f"method.{k}": v for k, v in config.flat().items()},
              **{f"task.{k}": v for k, v in task.params().items()}}
    tags = {"data_manifest_sha256": cell.manifest["sha256"],
            "fold_manifest_sha256": hash_json(cell.manifest["folds"][str(fold.index)]),
            "config_sha256": hash_json(params), "uses_context": str(cls.uses_context)}
    try:
        seed_everything(seed)
        reset_peak_memory()
        t0 = time.perf_counter()
        method = cls(backbone, task.labels, config, seed=seed)
        method.fit(fold.train, fold.dev, progress=progress)
        t1 = time.perf_counter()
        method.test_time_cost.clear()  # count what the test set costs, not dev scoring during fit
        method.test_time_issues.clear()
        probs = stream_predict(method, fold.test)
        t2 = time.perf_counter()
    except Exception as e:  # record and go on: other cells are independent
        log.error("cell %s failed: %s", base, e)
        return {**base, "status": "failed", "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-2000:]}, None
    # every utterance of the stream was predicted; only the scored ones count (IEMOCAP's fru, xxx,
    # ... are context only) and only they go into predictions.csv and the paired statistics
    y_true, p, keep = scored_only(fold.test, probs)
    y_pred = p.argmax(-1)
    metrics = compute_metrics(y_true, y_pred, task.labels)
    n_test = len(y_true)
    n_stream = len(keep)
    cost = {"fit_seconds": t1 - t0, "eval_seconds": t2 - t1, "eval_ms_per_utterance": 1000 * (t2 - t1) / n_stream,
            "trained_parameters": method.num_trained_parameters(), **peak_memory_mb(),
            **test_time_costs(method.test_time_cost, n_stream), "test_time_issues": len(method.test_time_issues)}
    for issue in method.test_time_issues:
        log.warning("cell %s: %s", base, issue)
    # speaker history counts every earlier utterance of the stream, context-only ones included
    scored = [(u, k) for d in fold.test for u, k, s in zip(d.inputs(), speaker_history_counts(d.inputs()), d.scored)
              if s]
    inputs, history = [u for u, _ in scored], [k for _, k in scored]
    preds = pd.DataFrame({
        **base,
        "dialogue_id": [u.dialogue_id for u in inputs],
        "utterance_id": [u.utterance_id for u in inputs],
        "turn": [u.turn for u in inputs],
        "speaker": [u.speaker for u in inputs],
        "speaker_history": history,
        "label": [task.labels[i] for i in y_true], "prediction": [task.labels[i] for i in y_pred],
        "correct": (y_true == y_pred).astype(int),
        **{f"p_{lab}": p[:, i] for i, lab in enumerate(task.labels)},
    })
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        preds.to_csv(tmp / "predictions.csv", index=False)
        pd.DataFrame(confusion(y_true, y_pred, len(task.labels)), index=task.labels,
                     columns=task.labels).to_csv(tmp / "confusion_matrix.csv")
        if method.test_time_issues:
            (tmp / "test_time_issues.json").write_text(json.dumps(method.test_time_issues, indent=2))
        (tmp / "config.json").write_text(json.dumps({"params": params, "tags": tags}, indent=2, default=str))
        run_id = tracker.log_cell(cell.name, params, {**metrics, **cost}, method.curves, tags, tmp)
    row = {**base, "status": "ok", **metrics, **cost, "n_test": n_test, "n_test_stream": n_stream,
           "mlflow_run_id": run_id,
           "uses_context": cls.uses_context}
    return row, preds
