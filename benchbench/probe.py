"""Linear probe of a backbone's frozen audio path: what its fixed audio features say about emotion.

A method's score on a backbone mixes what the audio path carries with what training extracts from
it. The probe measures the first alone: per fold, each scored utterance's audio features
(:meth:`benchbench.backbone.AudioLLMBackbone.audio_features`, ``[T, F]``) mean-pooled over time to
``[F]``, standardised on the training split, then a multinomial logistic regression (scikit-learn)
trained on ``train``, its inverse regularisation strength ``C`` chosen on ``dev`` UA from
:data:`C_GRID`, and scored once on ``test`` (WA / UA / WF1 / Macro-F1, :func:`compute_metrics`).
Test labels are read only to score; no context, no LM, no LoRA.

What the features are depends on the backbone: the audio-token embeddings the LM reads where the
projector is frozen (F = D, the LM width), the projector's *input* where it trains with each method
(the Ultravox compositions: 8 stacked Whisper frames, F = 8 x 384). On those, a probe above a
method's score says the audio carries more than the trained projector + LM extract.

Run: ``bench probe --tasks emodb --data-dir DIR --backbone NAME [--folds 0,1] [--output probe.csv]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .data import Dialogue
from .metrics import compute_metrics

C_GRID = (0.001, 0.01, 0.1, 1.0)
"""The logistic regression's inverse regularisation strengths tried on dev (the first of the best
dev UA kept: the strongest regularisation among ties)."""

COLUMNS = ("task", "backbone", "fold", "feature_dim", "n_train", "n_dev", "n_test", "C", "dev_ua",
           "wa", "ua", "wf1", "macro_f1")
"""The columns of :func:`probe_task`'s rows (and of ``bench probe --output``)."""

METRIC_NAMES = {"wa": "WA", "ua": "UA", "wf1": "WF1", "macro_f1": "Macro-F1"}


def pooled_features(backbone, dialogues: Sequence[Dialogue]) -> tuple[np.ndarray, np.ndarray]:
    """The scored utterances of ``dialogues`` as ``X [N, F]`` (their audio features mean-pooled over
    the time axis, float64) and labels ``y [N]`` (class indices); context-only utterances are left
    out. ``ValueError`` when none is scored."""
    X, y = [], []
    for d in dialogues:
        for u in d.utterances:
            if u.scored:
                X.append(backbone.audio_features(u.input).double().mean(0).numpy())
                y.append(u.label)
    if not X:
        raise ValueError(f"no scored utterance among {len(dialogues)} dialogues")
    return np.stack(X), np.asarray(y)


def probe_fold(backbone, fold, labels: Sequence[str]) -> dict:
    """One fold's probe (module docstring): the C chosen on dev, its dev UA and the test metrics (as
    fractions). Raises ``ValueError`` when a split has no scored utterance or train holds one class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (Xtr, ytr), (Xdv, ydv), (Xte, yte) = (pooled_features(backbone, s) for s in (fold.train, fold.dev, fold.test))
    if len(np.unique(ytr)) < 2:
        raise ValueError(f"fold {fold.index}: the training split holds one class only")
    best = None
    for C in C_GRID:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
        clf.fit(Xtr, ytr)
        dev_ua = compute_metrics(ydv, clf.predict(Xdv), labels)["ua"]  # the suite's UA, as every method's dev
        if best is None or dev_ua > best[0]:
            best = (dev_ua, C, clf)
    dev_ua, C, clf = best
    scores = compute_metrics(yte, clf.predict(Xte), labels)
    return {"fold": fold.index, "feature_dim": Xtr.shape[1], "n_train": len(ytr), "n_dev": len(ydv),
            "n_test": len(yte), "C": C, "dev_ua": dev_ua,
            **{k: scores[k] for k in ("wa", "ua", "wf1", "macro_f1")}}


def probe_task(task, backbone, folds: Sequence[int] | None = None, progress=None) -> list[dict]:
    """:func:`probe_fold` for each of ``task``'s folds (``folds``: a subset of fold indices), each row
    with the task's and backbone's names (:data:`COLUMNS`). ``progress(text)`` is called per fold."""
    rows = []
    for fold in task.folds():
        if folds is not None and fold.index not in folds:
            continue
        row = {"task": task.name, "backbone": backbone.name, **probe_fold(backbone, fold, task.labels)}
        rows.append({k: row[k] for k in COLUMNS})
        if progress:
            progress(f"[{task.name} fold {fold.index}] C={row['C']} dev UA {100 * row['dev_ua']:.1f} "
                     f"test WA {100 * row['wa']:.2f} UA {100 * row['ua']:.2f}")
    return rows


def format_probe(rows: Sequence[dict]) -> str:
    """The rows as a text table per task and backbone: per fold WA / UA / WF1 / Macro-F1 (%) and
    the chosen C, then mean ± standard deviation over the folds."""
    import pandas as pd

    df = pd.DataFrame(list(rows), columns=list(COLUMNS))
    out = []
    for (task, backbone), g in df.groupby(["task", "backbone"], sort=False):
        out.append(f"linear probe of the audio features: {task} · {backbone} "
                   f"(feature width {g['feature_dim'].iloc[0]})")
        t = g[["fold", "C", "dev_ua", "wa", "ua", "wf1", "macro_f1"]].copy()
        for k in ("dev_ua", *METRIC_NAMES):
            t[k] = (100 * t[k]).round(2)
        out.append(t.to_string(index=False))
        spread = (lambda v: f" ± {v.std(ddof=1):.2f}") if len(g) > 1 else (lambda v: "")
        out.append(f"mean over {len(g)} fold(s): " + ", ".join(
            f"{name} {100 * g[k].mean():.2f}{spread(100 * g[k])}" for k, name in METRIC_NAMES.items()))
    return "\n".join(out)
