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
import signal
import tempfile
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from functools import cached_property
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
from .method import METHODS, ConfigValueError
from .metrics import compute_metrics, confusion, scored_only, stream_predict
from .task import TASKS, Task, check_task_options, data_dir_for, preset_label
from .training import seed_everything

log = logging.getLogger(__name__)

RESULTS_VERSION = 2
"""Part of every cell key: raise it when a change to the suite changes what a cell computes, so
that cells of the older code are recomputed rather than reused."""


@dataclass
class RunSpec:
    """What ``bench run`` was asked to do (the CLI's options, resolved)."""

    methods: list[str]
    tasks: list[str]
    backbone: str = "tiny-qwen2-audio"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    preset: str = "default"
    data_dir: str | dict | None = None       # one folder, or {task: folder, "*": the others' folder}
    tracking_uri: str | None = None
    output: str | None = None
    folds: list[int] | None = None           # None: all folds of each task
    method_overrides: dict = field(default_factory=dict)  # method -> config overrides
    task_options: dict = field(default_factory=dict)      # task -> constructor options (e.g. n_train)
    backbone_options: dict = field(default_factory=dict)  # weights, dtype, device, device_map, allow_download
    baseline: str = "lora"                   # reference method for paired comparisons
    rerun: bool = False                      # recompute cells that already have a finished run
    executor: str = "local"                  # local (this process, one cell at a time) | ray
    ray_address: str | None = None           # None: start Ray on this machine; else join that cluster
    cpus_per_cell: float = 1.0               # Ray resources of each cell
    gpus_per_cell: float = 0.0
    max_retries: int = 2                     # Ray: attempts after a worker dies mid-cell


def validate(spec: RunSpec) -> None:
    """Check every name and option without loading data: methods (every config built, every ``--set``
    value type- and range-checked, ``--set`` only for methods being run), tasks (options, data
    folder), backbone options, seeds.

    Raises:
        KeyError: an unknown method, task or backbone (with the known names).
        ValueError: a bad option; the message names the command-line option (``--set mal.lora.lr='abc':
            expected a float``, ``--task-set``, ``--data-dir``, ``--backbone-set``, ``--folds``).
    """
    for m in spec.method_overrides:
        if m not in spec.methods:
            raise ValueError(f"--set {m}.*: method {m!r} is not in --methods {spec.methods}")
    for m in spec.methods:
        try:
            METHODS.get(m).make_config(spec.preset, spec.method_overrides.get(m))
        except ConfigValueError as e:
            raise ValueError(e.for_option(m)) from None
    for t, options in spec.task_options.items():
        if t not in spec.tasks:
            raise ValueError(f"--task-set {t}.*: task {t!r} is not in --tasks {spec.tasks}")
        check_task_options(t, options)
    for t in spec.tasks:
        cls = TASKS.get(t)
        if not cls.needs_data_dir:
            continue
        where = f"task {t} reads {cls.needs}; obtain it from {cls.source}"
        folder = data_dir_for(spec.data_dir, t)
        if not folder:
            raise ValueError(f"--data-dir is required (a folder, or {t}=FOLDER): {where}")
        if not Path(folder).is_dir():
            raise ValueError(f"--data-dir {folder}: no such folder ({where})")
    backbone_factory(spec.backbone, spec.backbone_options)
    if not spec.seeds:
        raise ValueError("no seeds given")
    if spec.executor not in ("local", "ray"):
        raise ValueError(f"--executor {spec.executor}: expected local or ray")
    if spec.executor == "ray":
        if not spec.cpus_per_cell > 0 or spec.gpus_per_cell < 0 or spec.max_retries < 0:
            raise ValueError("--cpus-per-cell must be > 0, --gpus-per-cell and --max-retries >= 0")
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ImportError("--executor ray needs Ray: pip install 'ray>=2.40'")
    elif spec.ray_address:
        raise ValueError("--ray-address is for --executor ray")


