"""The linear probe of a backbone's frozen audio features (`bench probe`, benchbench.probe): it learns
what the features carry and no more, chooses its regularisation on dev, scores test once, and a
recorded probe renders into the documents."""

import numpy as np
import pandas as pd
import pytest
import torch

from benchbench.cli import main
from benchbench.data import Fold
from benchbench.probe import C_GRID, COLUMNS, pooled_features, probe_fold
from benchbench.tools import publish
from benchbench.tools.publish import CommittedRun


class _PlantedFeatures:
    """An audio path whose features ``[T, F]`` are noise plus, when ``signal``, 2.5 x the one-hot of the
    utterance's emotion in the first dimensions (the label looked up by utterance id: the probe itself
    only ever sees ``audio_features(utterance input)``)."""

    def __init__(self, task, signal: bool, dim: int = 16):
        self.name, self.signal, self.dim = "planted", signal, dim
        self.labels = {u.utterance_id: u.label for f in task.folds() for d in f.train + f.dev + f.test
                       for u in d.utterances}

    def audio_features(self, utt):
        g = torch.Generator().manual_seed(int(utt.audio_sha256[:8], 16))
        x = torch.randn(5, self.dim, generator=g)
        if self.signal:
            x[:, self.labels[utt.utterance_id]] += 2.5
        return x


@pytest.fixture(scope="module")
def task():
    from benchbench.tasks.synthetic import SyntheticProsodyTask

    return SyntheticProsodyTask(preset="smoke", n_train=24, n_dev=8, n_test=12, n_turns=4, duration_s=0.32)


def test_the_probe_learns_what_the_features_carry_and_no_more(task):
    fold = task.folds()[0]
    carried = probe_fold(_PlantedFeatures(task, signal=True), fold, task.labels)
    noise = probe_fold(_PlantedFeatures(task, signal=False), fold, task.labels)
    assert carried["wa"] >= 0.9 and carried["ua"] >= 0.9
    assert noise["ua"] < 0.5  # four classes: chance is 0.25
    n_test = sum(u.scored for d in fold.test for u in d.utterances)
    assert carried["n_test"] == n_test == 48 and carried["feature_dim"] == 16
    assert carried["C"] in C_GRID and 0 <= noise["dev_ua"] <= 1


def test_the_regularisation_is_chosen_on_dev_never_on_test(task):
    """Test labels never reach the choice: with the test split's labels permuted (its features kept), the
    chosen C and its dev UA stay; only the test score moves."""
    from dataclasses import replace

    fold = task.folds()[0]
    rng = np.random.default_rng(0)
    test = tuple(replace(d, utterances=tuple(replace(u, label=int(rng.integers(len(task.labels))))
                                             for u in d.utterances)) for d in fold.test)
    backbone = _PlantedFeatures(task, signal=True)
    a = probe_fold(backbone, fold, task.labels)
    b = probe_fold(backbone, Fold(fold.index, fold.train, fold.dev, test), task.labels)
    assert (a["C"], a["dev_ua"]) == (b["C"], b["dev_ua"]) and b["wa"] < a["wa"]


def test_pooled_features_leave_out_context_only_utterances_and_name_an_empty_split(task, backbone):
    from dataclasses import replace

    from benchbench.data import UNSCORED

    d = task.folds()[0].test[0]
    X, y = pooled_features(backbone, [d])
    assert X.shape == (len(d), backbone.audio_features(d.utterances[0].input).shape[-1]) and X.dtype == np.float64
    np.testing.assert_allclose(X[0], backbone.audio_features(d.utterances[0].input).double().mean(0).numpy())
    partly = replace(d, utterances=(replace(d.utterances[0], label=UNSCORED), *d.utterances[1:]))
    assert pooled_features(backbone, [partly])[0].shape[0] == len(d) - 1
    silent = replace(d, utterances=tuple(replace(u, label=UNSCORED) for u in d.utterances))
    with pytest.raises(ValueError, match="no scored utterance among 1 dialogues"):
        pooled_features(backbone, [silent])


