"""`bench sweep`: Optuna studies on dev, shared by workers, resumed, exported to `bench run --config`."""

import json
import subprocess
import sys

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from benchbench.cli import main
from benchbench.method import METHODS
from benchbench.sweep import load_config_file, make_storage

SMOKE = ["--task", "synthetic", "--preset", "smoke"]


def _sweep_cmd(tmp, study, trials, method="lora"):
    return ["sweep", "--method", method, *SMOKE, "--trials", str(trials), "--study", study,
            "--storage", f"journal:{tmp / 'optuna.journal'}", "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--export", str(tmp / f"{study}.best.json")]


def _finished(study):
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))


@pytest.mark.parametrize("name", [n for n in METHODS.names() if n != "zero_shot"])
def test_every_trainable_method_declares_a_search_space(name):
    cls = METHODS.get(name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    overrides = cls.search_space(trial)
    assert trial.params, f"{name}: empty search space"
    config = cls.make_config("smoke", overrides)  # every sampled value is a valid config option
    flat = config.flat()
    for key, value in trial.params.items():
        assert flat[key] == value, (name, key)


def test_a_method_without_search_space_is_refused(tmp_path, capsys):
    assert main(_sweep_cmd(tmp_path, "zs", 1, method="zero_shot")) == 2
    assert "zero_shot declares no search space" in capsys.readouterr().err


def test_two_workers_share_one_study_and_a_restart_continues_it(tmp_path, capsys):
    cmd = [sys.executable, "-m", "benchbench.cli", *_sweep_cmd(tmp_path, "shared", 4)]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    for w, (out, err) in zip(workers, outs):
        assert w.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="shared", storage=make_storage(f"journal:{tmp_path / 'optuna.journal'}"))
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == numbers[-1] + 1          # no duplicate trial
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert 4 <= len(trials) <= 5   # each worker stops once 4 have finished (one may be in flight then)
    ran = [int(out.split(" run by this worker")[0].rsplit(", ", 1)[1]) for out, _ in outs]
    assert sum(ran) == len(trials)                                         # nothing lost, nothing run twice

    # MLflow: one parent for the study, one child per trial, dev values equal Optuna's
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("benchbench")
    runs = client.search_runs([exp.experiment_id], "tags.optuna_study = 'shared'")
    parents = [r for r in runs if r.data.tags.get("sweep_parent") == "1"]
    children = [r for r in runs if "optuna_trial" in r.data.tags]
    assert len(parents) == 1
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == numbers
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            child = next(r for r in children if r.data.tags["optuna_trial"] == str(t.number))
            assert child.data.metrics["objective_dev_ua"] == pytest.approx(t.value)
            assert child.data.params["method.lr"] == str(t.params["lr"])

    # restarted with a larger target (a worker in this process: `main`, as the console script calls it):
    # the same study goes on, only the missing trials run
    capsys.readouterr()
    assert main(_sweep_cmd(tmp_path, "shared", len(trials) + 1)) == 0, capsys.readouterr().err[-3000:]
    assert f"{len(trials) + 1} finished trials, 1 run by this worker" in capsys.readouterr().out
    # and with the target already met, a restart runs nothing
    assert main(_sweep_cmd(tmp_path, "shared", 2)) == 0 and ", 0 run by this worker" in capsys.readouterr().out


