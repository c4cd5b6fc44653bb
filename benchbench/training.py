"""The training machinery every trainable method shares, so that comparisons hold by construction.

* :class:`LoRASettings` and :data:`LORA_PRESETS`: the task LoRA and its schedule (Titans-as-a-Layer
  Sec. 3.4, Phase 1), one definition for ``lora`` and for every two-stage method's Phase 1.
* :func:`phase1_presets`: a two-stage method's presets with Phase 1 taken from :data:`LORA_PRESETS`
  (never copied by value), so Phase 1 of ``mal`` / ``mac`` / ``mag`` / ``ema`` is the ``lora`` method
  at every preset.
* :func:`fit_task_lora`: Phase 1 itself. ``lora``'s ``fit`` is this function; a two-stage method
  calls it with its memory switched off, so its Phase 1 trains the same parameters, in the same
  order, from the same RNG state, with the same dev-selected epoch, as ``lora``.
* :class:`BestCheckpoint`: model selection on dev (never test): a snapshot whenever the dev score
  strictly improves, restored at the end; :func:`dev_epoch_score` scores one epoch on dev and
  reports it (``bench sweep`` prunes on these reports).
* :func:`auxiliary_rng`: a method's own RNG stream for what it adds to the host (memory branches,
  heads, temporary adapters), so drawing their initial values leaves the main stream (LoRA init,
  data order, dropout) exactly as ``lora`` sees it.
* The search spaces of LoRA and of a frozen-host Phase 2 (:func:`lora_search_space`,
  :func:`two_stage_search_space`) for ``bench sweep``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator, Sequence

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from .backbone import EmotionLM, Segment
from .data import Dialogue, hash_json
from .method import ContextMethod, FitReport, MethodConfig, ProgressFn, check_ranges
from .metrics import METRICS, evaluate

log = logging.getLogger(__name__)

LM_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

AUXILIARY_SEED_OFFSET = 7919
"""Offset of a method's auxiliary RNG stream from its seed (:func:`auxiliary_rng`)."""


@dataclass
class LoRASettings(MethodConfig):
    """LoRA and its training schedule. Defaults: Titans-as-a-Layer Sec. 3.4, Phase 1."""

    task_lora: ClassVar[bool] = True  # a backbone's own LoRA preset values land here (ContextMethod.task_lora_overrides)

    r: int = 32                    # rank r = 32
    alpha: int = 64                # scaling alpha_LoRA = 64
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LM_LINEAR_LAYERS  # all linear layers of the LM blocks
    lr: float = 2e-5               # AdamW, learning rate 2e-5
    weight_decay: float = 0.0
    epochs: int = 3                # three epochs
    batch_size: int = 8            # utterances (or context sequences) per step
    selection_metric: str = "ua"   # dev metric for choosing the best epoch's checkpoint
    # On a backbone whose audio projector is random and trains with the task (``trainable_projector``,
    # e.g. ``ultravox-whisper-tiny-smollm2-135m``) and only there (elsewhere these change nothing):
    align_epochs: int = 2          # alignment stage first: the projector alone, LM frozen (LLaVA / Ultravox stage 1)
    align_lr: float = 1e-3         # the alignment stage's AdamW rate
    warmup: float = 0.1            # share of a stage's steps over which the rates rise linearly from 0

    def check(self) -> None:
        check_ranges(self, at_least=dict(r=1, epochs=0, batch_size=1, align_epochs=0),
                     positive=("alpha", "lr", "align_lr"), fraction=("dropout", "warmup"),
                     choices=dict(selection_metric=METRICS))


LORA_PRESETS: dict[str, dict] = {
    "smoke": dict(lr=2e-3, epochs=1, batch_size=16, align_epochs=1),
    # CPU-sized: the tiny random-init backbone needs a larger step than the 7B paper setting
    "default": dict(lr=1e-3, epochs=6, batch_size=32),
}
"""The task LoRA's presets (``paper`` = the :class:`LoRASettings` defaults): ``lora``'s presets and
every two-stage method's Phase 1 (:func:`phase1_presets`)."""


