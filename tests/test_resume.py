"""Runs that survive crashes: cell keys, reuse from the tracking store and the output folder,
dead RUNNING runs marked KILLED, SIGTERM handled like Ctrl-C, checks before any work, a movable
sqlite store. Real subprocesses (the ``bench`` console script), real signals, a real sqlite store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

# 3 tiny cells x 2 methods: seconds each; the synthetic task at a size the smoke preset fits fast
TINY = ["--tasks", "synthetic", "--preset", "smoke", "--seeds", "0,1", "--no-progress",
        "--task-set", "synthetic.n_train=6", "--task-set", "synthetic.n_dev=2", "--task-set", "synthetic.n_test=3",
        "--task-set", "synthetic.n_turns=4", "--task-set", "synthetic.duration_s=0.64"]
METHODS = ["--methods", "lora,zero_shot"]


def _bench(*args: str, cwd: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "benchbench.cli", "run", *args]


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "BENCHBENCH_CACHE": str(cwd / "cache")}
    return subprocess.Popen(_bench(*args, cwd=cwd), cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_rows(results: Path, n: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if results.exists() and len(pd.read_csv(results)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"bench exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {n} rows in {results} after {timeout} s")


def _runs(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([client.get_experiment_by_name("benchbench").experiment_id], max_results=1000)


def _cell_lines(predictions: Path, key: str) -> list[str]:
    lines = predictions.read_text().splitlines()
    col = lines[0].split(",").index("cell_key")
    return [line for line in lines[1:] if line.split(",")[col] == key]


def _assert_each_cell_finished_once(uri: str, n_cells: int) -> None:
    runs = _runs(uri)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    cells = [r for r in runs if "cell_key" in r.data.tags and r.info.status == "FINISHED"]
    keys = [r.data.tags["cell_key"] for r in cells]
    assert len(keys) == len(set(keys)) == n_cells


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_resumes_with_every_cell_once(tmp_path, how):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    out = tmp_path / "out"
    # 8 cells: the signal lands while cells still run (with 4 tiny ones an idle machine may finish first)
    args = [*METHODS, *TINY, "--seeds", "0,1,2,3", "--tracking-uri", uri, "--output", str(out)]
    proc = _start(args, tmp_path)
    _wait_for_rows(out / "results.csv", 1, proc)
    proc.send_signal(how)
    _, err = proc.communicate(timeout=120)
    first = pd.read_csv(out / "results.csv", dtype={"cell_key": str})
    key = first["cell_key"][0]
    first_lines = _cell_lines(out / "predictions.csv", key)
    assert first_lines
    (parent,) = [r for r in _runs(uri) if "cell_key" not in r.data.tags]
    if how == signal.SIGTERM:  # handled like Ctrl-C: the parent KILLED, what finished in summary.json
        assert proc.returncode == 143 and "Traceback" not in err and "stopped by SIGTERM" in err
        assert parent.info.status == "KILLED"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["run"]["status"] == "KILLED" and len(summary["cells"]) >= 1
    else:  # nothing ran to mark it: the next run against the store finds the dead process
        assert proc.returncode == -9 and parent.info.status == "RUNNING"

    again = subprocess.run(_bench(*args, cwd=tmp_path), cwd=tmp_path, capture_output=True, text=True,
                           env={**os.environ, "BENCHBENCH_CACHE": str(tmp_path / "cache")})
    assert again.returncode == 0, again.stderr[-2000:]
    n_done = len(first)
    assert n_done < 8 and f"{8 - n_done} computed, {n_done} reused" in again.stdout
    runs = _runs(uri)
    assert [r.info.status for r in runs if r.info.run_id == parent.info.run_id] == ["KILLED"]
    _assert_each_cell_finished_once(uri, 8)
    results = pd.read_csv(out / "results.csv", dtype={"cell_key": str})
    assert len(results) == 8 and set(results["status"]) == {"ok"} and results["reused"].sum() == n_done
    assert _cell_lines(out / "predictions.csv", key) == first_lines  # byte-identical

    # the store is one folder: moved elsewhere, a new output folder reuses every cell from it
    shutil.move(tmp_path / "store", tmp_path / "moved")
    assert not (tmp_path / "mlruns").exists()  # artifacts went beside the database, not into the cwd
    uri2 = f"sqlite:///{tmp_path / 'moved' / 'mlflow.db'}"
    out2 = tmp_path / "out2"
    third = subprocess.run(_bench(*[*METHODS, *TINY, "--seeds", "0,1,2,3", "--tracking-uri", uri2, "--output",
                                    str(out2)], cwd=tmp_path),
                           cwd=tmp_path, capture_output=True, text=True,
                           env={**os.environ, "BENCHBENCH_CACHE": str(tmp_path / "cache")})
    assert third.returncode == 0 and "0 computed, 8 reused" in third.stdout, third.stderr[-2000:]
    assert (out2 / "predictions.csv").read_bytes() == (out / "predictions.csv").read_bytes()


@pytest.mark.parametrize("bad, message", [
    (["--folds", "99"], "--folds 99: task synthetic has folds 0"),
    (["--methods", "lora", "--set", "lora.lr=abc"], "--set lora.lr='abc': expected a float"),
    (["--methods", "lora", "--set", "lora.lr=-1"], "--set lora.lr=-1.0: expected > 0"),
    (["--methods", "lora", "--set", "mal.lr=5"], "--set mal.*: method 'mal' is not in --methods"),
    (["--methods", "lora", "--tasks", "emodb"], "--data-dir is required (a folder, or emodb=FOLDER): task emodb reads Emo-DB"),
    (["--methods", "lora", "--tasks", "iemocap", "--data-dir", "/nonexistent"],
     "--data-dir /nonexistent: no such folder (task iemocap reads IEMOCAP_full_release"),
    (["--task-set", "synthetic.preset_size=3"], "unknown option(s) ['preset_size']"),
    pytest.param(["--output", "/sys/benchbench-out"], "--output /sys/benchbench-out: cannot write in /sys (",
                 marks=pytest.mark.skipif(not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and os.getuid() != 0,
                                          reason="needs a read-only /sys (Linux)")),
])
def test_bad_input_exits_2_before_anything_is_written(tmp_path, bad, message, capsys, monkeypatch):
    from benchbench.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", "--methods", "lora", "--tasks", "synthetic", "--preset", "smoke", "--seeds", "0",
            "--tracking-uri", uri, "--output", str(tmp_path / "out"), "--no-progress"]
    for i in range(0, len(bad), 2):  # a later option of the same name replaces the default one
        if bad[i] in args:
            args[args.index(bad[i]) + 1] = bad[i + 1]
        else:
            args += bad[i:i + 2]
    if bad == ["--folds", "99"]:  # the console script's process: its exit status and stderr
        done = subprocess.run([sys.executable, "-m", "benchbench.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True)
        returncode, stderr = done.returncode, done.stderr
    else:  # the same `main` in this process (a process start costs seconds): what it returns and prints
        monkeypatch.chdir(tmp_path)
        returncode, stderr = main(args), capsys.readouterr().err
    assert returncode == 2 and message in stderr and "Traceback" not in stderr, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output folder, no store, no mlruns


def test_an_output_under_a_file_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from benchbench.cli import main

    (tmp_path / "notes.txt").write_text("a file, not a folder\n")
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--methods", "lora", "--tasks", "synthetic", "--preset", "smoke", "--output",
               str(tmp_path / "notes.txt" / "run"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--output {tmp_path / 'notes.txt' / 'run'}: {tmp_path / 'notes.txt'} is a file, not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_stale_run_detection(tmp_path):
    """A RUNNING run is stale when its process is gone (same host) or its heartbeat is old (any host)."""
    from benchbench.tracking import STALE_AFTER_S, is_stale, process_tags

    me = process_tags()
    assert not is_stale(me)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert is_stale({**me, "pid": str(dead.pid), "pid_start": ""})
    assert is_stale({**me, "host": "elsewhere", "heartbeat": str(time.time() - STALE_AFTER_S - 1)})
    assert not is_stale({**me, "host": "elsewhere"})
    assert not is_stale({})  # an older suite's run: never taken for dead


def _run_to_end(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_bench(*args), cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "BENCHBENCH_CACHE": str(cwd / "cache"), **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_ray_executor_gives_the_local_executors_predictions_and_survives_a_lost_worker(tmp_path):
    """Two Ray workers on this machine: predictions.csv byte-identical to the local executor's; a
    worker killed mid-cell is retried and every cell ends FINISHED exactly once."""
    pytest.importorskip("ray")
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    _run_to_end([*METHODS, *TINY, "--tracking-uri", f"sqlite:///{tmp_path / 'a.db'}", "--output", str(local)],
                tmp_path)
    uri = f"sqlite:///{tmp_path / 'b.db'}"
    proc = _start([*METHODS, *TINY, "--tracking-uri", uri, "--output", str(ray_out), "--executor", "ray",
                   "--cpus-per-cell", "1"], tmp_path)
    killed = None
    t0 = time.time()
    while killed is None and proc.poll() is None and time.time() - t0 < 600:
        ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        busy = [int(line.split()[0]) for line in ps.splitlines() if "ray::_worker_cell" in line]
        if busy:
            killed = busy[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=900)
    assert killed is not None and proc.returncode == 0, err[-3000:]
    assert "4 computed, 0 reused" in out
    _assert_each_cell_finished_once(uri, 4)
    assert (ray_out / "predictions.csv").read_bytes() == (local / "predictions.csv").read_bytes()
    assert (pd.read_csv(ray_out / "results.csv")["status"] == "ok").all()


@pytest.mark.slow
def test_ray_workers_replay_phase1_from_disk(tmp_path):
    """`--executor ray` with a two-stage method: each mal cell is started after its seed's lora cell
    and, in another worker process, replays that training from the on-disk Phase-1 cache
    (``phase1_replayed``); the predictions are byte-identical to the local executor's."""
    pytest.importorskip("ray")
    args = ["--methods", "mal,lora", *TINY]  # mal listed first: the order is the executor's business
    _run_to_end([*args, "--tracking-uri", f"sqlite:///{tmp_path / 'a.db'}", "--output", str(tmp_path / "local")],
                tmp_path, BENCHBENCH_PHASE1_CACHE="0")
    done = _run_to_end([*args, "--tracking-uri", f"sqlite:///{tmp_path / 'b.db'}", "--output", str(tmp_path / "ray"),
                        "--executor", "ray"], tmp_path, BENCHBENCH_PHASE1_CACHE="1")
    assert "4 computed, 0 reused" in done.stdout
    rows = pd.read_csv(tmp_path / "ray" / "results.csv")
    assert (rows["status"] == "ok").all()
    assert rows.groupby("method_name")["phase1_replayed"].apply(set).to_dict() == {"lora": {False}, "mal": {True}}
    assert len(list((tmp_path / "cache" / "phase1").rglob("*.pt"))) == 2  # one training per seed
    assert (tmp_path / "ray" / "predictions.csv").read_bytes() == (tmp_path / "local" / "predictions.csv").read_bytes()


@pytest.mark.slow
def test_ray_fan_out_against_an_mlflow_tracking_server_and_resume(tmp_path):
    """What a cluster uses: a real `mlflow server` on 127.0.0.1, cells logged by Ray workers, and the
    same command again reusing every cell from the server."""
    pytest.importorskip("ray")
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}", "--workers", "1"],
                              cwd=server_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        args = [*METHODS, *TINY, "--tracking-uri", uri, "--executor", "ray"]
        first = _run_to_end([*args, "--output", str(tmp_path / "one")], tmp_path)
        assert "4 computed, 0 reused" in first.stdout
        again = _run_to_end([*args, "--output", str(tmp_path / "two")], tmp_path)
        assert "0 computed, 4 reused" in again.stdout
        _assert_each_cell_finished_once(uri, 4)
        assert (tmp_path / "one" / "predictions.csv").read_bytes() == (tmp_path / "two" / "predictions.csv").read_bytes()
        assert (server_dir / "mlartifacts").is_dir()  # the server keeps the artifacts, not the workers' cwd
    finally:
        server.terminate()
        server.wait(timeout=60)
