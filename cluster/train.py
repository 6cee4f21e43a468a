"""The driver: one GRPO loop over Ray actors, read top to bottom.

    python -m cluster.train --config cpu-default [section.key=value ...]
    ray job submit --working-dir . -- python -m cluster.train --config gpu-7b-1node

Each step: sample a batch of images (one dataset) -> the rollout workers generate G completions per
image -> the reward actor scores the WHOLE batch -> group advantages -> the learners run mu GRPO updates
-> the new weights are pushed into every rollout worker -> metrics go to MLflow and one console line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.runtime_env import apply_default_env

log = logging.getLogger("vqr1.train")


@dataclass
class System:
    """The actors of one run."""

    rollout_workers: list
    reward: object
    learners: list
    placement_group: object
    # make_rollout_worker(i) creates rollout worker i in its bundle (to replace a dead one).
    make_rollout_worker: Callable[[int], object]
    rollout_restarts: int = 0


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class RemoteCallError(RuntimeError):
    """A remote call that failed or timed out, naming the actor, the phase and the step."""


def wait(refs, config, phase: str, step: int, actor: str):
    import ray

    try:
        return ray.get(refs, timeout=config.cluster.call_timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise RemoteCallError(
            f"step {step}, phase {phase}: {actor} did not answer within cluster.call_timeout_s="
            f"{config.cluster.call_timeout_s:g}s"
        ) from exc
    except ray.exceptions.RayActorError as exc:
        raise RemoteCallError(f"step {step}, phase {phase}: {actor} died: {exc}") from exc


def start_ray(config, env_vars: dict[str, str]) -> None:
    import os

    import ray

    address = config.cluster.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": env_vars}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(
            num_cpus=config.cluster.num_cpus,
            include_dashboard=False,
            _node_ip_address=config.cluster.host,
            runtime_env=runtime_env,
        )


def create_system(config, model_path: Path, labels: dict[str, tuple[float, str]]) -> System:
    """Reserve the bundles (rollout and learner on separate ones unless colocated), then create the actors."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actor.rollout_actor import create_rollout_worker
    from learner.learner_actor import create_learner_group
    from rewards.reward_actor import create_reward_worker

    cluster = config.cluster

    def bundle(*placements):
        cpus = sum(p.num_cpus for p in placements)
        gpus = sum(p.num_gpus for p in placements)
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

    num_rollout, num_learner = config.rollout.num_workers, config.learner.num_workers
    if cluster.placement == "colocate":
        shared = max(num_rollout, num_learner)
        bundles = [bundle(cluster.rollout, cluster.learner) for _ in range(shared)]
        rollout_bundles, learner_bundles = list(range(num_rollout)), list(range(num_learner))
    else:
        bundles = [bundle(cluster.rollout) for _ in range(num_rollout)]
        bundles += [bundle(cluster.learner) for _ in range(num_learner)]
        rollout_bundles = list(range(num_rollout))
        learner_bundles = list(range(num_rollout, num_rollout + num_learner))
    bundles = [b if b["CPU"] > 0 or "GPU" in b else {"CPU": 0.01} for b in bundles]
    group = placement_group(bundles, strategy="PACK")
    ray.get(group.ready(), timeout=cluster.call_timeout_s)

    def in_bundle(index: int) -> dict:
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
        }

    def make_rollout_worker(index: int):
        return create_rollout_worker(
            model_path, config.model, config.rollout, cluster.rollout, **in_bundle(rollout_bundles[index])
        )

    rollout_workers = [make_rollout_worker(i) for i in range(num_rollout)]
    reward = create_reward_worker(config.reward, labels, cluster.reward, seed=config.train.seed)
    learners = create_learner_group(
        num_learner,
        cluster.learner,
        model_path=model_path,
        model=config.model,
        learner=config.learner,
        train_batch_size=config.train.images_per_step * config.rollout.num_generations,
        total_steps=config.train.steps,
        temperature=config.rollout.temperature,
        placement_group=group,
        bundle_indices=learner_bundles,
        timeout_s=cluster.call_timeout_s,
    )
    system = System(rollout_workers, reward, learners, group, make_rollout_worker)
    if cluster.resolved_weight_transport == "nccl":
        open_weight_transfer(system, config, step=0)
    return system


