"""The GPU path, stage by stage: `python -m bench.gpu_check [--stages NAME,...] [--out DIR]`.

Every stage runs what the gpu-7b-1node preset runs (its model, rollout, learner and transport settings,
through the project's own code; the colocated stage, gpu-7b-1gpu-lora's), with a small locally built
model instead of the 7B checkpoint and the worker counts and CPUs fitted to the machine. Each stage runs in a process of its own (one NCCL group,
one Ray session, one vLLM engine at a time) and reports its figures and named checks. A stage this
machine cannot run (no CUDA, no CUDA build of vLLM, too few GPUs) is reported "not run" with the
reason; nothing is faked.

Writes gpu_check.json to --out. Exit status: 0 every stage that ran passed, 1 a check failed or a stage
crashed, 2 no stage could run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from configs.load import load_config
from configs.schema import Config, LearnerConfig, ModelConfig

PRESET = "gpu-7b-1node"
COLOCATED_PRESET = "gpu-7b-1gpu-lora"  # the one-GPU preset: rollout engine and learner rank take turns
RUN_MODEL = "small"  # the model of the stages that run vLLM (4 layers, a real Qwen2.5-VL architecture)
LEARNER_MODEL = "bench"  # ~114 M parameters: a peak memory that says something
# bf16 keeps 8 bits of mantissa: per-token log-probs of a ~-7 magnitude move by a few hundredths.
BF16_LOGPROB_TOLERANCE = 0.25
# The checks' lr: at the preset's 1e-6, three Adam steps leave bf16 weights where they were.
CHECK_LR = 1e-3
STAGE_TIMEOUT_S = 1800
RESULT_PREFIX = "gpu_check result: "  # marks a stage's JSON among what its libraries print


@dataclass(frozen=True)
class Machine:
    gpus: int  # CUDA devices this process sees (0 without CUDA)
    vllm_problem: str | None  # why vLLM cannot run a CUDA engine here, or None


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    min_gpus: int
    needs_vllm: bool
    run: Callable[[Path, Path, int], dict]  # (model cache, work folder, GPUs) -> figures and "checks"


def why_not_run(stage: Stage, machine: Machine) -> str | None:
    """The reason this machine cannot run the stage, or None."""
    if machine.gpus == 0:
        return "no CUDA device"
    if machine.gpus < stage.min_gpus:
        return f"needs {stage.min_gpus} GPUs, {machine.gpus} visible"
    if stage.needs_vllm and machine.vllm_problem is not None:
        return machine.vllm_problem
    return None


def probe_machine() -> Machine:
    if not torch.cuda.is_available():
        return Machine(gpus=0, vllm_problem="no CUDA device")
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return Machine(torch.cuda.device_count(), "vLLM is not installed (pip install -e '.[gpu]')")
    problem = None if current_platform.is_cuda() else f"vLLM is its {current_platform.device_type} build"
    return Machine(torch.cuda.device_count(), problem)


# --- shared pieces ------------------------------------------------------------------------------------


def preset_learner_settings(model_preset: str, num_sequences: int) -> tuple[ModelConfig, LearnerConfig]:
    """The preset's model and learner sections as the learner stages run them: a locally built
    `model_preset` model, one rank whose micro-batch holds the check's batch, lr CHECK_LR. The rest (ZeRO
    stage, bf16, gradient checkpointing, trainable vision tower, attention, beta, clipping) is the preset's."""
    config = load_config(
        PRESET,
        [
            "model.path=null",
            f"model.preset={model_preset}",
            "learner.num_workers=1",
            f"learner.micro_batch_size={num_sequences}",
            f"learner.lr={CHECK_LR}",
        ],
    )
    return config.model, config.learner


def fitted_config(
    cache: Path,
    work: Path,
    *,
    rollout_workers: int,
    learners: int,
    gpus_per_actor: float,
    extra=(),
    preset: str = PRESET,
) -> Config:
    """The preset as a stage runs it: the RUN_MODEL model, these worker counts with one CPU each, the
    built-in benchmark, outputs under `work`; the other settings are the preset's."""
    images = learners * math.ceil(rollout_workers / learners)  # divisible by ranks, one per worker at least
    return load_config(
        preset,
        [
            "model.path=null",
            f"model.preset={RUN_MODEL}",
            f"data.cache_dir={cache}",
            "data.train=[{format: builtin}]",
            "data.eval=[{format: builtin}]",
            f"rollout.num_workers={rollout_workers}",
            f"learner.num_workers={learners}",
            f"learner.lr={CHECK_LR}",
            f"train.images_per_step={images}",
            f"cluster.rollout.num_gpus={gpus_per_actor}",
            f"cluster.learner.num_gpus={gpus_per_actor}",
            "cluster.rollout.num_cpus=1",
            "cluster.learner.num_cpus=1",
            "cluster.call_timeout_s=900",
            f"train.output_dir={work / 'run'}",
            f"checkpoint.dir={work / 'checkpoints'}",
            f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            *extra,
        ],
    )


