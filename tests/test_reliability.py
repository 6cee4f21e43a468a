"""Faults injected into real processes: a killed rollout worker is replaced, a hung call times out."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from cluster.checkpoints import read_trained_images
from configs.load import load_config

ROOT = Path(__file__).resolve().parents[1]


def kill_actors_of(pid: int, actor_class: str) -> list[int]:
    """SIGKILL the processes of `actor_class` actors started by the run `pid` (Ray's workers are its
    descendants), never another Ray session's on the same machine."""
    import psutil

    killed = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if any(actor_class in part for part in child.cmdline()):
                child.kill()
                killed.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return killed


def kill_process_tree(pid: int) -> list[int]:
    """SIGKILL the driver and everything it started (Ray's GCS, raylet and workers): a node that dies."""
    import psutil

    driver = psutil.Process(pid)
    processes = [*driver.children(recursive=True), driver]
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    return [process.pid for process in processes]


def run_driver(overrides: list[str], inject=None, timeout_s: float = 900) -> tuple[int, str, list[int]]:
    """Run `python -m cluster.train --config cpu-tiny` on `overrides`; while it runs, `inject(pid, lines)`
    is polled (every output line and every 0.2 s) until it returns the PIDs it killed. Returns the exit
    code, the whole output and those PIDs."""
    command = [sys.executable, "-m", "cluster.train", "--config", "cpu-tiny", *overrides]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    killed: list[int] = []
    deadline = time.monotonic() + timeout_s
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if inject is not None and not killed:
                killed = inject(process.pid, list(lines))
            time.sleep(0.2)
        if process.poll() is None:
            raise AssertionError(f"the run did not end within {timeout_s} s\n" + "".join(lines)[-3000:])
    finally:
        if process.poll() is None:
            kill_process_tree(process.pid)
        process.wait(timeout=60)
    time.sleep(0.5)  # the reader thread drains what is left in the pipe
    return process.returncode, "".join(lines), killed


def kill_engine_cores_of(pid: int) -> list[int]:
    """SIGKILL the vLLM engine-core processes (rollout.in_process_engine=false) under the rollout workers
    of the run `pid`, leaving the workers' own processes alive."""
    import psutil

    killed = []
    for process in psutil.Process(pid).children(recursive=True):
        try:
            if not any("RolloutWorker" in part for part in process.cmdline()):
                continue
            for child in process.children(recursive=True):
                if "EngineCore" in child.name() or any("EngineCore" in part for part in child.cmdline()):
                    child.kill()
                    killed.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return killed


def kill_rollout_worker_after_step_1(pid: int, lines: list[str]) -> list[int]:
    return kill_actors_of(pid, "RolloutWorker") if any(line.startswith("step 1/3") for line in lines) else []


def committed(tmp_path, step: int) -> bool:
    return (tmp_path / "checkpoints" / f"step-{step:06d}" / "manifest.json").is_file()


class Sleeper:
    def nap(self, seconds: float) -> str:
        time.sleep(seconds)
        return "awake"


