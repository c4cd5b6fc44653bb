"""SER metrics (scikit-learn) and streaming evaluation.

WA = accuracy; UA = unweighted average recall (``balanced_accuracy_score``); WF1 = support-weighted
F1; Macro-F1 = unweighted mean F1 over all classes of the task (classes absent from both truth and
prediction count as F1 0 via ``zero_division=0``, so every class is always in the denominator).
All values are fractions in [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, recall_score

from .data import Dialogue

METRICS = ("wa", "ua", "wf1", "macro_f1")


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """WA, UA, WF1, Macro-F1 and per-class F1 (``f1_<label>``) of integer class predictions ``[N]``."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"need equal-length non-empty 1-D arrays, got {y_true.shape} and {y_pred.shape}")
    idx = list(range(len(labels)))
    present = sorted(set(y_true.tolist()))
    out = {
        "wa": float(accuracy_score(y_true, y_pred)),
        # UA over the classes present in the truth (balanced accuracy's definition)
        "ua": float(balanced_accuracy_score(y_true, y_pred)) if len(present) > 1
        else float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "wf1": float(f1_score(y_true, y_pred, labels=idx, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=idx, average="macro", zero_division=0)),
    }
    per_class = f1_score(y_true, y_pred, labels=idx, average=None, zero_division=0)
    out.update({f"f1_{lab}": float(v) for lab, v in zip(labels, per_class)})
    return out


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Confusion matrix ``[C, C]`` (rows: truth, columns: prediction)."""
    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def stream_predict(method, dialogues: Sequence[Dialogue]) -> list[np.ndarray]:
    """Per dialogue, probabilities ``[N_d, C]`` from the method's streaming evaluation.

    Through :meth:`ContextMethod.predict_dialogues` (each dialogue from a fresh state; the method may
    batch across dialogues). Only the label-free inputs (:meth:`Dialogue.inputs`) are handed to the method; every utterance
    of the stream is predicted, the context-only (unscored) ones included.
    """
    inputs = [d.inputs() for d in dialogues]
    if hasattr(method, "predict_dialogues"):  # a ContextMethod: it may batch across dialogues
        return [np.asarray(p) for p in method.predict_dialogues(inputs)]
    return [np.asarray(method.predict_dialogue(u)) for u in inputs]


def scored_only(dialogues: Sequence[Dialogue], probs: Sequence[np.ndarray]):
    """The scored utterances of streamed dialogues: ``(labels [N_s], probabilities [N_s, C],
    mask [N])``, N counting every utterance of the streams (context-only ones included) and N_s the
    scored ones; ``probs`` as from :func:`stream_predict`."""
    keep = np.concatenate([d.scored for d in dialogues])
    return np.concatenate([d.labels for d in dialogues])[keep], np.concatenate(probs)[keep], keep


def evaluate(method, dialogues: Sequence[Dialogue], labels: Sequence[str]) -> dict[str, float]:
    """Metrics of a method streamed over labelled dialogues (used for dev-set model selection)."""
    y_true, p, _ = scored_only(dialogues, stream_predict(method, dialogues))
    return compute_metrics(y_true, p.argmax(-1), labels)