def noise_image(seed: int, size: int = 112) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def running_system(config: Config) -> Iterator[tuple]:
    """(System, prompt) of `config` on a local Ray, shut down on exit."""
    import ray

    from cluster.system import create_system, start_ray
    from configs.runtime_env import apply_default_env
    from vlm.factory import load_processor, resolve_model_path
    from vlm.prompts import build_prompt_text

    model_path = resolve_model_path(config.model, config.data.models_cache_dir)
    processor = load_processor(model_path, config.model.min_pixels, config.model.max_pixels)
    start_ray(config, apply_default_env())
    try:
        yield (
            create_system(config, model_path, labels={}),
            build_prompt_text(processor, config.rollout.thinking),
        )
    finally:
        ray.shutdown()


def alternating_advantages(rollouts: list) -> list[torch.Tensor]:
    """+1, -1, +1, ... over each image's completions: an update that moves the weights."""
    return [torch.tensor([1.0 if k % 2 == 0 else -1.0 for k in range(len(r.completions))]) for r in rollouts]


def push_and_verify(system, config: Config, prompt: str) -> dict:
    """One GRPO update on the learners, then `verify_weight_sync`'s gap before and after the push."""
    from cluster.system import generate, push_weights, update, weight_sync_gap

    images = [png_bytes(noise_image(seed)) for seed in range(config.train.images_per_step)]
    rollouts = generate(system, config, images, step=1)
    metrics = update(system, config, images, prompt, rollouts, alternating_advantages(rollouts), step=1)
    stale = weight_sync_gap(system, config, images[0], prompt, step=1)
    push_weights(system, config, step=1)
    synced = weight_sync_gap(system, config, images[0], prompt, step=1)
    return {
        "transport": config.cluster.resolved_weight_transport,
        "loss": metrics["loss"],
        "gap_before_push": stale,
        "gap_after_push": synced,
        "checks": {
            "gap_after_push_within_bf16_tolerance": synced < BF16_LOGPROB_TOLERANCE,
            "push_changed_the_engine": synced < stale,
        },
    }


# --- stages -----------------------------------------------------------------------------------------


def vllm_model_runner() -> str:
    """The model runner vLLM picks here for an engine like the rollout engine's (no speculative decoding,
    no pipeline parallelism), by vLLM's own rule (VllmConfig.use_v2_model_runner)."""
    from vllm.config import VllmConfig

    return "V2" if VllmConfig().use_v2_model_runner else "V1"


def package_version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def stage_env(cache: Path, work: Path, gpus: int) -> dict:
    versions = {
        name: package_version(name)
        for name in ("torch", "vllm", "transformers", "deepspeed", "ray", "flash_attn")
    }
    return {
        "versions": {**versions, "cuda": torch.version.cuda},
        "model_runner": vllm_model_runner() if versions["vllm"] else None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "devices": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "checks": {},
    }


def stage_placement(cache: Path, work: Path, gpus: int) -> dict:
    """The preset's placement on this machine's GPUs, one probe actor per bundle."""
    import ray
    from ray.util.placement_group import placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cluster.system import reserve_placement, start_ray
    from configs.runtime_env import apply_default_env

    half = gpus // 2
    config = fitted_config(cache, work, rollout_workers=half, learners=half, gpus_per_actor=1)

    class Probe:  # pickled by value (this module is __main__), so workers need not import bench
        def report(self) -> dict:
            from vlm.weight_sync import gpu_visibility_problem

            ids = ray.get_gpu_ids()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            return {
                "gpu_ids": [str(i) for i in ids],
                "cuda_visible_devices": visible,
                "device_count": torch.cuda.device_count(),
                "problem": gpu_visibility_problem(ids, visible, torch.cuda.device_count()),
                "node": ray.get_runtime_context().get_node_id(),
            }

    start_ray(config, apply_default_env())
    try:
        placement = reserve_placement(config)
        reports = {}
        for role, group in placement.items():
            probes = [
                ray.remote(Probe)
                .options(
                    num_cpus=0,
                    num_gpus=1,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=b
                    ),
                )
                .remote()
                for b in range(len(placement_group_table(group)["bundles"]))
            ]
            reports[role] = ray.get([p.report.remote() for p in probes], timeout=300)
        strategies = {role: placement_group_table(group)["strategy"] for role, group in placement.items()}
    finally:
        ray.shutdown()
    every = [r for role in reports.values() for r in role]
    gpu_ids = [tuple(r["gpu_ids"]) for r in every]
    return {
        "actors": reports,
        "strategies": strategies,
        "checks": {
            "every_actor_has_its_own_gpu": len(set(gpu_ids)) == len(gpu_ids) == 2 * half,
            "every_actor_sees_exactly_its_gpu": all(r["problem"] is None for r in every),
            "learners_on_one_node": len({r["node"] for r in reports["learner"]}) == 1,
        },
    }


