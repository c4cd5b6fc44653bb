"""The conformance kit every ``ContextMethod`` must pass (after scikit-learn's ``check_estimator`` and
``parametrize_with_checks``).

Importable by contributors, so a plugin's own CI runs exactly what the suite runs. One call::

    from benchbench.backbones.qwen2_audio import tiny_qwen2_audio
    from benchbench.tasks.synthetic import SyntheticProsodyTask
    from benchbench.testing import run_conformance

    task = SyntheticProsodyTask(preset="smoke", n_train=6, n_dev=2, n_test=3, n_turns=4, duration_s=0.64)
    backbone = tiny_qwen2_audio(seed=0)
    run_conformance("my_method", backbone, task)                                  # its "smoke" preset
    run_conformance("my_method", backbone, task, overrides={"speaker_memory": True})   # a variant

or one pytest test per check::

    @pytest.mark.parametrize("check", conformance_checks("my_method"), ids=str)
    def test_my_method(check):
        check(backbone, task)

The method is fitted once per (method, overrides, backbone, task) on the task's first fold with its
``smoke`` preset; every check then works on its own copy, loaded from the fitted parameters (so no
check sees another's leftovers).

**Active memory.** Dev selection at a smoke preset often keeps Phase 1: a zero-initialised gate then
stays at 0 and the memory does nothing, which would let every context check pass on a method whose
context never reaches its predictions. So the context checks run on the copy after
:meth:`ContextMethod.activate_context`, the contract's hook that opens the method's memory with
seeded non-zero values (the default fills every trained parameter that is exactly zero everywhere:
a zero gate, a zero read-out). The kit fails a method declaring ``uses_context = True`` whose
predictions, once active, do not depend on the earlier turns.

The checks (each raises ``AssertionError`` starting ``<method>: <check name>:``):

* ``check_output_shape``: ``[N, C]`` finite probabilities, as fitted and active;
* ``check_context_dependence`` (``uses_context``): active, some turn's prediction moves by more than
  :data:`CONTEXT_ATOL` when its earlier turns are taken away;
* ``check_context_free_independence`` (not ``uses_context``): every turn predicted as if alone;
* ``check_future_turns``: active, no later turn's audio changes an earlier turn's prediction, on
  :meth:`~ContextMethod.predict_dialogue`, :meth:`~ContextMethod.predict_dialogues` and :meth:`~ContextMethod.step`;
* ``check_prefix_consistency``: active, a prefix predicted alone and the dialogue streamed with
  ``step`` agree with the whole dialogue;
* ``check_dialogue_isolation``: active, two dialogues A and B streamed in both orders and
  interleaved (A, B, A, each after ``reset()``), and batched in both orders and interleaved
  ([A, B, A, B]), give each dialogue what it gets alone from a fresh copy;
* ``check_batched_dialogues``: active, ``predict_dialogues`` over the test set agrees with
  ``predict_dialogue`` of each dialogue;
* ``check_labels_unreachable``: active, label-free inputs only, and scrambled test labels change nothing;
* ``check_save_load``: as fitted and active, save then load into a fresh instance (another seed)
  reproduces the predictions exactly;
* ``check_determinism``: fitting again under the same seed gives identical parameters and predictions;
* ``check_phase1_is_lora`` (``phase1_of = "lora"``): the method's Phase 1 is ``lora``'s training bit
  for bit (the same per-step train losses and dev curve, the same LoRA tensors after fitting), with
  no replay from the Phase-1 cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from benchbench.data import Dialogue, Utterance, UtteranceInput
from benchbench.method import METHODS, ContextMethod, FitReport

PREFIX_ATOL = 1e-5  # batched vs streamed evaluation may differ by float rounding only
CONTEXT_ATOL = 1e-4
"""An active memory must move some turn's probability by more than this (10x float rounding)."""
ACTIVATION_SEED = 1234
"""The seed :func:`activated` hands :meth:`ContextMethod.activate_context`."""

MethodRef = "str | type[ContextMethod]"


