"""MLflow after a crash: a resumed run shows each step once, and a run whose driver died does not stay
RUNNING once another run opens the store."""

from __future__ import annotations

import socket
import subprocess
import sys

import mlflow

from cluster.tracking import (
    EXPERIMENT_KIND_TAG,
    HOST_TAG,
    OVERVIEW,
    PID_STARTED_TAG,
    PID_TAG,
    RESUMED_FROM_TAG,
    Tracker,
    process_start_time,
)
from configs.load import load_config


def tiny_config(tmp_path, *overrides):
    return load_config("cpu-tiny", [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides])


def history(tracker: Tracker, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in tracker.client.get_metric_history(tracker.run_id, key)]


def test_a_resumed_run_shows_each_step_once(tmp_path):
    config = tiny_config(tmp_path)
    first = Tracker(config)
    for step in (1, 2, 3):  # the driver died during step 3, after the checkpoint of step 2
        first.log_metrics({"reward/total_mean": step / 10}, step=step)
    resumed = Tracker(config, resume=(first.run_id, 2))
    for step in (3, 4):
        resumed.log_metrics({"reward/total_mean": step}, step=step)
    resumed.finish()
    assert history(resumed, "reward/total_mean") == [(1, 0.1), (2, 0.2), (3, 3.0), (4, 4.0)]
    assert resumed.client.get_run(resumed.run_id).data.tags[RESUMED_FROM_TAG] == first.run_id
    assert resumed.client.get_run(first.run_id).info.status == "KILLED"


def test_a_run_whose_driver_died_is_marked_failed_by_the_next_run(tmp_path):
    config = tiny_config(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process_start_time(dead.pid)
    dead.wait()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment(config.tracking.experiment)
    tags = {PID_TAG: str(dead.pid), PID_STARTED_TAG: started, HOST_TAG: socket.gethostname()}
    orphan = client.create_run(experiment_id, tags=tags).info.run_id
    elsewhere = client.create_run(experiment_id, tags={**tags, HOST_TAG: "another-node"}).info.run_id
    tracker = Tracker(config)
    assert tracker.ended_dead_runs == [orphan]
    assert client.get_run(orphan).info.status == "FAILED"
    assert client.get_run(elsewhere).info.status == "RUNNING"  # another machine's driver: unknown here
    # A run whose driver is alive (this process) is left alone.
    assert Tracker(config).ended_dead_runs == []
    assert client.get_run(tracker.run_id).info.status == "RUNNING"


def test_the_experiment_opens_in_the_model_training_view_with_the_overview_first(tmp_path):
    config = tiny_config(tmp_path)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    older = client.create_experiment("made-before")  # by an older version: no kind yet
    tracker = Tracker(config)
    assert (
        client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    )
    Tracker(tiny_config(tmp_path, "tracking.experiment=made-before"))
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    tracker.log_metrics({"reward/total_mean": 1.5, "learner/kl": 0.01, "learner/loss": 0.2}, step=1)
    tracker.log_evaluation(
        "eval_after",
        {
            "n_images": 8,
            "images_all_failed": 0,
            "sample_parse_failure_rate": 0.0,
            "overall": {"srcc": 0.4, "plcc": 0.5},
            "per_dataset": {"builtin": {}},
        },
        [],
        step=1,
    )
    logged = client.get_run(tracker.run_id).data.metrics
    assert {key: logged[key] for key in logged if key.startswith(f"{OVERVIEW}/")} == {
        f"{OVERVIEW}/reward": 1.5,
        f"{OVERVIEW}/kl": 0.01,
        f"{OVERVIEW}/eval_srcc": 0.4,
        f"{OVERVIEW}/eval_plcc": 0.5,
    }
    # MLflow's UI lists metric sections by name: the overview's comes before every other section.
    assert min(key.split("/")[0] for key in logged) == OVERVIEW