def stage_vllm_engine(cache: Path, work: Path, gpus: int) -> dict:
    """A rollout worker (Ray actor) on 0.4 of a GPU: sampling with the vision tokens suppressed."""
    import ray

    from actor.rollout_actor import create_rollout_worker
    from cluster.system import start_ray
    from configs.runtime_env import apply_default_env
    from vlm.factory import resolve_model_path

    config = fitted_config(
        cache,
        work,
        rollout_workers=1,
        learners=1,
        gpus_per_actor=0.4,
        extra=("rollout.gpu_memory_utilization=0.3",),
    )
    model_path = resolve_model_path(config.model, config.data.models_cache_dir)
    start_ray(config, apply_default_env())
    try:
        started = time.perf_counter()
        worker = create_rollout_worker(model_path, config.model, config.rollout, config.cluster.rollout)
        ray.get(worker.ping.remote(), timeout=900)
        start_seconds = time.perf_counter() - started
        runner, banned = ray.get(
            worker.__ray_call__.remote(
                lambda self: (
                    "V2" if self.engine.llm.llm_engine.vllm_config.use_v2_model_runner else "V1",
                    self.engine.suppressed_token_ids,
                )
            ),
            timeout=60,
        )
        images = [png_bytes(noise_image(seed)) for seed in range(4)]
        sampled = ray.get(worker.generate.remote(images, 16, temperature=1.5), timeout=600)
        greedy = [
            ray.get(worker.generate.remote(images[:1], 1, temperature=0.0), timeout=600) for _ in range(2)
        ]
    finally:
        ray.shutdown()
    completions = [c for rollout in sampled for c in rollout.completions]
    tokens = {t for c in completions for t in c.token_ids}
    return {
        "model_runner": runner,
        "engine_start_seconds": start_seconds,
        "completions": len(completions),
        "checks": {
            "no_vision_token_sampled": not tokens & set(banned),
            "completions_and_logprobs_sane": all(
                c.token_ids and all(math.isfinite(lp) and lp <= 0 for lp in c.logprobs) for c in completions
            ),
            "greedy_is_deterministic": greedy[0][0].completions[0].token_ids
            == greedy[1][0].completions[0].token_ids,
        },
    }


def stage_learner_step(cache: Path, work: Path, gpus: int) -> dict:
    """One single-rank NCCL learner with the preset's learner settings: a ZeRO-3 bf16 step's peak memory,
    log-probs against a CPU fp32 forward, three steps, the gathered weight push."""
    from safetensors.torch import load_file

    from learner.learner_actor import LearnerWorker, free_port
    from learner.policy import PolicySample, load_policy_model, sequence_logprobs
    from vlm.factory import build_checkpoint, load_processor
    from vlm.prompts import build_prompt_text
    from vlm.weight_sync import iterate_buckets

    model_cfg, learner_cfg = preset_learner_settings(LEARNER_MODEL, num_sequences=4)
    checkpoint = build_checkpoint(
        LEARNER_MODEL, cache, min_pixels=model_cfg.min_pixels, max_pixels=model_cfg.max_pixels
    )
    processor = load_processor(checkpoint, model_cfg.min_pixels, model_cfg.max_pixels)
    prompt = build_prompt_text(processor, thinking=True)
    rng = np.random.default_rng(0)
    samples = [
        PolicySample(noise_image(seed), prompt, [rng.integers(20, 500, 6).tolist() for _ in range(2)])
        for seed in range(2)
    ]
    advantages = [[1.0, -1.0], [-1.0, 1.0]]

    worker = LearnerWorker(rank=0, world_size=1)
    info = worker.setup(
        checkpoint,
        model_cfg,
        learner_cfg,
        train_batch_size=4,
        total_steps=10,
        master_addr="127.0.0.1",
        master_port=free_port("127.0.0.1"),
    )
    cpu_model = load_policy_model(checkpoint, model_cfg, torch.float32, trainable=False)
    with torch.no_grad():
        cpu_logp, cpu_mask = sequence_logprobs(cpu_model, processor, samples, micro_batch_size=4)
    cpu_rows = [row[m].tolist() for row, m in zip(cpu_logp, cpu_mask, strict=True)]
    gpu_rows = worker.logprobs(samples)
    gap = max(abs(a - b) for g, c in zip(gpu_rows, cpu_rows, strict=True) for a, b in zip(g, c, strict=True))

    tokens = sum(len(c) for s in samples for c in s.completions)
    torch.cuda.reset_peak_memory_stats()
    steps = [worker.train_step(samples, advantages, 1, 4, tokens)]
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    steps += [worker.train_step(samples, advantages, 1, 4, tokens) for _ in range(2)]
    after = worker.logprobs(samples)
    pushed = dict(iterate_buckets(worker.serialized_weights(64 << 20)))
    initial = load_file(str(checkpoint / "model.safetensors"))  # under the same checkpoint names
    trainable = sum(1 for p in worker.engine.module.parameters() if p.requires_grad)
    moved = sum(1 for name, t in pushed.items() if not torch.equal(t.float(), initial[name].float()))
    return {
        **info,
        "model": LEARNER_MODEL,
        "zero_stage": learner_cfg.zero_stage,
        "freeze_vision": model_cfg.freeze_vision,
        "peak_gpu_memory_gib_first_step": peak_gib,
        "bf16_vs_cpu_fp32_max_abs_logprob_gap": gap,
        "losses": [s["loss"] for s in steps],
        "grad_norms": [s["grad_norm"] for s in steps],
        "positive_completion_logprob_before_after": [sum(gpu_rows[0]), sum(after[0])],
        "pushed_trainable_moved_tensors": [len(pushed), trainable, moved],
        "checks": {
            "nccl_on_cuda": info["backend"] == "nccl" and info["device"].startswith("cuda"),
            "partitioned_at_load": info["partitioned_at_load"],
            "logprobs_match_cpu_fp32": gap < BF16_LOGPROB_TOLERANCE,
            "finite_loss_and_grad_norm": all(
                math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in steps
            ),
            "positive_advantage_raises_logprob": sum(after[0]) > sum(gpu_rows[0]),
            "push_has_every_trainable_weight": len(pushed) == trainable
            and all(bool(torch.isfinite(t.float()).all()) for t in pushed.values()),
            "pushed_weights_moved": moved > 0,
        },
    }


