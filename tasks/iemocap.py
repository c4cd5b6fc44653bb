"""``iemocap``: IEMOCAP (Busso et al., 2008), 4 classes, leave-one-session-out.

IEMOCAP is licensed and never redistributed: request it at https://sail.usc.edu/iemocap/ and point
``--data-dir`` at ``IEMOCAP_full_release`` (or at the folder that holds it). Read on disk:

* labels: ``Session{1..5}/dialog/EmoEvaluation/<dialogue>.txt`` (the files directly in that folder;
  its ``Categorical/``, ``Attribute/`` and ``Self-evaluation/`` subfolders are individual annotator
  votes). Only lines that start with ``[`` are utterance lines:
  ``[START - END]<TAB>TURN_NAME<TAB>EMO<TAB>[V, A, D]`` with START/END in seconds;
* audio: ``Session{k}/sentences/wav/<dialogue>/<turn>.wav`` (16 kHz mono).

Protocol (both papers; ``../shared/reference/datasets.md``):

* classes anger, happiness, neutral, sadness from ``ang``, ``hap`` + ``exc`` (merged), ``neu``,
  ``sad``. Every other code (``fru``, ``sur``, ``fea``, ``dis``, ``oth``, ``xxx``) stays in the
  dialogue stream as context but is not scored (:data:`benchbench.data.UNSCORED`);
* dialogue = an EmoEvaluation file, turns in start-time order, both speakers; the speaker of
  ``Ses01F_impro01_M012`` is session 1's male actor ``Ses01M`` (first letter of the last part);
* leave-one-session-out: fold k (0-based) tests on session k+1 and trains on the other four; dev is
  carved from the training sessions only: ``dev_fraction`` of each training session's dialogues,
  whole dialogues, drawn with the task seed (``--preset paper`` keeps the same split);
* the scored count is checked against the standard 5531 (per session in :data:`EXPECTED`): a
  mismatch is logged, printed by ``bench run`` and written to the run's manifest, never silent.
  A turn listed in EmoEvaluation without its wav file is skipped and reported in the manifest.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import soundfile as sf

from benchbench.data import UNSCORED, Dialogue, Fold, Utterance, UtteranceInput
from benchbench.task import Task, skipped_notice

log = logging.getLogger(__name__)

LABELS = ("anger", "happiness", "neutral", "sadness")
CODES = {"ang": "anger", "hap": "happiness", "exc": "happiness", "neu": "neutral", "sad": "sadness"}
SESSIONS = (1, 2, 3, 4, 5)
# scored utterances per session (datasets.md; the DPM and Titans-as-a-Layer papers' 5531)
EXPECTED = {1: {"total": 1085, "neutral": 384, "happiness": 278, "anger": 229, "sadness": 194},
            2: {"total": 1023, "neutral": 362, "happiness": 327, "anger": 137, "sadness": 197},
            3: {"total": 1151, "neutral": 320, "happiness": 286, "anger": 240, "sadness": 305},
            4: {"total": 1031, "neutral": 258, "happiness": 303, "anger": 327, "sadness": 143},
            5: {"total": 1241, "neutral": 384, "happiness": 442, "anger": 170, "sadness": 245}}
EXPECTED_TOTAL = 5531
LINE = re.compile(r"^\[(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\]\t(\S+)\t(\S+)\t\[")
DOWNLOAD = "https://sail.usc.edu/iemocap/ (IEMOCAP_full_release, licensed)"


def find_release(data_dir: Path) -> Path:
    """The ``IEMOCAP_full_release`` folder: ``data_dir`` itself or its child of that name.

    Raises:
        FileNotFoundError: neither holds ``Session1/dialog/EmoEvaluation``.
    """
    for cand in (data_dir, data_dir / "IEMOCAP_full_release"):
        if (cand / "Session1" / "dialog" / "EmoEvaluation").is_dir():
            return cand
    raise FileNotFoundError(
        f"task iemocap: {data_dir} has no Session1/dialog/EmoEvaluation (nor IEMOCAP_full_release/ "
        f"with one); point --data-dir at IEMOCAP_full_release from {DOWNLOAD}")


def parse_emo_evaluation(path: Path) -> list[tuple[float, float, str, str]]:
    """``(start_s, end_s, turn_name, code)`` of every utterance line of one EmoEvaluation file.

    Raises:
        ValueError: a line starting with ``[`` that is not an utterance line (names file and line).
    """
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.startswith("["):
            continue
        m = LINE.match(line)
        if not m:
            raise ValueError(f"{path}:{i}: not an utterance line '[START - END]\\tTURN\\tEMO\\t[V, A, D]': {line!r}")
        out.append((float(m.group(1)), float(m.group(2)), m.group(3), m.group(4)))
    return out


class IEMOCAPTask(Task):
    """IEMOCAP, 4 classes (exc -> hap), LOSO with dev from training sessions (see module docstring)."""

    name = "iemocap"
    labels = LABELS
    needs_data_dir = True
    default_backbone = "qwen2-audio-whisper-tiny"  # real speech: the pretrained Whisper tiny.en encoder
    source = DOWNLOAD
    needs = "IEMOCAP_full_release/Session{1..5}/ (dialog/EmoEvaluation/*.txt, sentences/wav/); licensed"

    def __init__(self, data_dir=None, preset: str = "default", seed: int = 0, dev_fraction: float = 0.1):
        super().__init__(data_dir, preset, seed)
        if self.data_dir is None:
            raise ValueError(f"task iemocap needs --data-dir (IEMOCAP_full_release from {DOWNLOAD})")
        if not 0 < dev_fraction < 1:
            raise ValueError(f"task iemocap: dev_fraction must be in (0, 1), got {dev_fraction}")
        self.root = find_release(self.data_dir)
        self.dev_fraction = dev_fraction
        self.skipped: list[dict] = []
        self.other_codes: dict[str, int] = {}
        self._sessions = {k: self._load_session(k) for k in SESSIONS}
        if self.skipped:  # a NOTICE line in the terminal and in summary.json, beside the manifest's list
            self.notices.append(skipped_notice(self.skipped))
        self.count_check = self._check_counts()

    def params(self) -> dict:
        return {**super().params(), "dev_fraction": self.dev_fraction, "protocol": "LOSO, exc->hap"}

    def _skip(self, path: Path, reason: str) -> None:
        """Report a file left out (manifest, log and a notice), never a silent drop."""
        self.skipped.append({"file": str(path.relative_to(self.root)), "reason": reason})
        log.warning("iemocap: skipped %s (%s)", self.skipped[-1]["file"], reason)

    def _load_session(self, k: int) -> tuple[Dialogue, ...]:
        session = self.root / f"Session{k}"
        eval_dir = session / "dialog" / "EmoEvaluation"
        files = sorted(eval_dir.glob("*.txt")) if eval_dir.is_dir() else []
        if not files:
            self._skip(eval_dir, "no EmoEvaluation .txt files")
            return ()
        dialogues = []
        for path in files:
            did = path.stem
            utts = []
            for start, end, turn_name, code in sorted(parse_emo_evaluation(path)):
                wav_path = session / "sentences" / "wav" / did / f"{turn_name}.wav"
                if not wav_path.is_file():
                    self._skip(wav_path, "missing wav")
                    continue
                try:
                    wav, sr = sf.read(str(wav_path), dtype="float32", always_2d=False)
                except Exception as e:  # reported, never silently dropped
                    self._skip(wav_path, f"unreadable: {e}")
                    continue
                if wav.ndim == 2:
                    wav = wav.mean(axis=1)
                if len(wav) == 0:
                    self._skip(wav_path, "empty audio")
                    continue
                if code in CODES:
                    label = LABELS.index(CODES[code])
                else:
                    label = UNSCORED
                    self.other_codes[code] = self.other_codes.get(code, 0) + 1
                speaker = f"Ses{k:02d}{turn_name.rsplit('_', 1)[-1][0]}"
                inp = UtteranceInput(turn_name, did, len(utts), speaker, wav, int(sr))
                utts.append(Utterance(inp, label))
            if utts:
                dialogues.append(Dialogue(did, tuple(utts)))
        return tuple(dialogues)

    def _check_counts(self) -> dict:
        found = {}
        for k, dialogues in self._sessions.items():
            c = {"total": 0, **{lab: 0 for lab in LABELS}}
            for d in dialogues:
                for u in d.utterances:
                    if u.scored:
                        c["total"] += 1
                        c[LABELS[u.label]] += 1
            found[k] = c
        total = sum(c["total"] for c in found.values())
        ok = total == EXPECTED_TOTAL and all(found[k] == EXPECTED[k] for k in SESSIONS)
        check = {"expected_total": EXPECTED_TOTAL, "found_total": total, "match": ok,
                 "per_session": {str(k): {"expected": EXPECTED[k], "found": found[k]} for k in SESSIONS}}
        if not ok:
            diff = ", ".join(f"Session{k} {found[k]['total']}/{EXPECTED[k]['total']}" for k in SESSIONS
                             if found[k] != EXPECTED[k])
            msg = (f"{total} scored utterances, expected {EXPECTED_TOTAL} (found/expected: {diff}); "
                   "results are not comparable with the papers' 5531-utterance protocol")
            check["message"] = msg
            self.notices.append(msg)
            log.warning("iemocap: %s", msg)
        return check

    def folds(self) -> list[Fold]:
        folds = []
        for i, k in enumerate(SESSIONS):
            train, dev = [], []
            for j in SESSIONS:
                if j == k:
                    continue
                ds = self._sessions[j]
                rng = np.random.default_rng([self.seed, k, j])
                n_dev = max(1, int(round(self.dev_fraction * len(ds)))) if len(ds) > 1 else 0
                dev_idx = set(rng.permutation(len(ds))[:n_dev].tolist())
                for n, d in enumerate(ds):
                    (dev if n in dev_idx else train).append(d)
            folds.append(Fold(i, tuple(train), tuple(dev), self._sessions[k]))
        return folds

    def manifest(self) -> dict:
        m = super().manifest()
        m["release"] = "IEMOCAP_full_release"
        m["count_check"] = self.count_check
        m["skipped"] = self.skipped
        m["unscored_codes"] = dict(sorted(self.other_codes.items()))
        return m