def phase1_presets(presets: dict[str, dict]) -> dict[str, dict]:
    """A two-stage method's presets: its own values per preset plus ``lora`` = :data:`LORA_PRESETS`
    of that preset. ``ValueError`` when a preset sets ``lora`` itself (Phase 1 must stay ``lora``;
    a user may still override it with ``--set METHOD.lora.KEY=VALUE``) or names an unknown preset."""
    unknown = set(presets) - set(LORA_PRESETS)
    if unknown:
        raise ValueError(f"presets {sorted(unknown)} have no LoRA preset (known: {sorted(LORA_PRESETS)})")
    out = {}
    for name in LORA_PRESETS:
        own = dict(presets.get(name, {}))
        if "lora" in own:
            raise ValueError(f"preset {name!r} sets its own Phase-1 LoRA; Phase 1 is LORA_PRESETS[{name!r}]")
        out[name] = {"lora": dict(LORA_PRESETS[name]), **own}
    return out


def lora_search_space(trial, prefix: str = "lora.") -> dict:
    """LoRA's search space: learning rate (log), rank r with alpha = 2r (the papers' ratio), epochs."""
    r = trial.suggest_categorical(f"{prefix}r", [8, 16, 32, 64])
    return {"lr": trial.suggest_float(f"{prefix}lr", 1e-4, 1e-2, log=True), "r": r, "alpha": 2 * r,
            "epochs": trial.suggest_int(f"{prefix}epochs", 1, 8)}


def two_stage_search_space(trial) -> dict:
    """Phase 1's LoRA (under ``lora.``) and a frozen-host Phase 2's epochs and two learning rates
    (``lr`` for the added module, ``gate_lr`` for its gates), as in Titans-as-a-Layer Sec. 3.4."""
    return {"lora": lora_search_space(trial), "epochs": trial.suggest_int("epochs", 1, 10),
            "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
            "gate_lr": trial.suggest_float("gate_lr", 1e-4, 1e-1, log=True)}


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs (a cell's or a sweep trial's start)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Inside: torch's RNGs seeded with ``seed`` (``torch.manual_seed``: the CPU's and every CUDA
    device's); outside it, all of them as before. ``torch.random.fork_rng(devices=[])`` would restore the
    CPU's alone and leave every CUDA generator reseeded: on a GPU, the caller's dropout masks, and the
    RNG state in the Phase-1 key (:func:`fit_task_lora`), would then depend on what ran inside."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def auxiliary_rng(seed: int) -> Iterator[None]:
    """Inside: torch's RNGs seeded with ``seed + AUXILIARY_SEED_OFFSET``; outside them, every RNG (CPU
    and CUDA) as before (:func:`seeded_rng`). Initialise what a method adds to the host here, so that
    its Phase 1 is the ``lora`` cell's, bit for bit, and replayed from it."""
    with seeded_rng(seed + AUXILIARY_SEED_OFFSET):
        yield


def attach_lora(lm: EmotionLM, s: LoRASettings, adapter_name: str = "task",
                with_projector: bool = True) -> dict[str, nn.Parameter]:
    """Wrap ``lm.language_model`` with a peft LoRA adapter; returns its parameters by name (trainable).

    On a backbone whose audio projector trains with the task (``lm.audio_projector``, e.g.
    ``ultravox-whisper-tiny-smollm2-135m``: a random projector in front of a pretrained LM), its
    parameters are part of the task LoRA (``audio_projector.*``, unless ``with_projector=False``):
    they train, are dev-selected, saved, replayed from the Phase-1 cache and frozen with it, so
    ``lora`` and every two-stage method's Phase 1 train the same projector + LoRA by construction.
    ``ValueError`` when ``s.target_modules`` match no layer."""
    cfg = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.target_modules))
    lm.language_model = get_peft_model(lm.language_model, cfg, adapter_name=adapter_name)
    params = {n: p for n, p in lm.named_parameters() if "lora_" in n and f".{adapter_name}." in n}
    if not params:
        raise ValueError(f"LoRA target modules {s.target_modules} matched no layer of the language model")
    if with_projector and lm.audio_projector is not None:
        params.update({f"audio_projector.{n}": p for n, p in lm.audio_projector.named_parameters()})
    for p in params.values():
        p.requires_grad_(True)
    return params


