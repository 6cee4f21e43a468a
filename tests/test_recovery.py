"""The pieces of recovery that need no running system: how a dead vLLM engine is recognised and
surfaced, a replacement's wait for device memory and its seed, the learners' process group on loopback
with cluster.call_timeout_s as its timeout. The end-to-end cases are in tests/test_reliability.py."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from actor.rollout_actor import engine_seed, wait_for_device_memory
from cluster.system import RemoteCallError, is_dead_worker_error, is_engine_dead_error, wait
from configs.load import load_config

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


# --- a replacement's wait for the dead engine's device memory ------------------------------------------


class FakeDevice:
    """Free memory that comes back in steps as seconds pass on a fake clock."""

    def __init__(self, readings: list[int | None]) -> None:
        self.readings = readings
        self.now = 0.0
        self.polls = 0

    def read(self) -> int | None:
        self.polls += 1
        return self.readings[min(self.polls - 1, len(self.readings) - 1)]

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def wait_on(device: FakeDevice, target: int | None, deadline_s: float) -> tuple[bool, float]:
    return wait_for_device_memory(
        target, deadline_s, device.read, poll_s=1.0, clock=lambda: device.now, sleep=device.sleep
    )


def test_a_replacement_starts_once_its_predecessors_memory_is_back():
    # 70 GiB free before the dead engine started; its process takes three seconds to leave the GPU.
    device = FakeDevice([10 * GIB, 10 * GIB, 40 * GIB, 69 * GIB])
    assert wait_on(device, 70 * GIB, deadline_s=60) == (True, 3.0)  # 69 is within the 5 % margin
    assert device.polls == 4


def test_the_wait_ends_at_its_deadline_when_the_memory_never_comes_back():
    device = FakeDevice([10 * GIB])
    assert wait_on(device, 70 * GIB, deadline_s=5.5) == (False, 5.5)
    assert device.polls == 7  # at 0, 1, ..., 5 and at the deadline itself


@pytest.mark.parametrize(("target", "readings"), [(None, [GIB]), (70 * GIB, [None])])
def test_without_a_device_or_a_predecessor_there_is_nothing_to_wait_for(target, readings):
    device = FakeDevice(readings)
    assert wait_on(device, target, deadline_s=60) == (True, 0.0)
    assert device.now == 0.0


# --- a replacement's seed -----------------------------------------------------------------------------


def test_a_replacement_draws_from_a_seed_of_its_own():
    first = {engine_seed(7, index) for index in range(8)}
    replacements = [engine_seed(7, index, restart) for index in range(8) for restart in (1, 2, 3)]
    assert engine_seed(7, 0, 0) == 7 and engine_seed(7, 3, 0) == engine_seed(7, 3)  # restart 0 as before
    assert len(set(replacements)) == len(replacements)  # every worker and restart apart
    assert not first & set(replacements)  # none replays a first engine's stream, the dead one's included
    assert replacements == [engine_seed(7, index, restart) for index in range(8) for restart in (1, 2, 3)]
    assert not set(replacements) & {engine_seed(8, i, r) for i in range(8) for r in (1, 2, 3)}


# --- a dead engine -----------------------------------------------------------------------------------


def remote_error(cause: BaseException):
    """What ray.get raises for a task that raised `cause` in an actor."""
    error = ray.exceptions.RayTaskError("RolloutWorker.generate", f"Traceback ...\n{cause!r}", cause)
    return error.as_instanceof_cause()


def test_a_dead_engine_is_recognised_through_ray_and_a_dead_worker_is_either_kind():
    from vllm.v1.engine.exceptions import EngineDeadError

    dead = remote_error(EngineDeadError())
    assert isinstance(dead, ray.exceptions.RayTaskError)
    assert is_engine_dead_error(dead) and is_dead_worker_error(dead)
    wrapped = RuntimeError("generate failed")
    wrapped.__cause__ = EngineDeadError()
    assert is_engine_dead_error(remote_error(wrapped))
    assert is_dead_worker_error(ray.exceptions.RayActorError())
    for other in (remote_error(ValueError("bad image")), RuntimeError("x"), None):
        assert not is_engine_dead_error(other) and not is_dead_worker_error(other)


def test_wait_turns_a_dead_engine_into_a_named_error_and_lets_other_task_errors_through(monkeypatch):
    from vllm.v1.engine.exceptions import EngineDeadError

    config = load_config("cpu-tiny")
    errors = iter([remote_error(EngineDeadError()), remote_error(ValueError("bad image"))])

    def failing_get(refs, timeout=None):
        raise next(errors)

    monkeypatch.setattr(ray, "get", failing_get)
    with pytest.raises(
        RemoteCallError, match=r"step 5, phase generate: rollout workers: vLLM engine died"
    ) as info:
        wait([], config, "generate", 5, "rollout workers")
    assert is_dead_worker_error(info.value.__cause__)  # what collect_generation replaces workers on
    with pytest.raises(ValueError, match="bad image"):
        wait([], config, "generate", 5, "rollout workers")


def fake_engine_client() -> SimpleNamespace:
    """The parts of vLLM's SyncMPClient that the watch uses."""
    return SimpleNamespace(
        resources=SimpleNamespace(engine_dead=False),
        outputs_queue=queue.Queue(),
        utility_results={7: Future()},
    )


