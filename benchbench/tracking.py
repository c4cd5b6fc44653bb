"""MLflow logging: one parent run per ``bench run``, one child run per cell.

Every run records where it runs (tags ``host``, ``pid``, ``pid_start`` and a ``heartbeat`` refreshed
while it works). A run left RUNNING by a process that died (same host: the pid is gone or is another
process; any host: no heartbeat for :data:`STALE_AFTER_S`) is marked KILLED by the next
:class:`Tracker` on the same store, so its cells are never taken for finished ones.

With a ``sqlite:///PATH`` store, artifacts live in ``mlartifacts/`` beside the database file and are
read back relative to it (:func:`cell_artifact`), so the store is one folder that can be moved.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pandas as pd
from filelock import FileLock
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

TRACKED_PACKAGES = ("benchbench", "torch", "transformers", "peft", "titans-pytorch", "scikit-learn",
                    "numpy", "scipy", "pandas", "mlflow")
EXPERIMENT = "benchbench"
STALE_AFTER_S = float(os.environ.get("BENCHBENCH_STALE_AFTER_S", 6 * 3600))
"""A RUNNING run whose heartbeat is older than this (seconds) is taken for dead, on any host."""
HEARTBEAT_EVERY_S = 60.0


def _pid_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or ``""``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """Where this process runs: ``host``, ``pid``, ``pid_start``, ``heartbeat`` (unix seconds)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": str(pid), "pid_start": _pid_start(pid),
            "heartbeat": f"{time.time():.0f}"}


def is_stale(tags: dict, now: float | None = None) -> bool:
    """Whether a RUNNING run's process is gone: on this host its pid is dead or was reused by
    another process; on any host its heartbeat is older than :data:`STALE_AFTER_S`. A run without
    a heartbeat (an older suite's) is never taken for stale."""
    now = time.time() if now is None else now
    if "heartbeat" not in tags:
        return False
    if tags.get("host") == socket.gethostname() and tags.get("pid", "").isdigit():
        pid = int(tags["pid"])
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        if tags.get("pid_start") and _pid_start(pid) and _pid_start(pid) != tags["pid_start"]:
            return True
    return now - float(tags["heartbeat"]) > STALE_AFTER_S