class BestCheckpoint:
    """Model selection on dev: keeps a snapshot whenever :meth:`offer` sees a strictly better score.

    Args:
        snapshot: returns detached copies of the tensors to keep (called on improvement).
        load: writes a snapshot back (called by :meth:`restore`).
        score: the score to beat (``-inf``: the first offer wins); with a finite score, the current
            tensors are the initial snapshot (e.g. Phase 2 must beat Phase 1 on dev to replace it).
    """

    def __init__(self, snapshot: Callable[[], dict[str, torch.Tensor]],
                 load: Callable[[dict[str, torch.Tensor]], None], score: float = -np.inf):
        self._snapshot, self._load = snapshot, load
        self.score = score
        self.state = snapshot() if np.isfinite(score) else None
        self.epoch: int | None = None  # the selected epoch (1-based, as results show it); None: the initial state

    @classmethod
    def of_parameters(cls, params: dict[str, nn.Parameter], score: float = -np.inf) -> "BestCheckpoint":
        """A checkpoint of named parameters, restored in place (``copy_`` under ``no_grad``)."""
        def load(state):
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(state[k])

        return cls(lambda: {k: p.detach().clone() for k, p in params.items()}, load, score)

    def offer(self, score: float, epoch: int) -> bool:
        """Keep the current tensors if ``score`` beats the best so far; returns whether it did."""
        if score > self.score:
            self.score, self.state, self.epoch = score, self._snapshot(), epoch
            return True
        return False

    def restore(self) -> None:
        """Load the best snapshot (``RuntimeError`` if nothing was ever kept)."""
        if self.state is None:
            raise RuntimeError("no checkpoint to restore: no dev score was offered")
        self._load(self.state)


def dev_epoch_score(method: ContextMethod, dev: Sequence[Dialogue], metric: str, curve: list[float],
                    message: str, progress: ProgressFn | None) -> float:
    """End-of-epoch model selection step: the method's own streaming evaluation on ``dev`` (never
    test), the ``metric`` value appended to ``curve`` and reported as ``progress(message,
    {"dev_<metric>": value})`` (``bench sweep`` prunes on these reports). Returns the value."""
    score = evaluate(method, dev, method.labels)[metric]
    curve.append(score)
    if progress:
        progress(message, {"dev_" + metric: score})
    return score


