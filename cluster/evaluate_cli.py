"""`vqr1 eval` / `make eval`: score a dataset split with a checkpoint through the vLLM rollout engine.

Writes predictions CSV, metrics JSON and a scatter plot, and logs them to an MLflow run. Decoding
defaults (config `eval`): 4 samples per image at temperature 1.0 with thinking; the score of an image
is the mean of its parsed samples.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint on a dataset split (SRCC, PLCC, ...)")
    parser.add_argument("--config", default="cpu-default", help="a preset name in configs/ or a YAML path")
    parser.add_argument("--out", default=None, help="output folder (default: <train.output_dir>/eval)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.path=/models/my-policy")
    parser.set_defaults(handler=run_eval_command)


def run_eval_command(args) -> int:
    from actor.rollout_engine import RolloutEngine
    from cluster.tracking import Tracker
    from cluster.train import evaluate_split, load_data, rollout_scores
    from configs.load import load_config
    from learner.model_factory import resolve_start_model

    config = load_config(args.config, args.overrides)
    model_path = resolve_start_model(config)
    _, eval_split, _ = load_data(config)
    engine = RolloutEngine(model_path, config.model, config.rollout)

    scored = 0  # images scored so far: each image gets its own seeds, as in cluster.train.evaluate

    def score_images(images) -> list:
        nonlocal scored
        rollouts = engine.generate(
            images,
            config.eval.num_samples,
            temperature=config.eval.temperature,
            thinking=config.eval.thinking,
            stream_apart=config.eval.seed + scored * config.eval.num_samples,
            digit_probs=True,
        )
        scored += len(images)
        return rollout_scores(rollouts)

    tracker = Tracker(
        config.model_copy(update={"tracking": config.tracking.model_copy(update={"run_name": "eval"})})
    )
    out_dir = Path(args.out or Path(config.train.output_dir) / "eval")
    metrics = evaluate_split(config, eval_split, score_images, out_dir, tracker.run, "eval", 0)
    tracker.finish()
    print(json.dumps(metrics, indent=2, default=str))
    print(f"model {model_path}\noutputs in {out_dir}\n{tracker.describe()}")
    return 0
