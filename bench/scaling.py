"""Step time against rollout workers and learners: a model fit from measured phases (issue 6, item 4).

At train.max_staleness = 0 the driver runs the phases of a step one after another, so a step is their sum:

    T0(R, L) = generate(R) + reward + learner(L) + weight_push + driver

At k >= 1 the next batch generates while the current one is rewarded and trained, and the push waits for
it (a worker loads weights between generations), so

    T1(R, L) = max(generate(R), reward + learner(L)) + weight_push + driver

- generate(R) = g0 + g1 * ceil(B / R): the batch of B images is cut into R shards that run in parallel
  (each worker on cores of its own), so the largest shard sets the time; g0 is the fixed cost of one
  generate call (on a small model mostly per-decode-step overhead, paid max_new_tokens times whatever the
  batch), g1 the cost of one more image with its G completions.
- learner(L) = u0 + u1 * ceil(B * G / L) + allreduce(L): each rank takes B * G / L completions (reference
  and policy forwards, backward, optimizer step); allreduce(L) = 2 (L - 1) / L * gradient bytes / bandwidth
  is ZeRO's gradient exchange, which this machine cannot measure (an input, `allreduce_bytes_per_s`).
- reward, weight_push and the driver's own time (the wall step minus the sum of the phases) are taken
  as constants: the reward is one vectorised call on the whole batch, and every rollout worker loads the
  pushed weights at the same time from the node's shared object store.

g0, g1, u0, u1 come from two runs with one rollout worker and one learner at B and B / 2 images per step.
The model is then checked against a run with two rollout workers at B images (one core each for the
two workers while the learner idles; the placement declares 3 logical CPUs so each actor keeps one
thread). What two cores cannot show: more than two workers computing at once, rollout and learner
phases overlapping, any network (pushes and ZeRO exchanges between nodes, NCCL), and GPU kernels,
where the per-call overhead g0 and the per-image cost g1 stand in a very different ratio.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Gradient exchange speed assumed for the paper table (fp32 gradients; gloo or a 10 Gb/s network).
DEFAULT_ALLREDUCE_BYTES_PER_S = 1e9
# Two rollout workers and one learner, one logical CPU each: Ray then gives every actor one thread.
TWO_WORKER_OVERRIDES = ("rollout.num_workers=2", "cluster.num_cpus=3")
SCALING_GRID = [(1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (1, 2), (2, 2), (4, 4), (8, 8), (16, 16)]


@dataclass(frozen=True)
class StepModel:
    """Step time as a function of rollout workers R, learners L and images per step B (G fixed)."""

    num_generations: int
    gen_fixed_s: float  # g0
    gen_per_image_s: float  # g1
    learner_fixed_s: float  # u0
    learner_per_completion_s: float  # u1
    reward_s: float
    weight_push_s: float
    driver_s: float
    gradient_bytes: int
    allreduce_bytes_per_s: float = DEFAULT_ALLREDUCE_BYTES_PER_S

    def predict(
        self, rollout_workers: int, learners: int, images_per_step: int, max_staleness: int = 0
    ) -> dict[str, float]:
        completions = images_per_step * self.num_generations
        allreduce = (
            2 * (learners - 1) / learners * self.gradient_bytes / self.allreduce_bytes_per_s
            if learners > 1
            else 0.0
        )
        phases = {
            "generate": self.gen_fixed_s
            + self.gen_per_image_s * math.ceil(images_per_step / rollout_workers),
            "reward": self.reward_s,
            "learner": self.learner_fixed_s
            + self.learner_per_completion_s * math.ceil(completions / learners)
            + allreduce,
            "weight_push": self.weight_push_s,
            "driver": self.driver_s,
        }
        if max_staleness == 0:
            return {**phases, "step": sum(phases.values())}
        overlapped = max(phases["generate"], phases["reward"] + phases["learner"])
        return {**phases, "step": overlapped + phases["weight_push"] + phases["driver"]}


def async_gain(generate_share: float, fixed_share: float) -> float:
    """Predicted steps-per-time gain of k = 1 over k = 0 for a synchronous step whose generation takes
    `generate_share` of it and whose weight push and driver work take `fixed_share` (the rest is reward
    and learner): T0 / T1 = 1 / (max(g, 1 - g - f) + f). A model, not a measurement."""
    if not (0 <= generate_share <= 1 and 0 <= fixed_share <= 1 - generate_share):
        raise ValueError(
            f"shares must lie in [0, 1] and add up to at most 1: {generate_share}, {fixed_share}"
        )
    return 1.0 / (max(generate_share, 1.0 - generate_share - fixed_share) + fixed_share)


def learner_seconds(summary: dict) -> float:
    """Everything in the step that is not generation, reward or weight push runs on the learners."""
    phases = summary["phases_s"]
    return summary["step_s"] - phases["generate"] - phases["reward"] - phases["weight_push"]


def line_through(small: tuple[float, float], large: tuple[float, float]) -> tuple[float, float]:
    """(fixed, per unit) of the line through two (work, seconds) points.

    A negative fixed part can only be noise in the two measurements: the cost is then taken as
    proportional to the work, through the larger point.
    """
    (x_small, t_small), (x_large, t_large) = small, large
    per_unit = (t_large - t_small) / (x_large - x_small)
    fixed = t_large - per_unit * x_large
    return (fixed, per_unit) if fixed >= 0 else (0.0, t_large / x_large)


def fit(full: dict, half: dict, num_generations: int, gradient_bytes: int) -> StepModel:
    """g0, g1, u0, u1 from one-worker runs at B and B / 2 images (bench.step summaries); constants from `full`."""
    images_full, images_half = full["images_per_step"], half["images_per_step"]
    if images_full == images_half:
        raise ValueError("the two runs need different images_per_step to separate fixed and per-image costs")
    gen_fixed, gen_per_image = line_through(
        (images_half, half["phases_s"]["generate"]), (images_full, full["phases_s"]["generate"])
    )
    learner_fixed, learner_per_completion = line_through(
        (half["completions_per_step"], learner_seconds(half)),
        (full["completions_per_step"], learner_seconds(full)),
    )
    return StepModel(
        num_generations=num_generations,
        gen_fixed_s=gen_fixed,
        gen_per_image_s=gen_per_image,
        learner_fixed_s=learner_fixed,
        learner_per_completion_s=learner_per_completion,
        reward_s=full["phases_s"]["reward"],
        weight_push_s=full["phases_s"]["weight_push"],
        driver_s=full["wall_s"] - full["step_s"],
        gradient_bytes=gradient_bytes,
    )


def check(model: StepModel, measured: dict) -> dict:
    """Predicted against measured generate and wall step time of a run (a bench.step summary)."""
    predicted = model.predict(measured["rollout_workers"], measured["learners"], measured["images_per_step"])
    return {
        "rollout_workers": measured["rollout_workers"],
        "learners": measured["learners"],
        "images_per_step": measured["images_per_step"],
        "generate_predicted_s": predicted["generate"],
        "generate_measured_s": measured["phases_s"]["generate"],
        "step_predicted_s": predicted["step"],
        "step_measured_s": measured["wall_s"],
        "step_error": predicted["step"] / measured["wall_s"] - 1,
    }


def paper_table(model: StepModel, images_per_step: int) -> list[dict]:
    """Predicted steps on the grid at k = 0, and the step at k = 1 (a model, not a measurement)."""
    base = model.predict(1, 1, images_per_step)["step"]
    rows = []
    for rollout_workers, learners in SCALING_GRID:
        predicted = model.predict(rollout_workers, learners, images_per_step)
        asynchronous = model.predict(rollout_workers, learners, images_per_step, max_staleness=1)["step"]
        rows.append(
            {
                "rollout_workers": rollout_workers,
                "learners": learners,
                **{f"{name}_s": seconds for name, seconds in predicted.items()},
                "speedup": base / predicted["step"],
                "step_async_s": asynchronous,
                "async_speedup": predicted["step"] / asynchronous,
            }
        )
    return rows


def gradient_bytes_of(config) -> int:
    """Gradient bytes to exchange: the checkpoint's weight bytes (cpu-default trains every weight, in fp32)."""
    from pathlib import Path

    from vlm.factory import resolve_model_path

    folder = resolve_model_path(config.model, Path(config.data.cache_dir) / "models")
    return sum(file.stat().st_size for file in folder.glob("*.safetensors"))


