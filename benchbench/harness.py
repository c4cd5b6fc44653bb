"""The benchmark runner: methods x tasks x backbone x seeds x folds.

A run is planned once (:func:`plan_cells`: every cell of every task, with the data manifests), the
cells already finished are reused (from the output folder or the tracking store), and the rest are
computed by an executor: :func:`execute_local` (this process, one cell at a time) or
:func:`execute_ray` (Ray tasks, on this machine or a cluster). Both compute cells with
:func:`benchbench.cells.compute_cell`, take them in turn from one :class:`Scheduler` (which claims a
cell in the tracking store before it is computed, so that two drivers on one store never compute a
cell twice) and hand each :class:`~benchbench.cells.CellRecord` to one :class:`ResultsWriter`, the
only place results are kept: ``results.csv`` and ``predictions.csv`` rewritten after every cell (a
crash or Ctrl-C loses nothing already computed), the cell's own folder ``cells/<cell_key>/`` (its
MLflow run's params, metrics, curves, tags and files) and its MLflow child run. The run ends in one
place (:func:`finalise`): ``summary.json`` and ``leaderboard.md`` from its
:class:`~benchbench.analysis.Summary`, however the run ends.

A failing cell is recorded (status ``failed``, with its error) and the run goes on. A tracking store
that cannot be reached does not stop the run either: the cells go on into the output folder (complete
on its own), one line says so, and the store is tried again between cells; whatever was computed
meanwhile is logged when it is back, by this run or by the same command later (``cells: 0 computed``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm.auto import tqdm

from .analysis import Summary, TaskSummary, fold_transitions, summarize
from .backbone import AudioLLMBackbone, backbone_factory, backbone_label, make_backbone
from .cells import RESULTS_VERSION, Cell, CellRecord, compute_cell  # noqa: F401 - RESULTS_VERSION: public here too
from .method import METHODS, ConfigValueError
from .names import backbone_note
from .task import TASKS, Task, check_task_options, data_dir_for, preset_label

log = logging.getLogger(__name__)

POLL_S = float(os.environ.get("BENCHBENCH_CLAIM_POLL_S", 10))
"""Seconds between looks at cells that another process is computing (:class:`Scheduler`)."""


@dataclass
class RunSpec:
    """What ``bench run`` was asked to do (the CLI's options, resolved)."""

    methods: list[str]
    tasks: list[str]
    backbone: str | None = None              # None: each task's own default (Task.default_backbone)
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
    threads: int = 1                         # torch CPU threads of every cell, under either executor
    tune: int = 0                            # --tune N: Optuna trials per cell on its dev split (benchbench.tuning)
    tune_seed: int | None = None             # --tune-seed S: every seed takes the values tuned at seed S

    def backbone_for(self, task: str) -> str:
        """The backbone ``task``'s cells run on: ``--backbone`` when given (every task of the run), else
        the task's :attr:`~benchbench.task.Task.default_backbone` (a pretrained audio encoder for the
        speech corpora, the random tiny one for ``synthetic``). ``KeyError`` for an unknown task."""
        return self.backbone or TASKS.get(task).default_backbone

    def backbones(self) -> dict[str, str]:
        """Task -> backbone name (:meth:`backbone_for`), in task order."""
        return {t: self.backbone_for(t) for t in self.tasks}


def validate(spec: RunSpec) -> None:
    """Check every name and option without loading data: methods (every config built, every ``--set``
    value type- and range-checked, ``--set`` only for methods being run), tasks (options, data
    folder), backbone options, seeds, threads.

    Raises:
        KeyError: an unknown method, task or backbone (with the known names).
        ValueError: a bad option; the message names the command-line option (``--set mal.lora.lr='abc':
            expected a float``, ``--task-set``, ``--data-dir``, ``--backbone-set``, ``--folds``, ``--threads``).
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
    for name in dict.fromkeys(spec.backbones().values()):
        try:
            backbone_factory(name, spec.backbone_options)
        except ValueError as e:
            if spec.backbone is None:  # the option met a task's default backbone, which the user did not name
                tasks = [t for t, b in spec.backbones().items() if b == name]
                raise ValueError(f"{e} (the default backbone of task {', '.join(tasks)}; name one with --backbone)"
                                 ) from None
            raise
    if not spec.seeds:
        raise ValueError("no seeds given")
    if spec.threads < 1:
        raise ValueError(f"--threads {spec.threads}: expected >= 1")
    if spec.tune < 0:
        raise ValueError(f"--tune {spec.tune}: expected >= 0 trials")
    if spec.tune_seed is not None and not spec.tune:
        raise ValueError(f"--tune-seed {spec.tune_seed}: only with --tune N")
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


def prepare(spec: RunSpec) -> tuple[dict[str, Task], dict[str, AudioLLMBackbone]]:
    """:func:`validate`, then build every task (its data loaded, its preset and options applied;
    ``--folds`` checked against its folds) and its backbone (:meth:`RunSpec.backbone_for`; each
    backbone built once): everything that can fail on what the user gave fails here, before an output
    folder or an MLflow run exists. Returns the tasks and each task's backbone, by task name.

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
    built: dict[str, AudioLLMBackbone] = {}
    for name in dict.fromkeys(spec.backbones().values()):
        built[name] = make_backbone(name, spec.backbone_options)
    return tasks, {t: built[spec.backbone_for(t)] for t in tasks}


def _build_task(spec: RunSpec, name: str) -> Task:
    """Task ``name`` with the run's data folder, preset and its ``--task-set`` options."""
    return TASKS.get(name)(data_dir=data_dir_for(spec.data_dir, name), preset=spec.preset,
                           **spec.task_options.get(name, {}))


def _cells(spec: RunSpec, task: Task, manifest: dict, backbone: AudioLLMBackbone, folds, methods,
           seeds) -> list[Cell]:
    """The run's cells of ``task``: fold x method x seed, in that order (the order of results.csv).
    With ``--tune N`` the preset label says so (``default+tune=8``): tuned cells are never pooled with
    untuned ones or with another N; ``--tune-seed S`` adds ``@sS`` (``default+tune=8@s0``). A method
    with nothing to tune (no search space: ``zero_shot``, a plugin without one) is never labelled
    tuned: its cells are the untuned cells (label, key and ``tuning_trials`` 0), so the leaderboard
    never lists it in a "tuned" section beside methods that were."""
    from .tuning import no_search_space

    tuned = f"+tune={spec.tune}" + (f"@s{spec.tune_seed}" if spec.tune_seed is not None else "") if spec.tune else ""
    base = preset_label(spec.preset, spec.task_options.get(task.name))
    tuning_dir = str(Path(spec.output) / "tuning") if spec.tune else None
    tunes = {m: bool(spec.tune) and no_search_space(m) is None for m in methods}
    label = backbone_label(spec.backbone_for(task.name), spec.backbone_options, backbone.autocast)
    return [Cell(m, task, f, s, backbone, label,
                 base + tuned if tunes[m] else base, spec.preset,
                 spec.method_overrides.get(m) or {}, manifest, spec.threads, spec.tune if tunes[m] else 0,
                 tuning_dir if tunes[m] else None, spec.tune_seed if tunes[m] else None)
            for f in folds for m in methods for s in seeds]


def lora_cells(spec: RunSpec, task: Task, backbone: AudioLLMBackbone) -> list[Cell]:
    """The ``lora`` cells ``bench run --methods lora`` would plan for ``task`` on ``backbone`` under
    ``spec`` (its folds, seeds, preset, task and backbone options, threads): fold x seed, their configs
    and keys as a run's (``bench probe --projector`` retrains or replays their training)."""
    folds = [f for f in task.folds() if spec.folds is None or f.index in spec.folds]
    return _cells(spec, task, task.manifest(), backbone, folds, ["lora"], spec.seeds)


def plan_cells(spec: RunSpec, tasks: dict[str, Task], backbones: dict[str, AudioLLMBackbone], out: Path,
               notify: Callable[[str], None]) -> tuple[list[Cell], dict[str, TaskSummary]]:
    """Every cell of the run, in results order (task, fold, method, seed), each task's on its backbone
    (``backbones``: by task name, :func:`prepare`), and each task's summary facts; each task's data
    manifest written to ``out/manifest-<task>.json`` and its notices (skipped files, ...) given to
    ``notify``."""
    cells, task_info = [], {}
    if spec.tune:
        from .tuning import no_search_space

        for m in spec.methods:
            if no_search_space(m) is not None:
                notify(f"NOTICE: {m} has nothing to tune (no search space): its cells run untuned and keep the untuned "
                       "preset label (never listed as tuned)")
    for task_name, task in tasks.items():
        folds = [f for f in task.folds() if spec.folds is None or f.index in spec.folds]
        manifest = task.manifest()
        (out / f"manifest-{task_name}.json").write_text(json.dumps(manifest, indent=2))
        backbone = backbones[task_name]
        notify(f"task {task_name}: backbone "
               f"{backbone_label(spec.backbone_for(task_name), spec.backbone_options, backbone.autocast)}"
               + (" (the task's default; --backbone chooses another)" if spec.backbone is None else ""))
        note = backbone_note(backbone.name)
        if note:
            notify(f"NOTICE {task_name}: backbone {backbone.name}: {note}")
        for notice in task.notices:
            notify(f"NOTICE {task_name}: {notice}")
        task_info[task_name] = TaskSummary(list(task.labels), task.reference(), manifest["sha256"], list(task.notices),
                                           fold_transitions(folds, len(task.labels)))
        cells += _cells(spec, task, manifest, backbones[task_name], folds, spec.methods, spec.seeds)
    return cells, task_info


# ---------------------------------------------------------------------------- the results writer
class ResultsWriter:
    """The one place a run keeps its cells, whichever executor computed them.

    Each cell (reused or computed) becomes its row of ``results.csv`` and its rows of
    ``predictions.csv`` (both rewritten after every cell, rows in plan order after the kept rows of an
    earlier run into the folder). A computed cell is first written whole to ``cells/<cell_key>/``
    (``record.json``: its MLflow run's name, params, metrics, curves and tags; ``artifacts/``: its
    files), then logged to the tracking store (``logged.json`` records the store and run id). A cell
    computed while the store was unreachable keeps its folder unlogged; :meth:`log_unlogged` logs it
    later (this run, once the store is back, or a later run into the same folder)."""

    def __init__(self, out: Path, tracker, earlier_rows: pd.DataFrame, earlier: dict,
                 notify: Callable[[str], None] = tqdm.write):
        self.out, self.tracker, self.notify = out, tracker, notify
        self.earlier_rows, self.earlier = earlier_rows, earlier
        self.done: dict[int, tuple[dict, pd.DataFrame | None]] = {}
        self.dtypes: dict[str, str] = {}
        self.counts = {"reused": 0, "computed": 0, "logged_later": 0}

    def reuse(self, i: int, found: tuple[dict, pd.DataFrame]) -> None:
        """Cell ``i`` as an earlier run left it (its row and predictions, read back exactly)."""
        self.counts["reused"] += 1
        self._record(i, {**found[0], "reused": True}, found[1])

    def computed(self, i: int, cell: Cell, record: CellRecord) -> None:
        """Cell ``i`` as this run computed it: its folder, its MLflow run (a failed cell: its claim
        ended FAILED), its rows."""
        self.counts["computed"] += 1
        row = {**record.row, "reused": False}
        if record.ok:
            folder = self._write_cell_folder(cell.key, cell.name, record)
            row["mlflow_run_id"] = self._log(folder)
        else:
            self.tracker.release(cell.key, "FAILED", record.row.get("error", ""))
        self._record(i, row, record.predictions)

    def _write_cell_folder(self, key: str, name: str, record: CellRecord) -> Path:
        folder = self.out / "cells" / key
        tmp = folder.with_name(f".{key}.{os.getpid()}.tmp")
        (tmp / "artifacts").mkdir(parents=True, exist_ok=True)
        for fname, text in record.files.items():
            (tmp / "artifacts" / fname).write_text(text)
        (tmp / "record.json").write_text(json.dumps(
            {"name": name, "params": record.params, "metrics": record.metrics, "curves": record.curves,
             "tags": record.tags}, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
        if folder.exists():  # a --rerun, or an unlogged earlier computation of the same key
            import shutil

            shutil.rmtree(folder)
        tmp.rename(folder)
        return folder

    def _log(self, folder: Path) -> str | None:
        """Log a cell folder to the store; its run id (``None``: the store is unreachable)."""
        doc = json.loads((folder / "record.json").read_text())
        rid = self.tracker.log_cell(folder.name, doc["name"], doc["params"], doc["metrics"], doc["curves"],
                                    doc["tags"], folder / "artifacts")
        if rid is not None:
            (folder / "logged.json").write_text(json.dumps({"tracking_uri": self.tracker.tracking_uri, "run_id": rid}))
        return rid

    def unlogged(self) -> list[Path]:
        """The cell folders under ``out/cells/`` not logged to this run's store."""
        out = []
        for folder in sorted((self.out / "cells").glob("*/record.json")):
            marker = folder.parent / "logged.json"
            if not marker.exists() or json.loads(marker.read_text()).get("tracking_uri") != self.tracker.tracking_uri:
                out.append(folder.parent)
        return out

    def log_unlogged(self) -> int:
        """Log the cells computed while the store was unreachable (now reachable); how many were. A
        cell the store has FINISHED already is not logged again (its run id is taken)."""
        n = 0
        if "mlflow_run_id" in self.earlier_rows:  # NaN (float) where unlogged: run ids are text
            self.earlier_rows["mlflow_run_id"] = self.earlier_rows["mlflow_run_id"].astype(object)
        for folder in self.unlogged():
            if not self.tracker.online:
                break
            rid = self._log(folder)
            if rid is None:
                break
            n += 1
            for j, (row, preds) in self.done.items():
                if row.get("cell_key") == folder.name:
                    self.done[j] = ({**row, "mlflow_run_id": rid}, preds)
            if folder.name in self.earlier:
                row, preds = self.earlier[folder.name]
                self.earlier[folder.name] = ({**row, "mlflow_run_id": rid}, preds)
            if "cell_key" in self.earlier_rows:
                self.earlier_rows.loc[self.earlier_rows["cell_key"] == folder.name, "mlflow_run_id"] = rid
        if n:
            self.counts["logged_later"] += n
            self.notify(f"NOTICE: logged {n} cell(s) computed while the tracking store was unreachable")
            self._save()
        return n

    def _record(self, i: int, row: dict, preds: pd.DataFrame | None) -> None:
        self.done[i] = (row, preds)
        if preds is not None:
            self.dtypes.update({c: str(t) for c, t in preds.dtypes.items()})
        self._save()

    @property
    def rows(self) -> list[dict]:
        return [self.done[j][0] for j in sorted(self.done)]

    @property
    def predictions(self) -> list[pd.DataFrame]:
        return [self.done[j][1] for j in sorted(self.done) if self.done[j][1] is not None]

    def _save(self) -> None:
        keys = {row["cell_key"] for row, _ in self.done.values()}
        kept = self.earlier_rows
        if "cell_key" in kept:
            kept = kept[~kept["cell_key"].isin(keys)]
        _write_csv(pd.concat([kept, pd.DataFrame(self.rows)], ignore_index=True), self.out / "results.csv")
        kept_keys = set(kept["cell_key"]) if "cell_key" in kept else set()
        old = [p for k, (_, p) in self.earlier.items() if k in kept_keys]
        if self.predictions or old:
            _write_csv(pd.concat(old + self.predictions, ignore_index=True), self.out / "predictions.csv")
            (self.out / "predictions-dtypes.json").write_text(json.dumps(self.dtypes))


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    """``df`` to ``path`` whole or not at all (a temporary file, then ``os.replace``): a reader (a
    resumed run, a script polling the folder) never sees a file half rewritten, nor does a kill -9."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- which cell next
class Scheduler:
    """The order in which a driver computes its pending cells, shared by both executors.

    :meth:`next` hands out the next cell to compute, claimed in the tracking store
    (:meth:`benchbench.tracking.CellStore.claim`): a cell that another process finished meanwhile is
    reused instead; one that another live process is computing waits (one line says so) and is
    looked at again every :data:`POLL_S` seconds (:meth:`wait`) until it is finished there (reused)
    or its process is found dead (claimed and computed here). While the store is unreachable cells
    are computed unclaimed, and it is tried again before each cell (the cells computed meanwhile are
    logged as soon as it is back)."""

    def __init__(self, cells: list[Cell], pending: list[int], tracker, writer: ResultsWriter,
                 on_reused: Callable[[], None] = lambda: None, rerun: bool = False):
        self.cells, self.tracker, self.writer, self.on_reused = cells, tracker, writer, on_reused
        self.rerun = rerun  # --rerun: a FINISHED run elsewhere does not make a cell done
        self.queue = deque(pending)
        self.waiting: dict[int, str] = {}  # cell index -> who computes it

    @property
    def finished(self) -> bool:
        return not self.queue and not self.waiting

    def next(self) -> int | None:
        """The next cell to compute (claimed), or ``None`` when every remaining cell waits on another process."""
        while self.queue:
            if not self.tracker.online and self.tracker.reconnect():
                self.writer.log_unlogged()
            i = self.queue.popleft()
            if i in self.writer.done:
                continue
            cell = self.cells[i]
            state, who = self.tracker.claim(cell.key, cell.name, cell.tags, self.rerun)
            if state == "done":
                found = self.tracker.find_cell(cell.key)
                if found is not None:
                    self.waiting.pop(i, None)
                    self.writer.reuse(i, found)
                    self.on_reused()
                    continue
            elif state == "held":
                if i not in self.waiting:
                    self.writer.notify(f"NOTICE: cell {cell.name} is being computed by another process ({who}): "
                                       "going on with other cells, it is reused when it finishes")
                self.waiting[i] = who
                continue
            self.waiting.pop(i, None)
            return i
        return None

    def recheck(self) -> None:
        """Put the waiting cells back in the queue (once each), for :meth:`next` to look at again."""
        self.queue.extend(i for i in sorted(self.waiting) if i not in self.queue)

    def wait(self, seconds: float = POLL_S) -> None:
        """Sleep, keeping this driver's claims alive, then :meth:`recheck`."""
        time.sleep(seconds)
        self.tracker.heartbeat()
        self.recheck()


# ---------------------------------------------------------------------------- executors
def execute_local(spec: RunSpec, cells: list[Cell], pending: list[int], tracker, writer: ResultsWriter,
                  bar) -> None:
    """Compute the pending cells in this process, one at a time, in plan order."""
    sched = Scheduler(cells, pending, tracker, writer, bar.update, spec.rerun)
    while not sched.finished:
        i = sched.next()
        if i is None:
            sched.wait()
            continue
        cell = cells[i]
        bar.set_postfix_str(f"{cell.task.name} {cell.label} seed={cell.seed} fold={cell.fold.index}")
        tag = f"  [{cell.label} s{cell.seed} f{cell.fold.index}] "

        def progress(msg, d, tag=tag):
            tracker.heartbeat()
            bar.write(tag + msg + " " + " ".join(f"{k}={v:.3f}" for k, v in d.items()))

        record = compute_cell(cell, progress)
        tracker.heartbeat()
        writer.computed(i, cell, record)
        bar.update()


_WORKER_STATE: dict[tuple[str, str], tuple[Task, dict, AudioLLMBackbone]] = {}


def _worker_cell(spec_json: str, task_name: str, method: str, seed: int, fold: int, *after) -> CellRecord:
    """One cell in a Ray worker, computed (not logged: the driver's :class:`ResultsWriter` does that):
    the task and backbone built as the driver built them, once per worker process and run. ``after``:
    the results of the cells this one was scheduled behind (Ray passes them once they are done;
    unused: the order is the point, :attr:`ContextMethod.phase1_of`)."""
    spec = RunSpec(**json.loads(spec_json))
    state = _WORKER_STATE.get((spec_json, task_name))
    if state is None:
        _WORKER_STATE.clear()
        task = _build_task(spec, task_name)
        state = (task, task.manifest(), make_backbone(spec.backbone_for(task_name), spec.backbone_options))
        _WORKER_STATE[(spec_json, task_name)] = state
    task, manifest, backbone = state
    (cell,) = _cells(spec, task, manifest, backbone, [f for f in task.folds() if f.index == fold], [method], [seed])
    return compute_cell(cell)


def execute_ray(spec: RunSpec, cells: list[Cell], pending: list[int], tracker, writer: ResultsWriter,
                bar) -> None:
    """Compute the pending cells as Ray tasks (``spec.cpus_per_cell`` CPUs and ``spec.gpus_per_cell``
    GPUs each, retried up to ``spec.max_retries`` times when a worker dies), as many at once as the
    cluster's CPUs (and GPUs) hold, so that a second driver on the same store shares the grid.
    Without ``spec.ray_address`` Ray starts on this machine and is shut down at the end; with one it
    joins that cluster (every node needs benchbench installed and the data at ``--data-dir``; only
    the driver talks to the tracking store). A cell whose Phase 1 is another method's training
    (:attr:`ContextMethod.phase1_of`) starts after that cell of its task, fold and seed and replays
    it from the on-disk Phase-1 cache; when either's worker is lost it is tried once more alone. A
    cell whose attempts are all lost is a ``failed`` row naming the Ray error. Ctrl-C / SIGTERM
    cancel what is still running."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=spec.ray_address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, configure_logging=False)
    spec_json = json.dumps(spec.__dict__)
    remote = ray.remote(_worker_cell).options(num_cpus=spec.cpus_per_cell, num_gpus=spec.gpus_per_cell,
                                              max_retries=spec.max_retries)
    # Phase-1 consumers (mal after lora) last, so their lora cell is usually submitted before them
    order = sorted(pending, key=lambda i: METHODS.get(cells[i].method).phase1_of is not None)
    sched = Scheduler(cells, order, tracker, writer, bar.update, spec.rerun)
    refs: dict = {}
    try:
        _ray_loop(ray, remote, spec_json, cells, sched, refs, _ray_slots(ray, spec), tracker, writer, bar)
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def _ray_slots(ray, spec: RunSpec) -> int:
    """How many cells the cluster runs at once (its CPUs and GPUs over each cell's share), at least 1."""
    res = ray.cluster_resources()
    slots = res.get("CPU", 1) / spec.cpus_per_cell
    if spec.gpus_per_cell:
        slots = min(slots, res.get("GPU", 0) / spec.gpus_per_cell)
    return max(1, int(slots))


def _ray_loop(ray, remote, spec_json, cells, sched: Scheduler, refs: dict, slots: int, tracker, writer, bar):
    """Submit claimed cells while there are free slots; keep each as it returns."""
    by_cell, after = {}, {}  # (task, fold, seed, method) -> ref in flight; cell -> the ref it waits for

    def submit(i: int, alone: bool = False) -> None:
        c = cells[i]
        dep = None if alone else by_cell.get((c.task.name, c.fold.index, c.seed, METHODS.get(c.method).phase1_of))
        ref = remote.remote(spec_json, c.task.name, c.method, c.seed, c.fold.index, *([dep] if dep else []))
        refs[ref], by_cell[(c.task.name, c.fold.index, c.seed, c.method)] = i, ref
        if dep is not None:
            after[i] = dep

    while refs or not sched.finished:
        while len(refs) < slots and (i := sched.next()) is not None:
            submit(i)
        if not refs:
            sched.wait()
            continue
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=min(POLL_S, 30) if sched.waiting else 30)
        tracker.heartbeat()
        if not ready:
            sched.recheck()
        for ref in ready:
            i = refs.pop(ref)
            try:
                record = ray.get(ref)
            except ray.exceptions.RayError as e:
                if after.pop(i, None) is not None:  # scheduled behind a lost cell, or lost itself: once more, alone
                    submit(i, alone=True)
                    continue
                record = CellRecord({**cells[i].base, "status": "failed", "error": f"{type(e).__name__}: {str(e)[:500]}"})
            writer.computed(i, cells[i], record)
            bar.update()


_WARNED: dict[Path, set] = {}
"""Per warnings.log of this process, the (category, file, line) already written."""


@contextmanager
def _warnings_to(path: Path):
    """Within the block, Python warnings (libraries' deprecation notices, the statistics' degenerate-data
    notices, ...) are appended to ``path``, each once per source line (category, file, line: a
    library's own ``catch_warnings`` resets Python's once-registry, so the printer keeps its own),
    instead of printed through the progress bar; the filters and printer are restored after."""
    seen = _WARNED.setdefault(Path(path).resolve(), set())
    with warnings.catch_warnings():
        warnings.simplefilter("default")

        def show(message, category, filename, lineno, file=None, line=None):
            if (category, filename, lineno) in seen:
                return
            seen.add((category, filename, lineno))
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
    predictions read back), unless ``spec.rerun``; one that another live process is computing is
    reused when it finishes there (:class:`Scheduler`). An existing output folder is resumed into: its
    other rows are kept, and its cells computed while the store was unreachable are logged. SIGTERM
    and Ctrl-C end the parent run KILLED, with summary.json holding what finished
    (:class:`Terminated` / ``KeyboardInterrupt`` propagate).

    Raises (before any output folder or MLflow run exists): ``KeyError`` for an unknown method,
    task or backbone; ``ValueError`` for a bad option or missing data (:func:`prepare`), or an
    output folder it could not write (:func:`check_output`).
    """
    from .tracking import Tracker  # MLflow import is slow: only when running

    out = Path(spec.output) if spec.output else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    check_output(out)
    tasks, backbones = prepare(spec)
    if spec.tune and not spec.output:  # tuned cells keep their studies under it, workers included
        import dataclasses

        spec = dataclasses.replace(spec, output=str(out.resolve()))
    earlier_rows, earlier = _previous_results(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec.__dict__, indent=2))
    tracker = Tracker(spec.tracking_uri, f"bench-{out.name}",
                      params={k: v for k, v in spec.__dict__.items() if k != "method_overrides"},
                      tags={"output_dir": str(out.resolve())}, notify=tqdm.write,
                      offline_note=f"the cells go on into {out} (complete on its own); it is tried again between "
                                   "cells, and the same command logs what is missing once it is back")
    for run_id in tracker.reaped:
        tqdm.write(f"NOTICE: run {run_id} was left RUNNING by a process that is gone: marked KILLED")
    writer = ResultsWriter(out, tracker, earlier_rows, earlier)
    task_info: dict[str, TaskSummary] = {}
    status = "FINISHED"
    with _StopOnSigterm() as stop:
        try:
            with _warnings_to(out / "warnings.log"):
                cells, info = plan_cells(spec, tasks, backbones, out, tqdm.write)
                task_info.update(info)
                for name in tasks:
                    tracker.log_artifact(out / f"manifest-{name}.json")
                writer.log_unlogged()  # an earlier run's cells, computed while the store was unreachable
                pending = _reuse_finished(spec, cells, tracker, writer)
                bar = tqdm(total=len(pending), desc="cells", disable=not show_progress, unit="cell")
                (execute_ray if spec.executor == "ray" else execute_local)(spec, cells, pending, tracker, writer, bar)
                bar.close()
                if not tracker.online and tracker.reconnect():
                    writer.log_unlogged()
        except BaseException as e:  # the parent run records how it ended; results so far are kept below
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            raise
        finally:
            stop.raising = False  # from here a SIGTERM waits until the outputs are written
            with _warnings_to(out / "warnings.log"):  # the statistics' warnings too, not on the terminal
                summary = finalise(spec, out, tracker, writer, task_info, backbones, status, stop)
    if stop.seen:  # SIGTERM while the outputs were written: they are complete, now stop
        raise Terminated("SIGTERM")
    return summary


def check_output(out: Path) -> None:
    """Raise ``ValueError`` naming ``--output`` and the reason where a run could not write its outputs
    into the folder ``out`` (a file in the way, a read-only place), before any work; leaves nothing
    behind (the check writes a temporary folder in ``out``, or in its nearest existing parent, and
    removes it)."""
    import tempfile

    where = Path(out)
    while not where.exists() and where.parent != where:
        where = where.parent
    if not where.is_dir():
        raise ValueError(f"--output {out}: {where} is a file, not a folder")
    try:
        with tempfile.TemporaryDirectory(dir=where, prefix=".bench-write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"--output {out}: cannot write in {where} ({e.strerror or e}); choose a folder this "
                         "user can write") from None


def _reuse_finished(spec: RunSpec, cells: list[Cell], tracker, writer: ResultsWriter) -> list[int]:
    """Record the cells finished before (this output folder first, then the store) as reused; the
    indices of the others, to compute. ``spec.rerun``: all of them are computed."""
    pending = []
    for i, cell in enumerate(cells):
        found = None if spec.rerun else (writer.earlier.get(cell.key) or tracker.find_cell(cell.key))
        if found is None:
            pending.append(i)
        else:
            writer.reuse(i, found)
    return pending


def finalise(spec: RunSpec, out: Path, tracker, writer: ResultsWriter, task_info: dict[str, TaskSummary],
             backbones: dict[str, AudioLLMBackbone], status: str, stop: "_StopOnSigterm") -> Summary:
    """End a run, however it ended: ``summary.json`` (with the run's facts: output, store, parent,
    counts, cells not logged to the store, the resolved versions of the key packages, status) and
    ``leaderboard.md`` from the cells kept so far, then the parent run ended with the status (``KILLED`` after SIGTERM or Ctrl-C, ``FAILED`` when a
    cell failed or the run raised)."""
    from .tracking import package_versions

    rows, predictions = writer.rows, writer.predictions
    summary = summarize(pd.DataFrame(rows), pd.concat(predictions) if predictions else pd.DataFrame(), task_info,
                        spec.baseline)
    if rows and any(r["status"] == "failed" for r in rows) and status == "FINISHED":
        status = "FAILED"
    summary.run = {"output": str(out), "mlflow_tracking_uri": tracker.tracking_uri,
                   "mlflow_parent_run_id": tracker.parent_run_id, "spec": spec.__dict__,
                   "backbones": {t: {"name": spec.backbone_for(t), "key": b.key, "run_key": b.run_key, "autocast": b.autocast,
                                     "default": spec.backbone is None} for t, b in backbones.items()},
                   "cells_reused": writer.counts["reused"],
                   "cells_computed": writer.counts["computed"], "cells_logged_later": writer.counts["logged_later"],
                   "cells_not_logged": len(writer.unlogged()), "tracking_problem": tracker.store.problem,
                   "versions": package_versions(), "status": "KILLED" if stop.seen else status}
    summary.write(out / "summary.json")
    from .leaderboard.render import render_markdown  # the run's own table, as the leaderboard renders it

    (out / "leaderboard.md").write_text(render_markdown(summary, reference=spec.baseline))
    if stop.seen and summary.run["status"] != "KILLED":  # the signal came while the summary was written
        summary.run["status"] = "KILLED"
        summary.write(out / "summary.json")
    tracker.finish(out / "summary.json", summary.run["status"])
    return summary