def _cls(method) -> type[ContextMethod]:
    return METHODS.get(method) if isinstance(method, str) else method


@contextmanager
def _no_phase1_replay(backbone):
    """A fit that trains what it checks: the backbone's Phase-1 cache emptied (and the disk cache off)
    while inside, restored after."""
    saved, env = backbone.fit_cache, os.environ.get("BENCHBENCH_PHASE1_CACHE")
    backbone.fit_cache = {}
    os.environ["BENCHBENCH_PHASE1_CACHE"] = "0"
    try:
        yield
    finally:
        backbone.fit_cache = saved
        if env is None:
            os.environ.pop("BENCHBENCH_PHASE1_CACHE", None)
        else:
            os.environ["BENCHBENCH_PHASE1_CACHE"] = env


def fit_with_report(method, backbone, task, seed: int = 0, overrides: dict | None = None,
                    preset: str = "smoke") -> tuple[ContextMethod, FitReport]:
    """``(method, report)``: the method built with ``preset`` + ``overrides`` and fitted on the
    task's first fold (train, dev), with no Phase-1 replay. ``AssertionError`` when ``fit`` does not
    return a :class:`FitReport`."""
    cls = _cls(method)
    fold = task.folds()[0]
    m = cls(backbone, task.labels, cls.make_config(preset, overrides), seed=seed)
    with _no_phase1_replay(backbone):
        report = m.fit(fold.train, fold.dev)
    assert isinstance(report, FitReport), (f"{cls.name}: fit returned {type(report).__name__}, not a FitReport "
                                           "(its curves, dev selection and Phase-1 replay: CONTRIBUTING.md)")
    return m, report


def fitted(method, backbone, task, seed: int = 0, overrides: dict | None = None,
           preset: str = "smoke") -> ContextMethod:
    """The method fitted as :func:`fit_with_report` fits it."""
    return fit_with_report(method, backbone, task, seed, overrides, preset)[0]


