"""Dataset folders in the real on-disk formats, built from local real speech, for tests and demos.

The licensed corpora (IEMOCAP, MELD's clips, MultiDialog) cannot ship with the suite, yet their
loaders must be tested on files in their real formats. These builders write such folders from
Emo-DB audio (real emotional speech, ``../shared/data/emodb``):

* :func:`make_iemocap` - ``IEMOCAP_full_release/Session{1..5}`` with 16 kHz wavs under
  ``sentences/wav/<dialogue>/``, real-format ``dialog/EmoEvaluation/*.txt`` (utterance lines plus
  annotator-vote lines and an ignored ``Categorical/`` subfolder) and ``dialog/transcriptions``;
* :func:`make_meld_clips` - ``MELD.Raw``-named mp4 clips (AAC audio at 48 kHz, written with PyAV)
  for chosen rows of MELD's real CSVs;
* :func:`make_multidialog` - a MultiDialog-layout sample (``metadata.jsonl`` per split and 16 kHz
  wavs named ``..._<actor>.wav``).

Command line: ``python -m benchbench.tools.fixtures iemocap --emodb ../shared/data/emodb --out DIR``.
Nothing here is used by a benchmark run.
"""

from __future__ import annotations

import argparse
import json
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from benchbench.tasks.emodb import FEMALE, FILENAME, MALE

# Emo-DB letter -> IEMOCAP code. Emo-DB has no frustration/surprise: boredom stands in for the
# unscored codes so the stream holds context-only utterances like the real corpus does.
IEMOCAP_CODES = {"W": ("ang",), "F": ("hap", "exc"), "N": ("neu",), "T": ("sad",),
                 "L": ("fru", "xxx", "oth"), "E": ("dis",), "A": ("fea", "sur")}
MELD_LABELS = {"W": "anger", "F": "joy", "N": "neutral", "T": "sadness", "E": "disgust", "A": "fear",
               "L": "surprise"}
MULTIDIALOG_LABELS = {"W": "Angry", "F": "Happy", "N": "Neutral", "T": "Sad", "E": "Disgusting",
                      "A": "Fear", "L": "Surprising"}