def prepare(spec: RunSpec) -> tuple[dict[str, Task], AudioLLMBackbone]:
    """:func:`validate`, then build every task (its data loaded, its preset and options applied;
    ``--folds`` checked against its folds) and the backbone: everything that can fail on what the
    user gave fails here, before an output folder or an MLflow run exists.

    Raises:
        KeyError, ValueError: as :func:`validate`; a task's own error for its data, prefixed with
        the task and the data folder.
    """
    validate(spec)
    tasks = {}
    for t in spec.tasks:
        try:
            task = _build_task(spec, t)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"task {t} (--data-dir {data_dir_for(spec.data_dir, t)}): {e}") from e
        except TypeError as e:  # a --task-set value of the wrong type
            raise ValueError(f"task {t}: --task-set {spec.task_options.get(t)}: {e}") from e
        have = [f.index for f in task.folds()]
        if spec.folds is not None and not set(spec.folds) <= set(have):
            raise ValueError(f"--folds {','.join(map(str, spec.folds))}: task {t} has folds "
                             f"{','.join(map(str, have))}")
        tasks[t] = task
    return tasks, make_backbone(spec.backbone, spec.backbone_options)


def _build_task(spec: RunSpec, name: str) -> Task:
    """Task ``name`` with the run's data folder, preset and its ``--task-set`` options."""
    return TASKS.get(name)(data_dir=data_dir_for(spec.data_dir, name), preset=spec.preset,
                           **spec.task_options.get(name, {}))


def _cells(spec: RunSpec, task: Task, manifest: dict, backbone: AudioLLMBackbone, folds, methods,
           seeds) -> list["Cell"]:
    """The run's cells of ``task``: fold x method x seed, in that order (the order of results.csv)."""
    label = preset_label(spec.preset, spec.task_options.get(task.name))
    return [Cell(m, task, f, s, backbone, backbone_label(spec.backbone, spec.backbone_options), label, spec.preset,
                 spec.method_overrides.get(m) or {}, manifest) for f in folds for m in methods for s in seeds]


# ---------------------------------------------------------------------------- Ray executor
_WORKER_STATE: dict[tuple[str, str], tuple[Task, dict, AudioLLMBackbone]] = {}


def _worker_cell(spec_json: str, task_name: str, method: str, seed: int, fold: int, store,
                 *after) -> tuple[dict, object]:
    """One cell in a Ray worker: the task and backbone built as the driver built them (once per
    worker process and run), the cell computed and logged to ``store`` (a
    :class:`~benchbench.tracking.CellStore`). A retried attempt first looks for its own earlier
    attempt's FINISHED run, so a worker lost after logging does not log the cell twice. ``after``:
    the results of the cells this one was scheduled behind (Ray passes them once they are done;
    unused: the order is the point, :attr:`ContextMethod.phase1_of`)."""
    spec = RunSpec(**json.loads(spec_json))
    state = _WORKER_STATE.get((spec_json, task_name))
    if state is None:
        _WORKER_STATE.clear()
        task = _build_task(spec, task_name)
        state = (task, task.manifest(), make_backbone(spec.backbone, spec.backbone_options))
        _WORKER_STATE[(spec_json, task_name)] = state
    task, manifest, backbone = state
    (cell,) = _cells(spec, task, manifest, backbone, [f for f in task.folds() if f.index == fold], [method], [seed])
    found = store.find_cell(cell.key)
    return found if found is not None else run_cell(cell, store)