def test_a_dead_engine_core_wakes_a_waiting_generate_and_weight_push_with_engine_dead_error():
    from vllm.v1.engine.exceptions import EngineDeadError

    from actor.rollout_engine import watch_engine_core

    client, stop, result = fake_engine_client(), threading.Event(), []
    watcher = threading.Thread(target=lambda: result.append(watch_engine_core(client, stop, interval_s=0.01)))
    watcher.start()
    client.resources.engine_dead = True  # what vLLM's monitor sets when the process exits
    watcher.join(timeout=10)
    assert result == [True]
    assert isinstance(client.outputs_queue.get_nowait(), EngineDeadError)  # generate's get_output raises it
    with pytest.raises(EngineDeadError):
        client.utility_results[7].result(timeout=0)  # a collective_rpc (weight push) in flight


def test_an_orderly_shutdown_is_not_reported_as_a_death():
    from actor.rollout_engine import watch_engine_core

    client, stop = fake_engine_client(), threading.Event()
    stop.set()
    client.resources.engine_dead = True  # vLLM's shutdown marks it too
    assert watch_engine_core(client, stop, interval_s=0.01) is False
    assert client.outputs_queue.empty() and not client.utility_results[7].done()


# --- the learners' process group ---------------------------------------------------------------------

ONE_RANK_GROUP = """
from configs.runtime_env import apply_default_env
apply_default_env()
import psutil, torch
from learner.learner_actor import free_port, init_process_group, process_group_timeout_s
init_process_group("gloo", 0, 1, "127.0.0.1", free_port("127.0.0.1"), 42.0)
values = torch.ones(2)
torch.distributed.all_reduce(values)
listening = sorted(
    c.laddr.ip for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN
)
print("RESULT", process_group_timeout_s(), ",".join(listening))
"""


