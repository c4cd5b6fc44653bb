"""``emodb``: real emotional speech (Emo-DB) composed into IEMOCAP-shaped two-speaker dialogues.

Emo-DB (Burkhardt et al., Interspeech 2005; free for research): http://emodb.bilderbar.info/
(download.zip, folder ``wav/``). Point ``--data-dir`` at the folder that holds ``wav/`` (or at
``wav/`` itself). Any sample rate is accepted (the original is 16 kHz, 1.2-9 s clips; the copy in
``../shared/data/emodb`` is 22.05 kHz cut/padded to 2.0 s); the backbone resamples.

Shape (IEMOCAP's): 4 classes, anger (W), happiness (F), neutral (N), sadness (T); the other
emotions (boredom, disgust, fear) are excluded and counted in the manifest. Five folds, each one
female + one male speaker, paired in id order: (08, 03), (09, 10), (13, 11), (14, 12), (16, 15).
Fold k tests on pair k, selects models on pair k+1 (mod 5) and trains on the other three, so test
and dev speakers never appear in training dialogues.

Dialogue composition (seeded by ``(seed, pair index)``, documented so it can be reproduced):
each pair's utterances are split into dialogues of ``U{min_turns..max_turns}`` turns in which the
two speakers alternate (a speaker with no utterances left yields the floor). A speaker keeps their
previous emotion with probability ``p_stay`` when they have an utterance of it left (emotional
inertia); otherwise the next emotion is drawn in proportion to their remaining utterances. Every
utterance is used exactly once; nothing is dropped without being reported.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import soundfile as sf

from benchbench.data import Dialogue, Fold, Utterance, UtteranceInput
from benchbench.task import Task, skipped_notice

log = logging.getLogger(__name__)

LABELS = ("anger", "happiness", "neutral", "sadness")
EMOTION_LETTERS = {"W": "anger", "F": "happiness", "N": "neutral", "T": "sadness"}
OTHER_LETTERS = {"L": "boredom", "E": "disgust", "A": "fear"}
FEMALE = ("08", "09", "13", "14", "16")
MALE = ("03", "10", "11", "12", "15")
PAIRS = tuple(zip(FEMALE, MALE))
FILENAME = re.compile(r"^(\d\d)([a-z]\d\d)([A-Z])([a-z])\.wav$")
DOWNLOAD = "http://emodb.bilderbar.info/ (download.zip)"


class EmoDBDialogueTask(Task):
    """Emo-DB composed into two-speaker dialogues, 5 speaker-pair folds (see module docstring)."""

    name = "emodb"
    labels = LABELS
    needs_data_dir = True
    default_backbone = "qwen2-audio-whisper-tiny"  # real speech: the pretrained Whisper tiny.en encoder
    needs = "Emo-DB wav/ folder (SSTTTEV.wav files); free download"
    source = "http://emodb.bilderbar.info/download/ (free for research; Burkhardt et al., Interspeech 2005)"

    def __init__(self, data_dir=None, preset: str = "default", seed: int = 0, min_turns: int = 6,
                 max_turns: int = 10, p_stay: float = 0.7):
        super().__init__(data_dir, preset, seed)
        if self.data_dir is None:
            raise ValueError(f"task emodb needs --data-dir (Emo-DB from {DOWNLOAD})")
        wav_dir = self.data_dir / "wav" if (self.data_dir / "wav").is_dir() else self.data_dir
        if not wav_dir.is_dir():
            raise FileNotFoundError(f"task emodb: {self.data_dir} is not a directory (Emo-DB from {DOWNLOAD})")
        self.wav_dir = wav_dir
        self.min_turns, self.max_turns, self.p_stay = min_turns, max_turns, p_stay
        self.skipped: list[dict] = []
        self.excluded: dict[str, int] = {}
        self._by_speaker = self._load()
        self._dialogues = {i: self._compose(i, pair) for i, pair in enumerate(PAIRS)}

    def params(self) -> dict:
        return {**super().params(), "min_turns": self.min_turns, "max_turns": self.max_turns,
                "p_stay": self.p_stay, "pairs": [list(p) for p in PAIRS]}

    def _load(self) -> dict[str, list[Utterance]]:
        by_speaker: dict[str, list[Utterance]] = {s: [] for s in FEMALE + MALE}
        files = sorted(self.wav_dir.glob("*.wav"))
        if not files:
            raise FileNotFoundError(f"task emodb: no .wav files in {self.wav_dir} (Emo-DB from {DOWNLOAD})")
        for path in files:
            m = FILENAME.match(path.name)
            if not m or m.group(1) not in by_speaker:
                self.skipped.append({"file": path.name, "reason": "name is not SSTTTEV.wav with a known speaker"})
                continue
            spk, _, letter, _ = m.groups()
            if letter in OTHER_LETTERS:
                self.excluded[OTHER_LETTERS[letter]] = self.excluded.get(OTHER_LETTERS[letter], 0) + 1
                continue
            if letter not in EMOTION_LETTERS:
                self.skipped.append({"file": path.name, "reason": f"unknown emotion letter {letter!r}"})
                continue
            try:
                wav, sr = sf.read(str(path), dtype="float32", always_2d=False)
            except Exception as e:  # a corrupt clip is reported, never silently dropped
                self.skipped.append({"file": path.name, "reason": f"unreadable: {e}"})
                continue
            if wav.ndim == 2:
                wav = wav.mean(axis=1)
            if len(wav) == 0:
                self.skipped.append({"file": path.name, "reason": "empty audio"})
                continue
            inp = UtteranceInput(path.stem, "", 0, spk, wav, int(sr))
            by_speaker[spk].append(Utterance(inp, LABELS.index(EMOTION_LETTERS[letter])))
        for s in self.skipped:
            log.warning("emodb: skipped %s (%s)", s["file"], s["reason"])
        if self.skipped:  # a NOTICE line in the terminal and in summary.json, beside the manifest's list
            self.notices.append(skipped_notice(self.skipped))
        return by_speaker

    def _compose(self, pair_index: int, pair: tuple[str, str]) -> tuple[Dialogue, ...]:
        rng = np.random.default_rng([self.seed, pair_index])
        pools = {}
        for spk in pair:
            pools[spk] = {c: [] for c in range(len(LABELS))}
            for u in self._by_speaker[spk]:
                pools[spk][u.label].append(u)
            for c in pools[spk]:
                rng.shuffle(pools[spk][c])

        def left(spk):
            return sum(len(v) for v in pools[spk].values())

        dialogues = []
        while left(pair[0]) + left(pair[1]) > 0:
            did = f"emodb-p{pair_index}-d{len(dialogues):03d}"
            n_turns = int(rng.integers(self.min_turns, self.max_turns + 1))
            who, prev, utts = int(rng.integers(2)), {}, []
            while len(utts) < n_turns and left(pair[0]) + left(pair[1]) > 0:
                spk = pair[who] if left(pair[who]) else pair[1 - who]
                if spk in prev and pools[spk][prev[spk]] and rng.random() < self.p_stay:
                    c = prev[spk]
                else:
                    counts = np.array([len(pools[spk][c]) for c in range(len(LABELS))], dtype=float)
                    c = int(rng.choice(len(LABELS), p=counts / counts.sum()))
                u = pools[spk][c].pop()
                prev[spk] = c
                inp = UtteranceInput(u.input.utterance_id, did, len(utts), spk, u.input.waveform, u.input.sample_rate)
                utts.append(Utterance(inp, u.label))
                who = 1 - (pair.index(spk))
            dialogues.append(Dialogue(did, tuple(utts)))
        return tuple(dialogues)

    def folds(self) -> list[Fold]:
        folds = []
        for k in range(len(PAIRS)):
            dev_k = (k + 1) % len(PAIRS)
            train = tuple(d for i in range(len(PAIRS)) if i not in (k, dev_k) for d in self._dialogues[i])
            folds.append(Fold(k, train, self._dialogues[dev_k], self._dialogues[k]))
        return folds

    def manifest(self) -> dict:
        m = super().manifest()
        m["skipped"] = self.skipped
        m["excluded_other_emotions"] = self.excluded
        m["utterances_per_speaker"] = {s: len(v) for s, v in self._by_speaker.items()}
        return m
