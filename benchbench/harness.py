"""The benchmark harness: methods x tasks x backbone x seeds x folds.

Each cell (method, task, backbone, seed, fold) builds the method from its preset config, fits it on
the fold's train dialogues with dev-only model selection, streams the fold's test dialogues through
it (label-free inputs), scores WA / UA / WF1 / Macro-F1 / per-class F1, keeps every per-utterance
prediction, and logs everything to MLflow. ``results.csv`` and ``predictions.csv`` are rewritten
after every cell, so a crash or Ctrl-C loses nothing already computed; a failing cell is recorded
(status ``failed``, with its error) and the run goes on.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from .backbone import backbone_factory, make_backbone
from .data import hash_json
from .method import METHODS
from .metrics import METRICS, compute_metrics, confusion, scored_only, stream_predict
from .stats import compare_all, interval
from .task import TASKS, check_task_options

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


def reset_peak_memory() -> None:
    """Start a new peak-memory window: Linux's VmHWM (``/proc/self/clear_refs``) and CUDA's counters."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak then covers the process so far
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process since :func:`reset_peak_memory`, in MiB (``peak_rss_mb``:
    the backbone included, read from ``/proc/self/status`` VmHWM, else ``resource.getrusage``), and
    ``peak_cuda_mb`` (``torch.cuda.max_memory_allocated``) where CUDA is in use."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_mb"] = int(line.split()[1]) / 1024  # kB
    except OSError:
        import resource

        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def preset_label(spec: RunSpec, task_name: str) -> str:
    """The cell's ``preset`` param: the preset, plus the task options when any were set
    (``default+n_train=160``), so that the leaderboard never pools cells of different data."""
    options = spec.task_options.get(task_name)
    return spec.preset + "".join(f"+{k}={v}" for k, v in sorted(options.items())) if options else spec.preset


def run(spec: RunSpec, show_progress: bool = True) -> dict:
    """Run the benchmark; returns the summary dict (also written to ``<output>/summary.json``)."""
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
    task_info: dict[str, dict] = {}
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
            task_info[task_name] = {"reference": task.reference(), "params": task.params(),
                                    "notices": list(task.notices),
                                    "manifest_sha256": manifest["sha256"], "labels": list(task.labels)}
            cells = [(f, m, s) for f in folds for m in spec.methods for s in spec.seeds]
            bar = tqdm(cells, desc=f"{task_name}", disable=not show_progress, unit="cell")
            for fold, method_name, seed in bar:
                bar.set_postfix_str(f"{method_name} seed={seed} fold={fold.index}")
                row, preds = _run_cell(spec, backbone, task, manifest, fold, method_name, seed, tracker,
                                       lambda msg, d: bar.write(f"  [{method_name} s{seed} f{fold.index}] {msg} "
                                                               + " ".join(f"{k}={v:.3f}" for k, v in d.items())))
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
        summary["run"] = {"output": str(out), "mlflow_tracking_uri": tracker.tracking_uri,
                          "mlflow_parent_run_id": tracker.parent_run_id, "spec": spec.__dict__,
                          "backbone_key": backbone.key if backbone is not None else None}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        from .leaderboard import render_markdown

        (out / "leaderboard.md").write_text(render_markdown(summary, reference=spec.baseline))
        if rows and any(r["status"] == "failed" for r in rows):
            status = "FAILED"
        tracker.finish(out / "summary.json", status)
    return summary


def _run_cell(spec, backbone, task, manifest, fold, method_name, seed, tracker, progress):
    cls = METHODS.get(method_name)
    config = cls.make_config(spec.preset, spec.method_overrides.get(method_name))
    base = {"method": method_name, "task": task.name, "backbone": spec.backbone, "seed": seed,
            "fold": fold.index}
    params = {**base, "preset": preset_label(spec, task.name), "backbone_key": backbone.key,
              **{f"method.{k}": v for k, v in config.flat().items()},
              **{f"task.{k}": v for k, v in task.params().items()}}
    tags = {"data_manifest_sha256": manifest["sha256"],
            "fold_manifest_sha256": hash_json(manifest["folds"][str(fold.index)]),
            "config_sha256": hash_json(params), "uses_context": str(cls.uses_context)}
    try:
        _seed_everything(seed)
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
        run_id = tracker.log_cell(f"{method_name}-{task.name}-s{seed}-f{fold.index}", params,
                                  {**metrics, **cost}, method.curves, tags, tmp)
    row = {**base, "status": "ok", **metrics, **cost, "n_test": n_test, "n_test_stream": n_stream,
           "mlflow_run_id": run_id,
           "uses_context": cls.uses_context}
    return row, preds


def test_time_costs(counters: dict[str, float], n_test: int) -> dict[str, float]:
    """A method's test-time counters as logged costs: ``*_seconds`` totals also become
    ``*_ms_per_utterance`` and ``test_time_updates`` also ``test_time_updates_per_utterance``."""
    out = dict(counters)
    for k, v in counters.items():
        if k.endswith("_seconds"):
            out[k[: -len("_seconds")] + "_ms_per_utterance"] = 1000 * v / n_test
    if "test_time_updates" in counters:
        out["test_time_updates_per_utterance"] = counters["test_time_updates"] / n_test
    return out


