"""Held-out evaluation: in the training loop through the rollout workers (the current policy), and as
`vqr1 eval` / `make eval` for a checkpoint through one in-process vLLM engine.

Writes predictions CSV, metrics JSON and a scatter plot, and logs them to the MLflow run (`vqr1 eval`
writes the engine's and the libraries' output to eval.log beside them). Evaluations sample from a stream
of their own (`eval.seed`): image k of an evaluation gets the seeds eval.seed + k * eval.num_samples,
whichever call and worker score it, and the rollouts' stream is left where it was.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from cluster.system import RemoteCallError, is_dead_worker_error, replace_dead_rollout_workers, shard, wait

# The table printed after training (and the keys of an evaluation's result).
SUMMARY_KEYS = (
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
)


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


def image_scorer(config, generators: list[Callable], collect: Callable[[list], list]) -> Callable:
    """score_images for iqa.evaluate.run_evaluation: each call's images split over `generators`
    (generator(images, n, **decoding) -> rollouts, or a reference to them that `collect` resolves), with
    the evaluation's own seeds."""
    scored = 0  # images of this evaluation scored so far

    def score_images(images) -> list:
        nonlocal scored
        parts = shard(list(images), len(generators))
        starts, start = [], scored
        for part in parts:
            starts.append(start)
            start += len(part)
        scored = start
        results = [
            generate(
                part,
                config.eval.num_samples,
                temperature=config.eval.temperature,
                thinking=config.eval.thinking,
                stream_apart=config.eval.seed + first * config.eval.num_samples,
                digit_probs=True,
            )
            for generate, part, first in zip(generators, parts, starts, strict=True)
            if part
        ]
        return rollout_scores([rollout for rollouts in collect(results) for rollout in rollouts])

    return score_images


def evaluate_split(config, eval_split, score_images, out_dir: Path, tracker, prefix: str, step: int) -> dict:
    """run_evaluation with the config's decoding, logged to the tracker; returns the metrics over all
    images (srcc, plcc, ..., parse_failure_rate, srcc_within_reference, and the *_expected ones when the
    scorer read digit distributions)."""
    from iqa.evaluate import output_files, run_evaluation

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
        prefix=prefix,
        step=step,
    )
    tracker.log_evaluation(prefix, report, output_files(out_dir, prefix), step)
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


def evaluate(system, config, eval_split, tracker, label: str, step: int) -> dict:
    """Score the evaluation split with the rollout workers' current policy and log it as eval_<label>.
    A rollout worker that dies is replaced (`replace_dead_rollout_workers`) and the chunk scored again
    with the same seeds."""
    phase = f"evaluation ({label})"

    def on_worker(index: int) -> Callable:
        return lambda *args, **options: (index, args, options)  # sent by `collect`

    def collect(calls: list) -> list:
        while True:
            refs = [system.rollout_workers[i].generate.remote(*args, **options) for i, args, options in calls]
            try:
                return wait(refs, config, phase, step, "rollout workers")
            except RemoteCallError as exc:
                if not is_dead_worker_error(exc.__cause__):
                    raise
                replace_dead_rollout_workers(system, config, step, exc, phase)

    score_images = image_scorer(config, [on_worker(i) for i in range(len(system.rollout_workers))], collect)
    out_dir = Path(config.train.output_dir) / f"eval-{label}"
    return evaluate_split(config, eval_split, score_images, out_dir, tracker, f"eval_{label}", step)


def add_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint on a dataset split (SRCC, PLCC, ...)")
    parser.add_argument("--config", default="cpu-default", help="a preset name in configs/ or a YAML path")
    parser.add_argument("--out", default=None, help="output folder (default: <train.output_dir>/eval)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.path=/models/my-policy")
    parser.set_defaults(handler=run_eval_command)


def run_eval_command(args) -> int:
    from configs.load import ConfigError, load_config
    from configs.runtime_env import output_to_log, route_logs
    from iqa.report import BadInputError
    from iqa.splits import load_run_data

    try:
        config = load_config(args.config, args.overrides)
        _, eval_split, _ = load_run_data(config)
    except (ConfigError, BadInputError) as exc:
        print(exc, file=sys.stderr)
        return 2
    out_dir = Path(args.out or Path(config.train.output_dir) / "eval")
    # vLLM's start-up lines and the libraries' warnings go to this log; the console keeps the evaluation's.
    log_file = out_dir / "eval.log"
    route_logs(log_file)
    from actor.rollout_engine import RolloutEngine
    from cluster.tracking import Tracker
    from models.base_model import cold_start_for_run
    from vlm.factory import resolve_model_path

    with output_to_log(log_file):
        model_path = resolve_model_path(config.model, config.data.models_cache_dir)
    if config.model.cold_start is not None:  # the run's own cold start (models/base_model.py), as it trained
        model_path = cold_start_for_run(config, model_path)
    with output_to_log(log_file):
        engine = RolloutEngine(model_path, config.model, config.rollout)
        tracker = Tracker(
            config.model_copy(update={"tracking": config.tracking.model_copy(update={"run_name": "eval"})})
        )

    def generate(*positional, **options):
        with output_to_log(log_file):
            return engine.generate(*positional, **options)

    score_images = image_scorer(config, [generate], lambda results: results)
    metrics = evaluate_split(config, eval_split, score_images, out_dir, tracker, "eval", 0)
    tracker.finish()
    print(json.dumps(metrics, indent=2, default=str))
    print(f"model {model_path}\noutputs in {out_dir}\n{tracker.describe()}\nlibrary log: {log_file}")
    return 0
