"""`vqr1 proof`: does RL to rank teach the model to rank? A preset trained with one or more seeds and/or
once with the MOS labels permuted in the reward (the control), each in its own process; then a table of
held-out SRCC / PLCC before and after for every run (of the sampled and of the expected scores), and
the mean and spread of the change.

`make proof` is one seeded run of the `proof` preset (~20 minutes on 2 cores), `make ablation` the
control alone, `make proof-all` seeds 0, 1, 2 and the control (~1 h 20 min), `make tint-check` the plan
on the `tint-check` preset (views tinted red > gray > blue, which the base model sees at once: a test of
the loop itself). A change counts as learning only when the seeds' mean gain clears both the spread of
the "before" evaluations (the same start model evaluated by every run: the evaluation's own noise) and
the control's gain.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Literal

# Reported where every run measured them: the *_expected ones need digit distributions from the scorer.
METRICS = ("srcc", "plcc", "srcc_expected", "plcc_expected")
Control = Literal["none", "also", "only"]


def run_plan(seeds: list[int], out_root: Path, control: Control) -> list[tuple[str, list[str]]]:
    """(run name, overrides) per run: one per seed (unless control is "only"), then the control with the
    first seed (unless control is "none"). The seed seeds the evaluations' samples too: the seeds'
    "before" (the same cold start, other draws) then measure the evaluation's noise."""
    runs = [] if control == "only" else [(f"seed-{seed}", seed, []) for seed in seeds]
    if control != "none":
        runs.append((f"control-seed-{seeds[0]}", seeds[0], ["reward.permute_labels=true"]))
    return [
        (
            name,
            [
                f"train.seed={seed}",
                f"rollout.seed={seed}",
                f"eval.seed={seed}",
                *extra,
                f"tracking.run_name=proof-{name}",
                f"train.output_dir={out_root / name}",
                f"checkpoint.dir={out_root / name / 'checkpoints'}",
            ],
        )
        for name, seed, extra in runs
    ]


def summarize(results: dict[str, dict]) -> dict:
    """Per-run before/after/change of each metric, and over the seeded (non-control) runs: the mean
    change, its standard deviation, and the standard deviation of "before" (the evaluation noise)."""
    metrics = [m for m in METRICS if all(m in r["before"] and m in r["after"] for r in results.values())]
    rows = {
        name: {
            metric: {
                "before": result["before"][metric],
                "after": result["after"][metric],
                "change": result["after"][metric] - result["before"][metric],
            }
            for metric in metrics
        }
        for name, result in results.items()
    }
    seeded = [name for name in rows if not name.startswith("control")]
    summary: dict = {"runs": rows, "metrics": metrics}
    for metric in metrics:
        changes = [rows[name][metric]["change"] for name in seeded]
        befores = [rows[name][metric]["before"] for name in seeded]
        summary[metric] = {
            "mean_change": statistics.fmean(changes) if changes else float("nan"),
            "sd_change": statistics.stdev(changes) if len(changes) > 1 else float("nan"),
            "sd_before": statistics.stdev(befores) if len(befores) > 1 else float("nan"),
            "control_change": next(
                (rows[name][metric]["change"] for name in rows if name.startswith("control")), float("nan")
            ),
        }
    return summary


def format_table(summary: dict) -> str:
    metrics = summary["metrics"]
    header = [
        f"{m.upper()} {k}" if k != "change" else "change"
        for m in metrics
        for k in ("before", "after", "change")
    ]
    lines = ["| run | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for name, row in summary["runs"].items():
        cells = [
            f"{row[m][k]:+.3f}" if k == "change" else f"{row[m][k]:.3f}"
            for m in metrics
            for k in ("before", "after", "change")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for metric in metrics:
        s = summary[metric]
        parts = []
        if not math.isnan(s["mean_change"]):
            parts.append(f"mean change over seeds {s['mean_change']:+.3f}")
        if not math.isnan(s["sd_change"]):  # two or more seeds
            parts[-1] += f" (sd {s['sd_change']:.3f})"
            parts.append(f"evaluation noise (sd of 'before') {s['sd_before']:.3f}")
        if not math.isnan(s["control_change"]):
            parts.append(f"control change {s['control_change']:+.3f}")
        lines.append(f"\n{metric.upper()}: " + "; ".join(parts))
    return "\n".join(lines)


def add_proof_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "proof",
        help="train a preset with several seeds and/or the permuted-label control; held-out gains table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="proof", help="a preset name in configs/ or a YAML path")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=None, help="default outputs/<preset>")
    parser.add_argument(
        "--control",
        choices=["none", "also", "only"],
        default="none",
        help="the permuted-label control run (with the first seed): none, also (after the seeds), or only",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    parser.set_defaults(handler=run_proof)


def run_proof(args) -> int:
    args.out = args.out or Path("outputs") / Path(args.config).stem
    results = {}
    for name, overrides in run_plan(args.seeds, args.out, args.control):
        print(f"=== {name}", flush=True)
        command = [
            sys.executable,
            "-m",
            "cluster.cli",
            "train",
            "--config",
            args.config,
            *overrides,
            *args.overrides,
        ]
        if subprocess.run(command).returncode != 0:
            print(f"run {name} failed: {' '.join(command)}", file=sys.stderr)
            return 1
        results[name] = json.loads((args.out / name / "result.json").read_text())

    summary = summarize(results)
    table = format_table(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "proof.json").write_text(json.dumps(summary, indent=2))
    (args.out / "proof.md").write_text(table + "\n")
    print(table)
    print(
        f"written: {args.out / 'proof.json'}, {args.out / 'proof.md'}; curves: {args.out}/*/training_curves.png"
    )
    return 0
