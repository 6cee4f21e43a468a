"""The driver: one GRPO loop over Ray actors, read top to bottom.

    vqr1 train --config cpu-default [section.key=value ...]          (make train)
    ray job submit --working-dir . -- python -m cluster.train --config gpu-7b-1node

`run` sets up (start model, data, Ray system, MLflow), evaluates, loops over `grpo_step`, checkpoints,
evaluates again and prints the summary. Each step: a batch of images (one dataset) -> the rollout
workers generate G completions per image -> the reward actor scores the WHOLE batch -> group advantages
-> the learners run mu GRPO updates -> the new weights are pushed into every rollout worker -> metrics
to MLflow and one console line, then every role's CPU, memory, GPU and KV-cache figures (`SystemMonitor`). The Ray plumbing of each phase is in cluster/system.py.

With train.max_staleness = k >= 1 the loop keeps the batches of the next k steps generating while the
learners train (a queue of in-flight generations, `ahead`): a batch is generated with the weights pushed
before it was submitted, at most k updates older than those it trains, and the learners weigh its
tokens by pi_old / mu (learner.off_policy_correction). k = 0 submits each batch just before it trains:
generate, then train, in turn.

Colocated (cluster.placement=colocate, one GPU is enough), rollout worker i and learner rank i share a
device and take turns on it within each step: the engines sleep, the learners train, the engines wake
their weights, the push, the engines wake their KV cache, then the next batch generates. k = 0 only.

A run heals itself (docs/reliability.md): a dead rollout worker or reward actor is replaced inside the
call that found it (cluster/system.py); a dead learner rank sends the loop back to the newest
checkpoint, in the same process (`restart_learners_and_rewind`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from cluster import checkpoints
from cluster.evaluation import SUMMARY_KEYS, evaluate
from cluster.system import (
    Generation,
    RemoteCallError,
    SystemMonitor,
    collect_generation,
    create_system,
    is_dead_actor_call,
    push_weights,
    restart_learners,
    restore_generation,
    sampled_versions,
    save_checkpoint,
    score,
    start_ray,
    submit_generation,
    update_and_push,
    wait,
    weight_sync_gap,
)
from configs.runtime_env import apply_default_env, output_to_log, route_logs

log = logging.getLogger("vqr1.train")


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        # The wall-clock (start, end) of each phase's last run.
        self.last_span: dict[str, tuple[float, float]] = {}

    @contextmanager
    def __call__(self, phase: str):
        start, wall_start = time.perf_counter(), time.time()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
        self.last_span[phase] = (wall_start, time.time())


def run(config) -> dict:
    """Train; returns the evaluation before and after, the final checkpoint and the MLflow run id."""
    import ray

    from cluster.batches import DatasetBatchSampler
    from cluster.curves import plot_training_curves
    from cluster.ray_job import ray_copy_problem
    from cluster.tracking import Tracker
    from configs.load import ConfigError
    from iqa.splits import load_run_data
    from models.base_model import cold_start_for_run
    from vlm.factory import load_processor, resolve_model_path
    from vlm.prompts import build_prompt_text

    problem = ray_copy_problem(config, Path.cwd(), os.environ)  # a `ray job submit` with relative paths
    if problem:
        raise ConfigError(problem)
    output_dir = Path(config.train.output_dir)
    env = {**apply_default_env(), **route_logs(output_dir / "train.log")}
    # The data first: a dataset too small for train.images_per_step stops the run before any model loads.
    train_split, eval_split, data_report = load_run_data(config, config.train.images_per_step)
    with output_to_log(output_dir / "train.log"):  # a model preset's first build (transformers' bars)
        model_path = resolve_model_path(config.model, config.data.models_cache_dir)
    if config.model.cold_start is not None:
        # The format cold start re-run on the start model (models/base_model.py), built once and cached.
        model_path = cold_start_for_run(config, model_path)
    if Path(config.checkpoint.dir).resolve() in Path(model_path).resolve().parents:
        # A fresh run sets that folder's checkpoints aside, and pruning would delete them.
        raise ConfigError(
            f"model.path {model_path} is inside checkpoint.dir {config.checkpoint.dir}: "
            "give this run another checkpoint.dir"
        )
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
        tracker = Tracker(config, resume=(resume[1]["mlflow_run_id"], resume[1]["step"]) if resume else None)
        monitor = SystemMonitor(system, tracker)  # per step, each role's CPU, memory, GPU, KV cache
        for run_id in tracker.ended_dead_runs:
            print(f"MLflow run {run_id} was left RUNNING by a driver that died: marked FAILED")
        start_step = 0
        # Batches generated ahead of the step that trains them (train.max_staleness), oldest first.
        ahead: deque[Generation] = deque()
        if resume:
            folder, state = resume
            start_step = state["step"]
            loads = [learner.load_checkpoint.remote(str(folder)) for learner in system.learners]
            wait(loads, config, "resume", start_step, "learners")
            system.policy_version = start_step
            push_weights(system, config, start_step)
            rewind_loop(folder, state, sampler, ahead, output_dir)
            print(f"resumed from {folder} at step {start_step}")
        else:
            previous = checkpoints.set_aside_earlier_run(Path(config.checkpoint.dir))
            if previous is not None:
                print(
                    f"{config.checkpoint.dir} held an earlier run's checkpoints: moved to {previous}; this run "
                    "starts at step 1 (checkpoint.resume=true continues a run instead)"
                )
            checkpoints.forget_trained_images_after(output_dir, 0)
            tracker.log_table([{"report": line} for line in data_report.lines()], "data_report.json")
        print(
            f"model {model_path} | {len(train_split)} training images, {len(eval_split)} held-out | "
            f"{tracker.describe()} | library log: {output_dir / 'train.log'}"
        )

        history, evaluations = [], {}
        record_engine_extensions(system, config, tracker, start_step)
        before = None if resume else evaluate(system, config, eval_split, tracker, "before", 0)
        if before:
            evaluations[0] = before
        next_batch = start_step + 1 + len(ahead)
        learner_busy = deque(maxlen=config.train.max_staleness + 2)  # recent (start, end) of training
        # Steps are numbered from 1, as in the console, the errors, MLflow and the checkpoints.
        step_seconds: list[float] = []  # wall time of each step (evaluations and checkpoints apart)
        step = finished = start_step  # finished: the last step whose metrics are logged
        while step < config.train.steps:
            step += 1
            step_started = time.perf_counter()
            try:
                # Queue the batches up to step + k: generated with the weights pushed so far (step - 1's),
                # none trains more than k updates later.
                while next_batch <= min(config.train.steps, step + config.train.max_staleness):
                    rows = [train_split[int(i)] for i in sampler.next_batch()]
                    ahead.append(submit_generation(system, config, next_batch, rows))
                    next_batch += 1
                metrics = grpo_step(system, config, ahead.popleft(), prompt, tracker, learner_busy)
                finished = step
                step_seconds.append(time.perf_counter() - step_started)
                history.append({"step": step, **metrics})
                print(step_line(step, config.train.steps, metrics, step_seconds), flush=True)
                monitor.poll(step)
                # A rollout worker runs its calls in order: the evaluation's come after the batches in
                # flight and the push, so it scores the weights of this step without disturbing them.
                if config.eval.every and step % config.eval.every == 0 and step < config.train.steps:
                    evaluations[step] = evaluate(system, config, eval_split, tracker, f"step{step}", step)
                if config.checkpoint.every and step % config.checkpoint.every == 0:
                    save_checkpoint(system, config, step, sampler, tracker, list(ahead))
            except RemoteCallError as exc:
                if not is_dead_actor_call(exc, "learners"):
                    raise
                # A learner rank died: the learners start again from the newest checkpoint, and so do the
                # data, the batches ahead, the logs and (if it holds later steps) the MLflow run.
                back_to = restart_learners_and_rewind(
                    system, config, exc, step, finished, sampler, ahead, history, evaluations
                )
                tracker = tracking_from(tracker, config, system, back_to, finished)
                monitor.go_on_with(tracker)
                step = finished = back_to
                next_batch = step + 1 + len(ahead)

        monitor.flush()
        record_engine_extensions(system, config, tracker, config.train.steps)  # after the last push
        final = checkpoints.step_dir(Path(config.checkpoint.dir), config.train.steps)
        if not final.is_dir():
            final = save_checkpoint(system, config, config.train.steps, sampler, tracker)
        after = evaluate(system, config, eval_split, tracker, "after", config.train.steps)
        log_replacements(system, tracker)  # a rollout worker replaced during the evaluation
        evaluations[config.train.steps] = after
        curves = plot_training_curves(history, evaluations, output_dir / "training_curves.png")
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


def restart_learners_and_rewind(
    system, config, exc, step, finished, sampler, ahead: deque, history: list, evaluations: dict
) -> int:
    """Restart the learner group from the newest verified checkpoint (`restart_learners`; none: the start
    model) and put the loop's state back to that checkpoint's step: the data sampler, the batches
    generated ahead (from the checkpoint), the step history, the evaluations after it and the
    trained-images log. Returns that step; the loop goes on after it."""
    from cluster.batches import SamplerState

    restored = restart_learners(system, config, step, exc, finished)
    folder, state = restored if restored else (None, {"step": 0, "sampler": vars(SamplerState())})
    back_to = rewind_loop(folder, state, sampler, ahead, config.train.output_dir)
    history[:] = [entry for entry in history if entry["step"] <= back_to]
    for later in [s for s in evaluations if s > back_to]:
        del evaluations[later]
    print(
        f"step {step}, phase {exc.phase}: a learner rank died; learners restarted from "
        f"{folder or 'the start model (no checkpoint yet)'}, going on at step {back_to + 1} "
        f"({max(0, finished - back_to)} finished step(s) redone)",
        flush=True,
    )
    return back_to


def rewind_loop(folder: Path | None, state: dict, sampler, ahead: deque, output_dir) -> int:
    """Put the loop's data back to a checkpoint's step (a resume, or the learners restarted): the sampler's
    position, the batches generated ahead (those the checkpoint holds; the others were generated with
    weights now lost, or after them) and the trained-images log. folder None: the start, step 0.
    Returns that step."""
    from cluster.batches import SamplerState

    sampler.state = SamplerState(**state["sampler"])
    ahead.clear()
    if folder is not None:
        ahead.extend(restore_generation(batch) for batch in checkpoints.read_in_flight(folder))
    checkpoints.forget_trained_images_after(output_dir, state["step"])
    return state["step"]


def tracking_from(tracker, config, system, back_to: int, finished: int):
    """The tracker to go on with after the learners went back to step `back_to`: the same MLflow run
    if it holds no later step (`finished` is the last it holds), else a new run carrying its history up
    to `back_to` (as a resume does, so each step shows once); the replacements are logged (again, in a
    new run)."""
    from cluster.tracking import Tracker

    if finished > back_to:
        tracker = Tracker(config, resume=(tracker.run_id, back_to))
        system.logged_replacements = 0
    log_replacements(system, tracker)
    return tracker


def grpo_step(system, config, generation: Generation, prompt: str, tracker, learner_busy: deque) -> dict:
    """GRPO step number generation.step (from 1): wait for its batch -> reward -> advantages -> update ->
    push weights -> log. learner_busy: the (start, end) wall times of recent training phases, this one's
    added, for the overlap metric."""
    import torch

    from learner.grpo import group_advantages

    step = generation.step
    timer = PhaseTimer()
    with timer("generate_wait"):
        oldest = system.policy_version - config.train.max_staleness
        rollouts = collect_generation(system, config, generation, oldest_version=oldest)
    ids = [row["id"] for row in generation.rows]
    versions = sampled_versions(rollouts)
    staleness = [system.policy_version - version for version in versions]
    generating = sorted({rollout.generated_between for rollout in rollouts})
    # Seconds of this batch's generation during which the learners were training (an earlier batch).
    overlap = overlap_seconds(generating, list(learner_busy))
    with timer("reward"):
        texts = [[c.text for c in rollout.completions] for rollout in rollouts]
        rewards = score(system, config, ids, texts, step)
    advantages = group_advantages(torch.tensor(rewards.total), config.learner.advantage)
    # Colocated, the engines sleep for the update and wake for the push and the next batch.
    learner_metrics = update_and_push(
        system, config, generation.images, prompt, rollouts, advantages, step, phase=timer
    )
    learner_busy.append(timer.last_span["train"])

    num_completions = sum(len(r.completions) for r in rollouts)
    num_tokens = sum(len(c.token_ids) for r in rollouts for c in r.completions)
    # The generation's own time on the rollout workers, from the first shard's start to the last's end.
    generate_s = max(end for _, end in generating) - min(start for start, _ in generating)
    metrics = {
        **rewards.metrics(),
        **{
            key if "/" in key else f"learner/{key}": value
            for key, value in learner_metrics.items()
            if not key.endswith("_seconds")
        },
        # Inside the learners' "train" phase: old/reference log-probs, then the mu updates.
        "time/logprob_s": learner_metrics["logprob_seconds"],
        "time/update_s": learner_metrics["update_seconds"],
        "advantage/mean": float(advantages.mean()),
        "advantage/std": float(advantages.std()),
        "advantage/abs_max": float(advantages.abs().max()),
        "response/length_mean": num_tokens / max(1, num_completions),
        "response/truncated_rate": sum(c.truncated for r in rollouts for c in r.completions)
        / max(1, num_completions),
        "perf/rollout_tokens_per_s": num_tokens / max(generate_s, 1e-9),
        **{f"time/{phase}_s": seconds for phase, seconds in timer.seconds.items()},
        "time/generate_s": generate_s,
        "time/overlap_s": overlap,
        "time/step_s": sum(timer.seconds.values()),
        "async/staleness_mean": sum(staleness) / len(staleness),
        "async/staleness_max": max(staleness),
        "events/rollout_worker_restarts": system.rollout_restarts,
        "events/reward_restarts": system.restarts.get("reward actor", 0),
        "events/learner_restarts": system.restarts.get("learner group", 0),
        "events/steps_redone": sum(event["steps_redone"] for event in system.replacements),
        "events/regenerated_batches": system.regenerated_batches,
    }
    if config.train.verify_weight_sync:
        metrics["sync/max_abs_logprob_diff"] = weight_sync_gap(
            system, config, generation.images[0], prompt, step
        )
    tracker.log_metrics(metrics, step=step)
    log_replacements(system, tracker)
    checkpoints.log_trained_images(config.train.output_dir, step, ids, versions)
    if (step - 1) % config.tracking.sample_table_every == 0:
        tracker.log_table(sample_rows(step, ids, rollouts, rewards), f"samples/step-{step:06d}.json")
    return metrics


def log_replacements(system, tracker) -> None:
    """Each replacement not logged yet as the MLflow tag `events.replacement.<n>` (its step, phase, role,
    actor, restart, steps redone and cause, as JSON; a rollout worker's with its index and seed, and
    that seed as `rollout.worker_<i>.seed`)."""

    for number, event in enumerate(system.replacements, start=1):
        if number <= system.logged_replacements:
            continue
        tags = {f"events.replacement.{number}": json.dumps(event, sort_keys=True)}
        if "worker" in event:
            tags[f"rollout.worker_{event['worker']}.seed"] = str(event["seed"])
        tracker.set_tags(tags)
    system.logged_replacements = len(system.replacements)


def record_engine_extensions(system, config, tracker, step: int) -> None:
    """Where each rollout worker's vLLM workers run the weight-sync extension from: the MLflow tag
    `rollout.worker_<i>.engine` (JSON: the worker's process id, and per vLLM worker the extension's file,
    process id and the weight version it holds) and a line of train.log each. The multiprocess engine's
    workers are processes of vLLM's that import the project themselves, under `ray job submit
    --working-dir` from the job's copy. Asked at start-up and after the last push; a worker that does
    not answer is left to the next call that needs it (which replaces it)."""
    refs = [worker.engine_report.remote() for worker in system.rollout_workers]
    try:
        reports = wait(refs, config, "engine report", step, "rollout workers")
    except RemoteCallError as exc:
        log.warning("the rollout workers' engine report is skipped: %s", exc)
        return
    for index, report in enumerate(reports):
        log.info(
            "step %d: rollout worker %d (pid %d), its vLLM worker(s): %s",
            step,
            index,
            report["worker_pid"],
            report["engine"],
        )
    tracker.set_tags(
        {
            f"rollout.worker_{index}.engine": json.dumps(report, sort_keys=True)
            for index, report in enumerate(reports)
        }
    )


def overlap_seconds(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> float:
    """Seconds covered both by some interval of `first` and by some interval of `second` ((start, end)
    pairs; overlapping intervals within a list count once)."""

    def merged(intervals):
        out: list[list[float]] = []
        for start, end in sorted(intervals):
            if out and start <= out[-1][1]:
                out[-1][1] = max(out[-1][1], end)
            else:
                out.append([start, end])
        return out

    return sum(
        max(0.0, min(a_end, b_end) - max(a_start, b_start))
        for a_start, a_end in merged(first)
        for b_start, b_end in merged(second)
    )


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


def time_left(step_seconds: Sequence[float], steps_left: int) -> float:
    """Seconds the `steps_left` steps still to come take at the median step time so far (robust to the
    slow first step)."""
    return statistics.median(step_seconds) * steps_left if step_seconds and steps_left > 0 else 0.0


def format_duration(seconds: float) -> str:
    """45s, 3m12s, 1h05m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def step_line(step: int, steps: int, metrics: dict, step_seconds: Sequence[float] = ()) -> str:
    """The console line of a step; with the wall times of the steps so far, the time left ("eta")."""
    eta = (
        f" | eta {format_duration(time_left(step_seconds, steps - step))}"
        if step_seconds and step < steps
        else ""
    )
    return (
        f"step {step}/{steps} | reward {metrics['reward/total_mean']:.3f} "
        f"(fidelity {metrics['reward/fidelity_mean']:.3f}, format {metrics['reward/format_mean']:.2f}) | "
        f"parse fail {metrics['reward/parse_failure_rate']:.2f} | spread {metrics['score/spread_within_image']:.2f} | "
        f"batch srcc {metrics['score/batch_srcc']:+.2f} | "
        f"kl {metrics['learner/kl']:.4f} | loss {metrics['learner/loss']:+.4f} | "
        f"gen {metrics['time/generate_s']:.1f}s (waited {metrics['time/generate_wait_s']:.1f}s) "
        f"train {metrics['time/train_s']:.1f}s push {metrics['time/weight_push_s']:.2f}s | "
        f"stale {metrics['async/staleness_mean']:.1f} is-ess {metrics.get('offpolicy/ess', 1.0):.2f} | "
        f"{metrics['perf/rollout_tokens_per_s']:.0f} tok/s{eta}"
    )


def print_summary(before: dict | None, after: dict, checkpoint: Path, tracker) -> None:
    print(f"\n{'held-out evaluation':<32}{'before':>8}{'after':>11}")

    def cell(metrics: dict | None, key: str) -> str:
        # "-": not measured, or nothing to measure it on (e.g. no image with two parsed scores).
        value = (metrics or {}).get(key)
        return f"{value:.3f}" if value is not None and math.isfinite(value) else "   -"

    for key in SUMMARY_KEYS:
        print(f"  {key:<30}{cell(before, key):>8}{cell(after, key):>11}")
    print(
        "  (*_expected: the mean of each sample's expected score, its leading digit's sampling noise removed;\n"
        "   the sampled srcc can see the policy's ranking only once spread_across_images_expected is not\n"
        "   small against spread_within_image / sqrt(samples per image); *within_reference: the mean SRCC\n"
        "   among each reference photo's distorted versions, the photo's content offset taken out)"
    )
    print(f"policy checkpoint (Hugging Face format): {checkpoint}\n{tracker.describe()}")


def add_train_arguments(parser) -> None:
    parser.add_argument("--config", default="cpu-default", help="a preset name in configs/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. learner.lr=1e-6")
    parser.set_defaults(handler=run_train)


def add_train_parser(subparsers) -> None:
    """`vqr1 train` (cluster/cli.py)."""
    add_train_arguments(subparsers.add_parser("train", help="GRPO training of a preset"))


def run_train(args) -> int:
    """Train the preset; a config or data error prints its one message and exits 2."""
    from configs.load import ConfigError, load_config
    from iqa.report import BadInputError

    try:
        config = load_config(args.config, args.overrides)
        result = run(config)
    except (ConfigError, BadInputError) as exc:  # the message names the key, or the file, row and reason
        print(exc, file=sys.stderr)
        return 2
    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cluster.train ARGS` is `vqr1 train ARGS` (for `ray job submit`, where the package may
    not be installed)."""
    import argparse

    apply_default_env()
    parser = argparse.ArgumentParser(prog="python -m cluster.train", description="GRPO training of a preset")
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