def run_epochs(method: ContextMethod, report: FitReport, name: str, epochs: int, dev: Sequence[Dialogue],
               metric: str, best: BestCheckpoint, batches: Callable[[], Iterable], loss: Callable,
               step: Callable[[torch.Tensor], None], modules: Sequence[nn.Module],
               progress: ProgressFn | None, after_epoch: Callable[[], dict[str, float]] | None = None,
               phase: int = 1, phase1_score: float | None = None, gate: bool = False) -> BestCheckpoint:
    """The epoch loop with dev selection every trainable method runs (``lora`` and every two-stage
    method's Phase 1, the memories' Phase 2, ``dpm``'s Phase 1, plugins).

    Per epoch: ``modules`` in train mode; for each batch of ``batches()`` (drawn anew each epoch, in
    the method's own order), ``loss(batch)`` gives the training loss (a scalar tensor, or
    ``(loss, {name: tensor})`` with further curves, e.g. DPM's L_a and L_e), then ``step(loss)``
    updates (backward, clipping, optimizers); ``modules`` in eval mode; ``after_epoch()`` may add
    per-epoch curves (a gate's mean); the method is scored on dev (:func:`dev_epoch_score`, never
    test) and ``best`` offered the score. At the end ``best`` is restored (the dev-selected epoch)
    and the report records the selection: ``dev_score`` is the best score; ``selected`` is ``{"phase":
    phase, "epoch": best.epoch}``.

    Phase 2 (``phase=2``; ``best`` starts empty, so it ends at Phase 2's dev-best epoch whatever
    Phase 1 scored): ``report.phase_dev_scores`` records ``{"1": phase1_score, "2": that epoch's
    score}``, so a cell can publish both phases. With ``gate`` (the phase gate, a labelled option:
    neither paper has it) Phase 2 is selected only when its score beats ``phase1_score``; otherwise
    Phase 1's selection stays in the report and the caller puts Phase 1 back (``best`` holds Phase
    2's epoch either way). Without ``gate`` (the papers' protocol: train the memory and report it)
    Phase 2 is selected. With no Phase-2 epoch (``epochs=0``) nothing is restored and Phase 1 stays.

    Curves in ``report``: ``<name>_train_loss`` (per step), ``<name>_train_<k>`` for the extra losses,
    ``<name>_<k>`` for ``after_epoch``'s values, ``<name>_dev_<metric>`` (per epoch).

    Raises:
        FloatingPointError: a non-finite training loss (the same rule for every method: the cell
            fails, naming the method, epoch and step, instead of training on NaN).
    """
    losses, dev_scores = report.curve(f"{name}_train_loss"), report.curve(f"{name}_dev_{metric}")
    for epoch in range(epochs):
        for m in modules:
            m.train()
        for k, batch in enumerate(batches()):
            out = loss(batch)
            value, extra = out if isinstance(out, tuple) else (out, {})
            v = value.item()  # one host sync per step, for the curve and the check
            if not math.isfinite(v):
                raise FloatingPointError(f"{name}: non-finite training loss ({v}) at epoch {epoch + 1}, step {k + 1}")
            step(value)
            losses.append(v)
            for key, t in extra.items():
                report.curve(f"{name}_train_{key}").append(t.item())
        for m in modules:
            m.eval()
        for key, v in (after_epoch() if after_epoch else {}).items():
            report.curve(f"{name}_{key}").append(v)
        score = dev_epoch_score(method, dev, metric, dev_scores, f"{name} epoch {epoch + 1}/{epochs}", progress)
        best.offer(score, epoch + 1)  # epochs are 1-based wherever a user sees them
    if phase == 1:
        best.restore()
        report.selected, report.dev_score = {"phase": 1, "epoch": best.epoch}, best.score
        return best
    if best.epoch is None:  # no Phase-2 epoch (epochs=0), or none beat the score a plugin's checkpoint
        if best.state is not None:  # started from (the older gate, BestCheckpoint(score=...)): Phase 1 stands
            best.restore()
        report.phase_dev_scores = {"1": phase1_score if phase1_score is not None else report.dev_score, "2": None}
        return best
    best.restore()
    report.phase_dev_scores = {"1": phase1_score, "2": float(best.score)}
    if not gate or phase1_score is None or best.score > phase1_score:
        report.selected, report.dev_score = {"phase": 2, "epoch": best.epoch}, best.score
    return best


Example = tuple[list[Segment], int]


def utterance_examples(backbone, dialogues: Sequence[Dialogue]) -> list[Example]:
    """One context-free example per scored utterance: ``([Segment(audio features [T, F], features=True)],
    label)``: the LM projects them when it lays out the batch (inside the loss, so a projector that
    trains with the task gets its gradient; the same tensors where it is frozen)."""
    return [([Segment(backbone.audio_features(u.input), features=True)], u.label)
            for d in dialogues for u in d.utterances if u.scored]


PROJECTOR_PREFIX = "audio_projector."
"""How :func:`attach_lora` names the parameters of a projector that trains with the task."""


def projector_parameters(params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """The audio projector's parameters among a task LoRA's (empty on a backbone whose projector is
    pretrained and frozen, i.e. every backbone but ``trainable_projector`` ones)."""
    return {k: p for k, p in params.items() if k.startswith(PROJECTOR_PREFIX)}


def warmup_schedule(opt: torch.optim.Optimizer, s: LoRASettings, steps: int):
    """Every rate of ``opt`` rising linearly from ``lr / n`` to ``lr`` over the first
    ``n = ceil(s.warmup * steps)`` optimiser steps (``steps``: the stage's total), then constant; ``None``
    when ``s.warmup`` is 0. Call its ``step()`` after each ``opt.step()``."""
    warm = math.ceil(s.warmup * steps)
    if not warm:
        return None
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))


