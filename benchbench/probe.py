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

Where the projector trains with each method, :func:`probe_projector` probes its *output* as well (the
audio-token embeddings ``[T, D]`` the LM reads, :meth:`benchbench.backbone.EmotionLM.embed_audio`,
mean-pooled to ``[D]``): at the seed's random initialisation and after ``lora``'s training of the
fold and seed (its alignment stage and task LoRA, replayed from the Phase-1 cache where that ``lora``
cell ran before). Input, initial output and trained output side by side say where emotion is lost:
in the projector's width (input > initial output), or not recovered by its training (trained output
< input), or in what the LM makes of well-separated audio tokens (trained output > the method's score).

Run: ``bench probe --tasks emodb --data-dir DIR --backbone NAME [--folds 0,1] [--output probe.csv]``;
``--projector --seeds 0,1,2`` for the projector's output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .data import Dialogue
from .metrics import compute_metrics

C_GRID = (0.001, 0.01, 0.1, 1.0)
"""The logistic regression's inverse regularisation strengths tried on dev (the first of the best
dev UA kept: the strongest regularisation among ties)."""

FEATURES = {"audio": "audio features",
            "projector-init": "projector's output at its random initialisation",
            "projector-lora": "projector's output after lora's training"}
"""What a row's ``features`` column names: the backbone's audio features (:func:`probe_task`) or the
trainable projector's output before and after ``lora``'s training (:func:`probe_projector`)."""

COLUMNS = ("task", "backbone", "features", "seed", "fold", "feature_dim", "n_train", "n_dev", "n_test", "C", "dev_ua",
           "wa", "ua", "wf1", "macro_f1")
"""The columns of :func:`probe_task`'s rows (and of ``bench probe --output``)."""

METRIC_NAMES = {"wa": "WA", "ua": "UA", "wf1": "WF1", "macro_f1": "Macro-F1"}

Embed = Callable[[torch.Tensor], torch.Tensor]
"""Maps an utterance's audio features ``[T, F]`` to what is probed, ``[T, D]`` (the projector's output)."""


def pooled_features(backbone, dialogues: Sequence[Dialogue], embed: Embed | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The scored utterances of ``dialogues`` as ``X [N, F]`` (their audio features, or ``embed`` of
    them (``[T, F]`` to ``[T, D]``, without gradient; then ``F = D``), mean-pooled over the time axis,
    float64) and labels ``y [N]`` (class indices); context-only utterances are left out.
    ``ValueError`` when none is scored."""
    X, y = [], []
    for d in dialogues:
        for u in d.utterances:
            if u.scored:
                f = backbone.audio_features(u.input)
                if embed is not None:
                    with torch.no_grad():
                        f = embed(f)
                X.append(f.detach().double().mean(0).cpu().numpy())
                y.append(u.label)
    if not X:
        raise ValueError(f"no scored utterance among {len(dialogues)} dialogues")
    return np.stack(X), np.asarray(y)


def probe_fold(backbone, fold, labels: Sequence[str], embed: Embed | None = None) -> dict:
    """One fold's probe (module docstring) of the audio features, or of ``embed`` of them
    (:func:`pooled_features`): the C chosen on dev, its dev UA and the test metrics (as fractions).
    Raises ``ValueError`` when a split has no scored utterance or train holds one class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (Xtr, ytr), (Xdv, ydv), (Xte, yte) = (pooled_features(backbone, s, embed) for s in (fold.train, fold.dev, fold.test))
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
        row = {"task": task.name, "backbone": backbone.name, "features": "audio", "seed": None,
               **probe_fold(backbone, fold, task.labels)}
        rows.append({k: row[k] for k in COLUMNS})
        if progress:
            progress(f"[{task.name} fold {fold.index}] C={row['C']} dev UA {100 * row['dev_ua']:.1f} "
                     f"test WA {100 * row['wa']:.2f} UA {100 * row['ua']:.2f}")
    return rows


def probe_projector(cell, progress: Callable[[str], None] | None = None) -> list[dict]:
    """The projector's output probed at the seed's initialisation and after ``lora``'s training, for
    one ``lora`` cell (:class:`benchbench.cells.Cell`: its task, fold, seed, backbone, preset and torch
    threads): two rows (:data:`COLUMNS`, ``features`` ``projector-init`` and ``projector-lora``).

    The training is the cell's own, as ``bench run`` computes it (same seed, config and RNG states, so
    the Phase-1 cache replays it where that ``lora`` cell ran before, and trains it otherwise); the
    initial projector is the method's copy before ``fit``, restored after the trained one is probed.
    ``progress(text)`` gets the training's progress and one line per probe.

    Raises:
        ValueError: the backbone's projector is frozen (:attr:`AudioLLMBackbone.trainable_projector`
        is false: :func:`probe_task` probes its output already), or the cell's method is not ``lora``.
    """
    from .cells import torch_threads
    from .method import METHODS
    from .training import seed_everything

    backbone = cell.backbone
    if not backbone.trainable_projector:
        raise ValueError(f"backbone {backbone.name}: its projector is frozen inside the audio path; "
                         "probe_task probes its output")
    if cell.method != "lora":
        raise ValueError(f"probe_projector takes a lora cell, got {cell.method}")
    say = progress or (lambda text: None)
    rows = []
    with torch_threads(cell.threads):
        backbone.lm_key  # hashed outside the training, as compute_cell does
        with backbone.lend_lm():
            seed_everything(cell.seed)
            method = METHODS.get("lora")(backbone, cell.task.labels, cell.config, seed=cell.seed)
            projector = method.lm.audio_projector
            initial = {k: v.detach().clone() for k, v in projector.state_dict().items()}
            method.fit(cell.fold.train, cell.fold.dev,
                       progress=lambda text, metrics=None: say(f"[{cell.name}] {text}"))
            for features in ("projector-lora", "projector-init"):
                if features == "projector-init":
                    projector.load_state_dict(initial)
                row = {"task": cell.task.name, "backbone": cell.backbone_name, "features": features,
                       "seed": cell.seed, **probe_fold(backbone, cell.fold, cell.task.labels, embed=method.lm.embed_audio)}
                rows.append({k: row[k] for k in COLUMNS})
                say(f"[{cell.task.name} seed {cell.seed} fold {cell.fold.index}] {FEATURES[features]}: "
                    f"C={row['C']} dev UA {100 * row['dev_ua']:.1f} test WA {100 * row['wa']:.2f} "
                    f"UA {100 * row['ua']:.2f}")
    return rows[::-1]  # initial first


def format_probe(rows: Sequence[dict]) -> str:
    """The rows as a text table per task, backbone and features (:data:`FEATURES`): per fold (and
    seed, for the projector's output) WA / UA / WF1 / Macro-F1 (%) and the chosen C, then mean ±
    standard deviation over the rows."""
    import pandas as pd

    df = pd.DataFrame(list(rows), columns=list(COLUMNS))
    df["features"] = df["features"].fillna("audio")
    out = []
    for (task, backbone, features), g in df.groupby(["task", "backbone", "features"], sort=False):
        out.append(f"linear probe of the {FEATURES.get(features, features)}: {task} · {backbone} "
                   f"(feature width {g['feature_dim'].iloc[0]})")
        seeded = g["seed"].notna().any()
        t = g[(["seed"] if seeded else []) + ["fold", "C", "dev_ua", "wa", "ua", "wf1", "macro_f1"]].copy()
        if seeded:
            t["seed"] = t["seed"].astype(int)
        for k in ("dev_ua", *METRIC_NAMES):
            t[k] = (100 * t[k]).round(2)
        out.append(t.to_string(index=False))
        spread = (lambda v: f" ± {v.std(ddof=1):.2f}") if len(g) > 1 else (lambda v: "")
        over = (f"{len(g)} cells ({g['seed'].nunique()} seed(s) x {g['fold'].nunique()} fold(s))" if seeded
                else f"{len(g)} fold(s)")
        out.append(f"mean over {over}: " + ", ".join(
            f"{name} {100 * g[k].mean():.2f}{spread(100 * g[k])}" for k, name in METRIC_NAMES.items()))
    return "\n".join(out)
