"""Our trainer's seconds per GRPO step and its phase breakdown (issue 6, items 2 and 3), and the
shared-prompt forward's gain over running each completion's prompt on its own.

Runs `cluster.train.run` on the cpu-default preset for a few steps (evaluation cut to a few images,
no mid-run checkpoints, MLflow in a throw-away sqlite store), then reads the per-phase times back
from the MLflow run it made. Figures are medians over the steps after the warm-up ones:

- step_s: the driver's sum of its phases (time/step_s): generate, reward, train (the learners' call)
  and weight_push; train is split further into logprob (reference / old log-probs) and update (the
  mu GRPO updates), as the learners time them;
- wall_s: the time between two consecutive steps' metric logs, i.e. everything the loop does in a
  step (batch loading, logging included); this is the figure compared with TRL's seconds per step;
- the weight push as a share of step_s.

`bench_config` is also the source of the settings the TRL side copies (bench/trl_step.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from cluster.tracking import metric_histories
from configs.load import load_config
from configs.schema import Config

PRESET = "cpu-default"
# Step 1 includes the engines' first-call compilation.
WARMUP_STEPS = 1
MEASURED_STEPS = 5
# A few held-out images: run() always evaluates before and after training, which is not the step.
EVAL_OVERRIDES = ("eval.max_images=4", "eval.num_samples=1", "eval.bootstrap=0")
# The driver's phases (their sum is time/step_s) and the parts of "train" the learners time themselves.
STEP_PHASES = ("generate", "reward", "train", "weight_push")
TRAIN_PARTS = ("logprob", "update")
METRICS = (
    "time/step_s",
    *(f"time/{phase}_s" for phase in STEP_PHASES + TRAIN_PARTS),
    "response/length_mean",
    "perf/rollout_tokens_per_s",
)


def bench_config(workdir: Path, steps: int = WARMUP_STEPS + MEASURED_STEPS, overrides: tuple = ()) -> Config:
    """cpu-default with `steps` training steps, every output under `workdir`, plus `overrides`."""
    return load_config(
        PRESET,
        [
            f"train.steps={steps}",
            f"train.output_dir={workdir / 'outputs'}",
            f"checkpoint.dir={workdir / 'checkpoints'}",
            "checkpoint.every=0",
            f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
            "tracking.experiment=bench-step",
            *EVAL_OVERRIDES,
            *overrides,
        ],
    )


def summarise_run(histories: dict[str, list], warmup_steps: int) -> dict:
    """Medians over the steps after `warmup_steps`, per phase and for the whole step."""
    step_metrics = histories["time/step_s"]
    measured = [m.step for m in step_metrics if m.step > warmup_steps]
    if not measured:
        raise ValueError(
            f"the run logged {len(step_metrics)} steps: none left after {warmup_steps} warm-up steps"
        )

    def values(name: str) -> list[float]:
        by_step = {m.step: m.value for m in histories[name]}
        return [by_step[step] for step in measured]

    # Metric timestamps are in ms; the first measured step's interval starts at the last warm-up step's log.
    stamps = {m.step: m.timestamp for m in step_metrics}
    wall = [(stamps[step] - stamps[step - 1]) / 1000 for step in measured]
    step_s = values("time/step_s")
    push_share = [push / step for push, step in zip(values("time/weight_push_s"), step_s, strict=True)]
    return {
        "steps_measured": len(measured),
        "wall_s": statistics.median(wall),
        "wall_s_min": min(wall),
        "wall_s_max": max(wall),
        "step_s": statistics.median(step_s),
        "phases_s": {phase: statistics.median(values(f"time/{phase}_s")) for phase in STEP_PHASES},
        "train_parts_s": {part: statistics.median(values(f"time/{part}_s")) for part in TRAIN_PARTS},
        "weight_push_share": statistics.median(push_share),
        "response_length_mean": statistics.mean(values("response/length_mean")),
        "rollout_tokens_per_s": statistics.median(values("perf/rollout_tokens_per_s")),
    }


def measure(
    overrides: tuple = (), warmup_steps: int = WARMUP_STEPS, measured_steps: int = MEASURED_STEPS
) -> dict:
    """Train for warmup_steps + measured_steps steps of cpu-default (+ overrides) and summarise the run."""
    from cluster.train import run

    with tempfile.TemporaryDirectory(prefix="vqr1-bench-step-") as workdir:
        config = bench_config(Path(workdir), warmup_steps + measured_steps, overrides)
        result = run(config)
        histories = metric_histories(config.tracking.tracking_uri, result["mlflow_run_id"], METRICS)
    return {
        "rollout_workers": config.rollout.num_workers,
        "learners": config.learner.num_workers,
        "images_per_step": config.train.images_per_step,
        "completions_per_step": config.train.images_per_step * config.rollout.num_generations,
        **summarise_run(histories, warmup_steps),
    }


def print_summary(summary: dict) -> None:
    print(
        f"\nOur trainer ({PRESET}, {summary['rollout_workers']} rollout worker(s), {summary['learners']} learner(s), "
        f"{summary['completions_per_step']} completions/step), median of {summary['steps_measured']} steps"
    )
    print(
        f"  wall per step    {summary['wall_s']:8.2f} s  (min {summary['wall_s_min']:.2f}, max {summary['wall_s_max']:.2f})"
    )
    print(f"  sum of phases    {summary['step_s']:8.2f} s")
    for phase, seconds in summary["phases_s"].items():
        print(f"  {phase:<16} {seconds:8.2f} s  {seconds / summary['step_s']:6.1%}")
    for part, seconds in summary["train_parts_s"].items():
        print(f"    train: {part:<8} {seconds:8.2f} s  {seconds / summary['step_s']:6.1%}")
    print(f"  weight push share of the step: {summary['weight_push_share']:.1%}")


# The baseline the shared-prompt forward (learner.share_prompt_forward, the default) is compared with.
PER_SEQUENCE = "learner.share_prompt_forward=false"


def main(overrides: tuple = ()) -> list[dict]:
    """The step as configured, then the same with every completion running its own prompt forward."""
    summary = measure(overrides)
    baseline = measure((*overrides, PER_SEQUENCE))
    print_summary(summary)
    print(f"\nBaseline: the same with {PER_SEQUENCE}")
    print_summary(baseline)
    print(
        f"\nShared prompt forward: train phase {baseline['phases_s']['train'] / summary['phases_s']['train']:.2f}x "
        f"faster, whole step (wall) {baseline['wall_s'] / summary['wall_s']:.2f}x"
    )
    return [summary | {"prompt_forward": "shared"}, baseline | {"prompt_forward": "per_sequence"}]


if __name__ == "__main__":
    from configs.runtime_env import apply_default_env

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides of the preset")
    parser.add_argument("--json", type=Path, help="also write the summary to this file")
    args = parser.parse_args()
    apply_default_env()
    rows = main(tuple(args.overrides))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
