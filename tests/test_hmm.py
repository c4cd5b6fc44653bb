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


def _ceiling_fixture():
    """Two dialogues A, B, A, B with gold b, a, b, a; lora wrong everywhere, the method right on turn 0
    of the first dialogue only."""
    import pandas as pd

    p = [[0.6, 0.4], [0.45, 0.55], [0.55, 0.45], [0.45, 0.55]]
    gold = ["b", "a", "b", "a"]
    rows = []
    for d in ("d1", "d2"):
        for i, (s, y, q) in enumerate(zip("ABAB", gold, p)):
            base = dict(task="toy", backbone="bb", seed=0, fold=0, dialogue_id=d, utterance_id=f"{d}-{i}", turn=i,
                        speaker=f"{d}{s}", label=y)
            lora_pred = "a" if q[0] > q[1] else "b"
            rows.append({**base, "method": "lora", "prediction": lora_pred, "correct": lora_pred == y,
                         "p_a": q[0], "p_b": q[1]})
            m_pred = y if (d, i) == ("d1", 0) else lora_pred
            rows.append({**base, "method": "mal", "prediction": m_pred, "correct": m_pred == y,
                         "p_a": 0.5, "p_b": 0.5})
    from benchbench.analysis import TaskSummary

    info = TaskSummary(["a", "b"], transitions={"0": {"A": [[0.8, 0.2], [0.3, 0.7]], "prior": [0.4, 0.6]}})
    return pd.DataFrame(rows), {"toy": info}


def test_label_history_reference_and_gap_closed_equal_a_hand_computation():
    """Turn 2 (previous gold b): lambda = 1 gives [0.55 * 0.3 / 0.4, 0.45 * 0.7 / 0.6] -> b, right;
    turn 3 (previous a) -> a, right; turns 0-1 have no past and stay wrong: the reference is 4/8 at
    lambda = 0.5 (the smallest strength reaching it; 0.25 gets turn 3 only). The method is right on
    1 of 8 where lora is on none: it closes (1/8 - 0) / (4/8 - 0) = 25% of the gap."""
    from benchbench.analysis import gap_target_text, gap_text, gaps_closed, label_history_references

    preds, tasks = _ceiling_fixture()
    (ref,), rows = label_history_references(preds, tasks)
    assert ref["wa"] == 0.5 and ref["reference_wa"] == 0.0 and ref["strength"] == 0.5 and ref["n"] == 8
    assert ref["name"] == "label_history" and ref["kind"] == "reference"
    assert rows[("toy", "bb")]["target_correct"].tolist() == [False, False, True, True] * 2
    (gap,) = gaps_closed(preds, tasks, rows, n_resamples=200)
    assert gap["method"] == "mal" and gap["gap_closed"] == pytest.approx(0.25) and gap["n_dialogues"] == 2
    assert (gap["target"], gap["target_kind"], gap["target_wa"]) == ("label_history", "reference", 0.5)
    assert gap_target_text(gap) == "reference label_history 50.00" and gap_text(gap).startswith("+25% [")
    assert 0.0 <= gap["ci_low"] <= 0.25 <= gap["ci_high"] <= 0.5
    beyond = {**gap, "gap_closed": 1.4, "ci_low": 1.1, "ci_high": 1.7}  # a share above 100% says so
    assert gap_text(beyond) == "+140% [+110, +170] (beyond the reference)"


def test_a_run_writes_the_label_history_reference_and_the_gap_closed(tmp_path, capsys):
    """`bench run` on a real corpus: tasks.emodb.references.label_history in summary.json (and its
    deprecated alias under ceilings), never below lora, and each method's gap closed against it,
    named with its value; the terminal says what the reference assumes."""
    import json

    from benchbench.cli import main
    from tests.conftest import EMODB_DIR, missing

    if not EMODB_DIR.is_dir():
        pytest.skip(missing("Emo-DB", EMODB_DIR))
    out = tmp_path / "out"
    rc = main(["run", "--methods", "lora,hmm", "--tasks", "emodb", "--data-dir", str(EMODB_DIR.parent / "emodb"),
               "--preset", "smoke", "--seeds", "0", "--folds", "0", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
               "--output", str(out), "--no-progress"])
    res = capsys.readouterr()
    assert rc == 0, res.err[-3000:]
    s = json.loads((out / "summary.json").read_text())
    ref = s["tasks"]["emodb"]["references"]["label_history"]
    assert s["tasks"]["emodb"]["ceilings"]["label_history"] == ref  # the 0.2 alias
    lora_wa = next(c for c in s["cells"] if c["method"] == "lora")["wa"]["mean"]
    assert ref >= lora_wa and set(s["tasks"]["emodb"]["transitions"]) == {"0"}
    assert [g["method"] for g in s["gap_closed"]] == ["hmm"]
    assert s["gap_closed"][0]["target_kind"] == "reference" and s["gap_closed"][0]["target_wa"] == pytest.approx(ref)
    assert s["context_references"] == s["context_ceilings"] and s["context_references"][0]["kind"] == "reference"
    assert "context reference label_history" in res.out and "which no method sees" in res.out
    assert "a reference, not a bound" in res.out and f"reference label_history {100 * ref:.2f}" in res.out
    from benchbench.analysis import Summary  # summary.json reads back: the reference stays apart from the ceilings

    back = Summary.read(out / "summary.json").tasks["emodb"].reference
    assert back.references == {"label_history": ref} and "label_history" not in back.all_ceilings()


def test_forward_filter_refuses_a_speaker_list_of_another_length():
    """One speaker per turn: Dialogue.speakers (the distinct ids) is not that, and once filled half
    of the turns with uninitialised memory (dev selection then chose strength 0 on Emo-DB)."""
    p = np.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="2 speakers for 3 turns"):
        forward_filter(p, ["A", "B"], np.eye(2), np.array([0.5, 0.5]), 1.0)


def test_hmm_dev_selection_filters_each_turn_with_its_own_speaker(backbone, tiny_task, monkeypatch):
    import benchbench.methods.hmm as hmm_module

    seen = []
    real = hmm_module.forward_filter
    monkeypatch.setattr(hmm_module, "forward_filter", lambda p, s, *a: (seen.append((len(p), list(s))), real(p, s, *a))[1])
    fitted("hmm", backbone, tiny_task)
    dev = tiny_task.folds()[0].dev
    assert seen and all(n == len(s) for n, s in seen)
    assert seen[0][1] == [u.speaker for u in dev[0].utterances]
