"""Statistics for honest comparisons: intervals over seeds x folds and paired tests between methods.

Units. Test dialogues are the independent units on the same test utterances (utterances of one
dialogue are correlated: resampling utterances would overstate significance); seed x fold cells are
the units across training randomness. All metrics are fractions in [0, 1]; differences are
``method - reference``.

* :func:`interval`: mean, sd and a 95% Student-t interval over seeds x folds (``scipy.stats.t``).
* :func:`cluster_bootstrap`: percentile intervals for the difference in WA / UA / WF1 / Macro-F1,
  resampling whole test dialogues (``scipy.stats.bootstrap``, vectorised over summed per-dialogue
  confusion matrices).
* :func:`compare`: the paired comparison of two methods' predictions: the dialogue bootstrap, an
  exact/chi-square McNemar test on per-utterance correctness (``statsmodels``; it treats
  utterances as independent, so read it beside the bootstrap), a Wilcoxon signed-rank test over
  dialogues with its matched-pairs rank-biserial effect size, and over seed x fold cells a Wilcoxon
  signed-rank test and a paired t-test with Cohen's d_z (with fewer than 6 cells the Wilcoxon test
  cannot reach p < 0.05, so the t-test is the primary cell-level test there, and the result says so).
* :func:`paired_difference`: a difference as the mean over seed x fold cells (the tables' averaging)
  with a bootstrap over test dialogues resampled within folds (seeds averaged within a dialogue) and
  a Student-t interval over folds; :func:`history_slope`: the slope of a difference over the speaker's
  earlier utterances, on the same units.
* :func:`holm`: Holm's step-down correction over a family of p-values (``statsmodels``); the family is
  declared per task x backbone (:func:`family_name`).
"""

from __future__ import annotations

import warnings
from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from .metrics import METRICS

MIN_CELLS_FOR_WILCOXON = 6  # n = 5 pairs: the smallest exact two-sided Wilcoxon p is 0.0625


def interval(values: Sequence[float], confidence: float = 0.95,
             bounds: tuple[float, float] | None = None) -> dict:
    """``{"mean", "sd", "n", "ci_low", "ci_high"}`` of values (Student-t interval; NaN bounds if n < 2).

    ``bounds``: the quantity's range (e.g. ``(0, 1)`` for a metric); the interval is clipped to it.
    """
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("interval of no values")
    mean, n = float(v.mean()), int(v.size)
    if n < 2:
        return {"mean": mean, "sd": 0.0, "n": n, "ci_low": float("nan"), "ci_high": float("nan")}
    sd = float(v.std(ddof=1))
    lo, hi = stats.t.interval(confidence, n - 1, loc=mean, scale=sd / np.sqrt(n)) if sd > 0 else (mean, mean)
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "sd": sd, "n": n, "ci_low": float(lo), "ci_high": float(hi)}


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """WA, UA, WF1, Macro-F1 from confusion matrices ``[..., C, C]`` (rows truth), as in
    :func:`benchbench.metrics.compute_metrics` (UA over classes present in the truth; F1 of an
    absent, never-predicted class is 0). Returns arrays of shape ``[...]``."""
    cm = np.asarray(cm, dtype=float)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(-1), cm.sum(-2)
    total = support.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
        present = (support > 0).sum(-1)
        return {"wa": tp.sum(-1) / total, "ua": recall.sum(-1) / present,
                "wf1": (f1 * support).sum(-1) / total, "macro_f1": f1.mean(-1)}


def _per_dialogue_confusions(y_true, y_pred, clusters, n_classes) -> tuple[np.ndarray, np.ndarray]:
    """``(cluster ids [G], confusion counts [G, C, C])``."""
    ids, inv = np.unique(clusters, return_inverse=True)
    cms = np.zeros((len(ids), n_classes, n_classes))
    np.add.at(cms, (inv, y_true, y_pred), 1.0)
    return ids, cms


