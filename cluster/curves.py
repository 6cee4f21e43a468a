"""Training curves as one PNG: rewards, score spread within an image, KL, parse failures, the SRCC of
each training batch (smoothed) and held-out SRCC."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("reward", ["reward/total_mean", "reward/fidelity_mean", "reward/format_mean"]),
    ("score spread within an image", ["score/spread_within_image"]),
    ("KL to reference", ["learner/kl"]),
    ("parse failures", ["reward/parse_failure_rate"]),
    ("SRCC of the training batch", ["score/batch_srcc"]),
]
# Per-step values too noisy to read raw (16 images a step): drawn faint, with a moving average over
# this many steps on top.
SMOOTHED = {"score/batch_srcc": 20}


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` non-NaN values at each point (fewer at the start); NaN before any."""
    out, recent = [], []
    for value in values:
        if value == value:  # not NaN
            recent = (recent + [value])[-window:]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out


def plot_training_curves(history: list[dict], evaluations: dict[int, dict], path: str | Path) -> Path:
    """history: one metrics dict per step (with "step"); evaluations: step -> held-out metrics ("srcc",
    and "srcc_expected" where measured)."""
    fig, axes = plt.subplots(1, len(PANELS) + 1, figsize=(4 * (len(PANELS) + 1), 3.2))
    steps = [row["step"] for row in history]
    for ax, (title, keys) in zip(axes, PANELS, strict=False):
        for key in keys:
            values = [row.get(key, float("nan")) for row in history]
            if key in SMOOTHED:
                ax.plot(steps, values, alpha=0.3)
                values = moving_average(values, SMOOTHED[key])
            ax.plot(steps, values, label=key.split("/")[-1])
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    eval_ax = axes[-1]
    eval_steps = sorted(evaluations)
    for key, label in (("srcc", "sampled scores"), ("srcc_expected", "expected scores")):
        measured = [s for s in eval_steps if key in evaluations[s]]
        if measured:
            eval_ax.plot(measured, [evaluations[s][key] for s in measured], marker="o", label=label)
    eval_ax.legend(fontsize=7)
    eval_ax.set_title("held-out SRCC")
    eval_ax.set_xlabel("step")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