def speaker_history_counts(utterances) -> list[int]:
    """For each utterance, how many earlier utterances of the same speaker the dialogue has."""
    seen: dict[str, int] = {}
    out = []
    for u in utterances:
        out.append(seen.get(u.speaker, 0))
        seen[u.speaker] = out[-1] + 1
    return out


# ---------------------------------------------------------------------------- summary
HISTORY_BINS = (0, 1, 2, 3)  # the last bin is "3 or more"


def history_bin(k: int) -> str:
    """``"0"``, ``"1"``, ``"2"`` or ``"3+"`` for a count of the speaker's earlier utterances."""
    return f"{HISTORY_BINS[-1]}+" if k >= HISTORY_BINS[-1] else str(int(k))


def accuracy_by_speaker_history(preds: pd.DataFrame) -> list[dict]:
    """WA per method/task/backbone by the number of the speaker's earlier utterances (0, 1, 2, 3+).

    Pooled over seeds and folds. A context method's gain should grow with the history; an
    utterance-level method's accuracy should not depend on it.
    """
    if preds.empty or "speaker_history" not in preds:
        return []
    binned = preds.assign(history_bin=preds["speaker_history"].map(history_bin))
    out = []
    for (m, t, b), g in binned.groupby(["method", "task", "backbone"], sort=False):
        acc = g.groupby("history_bin", sort=False)["correct"].agg(["mean", "size"])
        acc = acc.loc[[k for k in map(history_bin, HISTORY_BINS) if k in acc.index]]
        out.append({"method": m, "task": t, "backbone": b,
                    "wa": {k: float(v) for k, v in acc["mean"].items()},
                    "n": {k: int(v) for k, v in acc["size"].items()}})
    return out


TURN_BINS = 12  # positions 0..11 each, then "12+"


def accuracy_by_turn(preds: pd.DataFrame) -> list[dict]:
    """WA per method/task/backbone by the utterance's position in its dialogue (turn 0, 1, ..., 12+).

    Pooled over seeds and folds, with Wilson 95% intervals over the pooled utterances
    (``statsmodels.stats.proportion.proportion_confint``; utterances are treated as independent, so
    read the bands as descriptive). Memory should show as accuracy that rises with the position.
    """
    if preds.empty or "turn" not in preds:
        return []
    from statsmodels.stats.proportion import proportion_confint

    binned = preds.assign(turn_bin=preds["turn"].clip(upper=TURN_BINS))
    out = []
    for (m, t, b), g in binned.groupby(["method", "task", "backbone"], sort=False):
        acc = g.groupby("turn_bin")["correct"].agg(["sum", "size"]).sort_index()
        lo, hi = proportion_confint(acc["sum"], acc["size"], alpha=0.05, method="wilson")
        keys = [f"{TURN_BINS}+" if k >= TURN_BINS else str(int(k)) for k in acc.index]
        out.append({"method": m, "task": t, "backbone": b,
                    "wa": dict(zip(keys, (acc["sum"] / acc["size"]).astype(float))),
                    "ci_low": dict(zip(keys, np.asarray(lo, dtype=float))),
                    "ci_high": dict(zip(keys, np.asarray(hi, dtype=float))),
                    "n": dict(zip(keys, acc["size"].astype(int).tolist()))})
    return out


def summarize(results: pd.DataFrame, preds: pd.DataFrame, task_info: dict, baseline: str = "lora",
              n_resamples: int = 2000) -> dict:
    """Mean / sd / 95% interval / n over seeds x folds per method/task/backbone, task references,
    checks, and paired comparisons against ``baseline`` (:func:`benchbench.stats.compare_all`)."""
    summary: dict = {"cells": [], "tasks": {t: info["reference"] | {"manifest_sha256": info["manifest_sha256"],
                                                                     "labels": info["labels"],
                                                                     "notices": info.get("notices", [])}
                                            for t, info in task_info.items()},
                     "checks": {"leakage": []}, "comparisons": [], "by_speaker_history": [], "by_turn": [],
                     "failed_cells": []}
    if results.empty:
        return summary
    failed = results[results["status"] == "failed"]
    summary["failed_cells"] = failed.drop(columns=["traceback"], errors="ignore").to_dict("records")
    ok = results[results["status"] == "ok"]
    if ok.empty:  # every cell failed: nothing to summarise beyond the failures
        return summary
    metric_cols = [c for c in ok.columns if c in METRICS or c.startswith("f1_")] + \
        ["fit_seconds", "eval_ms_per_utterance", "trained_parameters", "peak_rss_mb", "peak_cuda_mb",
         "test_time_update_ms_per_utterance", "test_time_updates_per_utterance", "test_time_issues"]
    for (m, t, b), g in ok.groupby(["method", "task", "backbone"], sort=False):
        summary["cells"].append({
            "method": m, "task": t, "backbone": b, "n": int(len(g)),
            "seeds": sorted(g["seed"].unique().tolist()), "folds": sorted(g["fold"].unique().tolist()),
            **{c: interval(g[c].dropna(), bounds=(0.0, 1.0) if c in METRICS or c.startswith("f1_") else None)
               for c in metric_cols if c in g and g[c].notna().any()}})
    summary["checks"]["leakage"] = leakage_checks(ok, task_info)
    if not preds.empty:
        labels = {t: info["labels"] for t, info in task_info.items()}
        summary["comparisons"] = compare_all(preds, labels, reference=baseline, n_resamples=n_resamples)
        summary["by_speaker_history"] = accuracy_by_speaker_history(preds)
        summary["by_turn"] = accuracy_by_turn(preds)
    return summary