def run_on_ray(spec: RunSpec, cells: list["Cell"], pending: list[int], tracker,
               finished: Callable[[int, dict, pd.DataFrame | None], None]) -> None:
    """Compute ``cells[i]`` for ``i`` in ``pending`` as Ray tasks (``spec.cpus_per_cell`` CPUs and
    ``spec.gpus_per_cell`` GPUs each, retried up to ``spec.max_retries`` times when a worker dies);
    ``finished(i, row, predictions)`` in the driver as each returns. Without ``spec.ray_address`` Ray
    starts on this machine and is shut down at the end; with one it joins that cluster (every node
    needs benchbench installed, the data at ``--data-dir`` and the tracking store reachable: an MLflow
    tracking server or a shared database, not a local sqlite file). A cell whose attempts are all
    lost is a ``failed`` row naming the Ray error. Ctrl-C / SIGTERM cancel what is still running."""
    import ray

    from .tracking import reap_stale_runs

    started = not ray.is_initialized()
    if started:
        ray.init(address=spec.ray_address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, configure_logging=False)
    spec_json = json.dumps(spec.__dict__)
    remote = ray.remote(_worker_cell).options(num_cpus=spec.cpus_per_cell, num_gpus=spec.gpus_per_cell,
                                              max_retries=spec.max_retries)
    store = tracker.cells

    def submit(i: int, after=()):
        c = cells[i]
        return remote.remote(spec_json, c.task.name, c.method, c.seed, c.fold.index, store, *after)

    # a cell whose Phase 1 is another method's training (mal after lora) waits for that cell of its
    # task, fold and seed, then replays the training from the on-disk Phase-1 cache
    refs, by_cell, waits = {}, {}, {}
    for i in sorted(pending, key=lambda i: METHODS.get(cells[i].method).phase1_of is not None):
        c = cells[i]
        dep = by_cell.get((c.task.name, c.fold.index, c.seed, METHODS.get(c.method).phase1_of))
        ref = submit(i, [dep] if dep is not None else [])
        refs[ref], by_cell[(c.task.name, c.fold.index, c.seed, c.method)] = i, ref
        if dep is not None:
            waits[i] = dep
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=30)
            tracker.heartbeat()
            for ref in ready:
                i = refs.pop(ref)
                try:
                    row, preds = ray.get(ref)
                except ray.exceptions.RayError as e:
                    # a cell scheduled behind another: when either's workers were lost, one more try, alone
                    if waits.pop(i, None) is not None:
                        refs[submit(i)] = i
                        continue
                    row, preds = {**cells[i].base, "status": "failed",
                                  "error": f"{type(e).__name__}: {str(e)[:500]}"}, None
                finished(i, row, preds)
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
        # a worker lost while logging left its attempt's child run RUNNING: mark it KILLED now
        for run_id in reap_stale_runs(tracker.client, tracker.experiment_id):
            tqdm.write(f"NOTICE: run {run_id} of a lost Ray worker: marked KILLED")


@contextmanager
def _warnings_to(path: Path):
    """Within the block, Python warnings (libraries' deprecation notices, ...) are appended to
    ``path``, each once per place it comes from, instead of printed through the progress bar; the
    filters and printer are restored after."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        def show(message, category, filename, lineno, file=None, line=None):
            with open(path, "a") as f:
                f.write(warnings.formatwarning(message, category, filename, lineno, line))

        warnings.showwarning = show
        yield


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's pre-emption) inside :func:`run`: handled as Ctrl-C is."""


class _StopOnSigterm:
    """SIGTERM for one run (main thread only; elsewhere a no-op): while cells run it raises
    :class:`Terminated` (once); once the run is writing its outputs (``raising = False``) it is only
    remembered (``seen``), so summary.json and the parent run are complete before the run stops."""

    def __init__(self):
        self.seen, self.raising, self._old = False, True, None

    def __enter__(self) -> "_StopOnSigterm":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.seen = True
        if self.raising:
            self.raising = False
            raise Terminated("SIGTERM")

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _previous_results(out: Path) -> tuple[pd.DataFrame, dict[str, tuple[dict, pd.DataFrame]]]:
    """An earlier run's ``results.csv`` in ``out`` (empty when none) and its finished cells by
    ``cell_key``: ``(row, predictions)``, predictions read back exactly (:func:`read_predictions`)."""
    from .tracking import read_predictions

    path = out / "results.csv"
    if not path.exists():
        return pd.DataFrame(), {}
    rows = pd.read_csv(path, dtype={"cell_key": str})
    if "cell_key" not in rows or not (out / "predictions.csv").exists():
        return rows, {}
    dtypes = json.loads((out / "predictions-dtypes.json").read_text()) if (out / "predictions-dtypes.json").exists() \
        else None
    if dtypes is None:
        return rows, {}
    preds = read_predictions(out / "predictions.csv", dtypes)
    done = {}
    for row in rows.to_dict("records"):
        if row.get("status") == "ok" and isinstance(row.get("cell_key"), str):
            done[row["cell_key"]] = ({k: v for k, v in row.items() if not (isinstance(v, float) and v != v)},
                                     preds[preds["cell_key"] == row["cell_key"]])
    return rows, done


