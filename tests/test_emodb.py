"""Emo-DB dialogue task on the real files in ../shared/data/emodb (skipped where absent)."""

import shutil

import numpy as np
import pytest

from tests.conftest import EMODB_DIR, missing, same_emotion_rate

pytestmark = pytest.mark.skipif(not (EMODB_DIR / "wav").is_dir(),
                                reason=missing("Emo-DB", EMODB_DIR))


@pytest.fixture(scope="module")
def task():
    from benchbench.tasks.emodb import EmoDBDialogueTask

    return EmoDBDialogueTask(data_dir=EMODB_DIR)


def test_counts_and_every_utterance_used_once(task):
    m = task.manifest()
    assert sum(m["utterances_per_speaker"].values()) == 339  # W 127 + F 71 + N 79 + T 62
    assert m["excluded_other_emotions"] == {"fear": 69, "boredom": 81, "disgust": 46}
    assert m["skipped"] == []
    ids = [u.utterance_id for f in task.folds() for d in f.test for u in d.utterances]
    assert len(ids) == len(set(ids)) == 339


def test_folds_hold_out_one_female_and_one_male_speaker(task):
    from benchbench.tasks.emodb import FEMALE, MALE

    for f in task.folds():
        test_spk = {s for d in f.test for s in d.speakers}
        assert len(test_spk & set(FEMALE)) == 1 and len(test_spk & set(MALE)) == 1
        train_dev = {s for d in f.train + f.dev for s in d.speakers}
        assert not test_spk & train_dev
        assert not {s for d in f.dev for s in d.speakers} & {s for d in f.train for s in d.speakers}


def test_dialogues_alternate_two_speakers_with_inertia(task):
    dialogues = [d for f in task.folds() for d in f.test]
    # only a pair's last dialogue may be one speaker's tail once the other's clips are used up
    assert sum(len(d.speakers) != 2 for d in dialogues) <= 5
    for d in dialogues:
        assert 1 <= len(d) <= task.max_turns
        if len(d.speakers) == 2:
            assert any(a.speaker != b.speaker for a, b in zip(d.utterances, d.utterances[1:]))
    assert same_emotion_rate(dialogues) > 0.45  # well above the ~0.3 of random order


def test_audio_is_real_speech_at_its_own_rate(task):
    u = task.folds()[0].test[0].utterances[0].input
    assert u.sample_rate == 22050 and u.duration_s == pytest.approx(2.0)
    assert np.sqrt(np.mean(u.waveform ** 2)) > 1e-3


def test_composition_is_seeded(task):
    from benchbench.tasks.emodb import EmoDBDialogueTask

    again = EmoDBDialogueTask(data_dir=EMODB_DIR)
    assert again.manifest()["sha256"] == task.manifest()["sha256"]
    assert EmoDBDialogueTask(data_dir=EMODB_DIR, seed=1).manifest()["sha256"] != task.manifest()["sha256"]


def test_bad_files_are_reported_not_dropped(tmp_path):
    from benchbench.tasks.emodb import EmoDBDialogueTask

    wav = tmp_path / "wav"
    wav.mkdir()
    for f in sorted((EMODB_DIR / "wav").glob("03*.wav"))[:6] + sorted((EMODB_DIR / "wav").glob("08*.wav"))[:6]:
        shutil.copy(f, wav)
    (wav / "03a01Wz.wav").write_bytes(b"not a wav file")
    (wav / "notes.wav").write_bytes(b"")
    t = EmoDBDialogueTask(data_dir=tmp_path)
    skipped = {s["file"]: s["reason"] for s in t.manifest()["skipped"]}
    assert "unreadable" in skipped["03a01Wz.wav"] and "notes.wav" in skipped
    # ... and a notice (a NOTICE line in the terminal and in summary.json) says so
    (notice,) = t.notices
    assert notice.startswith("2 file(s) skipped") and "03a01Wz.wav (unreadable" in notice
    assert t.manifest()["notices"] == [notice]  # summary.json's tasks.emodb.notices come from here
    with pytest.raises(FileNotFoundError, match="emodb"):
        EmoDBDialogueTask(data_dir=tmp_path / "nowhere")


@pytest.mark.slow
def test_bench_run_emodb_all_folds(tmp_path):
    import pandas as pd

    from benchbench.cli import main

    rc = main(["run", "--methods", "lora,mal", "--tasks", "emodb", "--data-dir", f"emodb={EMODB_DIR}", "--preset",
               "smoke", "--seeds", "0", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
               "--output", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    res = pd.read_csv(tmp_path / "out" / "results.csv")
    assert sorted(res["fold"].unique()) == [0, 1, 2, 3, 4] and (res["status"] == "ok").all()
