"""MultiDialog loader on a MultiDialog-layout sample made from Emo-DB (metadata jsonl + 16 kHz wavs)."""

import json
import shutil

import pandas as pd
import pytest

from tests.conftest import EMODB_DIR, missing

pytestmark = pytest.mark.skipif(not (EMODB_DIR / "wav").is_dir(),
                                reason=missing("Emo-DB (the MultiDialog sample is made from it)", EMODB_DIR))


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    from benchbench.tools.fixtures import make_multidialog

    return make_multidialog(EMODB_DIR, tmp_path_factory.mktemp("md"))


@pytest.fixture(scope="module")
def task(snapshot):
    from benchbench.tasks.multidialog import MultiDialogTask

    return MultiDialogTask(snapshot)


def _records(snapshot):
    out = {}
    for p in snapshot.glob("metadata/*/*.jsonl"):
        for line in p.read_text().splitlines():
            r = json.loads(line)
            out[r["file_name"].rsplit("/", 1)[1][:-4]] = (p.name.split("_metadata")[0], r)
    return out


def test_gold_actors_are_scored_and_others_are_context(task, snapshot):
    from benchbench.tasks.multidialog import EMOTIONS, GOLD_ACTORS, LABELS

    recs = _records(snapshot)
    f = task.folds()[0]
    seen = set()
    for part, splits in (("train", {"train"}), ("dev", {"valid_freq", "valid_rare"}),
                         ("test", {"test_freq", "test_rare"})):
        for d in getattr(f, part):
            for u in d.utterances:
                split, r = recs[u.utterance_id]
                assert split in splits and u.speaker == "md-" + u.utterance_id[-1]
                if u.utterance_id[-1] in GOLD_ACTORS:
                    assert LABELS[u.label] == EMOTIONS[r["emotion"].lower()]
                else:
                    assert not u.scored
                seen.add(r["conv_id"])
    all_convs = {r["conv_id"] for _, r in recs.values()}
    dropped = all_convs - seen
    assert len(dropped) == 1  # the dialogue of the two non-gold actors d and h
    assert {r["file_name"][-5] for _, r in recs.values() if r["conv_id"] in dropped} == {"d", "h"}
    assert not f.speaker_independent


def test_turns_follow_utterance_id_not_file_order(task, snapshot):
    recs = _records(snapshot)
    for d in task.folds()[0].train:
        assert [recs[u.utterance_id][1]["utterance_id"] for u in d.utterances] == list(range(len(d)))
        assert all(u.input.sample_rate == 16000 for u in d.utterances)


def test_counts_are_checked_against_the_paper(task):
    m = task.manifest()
    assert m["count_check"]["expected"] == {"dialogues": 6681, "utterances": 47004}
    assert m["count_check"]["found"]["dialogues"] == 12 and m["count_check"]["match"] is False
    assert "the paper reports 6681 / 47004" in m["notices"][0]
    n_scored = sum(m["folds"]["0"][s]["n_scored"] for s in ("train", "dev", "test"))
    assert n_scored == m["count_check"]["found"]["utterances"]


def test_missing_wav_is_reported_and_bad_metadata_names_the_line(tmp_path, snapshot):
    from benchbench.tasks.multidialog import MultiDialogTask

    root = tmp_path / "md"
    shutil.copytree(snapshot, root)
    victim = sorted(root.glob("data/test_rare/*/*.wav"))[0]
    victim.unlink()
    t = MultiDialogTask(root)
    assert [s["file"].rsplit("/", 1)[1] for s in t.manifest()["skipped"]] == [victim.name]
    assert any("1 utterances skipped" in n for n in t.notices)
    meta = root / "metadata" / "dev" / "valid_freq_metadata_0001.jsonl"
    meta.parent.mkdir()
    meta.write_text(json.dumps({"file_name": "x_a.wav", "conv_id": "c", "utterance_id": 0, "from": "human",
                                "emotion": "Bored"}) + "\n")
    with pytest.raises(ValueError, match=r"valid_freq_metadata_0001.jsonl:1: unknown emotion 'Bored'"):
        MultiDialogTask(root)
    meta.write_text('{"file_name": "x_a.wav"}\n')
    with pytest.raises(ValueError, match=r"valid_freq_metadata_0001.jsonl:1: missing fields"):
        MultiDialogTask(root)
    with pytest.raises(FileNotFoundError, match="metadata"):
        MultiDialogTask(tmp_path / "md" / "data")


def test_bench_run_on_the_multidialog_sample(snapshot, tmp_path):
    from benchbench.cli import main

    out = tmp_path / "run"
    assert main(["run", "--methods", "lora,mal", "--tasks", "multidialog", "--data-dir", str(snapshot),
                 "--preset", "smoke", "--seeds", "0", "--output", str(out), "--tracking-uri",
                 f"sqlite:///{tmp_path}/m.db", "--no-progress"]) == 0
    res = pd.read_csv(out / "results.csv")
    assert list(res.status) == ["ok", "ok"] and set(res.n_test) == {9} and set(res.n_test_stream) == {18}