def test_bench_probe_writes_a_row_per_fold_and_a_record_renders_it(tmp_path, capsys):
    args = ["probe", "--tasks", "synthetic", "--preset", "smoke", "--task-set", "synthetic.n_train=16",
            "--task-set", "synthetic.n_test=8"]
    threads = torch.get_num_threads()
    assert main([*args, "--threads", str(threads + 1), "--output", str(tmp_path / "p.csv")]) == 0
    assert torch.get_num_threads() == threads  # --threads holds inside the command only
    rows = pd.read_csv(tmp_path / "p.csv")
    assert list(rows.columns) == list(COLUMNS) and len(rows) == 1
    row = rows.iloc[0]
    from benchbench.tasks.synthetic import SyntheticProsodyTask

    fold = SyntheticProsodyTask(preset="smoke", n_train=16, n_test=8).folds()[0]
    assert row.task == "synthetic" and row.backbone == "tiny-qwen2-audio" and len(fold.test) == 8
    assert (row.n_train, row.n_test) == tuple(sum(len(d) for d in s) for s in (fold.train, fold.test))
    assert row.C in C_GRID and 0 <= row.wa <= 1
    out = capsys.readouterr().out
    assert "linear probe of the audio features: synthetic · tiny-qwen2-audio" in out
    assert f"mean over 1 fold(s): WA {100 * row.wa:.2f}, UA {100 * row.ua:.2f}" in out
    assert main(["probe", "--tasks", "synthetic", "--folds", "7"]) == 2  # a fold the task lacks: a clear error
    assert "--folds 7: task synthetic has folds 0" in capsys.readouterr().err

    # two probe commands in one record: each command's rows are kept, in command order
    assert publish.record("probe", ["bench", *args, ";", "bench", *args, "--backbone", "tiny-ultravox"],
                          results=tmp_path) == 0
    run = CommittedRun(tmp_path / "probe")
    kept = pd.read_csv(tmp_path / "probe" / "probe.csv")
    assert kept.backbone.tolist() == ["tiny-qwen2-audio", "tiny-ultravox"]
    assert kept.iloc[0][["wa", "ua", "C"]].tolist() == row[["wa", "ua", "C"]].tolist()  # as `bench probe` wrote it
    view = publish.view_probe(run).splitlines()
    assert view[0].startswith("| task · backbone | features | width | seeds | fold 0: WA · UA | mean: WA · UA |")
    for k, backbone in enumerate(kept.backbone):
        assert view[2 + k].startswith(f"| synthetic · `{backbone}` | audio features | {kept.feature_dim[k]} | – | "
                                      f"{100 * kept.wa[k]:.2f} · {100 * kept.ua[k]:.2f} |")
    with pytest.raises(ValueError, match="--output: the recorder sets it"):
        publish.record("x", ["bench", *args, "--output", "o.csv"], results=tmp_path)
    (tmp_path / "probe" / "probe.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no probe.csv"):
        publish.view_probe(CommittedRun(tmp_path / "probe"))


def test_bench_probe_projector_refuses_a_frozen_projector(capsys):
    """``--projector`` probes a projector that trains with each method; on a backbone whose projector is
    frozen inside the audio path (its output is what the plain probe reads) it stops before any work."""
    assert main(["probe", "--tasks", "synthetic", "--preset", "smoke", "--projector"]) == 2
    err = capsys.readouterr().err
    assert "--projector probes a projector that trains with each method; backbone tiny-qwen2-audio's is frozen" in err


def test_the_probe_view_reads_projector_rows_and_older_files(tmp_path):
    """Rows of the projector's output (two seeds) are grouped by features, the folds averaged over the
    seeds and the chosen C given as a range; a probe.csv without the ``features`` and ``seed`` columns
    (written before they existed) reads as the audio features'."""
    base = {"task": "emodb", "backbone": "b", "n_train": 1, "n_dev": 1, "n_test": 1, "dev_ua": 0.5, "wf1": 0.5,
            "macro_f1": 0.5}
    rows = [{**base, "features": "audio", "seed": None, "fold": f, "feature_dim": 3072, "C": 0.01,
             "wa": 0.8, "ua": 0.7} for f in (0, 1)]
    rows += [{**base, "features": "projector-lora", "seed": s, "fold": f, "feature_dim": 576, "C": [0.1, 1.0][s],
              "wa": 0.5 + 0.1 * s + 0.02 * f, "ua": 0.4} for s in (0, 1) for f in (0, 1)]
    folder = tmp_path / "probe"
    folder.mkdir()
    (folder / "run.json").write_text("{}")  # the view reads probe.csv alone
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(folder / "probe.csv", index=False)
    view = publish.view_probe(CommittedRun(folder)).splitlines()
    assert view[2] == "| emodb · `b` | audio features | 3072 | – | 80.00 · 70.00 | 80.00 · 70.00 | 80.00 · 70.00 | 0.01 0.01 |"
    assert view[3] == ("| emodb · `b` | projector's output after lora's training | 576 | 0,1 | 55.00 · 40.00 | "
                       "57.00 · 40.00 | 56.00 · 40.00 | 0.1 to 1 |")
    pd.DataFrame(rows[:2]).drop(columns=["features", "seed"]).to_csv(folder / "probe.csv", index=False)
    assert publish.view_probe(CommittedRun(folder)).splitlines()[2] == view[2]
