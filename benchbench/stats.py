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
* :func:`holm`: Holm's step-down correction over a family of p-values (``statsmodels``).
"""

from __future__ import annotations

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


def compare(preds: pd.DataFrame, method: str, reference: str, labels: Sequence[str],
            n_resamples: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of ``method`` against ``reference`` on the utterances both predicted.

    ``preds``: rows of ``predictions.csv`` (columns method, fold, seed, dialogue_id, utterance_id,
    label, prediction, correct). Raises ``ValueError`` when the two share no test utterance.
    """
    keys = ["fold", "seed", "utterance_id"]
    a = preds[preds["method"] == method].set_index(keys)
    b = preds[preds["method"] == reference].set_index(keys)
    j = pd.merge(a[["dialogue_id", "label", "prediction", "correct"]], b[["prediction", "correct"]],
                 left_index=True, right_index=True, how="inner", suffixes=("", "_ref")).reset_index()
    if j.empty:
        raise ValueError(f"{method} and {reference} share no test utterance (same folds and seeds?)")
    index = {lab: i for i, lab in enumerate(labels)}
    y, pa, pb = (j[c].map(index).to_numpy() for c in ("label", "prediction", "prediction_ref"))
    clusters = (j["fold"].astype(str) + "/" + j["dialogue_id"].astype(str)).to_numpy()
    boot = cluster_bootstrap(y, pa, pb, clusters, len(labels), n_resamples=n_resamples, seed=seed)

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


def compare_all(preds: pd.DataFrame, labels_by_task: dict[str, Sequence[str]], reference: str = "lora",
                all_pairs: bool = False, n_resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Every method against ``reference`` (or every pair) per task x backbone, with Holm-adjusted
    p-values over the whole family for the dialogue-level Wilcoxon test (``dialogues.wilcoxon_p_holm``)
    and McNemar (``mcnemar.p_value_holm``)."""
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
            out.append({"task": task, "backbone": backbone, **res})
    for key, sub in (("dialogues", "wilcoxon_p"), ("mcnemar", "p_value")):
        for res, p in zip(out, holm([r[key][sub] for r in out])):
            res[key][f"{sub}_holm"] = p
    return out