def stage_object_store_push(cache: Path, work: Path, gpus: int, extra: tuple[str, ...] = ()) -> dict:
    """A rollout worker and a learner sharing one GPU: the push goes through Ray's object store."""
    config = fitted_config(
        cache,
        work,
        rollout_workers=1,
        learners=1,
        gpus_per_actor=0.45,
        extra=("rollout.gpu_memory_utilization=0.3", *extra),
    )
    with running_system(config) as (system, prompt):
        return push_and_verify(system, config, prompt)


# learner.lora for the LoRA stages under the preset's ZeRO-3 bf16: the merged push (learner.lora.push=merged)
# unless a stage adds push=adapter.
LORA = ("learner.lora.rank=16", "learner.lora.alpha=32")


def stage_lora_object_store_push(cache: Path, work: Path, gpus: int) -> dict:
    """`object_store_push` with a LoRA learner: the merged adapted layers through Ray's object store."""
    return stage_object_store_push(cache, work, gpus, extra=LORA)


def stage_lora_adapter_push(cache: Path, work: Path, gpus: int) -> dict:
    """`object_store_push` with learner.lora.push=adapter: A and B alone through the object store, loaded
    in memory into vLLM's LoRA manager (Model Runner V2 on CUDA), and the engine generating with it."""
    return stage_object_store_push(cache, work, gpus, extra=(*LORA, "learner.lora.push=adapter"))


def stage_lora_nccl_push(cache: Path, work: Path, gpus: int) -> dict:
    """A LoRA learner and a rollout worker on GPUs of their own: the merged layers over NCCL."""
    config = fitted_config(cache, work, rollout_workers=1, learners=1, gpus_per_actor=1, extra=LORA)
    with running_system(config) as (system, prompt):
        return push_and_verify(system, config, prompt)


