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
import logging
import os
import socket
import subprocess
import tempfile
import time
from contextlib import nullcontext
from typing import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pandas as pd
from filelock import FileLock
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

TRACKED_PACKAGES = ("benchbench", "torch", "transformers", "peft", "titans-pytorch", "scikit-learn",
                    "numpy", "scipy", "pandas", "statsmodels", "mlflow", "optuna")
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
            _mark_killed(client, run.info.run_id, "stale process")
            killed.append(run.info.run_id)
    return killed


def _mark_killed(client: MlflowClient, run_id: str, why: str) -> None:
    """End a RUNNING run KILLED, tagged ``killed_by`` with ``why`` and who found it (pid and host)."""
    client.set_terminated(run_id, status="KILLED")
    client.set_tag(run_id, "killed_by", f"{why}, found by pid {os.getpid()} on {socket.gethostname()}")


PARENT_METRICS = ("wa", "ua", "wf1", "macro_f1")
"""The metrics a run's parent logs per (task, backbone, method): each one's mean over the cells."""


def metric_key(*parts: str) -> str:
    """An MLflow metric name of ``parts`` joined by ``/``, each character MLflow refuses in a name
    (anything but letters, digits, ``_ - . : /`` and space: a label's ``[`` ``]`` ``{`` ``}`` ``=``
    ``,`` ``+``) replaced by ``_``; ``summary.json``, logged beside, keeps the labels exactly."""
    import re

    return "/".join(re.sub(r"[^\w\-.: ]", "_", p) for p in parts)


def parent_metrics(summary: dict) -> dict[str, float]:
    """The parent run's metrics from a run's ``summary.json`` (as a dict): ``<metric>/<task>/<backbone>/
    <method>`` = the mean over that method's cells (:data:`PARENT_METRICS`, fractions in [0, 1]), and
    ``<metric>_sd/...`` their SD over cells where there are several, so the MLflow UI's run table
    compares runs at the run level; non-finite values are left out."""
    import math

    out = {}
    for c in summary.get("cells", []):
        for m in PARENT_METRICS:
            stats = c.get(m) or {}
            for name, value in ((m, stats.get("mean")), (f"{m}_sd", stats.get("sd") if c.get("n", 0) > 1 else None)):
                if isinstance(value, (int, float)) and math.isfinite(value):
                    out[metric_key(name, c["task"], c["backbone"], c["method"])] = float(value)
    return out


def package_versions() -> dict[str, str]:
    """The installed versions of the packages a result depends on (:data:`TRACKED_PACKAGES`: the suite,
    torch and the libraries whose computations or statistics reach a figure), ``"not installed"``
    for one that is absent; recorded in every run's ``summary.json``, ``run.json`` and MLflow tags."""
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


HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
"""MLflow's HTTP client settings while benchbench talks to a tracking server, unless the environment sets
them: one retry after 1 s and a 20 s timeout, instead of MLflow's 7 retries with backoff factor 2 and 120 s
(minutes of stall per call when the server is down)."""
RECONNECT_EVERY_S = float(os.environ.get("BENCHBENCH_RECONNECT_EVERY_S", 30))
"""How often (seconds) an offline :class:`CellStore` tries the tracking store again."""
CLAIM_SETTLE_S = float(os.environ.get("BENCHBENCH_CLAIM_SETTLE_S", 0.2))
"""Seconds between creating a claim and reading back the competing ones (:meth:`CellStore.claim`)."""


