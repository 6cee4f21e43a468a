"""MLflow: the resolved config, per-step metrics, sample completions, evaluation results and curves."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import mlflow

from configs.load import dump_config
from configs.schema import Config, TrackingConfig


def resolve_tracking_uri(tracking: TrackingConfig) -> str:
    """Config, else MLFLOW_TRACKING_URI, else a sqlite store in the current (project) folder."""
    if tracking.tracking_uri:
        return tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@contextmanager
def store_creation_lock(uri: str):
    """Held while a sqlite store is opened: MLflow creates and migrates a new database's tables on first
    connect, and two runs started at once on a fresh store both try it (one dies on "duplicate column").
    Other stores need no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:500]  # MLflow's param value limit
    return flat


class Tracker:
    """One MLflow run; `run_id` lets a resumed job continue the same run."""

    def __init__(self, config: Config, run_id: str | None = None):
        self.uri = resolve_tracking_uri(config.tracking)
        mlflow.set_tracking_uri(self.uri)
        with store_creation_lock(self.uri):
            mlflow.set_experiment(config.tracking.experiment)
        self.run = mlflow.start_run(run_id=run_id, run_name=config.tracking.run_name)
        self.run_id = self.run.info.run_id
        if run_id is None:
            mlflow.log_params(flatten(config.model_dump(mode="json")))
            mlflow.log_text(dump_config(config), "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_table(self, rows: list[dict], name: str) -> None:
        if rows:
            mlflow.log_table({key: [row[key] for row in rows] for key in rows[0]}, artifact_file=name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=folder)

    def set_tags(self, tags: dict[str, str]) -> None:
        mlflow.set_tags(tags)

    def finish(self, status: str = "FINISHED") -> None:
        mlflow.end_run(status=status)

    def describe(self) -> str:
        return f"MLflow run {self.run_id} in {self.uri} (open it with `make mlflow-ui`)"