class LocalEngineClient:
    """vLLM's weight-sync client protocol over a RolloutEngine in this process (which pickles the IPC
    handles for a multiprocess engine core: `vlm.weight_sync.pickled_ipc_handles`)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.engine.init_weight_transfer(init_info)

    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    def update_weights(self, update_info: dict) -> None:
        self.engine.receive_weight_update(update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.engine.finish_weight_update()


def stage_ipc_weight_transfer(cache: Path, work: Path, gpus: int) -> dict:
    """vLLM's weight-transfer lifecycle on one GPU with its CUDA IPC backend: open, push, shut down,
    reopen, push, each push checked against the trainer's weights (what a worker replacement does to
    the NCCL group, which needs two GPUs)."""
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine

    from actor.rollout_engine import RolloutEngine
    from learner.policy import PolicySample, checkpoint_names, load_policy_model, sequence_logprobs
    from vlm.factory import resolve_model_path
    from vlm.prompts import build_prompt_text
    from vlm.weight_sync import NamedTensorSource

    config = fitted_config(
        cache,
        work,
        rollout_workers=1,
        learners=1,
        gpus_per_actor=0.4,
        extra=("rollout.gpu_memory_utilization=0.3",),
    )
    model_path = resolve_model_path(config.model, config.data.models_cache_dir)
    engine = RolloutEngine(model_path, config.model, config.rollout, weight_transfer_backend="ipc")
    model = load_policy_model(model_path, config.model, torch.bfloat16, trainable=False).cuda()
    names = checkpoint_names(model)
    source = NamedTensorSource(
        lambda: ((names[n], p) for n, p in model.named_parameters()),
        [(names[n], p.dtype, tuple(p.shape)) for n, p in model.named_parameters()],
    )
    image = noise_image(0)
    prompt = build_prompt_text(engine.processor, config.rollout.thinking)

    def gap() -> float:
        completion = engine.generate([image], 1, temperature=0.0)[0].completions[0]
        sample = PolicySample(image, prompt, [completion.token_ids])
        with torch.no_grad():
            logp, mask = sequence_logprobs(model, engine.processor, [sample], micro_batch_size=1)
        return max(abs(a - b) for a, b in zip(completion.logprobs, logp[0][mask[0]].tolist(), strict=True))

    rounds = []
    try:
        for number in range(2):
            generator = torch.Generator(device="cuda").manual_seed(number)
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(
                        torch.randn(param.shape, generator=generator, device="cuda", dtype=param.dtype) * 0.02
                    )
            stale = gap()
            transfer = IPCTrainerWeightTransferEngine.trainer_init(
                IPCTrainerInitInfo(rank=0), client=LocalEngineClient(engine), source=source
            )
            transfer.send_weights()
            rounds.append(
                {"gap_before_push": stale, "gap_after_push": gap(), "weight_version": engine.weight_version}
            )
            transfer.shutdown()
            engine.shutdown_weight_transfer()
    finally:
        engine.shutdown()
    return {
        "rounds": rounds,
        "checks": {
            "both_pushes_reach_the_engine": len(rounds) == 2
            and all(r["gap_after_push"] < BF16_LOGPROB_TOLERANCE for r in rounds),
            "pushes_changed_the_engine": all(r["gap_after_push"] < r["gap_before_push"] for r in rounds),
        },
    }


def stage_nccl_transport(cache: Path, work: Path, gpus: int) -> dict:
    """Rollout workers and a learner on GPUs of their own: the NCCL push and verify_weight_sync's gap,
    then a rollout worker killed, replaced, the transfer group reopened and the gap read again."""
    import ray

    from cluster.system import replace_dead_rollout_workers, weight_sync_gap

    rollout_workers = min(gpus - 1, 2)  # two when possible: a survivor's old group must be shut down
    config = fitted_config(cache, work, rollout_workers=rollout_workers, learners=1, gpus_per_actor=1)
    with running_system(config) as (system, prompt):
        result = push_and_verify(system, config, prompt)
        victim = system.rollout_workers[0]
        ray.kill(victim, no_restart=True)
        with contextlib.suppress(ray.exceptions.RayActorError):
            ray.get(victim.ping.remote(), timeout=120)
        time.sleep(10)  # the killed engine's process must have left the GPU before its replacement starts
        replace_dead_rollout_workers(system, config, 2, RuntimeError("rollout worker 0 killed by gpu_check"))
        image = png_bytes(noise_image(0))
        after = weight_sync_gap(system, config, image, prompt, step=2)
        restarts = system.rollout_restarts
    result["checks"]["replacement_reopened_and_synced"] = restarts == 1 and after < BF16_LOGPROB_TOLERANCE
    return {**result, "rollout_workers": rollout_workers, "gap_after_replacement": after}


def stage_train_run(cache: Path, work: Path, gpus: int) -> dict:
    """`cluster.train.run` of the preset for 3 steps with verify_weight_sync, half the GPUs rolling out."""
    from cluster.tracking import metric_histories
    from cluster.train import run

    half = min(4, gpus // 2)
    config = fitted_config(
        cache,
        work,
        rollout_workers=half,
        learners=half,
        gpus_per_actor=1,
        extra=("train.steps=3", "train.verify_weight_sync=true", "eval.max_images=16", "eval.bootstrap=0"),
    )
    started = time.perf_counter()
    result = run(config)
    seconds = time.perf_counter() - started
    key = "sync/max_abs_logprob_diff"
    gaps = [
        m.value for m in metric_histories(config.tracking.tracking_uri, result["mlflow_run_id"], (key,))[key]
    ]
    return {
        "workers_per_role": half,
        "seconds": seconds,
        "sync_gaps": gaps,
        "srcc_before_after": [result["before"].get("srcc"), result["after"].get("srcc")],
        "checks": {
            "three_steps_each_verified": len(gaps) == 3 and all(g < BF16_LOGPROB_TOLERANCE for g in gaps),
            "final_checkpoint_written": Path(result["checkpoint"]).is_dir(),
        },
    }


class DeviceMemory:
    """The GPU's used memory (every process on it: the engine's and the learner's), read every
    `interval_s` on a thread while the block runs. `phase(name)` marks an interval, and reads the memory
    as it ends (`used_at_end`)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []  # (time, used bytes)
        self.phases: list[tuple[str, float, float]] = []  # (name, start, end)
        self.used_at_end: dict[str, int] = {}  # each phase's last end
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="gpu-check-memory", daemon=True)

    @staticmethod
    def used() -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self.used()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> DeviceMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.time()
        yield
        self.used_at_end[name] = self.used()
        self.samples.append((time.time(), self.used_at_end[name]))
        self.phases.append((name, start, time.time()))

    def peak_gib(self, names: set[str]) -> float:
        """The most memory in use during any of the phases `names`."""
        spans = [(start, end) for name, start, end in self.phases if name in names]
        inside = [used for when, used in self.samples if any(start <= when <= end for start, end in spans)]
        return max(inside, default=0) / (1 << 30)