class CellStore:
    """One process's connection to the tracking store, which an outage does not stop.

    Every call to the store goes through :meth:`call`: an error there (a server that does not answer,
    a refused connection, a locked or unwritable database) makes the store *offline*: one line says so
    through ``notify`` (no traceback), and later calls return their default at once, until
    :meth:`reconnect` (tried at most every :data:`RECONNECT_EVERY_S`) finds the store back. Opening it
    marks the store's dead RUNNING runs KILLED (:func:`reap_stale_runs`; their ids in ``reaped``).

    Args:
        tracking_uri: the store (``sqlite:///PATH``, ``http://HOST:PORT``, a folder, ...).
        notify: where the one-line notices go (e.g. ``tqdm.write``).
        offline_note: what the caller does meanwhile, appended to the offline notice.
    """

    def __init__(self, tracking_uri: str, notify: Callable[[str], None] = print, offline_note: str = ""):
        if tracking_uri.startswith(("http://", "https://")):
            for k, v in HTTP_DEFAULTS.items():
                os.environ.setdefault(k, v)
            # urllib3 logs every retry of a refused connection: the outage is said once, below
            logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        self.tracking_uri, self.notify, self.offline_note = tracking_uri, notify, offline_note
        self.client: MlflowClient | None = None
        self.experiment_id: str | None = None
        self.problem: str | None = None  # why the store is offline; None while online
        self.reaped: list[str] = []
        self._last_try = 0.0
        self._last_beat = time.time()  # the runs it starts carry a fresh heartbeat (process_tags)
        self._open()

    @property
    def online(self) -> bool:
        return self.problem is None

    def _open(self) -> bool:
        self._last_try = time.time()
        try:
            self.client, self.experiment_id = open_store(self.tracking_uri)
            self.reaped += reap_stale_runs(self.client, self.experiment_id)
        except Exception as e:  # noqa: BLE001 - any failure of the store is an outage
            self._down(e)
            return False
        self.problem = None
        return True

    def _down(self, e: BaseException) -> None:
        first = self.problem is None
        text = str(e).strip().splitlines()
        self.problem = f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__
        if first:
            self.notify(f"NOTICE: tracking store {self.tracking_uri} unreachable ({self.problem}); "
                        + (self.offline_note or "going on without it"))

    def call(self, fn: Callable, *args, default=None, **kwargs):
        """``fn(*args, **kwargs)`` against the store; ``default`` when it is offline or the call fails
        (which makes it offline)."""
        if not self.online:
            return default
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - an outage, whatever MLflow raised for it
            self._down(e)
            return default

    def reconnect(self) -> bool:
        """Whether the store is online, trying it again if it is offline and the last try is older than
        :data:`RECONNECT_EVERY_S`."""
        if self.online:
            return True
        if time.time() - self._last_try < RECONNECT_EVERY_S or not self._open():
            return False
        self.notify(f"NOTICE: tracking store {self.tracking_uri} is reachable again")
        return True

    # ------------------------------------------------------------------ runs
    def start_run(self, name: str, parent_run_id: str | None, tags: dict) -> str | None:
        """A RUNNING run carrying ``tags`` and where this process runs (:func:`process_tags`, so that
        :func:`reap_stale_runs` finds it if the process dies); ``None`` offline."""
        def start():
            parent = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
            return self.client.create_run(self.experiment_id, run_name=name,
                                          tags={**parent, **tags, **process_tags()}).info.run_id
        return self.call(start)

    def log_run(self, run_id: str, params: dict | None = None, metrics: dict | None = None,
                curves: dict[str, list[float]] | None = None, artifacts_dir: Path | None = None,
                status: str | None = "FINISHED", tags: dict | None = None) -> bool:
        """Tags, params, final metrics (step 0), curves (one step per entry, counted from 1 like every
        epoch the suite shows: a per-epoch curve's step k is epoch k) and the files of
        ``artifacts_dir`` on run ``run_id``, then ``status`` (FINISHED only once everything is
        logged); whether it all reached the store."""
        def log():
            now = int(time.time() * 1000)
            if tags:
                self.client.log_batch(run_id, tags=[RunTag(k, _param_value(v)) for k, v in tags.items()])
            values = [Param(k, _param_value(v)) for k, v in (params or {}).items()]
            for i in range(0, len(values), 100):  # MLflow's limit per request
                self.client.log_batch(run_id, params=values[i:i + 100])
            series = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
            series += [Metric(k, float(v), now, i) for k, vals in (curves or {}).items()
                       for i, v in enumerate(vals, start=1)]
            for i in range(0, len(series), 900):
                self.client.log_batch(run_id, metrics=series[i:i + 900])
            if artifacts_dir is not None:
                self.client.log_artifacts(run_id, str(artifacts_dir))
            if status:
                self.client.set_terminated(run_id, status=status)
            return True
        return bool(self.call(log, default=False))

    def end_run(self, run_id: str, status: str, tags: dict | None = None) -> None:
        """End run ``run_id`` with ``status`` (FAILED, KILLED, ...) and ``tags`` (e.g. the reason)."""
        def end():
            for k, v in (tags or {}).items():
                self.client.set_tag(run_id, k, _param_value(v))
            self.client.set_terminated(run_id, status=status)
        self.call(end)

    def beat(self, run_ids, force: bool = False) -> None:
        """Refresh the ``heartbeat`` tag of these RUNNING runs (cross-host staleness: :func:`is_stale`),
        at most every :data:`HEARTBEAT_EVERY_S` unless ``force``."""
        now = time.time()
        if not force and now - self._last_beat < HEARTBEAT_EVERY_S:
            return
        self._last_beat = now

        def beat():
            for rid in run_ids:
                self.client.set_tag(rid, "heartbeat", f"{now:.0f}")
        self.call(beat)

    # ------------------------------------------------------------------ cells
    def find_cell(self, key: str) -> tuple[dict, pd.DataFrame] | None:
        """The results row and predictions of the latest FINISHED cell run tagged ``cell_key`` = ``key``
        (read back from its ``row.json`` and ``predictions.csv`` artifacts, values exactly as first
        written), or ``None`` (also offline)."""
        return self.call(self._find_cell, key)

    def _find_cell(self, key: str) -> tuple[dict, pd.DataFrame] | None:
        run = self._finished_run(key)
        if run is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                row = json.loads(cell_artifact(self.client, self.tracking_uri, run, "row.json", tmp).read_text())
                preds = read_predictions(cell_artifact(self.client, self.tracking_uri, run, "predictions.csv", tmp),
                                         row.pop("prediction_dtypes"))
            except (OSError, KeyError, ValueError, MlflowException):  # an older suite's cell or a lost artifact
                return None
        return {**row, "mlflow_run_id": run.info.run_id}, preds

    def _finished_run(self, key: str):
        """The latest FINISHED run tagged ``cell_key`` = ``key`` (its artifacts not read), or ``None``."""
        runs = self.client.search_runs([self.experiment_id], f"tags.cell_key = '{key}' and attributes.status = "
                                       "'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def finished_run_id(self, key: str) -> str | None:
        """The id of :meth:`_finished_run` (``None`` also offline)."""
        run = self.call(self._finished_run, key)
        return None if run is None else run.info.run_id

    def claim(self, key: str, name: str, parent_run_id: str | None, tags: dict, rerun: bool = False
              ) -> tuple[str, str | None]:
        """Claim cell ``key`` for this process before computing it, so that a second driver on the same
        store (another ``bench run``, another host) does not compute it too.

        Returns ``("mine", run_id)``: a RUNNING child run of ``parent_run_id`` tagged ``cell_key`` (and
        ``tags``) that this process now owns, to log the cell into (:meth:`log_run`);
        ``("done", None)``: the cell has a FINISHED run (:meth:`find_cell` reads it);
        ``("held", who)``: another live process has it RUNNING (``who``: its host and pid; go on with
        other cells and ask again later); ``("offline", None)``: no store to claim in (compute anyway).
        A holder found dead (:func:`is_stale`) is marked KILLED and the cell claimed. Two processes that
        claim at the same moment both read back the competing claims after :data:`CLAIM_SETTLE_S`; the
        earliest (start time, then run id) wins and the other withdraws (its claim KILLED and deleted).
        ``rerun``: a FINISHED run does not count (``bench run --rerun`` computes the cell again).
        """
        return self.call(self._claim, key, name, parent_run_id, tags, rerun, default=("offline", None))

    def _claim(self, key: str, name: str, parent_run_id: str | None, tags: dict, rerun: bool
               ) -> tuple[str, str | None]:
        held = self._holders(key, rerun=rerun)
        if held == "done":
            return "done", None
        if held:
            return "held", _who(held[0])
        parent = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            **parent, **tags, "cell_key": key, "benchbench.claim": "1", **process_tags()})
        mine = run.info.run_id
        time.sleep(CLAIM_SETTLE_S)
        held = self._holders(key, keep=mine, rerun=rerun)
        if held == "done" or (held and (held[0].info.start_time, held[0].info.run_id)
                              < (run.info.start_time, mine)):
            self.client.set_tag(mine, "benchbench.withdrawn", "another process claimed the cell first")
            self.client.set_terminated(mine, status="KILLED")
            self.client.delete_run(mine)
            return ("done", None) if held == "done" else ("held", _who(held[0]))
        return "mine", mine

    def _holders(self, key: str, keep: str | None = None, rerun: bool = False):
        """``"done"`` if cell ``key`` has a FINISHED run; else its live RUNNING runs other than ``keep``,
        earliest first. Dead holders and this process's own leftovers (a claim abandoned during an
        outage) are marked KILLED on the way."""
        from mlflow.entities import ViewType

        runs = self.client.search_runs([self.experiment_id], f"tags.cell_key = '{key}'",
                                       run_view_type=ViewType.ACTIVE_ONLY, max_results=200,
                                       order_by=["attributes.start_time ASC"])
        if not rerun and any(r.info.status == "FINISHED" for r in runs):
            return "done"
        live = []
        for r in runs:
            if r.info.status != "RUNNING" or r.info.run_id == keep:
                continue
            if is_stale(r.data.tags) or _is_mine(r.data.tags):
                _mark_killed(self.client, r.info.run_id, "a claim of the cell")
            else:
                live.append(r)
        return live