def _resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    g = gcd(sr_in, sr_out)
    return resample_poly(wav, sr_out // g, sr_in // g).astype(np.float32) if sr_in != sr_out else wav


def _emodb_files(emodb_dir: Path) -> dict[str, list[Path]]:
    wav_dir = emodb_dir / "wav" if (emodb_dir / "wav").is_dir() else emodb_dir
    by_speaker: dict[str, list[Path]] = {s: [] for s in FEMALE + MALE}
    for p in sorted(wav_dir.glob("*.wav")):
        m = FILENAME.match(p.name)
        if m and m.group(1) in by_speaker:
            by_speaker[m.group(1)].append(p)
    if not any(by_speaker.values()):
        raise FileNotFoundError(f"{wav_dir}: no Emo-DB wav files (SSTTTEV.wav)")
    return by_speaker


def _read_mono(path: Path) -> tuple[np.ndarray, int]:
    wav, sr = sf.read(str(path), dtype="float32", always_2d=False)
    return (wav.mean(axis=1) if wav.ndim == 2 else wav), int(sr)


def make_iemocap(emodb_dir: str | Path, out_dir: str | Path, per_speaker: int | None = None,
                 turns: tuple[int, int] = (6, 10), seed: int = 0) -> Path:
    """Write an ``IEMOCAP_full_release`` folder from Emo-DB; returns its path.

    Session k (1..5) has Emo-DB's k-th female/male speaker pair (the ``emodb`` task's pairs) as its
    two actors. Each session's utterances (at most ``per_speaker`` per speaker, all by default) are
    shuffled with ``seed`` and dealt into dialogues of ``turns`` turns in which the two actors
    alternate; dialogue names alternate ``Ses0kF_impro0n`` / ``Ses0kM_script0n_1``. Emotions map to
    IEMOCAP codes by :data:`IEMOCAP_CODES` (happiness alternates hap/exc; boredom, disgust and fear
    become unscored codes). Audio is resampled to 16 kHz; start/end times are seconds from the
    dialogue's start with 0.3-1.0 s gaps.

    Raises:
        FileNotFoundError: ``emodb_dir`` holds no Emo-DB wav files.
    """
    rng = np.random.default_rng(seed)
    files = _emodb_files(Path(emodb_dir))
    root = Path(out_dir) / "IEMOCAP_full_release"
    for k, (f, m) in enumerate(zip(FEMALE, MALE), 1):
        session = root / f"Session{k}"
        eval_dir = session / "dialog" / "EmoEvaluation"
        (eval_dir / "Categorical").mkdir(parents=True, exist_ok=True)
        (session / "dialog" / "transcriptions").mkdir(parents=True, exist_ok=True)
        pools = {}
        for tag, spk in (("F", f), ("M", m)):
            paths = list(files[spk])
            rng.shuffle(paths)
            pools[tag] = paths[:per_speaker] if per_speaker else paths
        counters: dict[str, int] = {}  # per Emo-DB letter, to cycle through its IEMOCAP codes
        n_dialogue = 0
        while pools["F"] or pools["M"]:
            n_dialogue += 1
            did = (f"Ses{k:02d}F_impro{n_dialogue:02d}" if n_dialogue % 2 else
                   f"Ses{k:02d}M_script{n_dialogue:02d}_1")
            n_turns = int(rng.integers(turns[0], turns[1] + 1))
            who = "F" if rng.random() < 0.5 else "M"
            t, index, lines, trans = 2.0 * rng.random(), {"F": 0, "M": 0}, [], []
            for _ in range(n_turns):
                if not pools[who]:
                    who = "M" if who == "F" else "F"
                    if not pools[who]:
                        break
                path = pools[who].pop()
                letter = FILENAME.match(path.name).group(3)
                codes = IEMOCAP_CODES[letter]
                code = codes[counters.get(letter, 0) % len(codes)]
                counters[letter] = counters.get(letter, 0) + 1
                wav, sr = _read_mono(path)
                wav = _resample(wav, sr, 16000)
                turn = f"{did}_{who}{index[who]:03d}"
                index[who] += 1
                wav_path = session / "sentences" / "wav" / did / f"{turn}.wav"
                wav_path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(wav_path), wav, 16000, subtype="PCM_16")
                start, end = t, t + len(wav) / 16000
                v, a, d = (float(x) for x in rng.uniform(1.5, 4.5, size=3))
                lines += [f"[{start:.4f} - {end:.4f}]\t{turn}\t{code}\t[{v:.4f}, {a:.4f}, {d:.4f}]",
                          f"C-E1:\t{code.capitalize()};\t()", f"C-E2:\t{code.capitalize()};\t()",
                          f"A-E1:\tval {round(v)}; act {round(a)}; dom  {round(d)};\t()", ""]
                trans.append(f"{turn} [{start:08.4f}-{end:08.4f}]: (Emo-DB {path.stem})")
                t = end + float(rng.uniform(0.3, 1.0))
                who = "M" if who == "F" else "F"
            header = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
            (eval_dir / f"{did}.txt").write_text(header + "\n".join(lines) + "\n")
            (eval_dir / "Categorical" / f"{did}_e1_cat.txt").write_text(
                "".join(f"{ln.split(chr(9))[1]} :{ln.split(chr(9))[2]}; ()\n" for ln in lines if ln.startswith("[")))
            (session / "dialog" / "transcriptions" / f"{did}.txt").write_text("\n".join(trans) + "\n")
    return root


def write_mp4(path: str | Path, wav: np.ndarray, sample_rate: int) -> None:
    """A stereo AAC mp4 at 48 kHz (MELD's clip format) from mono float samples (PyAV)."""
    import av

    wav48 = np.clip(_resample(wav, sample_rate, 48000), -1, 1).astype(np.float32)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=48000, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.stack([wav48, wav48]), format="fltp", layout="stereo")
        frame.sample_rate = 48000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def make_meld(emodb_dir: str | Path, meld_csv_dir: str | Path, out_dir: str | Path,
              dialogues: dict[str, list[int]] | None = None, seed: int = 0) -> Path:
    """Write a ``MELD.Raw`` folder: MELD's real CSV rows of a few dialogues and generated clips.

    ``dialogues`` maps split -> Dialogue_IDs (default: the first two of each split plus the two with
    the known defects, train 125 and dev 110). The CSVs keep the real rows of those dialogues
    unchanged. Every row gets ``dia{D}_utt{U}.mp4`` (AAC, 48 kHz, stereo) made from an Emo-DB clip of
    the row's emotion (surprise from boredom, Emo-DB having no surprise), except the known defects:
    ``train_splits/dia125_utt3.mp4`` is written corrupt and ``dev_splits_complete/dia110_utt7.mp4``
    is left out. Returns the ``MELD.Raw`` path.
    """
    import pandas as pd

    from benchbench.tasks.meld import SPLITS

    rng = np.random.default_rng(seed)
    files = [p for ps in _emodb_files(Path(emodb_dir)).values() for p in ps]
    by_emotion: dict[str, list[Path]] = {}
    for p in files:
        by_emotion.setdefault(MELD_LABELS[FILENAME.match(p.name).group(3)], []).append(p)
    dialogues = dialogues or {"train": [0, 1, 125], "dev": [0, 1, 110], "test": [0, 1]}
    root = Path(out_dir) / "MELD.Raw"
    for split, (csv_name, clip_dir) in SPLITS.items():
        df = pd.read_csv(Path(meld_csv_dir) / csv_name, encoding="utf-8")
        df = df[df["Dialogue_ID"].isin(dialogues.get(split, []))]
        (root / clip_dir).mkdir(parents=True, exist_ok=True)
        df.to_csv(root / csv_name, index=False, encoding="utf-8")
        for r in df.itertuples(index=False):
            clip = root / clip_dir / f"dia{r.Dialogue_ID}_utt{r.Utterance_ID}.mp4"
            name = f"{clip_dir}/{clip.name}"
            if name == "dev_splits_complete/dia110_utt7.mp4":
                continue
            if name == "train_splits/dia125_utt3.mp4":
                clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(rng.integers(0, 256, 512, dtype=np.uint8)))
                continue
            pool = by_emotion[r.Emotion]
            wav, sr = _read_mono(pool[int(rng.integers(len(pool)))])
            write_mp4(clip, wav, sr)
    return root