def copy_of(m: ContextMethod, seed: int | None = None) -> ContextMethod:
    """A fresh instance of ``m``'s class and config (``seed``: ``m``'s unless given) holding ``m``'s
    saved parameters and fitted state (:meth:`ContextMethod.save` / :meth:`ContextMethod.load`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.safetensors"
        m.save(path)
        fresh = type(m)(m.backbone, m.labels, dataclasses.replace(m.config), seed=m.seed if seed is None else seed)
        fresh.load(path)
    return fresh


def activated(m: ContextMethod) -> ContextMethod:
    """A copy of ``m`` with its memory active (:meth:`ContextMethod.activate_context` under
    :data:`ACTIVATION_SEED`); ``m`` itself is untouched."""
    c = copy_of(m)
    c.activate_context(ACTIVATION_SEED)
    return c


def _predict(m: ContextMethod, dialogues) -> list[np.ndarray]:
    return [np.asarray(m.predict_dialogue(list(d.inputs() if isinstance(d, Dialogue) else d))) for d in dialogues]


def _stream(m: ContextMethod, utterances: Sequence[UtteranceInput]) -> np.ndarray:
    m.reset()
    return np.stack([np.asarray(m.step(u)) for u in utterances])


def _two_dialogues(task) -> tuple[tuple[UtteranceInput, ...], tuple[UtteranceInput, ...]]:
    test = task.folds()[0].test
    assert len(test) >= 2, f"the conformance task needs at least 2 test dialogues (has {len(test)})"
    return test[0].inputs(), test[1].inputs()


def _close(a, b, atol=PREFIX_ATOL) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.allclose(a, b, atol=atol)


# ---------------------------------------------------------------------------------------- the checks
def check_output_shape(m: ContextMethod, task) -> None:
    """``[N, C]`` finite probabilities for every test dialogue, as fitted and with the memory active."""
    for which, method in (("as fitted", m), ("active", activated(m))):
        for d, p in zip(task.folds()[0].test, _predict(method, task.folds()[0].test)):
            assert p.shape == (len(d), len(task.labels)), f"predictions {p.shape} ({which}) for a dialogue of {len(d)}"
            assert np.all(np.isfinite(p)) and np.allclose(p.sum(-1), 1.0, atol=1e-5), f"not probabilities ({which})"


def check_context_dependence(m: ContextMethod, task) -> None:
    """``uses_context = True``: with the memory active, some test turn's prediction differs (by more
    than :data:`CONTEXT_ATOL`) from the same utterance predicted with no earlier turns."""
    if not m.uses_context:
        return
    a = activated(m)
    moved = 0.0
    for d in task.folds()[0].test:
        utts = list(d.inputs())
        full = np.asarray(a.predict_dialogue(utts))
        alone = np.stack([np.asarray(a.predict_dialogue([u]))[0] for u in utts])
        moved = max(moved, float(np.abs(full - alone).max()))
    assert moved > CONTEXT_ATOL, (
        f"declares uses_context = True, but with its memory active (activate_context) no test prediction "
        f"depends on the earlier turns (largest change {moved:.2g} <= {CONTEXT_ATOL:g}): the context never "
        "reaches the predictions, or activate_context does not open the memory (CONTRIBUTING.md, 'The kit')")


def check_context_free_independence(m: ContextMethod, task) -> None:
    """``uses_context = False``: every utterance is predicted as if it were alone."""
    if m.uses_context:
        return
    d = task.folds()[0].test[0]
    full = np.asarray(m.predict_dialogue(d.inputs()))
    alone = np.stack([np.asarray(m.predict_dialogue([u]))[0] for u in d.inputs()])
    assert _close(full, alone), "declared context-free (uses_context = False) but uses context"


def check_future_turns(m: ContextMethod, task) -> None:
    """With the memory active, replacing the audio of turns >= k changes no prediction of turns < k:
    not through ``predict_dialogue``, ``predict_dialogues`` (beside another dialogue) or ``step``. Each
    prediction starts from a fresh activated copy, so state left over from an earlier dialogue (a
    ``reset()`` that forgets nothing: :func:`check_dialogue_isolation`'s failure) is not reported here."""
    (d, other) = _two_dialogues(task)
    k = max(1, len(d) // 2)
    donors = [u for dd in task.folds()[0].test[1:] for u in dd.inputs()]
    changed = list(d[:k]) + [dataclasses.replace(u, waveform=donors[i % len(donors)].waveform)
                             for i, u in enumerate(d[k:])]
    for path, run in (("predict_dialogue", lambda a, utts: a.predict_dialogue(list(utts))),
                      ("predict_dialogues", lambda a, utts: a.predict_dialogues([list(utts), list(other)])[0]),
                      ("step", lambda a, utts: _stream(a, utts))):
        p, q = np.asarray(run(activated(m), d)), np.asarray(run(activated(m), changed))
        assert _close(p[:k], q[:k]), (f"{path}: the audio of later turns (>= {k}) changes the predictions of earlier "
                                      f"turns (largest change {np.abs(p[:k] - q[:k]).max():.2g})")


def check_prefix_consistency(m: ContextMethod, task) -> None:
    """With the memory active, turn i's prediction depends only on turns <= i: predicting a prefix,
    or streaming step by step, gives the same probabilities as the whole dialogue."""
    a = activated(m)
    d = task.folds()[0].test[0].inputs()
    full = np.asarray(a.predict_dialogue(list(d)))
    k = max(1, len(d) // 2)
    prefix = np.asarray(a.predict_dialogue(list(d[:k])))
    assert _close(full[:k], prefix), "turn predictions depend on later turns (a prefix predicted alone differs)"
    assert _close(full, _stream(a, d)), "step() disagrees with predict_dialogue()"


def check_dialogue_isolation(m: ContextMethod, task) -> None:
    """With the memory active, each of two dialogues A and B gets what it gets alone (a fresh copy's
    first ``step`` stream; a batch against a fresh copy's ``predict_dialogue`` of each, so a
    within-dialogue leak of later turns, :func:`check_future_turns`'s failure, is not reported here),
    whatever was streamed or batched before or beside it: streamed A, B, A and B, A (each after
    ``reset()``), batched [A, B], [B, A] and [A, B, A, B]."""
    A, B = _two_dialogues(task)
    alone = {"A": _stream(activated(m), A), "B": _stream(activated(m), B)}
    alone_whole = {"A": activated(m).predict_dialogue(list(A)), "B": activated(m).predict_dialogue(list(B))}
    a = activated(m)
    seen = {"A, B, A": [("A", _stream(a, A)), ("B", _stream(a, B)), ("A", _stream(a, A))]}
    a = activated(m)
    seen["B, A"] = [("B", _stream(a, B)), ("A", _stream(a, A))]
    for order in ("AB", "BA", "ABAB"):
        out = a.predict_dialogues([list({"A": A, "B": B}[x]) for x in order])
        assert len(out) == len(order), f"predict_dialogues returned {len(out)} results for {len(order)} dialogues"
        seen[f"batched [{', '.join(order)}]"] = list(zip(order, out))
    for how, results in seen.items():
        ref = alone_whole if how.startswith("batched") else alone
        for i, (name, p) in enumerate(results):
            assert _close(ref[name], p), (
                f"state leaks across dialogues: dialogue {name} (position {i + 1} of {how}) differs from the "
                f"same dialogue alone (largest change {np.abs(ref[name] - np.asarray(p)).max():.2g}); "
                "does reset() restore S_0, and does every dialogue of a batch get its own state?")


def check_batched_dialogues(m: ContextMethod, task) -> None:
    """With the memory active, :meth:`ContextMethod.predict_dialogues` (the harness's path, which may
    batch across dialogues) gives every test dialogue what :meth:`ContextMethod.predict_dialogue`
    gives it alone."""
    a = activated(m)
    test = task.folds()[0].test
    batched = a.predict_dialogues([list(d.inputs()) for d in test])
    assert len(batched) == len(test), f"predict_dialogues returned {len(batched)} for {len(test)} dialogues"
    for d, p in zip(test, batched):
        assert _close(p, a.predict_dialogue(list(d.inputs()))), \
            f"predict_dialogues disagrees with predict_dialogue ({d.dialogue_id})"


def check_labels_unreachable(m: ContextMethod, task) -> None:
    """With the memory active, evaluation hands label-free inputs; scrambling the test labels changes
    no prediction."""
    a = activated(m)
    test = task.folds()[0].test
    seen = []
    original = a.predict_dialogue

    def spy(utterances):
        seen.extend(utterances)
        return original(utterances)

    a.predict_dialogue = spy
    try:
        ref = _predict(a, test)
    finally:
        del a.predict_dialogue
    assert seen and all(type(u) is UtteranceInput for u in seen), "received non-UtteranceInput objects"
    assert not any(hasattr(u, "label") for u in seen), "a label is reachable from the inputs"
    rng = np.random.default_rng(0)
    scrambled = [Dialogue(d.dialogue_id, tuple(Utterance(u.input, int(rng.integers(len(task.labels))))
                                               for u in d.utterances)) for d in test]
    for p, q in zip(ref, _predict(a, scrambled)):
        assert np.array_equal(p, q), "predictions change with the test labels"


def check_save_load(m: ContextMethod, task) -> None:
    """save() then load() into a fresh instance (another seed) reproduces the predictions exactly, as
    fitted and with the memory active."""
    test = task.folds()[0].test
    for which, method in (("as fitted", m), ("active", activated(m))):
        fresh = copy_of(method, seed=method.seed + 1000)
        for p, q in zip(_predict(method, test), _predict(fresh, test)):
            assert np.array_equal(p, q), f"save/load does not round-trip ({which})"


def check_determinism(m: ContextMethod, task, *, method=None, overrides: dict | None = None,
                      preset: str = "smoke") -> None:
    """Fitting again under the same seed gives identical parameters and predictions."""
    second = fitted(method or type(m), m.backbone, task, seed=m.seed, overrides=overrides, preset=preset)
    a, b = m.trained_parameters(), second.trained_parameters()
    assert a.keys() == b.keys(), "trained parameters differ in name across reruns"
    for k in a:
        assert torch.equal(a[k].detach().cpu(), b[k].detach().cpu()), f"{k} differs across reruns"
    for p, q in zip(_predict(m, task.folds()[0].test), _predict(second, task.folds()[0].test)):
        assert np.array_equal(p, q), "predictions differ across reruns with the same seed"


def check_phase1_is_lora(m: ContextMethod, task, *, report: FitReport | None = None,
                         overrides: dict | None = None, preset: str = "smoke",
                         lora: tuple[ContextMethod, FitReport] | None = None) -> None:
    """``phase1_of = "lora"``: the method's Phase 1 is ``lora``'s training of the same seed, bit for
    bit: its ``lora_*`` curves (per-step train loss, per-epoch dev score) equal ``lora``'s, and its
    trained parameters include ``lora``'s, equal after fitting under Phase 1 (:meth:`use_phase(1)
    <benchbench.method.ContextMethod.use_phase>` where Phase 2 was selected and the method supports it;
    else the task LoRA must be frozen in Phase 2).
    Both fits train (no replay from the Phase-1 cache). ``lora``: ``(method, report)`` of a ``lora``
    already fitted by :func:`fit_with_report` at the same seed, preset and LoRA overrides, to compare
    with instead of fitting one (``AssertionError`` where its seed or config differs)."""
    if getattr(m, "phase1_of", None) != "lora":
        return
    lora_cls = METHODS.get("lora")
    lora_overrides = (overrides or {}).get("lora")
    lora_overrides = lora_overrides if isinstance(lora_overrides, dict) else None
    if lora is None:
        lora = fit_with_report("lora", m.backbone, task, seed=m.seed, preset=preset, overrides=lora_overrides)
    else:
        assert lora[0].seed == m.seed and lora[0].config == lora_cls.make_config(preset, lora_overrides), \
            "check_phase1_is_lora: the lora given is of another seed or config than this check compares with"
    lora, lora_report = lora
    assert isinstance(lora, lora_cls)
    report = report if report is not None else fit_with_report(type(m), m.backbone, task, m.seed, overrides, preset)[1]
    for name, curve in lora_report.curves.items():
        assert report.curves.get(name) == curve, (
            f"Phase 1 is not lora's training: curve {name} differs ({report.curves.get(name)} vs lora's {curve}); "
            "call benchbench.training.fit_task_lora with the memory off, and draw the memory's initial values "
            "inside auxiliary_rng(seed) (CONTRIBUTING.md)")
    switched = (report.selected or {}).get("phase") == 2
    if switched:  # Phase 1's values (full_context trains the task LoRA further in Phase 2)
        try:
            m.use_phase(1)
        except NotImplementedError:
            switched = False
    try:
        own = m.trained_parameters()
        for k, p in lora.trained_parameters().items():
            assert k in own, f"Phase 1 is not lora's: lora's parameter {k} is not among the method's trained parameters"
            assert torch.equal(own[k].detach().cpu(), p.detach().cpu()), (
                f"Phase 1 is not lora's: {k} differs from lora's after fitting (use_phase(1) where the method "
                "supports it; else is the task LoRA frozen in Phase 2?)")
    finally:
        if switched:
            m.use_phase(2)


CHECKS = ("check_output_shape", "check_context_dependence", "check_context_free_independence", "check_future_turns",
          "check_prefix_consistency", "check_dialogue_isolation", "check_batched_dialogues",
          "check_labels_unreachable", "check_save_load", "check_determinism", "check_phase1_is_lora")
"""Every check of the kit, in the order :func:`run_conformance` runs them."""


# ---------------------------------------------------------------------------------------- the entry points
_FITTED: dict = {}  # (method, overrides, preset, backbone, task) -> (fitted method, report); the last few


def _fitted_once(method, backbone, task, overrides, preset):
    key = (_cls(method), json.dumps(overrides or {}, sort_keys=True, default=str), preset, id(backbone), id(task))
    if key not in _FITTED:
        _FITTED[key] = fit_with_report(method, backbone, task, 0, overrides, preset)
        while len(_FITTED) > 4:
            _FITTED.pop(next(iter(_FITTED)))
    return _FITTED[key]


@dataclasses.dataclass(frozen=True)
class Check:
    """One check of the kit for one method configuration; ``check(backbone, task)`` runs it on the
    method fitted once per configuration, backbone and task (cached for the checks that follow).

    ``str(check)`` is its pytest id: ``mal{speaker_memory=True}-check_dialogue_isolation``.
    Raises ``AssertionError("<method>: <check>: <what failed>")``.
    """

    method: object
    name: str
    overrides: dict | None = None
    preset: str = "smoke"

    def __str__(self) -> str:
        o = ",".join(f"{k}={v}" for k, v in sorted((self.overrides or {}).items()))
        return f"{_cls(self.method).name}{'{' + o + '}' if o else ''}-{self.name}"

    def __call__(self, backbone, task) -> None:
        m, report = _fitted_once(self.method, backbone, task, self.overrides, self.preset)
        fn: Callable = globals()[self.name]
        kwargs = {}
        if self.name == "check_determinism":
            kwargs = dict(method=self.method, overrides=self.overrides, preset=self.preset)
        elif self.name == "check_phase1_is_lora":
            kwargs = dict(report=report, overrides=self.overrides, preset=self.preset)
        try:
            fn(m, task, **kwargs)
        except AssertionError as e:
            raise AssertionError(f"{str(self).rsplit('-', 1)[0]}: {self.name}: {e}") from None


def conformance_checks(method, overrides: dict | None = None, preset: str = "smoke") -> list[Check]:
    """The kit's checks that apply to ``method`` (a registry name or a ``ContextMethod`` class) under
    ``preset`` + ``overrides``, one :class:`Check` each, for ``pytest.mark.parametrize("check", ...,
    ids=str)``: the context-dependence check for ``uses_context`` methods, the independence check for
    the others, the Phase-1 check for ``phase1_of = "lora"`` (unless the config's ``phase1`` is ``none``)."""
    cls = _cls(method)
    skip = {"check_context_free_independence" if cls.uses_context else "check_context_dependence"}
    if getattr(cls, "phase1_of", None) != "lora" or \
            getattr(cls.make_config(preset, overrides), "phase1", "lora") != "lora":  # e.g. mal{phase1=none}
        skip.add("check_phase1_is_lora")
    return [Check(method, n, overrides, preset) for n in CHECKS if n not in skip]


REPORT_ORDER = ("check_output_shape", "check_dialogue_isolation", "check_batched_dialogues", "check_context_dependence",
                "check_context_free_independence", "check_future_turns", "check_prefix_consistency",
                "check_labels_unreachable", "check_save_load", "check_determinism", "check_phase1_is_lora")
"""The order :func:`run_conformance` reports failures in, the most specific cause first: state that
leaks across dialogues (a ``reset()`` that forgets nothing) also makes later turns' audio move earlier
predictions, so isolation is named before the future-turns check; a read of later turns also breaks
prefix consistency, so the future-turns check is named before that one."""


def run_conformance(method, backbone, task, overrides: dict | None = None, preset: str = "smoke") -> None:
    """Every check of :func:`conformance_checks`, all of them run; when any fails, one
    ``AssertionError`` whose message lists every failure, one per line (each naming the method and
    the check), in :data:`REPORT_ORDER`: the first line is the most specific cause."""
    failures = []
    for check in sorted(conformance_checks(method, overrides, preset), key=lambda c: REPORT_ORDER.index(c.name)):
        try:
            check(backbone, task)
        except AssertionError as e:
            failures.append(str(e))
    if failures:
        raise AssertionError("\n".join(failures))
