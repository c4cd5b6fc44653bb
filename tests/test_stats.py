"""Statistics on cases with known answers (benchbench.stats)."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from benchbench.metrics import compute_metrics
from benchbench.stats import cluster_bootstrap, compare, holm, interval, metrics_from_confusion, utterance_bootstrap_ci
from benchbench.metrics import confusion

LABELS = ["a", "b", "c", "d"]


def test_metrics_from_confusion_match_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 3, 50)  # class "d" never in the truth
        p = np.where(rng.random(50) < 0.6, y, rng.integers(0, 4, 50))
        ref = compute_metrics(y, p, LABELS)
        got = metrics_from_confusion(confusion(y, p, 4))
        for m in ("wa", "ua", "wf1", "macro_f1"):
            assert got[m] == pytest.approx(ref[m]), m


def test_interval_is_the_student_t_interval():
    v = [0.5, 0.6, 0.55, 0.52]
    r = interval(v)
    half = stats.t.ppf(0.975, 3) * np.std(v, ddof=1) / 2
    assert r["n"] == 4 and r["ci_low"] == pytest.approx(np.mean(v) - half) and r["ci_high"] == pytest.approx(np.mean(v) + half)
    assert np.isnan(interval([0.5])["ci_low"])
    with pytest.raises(ValueError):
        interval([])


def _preds(rng, n_dialogues=40, turns=8, seeds=(0, 1, 2), gain=0.0, same=False, dialogue_effect=0.0):
    rows = []
    for s in seeds:
        for d in range(n_dialogues):
            shift = rng.normal(0, dialogue_effect)
            for t in range(turns):
                y = int(rng.integers(4))
                p_ref = 0.5
                ref_ok = rng.random() < p_ref
                ok = ref_ok if same else rng.random() < p_ref + gain + shift  # per-dialogue gain
                for method, correct in (("lora", ref_ok), ("mal", ok)):
                    pred = y if correct else (y + 1) % 4
                    rows.append(dict(method=method, task="t", backbone="b", fold=0, seed=s, dialogue_id=f"d{d}",
                                     utterance_id=f"d{d}-{t}", label=LABELS[y], prediction=LABELS[pred],
                                     correct=int(correct)))
    return pd.DataFrame(rows)


def test_identical_systems_give_p_near_one_and_a_zero_interval():
    res = compare(_preds(np.random.default_rng(0), same=True), "mal", "lora", LABELS, n_resamples=300)
    assert res["dialogues"]["wilcoxon_p"] == 1.0 and res["mcnemar"]["p_value"] == pytest.approx(1.0)
    for m in ("wa", "ua", "wf1", "macro_f1"):
        b = res["bootstrap"][m]
        assert b["diff"] == 0.0 and b["ci_low"] == 0.0 and b["ci_high"] == 0.0


def test_a_planted_difference_is_found():
    res = compare(_preds(np.random.default_rng(1), gain=0.2), "mal", "lora", LABELS, n_resamples=500)
    assert res["bootstrap"]["wa"]["diff"] == pytest.approx(0.2, abs=0.05)
    assert res["bootstrap"]["wa"]["ci_low"] > 0.1
    assert res["dialogues"]["wilcoxon_p"] < 1e-4 and res["mcnemar"]["p_value"] < 1e-4
    assert res["dialogues"]["rank_biserial"] > 0.5
    assert res["n_cells"] == 3 and res["n_dialogues"] == 40 and res["n_utterances"] == 3 * 40 * 8
    assert res["cells"]["primary"] == "paired_t" and res["cells"]["primary_p"] < 0.05


def test_dialogue_bootstrap_is_wider_than_utterance_bootstrap_on_correlated_data():
    df = _preds(np.random.default_rng(2), seeds=(0,), dialogue_effect=0.3, gain=0.0)
    j = df[df.method == "mal"].reset_index(drop=True)
    r = df[df.method == "lora"].reset_index(drop=True)
    idx = {lab: i for i, lab in enumerate(LABELS)}
    y, pa, pb = j.label.map(idx).to_numpy(), j.prediction.map(idx).to_numpy(), r.prediction.map(idx).to_numpy()
    # correlated: the method's gain over the reference differs from dialogue to dialogue
    clus = cluster_bootstrap(y, pa, pb, j.dialogue_id.to_numpy(), 4, n_resamples=1000)["wa"]
    utt = utterance_bootstrap_ci(y, pa, pb, 4, n_resamples=1000)["wa"]
    assert clus["ci_high"] - clus["ci_low"] > 1.2 * (utt["ci_high"] - utt["ci_low"])


def test_holm_known_values_and_none():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = holm([0.01, None, 0.02])
    assert out[1] is None and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.02)


def test_compare_without_shared_utterances_raises():
    df = _preds(np.random.default_rng(0), n_dialogues=2)
    df.loc[df.method == "mal", "seed"] += 10
    with pytest.raises(ValueError, match="share no test utterance"):
        compare(df, "mal", "lora", LABELS)