def sqlite_database(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` store, resolved (``None`` for other stores)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):]).resolve()


def sqlite_store_dir(tracking_uri: str) -> Path | None:
    """The folder of a ``sqlite:///PATH`` store's database file (``None`` for other stores)."""
    db = sqlite_database(tracking_uri)
    return None if db is None else db.parent


def open_store(tracking_uri: str, name: str = EXPERIMENT) -> tuple[MlflowClient, str]:
    """``(client, experiment id)`` for the store at ``tracking_uri``, the experiment created when
    missing (:func:`ensure_experiment`). A sqlite store is opened under a file lock
    (``<database>.lock``): two processes starting on a new database at once (two ``bench sweep``
    workers) would otherwise both run MLflow's schema migrations on it (the client runs them when
    created), and one fails with ``table _alembic_tmp_experiments already exists``, leaving the
    database half-migrated; or both would create the experiment."""
    db = sqlite_database(tracking_uri)
    with FileLock(f"{db}.lock") if db is not None else nullcontext():
        client = MlflowClient(tracking_uri=tracking_uri)
        return client, ensure_experiment(client, tracking_uri, name)


def ensure_experiment(client: MlflowClient, tracking_uri: str, name: str = EXPERIMENT) -> str:
    """The experiment's id, created when missing; in a sqlite store with its artifacts in
    ``mlartifacts/`` beside the database (not ``./mlruns`` of wherever the command ran)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    store = sqlite_store_dir(tracking_uri)
    location = (store / "mlartifacts" / name).as_uri() if store is not None else None
    return client.create_experiment(name, artifact_location=location)


def cell_artifact(client: MlflowClient, tracking_uri: str, run, path: str, dst: str) -> Path:
    """Download artifact ``path`` of ``run`` into ``dst``. In a sqlite store whose folder was moved,
    the recorded absolute artifact path no longer exists: the same relative path under
    ``mlartifacts/`` beside the database is read instead."""
    store = sqlite_store_dir(tracking_uri)
    uri = run.info.artifact_uri
    if store is not None and uri.startswith("file://"):
        recorded = Path(uri[len("file://"):])
        if not recorded.exists() and "mlartifacts" in recorded.parts:
            i = len(recorded.parts) - 1 - recorded.parts[::-1].index("mlartifacts")
            moved = store.joinpath(*recorded.parts[i:]) / path
            if moved.exists():
                return moved
    return Path(client.download_artifacts(run.info.run_id, path, dst))


def reap_stale_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose process is gone (:func:`is_stale`);
    returns their ids."""
    from mlflow.entities import ViewType

    killed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=5000):
        if is_stale(run.data.tags):
            client.set_terminated(run.info.run_id, status="KILLED")
            client.set_tag(run.info.run_id, "killed_by", f"stale process, found by pid {os.getpid()} on "
                                                         f"{socket.gethostname()}")
            killed.append(run.info.run_id)
    return killed


def package_versions() -> dict[str, str]:
    out = {}
    for p in TRACKED_PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


def git_commit() -> str:
    """The suite's git commit (``-dirty`` when the work tree has changes), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def _param_value(v) -> str:
    s = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return s[:6000]


class Tracker:
    """Thin wrapper over MLflow for the harness (``tracking_uri=None``: MLflow's default store).

    Opening one marks the store's dead RUNNING runs KILLED (:func:`reap_stale_runs`; their ids in
    ``reaped``) before the parent run starts."""

    def __init__(self, tracking_uri: str | None, run_name: str, params: dict, tags: dict):
        # reading reused cells' artifacts must not print MLflow's download bars through the terminal
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.tracking_uri = mlflow.get_tracking_uri()
        self.client, self.experiment_id = open_store(self.tracking_uri)
        mlflow.set_experiment(experiment_id=self.experiment_id)
        self.reaped = reap_stale_runs(self.client, self.experiment_id)
        # constant for the run: read once, tagged on the parent and on every cell
        self.run_tags = {**{f"version.{k}": v for k, v in package_versions().items()}, "git_commit": git_commit()}
        self.parent = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        mlflow.set_tags({**tags, **self.run_tags, **process_tags()})
        self._beat = time.time()

    @property
    def parent_run_id(self) -> str:
        return self.parent.info.run_id

    def heartbeat(self, force: bool = False) -> None:
        """Refresh the parent's ``heartbeat`` tag (at most every :data:`HEARTBEAT_EVERY_S` unless ``force``)."""
        now = time.time()
        if force or now - self._beat >= HEARTBEAT_EVERY_S:
            self.client.set_tag(self.parent_run_id, "heartbeat", f"{now:.0f}")
            self._beat = now

    @property
    def cells(self) -> "CellStore":
        """What a cell needs to log to (and be found in) this store, picklable for another process."""
        return CellStore(self.tracking_uri, self.experiment_id, self.parent_run_id, self.run_tags)

    def find_cell(self, key: str) -> tuple[dict, pd.DataFrame] | None:
        """:meth:`CellStore.find_cell` on this store."""
        return self.cells.find_cell(key)

    def log_cell(self, *args, **kwargs) -> str:
        """:meth:`CellStore.log_cell` on this store."""
        return self.cells.log_cell(*args, **kwargs)

    def log_artifact(self, path: Path) -> None:
        """A file on the parent run (e.g. a task's data manifest)."""
        self.client.log_artifact(self.parent_run_id, str(path))

    def finish(self, summary_path: Path | None, status: str = "FINISHED") -> None:
        """Log ``summary_path`` on the parent and end it with ``status`` (FINISHED, FAILED, KILLED)."""
        if summary_path is not None and summary_path.exists():
            mlflow.log_artifact(str(summary_path))
        mlflow.end_run(status=status)


@dataclass(frozen=True)
class CellStore:
    """Where cells are logged: the tracking store, the experiment, the parent ``bench run`` and the
    tags every cell carries. Picklable: a Ray worker logs its cells with it, as the driver does."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    run_tags: dict

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def find_cell(self, key: str) -> tuple[dict, pd.DataFrame] | None:
        """The results row and predictions of the latest FINISHED cell run tagged ``cell_key`` = ``key``
        (read back from its ``row.json`` and ``predictions.csv`` artifacts, values exactly as first
        written), or ``None``."""
        client = self.client
        runs = client.search_runs([self.experiment_id], f"tags.cell_key = '{key}' and attributes.status = "
                                  "'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                row = json.loads(cell_artifact(client, self.tracking_uri, runs[0], "row.json", tmp).read_text())
                preds = read_predictions(cell_artifact(client, self.tracking_uri, runs[0], "predictions.csv", tmp),
                                         row.pop("prediction_dtypes"))
            except (OSError, KeyError, ValueError, MlflowException):  # an older suite's cell or a lost artifact
                return None
        return {**row, "mlflow_run_id": runs[0].info.run_id}, preds

    def log_cell(self, name: str, params: dict, metrics: dict, curves: dict[str, list[float]],
                 tags: dict, artifacts_dir: Path) -> str:
        """A child run of the parent with params, final metrics, curves (one step per entry), tags
        (and where it ran: :func:`process_tags`) and the files of ``artifacts_dir``; FINISHED only
        once everything is logged (an error on the way ends it FAILED and propagates)."""
        client = self.client
        run = client.create_run(self.experiment_id, run_name=name, tags={
            "mlflow.parentRunId": self.parent_run_id, **tags, **self.run_tags, **process_tags()})
        rid = run.info.run_id
        try:
            now = int(time.time() * 1000)
            values = [Param(k, _param_value(v)) for k, v in params.items()]
            for i in range(0, len(values), 100):  # MLflow's limit per request
                client.log_batch(rid, params=values[i:i + 100])
            series = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
            series += [Metric(k, float(v), now, i) for k, vals in curves.items() for i, v in enumerate(vals)]
            for i in range(0, len(series), 900):
                client.log_batch(rid, metrics=series[i:i + 900])
            client.log_artifacts(rid, str(artifacts_dir))
        except BaseException:
            client.set_terminated(rid, status="FAILED")
            raise
        client.set_terminated(rid, status="FINISHED")
        return rid


def read_predictions(path: Path, dtypes: dict[str, str]) -> pd.DataFrame:
    """A cell's ``predictions.csv`` read back as it was written: every column as text first (ids like
    ``03`` stay text), then the ``dtypes`` recorded with it (floats parsed exactly: the same
    values, and ``to_csv`` writes the same bytes)."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return df.astype({c: t for c, t in dtypes.items() if t != "object"})