def _is_mine(tags: dict) -> bool:
    """Whether a run's process tags are this process's."""
    return (tags.get("host") == socket.gethostname() and tags.get("pid") == str(os.getpid())
            and tags.get("pid_start", "") == _pid_start(os.getpid()))


def _who(run) -> str:
    tags = run.data.tags
    return f"run {run.info.run_id}, pid {tags.get('pid', '?')} on {tags.get('host', '?')}"


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The store a command uses: ``tracking_uri`` (made MLflow's current one), else MLflow's default
    (``MLFLOW_TRACKING_URI``, else its local default)."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.get_tracking_uri()


class Tracker:
    """A ``bench run``'s tracking: its parent run, its cells' claims and child runs, on a
    :class:`CellStore` that an outage does not stop (``tracking_uri=None``: MLflow's default store).

    Offline, it does nothing and says so once; the run's output folder holds every cell meanwhile
    (the harness logs them when the store is back: :meth:`reconnect`). The parent run is created when
    the store is first reachable; files for it given while offline (:meth:`log_artifact`) are logged
    then."""

    def __init__(self, tracking_uri: str | None, run_name: str, params: dict, tags: dict,
                 notify: Callable[[str], None] = print, offline_note: str = ""):
        # reading reused cells' artifacts must not print MLflow's download bars through the terminal
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.store = CellStore(self.tracking_uri, notify, offline_note)
        # constant for the run: read once, tagged on the parent and on every cell
        self.run_tags = {**{f"version.{k}": v for k, v in package_versions().items()}, "git_commit": git_commit()}
        self._parent = (run_name, params, tags)
        self.parent_run_id: str | None = None
        self._pending_artifacts: list[Path] = []
        self.claims: dict[str, str] = {}  # cell key -> the RUNNING run this process claimed it with
        self._open_parent()

    @property
    def reaped(self) -> list[str]:
        return self.store.reaped

    @property
    def online(self) -> bool:
        return self.store.online and self.parent_run_id is not None

    def _open_parent(self) -> None:
        name, params, tags = self._parent
        rid = self.store.start_run(name, None, {**tags, **self.run_tags})
        if rid is None or not self.store.log_run(rid, params=params, status=None):
            return
        self.parent_run_id = rid
        for path in self._pending_artifacts:
            self.store.call(self.store.client.log_artifact, rid, str(path))
        self._pending_artifacts.clear()

    def reconnect(self) -> bool:
        """Whether the store is usable now (tried again when offline, see :meth:`CellStore.reconnect`);
        on return from an outage the parent is created if it was never, and this process's claims made
        before the outage are given up (their cells are logged anew)."""
        if self.online:
            return True
        if not self.store.reconnect():
            return False
        if self.parent_run_id is None:
            self._open_parent()
        for rid in self.claims.values():
            self.store.end_run(rid, "KILLED", {"killed_by": "claim abandoned during a tracking-store outage"})
        self.claims.clear()
        return self.online

    def heartbeat(self, force: bool = False) -> None:
        """Refresh the ``heartbeat`` of the parent and of this process's claimed cells (at most every
        :data:`HEARTBEAT_EVERY_S` unless ``force``)."""
        if self.online:
            self.store.beat([self.parent_run_id, *self.claims.values()], force)

    def find_cell(self, key: str) -> tuple[dict, pd.DataFrame] | None:
        """:meth:`CellStore.find_cell` (``None`` offline)."""
        return self.store.find_cell(key) if self.online else None

    def claim(self, key: str, name: str, tags: dict, rerun: bool = False) -> tuple[str, str | None]:
        """:meth:`CellStore.claim` under this run's parent; ``("offline", None)`` offline."""
        if not self.online:
            return "offline", None
        state, rid = self.store.claim(key, name, self.parent_run_id, {**tags, **self.run_tags}, rerun)
        if state == "mine":
            self.claims[key] = rid
        return state, rid

    def log_cell(self, key: str, name: str, params: dict, metrics: dict, curves: dict[str, list[float]],
                 tags: dict, artifacts_dir: Path) -> str | None:
        """Log a computed cell: into its claim, or (computed while offline, or by an earlier run into
        the same folder) a new child run, unless the store has a FINISHED run of ``key`` already (whose
        id is returned: a cell is logged FINISHED once). ``None`` when the store is unreachable."""
        if not self.online:
            return None
        rid = self.claims.pop(key, None)
        if rid is None:
            done = self.store.finished_run_id(key)
            if done is not None:
                return done
            rid = self.store.start_run(name, self.parent_run_id, {**tags, **self.run_tags, "cell_key": key})
        ok = rid is not None and self.store.log_run(rid, params, metrics, curves, artifacts_dir, tags=tags)
        if not ok and rid is not None:
            self.claims[key] = rid  # given up at reconnect
        return rid if ok else None

    def release(self, key: str, status: str, reason: str) -> None:
        """End this process's claim of ``key`` without a result (``FAILED``: the cell failed;
        ``KILLED``: the run stopped before it)."""
        rid = self.claims.pop(key, None)
        if rid is not None and self.online:
            self.store.end_run(rid, status, {"error": reason})

    def log_artifact(self, path: Path) -> None:
        """A file on the parent run (e.g. a task's data manifest), logged when the store is back if offline."""
        if not self.online or self.store.call(self.store.client.log_artifact, self.parent_run_id, str(path),
                                              default=False) is False:
            self._pending_artifacts.append(path)

    def finish(self, summary_path: Path | None, status: str = "FINISHED") -> None:
        """End the claims still open KILLED, log ``summary_path`` on the parent and end it with
        ``status`` (FINISHED, FAILED, KILLED). Offline: nothing (the next run's start marks the parent,
        its process gone, KILLED)."""
        for key in list(self.claims):
            self.release(key, "KILLED", "the run stopped before the cell finished")
        if not self.online:
            return
        if summary_path is not None and summary_path.exists():
            self.store.call(self.store.client.log_artifact, self.parent_run_id, str(summary_path))
            self.store.log_run(self.parent_run_id, metrics=parent_metrics(json.loads(summary_path.read_text())),
                               status=None)
        self.store.end_run(self.parent_run_id, status)


def read_predictions(path: Path, dtypes: dict[str, str] | None) -> pd.DataFrame:
    """A cell's (or a run's) ``predictions.csv`` read back as it was written: every column as text first
    (ids like ``03`` stay text), then the ``dtypes`` recorded with it (floats parsed exactly: the same
    values, and ``to_csv`` writes the same bytes). ``dtypes=None`` (a file of an older suite, with no
    record): pandas' own inference, ids of the usual columns kept as text."""
    if dtypes is None:
        return pd.read_csv(path, dtype={c: str for c in ("dialogue_id", "utterance_id", "speaker", "cell_key")})
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for c, t in dtypes.items():  # a nullable column (a control's correct_*, absent for some methods): "" is <NA>
        if t[:1].isupper() and c in df:
            df[c] = df[c].replace("", None)
    return df.astype({c: t for c, t in dtypes.items() if t != "object" and c in df})


def read_folder_predictions(path: Path) -> pd.DataFrame:
    """A run folder's predictions file (``predictions.csv``, or a committed run's ``predictions.csv.gz``)
    read back with the dtypes recorded beside it in ``predictions-dtypes.json``
    (:func:`read_predictions`; without that file, pandas' own inference)."""
    dtypes = Path(path).with_name("predictions-dtypes.json")
    return read_predictions(path, json.loads(dtypes.read_text()) if dtypes.is_file() else None)
