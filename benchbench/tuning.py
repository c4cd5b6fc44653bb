"""``bench run --tune N``: one tuning budget for every method of a run, on each cell's dev split.

For a cell with ``tune = N``: an Optuna study of N trials over the method's
:meth:`~benchbench.method.ContextMethod.search_space` (the one ``bench sweep`` uses), TPE seeded by
the cell's seed. Each trial builds the method from the cell's preset + ``--set`` overrides + the
trial's values, fits it on the fold's **train** split, and returns its dev score on its own selection
metric (``FitReport.dev_score``: the dev-selected model). Nothing of the test split (audio, labels,
speakers) reaches a trial: the objective is handed ``fold.train`` and ``fold.dev`` only. The cell is
then evaluated once on test with the best trial's fitted model: the trial trained at the cell's seed
with exactly the cell's config, so keeping its parameters, fitted state, report and RNG end states
(``<study>.trial<k>.pt``, the best so far only) is exact, and the cell does not train again
(``fit_from_trial`` in results; ``fit_seconds`` is that trial's). Where the kept file is missing or
another seed's tuning serves the cell, it is trained with the best values instead.

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

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

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
    seed: int = 0                 # the seed the trials trained at
    kept: Path | None = None      # the best trial's fitted model (None: not kept, or gone)
    kept_trial: int | None = None


KEEP_BEST_FIT = True
"""Keep the best trial's fitted model for its cell (exact: see the module docstring); tests switch it
off to compare with retraining."""


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
    overrides = dict(cell.resolved_overrides)  # the backbone's preset values included
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
    kept = best.user_attrs.get("kept")
    kept = path.parent / kept if kept and (path.parent / kept).is_file() else None
    return Tuning(_deep_merge(overrides, chosen), params, float(best.value), len(study.get_trials(states=finished)),
                  len(study.get_trials(states=(optuna.trial.TrialState.PRUNED,))), path, fixed, cell.seed, kept,
                  best.number if kept else None)


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

        t0 = time.perf_counter()
        report = FitReport.of(method, method.fit(fold.train, fold.dev, progress=report_dev))
        seconds = time.perf_counter() - t0
    if report.dev_score is None:
        raise optuna.TrialPruned(f"{cell.method} reported no dev score")
    if KEEP_BEST_FIT:
        _keep_if_best(cell, trial, method, report, seconds)
    return float(report.dev_score)


def _keep_if_best(cell, trial, method, report: FitReport, seconds: float) -> None:
    """Write the trial's fitted model (parameters, fitted state, report, fit seconds, RNG end states)
    when its dev score beats every finished trial's (ties keep the earlier, as ``best_trial``), and
    drop the study's previously kept one. A failed write costs the reuse, never the trial."""
    try:
        best = trial.study.best_value
    except ValueError:  # no finished trial yet
        best = None
    if best is not None and report.dev_score <= best:
        return
    journal = _journal(cell)
    path = journal.with_name(f"{journal.stem}.trial{trial.number}.pt")
    try:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"params": {k: v.detach().cpu().clone() for k, v in method.trained_parameters().items()},
                    "state": {k: v.detach().cpu().clone() for k, v in method.fitted_state().items()},
                    "report": json.dumps(dataclasses.asdict(report)), "fit_seconds": float(seconds),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "rng": json.dumps(method.rng.bit_generator.state),
                    "np_rng": json.dumps(_np_state()), "py_rng": json.dumps(random.getstate())}, tmp)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("tuning: could not keep trial %d's model at %s (%s)", trial.number, path, e)
        return
    trial.set_user_attr("kept", path.name)
    for old in journal.parent.glob(f"{journal.stem}.trial*.pt"):
        if old != path:
            old.unlink(missing_ok=True)


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def restore_kept(tuning: Tuning, method) -> tuple[FitReport, float] | None:
    """Load the best trial's kept model into ``method`` (built from the same config and seed) and
    restore the RNGs as the trial left them; its report and fit seconds. ``None`` (the cell then
    trains) when nothing was kept or the file is unreadable."""
    if tuning.kept is None:
        return None
    try:
        done = torch.load(tuning.kept, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: train instead
        log.warning("tuning: kept model %s unreadable (%s: %s); training the cell", tuning.kept, type(e).__name__, e)
        return None
    with torch.no_grad():
        for k, p in method.trained_parameters().items():
            p.copy_(done["params"][k])
    method.load_fitted_state(done["state"])
    torch.set_rng_state(done["torch_rng"])
    if done["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(done["cuda_rng"])
    method.rng.bit_generator.state = json.loads(done["rng"])
    name, keys, pos, has_gauss, cached = json.loads(done["np_rng"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    state = json.loads(done["py_rng"])
    random.setstate((state[0], tuple(state[1]), state[2]))
    method.lm.eval()
    return FitReport(**json.loads(done["report"])), float(done["fit_seconds"])
