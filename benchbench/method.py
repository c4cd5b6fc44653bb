"""``ContextMethod``: the one contract every context/memory method honours.

After Titans-as-a-Layer Eq. 1: for utterance x_i of a dialogue,

    y_i = f(x_i, S_{i-1}),    S_i = U(S_{i-1}, x_i),

with S_0 a fresh state at every dialogue start. A method

* is built on a backbone for a label set, from a config dataclass (the papers' hyperparameters as
  defaults, with named presets: ``smoke``, ``default`` = CPU-sized, ``paper``) and a seed;
* is fitted with :meth:`fit` on labelled training dialogues, doing model selection on the labelled
  dev dialogues only (it never sees test dialogues while fitting);
* is evaluated by streaming: :meth:`reset` starts a dialogue, :meth:`step` returns class
  probabilities for one label-free :class:`~benchbench.data.UtteranceInput` and then updates the
  state without its label. :meth:`predict_dialogue` may batch this for stateless methods, but must
  give every utterance the prediction it would get from the utterances up to it (the conformance
  suite checks prefix consistency);
* declares its trained parameters (:meth:`trained_parameters`) and saves / loads them with
  safetensors (no pickle).

The conformance suite in :mod:`benchbench.testing` runs on every registered method.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import AudioLLMBackbone, Segment
from .data import Dialogue, UtteranceInput
from . import names as _names


@dataclasses.dataclass
class MethodConfig:
    """Base of method configs. Nested dataclass fields are allowed; ``flat()`` flattens them."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                out.update({f"{prefix}{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[f"{prefix}{k}"] = v
        return out

    @classmethod
    def from_overrides(cls, overrides: dict | None = None):
        """Defaults updated with ``overrides`` (nested dicts for nested configs), every value checked
        against its field's type (``int`` for a ``float`` field and a comma-separated string for a
        tuple of strings are converted) and then :meth:`check`.

        Raises:
            ConfigValueError: an unknown key, a value of the wrong type or out of range; ``path``
                names the field (``lora.lr``), so a caller can name its own option (``--set mal.lora.lr``).
        """
        overrides = dict(overrides or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(overrides) - set(known)
        if unknown:
            raise ConfigValueError(sorted(unknown)[0], overrides[sorted(unknown)[0]],
                                   f"unknown option(s) {sorted(unknown)} of {cls.__name__}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, f in known.items():
            if name not in overrides:
                continue
            v = overrides[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default) and isinstance(v, dict):
                try:
                    v = type(default).from_overrides({**dataclasses.asdict(default), **v})
                except ConfigValueError as e:
                    raise ConfigValueError(f"{name}.{e.path}", e.value, e.problem) from None
            elif not dataclasses.is_dataclass(default) or not isinstance(v, type(default)):
                try:
                    v = _typed(v, hints.get(name, Any))
                except TypeError as e:
                    raise ConfigValueError(name, v, f"expected {e}") from None
            kwargs[name] = v
        config = cls(**kwargs)
        try:
            config.check()
        except ConfigValueError:
            raise
        except ValueError as e:
            raise ConfigValueError("", None, str(e)) from None
        return config

    def check(self) -> None:
        """``ValueError`` for a value out of its range (a subclass checks its own fields; nested configs
        are checked when they are built). Called on every config :meth:`from_overrides` builds, i.e.
        before any cell runs."""


def check_ranges(config: MethodConfig, at_least: dict[str, float] = {}, positive: tuple[str, ...] = (),
                 fraction: tuple[str, ...] = (), choices: dict[str, tuple] = {}) -> None:
    """Range checks for :meth:`MethodConfig.check`: ``at_least`` (field -> minimum), ``positive``
    (> 0), ``fraction`` (in [0, 1)), ``choices`` (field -> allowed values). ``ConfigValueError``
    naming the first field out of range."""
    for name, low in at_least.items():
        if getattr(config, name) < low:
            raise ConfigValueError(name, getattr(config, name), f"expected >= {low:g}")
    for name in positive:
        v = getattr(config, name)
        if v is not None and not v > 0:
            raise ConfigValueError(name, v, "expected > 0")
    for name in fraction:
        if not 0 <= getattr(config, name) < 1:
            raise ConfigValueError(name, getattr(config, name), "expected a fraction in [0, 1)")
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigValueError(name, getattr(config, name), f"expected one of {', '.join(map(str, allowed))}")


@dataclasses.dataclass
class FitReport:
    """What :meth:`ContextMethod.fit` produced, returned to its caller (the harness logs it per cell).

    Attributes:
        curves: training curves by name (``<method>_train_loss`` per step, ``<method>_dev_<metric>``
            per epoch, ...), logged as MLflow metric series (one step per entry).
        selected: the model dev selected, ``{"phase": 1 or 2, "epoch": the 1-based epoch of that
            phase, or None}`` (results: ``selected_phase``, ``selected_epoch``, the same numbers);
            ``None`` for a method with nothing to select (``zero_shot``).
        dev_score: the selected model's dev score on its selection metric (a fraction; ``None``
            without selection). ``lora``'s is what a two-stage method's Phase 2 must beat.
        phase1_replayed: whether :func:`benchbench.training.fit_task_lora` replayed an identical
            earlier training (the ``lora`` cell's) instead of repeating it; ``None`` when not called.
        phase_dev_scores: a two-stage method's dev score of each phase, ``{"1": Phase 1's, "2": Phase
            2's dev-best epoch's}`` (fractions; ``"2"`` is ``None`` without a Phase-2 epoch), whichever
            was selected: what the phase gate compares (results: ``dev_score_phase1`` /
            ``dev_score_phase2``); ``None`` for single-phase methods.
    """

    curves: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    selected: dict | None = None
    dev_score: float | None = None
    phase1_replayed: bool | None = None
    phase_dev_scores: dict | None = None

    def curve(self, name: str) -> list[float]:
        """The curve ``name``, created empty if absent (append to it)."""
        return self.curves.setdefault(name, [])

    @classmethod
    def of(cls, method: "ContextMethod", returned) -> "FitReport":
        """``returned`` when ``fit`` returned a report; for a plugin written against the older
        contract (``fit`` returned ``None`` and set ``curves`` / ``selected`` / ``phase1_replayed``
        attributes) a report read from those attributes."""
        if isinstance(returned, FitReport):
            return returned
        return cls(dict(getattr(method, "curves", {}) or {}), getattr(method, "selected", None), None,
                   getattr(method, "phase1_replayed", None))


class ConfigValueError(ValueError):
    """A method-config value that does not fit its field: ``path`` (``lora.lr``), the ``value`` given,
    the ``problem`` in words (``expected a float``)."""

    def __init__(self, path: str, value: Any, problem: str):
        self.path, self.value, self.problem = path, value, problem
        super().__init__(f"{path}={value!r}: {problem}" if value is not None else problem)

    def for_option(self, method: str) -> str:
        """The message naming the command-line option, e.g. ``--set mal.lora.lr='abc': expected a float``."""
        if self.value is None:
            return f"--set {method}.*: {self.problem}"
        return f"--set {method}.{self.path}={self.value!r}: {self.problem}"


def _typed(value: Any, hint: Any) -> Any:
    """``value`` as the annotation ``hint`` wants it (``TypeError(what was expected)`` otherwise):
    bool, int, float (ints accepted), str (ints accepted: ``--set mal.layers=0``), tuples (lists or
    comma-separated strings), ``X | None`` and ``X | Y``, dicts; other annotations pass unchecked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is None:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _typed(value, a)
                except TypeError:
                    continue
        raise TypeError(" or ".join(_type_name(a) for a in args))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple or hint is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_typed(x, args[0]) for x in items)
            if not args:
                return tuple(items)
            if len(items) == len(args):
                return tuple(_typed(x, a) for x, a in zip(items, args))
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise TypeError(_type_name(hint))


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a float", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) is tuple or hint is tuple:
        return "a list"
    return getattr(hint, "__name__", str(hint))


STATE_PREFIX = "state."
ProgressFn = Callable[[str, dict], None]


class ContextMethod(ABC):
    """Base class of all methods (see module docstring for the contract).

    Args:
        backbone: the frozen audio LLM; the method's LM (``self.lm``) is from
            :meth:`AudioLLMBackbone.new_lm`: the backbone's own modules inside ``lend_lm()`` (the
            harness), a private copy otherwise.
        labels: class names, in class-index order.
        config: the method's config (``None``: defaults of ``config_cls``).
        seed: seeds parameter init and data order.

    Class attributes:
        name: registry name; config_cls: the config dataclass;
        uses_context: whether a prediction may depend on earlier utterances of the dialogue
            (``False`` methods are checked against a task's context-free ceiling for leakage);
        presets: preset name -> config overrides;
        phases: 2 for two-stage methods, whose dev selection may keep Phase 1 (the memory unused);
        batch_utterances: the most utterances one LM forward holds where :meth:`predict_dialogues`
            batches across dialogues;
        phase1_of: the registry name of the method whose whole training is this method's Phase 1
            (``"lora"`` for the two-stage methods, whose Phase 1 is
            :func:`~benchbench.training.fit_task_lora`): ``--executor ray`` starts this cell after
            that method's cell of the same task, fold and seed, so that the training is replayed from
            the Phase-1 cache instead of repeated in parallel;
        variant_options: the config options whose departure :meth:`variant` already names
            (``("speaker_memory",)`` for ``mal[speaker]``), left out of the label's ``{...}``;
        history_free_control: whether the harness computes the cell's *history-free control*: the
            fitted method evaluated once more with every test utterance as a dialogue of its own
            (``reset()`` before each, no retraining), so results split its gain over ``lora`` into the
            part from the dialogue (method - control) and from capacity (control - ``lora``). Every
            method honouring the contract (``reset`` starts from S_0) supports it; a plugin whose state
            outlives ``reset`` sets ``False`` and its rows say ``history_free_control`` = False.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    uses_context: ClassVar[bool]
    presets: ClassVar[dict[str, dict]] = {}
    phases: ClassVar[int] = 1  # training phases; 2 for a memory trained after its task LoRA (Phase 2)
    batch_utterances: ClassVar[int] = 256  # utterances per LM forward where predict_dialogues batches
    phase1_of: ClassVar[str | None] = None  # "lora": Phase 1 is lora's training (replayed, not repeated)
    variant_options: ClassVar[tuple[str, ...]] = ()  # options whose departure variant() names (label())
    history_free_control: ClassVar[bool] = True  # False: its state cannot be reset per utterance (no control)

    def __init__(self, backbone: AudioLLMBackbone, labels: Sequence[str], config: MethodConfig | None = None,
                 seed: int = 0):
        self.backbone = backbone
        self.labels = tuple(labels)
        self.config = config if config is not None else self.config_cls()
        self.config.check()
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.lm = backbone.new_lm(self.labels)
        # counters a method accumulates while evaluating (e.g. test-time updates and their seconds),
        # and problems it met and survived there (each a dict naming dialogue_id and utterance_id);
        # the method's own: the harness clears both before the test set and logs them with the cell
        self.test_time_cost: dict[str, float] = {}
        self.test_time_issues: list[dict] = []

    def audio_embeddings(self, utterance: UtteranceInput) -> torch.Tensor:
        """The utterance's audio-token embeddings ``[T, D]`` as this method's LM reads them: the
        backbone's cached audio features (:meth:`AudioLLMBackbone.audio_features`) through the LM's
        audio projector (:meth:`~benchbench.backbone.EmotionLM.embed_audio`). Where the backbone's
        projector is frozen this is ``backbone.audio_features(utterance)`` itself; where it trains with
        the task LoRA (``trainable_projector``) it is the method's own projector as trained so far
        (carrying its gradient while it trains). ``ValueError`` on a non-mono or empty waveform."""
        return self.lm.embed_audio(self.backbone.audio_features(utterance))

    @classmethod
    def task_lora_overrides(cls, values: dict) -> dict:
        """``values`` (task-LoRA settings, :class:`~benchbench.training.LoRASettings` keys) placed where this
        method's config holds its task LoRA: at the top for ``lora``, under each nested task-LoRA config
        (``lora`` of every two-stage method, ``dpm``'s) elsewhere; ``{}`` for a method without one
        (``zero_shot``). How a backbone's own preset values (:attr:`BackboneSpec.lora_presets`) reach
        every method's Phase 1 alike."""
        if not values:
            return {}
        if getattr(cls.config_cls, "task_lora", False):
            return dict(values)
        out = {}
        for f in dataclasses.fields(cls.config_cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if getattr(type(default), "task_lora", False):
                out[f.name] = dict(values)
        return out

    @classmethod
    def make_config(cls, preset: str = "default", overrides: dict | None = None) -> MethodConfig:
        """Config for a preset (``paper`` = the dataclass defaults) plus explicit overrides."""
        if preset != "paper" and preset not in cls.presets:
            raise ValueError(f"method {cls.name}: unknown preset {preset!r} (known: paper, {', '.join(cls.presets)})")
        merged = _deep_merge(cls.presets.get(preset, {}), overrides or {})
        return cls.config_cls.from_overrides(merged)

    @classmethod
    def variant(cls, config: MethodConfig) -> str:
        """``""`` when ``config`` is the papers' form of the method; else a short name of the departure
        (``"speaker"``: one memory state or context per speaker instead of per dialogue)."""
        return ""

    @classmethod
    def label(cls, config: MethodConfig, preset: str | None = None, base: dict | None = None) -> str:
        """What results call the method under ``config``, in results.csv, MLflow run names and params,
        the summary, the terminal and the leaderboard: its name for the papers' form,
        ``name[variant]`` for a departure (``mal[speaker]``), then, when ``preset`` is given, every
        option of ``config`` that differs from that preset's config, sorted (``mal{d_m=32,layers=0}``,
        ``lora{lr=0.01}``, nested options dotted: ``mal{lora.r=4}``), except those the variant names
        (:attr:`variant_options`). So an ablation never shares a label with its preset's cells.
        ``base``: overrides that belong to the preset on this backbone (:attr:`BackboneSpec.lora_presets`,
        mapped by :meth:`task_lora_overrides`), so they are not departures (the backbone names them).
        ``ValueError`` for an unknown preset (:meth:`make_config`)."""
        v = cls.variant(config)
        out = f"{cls.name}[{v}]" if v else cls.name
        if preset is None:
            return out
        return out + config_departure(config, cls.make_config(preset, base), skip=cls.variant_options)

    @classmethod
    def search_space(cls, trial) -> dict:
        """Config overrides sampled from an ``optuna.Trial`` for ``bench sweep`` (nested dicts for
        nested configs, as for ``make_config``). ``NotImplementedError`` when nothing is tunable."""
        raise NotImplementedError(f"method {cls.name} declares no search space (override search_space)")

    def activate_context(self, seed: int = 0) -> None:
        """For the conformance kit (:mod:`benchbench.testing`) only, never in a benchmark run: put the
        fitted method in a state where its memory reaches its predictions, so that the kit's context
        checks (state reset, isolation across dialogues and within a batch, causality) test a memory
        that does something, even when dev selection kept Phase 1 and a gate stayed at 0.

        The default: nothing for ``uses_context = False``; otherwise every trained parameter that is
        exactly zero everywhere (a zero-initialised gate or read-out that never moved) is filled
        with seeded values: ``0.5 + U[0, 1)`` for a scalar or a vector (a gate opened, e.g.
        tanh(alpha) in [0.46, 0.91]), ``N(0, 1 / fan_in)`` for a matrix. A method whose memory is
        switched off by something else (a flag set when dev keeps Phase 1, a learning rate) overrides
        this, calls ``super().activate_context(seed)`` and switches it on. Must be deterministic in
        ``seed`` and idempotent, and change only what :meth:`save` writes (the kit copies an
        activated method through save / load).
        """
        if not self.uses_context:
            return
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(self.trained_parameters().items()):
                if p.numel() == 0 or bool(p.detach().any()):
                    continue
                if p.dim() < 2:
                    value = 0.5 + torch.rand(p.shape, generator=g)
                else:
                    value = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
                p.copy_(value.to(p))

    def use_phase(self, phase: int) -> None:
        """Two-stage methods (:attr:`phases` 2): make phase ``phase`` the live model after :meth:`fit`,
        whatever dev selected: 1 = Phase 1 alone (the memory or context off: ``lora``'s predictions
        when Phase 1 is ``lora``'s training), 2 = Phase 2 at its dev-best epoch. The harness predicts
        the test set under both (results: ``prediction_phase1``, ``wa_phase1``, ...), so the phase
        gate (the option ``phase_gate``) can be audited, then puts back what dev selected. What it
        switches must be in :meth:`save` (trained parameters or fitted state), so a loaded method
        switches too.

        Raises:
            NotImplementedError: a single-phase method, or a plugin that does not support it (its
                cells then have no Phase-1 columns).
            ValueError: ``phase`` not 1 or 2.
        """
        raise NotImplementedError(f"method {self.name} cannot switch phases (phases={self.phases})")

    # ------------------------------------------------------------------ training
    @abstractmethod
    def fit(self, train: Sequence[Dialogue], dev: Sequence[Dialogue], progress: ProgressFn | None = None
            ) -> "FitReport":
        """Train on ``train``; select checkpoints on ``dev`` only. Returns what fitting produced
        (:class:`FitReport`: curves, dev selection, Phase-1 replay), which the harness logs."""

    # ------------------------------------------------------------------ streaming evaluation
    @abstractmethod
    def reset(self) -> None:
        """Start a new dialogue: S <- S_0."""

    @abstractmethod
    def step(self, utterance: UtteranceInput) -> np.ndarray:
        """``y_i = f(x_i, S_{i-1})`` as probabilities ``[C]``; then ``S_i = U(S_{i-1}, x_i)`` (no label)."""

    def predict_dialogue(self, utterances: Sequence[UtteranceInput]) -> np.ndarray:
        """Probabilities ``[N, C]`` for a whole dialogue, from a fresh state, in turn order."""
        self.reset()
        return np.stack([self.step(u) for u in utterances])

    def predict_dialogues(self, dialogues: Sequence[Sequence[UtteranceInput]]) -> list[np.ndarray]:
        """:meth:`predict_dialogue` of each dialogue (each from a fresh state), in order: ``[N_d, C]``
        per dialogue. The harness evaluates through this; a method may batch across dialogues as
        long as every dialogue gets what :meth:`predict_dialogue` gives it (the conformance suite
        checks it within ``PREFIX_ATOL``)."""
        return [self.predict_dialogue(u) for u in dialogues]

    # ------------------------------------------------------------------ parameters
    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter this method trains (in any stage), by name. Empty for ``zero_shot``."""
        return {}

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """Tensors other than trained parameters that a fitted method needs to reproduce its predictions
        (e.g. a k-means codebook, a temporary adapter's initial values); saved under ``state.``."""
        return {}

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`fitted_state` returned."""

    def save(self, path: str | Path) -> None:
        """Write the trained parameters (and the fitted state, under ``state.``) to a safetensors file,
        with method name and config as metadata."""
        tensors = {k: v.detach().contiguous().clone() for k, v in self.trained_parameters().items()}
        tensors.update({f"{STATE_PREFIX}{k}": v.detach().contiguous().clone() for k, v in self.fitted_state().items()})
        save_file(tensors, str(path), metadata={"method": self.name, "config": json.dumps(self.config.to_dict())})

    def load(self, path: str | Path) -> None:
        """Load parameters written by :meth:`save`; ``ValueError`` naming the file on any mismatch."""
        tensors = load_file(str(path))
        state = {k[len(STATE_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(STATE_PREFIX)}
        own = self.trained_parameters()
        missing, unexpected = set(own) - set(tensors), set(tensors) - set(own)
        if missing or unexpected:
            raise ValueError(f"{path}: parameters do not match method {self.name}: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        with torch.no_grad():
            for k, p in own.items():
                if p.shape != tensors[k].shape:
                    raise ValueError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, expected {tuple(p.shape)}")
                p.copy_(tensors[k])
        try:
            self.load_fitted_state(state)
        except KeyError as e:
            raise ValueError(f"{path}: fitted state {e} missing for method {self.name}") from None

    def num_trained_parameters(self) -> int:
        return sum(p.numel() for p in self.trained_parameters().values())


class UtteranceLevelMethod(ContextMethod):
    """Base of methods whose output depends on the current utterance only (``zero_shot``, ``lora``):
    a dialogue is predicted in one batch, the state is empty."""

    uses_context = False

    def reset(self) -> None:
        pass

    def predict_dialogue(self, utterances: Sequence[UtteranceInput]) -> np.ndarray:
        return self.predict_dialogues([utterances])[0]

    @torch.no_grad()
    def predict_dialogues(self, dialogues: Sequence[Sequence[UtteranceInput]]) -> list[np.ndarray]:
        """Every utterance alone, up to :attr:`batch_utterances` per LM forward across dialogues."""
        self.lm.eval()
        out = []
        for group in utterance_groups(dialogues, self.batch_utterances):
            utts = [u for d in group for u in d]
            batch = self.lm.batch([[Segment(self.audio_embeddings(u))] for u in utts])
            probs = torch.softmax(self.lm(batch).float(), -1).cpu().numpy()
            out.extend(np.split(probs, np.cumsum([len(d) for d in group])[:-1]))
        return out

    def step(self, utterance: UtteranceInput) -> np.ndarray:
        return self.predict_dialogue([utterance])[0]


def utterance_groups(dialogues: Sequence[Sequence[UtteranceInput]], budget: int) -> list[list[Sequence[UtteranceInput]]]:
    """Consecutive dialogues grouped so that a group holds at most ``budget`` utterances (a longer
    dialogue is a group of its own; empty dialogues are kept, in order)."""
    groups: list[list] = [[]]
    n = 0
    for d in dialogues:
        if groups[-1] and n + len(d) > budget:
            groups.append([])
            n = 0
        groups[-1].append(d)
        n += len(d)
    return groups if groups[0] else []


def config_departure(config: MethodConfig, base: MethodConfig, skip: Sequence[str] = ()) -> str:
    """``"{k=v,...}"``: the options of ``config`` whose values differ from ``base``'s (flattened,
    nested ones dotted, sorted; ``skip``: option names left out), ``""`` when none do. Values as on
    the command line: ``true`` / ``false``, integers as they are, floats to 4 significant digits,
    lists comma-joined."""
    ours, theirs = config.flat(), base.flat()
    diff = [k for k in sorted(ours) if k.split(".")[0] not in skip and ours[k] != theirs.get(k)]
    return "{" + ",".join(f"{k}={_option_text(ours[k])}" for k in diff) + "}" if diff else ""


def _option_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}"  # a tuned lr stays readable; config_id tells apart what rounding merges
    if isinstance(v, (list, tuple)):
        return ",".join(map(_option_text, v))
    return "null" if v is None else str(v)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


METHODS = _names.METHODS
"""The method registry (defined, without imports of its entries, in :mod:`benchbench.names`)."""
