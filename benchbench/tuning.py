"""``bench run --tune N``: one tuning budget for every method of a run, on each cell's dev split.

For a cell with ``tune = N``: an Optuna study of N trials over the method's
:meth:`~benchbench.method.ContextMethod.search_space` (the one ``bench sweep`` uses), TPE seeded by
the cell's seed. Each trial builds the method from the cell's preset + ``--set`` overrides + the
trial's values, fits it on the fold's **train** split, and returns its dev score on its own selection
metric (``FitReport.dev_score``: the dev-selected model). Nothing of the test split (audio, labels,
speakers) reaches a trial: the objective is handed ``fold.train`` and ``fold.dev`` only. The cell is
then trained with the best trial's values and evaluated once on test (for ``lora`` and every Phase
1, that training is the best trial's own, replayed from the Phase-1 cache).

Phase 1 = ``lora`` holds under tuning: a method with ``phase1_of = "lora"`` first takes the tuned
values of the ``lora`` cell of the same task, fold, seed, backbone, preset and N (that study, run
here if the ``lora`` cell has not run it yet: the same file, so it runs once), fixes them in its own
study (Optuna's ``PartialFixedSampler`` on the ``lora.*`` parameters), and its N trials search its
own Phase-2 values. A method with nothing to tune (``zero_shot``) runs untuned, ``tuning_trials`` 0.

Trial 0 is the preset: the study's first trial takes the cell's own config (preset + overrides)
wherever the search space holds its value (``preset_values``), so a tuned cell's dev score is never
below the untuned one's and N = 1 is the preset itself; the other N - 1 trials are TPE's (its first
ten draws are random).

The study lives in ``<run output>/tuning/<cell key>.journal`` (Optuna's journal file): a killed run
resumes without redoing finished trials (``MaxTrialsCallback`` stops at N finished ones, also when
two processes share a study), and the finished journal is stored with the cell (an MLflow artifact).
Every seed tunes on its own by default. With ``bench run --tune-seed S`` (``Cell.tune_seed``) the
cells of every seed take the values tuned at seed S (the study of the same cell at seed S: its trials
train at seed S), so a fold is tuned once however many seeds run; values chosen on a fold's dev split
never serve another fold.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .method import METHODS, FitReport, _deep_merge
from .training import seed_everything

log = logging.getLogger(__name__)

TUNING_SEED_OFFSET = 7919
"""Added to the cell's seed for the TPE sampler (so the sampler's stream is not the training's)."""


def make_storage(url: str):
    """Optuna storage for ``journal:PATH`` (file journal) or an RDB URL; ``ValueError`` otherwise."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" in url:
        from optuna.storages import RetryFailedTrialCallback

        return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120,
                                          failed_trial_callback=RetryFailedTrialCallback(max_retry=2))
    raise ValueError(f"storage {url!r}: expected journal:PATH or an RDB URL such as sqlite:///sweep.db")


def space_id(method: str) -> str:
    """12 hex digits identifying a method's search space (the source of its ``search_space``): part of
    a tuned cell's key, so a changed space is a new tuning."""
    fn = METHODS.get(method).search_space
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        text = repr(fn)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def no_search_space(method: str) -> str | None:
    """Why the method cannot be tuned (its ``search_space`` raises ``NotImplementedError``: ``zero_shot``),
    or ``None`` when it declares a space; ``bench sweep`` and ``--tune`` both ask."""
    import optuna

    try:
        METHODS.get(method).search_space(optuna.trial.FixedTrial({}))
    except NotImplementedError as e:
        return str(e)
    except Exception:  # noqa: BLE001 - FixedTrial without values raises: the space exists
        return None
    return None


@dataclass
class Tuning:
    """A finished tuning of one cell: the config ``overrides`` to train with (the cell's own plus the
    best trial's), the best trial's ``params`` (Optuna names, as ``tuned_params``), its dev ``value``,
    how many trials finished (``trials``) and were pruned, and the study's journal file."""

    overrides: dict
    params: dict = field(default_factory=dict)
    value: float | None = None
    trials: int = 0
    pruned: int = 0
    journal: Path | None = None
    fixed: dict = field(default_factory=dict)