def run(spec: RunSpec, show_progress: bool = True) -> Summary:
    """Run the benchmark; returns its :class:`~benchbench.analysis.Summary` (also written to
    ``<output>/summary.json``, with ``leaderboard.md`` beside it).

    A cell whose key (:attr:`Cell.key`) already has a FINISHED run in the tracking store, or a row
    in ``<output>/results.csv`` of an earlier run into the same folder, is reused (its row and
    predictions read back), unless ``spec.rerun``. An existing output folder is resumed into: its
    other rows are kept. SIGTERM and Ctrl-C end the parent run KILLED, with summary.json holding
    what finished (:class:`Terminated` / ``KeyboardInterrupt`` propagate).

    Raises (before any output folder or MLflow run exists): ``KeyError`` for an unknown method,
    task or backbone; ``ValueError`` for a bad option or missing data (:func:`prepare`).
    """
    from .tracking import Tracker  # MLflow import is slow: only when running

    tasks, backbone = prepare(spec)
    out = Path(spec.output) if spec.output else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    earlier_rows, earlier = _previous_results(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec.__dict__, indent=2))
    tracker = Tracker(spec.tracking_uri, f"bench-{out.name}",
                      params={k: v for k, v in spec.__dict__.items() if k != "method_overrides"},
                      tags={"output_dir": str(out.resolve())})
    for run_id in tracker.reaped:
        tqdm.write(f"NOTICE: run {run_id} was left RUNNING by a process that is gone: marked KILLED")
    rows: list[dict] = []
    predictions: list[pd.DataFrame] = []
    dtypes: dict[str, str] = {}
    task_info: dict[str, TaskSummary] = {}
    status = "FINISHED"
    counts = {"reused": 0, "computed": 0}
    keys: set[str] = set()

    def save() -> None:
        kept = earlier_rows[~earlier_rows["cell_key"].isin(keys)] if "cell_key" in earlier_rows else earlier_rows
        kept_keys = set(kept["cell_key"]) if "cell_key" in kept else set()
        pd.concat([kept, pd.DataFrame(rows)], ignore_index=True).to_csv(out / "results.csv", index=False)
        old = [p for k, (_, p) in earlier.items() if k in kept_keys]
        if predictions or old:
            pd.concat(old + predictions, ignore_index=True).to_csv(out / "predictions.csv", index=False)
            (out / "predictions-dtypes.json").write_text(json.dumps(dtypes))

    done: dict[int, tuple[dict, pd.DataFrame | None]] = {}

    def record(i: int, row: dict, preds: pd.DataFrame | None) -> None:
        done[i] = (row, preds)
        keys.add(row["cell_key"])
        rows[:] = [done[j][0] for j in sorted(done)]
        predictions[:] = [done[j][1] for j in sorted(done) if done[j][1] is not None]
        if preds is not None:
            dtypes.update({c: str(t) for c, t in preds.dtypes.items()})
        save()

    with _StopOnSigterm() as stop:
        try:
            with _warnings_to(out / "warnings.log"):
                cells: list[Cell] = []
                for task_name, task in tasks.items():
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
                    cells += _cells(spec, task, manifest, backbone, folds, spec.methods, spec.seeds)
                pending = []
                for i, cell in enumerate(cells):
                    found = None if spec.rerun else (earlier.get(cell.key) or tracker.find_cell(cell.key))
                    if found is None:
                        pending.append(i)
                    else:
                        counts["reused"] += 1
                        record(i, {**found[0], "reused": True}, found[1])
                bar = tqdm(total=len(pending), desc="cells", disable=not show_progress, unit="cell")
                if spec.executor == "ray":
                    def finished(i: int, row: dict, preds: pd.DataFrame | None) -> None:
                        counts["computed"] += 1
                        record(i, {**row, "reused": False}, preds)
                        bar.update()

                    run_on_ray(spec, cells, pending, tracker, finished)
                else:
                    for i in pending:
                        cell = cells[i]
                        bar.set_postfix_str(f"{cell.task.name} {cell.label} seed={cell.seed} fold={cell.fold.index}")
                        tag = f"  [{cell.label} s{cell.seed} f{cell.fold.index}] "

                        def progress(msg, d, tag=tag):
                            tracker.heartbeat()
                            bar.write(tag + msg + " " + " ".join(f"{k}={v:.3f}" for k, v in d.items()))

                        row, preds = run_cell(cell, tracker, progress)
                        counts["computed"] += 1
                        tracker.heartbeat()
                        record(i, {**row, "reused": False}, preds)
                        bar.update()
                bar.close()
        except BaseException as e:  # the parent run records how it ended; results so far are kept below
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            raise
        finally:
            stop.raising = False  # from here a SIGTERM waits until the outputs are written
            results = pd.DataFrame(rows)
            preds_df = pd.concat(predictions) if predictions else pd.DataFrame()
            summary = summarize(results, preds_df, task_info, spec.baseline)
            summary.run = {"output": str(out), "mlflow_tracking_uri": tracker.tracking_uri,
                           "mlflow_parent_run_id": tracker.parent_run_id, "spec": spec.__dict__,
                           "backbone_key": backbone.key, "cells_reused": counts["reused"],
                           "cells_computed": counts["computed"], "status": "KILLED" if stop.seen else status}
            summary.write(out / "summary.json")
            from .leaderboard.render import render_markdown  # the run's own table, as the leaderboard renders it

            (out / "leaderboard.md").write_text(render_markdown(summary, reference=spec.baseline))
            if rows and any(r["status"] == "failed" for r in rows):
                status = "FAILED"
            if stop.seen and summary.run["status"] != "KILLED":  # the signal came while the summary was written
                summary.run["status"] = "KILLED"
                summary.write(out / "summary.json")
            tracker.finish(out / "summary.json", "KILLED" if stop.seen else status)
    if stop.seen:  # SIGTERM while the outputs were written: they are complete, now stop
        raise Terminated("SIGTERM")
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
        return f"{self.label}-{self.task.name}-s{self.seed}-f{self.fold.index}"

    @cached_property
    def config(self):
        """The method's fully resolved config (preset + overrides)."""
        return METHODS.get(self.method).make_config(self.config_preset, self.overrides)

    @cached_property
    def label(self) -> str:
        """The method as results name it: ``mal`` for the papers' form, ``mal[speaker]`` for a variant
        (:meth:`ContextMethod.label`)."""
        return METHODS.get(self.method).label(self.config)

    @property
    def base(self) -> dict:
        """The identifying columns of the cell's results.csv and predictions.csv rows (``method``: the
        label with the variant, ``method_name``: the registry name)."""
        return {"method": self.label, "method_name": self.method, "task": self.task.name,
                "backbone": self.backbone_name, "seed": self.seed, "fold": self.fold.index, "cell_key": self.key}

    @cached_property
    def key(self) -> str:
        """The cell's identity (sha256): method and its fully resolved config, task, its options and
        preset, the data manifest's and the fold's hashes, backbone label and key, seed, fold and
        :data:`RESULTS_VERSION`. Equal keys give equal results, so a finished cell is reused, never redone."""
        config = self.config
        task_params = {k: v for k, v in self.task.params().items() if k != "data_dir"}  # content is in the manifest
        return hash_json({"method": self.method, "config": config.to_dict(), "task": self.task.name,
                          "task_params": task_params, "preset": self.preset, "data": self.manifest["sha256"],
                          "fold_data": self.manifest["folds"][str(self.fold.index)], "backbone": self.backbone_name,
                          "backbone_key": self.backbone.key, "seed": self.seed, "fold": self.fold.index,
                          "results_version": RESULTS_VERSION})


