"""``bench sweep``: Optuna hyperparameter search for one method on one task, on dev only.

Each trial samples config overrides from the method's own :meth:`~benchbench.method.ContextMethod.search_space`
on top of a preset, fits the method on the chosen fold's training dialogues, and returns the
fold's **dev** metric (the method's own dev-selected checkpoint, never test). Every dev
evaluation during fitting is reported to Optuna as one step, so its pruner (median by default)
can stop a poor trial after an epoch (``optuna.TrialPruned``).

Workers and resumption. The study lives in Optuna's storage: ``--storage journal:PATH`` (the
default, ``runs/sweeps/optuna.journal``: Optuna's journal file storage, safe for several processes
on one file system) or an RDB URL (``sqlite:///...``, ``postgresql://...``; with RDB storage,
workers heartbeat and a crashed worker's trial is retried by the next one). Any number of workers
start ``bench sweep`` with the same ``--storage`` and ``--study``; each stops when the study holds
``--trials`` finished (complete or pruned) trials, so an interrupted sweep restarted with the same
arguments continues the same study and runs only what is missing.

Tracking. One MLflow parent run per study (shared by all workers, found by its ``optuna_study``
tag) and one child run per trial (params: the resolved config; metrics: each dev evaluation as a
curve and the objective; tags: trial number and final state), logged through
:class:`~benchbench.tracking.CellStore` as ``bench run`` logs its cells: a trial's run carries its
worker's host, pid and heartbeat, so a killed worker's runs are marked KILLED by the next start on
the store, and an unreachable store stops no trial.

Inputs. The task, fold and backbone are built and checked by :func:`benchbench.harness.prepare`, as
for ``bench run`` (the same data-folder, option and fold checks); trials train on ``--threads``
torch threads, as cells do.

Export. :func:`export_best` writes the best trial's fully resolved config as JSON, which
``bench run --config FILE`` accepts.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .method import METHODS
from .tuning import make_storage, no_search_space  # noqa: F401 - make_storage: the sweep's storages (public here too)
from .task import preset_label

log = logging.getLogger(__name__)
DEFAULT_STORAGE = "journal:runs/sweeps/optuna.journal"
CONFIG_FORMAT = 1


@dataclass
class SweepSpec:
    method: str
    task: str
    trials: int = 50
    storage: str = DEFAULT_STORAGE
    study: str | None = None            # default: "<method>-<task>-<backbone>-<preset>"
    preset: str = "default"
    backbone: str | None = None         # None: the task's default backbone (Task.default_backbone)
    data_dir: str | None = None
    fold: int | None = None             # default: the task's first fold
    seed: int = 0
    metric: str = "ua"                  # dev metric to maximise
    pruner: str = "median"              # median | hyperband | none
    tracking_uri: str | None = None
    export: str | None = None           # best config file (default: runs/sweeps/<study>.best.json)
    task_options: dict = field(default_factory=dict)      # the task's constructor options (e.g. n_train)
    backbone_options: dict = field(default_factory=dict)  # weights, dtype, device, device_map, allow_download
    threads: int = 1                    # torch CPU threads of every trial (as a bench run cell's)

    def __post_init__(self):
        if self.backbone is None:  # resolved here, so the study name and labels say which backbone
            from .task import TASKS

            self.backbone = TASKS.get(self.task).default_backbone

    @property
    def preset_label(self) -> str:
        """The preset plus any task options (``default+n_train=160``), as ``bench run`` labels cells."""
        return preset_label(self.preset, self.task_options)

    @property
    def backbone_label(self) -> str:
        """The backbone plus its network options (``tiny-qwen2-audio+hidden_size=1024``), as ``bench run``
        labels cells (:func:`benchbench.backbone.backbone_label`)."""
        from .backbone import backbone_label

        return backbone_label(self.backbone, self.backbone_options)

    @property
    def study_name(self) -> str:
        return self.study or f"{self.method}-{self.task}-{self.backbone_label}-{self.preset_label}"


def _pruner(name: str):
    import optuna

    pruners = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
               "hyperband": lambda: optuna.pruners.HyperbandPruner(),
               "none": lambda: optuna.pruners.NopPruner()}
    if name not in pruners:
        raise ValueError(f"unknown pruner {name!r} (known: {', '.join(pruners)})")
    return pruners[name]()


def _run_spec(spec: SweepSpec):
    """The :class:`~benchbench.harness.RunSpec` of ``bench run`` for the swept method, task, fold and
    seed: the sweep builds and checks its task and backbone through it (:func:`benchbench.harness.prepare`)."""
    from .harness import RunSpec

    return RunSpec(methods=[spec.method], tasks=[spec.task], backbone=spec.backbone, seeds=[spec.seed],
                   preset=spec.preset, data_dir=spec.data_dir, tracking_uri=spec.tracking_uri,
                   folds=None if spec.fold is None else [spec.fold], task_options={spec.task: dict(spec.task_options)}
                   if spec.task_options else {}, backbone_options=spec.backbone_options, threads=spec.threads)


def _parent_run(store, study_name: str, spec: SweepSpec) -> str | None:
    """The study's MLflow parent run, shared by every worker (the oldest one tagged with the study);
    ``None`` while the store is unreachable."""
    def find_or_create():
        client, experiment_id = store.client, store.experiment_id
        query = f"tags.optuna_study = '{study_name}' and tags.sweep_parent = '1'"
        found = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=1)
        if found:
            return found[0].info.run_id
        run = client.create_run(experiment_id, run_name=f"sweep-{study_name}",
                                tags={"optuna_study": study_name, "sweep_parent": "1"})
        for k, v in {**spec.__dict__, "study": study_name}.items():
            client.log_param(run.info.run_id, k, str(v))
        # two workers starting at once may both create one: keep the oldest, drop ours if it is not
        oldest = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=1)
        if oldest and oldest[0].info.run_id != run.info.run_id:
            client.delete_run(run.info.run_id)
            return oldest[0].info.run_id
        return run.info.run_id
    return store.call(find_or_create)


class _TrialLog:
    """One trial's MLflow child run on the shared :class:`~benchbench.tracking.CellStore`: RUNNING with
    this worker's process tags and a heartbeat while the trial trains (a killed worker's run is marked
    KILLED by the next start on the store), its dev evaluations as curves, its final state."""

    def __init__(self, store, parent_id: str | None, name: str, tags: dict, params: dict):
        self.store = store
        self.rid = store.start_run(name, parent_id, tags) if parent_id else None
        if self.rid:
            store.log_run(self.rid, params=params, status=None)

    def metric(self, key: str, value: float, step: int = 0) -> None:
        if self.rid:
            self.store.call(self.store.client.log_metric, self.rid, key, float(value), step=step)
            self.store.beat([self.rid])  # at most every HEARTBEAT_EVERY_S

    def end(self, state: str, tags: dict | None = None) -> None:
        if self.rid:
            self.store.end_run(self.rid, state, tags)


def run_sweep(spec: SweepSpec, show_progress: bool = True) -> dict:
    """Run (or continue) the study until it holds ``spec.trials`` finished trials; export the best.

    The task, its fold and the backbone are built and checked exactly as ``bench run`` builds them
    (:func:`benchbench.harness.prepare`: the same ``--data-dir``, ``--task-set``, ``--folds`` and
    backbone checks and messages); every trial trains on ``spec.threads`` torch threads, as a cell
    does; trials are logged through :class:`~benchbench.tracking.CellStore` (an unreachable store
    stops no trial: the Optuna storage is the study's record).

    Returns ``{"study", "best_value", "best_params", "config_file", "n_finished", "ran"}``. Raises
    ``KeyError`` for an unknown method/task, ``ValueError`` for a method without a search space,
    an unknown fold, pruner or storage, or any input ``bench run`` refuses.
    """
    import optuna

    from .harness import prepare
    from .tracking import CellStore, resolve_tracking_uri

    cls = METHODS.get(spec.method)
    why = no_search_space(spec.method)  # fail before anything runs when the method has no search space
    if why:
        raise ValueError(why)
    pruner = _pruner(spec.pruner)
    tasks, backbones = prepare(_run_spec(spec))
    task, backbone = tasks[spec.task], backbones[spec.task]
    folds = {f.index: f for f in task.folds()}
    fold = folds[min(folds) if spec.fold is None else spec.fold]

    store = CellStore(resolve_tracking_uri(spec.tracking_uri), notify=lambda line: print(line, flush=True),
                      offline_note="the trials go on (the Optuna storage records them) without MLflow runs")
    study_name = spec.study_name
    parent = [_parent_run(store, study_name, spec)]

    def parent_id() -> str | None:  # found again when the store comes back from an outage
        if parent[0] is None and store.reconnect():
            parent[0] = _parent_run(store, study_name, spec)
        return parent[0]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(spec.storage)
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                pruner=pruner, load_if_exists=True)
    study.set_user_attr("method", spec.method)
    study.set_user_attr("task", spec.task)
    ran = []
    objective = _objective(spec, cls, task, fold, backbone, store, parent_id, ran, show_progress)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # what counts toward --trials
    if _count(study, finished) < spec.trials:
        study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(spec.trials, states=finished)], catch=())
    best = study.best_trial if _count(study, (optuna.trial.TrialState.COMPLETE,)) else None
    out = {"study": study_name, "storage": spec.storage, "n_finished": _count(study, finished), "ran": ran,
           "best_value": best.value if best else None, "best_params": best.params if best else None,
           "best_trial": best.number if best else None, "config_file": None, "mlflow_parent_run_id": parent[0]}
    if best:
        path = Path(spec.export) if spec.export else Path("runs/sweeps") / f"{study_name}.best.json"
        export_best(study, spec, path)
        out["config_file"] = str(path)
        if parent[0]:
            store.call(store.client.log_metric, parent[0], f"best_dev_{spec.metric}", best.value)
    return out


def _objective(spec: SweepSpec, cls, task, fold, backbone, store, parent_id, ran: list, show_progress: bool):
    """Optuna's objective: a config sampled from the method's search space, the method fitted on the
    fold's train split on ``spec.threads`` threads, its dev ``spec.metric`` (never test); every dev
    evaluation during fitting is one Optuna step (pruned when the pruner says so)."""
    import optuna

    from .cells import torch_threads
    from .metrics import evaluate
    from .tracking import package_versions
    from .training import seed_everything

    study_name = spec.study_name

    def objective(trial: optuna.Trial) -> float:
        config = cls.make_config(spec.preset, cls.search_space(trial))
        trial.set_user_attr("config", config.to_dict())
        log = _TrialLog(store, parent_id(), f"{study_name}-t{trial.number}", {
            "optuna_study": study_name, "optuna_trial": str(trial.number), "method": spec.method, "task": spec.task,
            **{f"version.{k}": v for k, v in package_versions().items()}},
            {"method": spec.method, "task": spec.task, "backbone": spec.backbone_label, "preset": spec.preset_label,
             "fold": fold.index, "seed": spec.seed, "metric": spec.metric, "torch_threads": spec.threads,
             **{f"method.{k}": v for k, v in config.flat().items()}})
        step = [0]

        def progress(msg: str, values: dict) -> None:
            for k, v in values.items():
                log.metric(k, v, step[0])
            key = f"dev_{spec.metric}"
            if key in values:  # one Optuna step per dev evaluation, across training phases
                trial.report(float(values[key]), step[0])
                if show_progress:
                    print(f"  [trial {trial.number}] {msg} {key}={values[key]:.3f}", flush=True)
                step[0] += 1
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after {msg}")

        state, tags = "FAILED", None
        try:
            with torch_threads(spec.threads), backbone.lend_lm():  # the backbone's own LM, restored after
                seed_everything(spec.seed)
                method = cls(backbone, task.labels, config, seed=spec.seed)
                method.fit(fold.train, fold.dev, progress=progress)
                value = float(evaluate(method, fold.dev, task.labels)[spec.metric])  # dev only, never test
            log.metric(f"objective_dev_{spec.metric}", value)
            state = "FINISHED"
            return value
        except optuna.TrialPruned:
            state, tags = "KILLED", {"optuna_state": "PRUNED"}
            raise
        finally:
            ran.append(trial.number)
            log.end(state, tags)
    return objective


def _count(study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def export_best(study, spec: SweepSpec, path: str | Path) -> Path:
    """Write the best trial's resolved config for ``bench run --config`` (atomically)::

        {"format": 1, "methods": {"<method>": {<full config>}},
         "sweep": {"study", "trial", "dev_metric", "value", "task", "fold", "preset", "backbone", "storage"}}
    """
    best = study.best_trial
    doc = {"format": CONFIG_FORMAT, "methods": {spec.method: best.user_attrs["config"]},
           "sweep": {"study": study.study_name, "trial": best.number, "dev_metric": spec.metric,
                     "value": best.value, "params": best.params, "task": spec.task, "fold": spec.fold,
                     "preset": spec.preset, "task_options": spec.task_options, "backbone": spec.backbone,
                     "storage": spec.storage}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
    return path


def load_config_file(path: str | Path) -> dict[str, dict]:
    """Method -> full config overrides from a ``--config`` file; ``ValueError`` naming the file when it
    is not JSON, has another format, or names an unknown method or option."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != CONFIG_FORMAT or not isinstance(doc.get("methods"), dict):
        raise ValueError(f"{path}: expected {{\"format\": {CONFIG_FORMAT}, \"methods\": {{name: config}}}}")
    for name, cfg in doc["methods"].items():
        try:
            METHODS.get(name).config_cls.from_overrides(cfg)
        except KeyError as e:
            raise ValueError(f"{path}: {e.args[0]}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: method {name}: {e}") from None
    return doc["methods"]