def _optimizer(params: dict[str, nn.Parameter], lr: float, s: LoRASettings, steps: int, warmup: bool):
    """AdamW at ``lr`` over ``params``; where a random projector trains among them (the pretrained-LM
    backbone) and ``warmup`` (Phase 1), the rates warm up (:func:`warmup_schedule`): the random
    projector's first gradients, passed through a pretrained LM, would otherwise overshoot, and so
    would the LoRA's at the tiny LMs' rate. Elsewhere (the tiny backbones, Phase 2) a constant rate, as
    before the schedule existed. Returns ``(optimizer, scheduler or None)``."""
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=s.weight_decay)
    return opt, (warmup_schedule(opt, s, steps) if warmup and projector_parameters(params) else None)


def train_supervised(method: ContextMethod, params: dict[str, nn.Parameter], s: LoRASettings,
                     examples: Sequence[Example], dev: Sequence[Dialogue], progress: ProgressFn | None,
                     curve_prefix: str = "lora", report: FitReport | None = None, phase: int = 1,
                     lr: float | None = None, epochs: int | None = None, gate: bool = False) -> FitReport:
    """AdamW on cross-entropy over label logits; keeps the epoch with the best dev ``selection_metric``
    (:func:`run_epochs`). ``lr`` / ``epochs``: the stage's own (default ``s.lr`` / ``s.epochs``; the
    alignment stage passes ``s.align_lr`` / ``s.align_epochs``). In Phase 1, with a projector among
    ``params``, the rates warm up (:func:`_optimizer`).

    Returns its report (``report``, extended, when given), with ``<prefix>_train_loss`` (per step) and
    ``<prefix>_dev_<metric>`` (per epoch), the selected epoch and its dev score; the parameters end at
    the best dev epoch (dev only, never test). ``phase=2`` (``full_context``'s Phase 2: the task LoRA
    trained further) needs ``report`` with Phase 1's dev score; the parameters end at Phase 2's
    dev-best epoch, and with ``gate`` the report keeps Phase 1 selected unless that epoch beat it
    (:func:`run_epochs`; the caller restores Phase 1's values then).
    """
    phase1_score = None
    if phase == 2:
        if report is None or report.dev_score is None:
            raise ValueError("train_supervised(phase=2) needs Phase 1's report with its dev score")
        phase1_score = report.dev_score
    report = FitReport() if report is None else report
    lm = method.lm
    lr = s.lr if lr is None else lr
    epochs = s.epochs if epochs is None else epochs
    opt, schedule = _optimizer(params, lr, s, epochs * math.ceil(len(examples) / s.batch_size), warmup=phase == 1)
    # length-grouped batches (like transformers' group_by_length): little padding when example
    # lengths differ (full_context), in a random order of batches
    lengths = np.array([sum(seg.audio.shape[0] for seg in segs) for segs, _ in examples])

    def batches():
        perm = method.rng.permutation(len(examples))
        perm = perm[np.argsort(lengths[perm], kind="stable")]
        groups = [perm[i:i + s.batch_size] for i in range(0, len(perm), s.batch_size)]
        for b in method.rng.permutation(len(groups)):
            yield [examples[j] for j in groups[b]]

    def loss(chunk):
        logits = lm(lm.batch([segs for segs, _ in chunk]))
        return nn.functional.cross_entropy(logits, torch.tensor([y for _, y in chunk], device=logits.device))

    def step(value):
        opt.zero_grad()
        value.backward()
        opt.step()
        if schedule is not None:
            schedule.step()

    run_epochs(method, report, curve_prefix, epochs, dev, s.selection_metric,
               BestCheckpoint.of_parameters(params), batches, loss, step, [lm], progress, phase=phase,
               phase1_score=phase1_score, gate=gate)
    lm.eval()
    return report


