"""`make bench` section "lora": the same cpu-default steps with full fine-tuning and with LoRA
(learner.lora, merged push, then adapter push), side by side: seconds per step, the learners' part and
the weight push, the learner's peak resident memory, and the bytes each push sends.

Times are medians over the steps after the warm-up one (as in bench.step); the learner's memory is the
largest `system/learner-0/rss_gib` of the run (its process's resident set, sampled every step). The push
bytes are counted from the model itself: what `LearnerWorker._pushed_weights` yields (the trainable
parameters: the whole model's, or the adapter's with push=adapter; or the merged layers of
`learner.lora.push_plan`), safetensors headers aside. The runs are made in this command, one after the
other, so the ratios compare like with like.

    python -m bench.lora [--steps N] [--json FILE]
    python -m bench.lora --generation [--rounds N]

--generation times vLLM's generation alone instead: cpu-default's rollout engine without LoRA and one
serving a rank-32 adapter (push=adapter, B drawn at random), both in this process, called in turn on the
same 4 images x 8 samples, so a change in the machine's load falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.step import bench_config
from cluster.tracking import metric_histories

# Rank 32 on the 7 projections of the small model's 4 layers: 0.62 M adapter parameters (of 4.9 M).
LORA = ("learner.lora.rank=32", "learner.lora.alpha=64", "learner.lr=2e-3")
LORA_ADAPTER = (*LORA, "learner.lora.push=adapter")
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
    lora = config.learner.lora
    if lora is not None:
        model = apply_lora(model, lora)
    if lora is None or lora.push == "adapter":
        pushed = [p for p in model.parameters() if p.requires_grad]
    else:
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
        "learner": "full" if config.learner.lora is None else f"lora {config.learner.lora.push}",
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
        f"{'learner':>12} {'step s':>7} {'train s':>7} {'push s':>7} {'learner RSS GiB':>15} {'push MB':>8} {'tensors':>7}"
    )
    for row in rows:
        print(
            f"{row['learner']:>12} {row['step_s']:>7.2f} {row['train_s']:>7.2f} {row['weight_push_s']:>7.3f} "
            f"{row['learner_peak_rss_gib']:>15.2f} {row['push_bytes'] / 1e6:>8.2f} {row['push_tensors']:>7}"
        )


def generation_cost(rounds: int) -> dict:
    """Milliseconds per generated token of the plain engine and of the adapter engine, interleaved."""
    import numpy as np
    import torch
    from PIL import Image

    from actor.rollout_engine import RolloutEngine
    from configs.load import load_config
    from learner.lora import adapter_tensor_name, is_adapter_parameter
    from learner.policy import apply_lora, load_policy_model
    from vlm.factory import resolve_model_path
    from vlm.weight_sync import serialize_buckets

    config = load_config("cpu-default", list(LORA_ADAPTER))
    path = resolve_model_path(config.model, config.data.models_cache_dir)
    lora = config.learner.lora
    engines = {
        "plain": RolloutEngine(path, config.model, config.rollout),
        "adapter": RolloutEngine(path, config.model, config.rollout, lora=lora),
    }
    policy = apply_lora(load_policy_model(path, config.model, torch.float32, trainable=True), lora)
    generator = torch.Generator().manual_seed(0)
    adapter = [(adapter_tensor_name(n), p) for n, p in policy.named_parameters() if is_adapter_parameter(n)]
    with torch.no_grad():
        for name, param in adapter:
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    engines["adapter"].update_weights(serialize_buckets(adapter))
    images = [
        Image.fromarray(np.random.default_rng(s).integers(0, 256, (84, 112, 3), dtype=np.uint8))
        for s in range(4)
    ]
    ms_per_token = {name: [] for name in engines}
    try:
        for engine in engines.values():
            engine.generate(images[:1], 2)  # warm-up
        for _ in range(rounds):
            for name, engine in engines.items():
                started = time.perf_counter()
                rollouts = engine.generate(images, 8)
                tokens = sum(len(c.token_ids) for rollout in rollouts for c in rollout.completions)
                ms_per_token[name].append(1000 * (time.perf_counter() - started) / tokens)
    finally:
        for engine in engines.values():
            engine.shutdown()
    ratios = [a / p for p, a in zip(ms_per_token["plain"], ms_per_token["adapter"], strict=True)]
    return {
        **{f"{name}_ms_per_token": statistics.median(ms) for name, ms in ms_per_token.items()},
        "adapter_over_plain": statistics.median(ratios),
        "rounds": rounds,
    }


def main(measured_steps: int = MEASURED_STEPS) -> list[dict]:
    rows = [measure(overrides, measured_steps) for overrides in ((), LORA, LORA_ADAPTER)]
    print_table(rows)
    return rows


if __name__ == "__main__":
    from configs.runtime_env import apply_default_env

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=MEASURED_STEPS, help="measured steps per run")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--generation", action="store_true", help="time generation, plain vs adapter engine")
    parser.add_argument("--rounds", type=int, default=8, help="--generation: calls per engine (medians)")
    args = parser.parse_args()
    apply_default_env()
    if args.generation:
        rows = generation_cost(args.rounds)
        print(
            f"cpu-default generation, 4 images x 8, medians of {args.rounds} interleaved calls: "
            f"{rows['plain_ms_per_token']:.3f} ms/token without LoRA, {rows['adapter_ms_per_token']:.3f} serving "
            f"a rank-32 adapter ({rows['adapter_over_plain']:.2f}x)"
        )
    else:
        rows = main(args.steps)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
