"""What sets the optimizer's step size in a training run: gradient norms of steps whose batch had a
malformed completion against steps where every completion kept the format (issue 8).

Adam divides each update by the running root mean square of past gradients. When a few steps carry
gradients many times larger than the rest (here: a completion that breaks the `<think>/<answer>` format
earns a large negative format advantage on low-probability tokens), those steps set that denominator,
and every ordinary step, where only the fidelity reward speaks, moves the policy by a small fraction of
the learning rate. The table reads a finished run's MLflow history (the pre-clip `learner/grad_norm` and
`reward/format_mean` of every step) and shows, for a few `learner.grad_clip` values, how much of the
squared-gradient mass the malformed-format steps would carry and the ratio of the gradients' root mean
square to an ordinary step's median norm (1 = an ordinary step moves at the full learning rate).

    python -m research.gradient_scale --run-name exp-NAME [--tracking-uri sqlite:///mlflow.db]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from cluster.tracking import find_run, metric_histories

CLIPS = (1.0, 0.1, 0.05, 0.03, 0.02)


def gradient_scale_rows(
    grad_norm: np.ndarray, format_failed: np.ndarray, clips: Sequence[float] = CLIPS
) -> list[dict[str, float]]:
    """Per clip c (gradients scaled to norm <= c, as DeepSpeed's gradient_clipping does):
    failure_share = sum of squared clipped norms over steps with a malformed completion / over all steps,
    rms_over_ordinary = sqrt(mean squared clipped norm) / median norm of the well-formed steps,
    clipped = share of steps whose norm exceeds c."""
    grad_norm = np.asarray(grad_norm, dtype=float)
    format_failed = np.asarray(format_failed, dtype=bool)
    if grad_norm.shape != format_failed.shape or grad_norm.ndim != 1 or grad_norm.size == 0:
        raise ValueError("grad_norm and format_failed must be equally long, non-empty 1-d arrays")
    if format_failed.all():
        raise ValueError("every step had a malformed completion: no ordinary step to compare with")
    ordinary = float(np.median(grad_norm[~format_failed]))
    rows = []
    for clip in clips:
        clipped = np.minimum(grad_norm, clip)
        squares = clipped**2
        rows.append(
            {
                "clip": float(clip),
                "failure_share": float(squares[format_failed].sum() / squares.sum()),
                "rms_over_ordinary": float(np.sqrt(squares.mean()) / ordinary),
                "clipped": float((grad_norm > clip).mean()),
            }
        )
    return rows


def read_run(tracking_uri: str, run_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, pre-clip grad norm, format_mean) of the newest run named `run_name` in any experiment."""
    try:
        run_id = find_run(tracking_uri, run_name)
    except LookupError as exc:
        raise SystemExit(str(exc)) from None
    histories = metric_histories(tracking_uri, run_id, ("learner/grad_norm", "reward/format_mean"))
    missing = [key for key, history in histories.items() if not history]
    if missing:
        raise SystemExit(f"{tracking_uri}: run {run_name!r} ({run_id}) has no metric {missing}")
    grad, fmt = ({m.step: m.value for m in history} for history in histories.values())
    steps = np.array(sorted(set(grad) & set(fmt)))
    return steps, np.array([grad[s] for s in steps]), np.array([fmt[s] for s in steps])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-name", required=True, help="the run's tracking.run_name")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--clips", type=float, nargs="+", default=list(CLIPS))
    args = parser.parse_args(argv)

    steps, grad_norm, format_mean = read_run(args.tracking_uri, args.run_name)
    failed = format_mean < 1.0
    quantiles = (10, 50, 90, 99)
    print(f"{args.run_name}: {len(steps)} steps, {int(failed.sum())} with a malformed completion")
    print("| steps | n | grad norm p10 / p50 / p90 / p99 |\n|---|---|---|")
    for name, mask in (("every completion well-formed", ~failed), ("a malformed completion", failed)):
        if mask.any():
            values = " / ".join(f"{q:.4f}" for q in np.percentile(grad_norm[mask], quantiles))
            print(f"| {name} | {int(mask.sum())} | {values} |")
    print(
        "\n| grad_clip | malformed-format steps' share of squared gradient | RMS / ordinary median | steps clipped |"
    )
    print("|---|---|---|---|")
    for row in gradient_scale_rows(grad_norm, failed, args.clips):
        print(
            f"| {row['clip']:g} | {row['failure_share']:.3f} | {row['rms_over_ordinary']:.1f} | {row['clipped']:.2f} |"
        )


if __name__ == "__main__":
    main()
