"""`hmm` (lora + per-speaker forward filtering) and the inertia statistics it shares with the ceiling."""

import numpy as np
import pytest

from benchbench.data import UNSCORED, Dialogue, Utterance, UtteranceInput
from benchbench.inertia import forward_filter, label_history_posteriors, previous_labels, speaker_transitions
from benchbench.testing import fitted


def _dialogue(did, speakers, labels):
    return Dialogue(did, tuple(Utterance(UtteranceInput(f"{did}-{i}", did, i, s, np.zeros(160, np.float32), 16000), y)
                               for i, (s, y) in enumerate(zip(speakers, labels))))


def test_speaker_transitions_count_each_speakers_previous_scored_label():
    d1 = _dialogue("a", ["A", "B", "A", "A"], [0, 1, 0, 1])
    d2 = _dialogue("b", ["A", "A", "A"], [1, UNSCORED, 1])  # the unscored turn is skipped: 1 -> 1
    A, prior = speaker_transitions([d1, d2], 2, smoothing=0.0)
    # transitions: A: 0->0, 0->1 (d1); 1->1 (d2)   B: none
    np.testing.assert_allclose(A, [[0.5, 0.5], [0.0, 1.0]])
    np.testing.assert_allclose(prior, [2 / 6, 4 / 6])
    A1, prior1 = speaker_transitions([d1, d2], 2, smoothing=1.0)
    np.testing.assert_allclose(A1, [[2 / 4, 2 / 4], [1 / 3, 2 / 3]])
    np.testing.assert_allclose(prior1, [3 / 8, 5 / 8])
    with pytest.raises(ValueError, match="smoothing"):
        speaker_transitions([d1], 3, smoothing=0.0)  # class 2 never seen


def test_forward_filter_equals_a_hand_computation():
    A = np.array([[0.8, 0.2], [0.3, 0.7]])
    prior = np.array([0.5, 0.5])
    p = np.array([[0.6, 0.4], [0.1, 0.9], [0.5, 0.5], [0.3, 0.7]])
    b = forward_filter(p, ["A", "B", "A", "A"], A, prior, 1.0)
    # A's first turn and B's first turn: the utterance model; turn 2: pi = [0.6, 0.4] @ A = [0.6, 0.4],
    # b = [0.5 * 1.2, 0.5 * 0.8] = [0.6, 0.4]; turn 3: pi = [0.6, 0.4] again, b ~ [0.3 * 1.2, 0.7 * 0.8]
    np.testing.assert_allclose(b, [[0.6, 0.4], [0.1, 0.9], [0.6, 0.4], [0.36 / 0.92, 0.56 / 0.92]])
    half = forward_filter(p, ["A", "B", "A", "A"], A, prior, 0.5)
    b2 = np.array([0.5 * 1.2 ** 0.5, 0.5 * 0.8 ** 0.5])
    b2 /= b2.sum()                                   # A's belief after turn 2, at strength 0.5
    pi3 = np.array([b2[0] * 0.8 + b2[1] * 0.3, b2[0] * 0.2 + b2[1] * 0.7])
    w = np.array([0.3, 0.7]) * (pi3 / 0.5) ** 0.5
    np.testing.assert_allclose(half[2:], [b2, w / w.sum()])
    assert forward_filter(p, ["A", "B", "A", "A"], A, prior, 0.0) is p  # strength 0: the model itself


def test_label_history_posteriors_equal_a_hand_computation():
    A = np.array([[0.8, 0.2], [0.3, 0.7]])
    prior = np.array([0.4, 0.6])
    prev = previous_labels(["A", "B", "A", "B"], [1, 0, UNSCORED, 1])
    assert prev.tolist() == [UNSCORED, UNSCORED, 1, 0]  # the unscored turn of A updates nothing
    p = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.2, 0.8]])
    b = label_history_posteriors(p, prev, A, prior, 1.0)
    w2 = np.array([0.5 * 0.3 / 0.4, 0.5 * 0.7 / 0.6])
    w3 = np.array([0.2 * 0.8 / 0.4, 0.8 * 0.2 / 0.6])
    np.testing.assert_allclose(b, [[0.5, 0.5], [0.5, 0.5], w2 / w2.sum(), w3 / w3.sum()])


def test_hmm_at_strength_zero_is_lora_bit_for_bit(backbone, tiny_task):
    lora, hmm = fitted("lora", backbone, tiny_task), fitted("hmm", backbone, tiny_task)
    test = [d.inputs() for d in tiny_task.folds()[0].test]
    hmm.strength = 0.0
    for a, b in zip(lora.predict_dialogues(test), hmm.predict_dialogues(test)):
        assert np.array_equal(a, b)
    hmm.reset()
    assert np.array_equal(np.stack([hmm.step(u) for u in test[0]]), np.stack([lora.step(u) for u in test[0]]))
    hmm.strength = 1.0  # the filter acts on a speaker's later turns, never on their first
    p = hmm.predict_dialogue(test[0])
    firsts = sorted({u.speaker: i for i, u in reversed(list(enumerate(test[0])))}.values())
    base = lora.predict_dialogue(test[0])
    np.testing.assert_allclose(p[firsts], base[firsts], atol=1e-6)
    assert not np.allclose(np.delete(p, firsts, 0), np.delete(base, firsts, 0))


def test_hmm_chooses_its_strength_on_dev_and_reports_it(backbone, tiny_task):
    from benchbench.testing import fit_with_report

    m, report = fit_with_report("hmm", backbone, tiny_task)
    curve = report.curves["hmm_dev_ua"]
    assert len(curve) == 5 and m.strength in (0.0, 0.25, 0.5, 0.75, 1.0)
    if m.strength == 0:  # nothing beat lora on dev: Phase 1 (lora) stands
        assert report.selected["phase"] == 1
    else:
        assert report.selected == {"phase": 2, "epoch": None} and report.dev_score == max(curve)
