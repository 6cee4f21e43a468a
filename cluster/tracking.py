"""MLflow, written and read here only: the resolved config, per-step metrics, sample completions,
evaluation results and curves; metric histories for the benchmarks and analyses."""

from __future__ import annotations

import fcntl
import math
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag

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


# MLflow's UI opens an experiment of this kind in its model-training view (run charts, system metrics),
# not the GenAI one (traces, evaluation runs). MLflow 3.17's UI reads the view from its sidebar switch
# (or `?workflowType=machine_learning` in the address) before this tag; other versions go by the tag.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# The charts to look at first: copies of a few step metrics under one prefix, which the UI makes a
# section of its own and lists first (sections are sorted by name).
OVERVIEW = "00-overview"
OVERVIEW_STEP_METRICS = {
    "reward/total_mean": "reward",
    "reward/format_mean": "format",
    "learner/kl": "kl",
    "time/step_s": "step_s",
}
OVERVIEW_EVAL_METRICS = {"srcc": "eval_srcc", "plcc": "eval_plcc"}

# Tags that let a later run tell whether this run's driver is still alive.
PID_TAG, PID_STARTED_TAG, HOST_TAG = "vqr1.driver_pid", "vqr1.driver_started", "vqr1.driver_host"
RESUMED_FROM_TAG = "vqr1.resumed_from"


def process_start_time(pid: int) -> str | None:
    """The start time of process `pid` (None if there is none): a pid alone may have been reused."""
    import psutil

    try:
        return str(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        return None


class Tracker:
    """One MLflow run per run of the driver. A resumed run starts a new MLflow run that carries the
    history of the run it continues up to the checkpoint's step (MLflow cannot delete logged points, so
    continuing the old run would show the lost steps twice); the old run is tagged and ended KILLED."""

    def __init__(self, config: Config, resume: tuple[str, int] | None = None):
        self.uri = resolve_tracking_uri(config.tracking)
        with store_creation_lock(self.uri):  # the client opens (and on first use migrates) the store
            self.client = mlflow.MlflowClient(self.uri)
            experiment = self.client.get_experiment_by_name(config.tracking.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment
                else self.client.create_experiment(
                    config.tracking.experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            )
            if experiment and EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older version
                self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.experiment_id = experiment_id
        self.ended_dead_runs = end_runs_of_dead_drivers(self.client, experiment_id)
        pid = os.getpid()
        tags = {PID_TAG: str(pid), PID_STARTED_TAG: process_start_time(pid), HOST_TAG: socket.gethostname()}
        if resume is not None:
            tags[RESUMED_FROM_TAG] = resume[0]
        self.run_id = self.client.create_run(
            experiment_id, run_name=config.tracking.run_name, tags=tags
        ).info.run_id
        params = [Param(key, value) for key, value in flatten(config.model_dump(mode="json")).items()]
        for start in range(0, len(params), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_text(self.run_id, dump_config(config), "config.yaml")
        if resume is not None:
            previous_run_id, step = resume
            copy_history(self.client, previous_run_id, self.run_id, step)
            if self.client.get_run(previous_run_id).info.status == "RUNNING":
                self.client.set_terminated(previous_run_id, status="KILLED")

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp: float | None = None) -> None:
        """The metrics at `step` (taken at `timestamp`, seconds since the epoch; default now), and the
        OVERVIEW copies of those in OVERVIEW_STEP_METRICS."""
        now = int((time.time() if timestamp is None else timestamp) * 1000)
        overview = {
            f"{OVERVIEW}/{OVERVIEW_STEP_METRICS[k]}": v
            for k, v in metrics.items()
            if k in OVERVIEW_STEP_METRICS
        }
        points = [Metric(key, float(value), now, step) for key, value in {**metrics, **overview}.items()]
        for start in range(0, len(points), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=points[start : start + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in tags.items()])

    def log_table(self, rows: list[dict], name: str) -> None:
        if rows:
            self.client.log_table(self.run_id, {key: [row[key] for row in rows] for key in rows[0]}, name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

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
                    name = metric_key(prefix, group, key) if group else metric_key(prefix, key)
                    metrics[name] = float(value)
        for key, name in OVERVIEW_EVAL_METRICS.items():  # every evaluation on one curve
            value = report["overall"].get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                metrics[f"{OVERVIEW}/{name}"] = float(value)
        self.log_metrics(metrics, step)
        for path in files:
            self.log_artifact(path, prefix)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

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


def copy_history(client, source_run_id: str, target_run_id: str, up_to_step: int) -> None:
    """Every metric point of the source run at steps <= up_to_step, logged into the target run."""
    points = [
        Metric(m.key, m.value, m.timestamp, m.step)
        for key in client.get_run(source_run_id).data.metrics
        for m in client.get_metric_history(source_run_id, key)
        if m.step <= up_to_step
    ]
    for start in range(0, len(points), 1000):  # MLflow's batch limit
        client.log_batch(target_run_id, metrics=points[start : start + 1000])


def end_runs_of_dead_drivers(client, experiment_id: str) -> list[str]:
    """Mark FAILED the experiment's RUNNING runs whose driver (on this host) no longer runs; their ids."""
    ended = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
            continue  # another machine's driver, or a run not started by the driver: cannot tell
        if process_start_time(int(tags[PID_TAG])) != tags.get(PID_STARTED_TAG):
            client.set_terminated(run.info.run_id, status="FAILED")
            client.set_tag(run.info.run_id, "vqr1.ended_by", "a later run found its driver dead")
            ended.append(run.info.run_id)
    return ended
