"""The conformance suite every ``ContextMethod`` must pass (after scikit-learn's ``check_estimator``).

Importable by contributors, so a plugin's own CI runs exactly what the suite runs::

    from benchbench.backbones.qwen2_audio import tiny_qwen2_audio
    from benchbench.tasks.synthetic import SyntheticProsodyTask
    from benchbench.testing import run_conformance

    task = SyntheticProsodyTask(preset="smoke", n_train=6, n_dev=2, n_test=3, n_turns=4, duration_s=0.64)
    run_conformance("my_method", tiny_qwen2_audio(seed=0), task)   # the method's "smoke" preset

The method is fitted on the task's first fold with its ``smoke`` preset, then checked for: output
shape and probabilities, per-dialogue state reset (dialogue order permuted), prefix consistency
(turn i sees turns <= i; ``step`` agrees with ``predict_dialogue``), batching across dialogues
(``predict_dialogues`` agrees with ``predict_dialogue``), context-free independence for
``uses_context = False``, unreachable test labels, safetensors save/load round trip, and
determinism under a seed. Each ``check_*`` raises ``AssertionError`` naming the method and the
property.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from benchbench.data import Dialogue, Utterance, UtteranceInput
from benchbench.method import METHODS, ContextMethod, FitReport

PREFIX_ATOL = 1e-5  # batched vs streamed evaluation may differ by float rounding only


def fitted(name: str, backbone, task, seed: int = 0, overrides: dict | None = None) -> ContextMethod:
    cls = METHODS.get(name)
    fold = task.folds()[0]
    m = cls(backbone, task.labels, cls.make_config("smoke", overrides), seed=seed)
    report = m.fit(fold.train, fold.dev)
    assert isinstance(report, FitReport), (f"{name}: fit returned {type(report).__name__}, not a FitReport (its "
                                           "curves, dev selection and Phase-1 replay: CONTRIBUTING.md)")
    return m


def _predict(m: ContextMethod, dialogues) -> list[np.ndarray]:
    return [np.asarray(m.predict_dialogue(d.inputs())) for d in dialogues]


def check_output_shape(m: ContextMethod, task) -> None:
    for d, p in zip(task.folds()[0].test, _predict(m, task.folds()[0].test)):
        assert p.shape == (len(d), len(task.labels)), f"{m.name}: predictions {p.shape} for dialogue of {len(d)}"
        assert np.all(np.isfinite(p)) and np.allclose(p.sum(-1), 1.0, atol=1e-5), f"{m.name}: not probabilities"


def check_permutation_invariance(m: ContextMethod, task) -> None:
    """Permuting the order of test dialogues leaves each dialogue's predictions bit-identical."""
    test = list(task.folds()[0].test)
    ref = {d.dialogue_id: p for d, p in zip(test, _predict(m, test))}
    perm = test[::-1][1:] + test[-1:]
    for d, p in zip(perm, _predict(m, perm)):
        assert np.array_equal(ref[d.dialogue_id], p), f"{m.name}: state leaks across dialogues ({d.dialogue_id})"


def check_prefix_consistency(m: ContextMethod, task) -> None:
    """Turn i's prediction depends only on turns <= i: predicting a prefix, or streaming step by step,
    gives the same probabilities as the whole dialogue."""
    d = task.folds()[0].test[0]
    full = np.asarray(m.predict_dialogue(d.inputs()))
    k = max(1, len(d) // 2)
    prefix = np.asarray(m.predict_dialogue(d.inputs()[:k]))
    assert np.allclose(full[:k], prefix, atol=PREFIX_ATOL), f"{m.name}: turn predictions depend on later turns"
    m.reset()
    streamed = np.stack([m.step(u) for u in d.inputs()])
    assert np.allclose(full, streamed, atol=PREFIX_ATOL), f"{m.name}: step() disagrees with predict_dialogue()"


def check_batched_dialogues(m: ContextMethod, task) -> None:
    """:meth:`ContextMethod.predict_dialogues` (the harness's path, which may batch across dialogues)
    gives every dialogue what :meth:`ContextMethod.predict_dialogue` gives it alone."""
    test = task.folds()[0].test
    batched = m.predict_dialogues([d.inputs() for d in test])
    assert len(batched) == len(test), f"{m.name}: predict_dialogues returned {len(batched)} for {len(test)} dialogues"
    for d, p in zip(test, batched):
        assert np.allclose(np.asarray(p), np.asarray(m.predict_dialogue(d.inputs())), atol=PREFIX_ATOL), \
            f"{m.name}: predict_dialogues disagrees with predict_dialogue ({d.dialogue_id})"


def check_context_free_independence(m: ContextMethod, task) -> None:
    """A method declaring ``uses_context = False`` predicts each utterance as if it were alone."""
    if m.uses_context:
        return
    d = task.folds()[0].test[0]
    full = np.asarray(m.predict_dialogue(d.inputs()))
    alone = np.stack([np.asarray(m.predict_dialogue([u]))[0] for u in d.inputs()])
    assert np.allclose(full, alone, atol=PREFIX_ATOL), f"{m.name}: declared context-free but uses context"


def check_labels_unreachable(m: ContextMethod, task) -> None:
    """Evaluation hands label-free inputs; scrambling the test labels changes no prediction."""
    test = task.folds()[0].test
    seen = []
    original = m.predict_dialogue

    def spy(utterances):
        seen.extend(utterances)
        return original(utterances)

    m.predict_dialogue = spy
    try:
        ref = _predict(m, test)
    finally:
        del m.predict_dialogue
    assert seen and all(type(u) is UtteranceInput for u in seen), f"{m.name}: received non-UtteranceInput objects"
    assert not any(hasattr(u, "label") for u in seen), f"{m.name}: a label is reachable from the inputs"
    rng = np.random.default_rng(0)
    scrambled = [Dialogue(d.dialogue_id, tuple(Utterance(u.input, int(rng.integers(len(task.labels))))
                                               for u in d.utterances)) for d in test]
    for p, q in zip(ref, _predict(m, scrambled)):
        assert np.array_equal(p, q), f"{m.name}: predictions change with the test labels"


def check_determinism(name: str, backbone, task, first: ContextMethod) -> None:
    """Fitting again under the same seed gives identical parameters and predictions."""
    second = fitted(name, backbone, task, seed=first.seed)
    a, b = first.trained_parameters(), second.trained_parameters()
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k].detach().numpy(), b[k].detach().numpy()), f"{name}: {k} differs across reruns"
    for p, q in zip(_predict(first, task.folds()[0].test), _predict(second, task.folds()[0].test)):
        assert np.array_equal(p, q), f"{name}: predictions differ across reruns with the same seed"


def check_save_load(name: str, backbone, task, m: ContextMethod) -> None:
    """save() then load() into a fresh instance (another seed) reproduces the predictions exactly."""
    cls = METHODS.get(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.safetensors"
        m.save(path)
        fresh = cls(backbone, task.labels, dataclasses.replace(m.config), seed=m.seed + 1000)
        fresh.load(path)
    for p, q in zip(_predict(m, task.folds()[0].test), _predict(fresh, task.folds()[0].test)):
        assert np.array_equal(p, q), f"{name}: save/load does not round-trip"


def run_conformance(name: str, backbone, task) -> None:
    m = fitted(name, backbone, task)
    check_output_shape(m, task)
    check_permutation_invariance(m, task)
    check_prefix_consistency(m, task)
    check_batched_dialogues(m, task)
    check_context_free_independence(m, task)
    check_labels_unreachable(m, task)
    check_save_load(name, backbone, task, m)
    check_determinism(name, backbone, task, m)
