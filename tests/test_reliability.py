"""Faults injected into real processes: a run that loses a process of each kind heals itself and ends
where a fault-free run ends, a killed driver resumes, a hung call times out."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from bench.chaos import Fault, chaos_run, kill_process_tree
from cluster.checkpoints import read_trained_images
from configs.load import load_config

ROOT = Path(__file__).resolve().parents[1]


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


def committed(tmp_path, step: int) -> bool:
    return (tmp_path / "checkpoints" / f"step-{step:06d}" / "manifest.json").is_file()


class BucketOwner:
    """A learner rank 0 that dies half a second after handing out the buckets it put."""

    def weight_buckets(self, bucket_bytes: int) -> list:
        import os

        import ray

        threading.Timer(0.5, os._exit, [1]).start()
        return [ray.put(b"weights")]

    def ping(self) -> int:
        return 0


class BucketReader:
    """A rollout worker that fetches the buckets only once their owner is known dead (a fixed delay was
    a race: the owner's object can outlive it in the node's store until the raylet learns of the death)."""

    def __init__(self, owner=None):
        self.owner = owner

    def update_weights(self, bucket_refs: list, version: int) -> int:
        import ray

        if self.owner is not None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    ray.get(self.owner.ping.remote(), timeout=5)
                except ray.exceptions.RayActorError:
                    break
                except ray.exceptions.GetTimeoutError:
                    continue
                time.sleep(0.2)
            time.sleep(1)
        return len(ray.get(bucket_refs))


class Sleeper:
    def nap(self, seconds: float) -> str:
        time.sleep(seconds)
        return "awake"

    def fail_after(self, seconds: float) -> None:
        time.sleep(seconds)
        raise RuntimeError("gloo: Connection closed by peer")


@pytest.mark.slow
def test_a_hung_call_times_out_and_a_dead_rank_ends_the_wait_at_once_naming_actor_phase_and_step():
    """In one Ray session: a hung remote call ends with a timeout error naming the actor, phase and step;
    one rank killed while the other is blocked (as in a collective with a dead peer) ends the wait at
    once, not after cluster.call_timeout_s; a rank whose own call failed because its peer died (its
    collective lost the connection) is reported as that death, which the driver recovers from; and so is
    weight buckets' owner that died before a rollout worker fetched them."""
    import ray

    from cluster.system import RemoteCallError, is_dead_actor_call, push_weights, wait

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    # Ray's workers cannot import this test module: ship the Sleeper class by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        sleeper = ray.remote(Sleeper).options(num_cpus=0).remote()
        started = time.monotonic()
        with pytest.raises(
            RemoteCallError, match=r"step 7, phase generate: sleepy actor did not answer within"
        ):
            wait(
                sleeper.nap.remote(60),
                load_config("cpu-tiny", ["cluster.call_timeout_s=2"]),
                "generate",
                7,
                "sleepy actor",
            )
        assert time.monotonic() - started < 30
        ray.kill(sleeper)

        config = load_config("cpu-tiny", ["cluster.call_timeout_s=600"])
        blocked, doomed = (ray.remote(Sleeper).options(num_cpus=0).remote() for _ in range(2))
        refs = [blocked.nap.remote(600), doomed.nap.remote(600)]
        time.sleep(1)
        started = time.monotonic()
        ray.kill(doomed)
        with pytest.raises(RemoteCallError, match=r"step 4, phase update: learners died"):
            wait(refs, config, "update", 4, "learners")
        assert time.monotonic() - started < 30
        ray.kill(blocked)

        survivor, doomed = (ray.remote(Sleeper).options(num_cpus=0).remote() for _ in range(2))
        refs = [survivor.fail_after.remote(1), doomed.nap.remote(600)]
        threading.Timer(3, ray.kill, [doomed]).start()  # after the survivor's error reached the wait
        with pytest.raises(RemoteCallError, match=r"step 5, phase checkpoint: learners died") as info:
            wait(refs, config, "checkpoint", 5, "learners")
        assert is_dead_actor_call(info.value, "learners")
        ray.kill(survivor)
        # Without a death the task's own error goes through as it is.
        with pytest.raises(ray.exceptions.RayTaskError, match="Connection closed by peer"):
            wait(ray.remote(Sleeper).options(num_cpus=0).remote().fail_after.remote(0), config, "x", 1, "y")

        # Learner rank 0 dies after handing out the weight buckets it owns, before a rollout worker
        # fetched them (a death found by the rollout side): the push reports a learner death.
        owner = ray.remote(BucketOwner).options(num_cpus=0).remote()
        reader = ray.remote(BucketReader).options(num_cpus=0).remote(owner)
        system = SimpleNamespace(policy_version=3, learners=[owner], rollout_workers=[reader])
        with pytest.raises(RemoteCallError, match=r"step 6, phase weight push: learners died") as info:
            push_weights(system, config, 6)
        assert is_dead_actor_call(info.value, "learners")
        assert ray.get(reader.update_weights.remote([ray.put(b"w")], 4)) == 1  # the reader is fine
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_run_that_loses_each_kind_of_process_heals_itself_and_ends_where_a_fault_free_run_ends(tmp_path):
    """bench.chaos's short case. A 10-step run (k = 0, the multiprocess engine, a checkpoint every step,
    rollout.reproducible_batches) loses the rollout worker's vLLM EngineCore process in step 2, the
    rollout worker's actor process in step 4, the reward actor in step 6 and a learner rank in step 8 (or
    later: each fault waits for a whole step after the one before, so that death has been found, however
    fast the steps run; a learner rank's death can be found a step late, so it comes last, two steps
    before the end; the two rollout deaths are two steps apart, or one replacement would take both). A
    step of cpu-tiny can take half a second, so the faults come within 0.3 s of a step's line (later ones
    would land in a later step). The driver replaces each in the same process (the
    learners from the newest checkpoint) and the run finishes with the trained-images log and the final
    weights of a fault-free run of the same seed; MLflow records each replacement, with its step, phase
    and the steps redone, and each step once."""
    from actor.rollout_actor import engine_seed

    faults = [
        Fault(2, "engine process", 0.3),
        Fault(4, "rollout actor", 0.2),
        Fault(6, "reward actor", 0.1),
        Fault(8, "learner rank", 0.0),
    ]
    report, chaos = chaos_run(10, faults, tmp_path)
    assert all(fault.killed for fault in faults), ([(f.kind, f.killed) for f in faults], chaos.output[-6000:])
    hits = [fault.hit_step for fault in faults]
    assert hits == sorted(set(hits)) and hits[0] >= 2 and hits[-1] <= 10, hits
    assert report["holds"], json.dumps(report, indent=1) + chaos.output[-4000:]
    # Which call finds a dead process depends on how far the driver got when it died: the steps and
    # phases vary, the replacements do not.
    events = report["replacements"]
    (learners,) = [e for e in events if e["role"] == "learner group"]
    assert learners["phase"] in {"update", "weight push", "sync check", "checkpoint"}, learners
    # From the checkpoint of the step before (every step is checkpointed); a rank lost while the step's
    # own checkpoint was written has that finished step trained again.
    assert learners["restored_step"] == learners["step"] - 1
    assert learners["steps_redone"] == (1 if learners["phase"] == "checkpoint" else 0)
    (reward,) = [e for e in events if e["role"] == "reward actor"]
    assert (reward["phase"], reward["steps_redone"]) == ("reward", 0)
    # The engine's death and the actor's: one replacement each, each with a seed of its own.
    rollout = [e for e in events if e["role"] == "rollout worker"]
    assert [e["cause"] for e in rollout] == ["its vLLM engine died", "it died"], rollout
    seed = load_config("cpu-tiny").rollout.seed
    assert [e["seed"] for e in rollout] == [engine_seed(seed, 0, 1), engine_seed(seed, 0, 2)]
    # The finished run's MLflow run: every step once, every replacement as an event.
    result = json.loads((tmp_path / "chaos" / "out" / "result.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'chaos' / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(result["mlflow_run_id"], "reward/total_mean")]
    assert sorted(steps) == list(range(1, 11)), steps
    tags = client.get_run(result["mlflow_run_id"]).data.tags
    logged = [json.loads(value) for key, value in tags.items() if key.startswith("events.replacement.")]
    assert sorted(logged, key=json.dumps) == sorted(events, key=json.dumps)
    for key, count in (("events/learner_restarts", 1), ("events/reward_restarts", 1)):
        assert client.get_metric_history(result["mlflow_run_id"], key)[-1].value == count, key


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
