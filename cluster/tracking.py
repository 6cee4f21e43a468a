"""MLflow, written and read here only: the resolved config, per-step metrics, sample completions,
evaluation results and curves; metric histories for the benchmarks and analyses."""

from __future__ import annotations

import fcntl
import math
import os
import re
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

    def log_evaluation(self, prefix: str, report: dict, files: list[Path], step: int) -> None:
        """An iqa.evaluate report as metrics (`<prefix>/srcc`, `<prefix>/<dataset>/srcc`,
        `<prefix>/expected/srcc`, ...) at `step`, and its files under the artifact folder `<prefix>`."""
        values = {
            "images": report["n_images"],
            "images_all_failed": report["images_all_failed"],
            "sample_parse_failure_rate": report["sample_parse_failure_rate"],
        }
        metrics = {metric_key(prefix, k): float(v) for k, v in values.items()}
        groups = {"": report["overall"], **({} if len(report["per_dataset"]) == 1 else report["per_dataset"])}
        if "expected_score" in report:
            groups["expected"] = report["expected_score"]["overall"]
        for group, result in groups.items():
            for key, value in result.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    metrics[metric_key(prefix, group, key) if group else metric_key(prefix, key)] = float(
                        value
                    )
        mlflow.log_metrics(metrics, step=step)
        for path in files:
            mlflow.log_artifact(str(path), artifact_path=prefix)

    def set_tags(self, tags: dict[str, str]) -> None:
        mlflow.set_tags(tags)

    def finish(self, status: str = "FINISHED") -> None:
        mlflow.end_run(status=status)

    def describe(self) -> str:
        return f"MLflow run {self.run_id} in {self.uri} (open it with `make mlflow-ui`)"


def metric_key(*parts: str) -> str:
    # MLflow allows only letters, digits, _ - . / and space in metric names.
    return "/".join(re.sub(r"[^\w\-. ]", "_", part) for part in parts)


def metric_histories(tracking_uri: str, run_id: str, names: tuple[str, ...]) -> dict[str, list]:
    """The run's history of each metric in `names`, as MLflow Metric lists in step order."""
    client = mlflow.MlflowClient(tracking_uri)
    return {name: sorted(client.get_metric_history(run_id, name), key=lambda m: m.step) for name in names}


def find_run(tracking_uri: str, run_name: str) -> str:
    """The id of the newest run named `run_name` in any experiment of the store."""
    client = mlflow.MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments, f"tags.mlflow.runName = '{run_name}'", order_by=["attributes.start_time DESC"]
    )
    if not runs:
        raise LookupError(f"{tracking_uri}: no run named {run_name!r}")
    return runs[0].info.run_id