def preset_values(cls, config, skip=()) -> dict:
    """The search space's parameters (Optuna names, ``lora.lr``) at their values in ``config`` (a
    resolved method config), leaving out those in ``skip`` and those whose value the space does not
    hold (a preset's value outside a range, or not among the choices): trial 0 of a tuning."""
    import optuna

    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    cls.search_space(probe)
    out = {}
    for name, dist in probe.distributions.items():
        value = config
        for part in name.split("."):
            value = getattr(value, part, None)
        if name in skip or value is None:
            continue
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            if value in dist.choices:
                out[name] = value
        elif dist.low <= value <= dist.high:
            out[name] = type(dist.low)(value) if isinstance(dist, optuna.distributions.IntDistribution) else float(value)
    return out


def _journal(cell) -> Path:
    if cell.tuning_dir is None:
        raise ValueError(f"cell {cell.name}: --tune needs the run's output folder for its study")
    return Path(cell.tuning_dir) / f"{cell.key}.journal"


def tune(cell, progress: Callable[[str, dict], None] | None = None) -> Tuning:
    """Tune ``cell`` (``cell.tune`` trials on its dev split, see the module docstring); the returned
    overrides build the config it is then trained with."""
    import optuna

    if cell.tune_seed is not None and cell.tune_seed != cell.seed:  # the values tuned at seed S serve this seed
        shared = tune(replace(cell, seed=cell.tune_seed, tune_seed=None), progress)
        if progress:
            progress(f"tuning: the values tuned at seed {cell.tune_seed} on this fold's dev split serve seed {cell.seed}",
                     {})
        return shared
    cls = METHODS.get(cell.method)
    fixed: dict = {}
    overrides = dict(cell.overrides or {})
    if cls.phase1_of == "lora":  # Phase 1 is the tuned lora cell's training
        lora_cell = replace(cell, method="lora", overrides=dict(overrides.get("lora") or {}))
        lora = tune(lora_cell, progress)
        fixed = {f"lora.{k}": v for k, v in lora.params.items()}
        overrides = _deep_merge(overrides, {"lora": lora.overrides})
    path = _journal(cell)
    storage = make_storage(f"journal:{path}")
    base = optuna.samplers.TPESampler(seed=cell.seed + TUNING_SEED_OFFSET)
    sampler = optuna.samplers.PartialFixedSampler(fixed, base) if fixed else base
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=cell.key, storage=storage, direction="maximize", sampler=sampler,
                                load_if_exists=True)
    if not study.trials:  # trial 0: the cell's own config, where the space holds it
        first = preset_values(cls, cls.make_config(cell.config_preset, overrides), skip=fixed)
        if first:
            study.enqueue_trial(first, skip_if_exists=True)  # two processes may open it at once
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(states=finished))
    if done < cell.tune:
        if done and progress:
            progress(f"tuning: {done} of {cell.tune} trials already finished ({path.name}); running the rest", {})
        study.optimize(lambda t: _objective(cell, cls, overrides, t, progress), n_trials=cell.tune - done,
                       callbacks=[optuna.study.MaxTrialsCallback(cell.tune, states=finished)], catch=(FloatingPointError,))
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"cell {cell.name}: no tuning trial finished ({path})")
    best = study.best_trial
    chosen = cls.search_space(optuna.trial.FixedTrial(best.params))
    params = {k: v for k, v in best.params.items() if k not in fixed}
    if progress:
        progress(f"tuning: best of {len(complete)} trials dev={best.value:.3f} with {params}", {})
    return Tuning(_deep_merge(overrides, chosen), params, float(best.value), len(study.get_trials(states=finished)),
                  len(study.get_trials(states=(optuna.trial.TrialState.PRUNED,))), path, fixed)


def _objective(cell, cls, overrides: dict, trial, progress) -> float:
    """One trial: fit on the fold's train split, the dev score of the dev-selected model (test unseen)."""
    import optuna

    config = cls.make_config(cell.config_preset, _deep_merge(overrides, cls.search_space(trial)))
    fold = cell.fold
    with cell.backbone.lend_lm():
        seed_everything(cell.seed)
        method = cls(cell.backbone, cell.task.labels, config, seed=cell.seed)
        step = [0]

        def report_dev(message, values):
            dev = [v for k, v in values.items() if k.startswith("dev_")]
            if dev:
                trial.report(float(dev[0]), step[0])
                step[0] += 1
            if progress:
                progress(f"trial {trial.number}: {message}", {})

        report = FitReport.of(method, method.fit(fold.train, fold.dev, progress=report_dev))
    if report.dev_score is None:
        raise optuna.TrialPruned(f"{cell.method} reported no dev score")
    return float(report.dev_score)