def stage_colocated_loop(cache: Path, work: Path, gpus: int) -> dict:
    """gpu-7b-1gpu-lora's loop on one GPU for 3 steps: the rollout engine and the LoRA learner rank in
    one bundle; each step generates, then `update_and_push` (what cluster.train runs): the engine asleep
    at the preset's level (2: the groups the merged push leaves out kept by name) while the learner
    trains, its states offloaded while the engine is awake. The GPU's used memory is sampled throughout:
    its peak while the engine sleeps (the learner training) and while it is awake (generating, waking,
    taking the push); verify_weight_sync's gap after each push checks that the level-2 wake, the push and
    the kept groups give the learner's weights."""
    from cluster.system import generate, update_and_push, weight_sync_gap

    config = fitted_config(
        cache, work, rollout_workers=1, learners=1, gpus_per_actor=0.5, preset=COLOCATED_PRESET
    )
    images = [png_bytes(noise_image(seed)) for seed in range(config.train.images_per_step)]
    steps = []
    with running_system(config) as (system, prompt), DeviceMemory() as memory:
        for step in (1, 2, 3):
            with memory.phase("generate"):
                rollouts = generate(system, config, images, step)
            advantages = alternating_advantages(rollouts)
            metrics = update_and_push(
                system, config, images, prompt, rollouts, advantages, step, memory.phase
            )
            with memory.phase("sync_check"):
                gap = weight_sync_gap(system, config, images[0], prompt, step)
            steps.append(
                {
                    "loss": metrics["loss"],
                    "sync_gap": gap,
                    "used_gib_before_sleep": memory.used_at_end["generate"] / (1 << 30),
                    "used_gib_asleep": memory.used_at_end["sleep"] / (1 << 30),
                }
            )
        total = torch.cuda.mem_get_info()[1]
    return {
        "sleep_level": config.cluster.colocate.sleep_level,
        "keep_weights": config.cluster.colocate.keep_weights,
        "gpu_memory_utilization": config.rollout.gpu_memory_utilization,
        "total_gib": total / (1 << 30),
        "peak_gib_asleep": memory.peak_gib({"train"}),
        "peak_gib_awake": memory.peak_gib({"generate", "wake", "weight_push", "sync_check"}),
        "steps": steps,
        "checks": {
            "every_push_synced_within_bf16_tolerance": all(
                s["sync_gap"] < BF16_LOGPROB_TOLERANCE for s in steps
            ),
            "sleep_released_device_memory": all(
                s["used_gib_asleep"] < s["used_gib_before_sleep"] for s in steps
            ),
        },
    }


# vLLM pads the vocabulary to a multiple of this before splitting it over the ranks
# (vllm/model_executor/layers/vocab_parallel_embedding.py, DEFAULT_VOCAB_PADDING_SIZE).
VOCAB_PADDING = 64
TENSOR_PARALLEL = 2


def tensor_checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def rank_shard_checksums(worker) -> dict:
    """Run in each vLLM rank (`LLM.collective_rpc`): its rank, the physical GPU it works on (None on a
    CPU), and checksums of its shard of the language model's embedding (its vocabulary rows, padding
    left out) and of layer 0's packed qkv bias."""
    import os

    from vllm.distributed import get_tensor_model_parallel_rank

    model = worker.model_runner.model
    params = dict(model.named_parameters())
    language = "language_model.model"
    rows = model.get_submodule(f"{language}.embed_tokens").shard_indices.num_org_elements
    gpu = None
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        gpu = visible[torch.cuda.current_device()].strip()
    return {
        "rank": get_tensor_model_parallel_rank(),
        "gpu": gpu,
        "embed": tensor_checksum(params[f"{language}.embed_tokens.weight"][:rows]),
        "qkv_bias": tensor_checksum(params[f"{language}.layers.0.self_attn.qkv_proj.bias"]),
    }