def test_best_config_runs_with_bench_run_config(tmp_path):
    assert main(_sweep_cmd(tmp_path, "best", 2)) == 0
    path = tmp_path / "best.best.json"
    doc = json.loads(path.read_text())
    study = optuna.load_study(study_name="best", storage=make_storage(f"journal:{tmp_path / 'optuna.journal'}"))
    assert doc["sweep"]["trial"] == study.best_trial.number and doc["sweep"]["value"] == study.best_value
    assert doc["methods"]["lora"]["lr"] == study.best_trial.params["lr"]
    assert load_config_file(path)["lora"]["r"] == study.best_trial.params["r"]

    out = tmp_path / "run"
    rc = main(["run", "--config", str(path), "--tasks", "synthetic", "--preset", "smoke", "--seeds", "0",
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--output", str(out), "--no-progress"])
    assert rc == 0
    res = pd.read_csv(out / "results.csv")
    # the sweep's values depart from the smoke preset: the label says which (floats to 4 digits)
    lora = METHODS.get("lora")
    tuned = lora.make_config("smoke", load_config_file(path)["lora"])
    assert res["method"].tolist() == [lora.label(tuned, "smoke")] and res["method"][0].startswith("lora{")
    assert f"lr={study.best_trial.params['lr']:.4g}" in res["method"][0]
    assert res["method_name"].tolist() == ["lora"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(res["mlflow_run_id"][0])
    assert float(run.data.params["method.lr"]) == pytest.approx(study.best_trial.params["lr"])
    assert int(run.data.params["method.epochs"]) == study.best_trial.params["epochs"]


def test_config_file_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": 1, "methods": {"lora": {"nope": 1}}}))
    assert main(["run", "--config", str(bad), "--tasks", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "nope" in err
    bad.write_text("{not json")
    assert main(["run", "--config", str(bad), "--tasks", "synthetic"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_sweep_takes_the_task_and_backbone_options_of_bench_run(tmp_path, capsys):
    cmd = _sweep_cmd(tmp_path, "opts", 1) + ["--task-set", "synthetic.n_train=3", "--task-set", "synthetic.n_test=1",
                                              "--task-set", "synthetic.n_turns=4", "--backbone", "tiny-audio-flamingo-3"]
    assert main(cmd) == 0
    doc = json.loads((tmp_path / "opts.best.json").read_text())
    assert doc["sweep"]["task_options"] == {"n_train": 3, "n_test": 1, "n_turns": 4}
    assert doc["sweep"]["backbone"] == "tiny-audio-flamingo-3"
    (run,) = [r for r in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("benchbench").experiment_id],
        "tags.optuna_trial = '0'")]
    assert run.data.params["preset"] == "smoke+n_test=1+n_train=3+n_turns=4"
    assert run.data.params["backbone"] == "tiny-audio-flamingo-3"
    # refused before any trial: an unknown task option, another task's option, a load option on a tiny backbone
    capsys.readouterr()
    assert main(_sweep_cmd(tmp_path, "bad", 1) + ["--task-set", "synthetic.n_trian=3"]) == 2
    assert "unknown option(s) ['n_trian']" in capsys.readouterr().err
    assert main(_sweep_cmd(tmp_path, "bad", 1) + ["--task-set", "emodb.seed=1"]) == 2
    assert "not the swept task" in capsys.readouterr().err
    assert main(_sweep_cmd(tmp_path, "bad", 1) + ["--weights", str(tmp_path)]) == 2
    assert "built from a config" in capsys.readouterr().err


def test_a_killed_sweep_workers_run_is_marked_killed_by_the_next_start(tmp_path):
    """A trial's MLflow run carries its worker's process tags (CellStore): a worker killed mid-trial
    leaves it RUNNING, and the next `bench sweep` on the store marks it KILLED before its own trials."""
    import os
    import signal
    import time

    from benchbench.tracking import open_store

    cmd = [sys.executable, "-m", "benchbench.cli", *_sweep_cmd(tmp_path, "killed", 3, method="mal")]
    worker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    running, t0 = None, time.time()
    while running is None and time.time() - t0 < 300:
        assert worker.poll() is None, worker.communicate()[1][-3000:]
        if (tmp_path / "mlflow.db").exists():
            client, exp_id = open_store(uri)  # under the store's lock: the worker may be migrating it
            found = client.search_runs([exp_id], "tags.optuna_study = 'killed' and attributes.status = 'RUNNING'")
            running = next((r for r in found or [] if "optuna_trial" in r.data.tags), None)
        time.sleep(0.1)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    assert running is not None and running.data.tags["pid"] == str(worker.pid) and "heartbeat" in running.data.tags
    assert MlflowClient(uri).get_run(running.info.run_id).info.status == "RUNNING"
    res = subprocess.run([sys.executable, "-m", "benchbench.cli", *_sweep_cmd(tmp_path, "killed", 1)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    dead = MlflowClient(uri).get_run(running.info.run_id)
    assert dead.info.status == "KILLED" and "stale process" in dead.data.tags["killed_by"]


def test_sweep_checks_its_inputs_as_bench_run_does(tmp_path, capsys):
    """The same builder and checks as `bench run` (harness.prepare): the same messages."""
    assert main(_sweep_cmd(tmp_path, "x", 1) + ["--fold", "7"]) == 2
    assert "--folds 7: task synthetic has folds 0" in capsys.readouterr().err
    cmd = ["sweep", "--method", "lora", "--task", "emodb", "--trials", "1", "--storage",
           f"journal:{tmp_path / 'j.journal'}", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(cmd) == 2
    assert "--data-dir is required (a folder, or emodb=FOLDER): task emodb reads Emo-DB" in capsys.readouterr().err
    assert main(cmd + ["--data-dir", str(tmp_path / "nowhere")]) == 2
    assert f"--data-dir {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # refused before any store is opened