def align_projector(method: ContextMethod, projector: dict[str, nn.Parameter], s: LoRASettings,
                    examples: Sequence[Example], dev: Sequence[Dialogue], progress: ProgressFn | None,
                    report: FitReport) -> FitReport:
    """The alignment stage (LLaVA / Ultravox stage 1): the random audio projector alone (``projector``,
    :func:`projector_parameters`) for ``s.align_epochs`` at ``s.align_lr`` with warm-up, the LM frozen,
    dev-selected; curves ``align_train_loss`` / ``align_dev_<metric>`` added to ``report``.

    The LM's peft adapters are switched off meanwhile (``disable_adapter``): at their initialisation
    (B = 0) they add exactly zero, so the output is the same, but their dropout masks and zero
    products cost a fifth of a step on the pretrained-LM backbone (``torch.profiler``, Emo-DB fold 0).
    Requires ``method.lm.language_model`` to be a peft model when it has adapters (:func:`attach_lora`).
    """
    language_model = method.lm.language_model
    off = language_model.disable_adapter() if hasattr(language_model, "disable_adapter") else nullcontext()
    with off:
        return train_supervised(method, projector, s, examples, dev, progress, curve_prefix="align", report=report,
                                lr=s.align_lr, epochs=s.align_epochs)


def fit_task_lora(method: ContextMethod, params: dict[str, nn.Parameter], s: LoRASettings,
                  train: Sequence[Dialogue], dev: Sequence[Dialogue], progress: ProgressFn | None) -> FitReport:
    """Phase 1 (Titans-as-a-Layer Sec. 3.4): the task LoRA on one scored utterance at a time, dev-selected.

    On a backbone whose random audio projector trains with the task (:func:`projector_parameters`
    non-empty), an alignment stage comes first: the projector alone for ``s.align_epochs`` at
    ``s.align_lr``, the LM frozen, dev-selected (curves ``align_train_loss``, ``align_dev_<metric>``),
    as LLaVA and Ultravox train a projector before adapting the LM; both stages warm their rates up
    (``s.warmup``). Elsewhere Phase 1 is the LoRA stage alone at a constant rate, as before.

    This *is* ``lora``'s ``fit``; a two-stage method calls it with its memory off (its dev scoring
    then predicts like ``lora``), so its Phase 1 equals ``lora`` under the same seed and preset
    (``tests/test_training.py`` pins it at the smoke, default and paper presets). Returns the
    :class:`FitReport` of Phase 1 (its curves, selected epoch, dev score, ``phase1_replayed``), to
    which a two-stage method adds its Phase 2.

    An identical training done before (same settings, data, initial values and RNG states on the same
    backbone, LM weights included: the ``lora`` cell of the fold and seed) is replayed instead of
    repeated: its parameters, curves, dev selection and RNG end states, so the result is bit-identical
    (tested). It is looked up in ``backbone.fit_cache`` (this process), then on disk under
    ``<cache_dir>/phase1/`` (another process: a Ray worker, or an earlier ``bench run`` whose lora
    cell a later ``--methods mac`` reuses); ``BENCHBENCH_PHASE1_CACHE=0`` keeps it in memory only.
    An unreadable file (a killed writer) is ignored and the training repeated.
    """
    key = _phase1_key(method, params, s, train, dev)
    cache = method.backbone.fit_cache
    if key not in cache:
        stored = _load_phase1(method.backbone, key)
        if stored is not None:
            cache[key] = stored
    if key in cache:  # this exact training already ran (the lora cell of this fold and seed)
        return _replay_phase1(method, params, s, cache[key], progress)
    examples = utterance_examples(method.backbone, train)
    report = FitReport()
    projector = projector_parameters(params)
    if projector and s.align_epochs:
        align_projector(method, projector, s, examples, dev, progress, report)
    report = train_supervised(method, params, s, examples, dev, progress, report=report)
    report.phase1_replayed = False
    cache[key] = {"params": {k: p.detach().clone() for k, p in params.items()},
                  "curves": {k: list(v) for k, v in report.curves.items()},
                  "score": report.dev_score, "epoch": report.selected["epoch"], "torch_rng": torch.get_rng_state(),
                  "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                  "rng": method.rng.bit_generator.state}
    _save_phase1(method.backbone, key, cache[key])
    while len(cache) > PHASE1_CACHE_SIZE:  # the oldest go (a sweep's trials rarely repeat a training)
        cache.pop(next(iter(cache)))
    return report


PHASE1_CACHE_SIZE = 16
"""Task-LoRA trainings kept per backbone for replay (:func:`fit_task_lora`)."""


def _phase1_path(backbone, key: str):
    """Where the on-disk Phase-1 cache keeps training ``key`` (``None``: switched off by
    ``BENCHBENCH_PHASE1_CACHE=0``)."""
    if os.environ.get("BENCHBENCH_PHASE1_CACHE", "1") == "0":
        return None
    return Path(backbone.cache_dir) / "phase1" / key[:2] / f"{key}.pt"


def _load_phase1(backbone, key: str) -> dict | None:
    """A training stored by :func:`_save_phase1`, or ``None`` (absent, switched off or unreadable)."""
    path = _phase1_path(backbone, key)
    if path is None or not path.exists():
        return None
    try:
        done = torch.load(path, map_location="cpu", weights_only=True)
        done["rng"] = json.loads(done["rng"])
        return done
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: train again
        log.warning("phase-1 cache file %s unreadable (%s: %s); training again", path, type(e).__name__, e)
        return None


def _save_phase1(backbone, key: str, done: dict) -> None:
    """Write a training's outcome (parameters on the CPU, curves, selection, RNG end states) atomically."""
    path = _phase1_path(backbone, key)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({**done, "params": {k: v.cpu() for k, v in done["params"].items()},
                    "curves": {k: [float(x) for x in v] for k, v in done["curves"].items()},
                    "score": float(done["score"]), "epoch": None if done["epoch"] is None else int(done["epoch"]),
                    "rng": json.dumps(done["rng"])}, tmp)
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk costs the reuse, never the cell
        log.warning("phase-1 cache: could not write %s (%s)", path, e)


def _phase1_key(method: ContextMethod, params: dict[str, nn.Parameter], s: LoRASettings,
                train: Sequence[Dialogue], dev: Sequence[Dialogue]) -> str:
    """Everything the task LoRA's training depends on: the settings, the labels, the training and dev
    utterances (audio hash, label, scored), the initial LoRA values, both RNG states, the backbone and
    torch's thread count (on some CPUs another count trains other bits)."""
    h = hashlib.sha256()
    for k, p in sorted(params.items()):
        h.update(k.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    h.update(torch.get_rng_state().numpy().tobytes())
    if torch.cuda.is_available():
        for state in torch.cuda.get_rng_state_all():
            h.update(state.numpy().tobytes())
    device = next(iter(params.values())).device if params else "cpu"
    return hash_json({"settings": asdict(s), "labels": method.labels, "backbone": method.backbone.run_key,
                      "lm": method.backbone.lm_key, "device": str(device), "host": _host_identity(),
                      "torch_threads": torch.get_num_threads(),
                      "train": [[(u.input.audio_sha256, u.label, u.scored) for u in d.utterances] for d in train],
                      "dev": [[(u.input.audio_sha256, u.label, u.scored) for u in d.utterances] for d in dev],
                      "rng": str(method.rng.bit_generator.state), "params": h.hexdigest()})


@functools.lru_cache(maxsize=1)
def _host_identity() -> dict:
    """The software a training's numbers depend on, so that a stored training is replayed only under
    the same: library versions and the source of the suite's modules that Phase 1 runs through."""
    import peft
    import transformers

    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / f).read_bytes() for f in PHASE1_SOURCES)).hexdigest()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "code": code}


PHASE1_SOURCES = ("training.py", "backbone.py", "metrics.py", "method.py", "data.py")
"""The modules of ``benchbench`` whose source is part of a stored Phase-1 training's key."""


def _replay_phase1(method: ContextMethod, params: dict[str, nn.Parameter], s: LoRASettings, done: dict,
                   progress: ProgressFn | None) -> FitReport:
    """The outcome of an identical earlier training: parameters, curves, dev selection and both RNGs'
    end states, so that everything after it is what retraining would give, bit for bit."""
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(done["params"][k])
    torch.set_rng_state(done["torch_rng"])
    if done["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(done["cuda_rng"])
    method.rng.bit_generator.state = done["rng"]
    method.lm.eval()
    if progress:
        progress("task LoRA: reused the identical training of this fold and seed (the lora cell's)",
                 {"dev_" + s.selection_metric: done["score"]})
    return FitReport({k: list(v) for k, v in done["curves"].items()}, {"phase": 1, "epoch": done["epoch"]},
                     done["score"], phase1_replayed=True)