def expected_shard_checksums(
    weights: dict[str, torch.Tensor], tensor_parallel_size: int, dtype
) -> list[dict]:
    """What `rank_shard_checksums` should find on each rank after a push of `weights` (the learner's
    Hugging Face names) into an engine of `dtype`: the embedding split by vocabulary rows (the
    vocabulary padded to VOCAB_PADDING first), q, k and v biases each split in equal parts, packed."""
    embed = weights["model.language_model.embed_tokens.weight"].to(dtype)
    attention = "model.language_model.layers.0.self_attn"
    q, k, v = (weights[f"{attention}.{name}_proj.bias"].to(dtype) for name in "qkv")
    vocab = embed.shape[0]
    per_rank = -(-vocab // VOCAB_PADDING) * VOCAB_PADDING // tensor_parallel_size
    return [
        {
            "rank": rank,
            "embed": tensor_checksum(embed[rank * per_rank : min((rank + 1) * per_rank, vocab)]),
            "qkv_bias": tensor_checksum(torch.cat([t.chunk(tensor_parallel_size)[rank] for t in (q, k, v)])),
        }
        for rank in range(tensor_parallel_size)
    ]


def stage_tensor_parallel(cache: Path, work: Path, gpus: int) -> dict:
    """A rollout worker whose engine runs at rollout.tensor_parallel_size=2 in a bundle of two GPUs of
    the run's placement group: each rank on its own GPU of the two Ray gave the worker; greedy log-probs
    against a CPU fp32 forward before and after a push through the object store (the driver is the
    trainer: the two GPUs are the engine's); after it, each rank holds its shard of the pushed weights."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from transformers import Qwen2_5_VLForConditionalGeneration

    from actor.rollout_actor import create_rollout_worker
    from cluster.system import reserve_placement, start_ray
    from configs.runtime_env import apply_default_env
    from learner.policy import PolicySample, sequence_logprobs
    from vlm.factory import load_processor, resolve_model_path
    from vlm.prompts import build_prompt_text
    from vlm.weight_sync import serialize_buckets

    config = fitted_config(
        cache,
        work,
        rollout_workers=1,
        learners=1,
        gpus_per_actor=0,
        extra=(
            f"rollout.tensor_parallel_size={TENSOR_PARALLEL}",
            f"cluster.rollout.num_gpus={TENSOR_PARALLEL}",
            "rollout.gpu_memory_utilization=0.3",
        ),
    )
    model_path = resolve_model_path(config.model, config.data.models_cache_dir)
    processor = load_processor(model_path, config.model.min_pixels, config.model.max_pixels)
    prompt = build_prompt_text(processor, config.rollout.thinking)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32).eval()
    image = noise_image(0)

    def gap(worker) -> float:
        (rollout,) = ray.get(worker.generate.remote([png_bytes(image)], 1, temperature=0.0), timeout=600)
        completion = rollout.completions[0]
        with torch.no_grad():
            logp, mask = sequence_logprobs(
                model, processor, [PolicySample(image, prompt, [completion.token_ids])], micro_batch_size=1
            )
        return max(abs(a - b) for a, b in zip(completion.logprobs, logp[0][mask[0]].tolist(), strict=True))

    start_ray(config, apply_default_env())
    try:
        placement = reserve_placement(config)
        started = time.perf_counter()
        worker = create_rollout_worker(
            model_path,
            config.model,
            config.rollout,
            config.cluster.rollout,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement["rollout"], placement_group_bundle_index=0
            ),
        )
        bundle_gpus = ray.get(
            worker.__ray_call__.remote(lambda self: sorted(str(i) for i in ray.get_gpu_ids())), timeout=900
        )
        start_seconds = time.perf_counter() - started
        before = gap(worker)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        buckets = [ray.put(b) for b in serialize_buckets(model.named_parameters(), bucket_bytes=64 << 20)]
        ray.get(worker.update_weights.remote(buckets, 1), timeout=600)
        after = gap(worker)
        ranks = ray.get(
            worker.__ray_call__.remote(lambda self: self.engine.llm.collective_rpc(rank_shard_checksums)),
            timeout=300,
        )
    finally:
        ray.shutdown()
    dtype = getattr(torch, config.model.dtype)
    expected = expected_shard_checksums(dict(model.named_parameters()), TENSOR_PARALLEL, dtype)
    return {
        "engine_start_seconds": start_seconds,
        "bundle_gpus": bundle_gpus,
        "rank_gpus": [r["gpu"] for r in ranks],
        "gap_before_push": before,
        "gap_after_push": after,
        "checks": {
            "each_rank_on_its_own_gpu_of_the_bundle": sorted(r["gpu"] for r in ranks) == bundle_gpus
            and len(bundle_gpus) == TENSOR_PARALLEL,
            "gap_after_push_within_bf16_tolerance": after < BF16_LOGPROB_TOLERANCE,
            "push_changed_the_engine": after < before,
            "every_rank_holds_its_shard": [{k: r[k] for k in ("rank", "embed", "qkv_bias")} for r in ranks]
            == expected,
        },
    }


def stage_tensor_parallel_nccl(cache: Path, work: Path, gpus: int) -> dict:
    """A TP=2 rollout worker (two GPUs) and a learner (a third): the NCCL group holds the learner and
    both ranks (1 + tensor_parallel_size ranks), one update, the push and verify_weight_sync's gap."""
    config = fitted_config(
        cache,
        work,
        rollout_workers=1,
        learners=1,
        gpus_per_actor=1,
        extra=(
            f"rollout.tensor_parallel_size={TENSOR_PARALLEL}",
            f"cluster.rollout.num_gpus={TENSOR_PARALLEL}",
        ),
    )
    with running_system(config) as (system, prompt):
        return push_and_verify(system, config, prompt)


STAGES = [
    Stage("env", "versions, the model runner vLLM picks, visible devices", 1, False, stage_env),
    Stage(
        "placement",
        "placement dry run: a probe actor per bundle sees only its own GPU",
        2,
        False,
        stage_placement,
    ),
    Stage("vllm_engine", "vLLM CUDA engine in a Ray actor on part of a GPU", 1, True, stage_vllm_engine),
    Stage(
        "learner_step",
        "one-rank ZeRO-3 bf16 learner: peak memory, log-probs, steps, push",
        1,
        False,
        stage_learner_step,
    ),
    Stage(
        "object_store_push",
        "weight push through Ray's object store into the CUDA engine",
        1,
        True,
        stage_object_store_push,
    ),
    Stage(
        "ipc_weight_transfer",
        "vLLM's CUDA IPC weight-transfer backend: open, push, shut down, reopen",
        1,
        True,
        stage_ipc_weight_transfer,
    ),
    Stage(
        "nccl_transport",
        "NCCL push with verify_weight_sync, then a worker replaced and the group reopened",
        2,
        True,
        stage_nccl_transport,
    ),
    Stage(
        "lora_object_store_push",
        "LoRA learner (ZeRO-3 bf16): merged layers pushed through the object store",
        1,
        True,
        stage_lora_object_store_push,
    ),
    Stage(
        "lora_adapter_push",
        "LoRA learner (ZeRO-3 bf16): the adapter alone pushed through the object store, served by vLLM as a LoRA",
        1,
        True,
        stage_lora_adapter_push,
    ),
    Stage(
        "lora_nccl_push",
        "LoRA learner (ZeRO-3 bf16): merged layers pushed over NCCL",
        2,
        True,
        stage_lora_nccl_push,
    ),
    Stage(
        "tensor_parallel",
        "a TP=2 rollout worker on a bundle of 2 GPUs: ranks' GPUs, object-store push reaching each shard",
        2,
        True,
        stage_tensor_parallel,
    ),
    Stage(
        "tensor_parallel_nccl",
        "a TP=2 rollout worker and a learner: NCCL push to both ranks with verify_weight_sync",
        3,
        True,
        stage_tensor_parallel_nccl,
    ),
    Stage(
        "colocated_loop",
        "gpu-7b-1gpu-lora on one GPU: engine asleep while the learner trains, CUDA IPC push, peak memory of each",
        1,
        True,
        stage_colocated_loop,
    ),
    Stage("train_run", "a 3-step run of gpu-7b-1node with a small model", 2, True, stage_train_run),
]
BY_NAME = {stage.name: stage for stage in STAGES}


# --- driver -----------------------------------------------------------------------------------------


def run_child(stage: Stage, cache: Path, work: Path) -> dict:
    """The stage in a process of its own; its result is the JSON of its last RESULT_PREFIX line."""
    try:
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.gpu_check",
                "--child",
                stage.name,
                "--cache",
                str(cache),
                "--out",
                str(work),
            ],
            capture_output=True,
            text=True,
            timeout=STAGE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"did not finish within {STAGE_TIMEOUT_S} s"}
    sys.stderr.write(completed.stderr[-4000:])
    if completed.returncode != 0:
        return {"status": "error", "reason": completed.stderr[-3000:]}
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        return {"status": "error", "reason": "the stage printed no result"}
    result = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    failed = [name for name, ok in result["checks"].items() if not ok]
    return {"status": "failed" if failed else "passed", "failed_checks": failed, **result}


