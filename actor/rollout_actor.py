"""The Ray actor that hosts one RolloutEngine; every method only delegates to the engine."""

from __future__ import annotations

from pathlib import Path

from configs.schema import ModelConfig, PlacementConfig, RolloutConfig


class RolloutWorker:
    def __init__(self, model_path: str | Path, model_cfg: ModelConfig, rollout_cfg: RolloutConfig) -> None:
        # A Ray worker is a fresh process: offline/loopback settings must precede the vLLM import.
        from configs.runtime_env import apply_default_env, route_logs_from_env

        apply_default_env()
        route_logs_from_env()
        from actor.rollout_engine import RolloutEngine

        self.engine = RolloutEngine(model_path, model_cfg, rollout_cfg)

    def ping(self) -> str:
        return "pong"

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

    def update_weights(self, bucket_refs: list) -> int:
        """Load the learner's weight buckets (object references owned by learner rank 0)."""
        import ray

        return self.engine.update_weights(ray.get(bucket_refs))

    def weight_version(self) -> int:
        return self.engine.weight_version

    # GPU weight transfer (vlm.weight_sync.RolloutWorkersClient calls these).
    def init_weight_transfer(self, init_info: dict) -> None:
        self.engine.init_weight_transfer(init_info)

    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    def receive_weight_update(self, update_info: dict | list[dict]) -> None:
        self.engine.receive_weight_update(update_info)

    def finish_weight_update(self) -> int:
        return self.engine.finish_weight_update()


def create_rollout_worker(
    model_path: str | Path,
    model_cfg: ModelConfig,
    rollout_cfg: RolloutConfig,
    placement: PlacementConfig,
    **ray_options,
):
    """Start a RolloutWorker actor with the placement's CPUs/GPUs; returns its handle (Ray must be initialised).

    `ray_options` go to `.options()` as they are (scheduling_strategy, max_restarts, name, ...).
    """
    import ray

    actor_class = ray.remote(RolloutWorker).options(
        num_cpus=placement.num_cpus, num_gpus=placement.num_gpus, **ray_options
    )
    return actor_class.remote(str(model_path), model_cfg, rollout_cfg)
