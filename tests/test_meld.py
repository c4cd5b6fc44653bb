"""MELD loader: the real CSVs in ../shared/data/meld, and MELD.Raw-format mp4 clips made from Emo-DB."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from tests.conftest import EMODB_DIR, MELD_DIR, missing
needs_csv = pytest.mark.skipif(not (MELD_DIR / "train_sent_emo.csv").is_file(),
                               reason=missing("MELD's CSVs (https://affective-meld.github.io/)", MELD_DIR))
needs_emodb = pytest.mark.skipif(not (EMODB_DIR / "wav").is_dir(),
                                 reason=missing("Emo-DB (the MELD clips are made from it)", EMODB_DIR))


@pytest.fixture(scope="module")
def meld_raw(tmp_path_factory):
    if not (EMODB_DIR / "wav").is_dir() or not (MELD_DIR / "train_sent_emo.csv").is_file():
        pytest.skip(missing("Emo-DB and MELD's CSVs", EMODB_DIR.parent))
    from benchbench.tools.fixtures import make_meld

    return make_meld(EMODB_DIR, MELD_DIR, tmp_path_factory.mktemp("meld"))


@needs_csv
def test_real_csvs_have_the_published_counts_and_order():
    from benchbench.tasks.meld import EXPECTED, LABELS, SPLITS, read_split_csv

    for split, (name, _) in SPLITS.items():
        df = read_split_csv(MELD_DIR / name)
        assert (len(df), df["Dialogue_ID"].nunique()) == EXPECTED[split]
        assert set(df["Emotion"]) == set(LABELS)
        for _, g in df.groupby("Dialogue_ID"):
            assert list(g["Utterance_ID"]) == sorted(g["Utterance_ID"])
    assert 60 not in set(read_split_csv(MELD_DIR / "train_sent_emo.csv")["Dialogue_ID"])


@needs_csv
def test_bad_csv_names_the_file_and_row(tmp_path):
    from benchbench.tasks.meld import read_split_csv

    df = pd.read_csv(MELD_DIR / "dev_sent_emo.csv").head(5)
    df.loc[2, "Emotion"] = "boredom"
    df.to_csv(tmp_path / "dev_sent_emo.csv", index=False)
    with pytest.raises(ValueError, match=r"dev_sent_emo.csv: row Sr No. 3: unknown emotion 'boredom'"):
        read_split_csv(tmp_path / "dev_sent_emo.csv")
    df.drop(columns=["Speaker"]).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(ValueError, match=r"x.csv: missing columns \['Speaker'\]"):
        read_split_csv(tmp_path / "x.csv")


def test_decode_audio_resamples_a_48k_aac_clip(tmp_path):
    from benchbench.tools.fixtures import write_mp4
    from benchbench.tasks.meld import decode_audio

    sr = 22050
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(sr) / sr).astype(np.float32)
    write_mp4(tmp_path / "a.mp4", tone, sr)
    wav = decode_audio(tmp_path / "a.mp4", 16000)
    assert wav.dtype == np.float32 and abs(len(wav) / 16000 - 1.0) < 0.1  # AAC adds priming samples
    spectrum = np.abs(np.fft.rfft(wav[2000:14000]))
    assert abs(np.argmax(spectrum) * 16000 / 12000 - 440) < 3
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(Exception):
        decode_audio(tmp_path / "bad.mp4")


@needs_emodb
def test_fixture_loads_with_known_defects_reported(meld_raw):
    from benchbench.tasks.meld import LABELS, MELDTask

    t = MELDTask(meld_raw.parent)
    m = t.manifest()
    assert [(s["file"], s["known_defect"]) for s in m["skipped"]] == [
        ("train_splits/dia125_utt3.mp4", True), ("dev_splits_complete/dia110_utt7.mp4", True)]
    assert m["skipped"][1]["reason"] == "missing" and m["skipped"][0]["reason"].startswith("undecodable")
    assert any("2 clips skipped" in n for n in m["notices"])
    assert any("the release has 9989 / 1038" in n for n in m["notices"])  # the fixture is a subset
    f = t.folds()[0]
    assert not f.speaker_independent and m["folds"]["0"]["speaker_independent"] is False
    csv = pd.read_csv(meld_raw / "train_sent_emo.csv")
    d125 = next(d for d in f.train if d.dialogue_id == "meld-train-dia125")
    rows = csv[csv.Dialogue_ID == 125]
    assert [u.utterance_id for u in d125.utterances] == [f"train/dia125_utt{i}" for i in rows.Utterance_ID if i != 3]
    assert [u.speaker for u in d125.utterances] == [s for s, i in zip(rows.Speaker, rows.Utterance_ID) if i != 3]
    assert [LABELS[u.label] for u in d125.utterances] == [e for e, i in zip(rows.Emotion, rows.Utterance_ID) if i != 3]
    assert all(u.input.sample_rate == 16000 and 1.9 < u.input.duration_s < 2.2 for u in d125.utterances)
    assert m["counts"]["dev"]["loaded_utterances"] == m["counts"]["dev"]["csv_utterances"] - 1


@needs_csv
def test_real_csvs_without_clips_skip_everything_loudly(tmp_path):
    from benchbench.tasks.meld import MELDTask

    for name in ("train_sent_emo.csv", "dev_sent_emo.csv", "test_sent_emo.csv"):
        shutil.copy(MELD_DIR / name, tmp_path / name)
    (tmp_path / "dev_splits_complete").mkdir()
    t = MELDTask(tmp_path)
    m = t.manifest()
    assert len(m["skipped"]) == 9989 + 1109 + 2610
    assert m["skipped_by_reason"] == {"clip folder missing": 9989 + 2610, "missing": 1109}
    assert sum(1 for n in m["notices"] if "not found" in n) == 2
    assert not any("the release has" in n for n in m["notices"])  # the real CSVs match the counts


def test_missing_data_dir_is_a_clear_error(tmp_path):
    from benchbench.tasks.meld import MELDTask

    with pytest.raises(FileNotFoundError, match="train_sent_emo.csv not found"):
        MELDTask(tmp_path)
    with pytest.raises(FileNotFoundError, match="MELD.Raw"):
        MELDTask(tmp_path / "nope")


@needs_emodb
def test_bench_run_on_the_meld_fixture(meld_raw, tmp_path):
    from benchbench.cli import main

    out = tmp_path / "run"
    assert main(["run", "--methods", "lora,mal", "--tasks", "meld", "--data-dir", str(meld_raw), "--preset",
                 "smoke", "--seeds", "0", "--output", str(out), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                 "--no-progress"]) == 0
    res = pd.read_csv(out / "results.csv")
    assert list(res.status) == ["ok", "ok"] and set(res.n_test) == {11}
    manifest = json.loads((out / "manifest-meld.json").read_text())
    assert len(manifest["skipped"]) == 2