def stage_report(stages: list[Stage], machine: Machine, run: Callable[[Stage], dict]) -> dict:
    """Per stage: "not run" with the reason, or what `run` reports."""
    report = {}
    for stage in stages:
        reason = why_not_run(stage, machine)
        report[stage.name] = {"status": "not run", "reason": reason} if reason else run(stage)
    return report


def exit_status(report: dict) -> int:
    statuses = [entry["status"] for entry in report.values()]
    if any(status in ("failed", "error") for status in statuses):
        return 1
    return 0 if "passed" in statuses else 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    listing = "\n".join(
        f"  {s.name:<20} {s.summary} (needs {s.min_gpus} GPU{'s' if s.min_gpus > 1 else ''}"
        f"{', CUDA vLLM' if s.needs_vllm else ''})"
        for s in STAGES
    )
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description=__doc__,
        epilog=f"stages, in the order they run:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/gpu_check"), help="gpu_check.json and each stage's folder"
    )
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default: a fresh temp folder)")
    parser.add_argument(
        "--stages", default=",".join(BY_NAME), help="comma-separated stage names (default: all)"
    )
    parser.add_argument("--child", choices=list(BY_NAME), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [name for name in args.stages.split(",") if name not in BY_NAME]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; stages: {', '.join(BY_NAME)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="vqr1-gpu-"))
    machine = probe_machine()
    if args.child:
        print(RESULT_PREFIX + json.dumps(BY_NAME[args.child].run(cache, args.out, machine.gpus)), flush=True)
        return 0
    selected = [BY_NAME[name] for name in args.stages.split(",")]
    report = stage_report(selected, machine, lambda stage: run_child(stage, cache, args.out / stage.name))
    document = {"preset": PRESET, "machine": vars(machine), "stages": report}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(document, indent=2))
    print(json.dumps(document, indent=2))
    return exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
