"""`make bench` section "lora": the same cpu-default steps with full fine-tuning and with LoRA
(learner.lora, merged push), side by side: seconds per step, the learners' part and the weight push,
the learner's peak resident memory, and the bytes each push sends.

Times are medians over the steps after the warm-up one (as in bench.step); the learner's memory is the
largest `system/learner-0/rss_gib` of the run (its process's resident set, sampled every step). The push
bytes are counted from the model itself: what `LearnerWorker._pushed_weights` yields (the trainable
parameters, or the merged layers of `learner.lora.push_plan`), safetensors headers aside. Both runs are
made in this command, one after the other, so the ratios compare like with like.

    python -m bench.lora [--steps N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.step import bench_config
from cluster.tracking import metric_histories

# Rank 32 on the 7 projections of the small model's 4 layers: 0.62 M adapter parameters (of 4.9 M).
LORA = ("learner.lora.rank=32", "learner.lora.alpha=64", "learner.lr=2e-3")
WARMUP_STEPS = 1
MEASURED_STEPS = 5
LEARNER_RSS = "system/learner-0/rss_gib"
METRICS = ("time/step_s", "time/train_s", "time/weight_push_s", LEARNER_RSS)


def push_bytes(config) -> tuple[int, int]:
    """(bytes, tensors) of one weight push of `config`'s learner."""
    import torch

    from learner.lora import push_plan
    from learner.policy import apply_lora, load_policy_model
    from vlm.factory import resolve_model_path

    path = resolve_model_path(config.model, config.data.models_cache_dir)
    model = load_policy_model(path, config.model, torch.float32, trainable=True)
    if config.learner.lora is None:
        pushed = [p for p in model.parameters() if p.requires_grad]
    else:
        model = apply_lora(model, config.learner.lora)
        params = dict(model.named_parameters())
        pushed = [params[item.base] for item in push_plan(list(params))]
    return sum(p.numel() * p.element_size() for p in pushed), len(pushed)


def measure(overrides: tuple, measured_steps: int = MEASURED_STEPS) -> dict:
    from cluster.train import run

    with tempfile.TemporaryDirectory(prefix="vqr1-bench-lora-") as workdir:
        config = bench_config(Path(workdir), WARMUP_STEPS + measured_steps, overrides)
        result = run(config)
        histories = metric_histories(config.tracking.tracking_uri, result["mlflow_run_id"], METRICS)
    measured = [m.step for m in histories["time/step_s"] if m.step > WARMUP_STEPS]

    def median(name: str) -> float:
        by_step = {m.step: m.value for m in histories[name]}
        return statistics.median(by_step[step] for step in measured)

    nbytes, tensors = push_bytes(config)
    return {
        "learner": "lora" if config.learner.lora is not None else "full",
        "steps_measured": len(measured),
        "step_s": median("time/step_s"),
        "train_s": median("time/train_s"),
        "weight_push_s": median("time/weight_push_s"),
        "learner_peak_rss_gib": max(m.value for m in histories[LEARNER_RSS]),
        "push_bytes": nbytes,
        "push_tensors": tensors,
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"\ncpu-default, full fine-tuning against LoRA ({' '.join(LORA)}); medians over {rows[0]['steps_measured']} steps"
    )
    print(
        f"{'learner':>7} {'step s':>7} {'train s':>7} {'push s':>7} {'learner RSS GiB':>15} {'push MB':>8} {'tensors':>7}"
    )
    for row in rows:
        print(
            f"{row['learner']:>7} {row['step_s']:>7.2f} {row['train_s']:>7.2f} {row['weight_push_s']:>7.3f} "
            f"{row['learner_peak_rss_gib']:>15.2f} {row['push_bytes'] / 1e6:>8.2f} {row['push_tensors']:>7}"
        )


def main(measured_steps: int = MEASURED_STEPS) -> list[dict]:
    rows = [measure((), measured_steps), measure(LORA, measured_steps)]
    print_table(rows)
    return rows


if __name__ == "__main__":
    from configs.runtime_env import apply_default_env

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=MEASURED_STEPS, help="measured steps per run")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    apply_default_env()
    rows = main(args.steps)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
