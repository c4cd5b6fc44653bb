"""One cell of the benchmark, computed: what both executors (this process, Ray workers) run.

A :class:`Cell` (method, task, fold, seed, backbone) is computed by :func:`compute_cell`: the method
built from its preset config, fitted on the fold's train dialogues with dev-only model selection, the
fold's test dialogues streamed through it (label-free inputs), WA / UA / WF1 / Macro-F1 / per-class F1
scored and every per-utterance prediction kept. It returns a :class:`CellRecord`, a value with
everything the results writer needs (``results.csv`` row, predictions, the MLflow run's params,
metrics, curves, tags and files); it writes nothing and talks to no tracking store, so a Ray worker
and the local loop compute the same record and one writer (:class:`benchbench.harness.ResultsWriter`)
keeps it.

Thread count. Every cell trains and predicts on ``threads`` torch CPU threads (``bench run
--threads``, default 1), whatever its process has (a Ray worker gets one thread per CPU it holds, a
local process all cores): on some CPUs (an Intel Xeon with AVX512 under MKL) the memory and DPM paths
give other bits on another thread count, so the count is fixed, recorded (``torch_threads``) and part
of the cell key.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from .backbone import AudioLLMBackbone
from .data import Fold, hash_json, speaker_history_counts
from .measure import peak_memory_mb, reset_peak_memory, test_time_costs
from .method import METHODS, FitReport, _deep_merge
from .metrics import METRICS, compute_metrics, confusion, scored_only, stream_predict
from .task import Task
from .training import seed_everything

log = logging.getLogger(__name__)

RESULTS_VERSION = 3
"""Part of every cell key: raise it when a change to the suite changes what a cell computes, so
that cells of the older code are recomputed rather than reused."""


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Inside: torch (and its BLAS) on ``n`` CPU threads; outside, the count is as before.
    ``ValueError`` for ``n < 1``."""
    if n < 1:
        raise ValueError(f"torch threads: expected >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Cell:
    """One unit of the benchmark: a method on a task's fold, on a backbone, under a seed.

    ``preset``: the cell's preset label (:func:`benchbench.task.preset_label`); ``config_preset``: the
    method preset its config starts from; ``overrides``: the method's config overrides on top of that
    preset; ``manifest``: the task's data manifest (its hash tags the cell); ``threads``: torch CPU
    threads the cell computes on (:func:`torch_threads`); ``tune``: Optuna trials on the dev split
    before training (:mod:`benchbench.tuning`; 0: the preset as it is), ``tuning_dir`` their journals,
    ``tune_seed`` the seed whose tuning every seed of the fold takes (``None``: each its own).
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
    threads: int = 1
    tune: int = 0                   # --tune N: trials on the fold's dev split before the cell trains (0: none)
    tuning_dir: str | None = None   # where tuned cells keep their Optuna journals (<run output>/tuning)
    tune_seed: int | None = None    # --tune-seed S: take the values tuned at seed S on this fold (None: own seed)

    @property
    def name(self) -> str:
        return f"{self.label}-{self.task.name}-s{self.seed}-f{self.fold.index}"

    @cached_property
    def backbone_overrides(self) -> dict:
        """The backbone's own values for this preset's task LoRA (:attr:`BackboneSpec.lora_presets`, e.g. a
        pretrained LM's lower rate), placed in this method's config (:meth:`ContextMethod.task_lora_overrides`):
        ``lora`` and every method's Phase 1 take them alike; ``{}`` on most backbones."""
        from .names import BACKBONES

        spec = BACKBONES.get(self.backbone.name) if self.backbone.name in BACKBONES.names() else None
        values = (getattr(spec, "lora_presets", None) or {}).get(self.config_preset, {})
        return METHODS.get(self.method).task_lora_overrides(values)

    @cached_property
    def resolved_overrides(self) -> dict:
        """:attr:`backbone_overrides` under the cell's own ``overrides`` (a user's ``--set`` wins)."""
        return _deep_merge(self.backbone_overrides, self.overrides or {})

    @cached_property
    def config(self):
        """The method's fully resolved config (preset, the backbone's preset values, overrides)."""
        return METHODS.get(self.method).make_config(self.config_preset, self.resolved_overrides)

    @cached_property
    def label(self) -> str:
        """The method as results name it (:meth:`ContextMethod.label`): ``mal`` for the papers' form,
        ``mal[speaker]`` for a variant, and what ``overrides`` change from the preset's config
        (``mal{layers=0}``), so that an ablation is never pooled with its preset's cells."""
        return METHODS.get(self.method).label(self.config, self.config_preset, self.backbone_overrides)

    @cached_property
    def config_id(self) -> str:
        """12 hex digits identifying what the cell's label and preset stand for: the method's resolved
        config, the task's options and the backbone's key. The leaderboard never pools, compares or
        replaces cells of one label whose ``config_id`` differs (a preset changed between versions)."""
        return hash_json({"method": self.method, "config": self.config.to_dict(), "task_params": self._task_params,
                          "backbone_key": self.backbone.run_key})[:12]

    @cached_property
    def _task_params(self) -> dict:
        """The task's options without its data folder (the content is in the manifest)."""
        return {k: v for k, v in self.task.params().items() if k != "data_dir"}

    @property
    def base(self) -> dict:
        """The identifying columns of the cell's results.csv and predictions.csv rows (``method``: the
        label with the variant, ``method_name``: the registry name, ``preset``: the preset label, e.g.
        ``default+tune=4@s0``, which keeps tuned and untuned cells apart wherever the rows are read)."""
        return {"method": self.label, "method_name": self.method, "task": self.task.name,
                "backbone": self.backbone_name, "preset": self.preset, "seed": self.seed, "fold": self.fold.index,
                "cell_key": self.key}

    @cached_property
    def key(self) -> str:
        """The cell's identity (sha256): method and its fully resolved config, task, its options and
        preset, the data manifest's and the fold's hashes, backbone label and key, seed, fold, torch
        threads and :data:`RESULTS_VERSION`. Equal keys give equal results, so a finished cell is
        reused, never redone."""
        return hash_json({"method": self.method, "config": self.config.to_dict(), "task": self.task.name,
                          "task_params": self._task_params, "preset": self.preset, "data": self.manifest["sha256"],
                          "fold_data": self.manifest["folds"][str(self.fold.index)], "backbone": self.backbone_name,
                          "backbone_key": self.backbone.run_key, "seed": self.seed, "fold": self.fold.index,
                          "torch_threads": self.threads, "results_version": RESULTS_VERSION,
                          **({"tune": self._tune_identity} if self.tune else {})})

    @property
    def _tune_identity(self) -> dict:
        """What a tuned cell's key holds of its tuning: N, the search space and, when another seed's
        tuning serves it (``tune_seed``), that seed (at its own seed the study is the same either way)."""
        shared = self.tune_seed is not None and self.tune_seed != self.seed
        return {"trials": self.tune, "space": _space_id(self.method), **({"seed": self.tune_seed} if shared else {})}

    @property
    def params(self) -> dict:
        """The cell's MLflow params: its identifying columns, preset (and the method preset its config
        starts from), ``config_id``, backbone key, torch threads, the
        method's resolved config (``method.*``) and the task's options (``task.*``)."""
        return {**self.base, "preset": self.preset, "config_preset": self.config_preset, "config_id": self.config_id,
                "backbone_key": self.backbone.run_key, "torch_threads": self.threads,
                **{f"method.{k}": v for k, v in self.config.flat().items()},
                **{f"task.{k}": v for k, v in self.task.params().items()}}

    @property
    def tags(self) -> dict:
        """The cell's MLflow tags: the data manifest's and the fold's hashes, the config's, whether the
        method uses context, the cell key."""
        return {"data_manifest_sha256": self.manifest["sha256"],
                "fold_manifest_sha256": hash_json(self.manifest["folds"][str(self.fold.index)]),
                "config_sha256": hash_json(self.params), "uses_context": str(METHODS.get(self.method).uses_context),
                "cell_key": self.key}


def _space_id(method: str) -> str:
    from .tuning import space_id

    return space_id(method)


@dataclass
class CellRecord:
    """What computing a cell produced (:func:`compute_cell`), picklable (a Ray task's return value).

    ``row``: the ``results.csv`` row (``status`` ``ok``, or ``failed`` with ``error`` and
    ``traceback``); ``predictions``: the scored test utterances' ``predictions.csv`` rows (``None``
    when failed); ``params``, ``metrics``, ``curves``, ``tags``: the cell's MLflow run; ``files``:
    its artifacts by file name (text), ``row.json`` and ``predictions.csv`` among them."""

    row: dict
    predictions: pd.DataFrame | None = None
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.row.get("status") == "ok"


def compute_cell(cell: Cell, progress: Callable[[str, dict], None] | None = None) -> CellRecord:
    """Fit, stream the test split and score one cell, on ``cell.threads`` torch threads.

    Never raises for a failure inside the method (other cells are independent): the record's row is
    then ``status`` ``failed`` with the error and its traceback, and it has no predictions."""
    try:
        with torch_threads(cell.threads):
            method, report, streams, seconds, tuning = _fit_and_stream(cell, progress)
    except Exception as e:  # record and go on: other cells are independent
        log.error("cell %s failed: %s", cell.base, e)
        return CellRecord({**cell.base, "status": "failed", "error": f"{type(e).__name__}: {e}",
                           "traceback": traceback.format_exc()[-2000:]})
    return _score(cell, method, report, streams, seconds, *tuning)


def _fit_and_stream(cell: Cell, progress):
    """``(method, its FitReport, (probabilities per test dialogue, the controls' by name: :func:`_controls`),
    (fit seconds, eval seconds), (its :class:`~benchbench.tuning.Tuning` or None, tuning seconds))``:
    the method tuned on the fold's dev
    split when ``cell.tune`` (:mod:`benchbench.tuning`), fitted on its train split (dev-selected)
    and streamed over its test split (label-free)."""
    cls = METHODS.get(cell.method)
    config, tuning, tune_s = cell.config, None, 0.0
    if cell.tune:
        from .tuning import no_search_space, tune

        if no_search_space(cell.method) is None:
            t = time.perf_counter()
            tuning = tune(cell, progress)
            tune_s = time.perf_counter() - t
            config = cls.make_config(cell.config_preset, tuning.overrides)
        elif progress:
            progress(f"NOTICE: {cell.method} has nothing to tune (no search space): it runs untuned", {})
    # the method works on the backbone's own LM (no copy); its adapters and hooks go at the block's end
    cell.backbone.lm_key  # hashed once per backbone (a 7B LM: seconds), outside every cell's fit time
    with cell.backbone.lend_lm():
        seed_everything(cell.seed)
        reset_peak_memory()
        t0 = time.perf_counter()
        method = cls(cell.backbone, cell.task.labels, config, seed=cell.seed)
        kept = None
        if tuning is not None and tuning.seed == cell.seed:  # the best trial's own fit (exact: same config, seed)
            from .tuning import restore_kept

            kept = restore_kept(tuning, method)
        if kept is not None:
            report, fit_s = kept
            if progress:
                progress(f"tuning: the cell keeps trial {tuning.kept_trial}'s fitted model (no second training)", {})
        else:
            report = FitReport.of(method, method.fit(cell.fold.train, cell.fold.dev, progress=progress))
        t1 = time.perf_counter()
        selected = report.selected or {}
        if cls.phases == 2 and selected.get("phase") == 1 and progress:
            progress("NOTICE: dev selected Phase 1 over every Phase-2 epoch: the memory is unused in this cell "
                     "(its predictions are Phase 1's, i.e. lora's)", {})
        method.test_time_cost.clear()  # count what the test set costs, not dev scoring during fit
        method.test_time_issues.clear()
        probs = stream_predict(method, cell.fold.test)
        t2 = time.perf_counter()
        controls = _controls(method, report, cell.fold.test, probs)
    fit_seconds = fit_s if kept is not None else t1 - t0  # a kept model cost its trial's training
    if tuning is not None:
        tuning.kept_trial = tuning.kept_trial if kept is not None else None
    return method, report, (probs, controls), (fit_seconds, t2 - t1), (tuning, tune_s)


def history_free_inputs(dialogues) -> list[list]:
    """Every utterance of ``dialogues`` as a dialogue of its own (``[[x_1], [x_2], ...]``, in order):
    the method's state is reset (S_0) before each, so no prediction can use the dialogue."""
    return [[u] for d in dialogues for u in d.inputs()]


def _controls(method, report: FitReport, test, probs) -> dict[str, list]:
    """Test predictions of the cell's controls, per test dialogue like ``probs``: ``nohist`` (the
    history-free control: the fitted method, every utterance a dialogue of its own; where
    :attr:`~benchbench.method.ContextMethod.history_free_control`) and, for a two-stage method that
    supports :meth:`~benchbench.method.ContextMethod.use_phase`, ``phase1`` and ``phase2`` (the test
    set under each phase, the selected one being ``probs``). The method's test-time counters are those
    of the main stream afterwards (controls are not the method's cost)."""
    cost, issues = dict(method.test_time_cost), list(method.test_time_issues)
    out: dict[str, list] = {}
    if getattr(method, "history_free_control", True):
        flat = [np.asarray(p) for p in method.predict_dialogues(history_free_inputs(test))]
        out["nohist"] = np.split(np.concatenate(flat), np.cumsum([len(d) for d in test])[:-1])
    selected = (report.selected or {}).get("phase")
    if method.phases == 2 and selected in (1, 2):
        other = 3 - selected
        try:
            method.use_phase(other)
        except NotImplementedError:
            pass
        else:
            try:
                out[f"phase{other}"] = stream_predict(method, test)
            finally:
                method.use_phase(selected)
            out[f"phase{selected}"] = probs
    method.test_time_cost.clear()
    method.test_time_cost.update(cost)
    method.test_time_issues[:] = issues
    return out


def _score(cell: Cell, method, report: FitReport, streams: tuple, seconds: tuple[float, float], tuning=None,
           tuning_seconds: float = 0.0) -> CellRecord:
    """The record of a fitted and streamed cell: metrics over the scored utterances, costs, model
    selection, tuning (``tuning_trials``, ``tuned_params``), the predictions table and the artifacts.
    ``streams``: the test probabilities per dialogue and the controls' (:func:`_controls`)."""
    cls, task, fold = METHODS.get(cell.method), cell.task, cell.fold
    probs, controls = streams
    # every utterance of the stream was predicted; only the scored ones count (IEMOCAP's fru, xxx,
    # ... are context only) and only they go into predictions.csv and the paired statistics
    y_true, p, keep = scored_only(fold.test, probs)
    y_pred = p.argmax(-1)
    metrics = compute_metrics(y_true, y_pred, task.labels)
    control_preds = {name: scored_only(fold.test, c)[1].argmax(-1) for name, c in controls.items()}
    control_metrics = {f"{m}_{name}": v for name, pred in control_preds.items()
                       for m, v in compute_metrics(y_true, pred, task.labels).items() if m in METRICS}
    n_stream = len(keep)
    fit_s, eval_s = seconds
    cost = {"fit_seconds": fit_s, "eval_seconds": eval_s, "eval_ms_per_utterance": 1000 * eval_s / n_stream,
            "trained_parameters": method.num_trained_parameters(), **peak_memory_mb(),
            **test_time_costs(method.test_time_cost, n_stream), "test_time_issues": len(method.test_time_issues)}
    for issue in method.test_time_issues:
        log.warning("cell %s: %s", cell.base, issue)
    preds = _predictions(cell, y_true, y_pred, p, control_preds)
    selected = report.selected or {}
    # model selection on dev is a result: which phase (2: the memory trained after the task LoRA) and epoch
    selection = {"phases": cls.phases, "selected_phase": selected.get("phase"),
                 "selected_epoch": selected.get("epoch"),  # 1-based, as FitReport.selected
                 # the task LoRA's training replayed from the Phase-1 cache (another cell's), not repeated
                 "phase1_replayed": report.phase1_replayed,
                 # how many models the dev split compared in this fit (epochs of every phase, strengths, ...);
                 # a tuned cell's trials compared as many again each (tuning_trials)
                 "dev_evaluations": sum(len(v) for k, v in report.curves.items() if "_dev_" in k)}
    if report.phase_dev_scores:  # both phases' dev scores: what the phase gate compares
        selection.update({f"dev_score_phase{k}": v for k, v in report.phase_dev_scores.items()})
        selection["phase_gate"] = bool(getattr(method.config, "phase_gate", False))
    row = {**cell.base, "status": "ok", **metrics, **control_metrics, **cost, **selection,
           "history_free_control": "nohist" in controls, "n_test": len(y_true),
           "n_test_stream": n_stream, "uses_context": cls.uses_context, "torch_threads": cell.threads,
           "lm_autocast": cell.backbone.autocast,
           "config_id": cell.config_id, "tuning_trials": tuning.trials if tuning else 0,
           "tuned_params": json.dumps(tuning.params if tuning else {}, sort_keys=True)}
    params = cell.params
    if tuning is not None:  # the config the cell trained with, the tuned values in it
        row["tuning_seconds"] = tuning_seconds
        # the trial whose fitted model the cell kept (fit_seconds is that trial's); -1: trained anew
        row["fit_from_trial"] = -1 if tuning.kept_trial is None else tuning.kept_trial
        params = {**params, **{f"method.{k}": v for k, v in method.config.flat().items()},
                  "tuning_trials": tuning.trials, "tuned_params": row["tuned_params"]}
    tags = {**cell.tags, **{k: str(v) for k, v in selection.items() if v is not None}}
    files = {"predictions.csv": preds.to_csv(index=False),
             # what a later run needs to reuse this cell exactly (CellStore.find_cell)
             "row.json": json.dumps({**row, "prediction_dtypes": {c: str(t) for c, t in preds.dtypes.items()}},
                                    default=lambda v: v.item() if hasattr(v, "item") else str(v)),
             "confusion_matrix.csv": pd.DataFrame(confusion(y_true, y_pred, len(task.labels)), index=task.labels,
                                                  columns=task.labels).to_csv(),
             "config.json": json.dumps({"params": params, "tags": tags}, indent=2, default=str)}
    if tuning is not None and tuning.journal is not None and tuning.journal.is_file():
        files["tuning.journal"] = tuning.journal.read_text()  # the Optuna study (JournalFileBackend lines)
        files["tuning.json"] = json.dumps({"trials": tuning.trials, "pruned": tuning.pruned, "best_value": tuning.value,
                                           "tuned_params": tuning.params, "fixed_from_lora": tuning.fixed}, indent=2)
    if method.test_time_issues:
        files["test_time_issues.json"] = json.dumps(method.test_time_issues, indent=2)
    return CellRecord(row, preds, params, {**metrics, **control_metrics, **cost}, dict(report.curves), tags, files)


def _predictions(cell: Cell, y_true, y_pred, p, controls: dict | None = None) -> pd.DataFrame:
    """The scored test utterances' predictions.csv rows: ids, turn, speaker and its history, label,
    prediction, correctness, the class probabilities; then per control (``nohist``, ``phase1``,
    ``phase2``: :func:`_controls`) its ``prediction_<control>`` and ``correct_<control>``."""
    labels = cell.task.labels
    # speaker history counts every earlier utterance of the stream, context-only ones included
    scored = [(u, k) for d in cell.fold.test
              for u, k, s in zip(d.inputs(), speaker_history_counts(d.inputs()), d.scored) if s]
    inputs, history = [u for u, _ in scored], [k for _, k in scored]
    return pd.DataFrame({
        **cell.base,
        "dialogue_id": [u.dialogue_id for u in inputs],
        "utterance_id": [u.utterance_id for u in inputs],
        "turn": [u.turn for u in inputs],
        "speaker": [u.speaker for u in inputs],
        "speaker_history": history,
        "label": [labels[i] for i in y_true], "prediction": [labels[i] for i in y_pred],
        "correct": (y_true == y_pred).astype(int),
        **{f"p_{lab}": p[:, i] for i, lab in enumerate(labels)},
        **{f"{col}_{name}": values for name, pred in (controls or {}).items()
           for col, values in (("prediction", [labels[i] for i in pred]),
                               # nullable: a run's rows of methods without this control hold <NA> there
                               ("correct", pd.array((y_true == pred).astype(int), dtype="Int64")))},
    })