def measure(full: dict | None = None) -> dict:
    """The two extra runs (B / 2 images; two rollout workers), the fit and its check; `full` is bench.step's run."""
    import tempfile
    from pathlib import Path

    from bench import step

    with tempfile.TemporaryDirectory(prefix="vqr1-bench-scaling-") as workdir:
        config = step.bench_config(Path(workdir))
    full = full if full is not None else step.measure()
    half = step.measure((f"train.images_per_step={config.train.images_per_step // 2}",))
    step.print_summary(half)
    two_workers = step.measure(TWO_WORKER_OVERRIDES)
    step.print_summary(two_workers)
    model = fit(full, half, config.rollout.num_generations, gradient_bytes_of(config))
    return {
        "model": asdict(model),
        "runs": {"one_worker": full, "one_worker_half_batch": half, "two_workers": two_workers},
        "checks": [check(model, run) for run in (full, half, two_workers)],
        "paper": paper_table(model, config.train.images_per_step),
    }


def print_summary(result: dict) -> None:
    model = result["model"]
    print(
        "\nStep-time model: generate = {gen_fixed_s:.2f} + {gen_per_image_s:.3f} s/image x ceil(B/R); "
        "learner = {learner_fixed_s:.2f} + {learner_per_completion_s:.4f} s/completion x ceil(B*G/L); "
        "reward {reward_s:.3f} s, push {weight_push_s:.3f} s, driver {driver_s:.2f} s".format(**model)
    )
    print(
        f"{'R':>3} {'L':>3} {'B':>4} {'gen pred':>9} {'gen meas':>9} {'step pred':>10} {'step meas':>10} {'error':>7}"
    )
    for row in result["checks"]:
        print(
            f"{row['rollout_workers']:>3} {row['learners']:>3} {row['images_per_step']:>4} "
            f"{row['generate_predicted_s']:>9.2f} {row['generate_measured_s']:>9.2f} "
            f"{row['step_predicted_s']:>10.2f} {row['step_measured_s']:>10.2f} {row['step_error']:>+7.1%}"
        )
    print(f"\nOn paper (same B, G; allreduce at {model['allreduce_bytes_per_s'] / 1e9:g} GB/s):")
    print(
        f"{'R':>3} {'L':>3} {'generate':>9} {'learner':>8} {'step':>7} {'speed-up':>9} {'step k=1':>9} {'k=1 gain':>9}"
    )
    for row in result["paper"]:
        print(
            f"{row['rollout_workers']:>3} {row['learners']:>3} {row['generate_s']:>9.2f} {row['learner_s']:>8.2f} "
            f"{row['step_s']:>7.2f} {row['speedup']:>8.2f}x {row['step_async_s']:>9.2f} {row['async_speedup']:>8.2f}x"
        )


def main() -> list[dict]:
    result = measure()
    print_summary(result)
    return [result]


if __name__ == "__main__":
    from configs.runtime_env import apply_default_env

    apply_default_env()
    main()
