"""Faults injected into real processes: a killed rollout worker is replaced, a hung call times out."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from configs.load import load_config

ROOT = Path(__file__).resolve().parents[1]


def kill_rollout_workers_of(pid: int) -> list[int]:
    """SIGKILL the rollout worker processes started by the run `pid` (Ray's workers are its descendants),
    never another Ray session's on the same machine."""
    import psutil

    killed = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if any("RolloutWorker" in part for part in child.cmdline()):
                child.kill()
                killed.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return killed


class Sleeper:
    def nap(self, seconds: float) -> str:
        time.sleep(seconds)
        return "awake"


@pytest.mark.slow
def test_hung_remote_call_ends_with_a_timeout_error_naming_actor_phase_and_step():
    import ray

    from cluster.train import RemoteCallError, wait

    config = load_config("cpu-tiny", ["cluster.call_timeout_s=2"])
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    # Ray's workers cannot import this test module: ship the Sleeper class by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        sleeper = ray.remote(Sleeper).options(num_cpus=0).remote()
        started = time.monotonic()
        with pytest.raises(
            RemoteCallError, match=r"step 7, phase generate: sleepy actor did not answer within"
        ):
            wait(sleeper.nap.remote(60), config, "generate", 7, "sleepy actor")
        assert time.monotonic() - started < 30
        ray.kill(sleeper)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_killed_rollout_worker_is_replaced_and_the_run_completes(tmp_path, tiny_overrides):
    """SIGKILL the rollout worker's process after step 1: the run still ends after 3 steps."""
    command = [
        sys.executable,
        "-m",
        "cluster.train",
        "--config",
        "cpu-tiny",
        *tiny_overrides(tmp_path, 3, "eval.max_images=4"),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    killed: list[int] = []

    def kill_rollout_worker_after_first_step():
        for line in process.stdout:
            lines.append(line)
            if line.startswith("step 1/3") and not killed:
                killed.extend(kill_rollout_workers_of(process.pid))

    reader = threading.Thread(target=kill_rollout_worker_after_first_step)
    reader.start()
    try:
        returncode = process.wait(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(timeout=30)
    output = "".join(lines)
    assert killed, "no rollout worker process was found to kill\n" + output[-3000:]
    assert returncode == 0, output[-4000:]
    assert "step 3/3" in output
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "out" / "trained_images.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    history = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        result["mlflow_run_id"], "events/rollout_worker_restarts"
    )
    assert [m.value for m in history] == [0, 1, 1]


@pytest.mark.slow
def test_restart_limit_stops_a_crash_loop_with_a_clear_error(tmp_path, tiny_overrides):
    """With no restarts allowed, a killed rollout worker ends the run with an error naming the limit."""
    command = [
        sys.executable,
        "-m",
        "cluster.train",
        "--config",
        "cpu-tiny",
        *tiny_overrides(tmp_path, 3, "eval.max_images=4", "cluster.max_worker_restarts=0"),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith("step 1/3"):
            kill_rollout_workers_of(process.pid)
    returncode = process.wait(timeout=600)
    text = "".join(output)
    assert returncode != 0
    assert "cluster.max_worker_restarts=0" in text and "phase generate" in text
    assert "the last good checkpoint is" in text or "no checkpoint was written yet" in text
