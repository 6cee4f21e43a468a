"""The Ray actor that hosts one RolloutEngine; every method only delegates to the engine.

A replacement worker (one started in the bundle of a worker that died) first waits, up to a deadline,
for its device's memory to be released by the dead engine (`wait_for_device_memory`), and samples from
a seed of its own (`engine_seed` of its restart count), not the dead worker's stream.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from configs.schema import ColocateConfig, LoraConfig, ModelConfig, PlacementConfig, RolloutConfig

log = logging.getLogger("vqr1.rollout")

# A replacement's wait for the dead engine's device memory counts as released within this margin of
# the free memory its predecessor saw before starting its engine (allocator slack, other processes).
MEMORY_RELEASE_MARGIN = 0.05


class RolloutWorker:
    def __init__(
        self,
        model_path: str | Path,
        model_cfg: ModelConfig,
        rollout_cfg: RolloutConfig,
        free_bytes_to_wait_for: int | None = None,
        memory_release_deadline_s: float = 0.0,
        colocate: ColocateConfig | None = None,
        lora: LoraConfig | None = None,
        weight_transfer_backend: str = "nccl",
    ) -> None:
        """free_bytes_to_wait_for: a replacement's predecessor's free device memory before its engine
        started; the engine starts once the device has about that much free again, or after
        memory_release_deadline_s seconds (vLLM then checks the memory itself). colocate: the engine
        shares its device with a learner rank and sleeps while it trains. lora: the learner's (with
        push=adapter the engine serves its adapter). weight_transfer_backend: vLLM's, on CUDA (RolloutEngine)."""
        # A Ray worker is a fresh process: offline/loopback settings must precede the vLLM import.
        from configs.runtime_env import apply_default_env, pin_from_env, route_logs_from_env

        apply_default_env()
        route_logs_from_env()
        pin_from_env()
        from actor.rollout_engine import RolloutEngine
        from vlm.weight_sync import require_own_gpu

        require_own_gpu(rollout_cfg.tensor_parallel_size)  # a tensor-parallel engine: one GPU per rank
        if free_bytes_to_wait_for is not None:
            released, seconds = wait_for_device_memory(
                free_bytes_to_wait_for, memory_release_deadline_s, device_free_bytes
            )
            if not released:
                log.warning(
                    "the device's memory was not back to %.1f GiB free within %.0f s; starting the engine anyway",
                    free_bytes_to_wait_for / (1 << 30),
                    seconds,
                )
        self.free_bytes_at_start = device_free_bytes()
        self.seed = rollout_cfg.seed
        self.engine = RolloutEngine(
            model_path,
            model_cfg,
            rollout_cfg,
            weight_transfer_backend=weight_transfer_backend,
            colocate=colocate,
            lora=lora,
        )
        # (time, call) of the calls that share the device with a colocated learner, in order.
        self.device_calls: deque[tuple[float, str]] = deque(maxlen=256)

    def ping(self) -> str:
        """ "pong" while the worker and its engine live; a dead engine-core process raises vLLM's
        EngineDeadError."""
        self.engine.check_alive()
        return "pong"

    def start_figures(self) -> dict:
        """The engine's seed and the device's free memory before the engine started (None on CPUs)."""
        return {"seed": self.seed, "free_bytes": self.free_bytes_at_start}

    def system_metrics(self) -> dict:
        """This worker's CPU, memory, GPU, KV-cache and weight-push figures since the previous call
        (configs.system_metrics.sample)."""
        from configs.system_metrics import sample

        return sample(self.engine.kv_cache_figures() | self.engine.push_figures())

    def generate(
        self,
        images: list,  # PIL images or encoded image bytes / paths (actor.rollout_engine.ImageInput)
        n: int,
        *,
        temperature: float | None = None,
        thinking: bool | None = None,
        seed: int | None = None,
        stream_apart: int | None = None,
        digit_probs: bool = False,
    ):
        self.device_calls.append((time.time(), "generate"))
        return self.engine.generate(
            images,
            n,
            temperature=temperature,
            thinking=thinking,
            seed=seed,
            stream_apart=stream_apart,
            digit_probs=digit_probs,
        )

    def update_weights(self, bucket_refs: list, version: int | None = None) -> int:
        """Load the learner's weight buckets (object references owned by learner rank 0) and name their
        policy version (every completion sampled from them carries it)."""
        import ray

        self.device_calls.append((time.time(), "update_weights"))
        loaded = self.engine.update_weights(ray.get(bucket_refs))
        if version is not None:
            self.engine.set_weight_version(version)
        return loaded

    def weight_version(self) -> int:
        return self.engine.weight_version

    def sleep(self, level: int) -> None:
        """Colocated: free the device for the learner rank (RolloutEngine.sleep)."""
        self.device_calls.append((time.time(), "sleep"))
        self.engine.sleep(level)

    def wake_up(self, tag: str) -> None:
        """Colocated: take back "weights" (before the push) or "kv_cache" (before generating)."""
        self.device_calls.append((time.time(), f"wake_up {tag}"))
        self.engine.wake_up(tag)

    def device_call_log(self) -> list[tuple[float, str]]:
        return list(self.device_calls)

    def set_weight_version(self, version: int) -> None:
        self.engine.set_weight_version(version)

    def engine_report(self) -> dict:
        """This worker's process id and its engine's `extension_reports` (file, process id and weight
        version of each vLLM worker)."""
        return {"worker_pid": os.getpid(), "engine": self.engine.extension_reports()}

    # GPU weight transfer (vlm.weight_sync.RolloutWorkersClient calls these).
    def init_weight_transfer(self, init_info: dict) -> None:
        self.engine.init_weight_transfer(init_info)

    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    def receive_weight_update(self, update_info: dict | list[dict]) -> None:
        self.engine.receive_weight_update(update_info)

    def finish_weight_update(self) -> int:
        return self.engine.finish_weight_update()

    def shutdown_weight_transfer(self) -> None:
        self.engine.shutdown_weight_transfer()


