"""The Ray system of one run: the actors (rollout workers, reward actor, learner ranks) in their
placement groups (one per role), remote calls with named timeouts, rollout-worker replacement, the
weight push, and each role's system figures per step (`SystemMonitor`).

`cluster.train` drives it; every call here is one phase of a step and names the step, the phase and the
actor when it fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("vqr1.system")


@dataclass
class System:
    """The actors of one run."""

    rollout_workers: list
    reward: object
    learners: list
    placement_group: object
    # make_rollout_worker(i, restart=0, free_bytes=None) creates rollout worker i in its bundle; a
    # replacement (restart >= 1) gets a seed of its own and first waits for free_bytes of device memory.
    make_rollout_worker: Callable[..., object]
    # Start the reward actor, and the learner group (all ranks, their process group formed, the start
    # model loaded): again after one died (`replace_reward_actor`, `restart_learners`).
    make_reward: Callable[[], object]
    make_learners: Callable[[], list]
    # Replacements so far per role ("rollout worker", "reward actor", "learner group"), each against
    # cluster.max_restarts (`use_restarts`).
    restarts: dict[str, int] = field(default_factory=dict)
    # Per rollout worker: its engine's seed and its device's free memory before its engine started
    # (None on CPUs), as the first workers report them once started (`RolloutWorker.start_figures`).
    rollout_start_figures: list[dict] = field(default_factory=list)
    # One entry per replacement: step, phase, role, actor, restart (of that role), steps_redone, cause,
    # and for a rollout worker its index and new seed.
    replacements: list[dict] = field(default_factory=list)
    logged_replacements: int = 0  # how many of them are in MLflow (cluster.train.log_replacements)
    # The learners' weights: the number of the step whose update made them (0: the start model).
    policy_version: int = 0
    # Batches generated again because their rollout worker died with them in flight.
    regenerated_batches: int = 0
    # Weight version -> the object-store buckets of its push, for the last k + 1 versions where a lost
    # batch is generated again with the weights it was first sampled with (`keeps_pushes`).
    kept_pushes: dict[int, list] = field(default_factory=dict)

    @property
    def rollout_restarts(self) -> int:
        return self.restarts.get("rollout worker", 0)


@dataclass
class Generation:
    """One step's batch on the rollout workers: in flight (`refs`) until `collect_generation` fills
    `rollouts` (G completions per image, in the order of `rows`)."""

    step: int
    rows: list[dict]  # the dataset rows: id, image path, mos, dataset
    images: list[bytes]
    refs: list | None = None  # one per rollout worker shard
    workers: list | None = None  # the handles the shards went to
    rollouts: list | None = None
    version: int | None = None  # the policy version it was first submitted with
    # The weight loads around a batch generated again with the weights it was first sampled with
    # (`_submit_again`), waited for with it.
    loads: list = field(default_factory=list)


class RemoteCallError(RuntimeError):
    """A remote call that failed or timed out, naming the actor, the phase and the step (`actor` and
    `phase`: as `wait` was given them, e.g. "learners", "update")."""

    def __init__(self, message: str, actor: str = "", phase: str = "") -> None:
        super().__init__(message)
        self.actor = actor
        self.phase = phase


def is_engine_dead_error(exc: BaseException | None) -> bool:
    """Whether exc is, carries or was caused by vLLM's EngineDeadError (its engine-core process died):
    raised in a rollout worker, it reaches the driver as a RayTaskError that is also an EngineDeadError
    (or, where the cause could not be rebuilt, names it in its traceback). Judged by class name, so the
    driver need not import vLLM."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(cls.__name__ == "EngineDeadError" for cls in type(exc).__mro__):
            return True
        if "EngineDeadError" in (getattr(exc, "traceback_str", None) or ""):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return False


def is_dead_worker_error(exc: BaseException | None) -> bool:
    """A rollout worker to replace: its actor died (RayActorError) or its vLLM engine did."""
    import ray

    return isinstance(exc, ray.exceptions.RayActorError) or is_engine_dead_error(exc)


def wait(refs, config, phase: str, step: int, actor: str):
    """ray.get(refs) within cluster.call_timeout_s. A call whose actor died raises at once, while the
    others still run (a learner rank blocked in a collective with the dead peer does not hold the run).
    So does a call whose vLLM engine died inside a live actor (`is_engine_dead_error`)."""
    import ray

    try:
        return ray.get(refs, timeout=config.cluster.call_timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise RemoteCallError(
            f"step {step}, phase {phase}: {actor} did not answer within cluster.call_timeout_s="
            f"{config.cluster.call_timeout_s:g}s",
            actor,
            phase,
        ) from exc
    except ray.exceptions.RayActorError as exc:
        raise RemoteCallError(f"step {step}, phase {phase}: {actor} died: {exc}", actor, phase) from exc
    except ray.exceptions.RayTaskError as exc:
        if is_engine_dead_error(exc):
            raise RemoteCallError(
                f"step {step}, phase {phase}: {actor}: vLLM engine died", actor, phase
            ) from exc
        # A task that failed because its peer died (a learner rank whose collective lost the other rank)
        # is reported as that death, which the driver recovers from.
        death = peer_death(refs)
        if death is None:
            raise
        raise RemoteCallError(f"step {step}, phase {phase}: {actor} died: {death}", actor, phase) from death


def peer_death(refs, within_s: float = 30.0):
    """The RayActorError of a call among `refs` whose actor died, waiting up to `within_s` seconds for
    the calls that have not ended yet; None if none did."""
    import ray

    refs = refs if isinstance(refs, list) else [refs]
    if not refs:
        return None
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=within_s)
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayActorError as death:
            return death
        except Exception:  # another task's own error, not a death
            continue
    return None


