"""``meld``: MELD (Poria et al., ACL 2019), 7 classes, the standard train/dev/test split.

MELD is public (GPL-3.0): https://affective-meld.github.io/ (``MELD.Raw.tar.gz``; unpack it and the
``train``/``dev``/``test`` tarballs inside). Point ``--data-dir`` at ``MELD.Raw`` (or its parent).
Read on disk:

* labels: ``train_sent_emo.csv``, ``dev_sent_emo.csv``, ``test_sent_emo.csv`` (columns ``Sr No.,
  Utterance, Speaker, Emotion, Sentiment, Dialogue_ID, Utterance_ID, Season, Episode, StartTime,
  EndTime``), in ``--data-dir`` or a subfolder of it;
* audio: the clips ``dia{Dialogue_ID}_utt{Utterance_ID}.mp4`` in ``train_splits/``,
  ``dev_splits_complete/`` and ``output_repeated_splits_test/`` (directly in ``--data-dir`` or one
  level below, e.g. ``train/train_splits``). Their audio stream (48 kHz AAC) is decoded with PyAV
  (FFmpeg's libraries in the wheel; no ffmpeg binary needed), downmixed to mono and resampled to
  ``sample_rate`` (16 kHz, the rate of all three papers' audio encoders; a backbone with another rate
  resamples again).

Protocol: 7 classes (neutral, joy, surprise, anger, sadness, disgust, fear); one fold with MELD's own
train / dev / test; dialogues in ``Utterance_ID`` order; the metric convention is WF1 (plus Macro-F1).
MELD's split is not speaker-independent (the Friends cast is in every split); the fold says so
(``speaker_independent=False`` in the manifest). Clips that are missing or cannot be decoded
(known: ``train_splits/dia125_utt3.mp4`` corrupt, ``dev_splits_complete/dia110_utt7.mp4`` missing)
leave their dialogue's stream and are listed in the manifest with the reason; the CSV counts are
checked against the published ones (:data:`EXPECTED`) and a mismatch becomes a notice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from benchbench.data import Dialogue, Fold, Utterance, UtteranceInput
from benchbench.task import Task

log = logging.getLogger(__name__)

LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
SPLITS = {"train": ("train_sent_emo.csv", "train_splits"),
          "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
          "test": ("test_sent_emo.csv", "output_repeated_splits_test")}
# (utterances, dialogues) per split in the released CSVs (datasets.md)
EXPECTED = {"train": (9989, 1038), "dev": (1109, 114), "test": (2610, 280)}
KNOWN_DEFECTS = {"train_splits/dia125_utt3.mp4": "corrupt", "dev_splits_complete/dia110_utt7.mp4": "missing"}
COLUMNS = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")
DOWNLOAD = "https://affective-meld.github.io/ (MELD.Raw.tar.gz)"


def _find(data_dir: Path, name: str, want_dir: bool) -> Path | None:
    for cand in [data_dir / name, data_dir / "MELD.Raw" / name, *sorted(data_dir.glob(f"*/{name}")),
                 *sorted(data_dir.glob(f"MELD.Raw/*/{name}"))]:
        if (cand.is_dir() if want_dir else cand.is_file()):
            return cand
    return None


def read_split_csv(path: Path) -> pd.DataFrame:
    """One MELD CSV, checked: the columns in :data:`COLUMNS` and emotions in :data:`LABELS`.

    Raises:
        ValueError: a missing column or an unknown emotion (names the file, and the row's ``Sr No.``).
    """
    df = pd.read_csv(path, encoding="utf-8")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (is it a MELD *_sent_emo.csv?)")
    bad = df[~df["Emotion"].isin(LABELS)]
    if len(bad):
        r = bad.iloc[0]
        raise ValueError(f"{path}: row Sr No. {r.get('Sr No.', r.name)}: unknown emotion {r['Emotion']!r} "
                         f"(expected one of {list(LABELS)})")
    return df.sort_values(["Dialogue_ID", "Utterance_ID"], kind="stable").reset_index(drop=True)


def decode_audio(path: Path, sample_rate: int = 16000) -> np.ndarray:
    """The audio stream of a media file as mono float32 samples at ``sample_rate`` (PyAV).

    Returns ``[n_samples]``. Raises ``ValueError`` when the file has no audio stream or decodes to
    nothing, and PyAV's errors for unreadable files.
    """
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        for frame in container.decode(stream):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    wav = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if len(wav) == 0:
        raise ValueError(f"{path}: the audio stream decodes to no samples")
    return wav


class MELDTask(Task):
    """MELD, 7 classes, MELD's train/dev/test as one fold (see module docstring)."""

    name = "meld"
    labels = LABELS
    needs_data_dir = True
    default_backbone = "qwen2-audio-whisper-tiny"  # real speech: the pretrained Whisper tiny.en encoder
    needs = ("MELD.Raw/: {train,dev,test}_sent_emo.csv and the mp4 clips in train_splits/, "
             "dev_splits_complete/, output_repeated_splits_test/; public (GPL-3.0)")
    source = DOWNLOAD

    def __init__(self, data_dir=None, preset: str = "default", seed: int = 0, sample_rate: int = 16000):
        super().__init__(data_dir, preset, seed)
        if self.data_dir is None or not self.data_dir.is_dir():
            raise FileNotFoundError(f"task meld needs --data-dir pointing at MELD.Raw (from {DOWNLOAD}); "
                                    f"got {self.data_dir}")
        self.sample_rate = sample_rate
        self.skipped: list[dict] = []
        self.counts: dict[str, dict] = {}
        self._splits = {s: self._load_split(s, *files) for s, files in SPLITS.items()}
        if self.skipped:
            unknown = [s["file"] for s in self.skipped if not s["known_defect"]]
            msg = (f"{len(self.skipped)} clips skipped ({len(self.skipped) - len(unknown)} of them MELD's known "
                   f"defects); see the manifest's 'skipped'")
            self.notices.append(msg)
            log.warning("meld: %s", msg)

    def params(self) -> dict:
        return {**super().params(), "sample_rate": self.sample_rate, "protocol": "MELD train/dev/test"}

    def _load_split(self, split: str, csv_name: str, clip_dir_name: str) -> tuple[Dialogue, ...]:
        csv = _find(self.data_dir, csv_name, want_dir=False)
        if csv is None:
            raise FileNotFoundError(f"task meld: {csv_name} not found in {self.data_dir} or its subfolders "
                                    f"(MELD.Raw from {DOWNLOAD})")
        df = read_split_csv(csv)
        clip_dir = _find(self.data_dir, clip_dir_name, want_dir=True)
        if clip_dir is None:
            self.notices.append(f"{split}: clip folder {clip_dir_name}/ not found under {self.data_dir}; "
                                f"all {len(df)} {split} utterances are skipped")
        n_csv, n_dia = len(df), df["Dialogue_ID"].nunique()
        self.counts[split] = {"csv_utterances": n_csv, "csv_dialogues": n_dia,
                              "expected": {"utterances": EXPECTED[split][0], "dialogues": EXPECTED[split][1]}}
        if (n_csv, n_dia) != EXPECTED[split]:
            self.notices.append(f"{split}: {csv.name} has {n_csv} utterances / {n_dia} dialogues, the release "
                                f"has {EXPECTED[split][0]} / {EXPECTED[split][1]}")
        dialogues = []
        for dia_id, rows in df.groupby("Dialogue_ID", sort=True):
            did = f"meld-{split}-dia{dia_id}"
            utts = []
            for r in rows.itertuples(index=False):
                clip = f"{clip_dir_name}/dia{r.Dialogue_ID}_utt{r.Utterance_ID}.mp4"
                wav = self._clip(clip_dir, clip)
                if wav is None:
                    continue
                inp = UtteranceInput(f"{split}/dia{r.Dialogue_ID}_utt{r.Utterance_ID}", did, len(utts),
                                     str(r.Speaker), wav, self.sample_rate)
                utts.append(Utterance(inp, LABELS.index(r.Emotion)))
            if utts:
                dialogues.append(Dialogue(did, tuple(utts)))
        self.counts[split]["loaded_utterances"] = sum(len(d) for d in dialogues)
        self.counts[split]["loaded_dialogues"] = len(dialogues)
        return tuple(dialogues)

    def _clip(self, clip_dir: Path | None, clip: str) -> np.ndarray | None:
        def skip(reason: str):
            known = KNOWN_DEFECTS.get(clip)
            self.skipped.append({"file": clip, "reason": reason, "known_defect": known is not None})
            return None

        if clip_dir is None:
            return skip("clip folder missing")
        path = clip_dir.parent / clip
        if not path.is_file():
            return skip("missing")
        try:
            return decode_audio(path, self.sample_rate)
        except Exception as e:  # a corrupt clip is reported, never silently dropped
            return skip(f"undecodable: {type(e).__name__}: {e}")

    def folds(self) -> list[Fold]:
        return [Fold(0, self._splits["train"], self._splits["dev"], self._splits["test"], speaker_independent=False)]

    def manifest(self) -> dict:
        m = super().manifest()
        m["counts"] = self.counts
        m["skipped"] = self.skipped
        reasons: dict[str, int] = {}
        for s in self.skipped:
            key = s["reason"].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        m["skipped_by_reason"] = reasons
        return m