def engine_seed(run_seed: int, worker_index: int, restart: int = 0) -> int:
    """The sampling seed of rollout worker `worker_index`'s engine after `restart` replacements of that
    worker: engines seeded alike would draw the same samples for the same image. Worker 0 keeps the run
    seed, so one-worker runs (every CPU preset) draw as before; the others get a SeedSequence draw of
    (run seed, index): run_seed + index would give worker 1 of run seed 0 the stream of worker 0 of run
    seed 1. A replacement draws from (run seed, index, restart), so it does not replay the stream of the
    worker it replaces (which sampled the lost batch)."""
    if restart:
        return int(np.random.SeedSequence([run_seed, worker_index, restart]).generate_state(1)[0])
    if worker_index == 0:
        return run_seed
    return int(np.random.SeedSequence([run_seed, worker_index]).generate_state(1)[0])


def device_free_bytes() -> int | None:
    """Free memory of this process's GPUs (those of CUDA_VISIBLE_DEVICES; the least free of them, as a
    tensor-parallel engine puts a rank on each) by NVML, which does not open a CUDA context here (one
    would hold memory beside a multiprocess engine's); None without a GPU."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return None
    try:
        from vllm.third_party import pynvml
    except ImportError:  # pragma: no cover - vLLM ships it
        return None
    try:
        pynvml.nvmlInit()
        try:
            handles = [
                pynvml.nvmlDeviceGetHandleByIndex(int(d))
                if d.isdigit()
                else pynvml.nvmlDeviceGetHandleByUUID(d)
                for d in visible
            ]
            return min(int(pynvml.nvmlDeviceGetMemoryInfo(handle).free) for handle in handles)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None


def wait_for_device_memory(
    target_free_bytes: int | None,
    deadline_s: float,
    read_free_bytes: Callable[[], int | None],
    *,
    margin: float = MEMORY_RELEASE_MARGIN,
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[bool, float]:
    """Poll read_free_bytes() until it is back within `margin` of target_free_bytes (the free memory the
    dead worker saw before its engine started), at most deadline_s seconds. Returns (released, seconds
    waited). Nothing to wait for (no target, or a reader without a device: None) is (True, 0)."""
    if target_free_bytes is None:
        return True, 0.0
    started = clock()
    while True:
        free = read_free_bytes()
        if free is None or free >= (1.0 - margin) * target_free_bytes:
            return True, clock() - started
        waited = clock() - started
        if waited >= deadline_s:
            return False, waited
        sleep(min(poll_s, deadline_s - waited))


def create_rollout_worker(
    model_path: str | Path,
    model_cfg: ModelConfig,
    rollout_cfg: RolloutConfig,
    placement: PlacementConfig,
    worker_index: int = 0,
    restart: int = 0,
    free_bytes_to_wait_for: int | None = None,
    memory_release_deadline_s: float = 0.0,
    colocate: ColocateConfig | None = None,
    lora: LoraConfig | None = None,
    weight_transfer_backend: str = "nccl",
    **ray_options,
):
    """Start rollout worker `worker_index` (its engine seeded by `engine_seed` of its `restart` count)
    with the placement's CPUs/GPUs; returns its handle (Ray must be initialised). A replacement passes
    its predecessor's free device memory and a deadline to wait for it (RolloutWorker); colocate: its
    engine shares the device with a learner rank; lora: the learner's; weight_transfer_backend: vLLM's, on
    CUDA (RolloutWorker).

    `ray_options` go to `.options()` as they are (scheduling_strategy, max_restarts, name, ...).
    """
    import ray

    from configs.runtime_env import cpu_affinity_env

    pinned = cpu_affinity_env(placement.cpu_affinity)
    if pinned:
        ray_options["runtime_env"] = {"env_vars": pinned}
    actor_class = ray.remote(RolloutWorker).options(
        num_cpus=placement.num_cpus, num_gpus=placement.num_gpus, **ray_options
    )
    seeded = rollout_cfg.model_copy(update={"seed": engine_seed(rollout_cfg.seed, worker_index, restart)})
    return actor_class.remote(
        str(model_path),
        model_cfg,
        seeded,
        free_bytes_to_wait_for,
        memory_release_deadline_s,
        colocate,
        lora,
        weight_transfer_backend,
    )