def is_dead_actor_call(exc: BaseException, actor: str) -> bool:
    """Whether exc is a call to `actor` (as named to `wait`) that failed because one of its actors died."""
    import ray

    return (
        isinstance(exc, RemoteCallError)
        and exc.actor == actor
        and isinstance(exc.__cause__, ray.exceptions.RayActorError)
    )


def start_ray(config, env_vars: dict[str, str]) -> None:
    """Start or join Ray. Each worker process of the run starts with `actor_output_to_log`
    (configs/runtime_env.py): its output goes to the run's log file, and only its errors reach the
    driver's console, prefixed with the actor's name."""
    import os

    import ray

    address = config.cluster.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {
        "env_vars": env_vars,
        "worker_process_setup_hook": "configs.runtime_env.actor_output_to_log",
    }
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        from ray._private import ray_constants

        # Ray swaps a loopback node address for the machine's own (so that other nodes could join), and
        # then every process of the node listens on all interfaces. Its single-node mode (the default on
        # macOS and Windows, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) keeps cluster.host as given, so with
        # the default host everything listens on loopback only. The flag is read when ray is imported,
        # too early for an environment variable here; it only matters while the node starts.
        cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(
                # A node of its own: without "local", ray.init joins any Ray already running on the
                # machine (another run's, a test's) and fails on num_cpus or shares its resources.
                address="local",
                num_cpus=config.cluster.num_cpus,
                include_dashboard=False,
                _node_ip_address=config.cluster.host,
                runtime_env=runtime_env,
            )
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


def reserve_placement(config) -> dict[str, object]:
    """Reserve the bundles of each role and wait for them: {"rollout": placement group, "learner":
    placement group}; rollout worker i and learner rank i take bundle i of their role's group.

    Dedicated: one placement group per role, so the two roles never share a bundle. The learners' is
    STRICT_PACK, all ranks on one node (ZeRO-3 gathers every layer in every step, over the node's links
    rather than the network), and is reserved first, while a whole node may still be free; the rollout
    workers' is PACK. Colocated: one group whose bundles hold both roles' resources.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    cluster = config.cluster
    num_rollout, num_learner = config.rollout.num_workers, config.learner.num_workers

    def bundle(*placements) -> dict:
        cpus = sum(p.num_cpus for p in placements)
        gpus = sum(p.num_gpus for p in placements)
        resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        return resources if cpus > 0 or gpus else {"CPU": 0.01}  # Ray rejects an empty bundle

    def reserve(role: str, bundles: list[dict], strategy: str):
        group = placement_group(bundles, strategy=strategy)
        try:
            ray.get(group.ready(), timeout=cluster.call_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            remove_placement_group(group)
            where = "on one node" if strategy == "STRICT_PACK" else "in the cluster"
            raise RemoteCallError(
                f"step 0, phase placement: the {role} bundles ({len(bundles)} x {bundles[0]}) were not free "
                f"{where} within cluster.call_timeout_s={cluster.call_timeout_s:g}s"
            ) from exc
        return group

    if cluster.placement == "colocate":
        shared = [bundle(cluster.rollout, cluster.learner) for _ in range(max(num_rollout, num_learner))]
        group = reserve("colocated", shared, "PACK")
        return {"rollout": group, "learner": group}
    learners = reserve("learner", [bundle(cluster.learner) for _ in range(num_learner)], "STRICT_PACK")
    rollout = reserve("rollout", [bundle(cluster.rollout) for _ in range(num_rollout)], "PACK")
    return {"rollout": rollout, "learner": learners}


def create_system(config, model_path: Path, labels: dict[str, tuple[float, str]]) -> System:
    """Reserve the bundles (`reserve_placement`; System.placement_group holds its result), then create
    the actors in them."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actor.rollout_actor import create_rollout_worker
    from learner.learner_actor import create_learner_group
    from rewards.reward_actor import create_reward_worker

    cluster = config.cluster
    placement = reserve_placement(config)

    def make_rollout_worker(index: int, restart: int = 0, free_bytes: int | None = None):
        strategy = PlacementGroupSchedulingStrategy(placement["rollout"], placement_group_bundle_index=index)
        return create_rollout_worker(
            model_path,
            config.model,
            config.rollout,
            cluster.rollout,
            worker_index=index,
            restart=restart,
            free_bytes_to_wait_for=free_bytes,
            memory_release_deadline_s=memory_release_deadline_s(config),
            colocate=cluster.colocate if cluster.placement == "colocate" else None,
            lora=config.learner.lora,
            weight_transfer_backend="ipc" if cluster.resolved_weight_transport == "ipc" else "nccl",
            scheduling_strategy=strategy,
        )

    def make_reward():
        return create_reward_worker(config.reward, labels, cluster.reward, seed=config.train.seed)

    def make_learners():
        learners = create_learner_group(
            config.learner.num_workers,
            cluster.learner,
            model_path=model_path,
            model=config.model,
            learner=config.learner,
            train_batch_size=config.train.images_per_step * config.rollout.num_generations,
            total_steps=config.train.steps,
            temperature=config.rollout.temperature,
            placement_group=placement["learner"],
            timeout_s=cluster.call_timeout_s,
        )
        if offloads_learner_states(config):  # the engines generate first: the device is theirs
            wait([learner.offload_states.remote() for learner in learners], config, "start-up", 0, "learners")
        return learners

    rollout_workers = [make_rollout_worker(i) for i in range(config.rollout.num_workers)]
    start_figures = [worker.start_figures.remote() for worker in rollout_workers]
    if cluster.placement == "colocate" and cluster.rollout.num_gpus:
        # vLLM sizes its KV cache from what the GPU has free while it starts: no learner loading onto
        # the same GPU meanwhile (a CPU engine's is set in bytes).
        wait(start_figures, config, "start-up", 0, "rollout workers")
    system = System(
        rollout_workers,
        make_reward(),
        make_learners(),
        placement,
        make_rollout_worker,
        make_reward,
        make_learners,
    )
    # Asked once the learners are up (the engines started meanwhile): a replacement waits for its
    # predecessor's free device memory.
    system.rollout_start_figures = wait(start_figures, config, "start-up", 0, "rollout workers")
    if cluster.uses_weight_transfer_api:
        open_weight_transfer(system, config, step=0)
    return system


