"""MLflow logging: one parent run per ``bench run``, one child run per cell."""

from __future__ import annotations

import json
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

TRACKED_PACKAGES = ("benchbench", "torch", "transformers", "peft", "titans-pytorch", "scikit-learn",
                    "numpy", "scipy", "pandas", "mlflow")
EXPERIMENT = "benchbench"


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
    """Thin wrapper over MLflow for the harness (``tracking_uri=None``: MLflow's default store)."""

    def __init__(self, tracking_uri: str | None, run_name: str, params: dict, tags: dict):
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.tracking_uri = mlflow.get_tracking_uri()
        mlflow.set_experiment(EXPERIMENT)
        self.client = MlflowClient()
        # constant for the run: read once, tagged on the parent and on every cell
        self.run_tags = {**{f"version.{k}": v for k, v in package_versions().items()}, "git_commit": git_commit()}
        self.parent = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        mlflow.set_tags({**tags, **self.run_tags})

    @property
    def parent_run_id(self) -> str:
        return self.parent.info.run_id

    def log_cell(self, name: str, params: dict, metrics: dict, curves: dict[str, list[float]],
                 tags: dict, artifacts_dir: Path) -> str:
        """A nested child run with params, final metrics, curves (one step per entry), tags, artifacts."""
        with mlflow.start_run(run_name=name, nested=True) as run:
            mlflow.log_params({k: _param_value(v) for k, v in params.items()})
            mlflow.set_tags({**tags, **self.run_tags})
            mlflow.log_metrics(metrics)
            now = int(time.time() * 1000)
            series = [Metric(k, float(v), now, i) for k, vals in curves.items() for i, v in enumerate(vals)]
            for i in range(0, len(series), 900):
                self.client.log_batch(run.info.run_id, metrics=series[i:i + 900])
            mlflow.log_artifacts(str(artifacts_dir))
            return run.info.run_id

    def log_artifact(self, path: Path) -> None:
        """A file on the parent run (e.g. a task's data manifest)."""
        self.client.log_artifact(self.parent_run_id, str(path))

    def finish(self, summary_path: Path | None, status: str = "FINISHED") -> None:
        if summary_path is not None and summary_path.exists():
            mlflow.log_artifact(str(summary_path))
        mlflow.end_run(status=status)