def make_multidialog(emodb_dir: str | Path, out_dir: str | Path, turns: int = 6, seed: int = 0) -> Path:
    """Write a MultiDialog-layout snapshot; returns its folder.

    Emo-DB's ten speakers become actors ``a``..``j`` (``d`` and ``h`` are not gold actors). Per
    split (train 6 dialogues, valid_freq 2, valid_rare 1, test_freq 2, test_rare 1) two actors
    alternate for ``turns`` turns; train also gets one dialogue of the two non-gold actors (outside
    the gold subset). ``metadata/{split}/{split}_metadata_0000.jsonl`` holds one record per
    utterance (``file_name``, ``conv_id``, ``utterance_id``, ``from``, ``value``, ``emotion``,
    ``original_full_path``); wavs (16 kHz) go to ``data/{split}/{split}_chunks_0000/``.
    Emotions follow the Emo-DB clip (:data:`MULTIDIALOG_LABELS`).
    """
    rng = np.random.default_rng(seed)
    files = _emodb_files(Path(emodb_dir))
    actors = dict(zip("abcdefghij", FEMALE + MALE))
    n_dialogues = {"train": 6, "valid_freq": 2, "valid_rare": 1, "test_freq": 2, "test_rare": 1}
    root = Path(out_dir) / "MultiDialog"
    gold_pairs = [("a", "f"), ("b", "g"), ("c", "d"), ("e", "j"), ("i", "h"), ("a", "b")]
    for split, n in n_dialogues.items():
        wav_dir = root / "data" / split / f"{split}_chunks_0000"
        wav_dir.mkdir(parents=True, exist_ok=True)
        (root / "metadata" / split).mkdir(parents=True, exist_ok=True)
        pairs = [gold_pairs[int(rng.integers(len(gold_pairs)))] for _ in range(n)]
        if split == "train":
            pairs.append(("d", "h"))
        records = []
        for c, pair in enumerate(pairs):
            conv = f"{split[:2]}{c:04d}-{int(rng.integers(10**6)):06d}"
            for t in range(turns):
                actor = pair[t % 2]
                clips = files[actors[actor]]
                path = clips[int(rng.integers(len(clips)))]
                wav, sr = _read_mono(path)
                name = f"t_{conv}_{t}_{actor}.wav"
                sf.write(str(wav_dir / name), _resample(wav, sr, 16000), 16000, subtype="PCM_16")
                records.append({"file_name": f"{split}_chunks_0000/{name}", "conv_id": conv, "utterance_id": t,
                                "from": "gpt" if t % 2 else "human", "value": f"(Emo-DB {path.stem})",
                                "emotion": MULTIDIALOG_LABELS[FILENAME.match(path.name).group(3)],
                                "original_full_path": f"audio/{split}/{name}"})
        rng.shuffle(records)  # the loader orders by utterance_id, not by file order
        with open(root / "metadata" / split / f"{split}_metadata_0000.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchbench.tools.fixtures", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["iemocap", "meld", "multidialog"])
    p.add_argument("--meld-csv", default=None, help="folder with MELD's real *_sent_emo.csv (for meld)")
    p.add_argument("--emodb", required=True, help="Emo-DB folder (wav/ or the wavs themselves)")
    p.add_argument("--out", required=True)
    p.add_argument("--per-speaker", type=int, default=None, help="at most this many clips per speaker")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.kind == "meld":
        if not a.meld_csv:
            p.error("meld needs --meld-csv")
        root = make_meld(a.emodb, a.meld_csv, a.out, seed=a.seed)
    elif a.kind == "multidialog":
        root = make_multidialog(a.emodb, a.out, seed=a.seed)
    else:
        root = make_iemocap(a.emodb, a.out, a.per_speaker, seed=a.seed)
    print(json.dumps({"written": str(root)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
