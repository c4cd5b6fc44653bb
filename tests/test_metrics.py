import numpy as np
import pandas as pd
import pytest

from benchbench.analysis import TaskSummary, leakage_checks
from benchbench.task import TaskReference
from benchbench.metrics import compute_metrics


def test_metric_values_by_hand():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 1, 0])
    m = compute_metrics(y, p, ["a", "b", "c"])
    assert m["wa"] == pytest.approx(4 / 6)
    assert m["ua"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    f1 = [2 * (2 / 3 * 2 / 3) / (4 / 3), 2 * (2 / 3 * 1) / (5 / 3), 0.0]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["wf1"] == pytest.approx((3 * f1[0] + 2 * f1[1] + f1[2]) / 6)
    assert m["f1_c"] == 0.0
    assert all(0 <= m[k] <= 1 for k in ("wa", "ua", "wf1", "macro_f1"))


def test_metric_input_errors():
    with pytest.raises(ValueError):
        compute_metrics(np.array([0, 1]), np.array([0]), ["a", "b"])


def test_leakage_check_flags_a_context_free_method_above_the_ceiling():
    info = {"t": TaskSummary(["a", "b"], TaskReference(context_free=0.5))}
    rows = pd.DataFrame([
        {"method": "honest", "task": "t", "seed": 0, "fold": 0, "wa": 0.52, "n_test": 400, "uses_context": False},
        {"method": "leaky", "task": "t", "seed": 0, "fold": 0, "wa": 0.70, "n_test": 400, "uses_context": False},
        {"method": "memory", "task": "t", "seed": 0, "fold": 0, "wa": 0.90, "n_test": 400, "uses_context": True}])
    flags = {c.method: c.leakage_suspected for c in leakage_checks(rows, info)}
    assert flags == {"honest": False, "leaky": True}
    info["t"] = TaskSummary(["a", "b"])  # no context-free ceiling: nothing to test against
    assert leakage_checks(rows, info) == []


def test_speaker_history_counts_and_accuracy_by_history():
    from types import SimpleNamespace as U

    from benchbench.analysis import accuracy_by_speaker_history
    from benchbench.data import speaker_history_counts

    utts = [U(speaker=s) for s in "ABAABBA"]
    assert speaker_history_counts(utts) == [0, 0, 1, 2, 1, 2, 3]
    preds = pd.DataFrame({"method": "m", "task": "t", "backbone": "b",
                          "speaker_history": [0, 0, 1, 2, 1, 2, 3, 5],
                          "correct": [0, 1, 1, 1, 0, 0, 1, 0]})
    (h,) = accuracy_by_speaker_history(preds)
    assert h["wa"] == {"0": 0.5, "1": 0.5, "2": 0.5, "3+": 0.5}
    assert h["n"] == {"0": 2, "1": 2, "2": 2, "3+": 2}