def cluster_bootstrap(y_true, pred_a, pred_b, clusters, n_classes: int, n_resamples: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> dict[str, dict]:
    """Dialogue-cluster bootstrap of ``metric(pred_a) - metric(pred_b)`` for every metric.

    Args: integer arrays ``[N]`` over the same utterances (rows of several seeds may repeat an
    utterance: a dialogue id then covers all its rows); ``clusters`` ``[N]`` the dialogue ids.
    Returns per metric ``{"diff", "ci_low", "ci_high", "se"}`` (percentile interval).
    """
    y_true, pred_a, pred_b = (np.asarray(x, dtype=int) for x in (y_true, pred_a, pred_b))
    _, cm_a = _per_dialogue_confusions(y_true, pred_a, clusters, n_classes)
    _, cm_b = _per_dialogue_confusions(y_true, pred_b, clusters, n_classes)
    full_a, full_b = metrics_from_confusion(cm_a.sum(0)), metrics_from_confusion(cm_b.sum(0))
    full = {m: float(full_a[m] - full_b[m]) for m in METRICS}
    out = {}
    rng = np.random.default_rng(seed)
    for m in METRICS:
        def statistic(idx, axis=-1, m=m):
            idx = np.asarray(idx, dtype=int)
            return (metrics_from_confusion(cm_a[idx].sum(-3))[m] - metrics_from_confusion(cm_b[idx].sum(-3))[m])

        res = stats.bootstrap((np.arange(len(cm_a)),), statistic, vectorized=True, n_resamples=n_resamples,
                              confidence_level=confidence, method="percentile", random_state=rng)
        out[m] = {"diff": full[m], "ci_low": float(res.confidence_interval.low),
                  "ci_high": float(res.confidence_interval.high), "se": float(res.standard_error)}
    return out


def _stratified_bootstrap(samples: list[np.ndarray], statistic, n_resamples: int, confidence: float,
                          seed: int) -> tuple[float, float, float, float]:
    """``(value, ci_low, ci_high, se)`` of ``statistic(*index arrays)`` over strata (the folds):
    ``samples`` holds each stratum's unit indices ``[G_f]``; every stratum is resampled on its own
    (scipy's ``bootstrap`` with several samples, ``paired=False``), percentile interval."""
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = float(statistic(*samples))
        if not np.isfinite(value) or all(len(x) < 2 for x in samples):
            return value, float("nan"), float("nan"), float("nan")
        res = stats.bootstrap(tuple(samples), statistic, vectorized=True, paired=False, n_resamples=n_resamples,
                              confidence_level=confidence, method="percentile", batch=200,
                              random_state=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not np.isfinite(lo):  # a degenerate (constant) distribution: scipy gives NaN
            lo, hi = (float(x) for x in np.nanpercentile(res.bootstrap_distribution, [2.5, 97.5]))
    return value, lo, hi, float(res.standard_error)


def paired_difference(frame: pd.DataFrame, a: str, b: str, labels: Sequence[str], n_resamples: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> dict[str, dict]:
    """``metric(a) - metric(b)`` for WA / UA / WF1 / Macro-F1 as the **mean over seed x fold cells**
    of each cell's difference (the averaging of the tables' metric columns, so the columns subtract),
    with its intervals over the independent units (docs/statistics.md, "Units"):

    * ``ci_low`` / ``ci_high`` / ``se``: a bootstrap over **test dialogues**, resampled within each
      fold (folds are speaker groups: strata), one resampled dialogue standing for itself under every
      seed (seeds averaged within it, never counted as independent units);
    * ``fold_ci_low`` / ``fold_ci_high``: a Student-t interval over the folds' seed-averaged
      differences (``n_folds`` units; NaN with fewer than 2; read it where there are >= 5).

    ``frame``: one row per scored test utterance and seed, columns ``fold``, ``seed``, ``dialogue_id``,
    ``label`` and the predicted labels ``a`` and ``b`` (e.g. ``prediction`` and ``prediction_ref``).
    Returns per metric ``{"diff", "ci_low", "ci_high", "se", "fold_ci_low", "fold_ci_high", "n_folds",
    "n_dialogues"}`` (fractions). ``ValueError`` for an empty frame or a label outside ``labels``."""
    if frame.empty:
        raise ValueError("paired_difference of no utterances")
    index = {lab: i for i, lab in enumerate(labels)}
    y, pa, pb = (frame[c].map(index) for c in ("label", a, b))
    if y.isna().any() or pa.isna().any() or pb.isna().any():
        raise ValueError(f"paired_difference: labels or predictions ({a}, {b}) outside {list(labels)}")
    C = len(labels)
    work = frame.assign(_y=y.astype(int).to_numpy(), _a=pa.astype(int).to_numpy(), _b=pb.astype(int).to_numpy())
    strata = []
    for _, g in work.groupby("fold", sort=True):
        d_ids, d_idx = np.unique(g["dialogue_id"].astype(str).to_numpy(), return_inverse=True)
        s_ids, s_idx = np.unique(g["seed"].to_numpy(), return_inverse=True)
        cm = np.zeros((2, len(d_ids), len(s_ids), C, C))
        np.add.at(cm[0], (d_idx, s_idx, g["_y"].to_numpy(), g["_a"].to_numpy()), 1.0)
        np.add.at(cm[1], (d_idx, s_idx, g["_y"].to_numpy(), g["_b"].to_numpy()), 1.0)
        strata.append(cm)

    def fold_values(metric: str, idx_per_fold) -> list[np.ndarray]:
        out = []
        for cm, idx in zip(strata, idx_per_fold):
            A, B = cm[0][idx].sum(-4), cm[1][idx].sum(-4)              # [..., S, C, C]
            out.append(np.nanmean(metrics_from_confusion(A)[metric] - metrics_from_confusion(B)[metric], -1))
        return out

    samples = [np.arange(cm.shape[1]) for cm in strata]
    result = {}
    for m in METRICS:
        def statistic(*idx, axis=-1, m=m):
            return np.mean(fold_values(m, [np.asarray(i, dtype=int) for i in idx]), axis=0)

        value, lo, hi, se = _stratified_bootstrap(samples, statistic, n_resamples, confidence, seed)
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_fold = np.array(fold_values(m, samples), dtype=float)
        fold = interval(per_fold) if len(per_fold) else {"ci_low": float("nan"), "ci_high": float("nan")}
        result[m] = {"diff": value, "ci_low": lo, "ci_high": hi, "se": se, "fold_ci_low": fold["ci_low"],
                     "fold_ci_high": fold["ci_high"], "n_folds": int(len(per_fold)),
                     "n_dialogues": int(sum(len(x) for x in samples))}
    return result


def history_slope(frame: pd.DataFrame, a: str = "correct", b: str = "correct_ref", cap: int = 3,
                  n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """The least-squares slope of the per-utterance correctness difference ``a - b`` (0/1 columns)
    on the number of the speaker's earlier utterances in the dialogue (``speaker_history``, capped at
    ``cap``: the bins 0, 1, 2, 3+), in WA fraction per earlier utterance, pooled over seeds and folds,
    with a bootstrap interval over test dialogues resampled within folds (:func:`paired_difference`'s
    units). A memory of the speaker's history should give a positive slope; extra capacity on the
    current utterance a flat one. Returns ``{"slope", "ci_low", "ci_high", "se", "cap"}``."""
    x = frame["speaker_history"].clip(upper=cap).to_numpy(float)
    d = frame[a].to_numpy(float) - frame[b].to_numpy(float)
    work = pd.DataFrame({"fold": frame["fold"].to_numpy(), "dlg": frame["dialogue_id"].astype(str).to_numpy(),
                         "n": 1.0, "x": x, "y": d, "xx": x * x, "xy": x * d})
    strata = [g.groupby("dlg")[["n", "x", "y", "xx", "xy"]].sum().to_numpy() for _, g in work.groupby("fold", sort=True)]

    def statistic(*idx, axis=-1):
        tot = sum(st[np.asarray(i, dtype=int)].sum(-2) for st, i in zip(strata, idx))   # [..., 5]
        n, sx, sy, sxx, sxy = (tot[..., k] for k in range(5))
        return (n * sxy - sx * sy) / (n * sxx - sx * sx)

    value, lo, hi, se = _stratified_bootstrap([np.arange(len(st)) for st in strata], statistic, n_resamples,
                                              confidence, seed)
    return {"slope": value, "ci_low": lo, "ci_high": hi, "se": se, "cap": cap}


def utterance_bootstrap_ci(y_true, pred_a, pred_b, n_classes: int, **kw) -> dict[str, dict]:
    """The same bootstrap with every utterance its own cluster (too narrow on dialogue data: for
    comparison and tests only)."""
    return cluster_bootstrap(y_true, pred_a, pred_b, np.arange(len(y_true)), n_classes, **kw)


def _rank_biserial(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation of paired differences (zeros dropped)."""
    d = d[d != 0]
    if d.size == 0:
        return 0.0
    ranks = stats.rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def paired_rows(preds: pd.DataFrame, method: str, reference: str, columns: Sequence[str]) -> pd.DataFrame:
    """``method``'s rows of ``preds`` (its ``columns`` that exist) joined with ``reference``'s prediction
    and correctness (``prediction_ref``, ``correct_ref``) on the utterances both predicted (fold, seed,
    utterance_id, which lead the result); empty where they share none."""
    keys = ["fold", "seed", "utterance_id"]
    a = preds[preds["method"] == method].set_index(keys)
    b = preds[preds["method"] == reference].set_index(keys)
    ref = b[["prediction", "correct"]].rename(columns={"prediction": "prediction_ref", "correct": "correct_ref"})
    return pd.merge(a[[c for c in columns if c in a]], ref, left_index=True, right_index=True).reset_index()


def compare(preds: pd.DataFrame, method: str, reference: str, labels: Sequence[str],
            n_resamples: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of ``method`` against ``reference`` on the utterances both predicted.

    ``preds``: rows of ``predictions.csv`` (columns method, fold, seed, dialogue_id, utterance_id,
    label, prediction, correct). Raises ``ValueError`` when the two share no test utterance.
    """
    j = paired_rows(preds, method, reference, ["dialogue_id", "label", "prediction", "correct"])
    if j.empty:
        raise ValueError(f"{method} and {reference} share no test utterance (same folds and seeds?)")
    clusters = (j["fold"].astype(str) + "/" + j["dialogue_id"].astype(str)).to_numpy()
    # the difference as the mean over cells (as the tables' columns), over dialogues resampled in folds
    boot = paired_difference(j, "prediction", "prediction_ref", labels, n_resamples=n_resamples, seed=seed)

    # McNemar on per-utterance correctness, pooled over seeds x folds
    ca, cb = j["correct"].to_numpy().astype(bool), j["correct_ref"].to_numpy().astype(bool)
    only_a, only_b = int((ca & ~cb).sum()), int((~ca & cb).sum())
    table = [[int((ca & cb).sum()), only_a], [only_b, int((~ca & ~cb).sum())]]
    mc = mcnemar(table, exact=only_a + only_b < 25)

    # dialogues: mean correctness difference per dialogue (averaged over seeds)
    j = j.assign(d=ca.astype(float) - cb.astype(float), cluster=clusters)
    per_dialogue = j.groupby("cluster")["d"].mean().to_numpy()
    w_dlg = stats.wilcoxon(per_dialogue).pvalue if np.any(per_dialogue != 0) else 1.0

    # seed x fold cells: WA difference per cell
    per_cell = j.groupby(["fold", "seed"])["d"].mean()
    cells = per_cell.to_numpy()
    n_cells = len(cells)
    t_p = w_p = dz = None
    if n_cells > 1 and cells.std(ddof=1) > 0:
        t_p = float(stats.ttest_1samp(cells, 0.0).pvalue)
        dz = float(cells.mean() / cells.std(ddof=1))
    if n_cells > 1 and np.any(cells != 0):
        w_p = float(stats.wilcoxon(cells).pvalue)
    primary = "wilcoxon" if n_cells >= MIN_CELLS_FOR_WILCOXON else "paired_t"
    return {
        "method": method, "reference": reference,
        "n_utterances": int(len(j)), "n_dialogues": int(len(per_dialogue)), "n_cells": n_cells,
        "bootstrap": boot,
        "mcnemar": {"only_method_correct": only_a, "only_reference_correct": only_b,
                    "p_value": float(mc.pvalue), "exact": only_a + only_b < 25},
        "dialogues": {"wilcoxon_p": float(w_dlg), "rank_biserial": _rank_biserial(per_dialogue)},
        "cells": {"wa_diff": {f"f{f}s{s}": float(v) for (f, s), v in per_cell.items()},
                  "wilcoxon_p": w_p, "paired_t_p": t_p, "cohens_dz": dz, "primary": primary,
                  "primary_p": w_p if primary == "wilcoxon" else t_p},
    }


def holm(p_values: Sequence[float | None], alpha: float = 0.05) -> list[float | None]:
    """Holm-adjusted p-values (``statsmodels.stats.multitest.multipletests``); None stays None."""
    idx = [i for i, p in enumerate(p_values) if p is not None and np.isfinite(p)]
    out: list[float | None] = [None] * len(p_values)
    if idx:
        adjusted = multipletests([p_values[i] for i in idx], alpha=alpha, method="holm")[1]
        for i, p in zip(idx, adjusted):
            out[i] = float(p)
    return out


def family_name(task: str, backbone: str, reference: str | None, all_pairs: bool = False) -> str:
    """The declared multiple-comparison family of a published question: ``"each method against lora
    on emodb · qwen2-audio-whisper-tiny"`` (or ``"every pair of methods on ..."``)."""
    what = "every pair of methods" if all_pairs else f"each method against {reference}"
    return f"{what} on {task} · {backbone}"


def compare_all(preds: pd.DataFrame, labels_by_task: dict[str, Sequence[str]], reference: str = "lora",
                all_pairs: bool = False, n_resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Every method against ``reference`` (or every pair) per task x backbone, with Holm-adjusted
    p-values for the dialogue-level Wilcoxon test (``dialogues.wilcoxon_p_holm``) and McNemar
    (``mcnemar.p_value_holm``) over a **declared family**: the comparisons of one task x backbone
    (:func:`family_name`; each record's ``family`` holds its name and ``size``), so one comparison's
    adjusted p does not depend on the other tasks or backbones of the run."""
    out = []
    for (task, backbone), g in preds.groupby(["task", "backbone"], sort=False):
        methods = list(dict.fromkeys(g["method"]))
        if all_pairs:
            pairs = list(combinations(methods, 2))
        elif reference in methods:
            pairs = [(m, reference) for m in methods if m != reference]
        else:
            pairs = []
        for m, r in pairs:
            res = compare(g, m, r, labels_by_task[task], n_resamples=n_resamples, seed=seed)
            out.append({"task": task, "backbone": backbone, **res,
                        "family": {"name": family_name(task, backbone, reference, all_pairs), "size": len(pairs)}})
    for name in dict.fromkeys(r["family"]["name"] for r in out):
        members = [r for r in out if r["family"]["name"] == name]
        for key, sub in (("dialogues", "wilcoxon_p"), ("mcnemar", "p_value")):
            for res, p in zip(members, holm([r[key][sub] for r in members])):
                res[key][f"{sub}_holm"] = p
    return out