def open_weight_transfer(system: System, config, step: int) -> None:
    """GPU: (re)open vLLM's weight transfer between the learners and every rollout worker: the NCCL group
    of learner rank 0 and every vLLM worker, or (colocated) the CUDA IPC senders, which hold the workers'
    handles.

    Every rollout worker answers a ping first: the group's rendezvous waits for all of its ranks, so a
    worker still loading its model (a replacement) would hold the learners there, and a dead one would
    fail them late and without its name. Then the transfer open from before (it held a replaced worker)
    is shut down on both sides, on the engines with vLLM's shutdown_weight_transfer_engine (a no-op where
    none is open), and the new one opens, an NCCL group on a fresh port.
    """
    phase = "weight transfer setup"
    workers = system.rollout_workers
    wait([worker.ping.remote() for worker in workers], config, phase, step, "rollout workers")
    closing = [learner.close_weight_transfer.remote() for learner in system.learners]
    wait(closing, config, phase, step, "learners")
    shutting = [worker.shutdown_weight_transfer.remote() for worker in workers]
    wait(shutting, config, phase, step, "rollout workers")
    transport = config.cluster.resolved_weight_transport
    address, port = None, None
    if transport == "nccl":
        address, port = wait(system.learners[0].rendezvous_address.remote(), config, phase, step, "learners")
    refs = [
        learner.open_weight_transfer.remote(
            transport,
            workers,
            address,
            port,
            config.rollout.tensor_parallel_size,  # vLLM workers per engine, each an NCCL rank
            config.cluster.call_timeout_s,
        )
        for learner in system.learners
    ]
    wait(refs, config, phase, step, "learners")


def shard(items: list, parts: int) -> list[list]:
    """Split items into `parts` contiguous, nearly equal shards (order kept)."""
    return [[items[i] for i in chunk] for chunk in np.array_split(np.arange(len(items)), parts)]


def read_images(paths: list[str]) -> list[bytes]:
    """Encoded image files: each image travels once per step as its bytes, never as G pixel copies."""
    return [Path(p).read_bytes() for p in paths]


def submit_generation(system: System, config, step: int, rows: list[dict]) -> Generation:
    """Start generating step `step`'s batch (G completions per image, the images split across the
    rollout workers) and return at once. Each worker runs its calls in order, so the batch is sampled
    with the weights of the last push submitted before it."""
    images = read_images([row["image"] for row in rows])
    generation = Generation(step=step, rows=rows, images=images, version=system.policy_version)
    return _submit(system, config, generation)


def _submit(system: System, config, generation: Generation) -> Generation:
    shards = shard(list(range(len(generation.images))), len(system.rollout_workers))
    n = config.rollout.num_generations
    # Unseeded requests by default: each engine's generator was seeded once (rollout.seed). Per-request
    # seeds crash vLLM 0.32's CPU runner on large batches ("CPU Generator does not use offset").
    seed = batch_seed(config.rollout.seed, generation.step) if config.rollout.reproducible_batches else None
    busy = [
        (worker, indices) for worker, indices in zip(system.rollout_workers, shards, strict=True) if indices
    ]
    generation.workers = [worker for worker, _ in busy]
    generation.refs = [
        worker.generate.remote(
            [generation.images[i] for i in indices],
            n,
            # Sample k of image i of the batch gets seed + i * n + k, whichever worker draws it.
            seed=None if seed is None else seed + indices[0] * n,
        )
        for worker, indices in busy
    ]
    generation.rollouts = None
    return generation