@pytest.mark.slow
def test_hung_remote_call_ends_with_a_timeout_error_naming_actor_phase_and_step():
    import ray

    from cluster.system import RemoteCallError, wait

    config = load_config("cpu-tiny", ["cluster.call_timeout_s=2"])
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
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
def test_a_dead_rank_ends_the_wait_while_its_peer_still_blocks():
    """One rank killed while the other is blocked (as in a collective with a dead peer): the wait ends
    with the error at once, not after cluster.call_timeout_s."""
    import ray

    from cluster.system import RemoteCallError, wait

    config = load_config("cpu-tiny", ["cluster.call_timeout_s=600"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        blocked, doomed = (ray.remote(Sleeper).options(num_cpus=0).remote() for _ in range(2))
        refs = [blocked.nap.remote(600), doomed.nap.remote(600)]
        time.sleep(1)
        started = time.monotonic()
        ray.kill(doomed)
        with pytest.raises(RemoteCallError, match=r"step 4, phase update: learners died"):
            wait(refs, config, "update", 4, "learners")
        assert time.monotonic() - started < 30
        ray.kill(blocked)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_killed_rollout_worker_is_replaced_and_the_run_completes(tmp_path, tiny_overrides):
    """SIGKILL the rollout worker's process after step 1 at train.max_staleness=1, while it generates
    step 3's batch (submitted as step 2 starts; 200 new tokens make it take seconds): it is replaced,
    the lost batch is generated again, and the run ends after 3 steps with no batch trained more than
    one update after its weights."""

    overrides = tiny_overrides(
        tmp_path, 3, "eval.max_images=4", "train.max_staleness=1", "rollout.max_new_tokens=200"
    )
    code, output, killed = run_driver(overrides, kill_rollout_worker_after_step_1)
    assert killed, "no rollout worker process was found to kill\n" + output[-3000:]
    log, result, client = finished_three_steps_at_k1(tmp_path, code, output)
    history = client.get_metric_history(result["mlflow_run_id"], "events/rollout_worker_restarts")
    # One restart, counted from the step whose generation or weight push found the dead worker (step 2
    # unless the driver outran the kill).
    restarts = [m.value for m in history]
    assert len(restarts) == 3 and restarts[0] == 0 and restarts[-1] == 1 and restarts == sorted(restarts)
    # The batch lost in flight is generated again with the current weights (the replacement's): step 3
    # trains it on the weights of step 2, staleness 0, and the count of such batches is logged.
    regenerated = client.get_metric_history(result["mlflow_run_id"], "events/regenerated_batches")
    assert [m.value for m in regenerated][-1] == 1
    assert log[2]["weight_versions"] == [2] * len(log[2]["image_ids"])


@pytest.mark.slow
def test_killed_vllm_engine_process_gets_its_worker_replaced_and_the_run_completes(tmp_path, tiny_overrides):
    """With vLLM's multiprocess engine, SIGKILL the rollout worker's EngineCore process (its Ray actor
    lives on) after step 1 at train.max_staleness=1, while it generates step 3's batch: vLLM's
    EngineDeadError reaches the driver, which kills the worker, starts a replacement with a seed of its
    own (recorded in MLflow), loads the current weights into it and generates the lost batch again."""
    from actor.rollout_actor import engine_seed

    def kill_engine_after_step_1(pid, lines):
        return kill_engine_cores_of(pid) if any(line.startswith("step 1/3") for line in lines) else []

    overrides = tiny_overrides(
        tmp_path,
        3,
        "eval.max_images=4",
        "train.max_staleness=1",
        "rollout.max_new_tokens=200",
        "rollout.in_process_engine=false",
    )
    code, output, killed = run_driver(overrides, kill_engine_after_step_1)
    assert killed, "no EngineCore process was found to kill\n" + output[-3000:]
    log, result, client = finished_three_steps_at_k1(tmp_path, code, output)
    restarts = [
        m.value for m in client.get_metric_history(result["mlflow_run_id"], "events/rollout_worker_restarts")
    ]
    assert restarts[0] == 0 and restarts[-1] == 1, restarts
    regenerated = client.get_metric_history(result["mlflow_run_id"], "events/regenerated_batches")
    assert [m.value for m in regenerated][-1] == 1
    tags = client.get_run(result["mlflow_run_id"]).data.tags
    event = json.loads(tags["events.rollout_replacement.1"])
    config = load_config("cpu-tiny", overrides)
    seed = engine_seed(config.rollout.seed, 0, 1)
    assert event["worker"] == 0 and event["restart"] == 1 and event["cause"] == "its vLLM engine died", event
    assert event["seed"] == seed != config.rollout.seed and tags["rollout.worker_0.seed"] == str(seed)
    assert "events.rollout_replacement.2" not in tags


@pytest.mark.slow
def test_restart_limit_stops_a_crash_loop_with_a_clear_error(tmp_path, tiny_overrides):
    """With no restarts allowed, a killed rollout worker ends the run with an error naming the limit."""

    overrides = tiny_overrides(tmp_path, 3, "eval.max_images=4", "cluster.max_worker_restarts=0")
    code, output, killed = run_driver(overrides, kill_rollout_worker_after_step_1, timeout_s=600)
    assert killed and code != 0
    assert "cluster.max_worker_restarts=0" in output
    # The dead worker is found by the next call to it: step 2's generation, or its weight push when the
    # kill lands after generation (a race the CI machine hit).
    assert re.search(r"phase (generate|weight push): rollout worker\(s\) \[0\] died", output), output[-3000:]
    assert "the last good checkpoint is" in output or "no checkpoint was written yet" in output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("actor_class", "actor", "phases", "resume"),
    [
        ("LearnerWorker", "learners", {"update", "weight push", "checkpoint"}, True),
        # The resume after it is the learner case's (and the killed driver's below): not run twice.
        ("RewardWorker", "reward actor", {"reward"}, False),
    ],
)
def test_dead_learner_or_reward_actor_ends_the_run_naming_the_checkpoint_and_resume_finishes_it(
    tmp_path, tiny_overrides, actor_class, actor, phases, resume
):
    """Kill a learner rank (or the reward actor) once the step-1 checkpoint is committed: the run ends
    with an error naming the dead actor, the phase and step that found it, and the checkpoint of the
    step before (every step is checkpointed); `checkpoint.resume=true` completes it."""

    def kill_after_first_checkpoint(pid, lines):
        return kill_actors_of(pid, actor_class) if committed(tmp_path, 1) else []

    overrides = tiny_overrides(tmp_path, 3, "eval.max_images=4", "checkpoint.every=1")
    code, output, killed = run_driver(overrides, kill_after_first_checkpoint, timeout_s=600)
    assert killed, f"no {actor_class} process was found to kill\n" + output[-3000:]
    assert code != 0, output[-3000:]
    # The kill lands while step 2 or 3 runs (how far the driver got is a race): which step and phase
    # found the dead actor varies, but the error must name them and the checkpoint before that step.
    failure = re.search(rf"run failed: step (\d+), phase ([a-z ]+): {actor} died", output)
    assert failure, output[-3000:]
    step, phase = int(failure[1]), failure[2]
    assert step in (2, 3) and phase in phases, failure[0]
    last_good = tmp_path / "checkpoints" / f"step-{step - 1:06d}"
    assert f"the last good checkpoint is {last_good}" in output, output[-3000:]
    if not resume:
        return
    code, output, _ = run_driver([*overrides, "checkpoint.resume=true"], timeout_s=600)
    assert code == 0, output[-4000:]
    assert f"resumed from {last_good} at step {step - 1}" in output and "step 3/3" in output
    assert [entry["step"] for entry in read_trained_images(tmp_path / "out")] == [1, 2, 3]


@pytest.mark.slow
def test_driver_killed_after_a_checkpoint_resumes_and_trains_the_uninterrupted_runs_images(
    async_run, tmp_path, tiny_overrides
):
    """At train.max_staleness=2, SIGKILL the driver and every process it started once the step-1
    checkpoint is committed (a lost node), then resume: the images trained at each step, and the weight
    version each was sampled with, equal those of an uninterrupted run (the batches that were in flight
    come back from the checkpoint)."""
    first_tmp, first_config, _ = async_run
    overrides = tiny_overrides(
        tmp_path,
        3,
        f"train.max_staleness={first_config.train.max_staleness}",
        "eval.max_images=4",
        "checkpoint.every=1",
    )

    def kill_everything_after_first_checkpoint(pid, lines):
        return kill_process_tree(pid) if committed(tmp_path, 1) else []

    code, output, killed = run_driver(overrides, kill_everything_after_first_checkpoint)
    assert killed and code == -signal.SIGKILL, output[-3000:]

    code, output, _ = run_driver([*overrides, "checkpoint.resume=true"])
    assert code == 0, output[-4000:]
    # From step 1's checkpoint (two batches in flight), or a later one if the driver outran the kill.
    resumed = re.search(
        rf"resumed from {re.escape(str(tmp_path / 'checkpoints'))}/step-00000([123]) at step \1", output
    )
    assert resumed, output[-3000:]
    assert read_trained_images(tmp_path / "out") == read_trained_images(first_tmp / "out")
    # MLflow: the resumed run shows every step once (the lost steps replaced, not repeated), and the
    # run the killed driver left RUNNING is ended by the resume.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    steps = [m.step for m in client.get_metric_history(result["mlflow_run_id"], "reward/total_mean")]
    assert sorted(steps) == [1, 2, 3], steps
    killed_run = client.get_run(result["mlflow_run_id"]).data.tags["vqr1.resumed_from"]
    assert client.get_run(killed_run).info.status in ("FAILED", "KILLED")


OPEN_TRACKER = """
import sys, time
from cluster.tracking import Tracker
from configs.load import load_config
config = load_config("cpu-tiny", [f"tracking.tracking_uri={sys.argv[1]}", f"tracking.run_name=run-{sys.argv[3]}"])
start = float(sys.argv[2])
while time.time() < start:  # every process past its imports, then all at once
    time.sleep(0.001)
Tracker(config).finish()
"""


def test_runs_started_at_once_on_a_fresh_mlflow_store_all_open_it(tmp_path):
    # Without the lock, MLflow's first-connect migration of a new sqlite store races: measured here, 2 of
    # 3 processes died ("duplicate column name" / "Online migration expected to match one row").
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = time.time() + 20
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_TRACKER, uri, str(start), str(index)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(3)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], "\n".join(out[-2000:] for out in outputs)
    # A client, not mlflow.set_tracking_uri: that sets MLFLOW_TRACKING_URI for every later test's processes.
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("visualquality-r1")
    names = {run.info.run_name for run in client.search_runs([experiment.experiment_id])}
    assert names == {"run-0", "run-1", "run-2"}


def finished_three_steps_at_k1(tmp_path, code: int, output: str):
    """The run ended well after 3 steps, each trained on weights at most one update old: the
    trained-images log, the run's result.json and an MLflow client of its store."""
    assert code == 0, output[-4000:]
    assert "step 3/3" in output
    log = read_trained_images(tmp_path / "out")
    assert [entry["step"] for entry in log] == [1, 2, 3]
    assert all(0 <= entry["step"] - 1 - v <= 1 for entry in log for v in entry["weight_versions"])
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    return log, result, mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