def run_cell(cell: Cell, tracker, progress: Callable[[str, dict], None] | None = None
             ) -> tuple[dict, pd.DataFrame | None]:
    """Fit, stream the test split, score and log one cell.

    Returns ``(row, predictions)``: the ``results.csv`` row (``status`` ``ok`` with metrics and
    costs, or ``failed`` with the error and traceback, in which case predictions are ``None``) and
    the scored test utterances' ``predictions.csv`` rows. Never raises for a failure inside the
    method: other cells are independent.
    """
    cls = METHODS.get(cell.method)
    config = cell.config
    task, fold, seed, backbone = cell.task, cell.fold, cell.seed, cell.backbone
    base = cell.base
    params = {**base, "preset": cell.preset, "backbone_key": backbone.key,
              **{f"method.{k}": v for k, v in config.flat().items()},
              **{f"task.{k}": v for k, v in task.params().items()}}
    tags = {"data_manifest_sha256": cell.manifest["sha256"],
            "fold_manifest_sha256": hash_json(cell.manifest["folds"][str(fold.index)]),
            "config_sha256": hash_json(params), "uses_context": str(cls.uses_context), "cell_key": cell.key}
    try:
        # the method works on the backbone's own LM (no copy); its adapters and hooks go at the block's end
        with backbone.lend_lm():
            seed_everything(seed)
            reset_peak_memory()
            t0 = time.perf_counter()
            method = cls(backbone, task.labels, config, seed=seed)
            method.fit(fold.train, fold.dev, progress=progress)
            t1 = time.perf_counter()
            selected = method.selected or {}
            if cls.phases == 2 and selected.get("phase") == 1 and progress:
                progress("NOTICE: dev selected Phase 1 over every Phase-2 epoch: the memory is unused in this cell "
                         "(its predictions are Phase 1's, i.e. lora's)", {})
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
    # model selection on dev is a result: which phase (2: the memory trained after the task LoRA) and epoch
    selection = {"phases": cls.phases, "selected_phase": selected.get("phase"),
                 "selected_epoch": None if selected.get("epoch") is None else selected["epoch"] + 1,
                 # the task LoRA's training replayed from the Phase-1 cache (another cell's), not repeated
                 "phase1_replayed": method.phase1_replayed}
    row = {**base, "status": "ok", **metrics, **cost, **selection, "n_test": n_test, "n_test_stream": n_stream,
           "uses_context": cls.uses_context}
    tags.update({k: str(v) for k, v in selection.items() if v is not None})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        preds.to_csv(tmp / "predictions.csv", index=False)
        # what a later run needs to reuse this cell exactly (benchbench.tracking.Tracker.find_cell)
        (tmp / "row.json").write_text(json.dumps(
            {**row, "prediction_dtypes": {c: str(t) for c, t in preds.dtypes.items()}},
            default=lambda v: v.item() if hasattr(v, "item") else str(v)))
        pd.DataFrame(confusion(y_true, y_pred, len(task.labels)), index=task.labels,
                     columns=task.labels).to_csv(tmp / "confusion_matrix.csv")
        if method.test_time_issues:
            (tmp / "test_time_issues.json").write_text(json.dumps(method.test_time_issues, indent=2))
        (tmp / "config.json").write_text(json.dumps({"params": params, "tags": tags}, indent=2, default=str))
        run_id = tracker.log_cell(cell.name, params, {**metrics, **cost}, method.curves, tags, tmp)
    return {**row, "mlflow_run_id": run_id}, preds