def batch_seed(rollout_seed: int, step: int) -> int:
    """The first request seed of step `step`'s batch under rollout.reproducible_batches."""
    return int(np.random.SeedSequence([rollout_seed, step]).generate_state(1)[0])


def collect_generation(system: System, config, generation: Generation, oldest_version: int = 0) -> list:
    """Wait for the batch and return its rollouts. A rollout worker that died with it in flight is
    replaced (loaded with the learners' current weights, `replace_dead_rollout_workers`) and the batch is
    generated again, up to cluster.max_restarts times; so is a batch sampled with weights older
    than `oldest_version` (one restored from a checkpoint of a run with a larger train.max_staleness)."""

    while True:
        if generation.rollouts is None:
            try:
                per_worker = wait(generation.refs, config, "generate", generation.step, "rollout workers")
            except RemoteCallError as exc:
                if not is_dead_worker_error(exc.__cause__):
                    raise
                # A worker found dead by an earlier call (a weight push) is replaced already.
                if all(worker in system.rollout_workers for worker in generation.workers):
                    replace_dead_rollout_workers(system, config, generation.step, exc)
                system.regenerated_batches += 1
                _submit_again(system, config, generation)
                continue
            generation.rollouts = [rollout for rollouts in per_worker for rollout in rollouts]
            _wait_for_loads(system, config, generation)
        if min(sampled_versions(generation.rollouts)) >= oldest_version:
            return generation.rollouts
        _submit(system, config, generation)


def _submit_again(system: System, config, generation: Generation) -> Generation:
    """Generate a batch lost with its rollout worker again. Where the weights it was first sampled with
    are kept (`keeps_pushes`: at k >= 1 the learners may have moved on since), every worker loads them
    before the batch and the current ones after it; a worker runs its calls in order, so the batch is
    sampled as the first time, with the same version, and nothing after it sees the old weights."""
    first = system.kept_pushes.get(generation.version)
    current = system.kept_pushes.get(system.policy_version)
    if generation.version == system.policy_version or first is None or current is None:
        return _submit(system, config, generation)
    workers = list(system.rollout_workers)
    before = [worker.update_weights.remote(first, generation.version) for worker in workers]
    _submit(system, config, generation)
    after = [worker.update_weights.remote(current, system.policy_version) for worker in workers]
    generation.loads = before + after
    return generation


def _wait_for_loads(system: System, config, generation: Generation) -> None:
    """Wait for the weight loads around a batch generated again (`_submit_again`); a worker that died
    after generating it is replaced (and loaded with the current weights)."""
    loads, generation.loads = generation.loads, []
    if not loads:
        return
    try:
        wait(loads, config, "weight push", generation.step, "rollout workers")
    except RemoteCallError as exc:
        if not is_dead_worker_error(exc.__cause__):
            raise
        replace_dead_rollout_workers(system, config, generation.step, exc, phase="weight push")


def keeps_pushes(config) -> bool:
    """Whether the driver keeps the weight buckets of the last k + 1 pushes (`kept_after_push`): with
    rollout.reproducible_batches at k >= 1 over the object store, so that a batch lost with its rollout
    worker is generated again as it was first (`_submit_again`). The cost: k more copies of the policy
    in Ray's object store. Over NCCL nothing is kept, and such a batch is sampled with the newer weights."""
    return (
        config.rollout.reproducible_batches
        and config.train.max_staleness >= 1
        and config.cluster.resolved_weight_transport == "object_store"
    )


def kept_after_push(kept: dict[int, list], version: int, buckets: list, staleness: int) -> dict[int, list]:
    """The pushes to keep after pushing `buckets` as `version`: versions version - staleness .. version.
    Later versions go (the learners went back to a checkpoint, whose steps will be trained again)."""
    return {v: refs for v, refs in kept.items() if version - staleness <= v < version} | {version: buckets}


def sampled_versions(rollouts: list) -> list[int]:
    """Per image, the oldest weight version among its completions."""
    return [min(c.weight_version for c in rollout.completions) for rollout in rollouts]


def generate(system: System, config, images: list[bytes], step: int) -> list:
    """G completions per image for step `step`, waited for (`submit_generation` + `collect_generation`)."""
    generation = _submit(system, config, Generation(step=step, rows=[], images=images))
    return collect_generation(system, config, generation)


def memory_release_deadline_s(config) -> float:
    """How long a replacement rollout worker waits for its predecessor's device memory to be released:
    a quarter of cluster.call_timeout_s, at most 2 minutes (its start-up must fit in one call)."""
    return min(120.0, config.cluster.call_timeout_s / 4)


