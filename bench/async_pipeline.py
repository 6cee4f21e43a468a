"""`make bench` section "async": the same cpu-default steps at train.max_staleness 0 and 1, with the
rollout worker and the learner each pinned to a core of its own (cluster.<role>.cpu_affinity), as on a
cluster where each has its own devices.

Steps per minute come from the wall time between consecutive steps' metric logs (medians over the steps
after the warm-up, as in bench.step). The overlap share is the part of the generation time that ran
while the learners trained (time/overlap_s over time/generate_s). Both runs are made in this command,
one after the other, so the ratio compares like with like on whatever machine runs it.

    python -m bench.async_pipeline [--steps N] [--unpinned] [--json FILE]

--unpinned keeps cpu-default's own placement (the learner on 2 threads, nothing pinned): both sides then
compete for the same cores while they overlap.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.step import bench_config
from cluster.tracking import metric_histories

# One core each: Ray's logical CPUs match, so neither actor is scheduled beside the other's bundle.
PINNED = (
    "cluster.num_cpus=2",
    "cluster.rollout.num_cpus=1",
    "cluster.learner.num_cpus=1",
    "cluster.rollout.cpu_affinity=[0]",
    "cluster.learner.cpu_affinity=[1]",
)
WARMUP_STEPS = 2  # step 1 compiles; at k = 1 step 2 is the first whose batch was generated ahead
MEASURED_STEPS = 8
METRICS = (
    "time/step_s",
    "time/generate_s",
    "time/generate_wait_s",
    "time/train_s",
    "time/weight_push_s",
    "time/overlap_s",
    "async/staleness_mean",
    "offpolicy/is_weight_mean",
    "offpolicy/is_weight_max",
    "offpolicy/truncated_fraction",
    "offpolicy/ess",
    "offpolicy/behaviour_logprob_gap",
    "reward/total_mean",
)


def summarise(histories: dict[str, list], warmup_steps: int) -> dict:
    """Medians over the steps after `warmup_steps`; steps per minute from the wall time between logs."""
    stamps = {m.step: m.timestamp / 1000 for m in histories["time/step_s"]}
    measured = sorted(step for step in stamps if step > warmup_steps)
    if not measured:
        raise ValueError(f"no steps logged after the {warmup_steps} warm-up steps")
    wall = [stamps[step] - stamps[step - 1] for step in measured]

    def values(name: str) -> list[float]:
        by_step = {m.step: m.value for m in histories[name]}
        return [by_step[step] for step in measured]

    generate, overlap = sum(values("time/generate_s")), sum(values("time/overlap_s"))
    return {
        "steps_measured": len(measured),
        "wall_s": statistics.median(wall),
        "steps_per_minute": 60 / statistics.median(wall),
        "overlap_share": overlap / generate if generate > 0 else 0.0,
        **{name: statistics.median(values(name)) for name in METRICS if name != "time/step_s"},
    }


def measure(max_staleness: int, measured_steps: int = MEASURED_STEPS, pinned: bool = True) -> dict:
    from cluster.train import run

    with tempfile.TemporaryDirectory(prefix="vqr1-bench-async-") as workdir:
        config = bench_config(
            Path(workdir),
            WARMUP_STEPS + measured_steps,
            (*(PINNED if pinned else ()), f"train.max_staleness={max_staleness}"),
        )
        result = run(config)
        histories = metric_histories(config.tracking.tracking_uri, result["mlflow_run_id"], METRICS)
    return {"max_staleness": max_staleness, "pinned": pinned, **summarise(histories, WARMUP_STEPS)}


def print_table(rows: list[dict]) -> None:
    placement = "rollout worker on core 0 and learner on core 1" if rows[0]["pinned"] else "unpinned"
    print(
        f"\ncpu-default, {placement}; medians over {rows[0]['steps_measured']} steps after "
        f"{WARMUP_STEPS} warm-up steps"
    )
    print(
        f"{'k':>2} {'steps/min':>9} {'wall s':>7} {'gen s':>6} {'waited s':>8} {'train s':>7} {'push s':>6} "
        f"{'overlap':>7} {'stale':>5} {'IS mean':>7} {'IS max':>6} {'trunc':>6} {'ESS':>6} {'|gap|':>7}"
    )
    for row in rows:
        print(
            f"{row['max_staleness']:>2} {row['steps_per_minute']:>9.2f} {row['wall_s']:>7.2f} "
            f"{row['time/generate_s']:>6.2f} {row['time/generate_wait_s']:>8.2f} {row['time/train_s']:>7.2f} "
            f"{row['time/weight_push_s']:>6.2f} {row['overlap_share']:>7.1%} {row['async/staleness_mean']:>5.1f} "
            f"{row['offpolicy/is_weight_mean']:>7.4f} {row['offpolicy/is_weight_max']:>6.3f} "
            f"{row['offpolicy/truncated_fraction']:>6.4f} {row['offpolicy/ess']:>6.4f} "
            f"{row['offpolicy/behaviour_logprob_gap']:>7.4f}"
        )
    print(
        f"k = 1 over k = 0: {rows[1]['steps_per_minute'] / rows[0]['steps_per_minute']:.2f}x steps per minute"
    )


def main(measured_steps: int = MEASURED_STEPS, pinned: bool = True) -> list[dict]:
    rows = [measure(0, measured_steps, pinned), measure(1, measured_steps, pinned)]
    print_table(rows)
    return rows + [{"ratio": rows[1]["steps_per_minute"] / rows[0]["steps_per_minute"]}]


if __name__ == "__main__":
    from configs.runtime_env import apply_default_env

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=MEASURED_STEPS, help="measured steps per run")
    parser.add_argument("--unpinned", action="store_true", help="cpu-default's own placement, nothing pinned")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    apply_default_env()
    rows = main(args.steps, pinned=not args.unpinned)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
