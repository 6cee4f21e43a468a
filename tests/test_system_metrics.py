"""The per-step system figures (configs.system_metrics), their MLflow names (cluster.system), the vLLM
KV-cache peak (actor.rollout_engine) and the refusal of relative paths in Ray's working-dir copy
(cluster.ray_job), without Ray or vLLM."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest

from actor.rollout_engine import _note_peak_kv_cache_usage
from cluster.ray_job import in_ray_working_dir_copy, ray_copy_problem, relative_store
from cluster.system import system_metric_names
from configs.load import load_config
from configs.system_metrics import ProcessSampler, busy_percent, node_busy_percent, visible_gpus

RAY_COPY = Path("/tmp/ray/session_2026-12-07_00-00-00_1/runtime_resources/working_dir_files/_ray_pkg_0a1b2c")


def test_busy_percent_counts_cpu_seconds_since_the_previous_sample():
    # pid 1 used 1.5 s more, pid 2 is new (all of its 0.5 s count), pid 3 ended (nothing), over 2 s.
    assert busy_percent({1: 10.0, 3: 4.0}, {1: 11.5, 2: 0.5}, 2.0) == pytest.approx(100.0)
    assert busy_percent({1: 5.0}, {1: 4.0}, 1.0) == 0.0  # a reused pid never counts negative time
    assert busy_percent({}, {1: 1.0}, 0.0) == 0.0


def test_node_busy_percent_leaves_out_idle_and_iowait():
    Times = namedtuple("Times", "user system idle iowait")
    assert node_busy_percent(Times(10, 10, 70, 10), Times(40, 20, 120, 20)) == pytest.approx(40.0)
    assert node_busy_percent(Times(1, 1, 1, 1), Times(1, 1, 1, 1)) is None


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus({}) is None
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-8f0c"}) == ["GPU-8f0c"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_a_sampler_counts_the_processes_its_process_started():
    tree, alone = ProcessSampler(children=True), ProcessSampler(children=False)
    started = time.time()
    tree.sample(), alone.sample()
    # A child that uses 0.3 s of CPU, says so and stays alive (however loaded the machine is).
    spin = "import time\nwhile time.process_time() < 0.3: pass\nprint('done', flush=True)\ntime.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        with_child, without = tree.sample(), alone.sample()
    finally:
        child.kill()
        child.wait()
    elapsed = time.time() - started
    assert with_child["processes"] == 2 and without["processes"] == 1
    assert with_child["cpu_percent"] - without["cpu_percent"] > 100 * 0.25 / elapsed
    assert with_child["rss_gib"] > without["rss_gib"] > 0
    assert 0 < with_child["node_memory_used_percent"] < 100 and "node_cpu_percent" in with_child
    assert not any(key.startswith("gpu_") for key in with_child)  # no GPU here


def test_figures_are_named_by_role_and_machine():
    reports = {
        "rollout-0": {
            "host": "node-a",
            "address": "10.0.0.1",
            "figures": {"cpu_percent": 90.0, "node_cpu_percent": 50.0},
        },
        "learner-0": {
            "host": "node-a",
            "address": "10.0.0.1",
            "figures": {"rss_gib": 2.0, "node_cpu_percent": 51.0},
        },
        "learner-1": {"host": "node b", "address": "10.0.0.2", "figures": {"gpu_peak_allocated_gib": 7.5}},
    }
    metrics, tags = system_metric_names(reports)
    assert metrics["system/rollout-0/cpu_percent"] == 90.0
    assert metrics["system/learner-0/rss_gib"] == 2.0
    assert metrics["system/learner-1/gpu_peak_allocated_gib"] == 7.5
    assert "system/machine-node-a/cpu_percent" in metrics  # once per machine, from one of its roles
    assert not any("node_" in key for key in metrics)
    assert all(key.startswith("system/") for key in metrics)  # MLflow's "System metrics" tab
    assert tags == {
        "system.rollout-0.machine": "node-a (10.0.0.1)",
        "system.learner-0.machine": "node-a (10.0.0.1)",
        "system.learner-1.machine": "node b (10.0.0.2)",
    }
    # The driver's machine is measured by the driver: the actors there add no second point.
    metrics, _ = system_metric_names(reports, machines_measured_elsewhere={"node-a"})
    assert not any(key.startswith("system/machine-") for key in metrics)
    assert metrics["system/rollout-0/cpu_percent"] == 90.0


def test_the_kv_cache_peak_is_the_fullest_engine_step_since_the_last_reading():
    usage = iter([0.25, 0.75, 0.5])
    cache = SimpleNamespace(usage=0.0)

    def schedule():
        cache.usage = next(usage)
        return "output"

    scheduler = SimpleNamespace(kv_cache_manager=cache, schedule=schedule)
    llm = SimpleNamespace(
        llm_engine=SimpleNamespace(
            engine_core=SimpleNamespace(engine_core=SimpleNamespace(scheduler=scheduler))
        )
    )
    noted = _note_peak_kv_cache_usage(llm)
    assert [scheduler.schedule() for _ in range(3)] == ["output"] * 3
    assert noted[1] == [0.75]
    # The multiprocess engine's scheduler lives in another process: nothing to read.
    assert (
        _note_peak_kv_cache_usage(SimpleNamespace(llm_engine=SimpleNamespace(engine_core=object()))) is None
    )


@pytest.mark.parametrize(
    ("cwd", "environ", "copy"),
    [
        (RAY_COPY, {}, True),
        (RAY_COPY / "outputs", {}, True),
        (Path("/tmp/ray/session_1/runtime_resources/working_dir_files/s3_bucket_run_zip"), {}, True),
        (Path("/home/me/visualquality-r1"), {}, False),
        (Path("/home/me/visualquality-r1"), {"RAY_JOB_CONFIG_JSON_ENV_VAR": '{"runtime_env": {}}'}, False),
        (
            Path("/var/ray/runtime_resources/cache/abc"),
            {"RAY_JOB_CONFIG_JSON_ENV_VAR": '{"runtime_env": {"working_dir": "gcs://_ray_pkg_0a.zip"}}'},
            True,
        ),
    ],
)
def test_rays_working_dir_copy_is_recognised(cwd, environ, copy):
    assert in_ray_working_dir_copy(cwd, environ) is copy


def test_relative_tracking_stores():
    assert relative_store(None) and relative_store("sqlite:///mlflow.db") and relative_store("mlruns")
    assert relative_store("file:mlruns")
    assert not relative_store("sqlite:////srv/vqr1/mlflow.db")
    assert not relative_store("file:///srv/mlruns") and not relative_store("/srv/mlruns")
    assert not relative_store("http://mlflow.internal:5000")


def test_a_job_in_rays_copy_is_refused_with_one_message_naming_every_relative_key():
    config = load_config("cpu-tiny", [])  # outputs/cpu-tiny, outputs/cpu-tiny/checkpoints, no store
    message = ray_copy_problem(config, RAY_COPY, {})
    for key in ("train.output_dir=outputs/cpu-tiny", "checkpoint.dir=outputs/cpu-tiny/checkpoints"):
        assert key in message
    assert "tracking.tracking_uri (unset" in message and str(RAY_COPY) in message
    assert "train.output_dir=/srv/vqr1/run-1" in message  # the example
    # Outside the copy, relative paths are the project folder's, as for `make train`.
    assert ray_copy_problem(config, Path("/home/me/visualquality-r1"), {}) is None
    absolute = load_config(
        "cpu-tiny",
        [
            "train.output_dir=/srv/run",
            "checkpoint.dir=/srv/run/ckpt",
            "tracking.tracking_uri=sqlite:////srv/m.db",
        ],
    )
    assert ray_copy_problem(absolute, RAY_COPY, {}) is None
    # A store given by the environment counts as given.
    partly = load_config("cpu-tiny", ["train.output_dir=/srv/run", "checkpoint.dir=/srv/run/ckpt"])
    assert ray_copy_problem(partly, RAY_COPY, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) is None
    only_store = ray_copy_problem(partly, RAY_COPY, {})
    assert (
        "tracking.tracking_uri" in only_store
        and "train.output_dir=" not in only_store.split("For example")[0]
    )
