"""The tracking store is not a single point of failure, and two drivers on one store compute each
cell once. Real subprocesses (the ``bench`` console script), a real ``mlflow server`` on 127.0.0.1
killed and restarted, a real sqlite store shared by two drivers started together."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.test_resume import METHODS, TINY, _assert_each_cell_finished_once, _bench, _runs

ENV = {"BENCHBENCH_RECONNECT_EVERY_S": "1", "BENCHBENCH_CLAIM_POLL_S": "1"}


def _env(cwd: Path) -> dict:
    return {**os.environ, "BENCHBENCH_CACHE": str(cwd / "cache"), **ENV}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(port: int, folder: Path) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:port with its database and artifacts in ``folder``; returns
    once it answers /health."""
    folder.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--workers", "1"],
                            cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("mlflow server did not start")


def _kill(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, as a crash would
    server.wait(timeout=60)


def _counts(stdout: str) -> tuple[int, int]:
    m = re.search(r"cells: (\d+) computed, (\d+) reused", stdout)
    assert m, stdout[-2000:]
    return int(m.group(1)), int(m.group(2))


def test_an_unreachable_store_costs_no_cell_and_one_line(tmp_path):
    """Nothing listens on the tracking URI: the run computes every cell into its output folder
    (results, predictions, summary, each cell's folder unlogged), says so in one line, no traceback,
    and takes seconds, not MLflow's minutes of retries."""
    uri = f"http://127.0.0.1:{_free_port()}"
    out = tmp_path / "out"
    t0 = time.time()
    done = subprocess.run(_bench(*METHODS, *TINY, "--tracking-uri", uri, "--output", str(out)), cwd=tmp_path,
                          capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.time() - t0 < 240
    text = done.stdout + done.stderr
    assert "Traceback" not in text and text.count("NOTICE: tracking store") == 1, text[-3000:]
    assert "cell(s) are in" in done.stdout  # and the last line says where they are
    assert _counts(done.stdout) == (4, 0)
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4 and set(results["status"]) == {"ok"} and results["mlflow_run_id"].isna().all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["cells_not_logged"] == 4 and summary["run"]["mlflow_parent_run_id"] is None
    folders = sorted((out / "cells").iterdir())
    assert [f.name for f in folders] == sorted(results["cell_key"])
    assert all((f / "artifacts" / "predictions.csv").exists() and not (f / "logged.json").exists() for f in folders)


@pytest.mark.slow
def test_a_tracking_server_killed_mid_run_and_restarted_loses_nothing(tmp_path):
    """A real `mlflow server` killed after the first cell is logged: the run goes on and computes every
    cell (exit 0, one line, no traceback); restarted, the same command computes nothing, logs the cells
    that were computed meanwhile, and every cell is FINISHED in the store exactly once."""
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _server(port, tmp_path / "server")
    out = tmp_path / "out"
    args = [*METHODS, *TINY, "--seeds", "0,1,2,3", "--tracking-uri", uri, "--output", str(out)]
    proc = subprocess.Popen(_bench(*args), cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        client = MlflowClient(tracking_uri=uri)
        t0 = time.time()
        while time.time() - t0 < 600:
            exp = client.get_experiment_by_name("benchbench")
            if exp and client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=1):
                break
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        _kill(server)
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    text = stdout + stderr
    assert "Traceback" not in text and text.count("NOTICE: tracking store") == 1, text[-3000:]
    assert _counts(stdout) == (8, 0)
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 8 and set(results["status"]) == {"ok"}
    n_unlogged = json.loads((out / "summary.json").read_text())["run"]["cells_not_logged"]
    assert 1 <= n_unlogged <= 7  # some were logged before the kill, the rest wait in the folder
    before = (out / "predictions.csv").read_bytes()

    server = _server(port, tmp_path / "server")
    try:
        again = subprocess.run(_bench(*args), cwd=tmp_path, capture_output=True, text=True, env=_env(tmp_path),
                               timeout=900)
        assert again.returncode == 0, again.stderr[-3000:]
        assert _counts(again.stdout) == (0, 8)
        assert f"logged {n_unlogged} cell(s) computed while the tracking store was unreachable" in again.stdout + again.stderr
        _assert_each_cell_finished_once(uri, 8)
        results = pd.read_csv(out / "results.csv")
        assert results["mlflow_run_id"].notna().all()
        logged = {r.data.tags["cell_key"]: r.info.run_id for r in _runs(uri) if r.info.status == "FINISHED"
                  and "cell_key" in r.data.tags}
        assert dict(zip(results["cell_key"], results["mlflow_run_id"])) == logged
        assert (out / "predictions.csv").read_bytes() == before  # nothing recomputed
        assert all((f / "logged.json").exists() for f in (out / "cells").iterdir())
    finally:
        _kill(server)


@pytest.mark.slow
def test_two_drivers_started_together_compute_each_cell_once(tmp_path):
    """Two identical `bench run`s started at once on one sqlite store, each into its own folder: each
    cell is computed by one of them (claimed in the store), reused by the other when it finishes;
    both folders are complete and agree, and each cell is FINISHED once in the store."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    subprocess.run(_bench("--methods", "zero_shot", *TINY, "--seeds", "9", "--tracking-uri", uri, "--output",
                          str(tmp_path / "warm")), cwd=tmp_path, env=_env(tmp_path), check=True, capture_output=True)
    args = [*METHODS, *TINY, "--seeds", "0,1,2,3", "--tracking-uri", uri]
    procs = [subprocess.Popen(_bench(*args, "--output", str(tmp_path / name)), cwd=tmp_path, env=_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    counts = [_counts(o) for o, _ in outs]
    assert sum(c for c, _ in counts) == 8 and all(c + r == 8 for c, r in counts), counts
    _assert_each_cell_finished_once(uri, 9)
    a, b = (pd.read_csv(tmp_path / n / "results.csv") for n in ("a", "b"))
    assert len(a) == len(b) == 8 and set(a["status"]) == set(b["status"]) == {"ok"}
    assert list(a["cell_key"]) == list(b["cell_key"]) and list(a["mlflow_run_id"]) == list(b["mlflow_run_id"])
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == (tmp_path / "b" / "predictions.csv").read_bytes()
    assert (a["reused"] != b["reused"]).all()  # each cell computed by exactly one of the two
