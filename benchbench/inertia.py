"""Emotional inertia: a speaker's emotion carried from one of their turns to their next.

The statistics behind two things that need no trained memory: the ``hmm`` baseline (causal forward
filtering over each speaker's turns, on an utterance model's own posteriors: the emotion-inertia idea
behind ESA-CRF in the DPM paper's Table 2) and the ``label_history`` context ceiling (the same
utterance model combined with the speaker's previous *gold* label, which no method sees).

With p(y | x_i) an utterance model's posterior ``[C]``, p(y) the training class prior and
A[y', y] = P(y_i = y | the same speaker's previous scored label y') estimated on training dialogues,
both combine an utterance's evidence with a prediction from the speaker's past, pi_i(y), as

    b_i(y)  proportional to  p(y | x_i) * (pi_i(y) / p(y)) ** lambda,        lambda in [0, 1]

(lambda = 1: Bayes' rule with p(x | y) proportional to p(y | x) / p(y); lambda = 0: the utterance
model itself, returned unchanged). For ``hmm``, pi_i = b_prev A (the speaker's previous filtered
belief pushed one turn on); for the ceiling, pi_i = A[y_prev] (their previous gold label). A
speaker's first scored turn has no past: pi_i = p(y), so b_i = p(y | x_i).

"Previous" means the same speaker's previous turn with a label in the label set within the dialogue
(utterances outside it, IEMOCAP's fru, ..., are skipped), in the training statistics and at test alike.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .data import UNSCORED, Dialogue


def speaker_transitions(dialogues: Sequence[Dialogue], n_classes: int, smoothing: float = 1.0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``(A [C, C], prior [C])`` from labelled dialogues: A's row y' is the distribution of a speaker's
    label given their previous scored label y' (counts + ``smoothing``, rows summing to 1); ``prior``
    the scored labels' class frequencies (+ ``smoothing``). ``ValueError`` for ``smoothing < 0`` or
    an empty row or prior without smoothing."""
    if smoothing < 0:
        raise ValueError(f"transition smoothing {smoothing}: expected >= 0")
    counts = np.full((n_classes, n_classes), float(smoothing))
    prior = np.full(n_classes, float(smoothing))
    for d in dialogues:
        last: dict[str, int] = {}
        for u in d.utterances:
            if u.label == UNSCORED:
                continue
            prior[u.label] += 1
            if u.speaker in last:
                counts[last[u.speaker], u.label] += 1
            last[u.speaker] = u.label
    if (counts.sum(1) == 0).any() or prior.sum() == 0:
        raise ValueError("transition statistics: a class never seen and no smoothing (pass smoothing > 0)")
    return counts / counts.sum(1, keepdims=True), prior / prior.sum()


def combine(probs: np.ndarray, pi: np.ndarray, prior: np.ndarray, strength: float) -> np.ndarray:
    """``p(y|x) * (pi / prior) ** strength``, normalised; ``[..., C]`` arrays. ``strength = 0``
    returns ``probs`` itself (bit for bit)."""
    if strength == 0:
        return probs
    b = probs * (pi / prior) ** strength
    return b / b.sum(-1, keepdims=True)


def forward_filter(probs: np.ndarray, speakers: Sequence[str], A: np.ndarray, prior: np.ndarray,
                   strength: float, belief: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """``hmm``'s causal filter over one dialogue: ``probs [N, C]`` (the utterance model's posteriors in
    turn order), ``speakers [N]``; returns ``b [N, C]``, b_i from turns <= i only (the speaker's own
    earlier beliefs). ``belief``: each speaker's belief after their last turn so far (``None``: a fresh
    dialogue), updated in place, so a dialogue streamed turn by turn gets what it gets whole.
    ``strength = 0``: ``probs`` unchanged. ``ValueError`` unless there is one speaker per turn."""
    if len(speakers) != len(probs):
        raise ValueError(f"forward filter: {len(speakers)} speakers for {len(probs)} turns (one speaker per turn)")
    if strength == 0:
        return probs
    out = np.empty_like(probs)
    belief = {} if belief is None else belief
    for i, (p, s) in enumerate(zip(probs, speakers)):
        pi = belief[s] @ A if s in belief else prior
        out[i] = combine(p, pi, prior, strength)
        belief[s] = out[i]
    return out


def previous_labels(speakers: Sequence[str], labels: Sequence[int]) -> np.ndarray:
    """``[N]`` the same speaker's previous scored label of each turn of one dialogue (``UNSCORED``
    where there is none); turns in order, ``labels`` with ``UNSCORED`` for unscored turns."""
    out = np.full(len(labels), UNSCORED)
    last: dict[str, int] = {}
    for i, (s, y) in enumerate(zip(speakers, labels)):
        out[i] = last.get(s, UNSCORED)
        if y != UNSCORED:
            last[s] = int(y)
    return out


def label_history_posteriors(probs: np.ndarray, previous: np.ndarray, A: np.ndarray, prior: np.ndarray,
                             strength: float) -> np.ndarray:
    """The ``label_history`` ceiling's posteriors ``[N, C]``: ``probs [N, C]`` combined with each
    turn's previous gold label ``previous [N]`` (``UNSCORED``: none, the turn keeps ``probs``)."""
    if strength == 0:
        return probs
    pi = np.where((previous >= 0)[:, None], A[np.maximum(previous, 0)], prior[None, :])
    return combine(probs, pi, prior, strength)