@pytest.mark.slow
def test_the_learner_group_listens_on_loopback_only_and_times_out_after_call_timeout_s():
    """One gloo rank through the learners' own opening: its store and gloo listen on 127.0.0.1 (torch's
    env:// store would listen on every interface), and the group's timeout is the one given."""
    done = subprocess.run(
        [sys.executable, "-c", ONE_RANK_GROUP], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    _, timeout, listening = line.split()
    assert float(timeout) == 42.0
    assert listening.split(",") == ["127.0.0.1", "127.0.0.1"]  # the store and gloo's pair listener


# --- the restart budget ------------------------------------------------------------------------------


def test_each_role_has_its_own_restart_budget_and_a_crash_loop_ends_naming_the_limit():
    from cluster.system import use_restarts

    config = load_config("cpu-tiny", ["cluster.max_restarts=2"])
    system = SimpleNamespace(restarts={})
    cause = RuntimeError("killed")
    use_restarts(
        system, config, "rollout worker", 2, "step 3, phase generate: rollout worker(s) [0, 1]", cause
    )
    use_restarts(system, config, "reward actor", 1, "step 3, phase reward: the reward actor", cause)
    use_restarts(system, config, "learner group", 2, "step 4, phase update: a learner rank", cause)
    assert system.restarts == {"rollout worker": 2, "reward actor": 1, "learner group": 2}
    with pytest.raises(RemoteCallError) as info:
        use_restarts(
            system, config, "rollout worker", 1, "step 5, phase weight push: rollout worker(s) [0]", cause
        )
    assert str(info.value) == (
        "step 5, phase weight push: rollout worker(s) [0] died and the cluster.max_restarts=2 "
        "replacements of the rollout worker in this run are used up"
    )
    assert info.value.__cause__ is cause
    assert system.restarts["rollout worker"] == 2  # a refused replacement is not counted
    use_restarts(system, config, "reward actor", 1, "step 5, phase reward: the reward actor", cause)
    with pytest.raises(RemoteCallError, match=r"cluster.max_restarts=0 replacements of the reward actor"):
        use_restarts(
            SimpleNamespace(restarts={}),
            load_config("cpu-tiny", ["cluster.max_restarts=0"]),
            "reward actor",
            1,
            "step 1, phase reward: the reward actor",
            cause,
        )


def test_a_dead_actor_call_is_told_apart_by_the_actor_it_went_to():
    from cluster.system import is_dead_actor_call

    def failed(actor: str, cause: BaseException) -> RemoteCallError:
        try:
            raise RemoteCallError(f"step 2, phase update: {actor} died", actor, "update") from cause
        except RemoteCallError as exc:
            return exc

    dead = ray.exceptions.RayActorError()
    assert is_dead_actor_call(failed("learners", dead), "learners")
    assert not is_dead_actor_call(failed("learners", dead), "reward actor")
    assert not is_dead_actor_call(failed("learners", ray.exceptions.GetTimeoutError()), "learners")
    assert not is_dead_actor_call(ValueError("learners"), "learners")


class RecordingWorker:
    """A rollout worker handle whose generate.remote records the images and request seed it was sent."""

    def __init__(self, calls: list) -> None:
        self.generate = SimpleNamespace(remote=lambda images, n, seed=None: calls.append((images, n, seed)))


def test_a_reproducible_batch_seeds_each_sample_alike_however_the_images_are_sharded():
    """rollout.reproducible_batches: sample k of image i of step s's batch gets batch_seed(seed, s) +
    i * G + k (the engine adds i * G + k within a call) whether one worker draws the batch or three."""
    from cluster.system import Generation, _submit, batch_seed

    images = [bytes([i]) for i in range(7)]
    config = load_config("cpu-tiny", ["rollout.reproducible_batches=true", "rollout.seed=3"])
    n = config.rollout.num_generations
    first = batch_seed(3, 5)
    assert len({batch_seed(3, s) for s in range(1, 50)}) == 49 and batch_seed(4, 5) != first
    for workers in (1, 3):
        calls = []
        system = SimpleNamespace(rollout_workers=[RecordingWorker(calls) for _ in range(workers)])
        _submit(system, config, Generation(step=5, rows=[], images=images))
        sent = [
            (image, seed + i * n + k)
            for shard, _, seed in calls
            for i, image in enumerate(shard)
            for k in range(n)
        ]
        assert sent == [(image, first + i * n + k) for i, image in enumerate(images) for k in range(n)]
    unseeded = load_config("cpu-tiny")
    calls = []
    _submit(SimpleNamespace(rollout_workers=[RecordingWorker(calls)]), unseeded, Generation(5, [], images))
    assert calls[0][2] is None  # the default: the engine's own stream


class OrderedWorker:
    """A rollout worker handle that records, in order, the weight loads and generations it is sent."""

    def __init__(self) -> None:
        self.calls: list = []
        self.update_weights = SimpleNamespace(
            remote=lambda refs, version: self.calls.append(("load", version))
        )
        self.generate = SimpleNamespace(
            remote=lambda images, n, seed=None: self.calls.append(("generate", len(images)))
        )


def test_a_lost_batch_is_generated_again_with_the_weights_it_was_first_sampled_with():
    """At k >= 1 a batch lost with its rollout worker was sampled with an older version than the learners'
    now. Where that version's push is kept, every worker loads it before the batch and the current
    version after it; where it is not (or it is the current one), the batch is simply submitted again."""
    from cluster.system import Generation, _submit_again

    config = load_config("cpu-tiny", ["rollout.reproducible_batches=true", "train.max_staleness=1"])
    workers = [OrderedWorker(), OrderedWorker()]
    system = SimpleNamespace(
        rollout_workers=workers, policy_version=14, kept_pushes={13: ["b13"], 14: ["b14"]}
    )
    lost = Generation(step=15, rows=[], images=[b"a", b"b", b"c"], version=13)
    _submit_again(system, config, lost)
    assert workers[0].calls == [("load", 13), ("generate", 2), ("load", 14)]
    assert workers[1].calls == [("load", 13), ("generate", 1), ("load", 14)]
    assert len(lost.loads) == 4 and len(lost.refs) == 2
    for version in (14, 12):  # sampled with the current weights; a version no longer kept
        for worker in workers:
            worker.calls.clear()
        again = Generation(step=15, rows=[], images=[b"a", b"b"], version=version)
        _submit_again(system, config, again)
        assert [worker.calls for worker in workers] == [[("generate", 1)], [("generate", 1)]]
        assert again.loads == []


def test_the_pushes_kept_are_the_last_k_plus_one_and_only_where_a_batch_can_be_redone_alike():
    from cluster.system import keeps_pushes, kept_after_push

    kept = {}
    for version in range(1, 6):
        kept = kept_after_push(kept, version, [f"b{version}"], staleness=2)
    assert kept == {3: ["b3"], 4: ["b4"], 5: ["b5"]}
    # The learners went back to step 3's checkpoint: the pushes after it will be made again.
    assert kept_after_push(kept, 3, ["b3'"], staleness=2) == {3: ["b3'"]}
    assert kept_after_push({}, 0, ["b0"], staleness=0) == {0: ["b0"]}
    seeded = ["rollout.reproducible_batches=true"]
    assert keeps_pushes(load_config("cpu-tiny", [*seeded, "train.max_staleness=1"]))
    assert not keeps_pushes(load_config("cpu-tiny", [*seeded, "train.max_staleness=0"]))
    assert not keeps_pushes(load_config("cpu-tiny", ["train.max_staleness=1"]))
    assert not keeps_pushes(
        load_config("gpu-7b-1node", [*seeded, "train.max_staleness=1", "cluster.weight_transport=nccl"])
    )


class HandOverWorker:
    """A rollout worker handle whose calls are logged as (name, method, args); a dead one's calls fail."""

    def __init__(self, name: str, log: list, dead: bool = False) -> None:
        self.name, self.log, self.dead = name, log, dead

    def __getattr__(self, method: str):
        def remote(*args):
            self.log.append((self.name, method, args))
            return "dead" if self.dead else "ok"

        return SimpleNamespace(remote=remote)


def test_a_rollout_worker_found_dead_at_a_colocated_hand_over_is_replaced_and_joins_the_others(monkeypatch):
    """Colocated, a rollout worker can die while its engine sleeps (the learner training): the sleep or
    wake call finds it, it is replaced (awake, with the learners' weights) and the call is made on the
    replacement alone, so every engine ends in the same state. Other errors end the call as they are."""
    import cluster.system as system_module
    from cluster.system import sleep_rollout_engines, wake_rollout_engines

    log: list = []

    def fake_wait(refs, config, phase, step, actor):
        if "dead" in refs:
            raise RemoteCallError(f"step {step}, phase {phase}: {actor} died", actor, phase) from (
                ray.exceptions.RayActorError()
            )
        if "broken" in refs:
            raise RemoteCallError(f"step {step}, phase {phase}: {actor} failed", actor, phase)
        return refs

    def fake_replace(system, config, step, cause, phase):
        log.append(("replace", phase, step))
        for index, worker in enumerate(system.rollout_workers):
            if worker.dead:
                system.rollout_workers[index] = HandOverWorker(f"new{index}", log)

    monkeypatch.setattr(system_module, "wait", fake_wait)
    monkeypatch.setattr(system_module, "replace_dead_rollout_workers", fake_replace)
    config = load_config("cpu-tiny", ["cluster.placement=colocate", "cluster.colocate.sleep_level=2"])
    system = SimpleNamespace(
        rollout_workers=[HandOverWorker("w0", log), HandOverWorker("w1", log, dead=True)], learners=[]
    )
    sleep_rollout_engines(system, config, 3)
    assert log == [
        ("w0", "sleep", (2,)),
        ("w1", "sleep", (2,)),
        ("replace", "sleep", 3),
        ("new1", "sleep", (2,)),
    ]

    log.clear()
    system.rollout_workers[0].dead = True  # dies while asleep; found when the weights wake
    wake_rollout_engines(system, config, 4)
    assert log == [
        ("w0", "wake_up", ("weights",)),
        ("new1", "wake_up", ("weights",)),
        ("replace", "wake", 4),
        ("new0", "wake_up", ("weights",)),
        ("new0", "wake_up", ("kv_cache",)),
        ("new1", "wake_up", ("kv_cache",)),
    ]

    log.clear()
    system.rollout_workers[1] = SimpleNamespace(sleep=SimpleNamespace(remote=lambda level: "broken"))
    with pytest.raises(RemoteCallError, match="step 5, phase sleep: rollout workers failed"):
        sleep_rollout_engines(system, config, 5)
    assert ("replace", "sleep", 5) not in log
