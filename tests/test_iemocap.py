"""IEMOCAP loader on an IEMOCAP-layout folder generated from Emo-DB (real speech, real file formats)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from tests.conftest import EMODB_DIR, missing

pytestmark = pytest.mark.skipif(not (EMODB_DIR / "wav").is_dir(),
                                reason=missing("Emo-DB (the IEMOCAP fixture is built from it)", EMODB_DIR))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from benchbench.tools.fixtures import make_iemocap

    return make_iemocap(EMODB_DIR, tmp_path_factory.mktemp("iemocap"), per_speaker=8)


@pytest.fixture(scope="module")
def task(release):
    from benchbench.tasks.iemocap import IEMOCAPTask

    return IEMOCAPTask(release.parent)  # the parent of IEMOCAP_full_release is accepted too


def _eval_lines(release):
    out = []
    for path in sorted(release.glob("Session*/dialog/EmoEvaluation/*.txt")):
        out += [(path, ln.split("\t")) for ln in path.read_text().splitlines() if ln.startswith("[")]
    return out


def test_every_evaluation_line_is_one_utterance_with_the_merged_label(task, release):
    from benchbench.data import UNSCORED
    from benchbench.tasks.iemocap import LABELS

    lines = _eval_lines(release)
    by_id = {u.utterance_id: u for f in task.folds() for d in f.test for u in d.utterances}
    assert len(by_id) == len(lines) == 80  # 8 clips x 10 speakers, each in one test session
    expect = {"ang": "anger", "hap": "happiness", "exc": "happiness", "neu": "neutral", "sad": "sadness"}
    for _, (_, turn, code, _) in lines:
        u = by_id[turn]
        assert u.label == (LABELS.index(expect[code]) if code in expect else UNSCORED)
        assert u.input.sample_rate == 16000
    codes = {code for _, (_, _, code, _) in lines}
    assert "exc" in codes and "hap" in codes  # the merge is exercised
    assert any(not u.scored for u in by_id.values())  # so are context-only utterances


def test_dialogues_are_in_start_time_order_with_both_speakers(task, release):
    for d in task.folds()[0].test:
        path = release / "Session1" / "dialog" / "EmoEvaluation" / f"{d.dialogue_id}.txt"
        starts = {ln.split("\t")[1]: float(ln[1:].split(" - ")[0]) for ln in path.read_text().splitlines()
                  if ln.startswith("[")}
        order = [starts[u.utterance_id] for u in d.utterances]
        assert order == sorted(order)
        for u in d.utterances:
            assert u.speaker == "Ses01" + u.utterance_id.rsplit("_", 1)[1][0]
    assert {s for d in task.folds()[0].test for s in d.speakers} == {"Ses01F", "Ses01M"}


def test_lines_out_of_time_order_are_sorted(tmp_path, release):
    from benchbench.tasks.iemocap import IEMOCAPTask

    root = tmp_path / "IEMOCAP_full_release"
    shutil.copytree(release, root)
    path = sorted((root / "Session2" / "dialog" / "EmoEvaluation").glob("*.txt"))[0]
    blocks = path.read_text().split("\n\n")
    path.write_text("\n\n".join([blocks[0]] + blocks[1:][::-1]))  # utterance blocks reversed
    d = next(d for f in IEMOCAPTask(root).folds() for d in f.test if d.dialogue_id == path.stem)
    ids = [ln.split("\t")[1] for ln in "\n\n".join(blocks).splitlines() if ln.startswith("[")]
    assert [u.utterance_id for u in d.utterances] == ids


def test_loso_folds_with_dev_carved_from_training_sessions(task):
    folds = task.folds()
    assert len(folds) == 5
    all_ids = {d.dialogue_id for f in folds for d in f.test}
    for k, f in enumerate(folds):
        test_sessions = {d.dialogue_id[:5] for d in f.test}
        assert test_sessions == {f"Ses0{k + 1}"}
        assert not {d.dialogue_id[:5] for d in f.train + f.dev} & test_sessions
        assert f.dev and not {d.dialogue_id for d in f.dev} & {d.dialogue_id for d in f.train}
        assert {d.dialogue_id for d in f.train + f.dev + f.test} == all_ids  # whole dialogues, none lost


def test_count_mismatch_is_stated_in_manifest_and_notices(task):
    m = task.manifest()
    chk = m["count_check"]
    assert chk["match"] is False and chk["expected_total"] == 5531
    assert chk["found_total"] == sum(m["folds"][str(k)]["test"]["n_scored"] for k in range(5))
    assert "expected 5531" in m["notices"][0]
    assert set(m["unscored_codes"]) <= {"fru", "xxx", "oth", "dis", "fea", "sur"}
    per_class = m["folds"]["0"]["test"]["per_class"]
    assert sum(per_class.values()) == m["folds"]["0"]["test"]["n_scored"]


def test_expected_counts_match_when_the_release_is_complete(task, monkeypatch):
    import benchbench.tasks.iemocap as mod

    found = {int(k): v["found"] for k, v in task.count_check["per_session"].items()}
    monkeypatch.setattr(mod, "EXPECTED", found)
    monkeypatch.setattr(mod, "EXPECTED_TOTAL", sum(v["total"] for v in found.values()))
    chk = task._check_counts()
    assert chk["match"] is True and "message" not in chk


def test_missing_wav_is_skipped_and_reported(tmp_path, release):
    from benchbench.tasks.iemocap import IEMOCAPTask

    root = tmp_path / "IEMOCAP_full_release"
    shutil.copytree(release, root)
    victim = sorted(root.glob("Session3/sentences/wav/*/*.wav"))[0]
    victim.unlink()
    t = IEMOCAPTask(root)
    assert t.manifest()["skipped"] == [{"file": str(victim.relative_to(root)), "reason": "missing wav"}]
    assert victim.stem not in {u.utterance_id for f in t.folds() for d in f.test for u in d.utterances}


def test_bad_input_names_the_file(tmp_path, release):
    from benchbench.tasks.iemocap import IEMOCAPTask

    with pytest.raises(FileNotFoundError, match="IEMOCAP_full_release"):
        IEMOCAPTask(tmp_path)
    root = tmp_path / "IEMOCAP_full_release"
    shutil.copytree(release, root)
    path = sorted((root / "Session1" / "dialog" / "EmoEvaluation").glob("*.txt"))[0]
    path.write_text(path.read_text() + "[broken line\n")
    with pytest.raises(ValueError, match=f"{path.name}:\\d+"):
        IEMOCAPTask(root)


def test_unscored_utterances_are_context_not_targets(task, backbone):
    from benchbench.training import utterance_examples
    from benchbench.metrics import evaluate

    f = task.folds()[0]
    n_scored = sum(int(d.scored.sum()) for d in f.train)
    assert len(utterance_examples(backbone, f.train)) == n_scored < sum(len(d) for d in f.train)

    class Constant:  # predicts class 0 everywhere; metrics must count only the scored utterances
        def predict_dialogue(self, inputs):
            return np.tile([1.0, 0, 0, 0], (len(inputs), 1))

    y = np.concatenate([d.labels[d.scored] for d in f.test])
    assert evaluate(Constant(), f.test, task.labels)["wa"] == pytest.approx(np.mean(y == 0))


def _run(release, tmp_path, extra):
    from benchbench.cli import main

    out = tmp_path / "run"
    rc = main(["run", "--methods", "mal,dpm", "--tasks", "iemocap", "--data-dir", str(release),
               "--preset", "smoke", "--output", str(out), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
               "--no-progress", *extra])
    assert rc == 0
    return out


def _check_run(out, task, n_cells):
    res = pd.read_csv(out / "results.csv")
    assert len(res) == n_cells and (res.status == "ok").all()
    preds = pd.read_csv(out / "predictions.csv")
    scored = {u.utterance_id for f in task.folds() if f.index in set(res.fold)
              for d in f.test for u in d.utterances if u.scored}
    assert set(preds.utterance_id) == scored  # context-only utterances are never scored
    for _, r in res.iterrows():
        assert r.n_test == len(preds[(preds.method == r.method) & (preds.seed == r.seed) & (preds.fold == r.fold)])
        assert r.n_test < r.n_test_stream
    summary = json.loads((out / "summary.json").read_text())
    assert "expected 5531" in summary["tasks"]["iemocap"]["notices"][0]
    manifest = json.loads((out / "manifest-iemocap.json").read_text())
    assert manifest["count_check"]["match"] is False


def test_bench_run_mal_dpm_on_the_iemocap_fixture_one_fold(release, task, tmp_path, capsys):
    out = _run(release, tmp_path, ["--seeds", "0", "--folds", "0"])
    _check_run(out, task, 2)
    assert "NOTICE iemocap" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_run_mal_dpm_on_the_iemocap_fixture_exact_command(release, task, tmp_path):
    """The issue's command as given: 2 methods x 3 seeds x 5 folds."""
    _check_run(_run(release, tmp_path, []), task, 30)