def open_weight_transfer(system: System, config, step: int) -> None:
    """GPU: (re)open the NCCL weight-transfer group of learner rank 0 and every rollout worker."""
    phase = "weight transfer setup"
    address, port = wait(system.learners[0].rendezvous_address.remote(), config, phase, step, "learners")
    refs = [
        learner.open_weight_transfer.remote(
            system.rollout_workers,
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


# eval.split -> the parts of the eval datasets' split by reference that it evaluates on.
EVAL_SPLIT_PARTS = {
    "train": ("train",),
    "val": ("val",),
    "test": ("test",),
    "held_out": ("val", "test"),  # every reference the run never trains on
    "all": ("train", "val", "test"),
}


def load_data(config):
    """Train and eval splits, split by reference; bad rows stop the run or are reported and skipped."""
    from datasets import concatenate_datasets

    from iqa.splits import load_splits

    train_splits, train_report = load_splits(config.data.train, config.data)
    eval_splits, eval_report = load_splits(config.data.eval, config.data)
    for report in (train_report, eval_report):
        if report.bad:
            log.warning("\n".join(report.lines()))
    eval_split = concatenate_datasets([eval_splits[name] for name in EVAL_SPLIT_PARTS[config.eval.split]])
    if config.eval.max_images is not None and len(eval_split) > config.eval.max_images:
        eval_split = eval_split.shuffle(seed=config.data.split_seed).select(range(config.eval.max_images))
    return train_splits["train"], eval_split, train_report.merge(eval_report)


def rollout_scores(rollouts) -> list:
    """Per image (iqa.evaluate.ImageSamples), each sample's parsed score (None where it did not parse)
    and its leading digit's distribution where the engine reported one."""
    from iqa.evaluate import ImageSamples

    return [
        ImageSamples(
            [c.score if c.parse_ok else None for c in rollout.completions],
            [c.digit_probs for c in rollout.completions],
        )
        for rollout in rollouts
    ]


def read_images(paths: list[str]) -> list[bytes]:
    """Encoded image files: each image travels once per step as its bytes, never as G pixel copies."""
    return [Path(p).read_bytes() for p in paths]


def generate(system: System, config, images: list[bytes], step: int) -> list:
    """G completions per image, the batch split across the rollout workers; a dead worker is replaced
    (current weights loaded) and the step's generation redone, up to cluster.max_worker_restarts times."""
    import ray

    while True:
        shards = shard(list(range(len(images))), len(system.rollout_workers))
        # Unseeded requests: each engine's generator was seeded once (rollout.seed). Per-request seeds
        # crash vLLM 0.32's CPU runner on large batches ("CPU Generator does not use offset").
        refs = [
            worker.generate.remote([images[i] for i in indices], config.rollout.num_generations)
            for worker, indices in zip(system.rollout_workers, shards, strict=True)
            if indices
        ]
        try:
            per_worker = wait(refs, config, "generate", step, "rollout workers")
            return [rollout for rollouts in per_worker for rollout in rollouts]
        except RemoteCallError as exc:
            if not isinstance(exc.__cause__, ray.exceptions.RayActorError):
                raise
            replace_dead_rollout_workers(system, config, step, exc)


def replace_dead_rollout_workers(
    system: System, config, step: int, cause: Exception, phase: str = "generate"
) -> None:
    import ray

    dead = []
    for index, worker in enumerate(system.rollout_workers):
        try:
            ray.get(worker.ping.remote(), timeout=config.cluster.call_timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            dead.append(index)
    if not dead:
        raise cause
    if system.rollout_restarts + len(dead) > config.cluster.max_worker_restarts:
        raise RemoteCallError(
            f"step {step}, phase {phase}: rollout worker(s) {dead} died and the "
            f"cluster.max_worker_restarts={config.cluster.max_worker_restarts} restarts of this run are used up"
        ) from cause
    for index in dead:
        log.warning("step %d: rollout worker %d died (%s); starting a replacement", step, index, cause)
        ray.kill(system.rollout_workers[index], no_restart=True)
        system.rollout_workers[index] = system.make_rollout_worker(index)
        system.rollout_restarts += 1
    if config.cluster.resolved_weight_transport == "nccl":
        open_weight_transfer(system, config, step)  # a new group, with the replacements in it
    # The replacement starts from the initial weights: load the learners' current ones.
    push_weights(system, config, step, [system.rollout_workers[i] for i in dead])


def update(
    system: System, config, images: list[bytes], prompt: str, rollouts: list, advantages, step: int
) -> dict:
    """mu GRPO updates on the learners; each rank gets a contiguous shard of the images."""
    from learner.policy import PolicySample

    samples = [
        PolicySample(image=image, prompt=prompt, completions=[c.token_ids for c in rollout.completions])
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
    return per_rank[0]  # rank 0 reports the globally reduced metrics


def push_weights(system: System, config, step: int, workers: list | None = None) -> None:
    """Gather the policy from the learners (every rank takes part) and load it into the rollout workers
    (`workers`, default all; over NCCL always all)."""
    import ray

    if config.cluster.resolved_weight_transport == "nccl":
        # Rank 0 broadcasts GPU to GPU. A worker lost mid-broadcast leaves rank 0 blocked in NCCL, so
        # this ends the run (call_timeout_s) and resume continues from the last checkpoint.
        wait(
            [learner.send_weights.remote() for learner in system.learners],
            config,
            "weight push",
            step,
            "learners",
        )
        return
    gathered = wait(
        [learner.weight_buckets.remote(config.learner.weight_bucket_bytes) for learner in system.learners],
        config,
        "weight push",
        step,
        "learners",
    )
    buckets = ray.put(gathered[0])
    targets = system.rollout_workers if workers is None else workers
    try:
        wait(
            [w.update_weights.remote(buckets) for w in targets],
            config,
            "weight push",
            step,
            "rollout workers",
        )
    except RemoteCallError as exc:
        if not isinstance(exc.__cause__, ray.exceptions.RayActorError):
            raise
        # A worker that died here is replaced, and the replacement is loaded with these same weights.
        replace_dead_rollout_workers(system, config, step, exc, phase="weight push")


def evaluate(system: System, config, eval_split, tracker, label: str, step: int) -> dict:
    """Score the held-out split through the rollout workers (the current policy) and log the metrics;
    returns the metrics over all its images (srcc, plcc, ..., parse_failure_rate)."""

    scored = 0  # images of this evaluation scored so far

    def score_images(images) -> list:
        nonlocal scored
        shards = shard(list(images), len(system.rollout_workers))
        starts = scored + np.cumsum([0] + [len(part) for part in shards[:-1]])
        scored += len(images)
        refs = [
            worker.generate.remote(
                part,
                config.eval.num_samples,
                temperature=config.eval.temperature,
                thinking=config.eval.thinking,
                # Each image of the evaluation gets its own seeds, whichever call and worker score it.
                stream_apart=config.eval.seed + int(start) * config.eval.num_samples,
                digit_probs=True,
            )
            for worker, part, start in zip(system.rollout_workers, shards, starts, strict=True)
            if part
        ]
        per_worker = wait(refs, config, f"evaluation ({label})", step, "rollout workers")
        return rollout_scores([rollout for rollouts in per_worker for rollout in rollouts])

    out_dir = Path(config.train.output_dir) / f"eval-{label}"
    return evaluate_split(config, eval_split, score_images, out_dir, tracker.run, f"eval_{label}", step)


def evaluate_split(
    config, eval_split, score_images, out_dir: Path, mlflow_run, prefix: str, step: int
) -> dict:
    """run_evaluation with the config's decoding; returns the metrics over all images (srcc, plcc, ...,
    parse_failure_rate, srcc_within_reference, and the *_expected ones when the scorer read digit
    distributions). The files and per-dataset metrics go to out_dir and the MLflow run."""
    from iqa.evaluate import run_evaluation

    report = run_evaluation(
        eval_split,
        score_images,
        out_dir,
        num_samples=config.eval.num_samples,
        temperature=config.eval.temperature,
        thinking=config.eval.thinking,
        bootstrap=config.eval.bootstrap,
        score_range=config.reward.score_range,
        out_of_range_policy=config.reward.out_of_range,
        mlflow_run=mlflow_run,
        prefix=prefix,
        step=step,
    )
    expected = report.get("expected_score", {}).get("overall", {})
    return {
        **report["overall"],
        "parse_failure_rate": report["sample_parse_failure_rate"],
        **{
            f"{key}_expected": expected[key]
            for key in ("srcc", "plcc", "spread_across_images", "srcc_within_reference")
            if key in expected
        },
    }


def sample_rows(step: int, ids: list[str], rollouts: list, rewards, limit: int = 4) -> list[dict]:
    rows = []
    for i, (image_id, rollout) in enumerate(zip(ids[:limit], rollouts[:limit], strict=True)):
        completion = rollout.completions[0]
        rows.append(
            {
                "step": step,
                "image_id": image_id,
                "score": float(rewards.scores[i, 0]),
                "reward": float(rewards.total[i, 0]),
                "completion": completion.text,
            }
        )
    return rows


def step_line(step: int, steps: int, metrics: dict) -> str:
    return (
        f"step {step}/{steps} | reward {metrics['reward/total_mean']:.3f} "
        f"(fidelity {metrics['reward/fidelity_mean']:.3f}, format {metrics['reward/format_mean']:.2f}) | "
        f"parse fail {metrics['reward/parse_failure_rate']:.2f} | spread {metrics['score/spread_within_image']:.2f} | "
        f"batch srcc {metrics['score/batch_srcc']:+.2f} | "
        f"kl {metrics['learner/kl']:.4f} | loss {metrics['learner/loss']:+.4f} | "
        f"gen {metrics['time/generate_s']:.1f}s train {metrics['time/train_s']:.1f}s "
        f"push {metrics['time/weight_push_s']:.2f}s | {metrics['perf/rollout_tokens_per_s']:.0f} tok/s"
    )


def save_checkpoint(system: System, config, step: int, sampler, tracker) -> Path:
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
    state = {"step": step, "sampler": vars(sampler.state), "mlflow_run_id": tracker.run_id}
    return checkpoints.commit(root, step, state, config.checkpoint.keep_last)


def run(config) -> dict:
    """Train; returns the evaluation before and after, the final checkpoint and the MLflow run id."""
    import ray

    from actor.prompts import build_prompt_text
    from cluster import checkpoints
    from cluster.batches import DatasetBatchSampler, SamplerState
    from cluster.curves import plot_training_curves
    from cluster.tracking import Tracker
    from learner.model_factory import load_processor, resolve_start_model

    env = apply_default_env()
    model_path = resolve_start_model(config)
    if Path(config.checkpoint.dir).resolve() in Path(model_path).resolve().parents:
        # A fresh run sets that folder's checkpoints aside, and pruning would delete them.
        raise ValueError(
            f"model.path {model_path} is inside checkpoint.dir {config.checkpoint.dir}: "
            "give this run another checkpoint.dir"
        )
    train_split, eval_split, data_report = load_data(config)
    labels = {
        row["id"]: (row["mos"], row["dataset"])
        for row in train_split.select_columns(["id", "mos", "dataset"])
    }
    sampler = DatasetBatchSampler(train_split["dataset"], config.train.images_per_step, config.train.seed)
    processor = load_processor(model_path, config.model.min_pixels, config.model.max_pixels)
    prompt = build_prompt_text(processor, config.rollout.thinking)
    resume = checkpoints.latest_valid(Path(config.checkpoint.dir)) if config.checkpoint.resume else None

    start_ray(config, env)
    tracker = None
    try:
        system = create_system(config, model_path, labels)
        tracker = Tracker(config, run_id=resume[1]["mlflow_run_id"] if resume else None)
        start_step = 0
        if resume:
            folder, state = resume
            start_step = state["step"]
            loads = [learner.load_checkpoint.remote(str(folder)) for learner in system.learners]
            wait(loads, config, "resume", start_step, "learners")
            push_weights(system, config, start_step)
            sampler.state = SamplerState(**state["sampler"])
            forget_trained_images_after(config, start_step)
            print(f"resumed from {folder} at step {start_step}")
        else:
            previous = checkpoints.set_aside_earlier_run(Path(config.checkpoint.dir))
            if previous is not None:
                print(
                    f"{config.checkpoint.dir} held an earlier run's checkpoints: moved to {previous}; this run "
                    "starts at step 1 (checkpoint.resume=true continues a run instead)"
                )
            forget_trained_images_after(config, 0)
            tracker.log_table([{"report": line} for line in data_report.lines()], "data_report.json")
        print(
            f"model {model_path} | {len(train_split)} training images, {len(eval_split)} held-out | {tracker.describe()}"
        )

        history, evaluations = [], {}
        before = None if resume else evaluate(system, config, eval_split, tracker, "before", 0)
        if before:
            evaluations[0] = before
        # Steps are numbered from 1, as in the console, the errors, MLflow and the checkpoints.
        for step in range(start_step + 1, config.train.steps + 1):
            batch = [train_split[int(i)] for i in sampler.next_batch()]
            metrics = grpo_step(system, config, step, batch, prompt, tracker)
            history.append({"step": step, **metrics})
            print(step_line(step, config.train.steps, metrics), flush=True)
            if config.eval.every and step % config.eval.every == 0 and step < config.train.steps:
                evaluations[step] = evaluate(system, config, eval_split, tracker, f"step{step}", step)
            if config.checkpoint.every and step % config.checkpoint.every == 0:
                save_checkpoint(system, config, step, sampler, tracker)

        final = checkpoints.step_dir(Path(config.checkpoint.dir), config.train.steps)
        if not final.is_dir():
            final = save_checkpoint(system, config, config.train.steps, sampler, tracker)
        after = evaluate(system, config, eval_split, tracker, "after", config.train.steps)
        evaluations[config.train.steps] = after
        curves = plot_training_curves(
            history, evaluations, Path(config.train.output_dir) / "training_curves.png"
        )
        tracker.log_artifact(curves)
        print_summary(before, after, final, tracker)
        print(f"training curves: {curves}")
        tracker.finish()
        return {"before": before, "after": after, "checkpoint": str(final), "mlflow_run_id": tracker.run_id}
    except BaseException as exc:
        if tracker is not None:
            tracker.finish(status="FAILED")
        last_good = checkpoints.latest_valid(Path(config.checkpoint.dir))
        where = (
            f"the last good checkpoint is {last_good[0]}" if last_good else "no checkpoint was written yet"
        )
        print(f"run failed: {exc}\n{where}; continue with checkpoint.resume=true", file=sys.stderr)
        raise
    finally:
        ray.shutdown()


def grpo_step(system: System, config, step: int, batch: list[dict], prompt: str, tracker) -> dict:
    """GRPO step number `step` (from 1): generate -> reward -> advantages -> update -> push weights -> log."""
    import torch

    from learner.grpo import group_advantages

    timer = PhaseTimer()
    ids = [row["id"] for row in batch]
    images = read_images([row["image"] for row in batch])

    with timer("generate"):
        rollouts = generate(system, config, images, step)
    with timer("reward"):
        texts = [[c.text for c in rollout.completions] for rollout in rollouts]
        rewards = wait(system.reward.score.remote(ids, texts), config, "reward", step, "reward actor")
    advantages = group_advantages(torch.tensor(rewards.total), config.learner.advantage)
    with timer("train"):
        learner_metrics = update(system, config, images, prompt, rollouts, advantages, step)
    with timer("weight_push"):
        push_weights(system, config, step)

    num_completions = sum(len(r.completions) for r in rollouts)
    num_tokens = sum(len(c.token_ids) for r in rollouts for c in r.completions)
    metrics = {
        **rewards.metrics(),
        **{f"learner/{k}": v for k, v in learner_metrics.items() if not k.endswith("_seconds")},
        # Inside the learners' "train" phase: old/reference log-probs, then the mu updates.
        "time/logprob_s": learner_metrics["logprob_seconds"],
        "time/update_s": learner_metrics["update_seconds"],
        "advantage/mean": float(advantages.mean()),
        "advantage/std": float(advantages.std()),
        "advantage/abs_max": float(advantages.abs().max()),
        "response/length_mean": num_tokens / max(1, num_completions),
        "response/truncated_rate": sum(c.truncated for r in rollouts for c in r.completions)
        / max(1, num_completions),
        "perf/rollout_tokens_per_s": num_tokens / max(timer.seconds["generate"], 1e-9),
        **{f"time/{phase}_s": seconds for phase, seconds in timer.seconds.items()},
        "time/step_s": sum(timer.seconds.values()),
        "events/rollout_worker_restarts": system.rollout_restarts,
    }
    if config.train.verify_weight_sync:
        metrics["sync/max_abs_logprob_diff"] = weight_sync_gap(system, config, images[0], prompt, step)
    tracker.log_metrics(metrics, step=step)
    log_trained_images(config, step, ids)
    if (step - 1) % config.tracking.sample_table_every == 0:
        tracker.log_table(sample_rows(step, ids, rollouts, rewards), f"samples/step-{step:06d}.json")
    return metrics


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


def trained_images_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "trained_images.jsonl"


def log_trained_images(config, step: int, ids: list[str]) -> None:
    """Append the step's image ids to <output_dir>/trained_images.jsonl (resume exactness is checked on it)."""
    path = trained_images_path(config.train.output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps({"step": step, "image_ids": ids}) + "\n")


def forget_trained_images_after(config, step: int) -> None:
    """Drop the log lines of steps after `step`: a run killed after its last checkpoint trained them, but
    those updates were lost with it, and the resumed run trains those images again."""
    path = trained_images_path(config.train.output_dir)
    if path.is_file():
        kept = [entry for entry in read_trained_images(config.train.output_dir) if entry["step"] <= step]
        path.write_text("".join(json.dumps(entry) + "\n" for entry in kept))


def read_trained_images(output_dir: str | Path) -> list[dict]:
    """The log of log_trained_images: one {"step", "image_ids"} per trained step, in order."""
    lines = trained_images_path(output_dir).read_text().splitlines()
    return [json.loads(line) for line in lines]


def print_summary(before: dict | None, after: dict, checkpoint: Path, tracker) -> None:
    keys = [
        "srcc",
        "plcc",
        "krcc",
        "rmse",
        "parse_failure_rate",
        "spread_within_image",
        "srcc_within_reference",
        "srcc_expected",
        "plcc_expected",
        "spread_across_images_expected",
        "srcc_within_reference_expected",
    ]
    print(f"\n{'held-out evaluation':<32}{'before':>8}{'after':>11}")
    for key in keys:
        old = f"{before[key]:.3f}" if before and key in before else "   -"
        new = f"{after[key]:.3f}" if key in after else "   -"
        print(f"  {key:<30}{old:>8}{new:>11}")
    print(
        "  (*_expected: the mean of each sample's expected score, its leading digit's sampling noise removed;\n"
        "   the sampled srcc can see the policy's ranking only once spread_across_images_expected is not\n"
        "   small against spread_within_image / sqrt(samples per image); *within_reference: the mean SRCC\n"
        "   among each reference photo's distorted versions, the photo's content offset taken out)"
    )
    print(f"policy checkpoint (Hugging Face format): {checkpoint}\n{tracker.describe()}")


def main_from_args(args) -> int:
    from configs.load import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    result = run(config)
    Path(config.train.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(config.train.output_dir) / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="cpu-default", help="a preset name in configs/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. learner.lr=1e-6")
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
