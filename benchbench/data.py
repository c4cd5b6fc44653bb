"""The task format every task produces and every method consumes.

Data flows one way: task -> dialogues -> backbone features -> method -> predictions.

A :class:`Dialogue` is an ordered stream of :class:`Utterance` (turn order). Methods are trained on
labelled dialogues, but at evaluation they only ever receive :class:`UtteranceInput` objects, which
have no label field at all: a test label cannot be reached through them.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass(frozen=True, eq=False)
class UtteranceInput:
    """What a method may see of one utterance at evaluation time (no label).

    Attributes:
        utterance_id: unique id within the task (e.g. ``"03a01Wa"`` or ``"syn-d0012-t03"``).
        dialogue_id: id of the dialogue this utterance belongs to.
        turn: 0-based position in the dialogue.
        speaker: speaker id, unique within the task (speaker identity is an input in ERC, not a label).
        waveform: mono float32 samples in [-1, 1], shape ``[n_samples]``.
        sample_rate: samples per second of ``waveform`` (Hz); backbones resample as they need.
    """

    utterance_id: str
    dialogue_id: str
    turn: int
    speaker: str
    waveform: np.ndarray = field(repr=False)
    sample_rate: int

    @property
    def duration_s(self) -> float:
        """Duration in seconds."""
        return len(self.waveform) / self.sample_rate

    @cached_property
    def audio_sha256(self) -> str:
        """Hash of the audio content (samples and sample rate); keys the feature cache."""
        h = hashlib.sha256()
        h.update(str(self.sample_rate).encode())
        h.update(np.ascontiguousarray(self.waveform, dtype=np.float32).tobytes())
        return h.hexdigest()


UNSCORED = -1
"""Label of an utterance that is in the dialogue stream as context but outside the task's label set
(IEMOCAP's fru, sur, xxx, ...): methods see it at evaluation like any other utterance, it is never
a training target and never scored."""


@dataclass(frozen=True, eq=False)
class Utterance:
    """A labelled utterance: the input plus its emotion class index (into ``Task.labels``), or
    :data:`UNSCORED` for a context-only utterance."""

    input: UtteranceInput
    label: int

    @property
    def scored(self) -> bool:
        """Whether the utterance is a training target and counts in the metrics."""
        return self.label != UNSCORED

    @property
    def utterance_id(self) -> str:
        return self.input.utterance_id

    @property
    def speaker(self) -> str:
        return self.input.speaker


@dataclass(frozen=True, eq=False)
class Dialogue:
    """An ordered, labelled utterance stream ``D = (x_1..x_N)`` with labels ``(y_1..y_N)``."""

    dialogue_id: str
    utterances: tuple[Utterance, ...]

    def __post_init__(self):
        if not self.utterances:
            raise ValueError(f"dialogue {self.dialogue_id!r} has no utterances")
        for i, u in enumerate(self.utterances):
            if u.input.turn != i or u.input.dialogue_id != self.dialogue_id:
                raise ValueError(
                    f"dialogue {self.dialogue_id!r}: utterance {u.utterance_id!r} has turn "
                    f"{u.input.turn} / dialogue {u.input.dialogue_id!r}, expected turn {i}"
                )

    def __len__(self) -> int:
        return len(self.utterances)

    def inputs(self) -> tuple[UtteranceInput, ...]:
        """The label-free view handed to methods at evaluation."""
        return tuple(u.input for u in self.utterances)

    @property
    def labels(self) -> np.ndarray:
        """Class indices, shape ``[N]`` (:data:`UNSCORED` for context-only utterances)."""
        return np.array([u.label for u in self.utterances], dtype=np.int64)

    @property
    def scored(self) -> np.ndarray:
        """Boolean mask ``[N]`` of the utterances that are scored."""
        return self.labels != UNSCORED

    @property
    def speakers(self) -> tuple[str, ...]:
        return tuple(sorted({u.speaker for u in self.utterances}))


@dataclass(frozen=True)
class Fold:
    """One train/dev/test partition.

    Test speakers never appear in ``train`` or ``dev`` (``ValueError`` otherwise), unless the
    corpus's standard split is not speaker-independent (MELD: the Friends cast is in every split),
    which the task states with ``speaker_independent=False`` (recorded in the manifest).
    """

    index: int
    train: tuple[Dialogue, ...]
    dev: tuple[Dialogue, ...]
    test: tuple[Dialogue, ...]
    speaker_independent: bool = True

    def __post_init__(self):
        if not self.speaker_independent:
            return
        test_spk = {s for d in self.test for s in d.speakers}
        seen = {s for d in self.train + self.dev for s in d.speakers}
        if test_spk & seen:
            raise ValueError(f"fold {self.index}: test speakers {sorted(test_spk & seen)} also in train/dev")


def manifest_of(dialogues: Sequence[Dialogue], labels: Sequence[str] | None = None) -> dict:
    """Counts (dialogues, utterances, scored utterances, and per class when ``labels`` is given)
    and a content hash of a set of dialogues (ids, turns, speakers, labels, audio)."""
    h = hashlib.sha256()
    n_utt = 0
    for d in dialogues:
        for u in d.utterances:
            h.update(f"{d.dialogue_id}|{u.input.turn}|{u.utterance_id}|{u.speaker}|{u.label}|".encode())
            h.update(u.input.audio_sha256.encode())
            n_utt += 1
    y = np.concatenate([d.labels for d in dialogues]) if dialogues else np.zeros(0, dtype=np.int64)
    out = {"n_dialogues": len(dialogues), "n_utterances": n_utt, "n_scored": int((y != UNSCORED).sum())}
    if labels is not None:
        out["per_class"] = {lab: int((y == i).sum()) for i, lab in enumerate(labels)}
    out["sha256"] = h.hexdigest()
    return out


def hash_json(obj) -> str:
    """Stable sha256 of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def speaker_history_counts(utterances: Sequence[UtteranceInput]) -> list[int]:
    """For each utterance of a dialogue (turn order), how many earlier utterances of the same speaker
    it has (context-only ones included)."""
    seen: dict[str, int] = {}
    out = []
    for u in utterances:
        out.append(seen.get(u.speaker, 0))
        seen[u.speaker] = out[-1] + 1
    return out


def default_cache_dir() -> Path:
    """``$BENCHBENCH_CACHE`` or ``~/.cache/benchbench``: audio features per backbone and generated
    task data live under it."""
    return Path(os.environ.get("BENCHBENCH_CACHE", Path.home() / ".cache" / "benchbench"))
