"""The Ray actor that hosts one RolloutEngine; every method only delegates to the engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from configs.schema import ModelConfig, PlacementConfig, RolloutConfig


class RolloutWorker:
    def __init__(self, model_path: str | Path, model_cfg: ModelConfig, rollout_cfg: RolloutConfig) -> None:
        # A Ray worker is a fresh process: offline/loopback settings must precede the vLLM import.
        from configs.runtime_env import apply_default_env, pin_from_env, route_logs_from_env

        apply_default_env()
        route_logs_from_env()
        pin_from_env()
        from actor.rollout_engine import RolloutEngine
        from vlm.weight_sync import require_own_gpu

        require_own_gpu()

        self.engine = RolloutEngine(model_path, model_cfg, rollout_cfg)

    def ping(self) -> str:
        return "pong"

    def system_metrics(self) -> dict:
        """This worker's CPU, memory, GPU and KV-cache figures since the previous call
        (configs.system_metrics.sample)."""
        from configs.system_metrics import sample

        return sample(self.engine.kv_cache_figures())

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

        loaded = self.engine.update_weights(ray.get(bucket_refs))
        if version is not None:
            self.engine.set_weight_version(version)
        return loaded

    def weight_version(self) -> int:
        return self.engine.weight_version

    def set_weight_version(self, version: int) -> None:
        self.engine.set_weight_version(version)

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


def engine_seed(run_seed: int, worker_index: int) -> int:
    """The sampling seed of rollout worker `worker_index`'s engine: engines seeded alike would draw the
    same samples for the same image. Worker 0 keeps the run seed, so one-worker runs (every CPU preset)
    draw as before; the others get a SeedSequence draw of (run seed, index): run_seed + index would give
    worker 1 of run seed 0 the stream of worker 0 of run seed 1."""
    if worker_index == 0:
        return run_seed
    return int(np.random.SeedSequence([run_seed, worker_index]).generate_state(1)[0])


def create_rollout_worker(
    model_path: str | Path,
    model_cfg: ModelConfig,
    rollout_cfg: RolloutConfig,
    placement: PlacementConfig,
    worker_index: int = 0,
    **ray_options,
):
    """Start rollout worker `worker_index` (its engine seeded by `engine_seed`) with the placement's
    CPUs/GPUs; returns its handle (Ray must be initialised).

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
    seeded = rollout_cfg.model_copy(update={"seed": engine_seed(rollout_cfg.seed, worker_index)})
    return actor_class.remote(str(model_path), model_cfg, seeded)
