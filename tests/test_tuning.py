"""`bench run --tune N`: one tuning budget per cell on its dev split, never its test split; resumable."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from benchbench import tuning
from benchbench.data import Dialogue, Utterance
from benchbench.harness import RunSpec, _cells


def _cell(tmp_path, task, backbone, method="lora", n=2, fold=None, seed=0, tune_seed=None):
    spec = RunSpec(methods=[method], tasks=["synthetic"], preset="smoke", seeds=[seed], output=str(tmp_path), tune=n,
                   tune_seed=tune_seed)
    folds = [fold or task.folds()[0]]
    (cell,) = _cells(spec, task, task.manifest(), backbone, folds, [method], [seed])
    return cell


def test_trial_0_is_the_preset(tmp_path, backbone, tiny_task):
    """The study's first trial trains the cell's own config (so tuned dev >= untuned dev); later
    ones are the sampler's. Phase-1 values fixed from lora are not part of a two-stage method's trial 0."""
    import optuna

    from benchbench.method import METHODS

    lora = tuning.tune(_cell(tmp_path, tiny_task, backbone, "lora", n=2))
    study = optuna.load_study(study_name=_cell(tmp_path, tiny_task, backbone, "lora").key,
                              storage=tuning.make_storage(f"journal:{lora.journal}"))
    cfg = METHODS.get("lora").make_config("smoke", {})
    first, second = sorted(study.trials, key=lambda t: t.number)
    assert first.params == {"lr": cfg.lr, "r": cfg.r, "epochs": cfg.epochs}
    assert second.params != first.params
    assert lora.value == max(first.value, second.value)
    mal = METHODS.get("mal").make_config("smoke", {})
    values = tuning.preset_values(METHODS.get("mal"), mal, skip={"lora.lr", "lora.r", "lora.epochs"})
    assert values["epochs"] == mal.epochs and values["lr"] == mal.lr and not any(k.startswith("lora.") for k in values)
    # a value the space does not hold is left to the sampler
    assert "lr" not in tuning.preset_values(METHODS.get("lora"), dataclasses.replace(cfg, lr=1.0))


def test_tune_seed_lets_every_seed_take_one_folds_tuning(tmp_path, backbone, tiny_task, monkeypatch):
    """With --tune-seed 0 the seed-1 cell trains with the values tuned at seed 0 (no trial of its own);
    its key and preset label differ from a seed-1 cell tuned on its own."""
    at0 = tuning.tune(_cell(tmp_path, tiny_task, backbone, seed=0, tune_seed=0))
    calls = []
    real = tuning._objective
    monkeypatch.setattr(tuning, "_objective", lambda *a: (calls.append(1), real(*a))[1])
    shared = _cell(tmp_path, tiny_task, backbone, seed=1, tune_seed=0)
    got = tuning.tune(shared)
    assert not calls and got.params == at0.params and got.journal == at0.journal
    own = _cell(tmp_path, tiny_task, backbone, seed=1)
    assert shared.key != own.key
    assert shared.preset.endswith("+tune=2@s0") and own.preset.endswith("+tune=2")


def test_no_trial_sees_the_test_split(tmp_path, backbone, tiny_task):
    """Changing the test split's labels and audio changes no tuned value (the objective gets train and
    dev only), while the cell key (and so the study) is the same."""
    fold = tiny_task.folds()[0]
    rng = np.random.default_rng(1)
    changed = tuple(Dialogue(d.dialogue_id, tuple(
        Utterance(dataclasses.replace(u.input, waveform=rng.standard_normal(len(u.input.waveform)).astype(np.float32)),
                  int(rng.integers(len(tiny_task.labels)))) for u in d.utterances)) for d in fold.test)
    a = tuning.tune(_cell(tmp_path / "a", tiny_task, backbone))
    b = tuning.tune(_cell(tmp_path / "b", tiny_task, backbone, fold=dataclasses.replace(fold, test=changed)))
    assert a.params and a.params == b.params and a.value == b.value and a.trials == b.trials == 2


def test_a_killed_tuning_resumes_without_redoing_finished_trials(tmp_path, backbone, tiny_task, monkeypatch):
    cell = _cell(tmp_path, tiny_task, backbone, n=3)
    calls = []
    real = tuning._objective

    def dies_on_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed mid-trial
        return real(*args)

    monkeypatch.setattr(tuning, "_objective", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        tuning.tune(cell)
    monkeypatch.setattr(tuning, "_objective", lambda *a: (calls.append(1), real(*a))[1])
    calls.clear()
    done = tuning.tune(cell)
    assert len(calls) == 2 and done.trials == 3  # trial 0 was kept; the killed one and the last ran


def test_phase1_is_the_tuned_lora_cells_training(tmp_path, backbone, tiny_task):
    """A two-stage method takes lora's tuned values (fixed in its own study) and searches only its own."""
    lora = tuning.tune(_cell(tmp_path, tiny_task, backbone, "lora"))
    mal = tuning.tune(_cell(tmp_path, tiny_task, backbone, "mal"))
    assert mal.fixed == {f"lora.{k}": v for k, v in lora.params.items()}
    assert not any(k.startswith("lora.") for k in mal.params)
    for k in ("lr", "r", "epochs"):
        assert mal.overrides["lora"][k] == lora.params[k]