def replace_dead_rollout_workers(
    system: System, config, step: int, cause: Exception, phase: str = "generate"
) -> None:
    """Find the rollout workers whose actor or vLLM engine died (a ping fails or times out), kill each
    one and start a replacement in its bundle: after its predecessor's device memory is free again, with
    a seed of its own (`actor.rollout_actor.engine_seed` of its restart count, recorded in
    system.replacements), loaded with the learners' current weights."""
    import time

    import ray

    from actor.rollout_actor import engine_seed

    started = time.monotonic()
    dead = []
    for index, worker in enumerate(system.rollout_workers):
        try:
            ray.get(worker.ping.remote(), timeout=config.cluster.call_timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            dead.append(index)
        except ray.exceptions.RayTaskError as exc:
            if not is_engine_dead_error(exc):
                raise
            dead.append(index)
    if not dead:
        raise cause
    what_died = f"step {step}, phase {phase}: rollout worker(s) {dead}"
    use_restarts(system, config, "rollout worker", len(dead), what_died, cause)
    for index in dead:
        restart = 1 + sum(event.get("worker") == index for event in system.replacements)
        seed = engine_seed(config.rollout.seed, index, restart)
        what = "its vLLM engine died" if is_engine_dead_error(cause) else "it died"
        log.warning(
            "step %d, phase %s: rollout worker %d: %s (%s); starting a replacement with seed %d",
            step,
            phase,
            index,
            what,
            cause,
            seed,
        )
        ray.kill(system.rollout_workers[index], no_restart=True)
        figures = system.rollout_start_figures[index] if index < len(system.rollout_start_figures) else {}
        system.rollout_workers[index] = system.make_rollout_worker(index, restart, figures.get("free_bytes"))
        system.replacements.append(
            {
                "step": step,
                "phase": phase,
                "role": "rollout worker",
                "actor": f"rollout-{index}",
                "worker": index,
                "restart": restart,
                "seed": seed,
                "steps_redone": 0,
                "cause": what,
            }
        )
    if config.cluster.uses_weight_transfer_api:
        open_weight_transfer(system, config, step)  # a new group, with the replacements in it
    # The replacement starts from the initial weights: load the learners' current ones.
    push_weights(system, config, step, [system.rollout_workers[i] for i in dead])
    for event in system.replacements[-len(dead) :]:
        event["seconds"] = round(time.monotonic() - started, 1)  # found dead -> loaded, as a whole


def use_restarts(system: System, config, role: str, count: int, what_died: str, cause: Exception) -> None:
    """Count `count` replacements of `role` against cluster.max_restarts (each role has its own count);
    past the limit, a RemoteCallError naming the limit ends the run instead (a crash loop)."""
    used = system.restarts.get(role, 0)
    if used + count > config.cluster.max_restarts:
        raise RemoteCallError(
            f"{what_died} died and the cluster.max_restarts={config.cluster.max_restarts} "
            f"replacements of the {role} in this run are used up"
        ) from cause
    system.restarts[role] = used + count


def score(system: System, config, ids: list[str], texts: list[list[str]], step: int):
    """The reward actor's scores of step `step`'s batch. A reward actor that died is replaced
    (`replace_reward_actor`) and scores the batch again: it holds no training state, and its random
    draws are those of the step (`RewardWorker.score`), so nothing is redone but this call."""
    while True:
        try:
            return wait(system.reward.score.remote(ids, texts, step), config, "reward", step, "reward actor")
        except RemoteCallError as exc:
            if not is_dead_actor_call(exc, "reward actor"):
                raise
            replace_reward_actor(system, config, step, "reward", exc)


def replace_reward_actor(system: System, config, step: int, phase: str, cause: Exception) -> None:
    """Kill the reward actor and start another (it holds only the labels); recorded in system.replacements."""
    import time

    import ray

    started = time.monotonic()
    use_restarts(system, config, "reward actor", 1, f"step {step}, phase {phase}: the reward actor", cause)
    log.warning("step %d, phase %s: the reward actor died (%s); starting a replacement", step, phase, cause)
    ray.kill(system.reward, no_restart=True)
    system.reward = system.make_reward()
    wait(system.reward.ping.remote(), config, phase, step, "reward actor")
    system.replacements.append(
        {
            "step": step,
            "phase": phase,
            "role": "reward actor",
            "actor": "reward",
            "restart": system.restarts["reward actor"],
            "steps_redone": 0,
            "cause": "it died",
            "seconds": round(time.monotonic() - started, 1),
        }
    )


def restart_learners(system: System, config, step: int, cause: RemoteCallError, steps_done: int):
    """A learner rank died (found by step `step`'s call `cause`; steps up to `steps_done` had finished):
    kill every rank (the others may sit in a collective with the dead one), start the group again in its
    placement group, restore the newest verified checkpoint (none: the start model, step 0), and push
    its weights to the rollout workers. Returns that checkpoint (folder, state), or None."""
    import time

    import ray

    from cluster import checkpoints

    started = time.monotonic()
    phase = cause.phase
    use_restarts(system, config, "learner group", 1, f"step {step}, phase {phase}: a learner rank", cause)
    for learner in system.learners:
        ray.kill(learner, no_restart=True)
    restored = checkpoints.latest_valid(Path(config.checkpoint.dir))
    restored_step = restored[1]["step"] if restored else 0
    log.warning(
        "step %d, phase %s: a learner rank died (%s); restarting the learners from %s",
        step,
        phase,
        cause,
        restored[0] if restored else "the start model (no checkpoint yet)",
    )
    system.learners = system.make_learners()
    if restored:
        loads = [learner.load_checkpoint.remote(str(restored[0])) for learner in system.learners]
        wait(loads, config, "learner restart", step, "learners")
    system.policy_version = restored_step
    system.kept_pushes.clear()  # the old rank 0 owned them: gone with it
    if config.cluster.uses_weight_transfer_api:
        open_weight_transfer(system, config, step)  # a new group, with the new rank 0 in it
    if config.cluster.placement == "colocate":
        wake_rollout_engines(system, config, step)  # the death may have come while they slept
    push_weights(system, config, step)
    system.replacements.append(
        {
            "step": step,
            "phase": phase,
            "role": "learner group",
            "actor": "learners",
            "restart": system.restarts["learner group"],
            "restored_step": restored_step,
            "steps_redone": max(0, steps_done - restored_step),
            "cause": "a rank died",
            "seconds": round(time.monotonic() - started, 1),
        }
    )
    return restored


def update(
    system: System, config, images: list[bytes], prompt: str, rollouts: list, advantages, step: int
) -> dict:
    """mu GRPO updates on the learners; each rank gets a contiguous shard of the images."""
    from learner.policy import PolicySample

    samples = [
        PolicySample(
            image=image,
            prompt=prompt,
            completions=[c.token_ids for c in rollout.completions],
            behaviour_logprobs=[c.logprobs for c in rollout.completions],
        )
        for image, rollout in zip(images, rollouts, strict=True)
    ]
    total_sequences = sum(len(s.completions) for s in samples)
    total_tokens = sum(len(ids) for s in samples for ids in s.completions)
    shards = shard(list(range(len(samples))), len(system.learners))
    refs = [
        learner.train_step.remote(
            [samples[i] for i in indices],
            [advantages[i].tolist() for i in indices],
            config.learner.num_iterations,
            total_sequences,
            total_tokens,
        )
        for learner, indices in zip(system.learners, shards, strict=True)
    ]
    per_rank = wait(refs, config, "update", step, "learners")
    system.policy_version = step
    return per_rank[0]  # rank 0 reports the globally reduced metrics


def push_weights(system: System, config, step: int, workers: list | None = None) -> None:
    """Gather the policy from the learners (every rank takes part), load it into the rollout workers
    (`workers`, default all; over NCCL always all) and name its version there (system.policy_version),
    which every completion they sample from then on carries. A worker still generating loads it once
    that call is done: a worker runs its calls in order, so a push never lands inside a generation."""
    import ray

    version = system.policy_version
    if config.cluster.uses_weight_transfer_api:
        # Rank 0 broadcasts GPU to GPU (NCCL) or hands each engine its GPU's buffer (CUDA IPC). A worker
        # lost mid-broadcast leaves rank 0 blocked in NCCL, so this ends the run (call_timeout_s), and one
        # lost mid-IPC push fails rank 0's call: resume continues from the last checkpoint.
        wait(
            [learner.send_weights.remote() for learner in system.learners],
            config,
            "weight push",
            step,
            "learners",
        )
        versioned = [worker.set_weight_version.remote(version) for worker in system.rollout_workers]
        wait(versioned, config, "weight push", step, "rollout workers")
        return
    # Rank 0 returns references to its buckets in the object store; each rollout worker fetches them.
    bucket_refs = wait(
        [learner.weight_buckets.remote(config.learner.weight_bucket_bytes) for learner in system.learners],
        config,
        "weight push",
        step,
        "learners",
    )[0]
    if keeps_pushes(config):
        system.kept_pushes = kept_after_push(
            system.kept_pushes, version, bucket_refs, config.train.max_staleness
        )
    targets = system.rollout_workers if workers is None else workers
    try:
        wait(
            [w.update_weights.remote(bucket_refs, version) for w in targets],
            config,
            "weight push",
            step,
            "rollout workers",
        )
    except RemoteCallError as exc:
        if not is_dead_worker_error(exc.__cause__):
            raise
        # A worker that died here is replaced, and the replacement is loaded with these same weights.
        replace_dead_rollout_workers(system, config, step, exc, phase="weight push")
    except ray.exceptions.ObjectLostError:
        # The buckets' owner, learner rank 0, died after handing them out: a learner death, which the
        # driver recovers from (the learners restart from the newest checkpoint and push again).
        death = peer_death([learner.ping.remote() for learner in system.learners])
        if death is None:
            raise
        raise RemoteCallError(
            f"step {step}, phase weight push: learners died: {death}", "learners", "weight push"
        ) from death


def update_and_push(
    system: System, config, images: list[bytes], prompt: str, rollouts: list, advantages, step: int, phase
) -> dict:
    """The learners' update, then the push of its weights to the rollout workers; returns the update's
    metrics. `phase(name)` (a context manager) wraps each part: "sleep", "train", "wake", "weight_push".
    Colocated, the rollout engines hand their devices to the learners for the update and get them back
    in two parts: the weights' memory for the push, then the KV cache to generate with."""
    colocated = config.cluster.placement == "colocate"
    if colocated:
        with phase("sleep"):
            sleep_rollout_engines(system, config, step)
    with phase("train"):
        metrics = update(system, config, images, prompt, rollouts, advantages, step)
    if colocated:
        with phase("wake"):
            wake_rollout_weights(system, config, step)
    with phase("weight_push"):
        push_weights(system, config, step)
    if colocated:
        with phase("wake"):
            wake_rollout_engines(system, config, step, ("kv_cache",))
    return metrics


def offloads_learner_states(config) -> bool:
    return config.cluster.placement == "colocate" and config.cluster.colocate.offload_learner_states


def hand_over(system: System, config, step: int, phase: str, method: str, *args) -> None:
    """Colocated: `method(*args)` (sleep, wake_up) on every rollout worker. A worker found dead, its actor
    or its engine, is replaced (`replace_dead_rollout_workers`: a fresh engine, awake, loaded with the
    learners' current weights) and the call made on the replacement, which then joins the others."""
    workers = list(system.rollout_workers)
    while workers:
        try:
            wait([getattr(w, method).remote(*args) for w in workers], config, phase, step, "rollout workers")
            return
        except RemoteCallError as exc:
            if not is_dead_worker_error(exc.__cause__):
                raise
            before = list(system.rollout_workers)
            replace_dead_rollout_workers(system, config, step, exc, phase=phase)
            workers = [new for old, new in zip(before, system.rollout_workers, strict=True) if new is not old]


def sleep_rollout_engines(system: System, config, step: int) -> None:
    """Colocated, before training: every rollout engine sleeps (cluster.colocate.sleep_level), then the
    learners' offloaded states come back to the device."""
    hand_over(system, config, step, "sleep", "sleep", config.cluster.colocate.sleep_level)
    if offloads_learner_states(config):
        wait(
            [learner.reload_states.remote() for learner in system.learners], config, "sleep", step, "learners"
        )


def wake_rollout_weights(system: System, config, step: int) -> None:
    """Colocated, after training: the learners' states go to host memory, then every rollout engine takes
    back its weights' memory for the push (after a level-2 sleep it holds only the kept groups)."""
    if offloads_learner_states(config):
        wait(
            [learner.offload_states.remote() for learner in system.learners], config, "wake", step, "learners"
        )
    wake_rollout_engines(system, config, step, ("weights",))


def wake_rollout_engines(system: System, config, step: int, tags=("weights", "kv_cache")) -> None:
    """Colocated: every rollout engine takes back the memory of `tags` ("kv_cache" last: then it
    generates again). An engine awake already stays as it is."""
    for tag in tags:
        hand_over(system, config, step, "wake", "wake_up", tag)


def save_checkpoint(
    system: System, config, step: int, sampler, tracker, in_flight: list[Generation] = ()
) -> Path:
    """The learners' state after step `step`, the data position, and the batches generated ahead of it
    (`in_flight`, waited for first): a resumed run trains what this one would have."""
    from cluster import checkpoints

    root = Path(config.checkpoint.dir)
    staging = checkpoints.staging_dir(root, step)
    wait(
        [learner.save_checkpoint.remote(str(staging)) for learner in system.learners],
        config,
        "checkpoint",
        step,
        "learners",
    )
    ahead = [generation_state(system, config, generation) for generation in in_flight]
    state = {"step": step, "sampler": vars(sampler.state), "mlflow_run_id": tracker.run_id}
    return checkpoints.commit(root, step, state, config.checkpoint.keep_last, ahead)


def generation_state(system: System, config, generation: Generation) -> dict:
    """A batch and its completions as JSON (for a checkpoint); waits for it if still in flight."""
    from dataclasses import asdict

    rollouts = collect_generation(system, config, generation)
    return {"step": generation.step, "rows": generation.rows, "rollouts": [asdict(r) for r in rollouts]}


def restore_generation(state: dict) -> Generation:
    """The inverse of `generation_state`."""
    from actor.rollout_engine import Completion, ImageRollout

    rollouts = [
        ImageRollout(
            prompt_token_ids=rollout["prompt_token_ids"],
            completions=[
                Completion(**{**c, "digit_probs": tuple(c["digit_probs"]) if c["digit_probs"] else None})
                for c in rollout["completions"]
            ],
            generated_between=tuple(rollout["generated_between"]),
        )
        for rollout in state["rollouts"]
    ]
    rows = state["rows"]
    return Generation(
        step=state["step"], rows=rows, images=read_images([row["image"] for row in rows]), rollouts=rollouts
    )


def weight_sync_gap(system: System, config, image: bytes, prompt: str, step: int) -> float:
    """Largest |log-prob difference| between each rollout worker and the learner on a greedy completion."""
    from learner.policy import PolicySample

    gaps = []
    for worker in system.rollout_workers:
        (rollout,) = wait(
            worker.generate.remote([image], 1, temperature=0.0), config, "sync check", step, "rollout worker"
        )
        completion = rollout.completions[0]
        sample = PolicySample(image=image, prompt=prompt, completions=[completion.token_ids])
        # Every rank takes part (a ZeRO-3 forward is collective); rank 0's answer is used.
        refs = [learner.logprobs.remote([sample]) for learner in system.learners]
        per_rank = wait(refs, config, "sync check", step, "learners")
        learner_logprobs = per_rank[0][0]  # rank 0, the one completion
        gaps.append(max(abs(a - b) for a, b in zip(completion.logprobs, learner_logprobs, strict=True)))
    return max(gaps)


class SystemMonitor:
    """Per step, every actor's system figures (configs.system_metrics) and the driver's own, logged as
    `system/<role>/<name>` (role: driver, rollout-<i>, reward, learner-<i>) and, once per machine,
    `system/machine-<host>/<name>` for its CPU and memory; the tags `system.<role>.machine` name each
    role's machine. MLflow's UI shows every `system/` metric in the run's "System metrics" tab.

    The actors are asked without waiting: a rollout worker runs its calls in order, so with batches
    generating ahead it answers only after them. Each answer is logged at the step it was asked at,
    once it has arrived (by the next step's poll, or `flush` at the end). An actor that died is
    skipped: the figures never stop a run.
    """

    def __init__(self, system: System, tracker) -> None:
        self.system = system
        self.tracker = tracker
        self.pending: dict[str, tuple[object, int]] = {}  # role -> (reference, step asked at)
        self.machines: dict[str, str] = {}  # role -> "host (address)", as tagged
        self.driver_host: str | None = None  # its machine figures come from the driver's own sample

    def actors(self) -> list[tuple[str, object]]:
        system = self.system
        return [
            *((f"rollout-{i}", worker) for i, worker in enumerate(system.rollout_workers)),
            ("reward", system.reward),
            *((f"learner-{i}", learner) for i, learner in enumerate(system.learners)),
        ]

    def poll(self, step: int) -> None:
        """Log the answers that have arrived, the driver's figures of `step`, and ask every actor
        without a question in flight for its figures of `step`."""
        from configs.system_metrics import sample

        self._log_arrived(timeout=0)
        # The driver alone: a local Ray node's processes (the actors among them) are its children.
        driver = sample(children=False)
        self.driver_host = driver["host"]
        self._log({"driver": driver}, step)
        for role, actor in self.actors():
            if role not in self.pending:
                try:
                    self.pending[role] = (actor.system_metrics.remote(), step)
                except Exception as exc:  # a dead actor: its figures are skipped
                    log.debug("system metrics of %s not asked: %s", role, exc)

    def go_on_with(self, tracker) -> None:
        """Log to `tracker` from now on (a run that went back to a checkpoint), dropping the questions in
        flight: they were asked at steps that will be trained again."""
        self.tracker = tracker
        self.pending.clear()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait up to `timeout` seconds for the answers in flight and log them."""
        self._log_arrived(timeout=timeout)
        self.pending.clear()

    def _log_arrived(self, timeout: float) -> None:
        import ray

        if not self.pending:
            return
        refs = [ref for ref, _ in self.pending.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        ready = set(ready)
        by_step: dict[int, dict[str, dict]] = {}
        for role, (ref, step) in list(self.pending.items()):
            if ref not in ready:
                continue
            del self.pending[role]
            try:
                by_step.setdefault(step, {})[role] = ray.get(ref, timeout=0)
            except Exception as exc:  # a dead or replaced actor: no figures this step
                log.debug("system metrics of %s at step %d lost: %s", role, step, exc)
        for step, reports in sorted(by_step.items()):
            self._log(reports, step)

    def _log(self, reports: dict[str, dict], step: int) -> None:
        for role, report in sorted(reports.items()):
            # One point per machine and step: the driver's machine is measured by the driver.
            others = set() if role == "driver" else {self.driver_host}
            metrics, tags = system_metric_names({role: report}, machines_measured_elsewhere=others)
            changed = {key: value for key, value in tags.items() if self.machines.get(key) != value}
            if changed:
                self.tracker.set_tags(changed)
                self.machines.update(changed)
            # At the time they were taken: the UI plots system metrics against time, and an answer
            # may arrive a step late.
            self.tracker.log_metrics(metrics, step=step, timestamp=report.get("time"))


def system_metric_names(
    reports: dict[str, dict], machines_measured_elsewhere: set = frozenset()
) -> tuple[dict[str, float], dict[str, str]]:
    """MLflow metrics and tags from {role: configs.system_metrics.sample()}: each role's own figures as
    `system/<role>/<name>`, the machine figures (`node_*`) once per host as
    `system/machine-<host>/<name>` (none for the hosts in machines_measured_elsewhere), and a tag
    `system.<role>.machine` = "host (address)"."""
    import re

    metrics, tags = {}, {}
    for role, report in sorted(reports.items()):
        host = re.sub(r"[^\w\-.]", "_", report["host"])
        tags[f"system.{role}.machine"] = f"{report['host']} ({report['address']})"
        for name, value in report["figures"].items():
            if name.startswith("node_"):
                if report["host"] not in machines_measured_elsewhere:
                    metrics[f"system/machine-{host}/{name.removeprefix('node_')}"] = float(value)
            else:
                metrics[f"system/{role}/{name}"] = float(value)
    return metrics, tags