def leakage_checks(ok: pd.DataFrame, task_info: dict, alpha: float = 0.01) -> list[dict]:
    """Context-free methods whose WA beats the task's context-free Bayes ceiling beyond noise.

    One-sided exact binomial test of each cell's correct count against the ceiling
    (``scipy.stats.binomtest``), Bonferroni-corrected over the cells tested. A flagged cell means
    information leaks into utterance-level predictions (labels, other utterances, or data reuse).
    """
    tested = []
    for _, r in ok[ok["uses_context"] == False].iterrows():  # noqa: E712
        ceiling = task_info[r["task"]]["reference"].get("ceilings", {}).get("context_free")
        if ceiling is None:
            continue
        k, n = int(round(r["wa"] * r["n_test"])), int(r["n_test"])
        p = stats.binomtest(k, n, ceiling, alternative="greater").pvalue
        tested.append({"method": r["method"], "task": r["task"], "seed": int(r["seed"]), "fold": int(r["fold"]),
                       "wa": float(r["wa"]), "ceiling": ceiling, "p_value": float(p)})
    for t in tested:
        t["p_bonferroni"] = min(1.0, t["p_value"] * len(tested))
        t["leakage_suspected"] = t["p_bonferroni"] < alpha
    return tested


def format_summary(summary: dict) -> str:
    """The terminal table: mean +/- sd per method/task/backbone, then references and checks."""
    lines = []
    rows = []
    for c in summary["cells"]:
        rows.append({"task": c["task"], "backbone": c["backbone"], "method": c["method"], "n": c["n"],
                     **{m.upper(): f"{100 * c[m]['mean']:.2f} ± {100 * c[m]['sd']:.2f}" for m in METRICS if m in c},
                     "fit s": f"{c['fit_seconds']['mean']:.1f}",
                     "ms/utt": f"{c['eval_ms_per_utterance']['mean']:.1f}"})
    if rows:
        lines.append(pd.DataFrame(rows).to_string(index=False))
    for t, ref in summary["tasks"].items():
        ceil = ref.get("ceilings")
        if ceil:
            lines.append(f"{t} reference ceilings (WA %): " +
                         ", ".join(f"{k} {100 * v:.2f}" for k, v in ceil.items()))
        on_test = ref.get("test_ceilings")
        if on_test:
            lines.append(f"{t} the same Bayes rules on this test split (WA %): " +
                         ", ".join(f"{k} {100 * v:.2f}" for k, v in on_test.items()))
    hist = summary.get("by_speaker_history", [])
    if hist:
        lines.append("WA (%) by the speaker's earlier utterances in the dialogue:")
        lines.append(pd.DataFrame([{"task": h["task"], "backbone": h["backbone"], "method": h["method"],
                                    **{k: f"{100 * v:.1f}" for k, v in h["wa"].items()}} for h in hist]
                                  ).to_string(index=False))
    for c in summary["comparisons"]:
        b, cells = c["bootstrap"]["wa"], c["cells"]
        cell_p = f", {cells['primary']} over {c['n_cells']} cells p={cells['primary_p']:.3g}" \
            if cells["primary_p"] is not None else ""
        lines.append(f"{c['task']}: {c['method']} - {c['reference']} WA {100 * b['diff']:+.2f} pts "
                     f"[95% dialogue bootstrap {100 * b['ci_low']:+.2f}, {100 * b['ci_high']:+.2f}] "
                     f"(Wilcoxon over {c['n_dialogues']} dialogues p={c['dialogues']['wilcoxon_p']:.3g}, "
                     f"Holm {c['dialogues']['wilcoxon_p_holm']:.3g}, r={c['dialogues']['rank_biserial']:+.2f}; "
                     f"McNemar p={c['mcnemar']['p_value']:.3g}{cell_p})")
    for task, info in summary.get("tasks", {}).items():
        for notice in info.get("notices", []):
            lines.append(f"NOTICE {task}: {notice}")
    for chk in summary["checks"]["leakage"]:
        if chk["leakage_suspected"]:
            lines.append(f"WARNING possible leakage: context-free {chk['method']} (seed {chk['seed']}, fold "
                         f"{chk['fold']}) WA {100 * chk['wa']:.2f} > ceiling {100 * chk['ceiling']:.2f} "
                         f"(p={chk['p_bonferroni']:.2g})")
    for f in summary["failed_cells"]:
        lines.append(f"FAILED {f['method']} {f['task']} seed {f['seed']} fold {f['fold']}: {f['error']}")
    return "\n".join(lines)