def test_bench_run_tunes_every_method_with_one_budget(tmp_path, capsys):
    from benchbench.cli import main

    out = tmp_path / "out"
    args = ["run", "--methods", "lora,mal,hmm,zero_shot", "--tasks", "synthetic", "--preset", "smoke", "--seeds", "0",
            "--tune", "2", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--output", str(out), "--no-progress"]
    assert main(args) == 0
    res = pd.read_csv(out / "results.csv").set_index("method")
    assert res.loc[["lora", "mal", "hmm"], "tuning_trials"].tolist() == [2, 2, 2]
    assert res.loc["zero_shot", "tuning_trials"] == 0
    assert res.loc["zero_shot", "preset"] == "smoke" and res.loc["lora", "preset"] == "smoke+tune=2"  # never "tuned"
    assert json.loads(res.loc["lora", "tuned_params"]) and json.loads(res.loc["mal", "tuned_params"])
    printed = capsys.readouterr().out
    assert "nothing to tune" in printed and "tuned: every method with 2 Optuna trials per cell" in printed
    assert main(["leaderboard", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--output", str(tmp_path / "lb"),
                 "--resamples", "100"]) == 0
    board = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "### synthetic · tiny-qwen2-audio (smoke preset, tuned: 2 trials on dev)" in board  # its own section
    tuned_section = board.split("(smoke preset, tuned: 2 trials on dev)")[1].split("### ")[0]
    assert "zero_shot" not in tuned_section and "| zero_shot" in board  # untuned: its own section
    journal = next((out / "cells").glob("*/artifacts/tuning.journal"))
    assert journal.read_text().count("\n") > 2  # the study is stored with the cell
    assert main(args) == 0  # a second run reuses every cell: nothing tuned or trained again
    assert "cells: 0 computed" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["lora", "mal", "mag", "mac", "dpm", "hmm", "full_context", "ttt", "rmt", "retrieval"])
def test_keeping_the_best_trials_model_equals_training_again(tmp_path, backbone, tiny_task, monkeypatch, method):
    """The tuned cell keeps the best trial's fitted model instead of training again: its test
    predictions equal a retraining with the best values bit for bit, its fit_seconds are that trial's."""
    from benchbench.cells import compute_cell

    kept = compute_cell(_cell(tmp_path / "kept", tiny_task, backbone, method))
    monkeypatch.setattr(tuning, "KEEP_BEST_FIT", False)
    again = compute_cell(_cell(tmp_path / "again", tiny_task, backbone, method))
    assert kept.ok and again.ok, (kept.row.get("error"), again.row.get("error"))
    assert kept.row["fit_from_trial"] in (0, 1) and again.row["fit_from_trial"] == -1
    assert kept.row["tuned_params"] == again.row["tuned_params"]
    probs = [c for c in kept.predictions if c.startswith("p_")]
    pd.testing.assert_frame_equal(kept.predictions[probs], again.predictions[probs], check_exact=True)
    assert kept.row["selected_epoch"] == again.row["selected_epoch"] and kept.row["fit_seconds"] > 0
    assert list(tmp_path.joinpath("kept", "tuning").glob("*.trial*.pt"))  # one kept file per study


def test_tuned_cells_of_one_preset_are_one_configuration_on_the_leaderboard():
    """Tuned cells log the values they trained with (different per fold); the leaderboard's identity
    of their configuration is the preset's config_id, so folds are pooled, never split into label@hash."""
    from leaderboard.collect import _logged_configuration

    cells = pd.DataFrame({"params.method.lr": ["0.001", "0.004", "0.001"], "params.backbone_key": ["b", "b", "b"],
                          "params.tuning_trials": ["4", "4", "0"], "params.config_id": ["c1", "c1", "c1"]})
    ids = _logged_configuration(cells)
    assert ids[0] == ids[1] and ids[2] != ids[0]
