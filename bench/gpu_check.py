"""The learner side on a CUDA machine: `python -m bench.gpu_check --out DIR` (see bench/README.md).

Per ZeRO stage (2 and 3), in a fresh process each (one NCCL group per process):
- the DeepSpeed learner joins an NCCL group and holds the policy on CUDA in bf16, vision tower frozen,
  gradient checkpointing on (the GPU presets' settings);
- its log-probs on CUDA in bf16 match a CPU fp32 forward of the same weights within bf16 tolerance;
- GRPO steps give a finite loss and grad norm and raise the log-prob of the completion with the
  positive advantage;
- the weight push gathers every trainable weight (ZeRO-3 partitions included), and they moved.
Then a learner step of the ~100 M "bench" preset in bf16, timed against fp32 in the same command.

Not exercised: the vLLM CUDA engine and the NCCL push into it (the check machine has no vLLM).
Writes gpu_check.json to --out and exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from configs.schema import LearnerConfig, ModelConfig
from learner.learner_actor import LearnerWorker, free_port
from learner.policy import PolicySample, load_policy_model, sequence_logprobs
from vlm.factory import build_checkpoint, load_processor
from vlm.prompts import build_prompt_text
from vlm.weight_sync import iterate_buckets

MIN_PIXELS, MAX_PIXELS = 3136, 12544
GPU_MODEL = ModelConfig(
    min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, freeze_vision=True, gradient_checkpointing=True
)
# bf16 keeps 8 bits of mantissa: per-token log-probs of a ~-6 magnitude move by a few hundredths.
BF16_LOGPROB_TOLERANCE = 0.25


def make_samples(
    processor, num_images: int, num_completions: int, length: int, seed: int
) -> list[PolicySample]:
    prompt = build_prompt_text(processor, thinking=True)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(num_images):
        pixels = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
        completions = [rng.integers(20, 500, length).tolist() for _ in range(num_completions)]
        samples.append(PolicySample(Image.fromarray(pixels), prompt, completions))
    return samples


def start_learner(checkpoint: Path, zero_stage: int, bf16: bool, num_sequences: int, lr: float) -> tuple:
    worker = LearnerWorker(rank=0, world_size=1)
    learner = LearnerConfig(
        lr=lr,
        lr_schedule="constant",
        beta=0.04,
        micro_batch_size=num_sequences,
        zero_stage=zero_stage,
        bf16=bf16,
        share_prompt_forward=False,  # GPU_MODEL checkpoints gradients, which drops the KV cache
    )
    info = worker.setup(
        checkpoint,
        GPU_MODEL,
        learner,
        train_batch_size=num_sequences,
        total_steps=10,
        master_addr="127.0.0.1",
        master_port=free_port("127.0.0.1"),
    )
    return worker, info


def train_step(worker, samples, advantages) -> dict:
    num_sequences = sum(len(s.completions) for s in samples)
    num_tokens = sum(len(c) for s in samples for c in s.completions)
    return worker.train_step(samples, advantages, 1, num_sequences, num_tokens)


def check_stage(zero_stage: int, cache: Path) -> dict:
    """The checks of one ZeRO stage (this process joins its own NCCL group)."""
    checkpoint = build_checkpoint("tiny", cache, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor = load_processor(checkpoint, MIN_PIXELS, MAX_PIXELS)
    samples = make_samples(processor, num_images=2, num_completions=2, length=6, seed=0)
    advantages = [[1.0, -1.0], [-1.0, 1.0]]
    worker, info = start_learner(checkpoint, zero_stage, bf16=True, num_sequences=4, lr=1e-3)

    cpu_model = load_policy_model(checkpoint, GPU_MODEL, torch.float32, trainable=False)
    with torch.no_grad():
        cpu_logp, cpu_mask = sequence_logprobs(cpu_model, processor, samples, micro_batch_size=4)
    cpu_rows = [row[m].tolist() for row, m in zip(cpu_logp, cpu_mask, strict=True)]
    gpu_rows = worker.logprobs(samples)
    logprob_gap = max(
        abs(a - b) for g, c in zip(gpu_rows, cpu_rows, strict=True) for a, b in zip(g, c, strict=True)
    )

    steps = [train_step(worker, samples, advantages) for _ in range(3)]
    after = worker.logprobs(samples)
    pushed = dict(iterate_buckets(worker.serialized_weights(1 << 20)))
    initial = load_file(str(checkpoint / "model.safetensors"))  # under the same checkpoint names
    trainable = sum(1 for p in worker.engine.module.parameters() if p.requires_grad)
    moved = sum(1 for name, t in pushed.items() if not torch.equal(t.float(), initial[name].float()))
    result = {
        "zero_stage": zero_stage,
        **info,
        "bf16_vs_cpu_fp32_max_abs_logprob_gap": logprob_gap,
        "losses": [s["loss"] for s in steps],
        "grad_norms": [s["grad_norm"] for s in steps],
        "positive_completion_logprob_before": sum(gpu_rows[0]),
        "positive_completion_logprob_after": sum(after[0]),
        "pushed_tensors": len(pushed),
        "trainable_tensors": trainable,
        "pushed_tensors_that_moved": moved,
        "pushed_all_finite": all(bool(torch.isfinite(t.float()).all()) for t in pushed.values()),
    }
    result["checks"] = {
        "nccl_on_cuda": info["backend"] == "nccl" and info["device"].startswith("cuda"),
        "logprobs_match_cpu_fp32": logprob_gap < BF16_LOGPROB_TOLERANCE,
        "finite_loss_and_grad_norm": all(
            math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in steps
        ),
        "positive_advantage_raises_logprob": sum(after[0]) > sum(gpu_rows[0]),
        "push_has_every_trainable_weight": len(pushed) == trainable and result["pushed_all_finite"],
        "pushed_weights_moved": moved > 0,
    }
    return result


def time_bench_step(bf16: bool, cache: Path, repeats: int = 3) -> dict:
    """Seconds of a learner step (8 images x 4 completions of 64 tokens) of the bench preset, ZeRO-2."""
    checkpoint = build_checkpoint("bench", cache, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor = load_processor(checkpoint, MIN_PIXELS, MAX_PIXELS)
    samples = make_samples(processor, num_images=8, num_completions=4, length=64, seed=1)
    advantages = [[1.0, -1.0, 0.5, -0.5]] * 8
    worker, info = start_learner(checkpoint, 2, bf16=bf16, num_sequences=32, lr=1e-5)
    train_step(worker, samples, advantages)  # warm-up: CUDA kernels, allocator
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        train_step(worker, samples, advantages)
    torch.cuda.synchronize()
    return {
        "bf16": bf16,
        "step_seconds": (time.perf_counter() - started) / repeats,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "trainable_parameters": info["trainable_parameters"],
    }


def run_child(task: str, cache: Path) -> dict:
    """Each task in its own process: one NCCL group, one DeepSpeed engine."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--task", task, "--cache", str(cache)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    sys.stderr.write(completed.stderr[-4000:])
    if completed.returncode != 0:
        return {"task": task, "error": completed.stderr[-2000:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--task", choices=["zero2", "zero3", "bench-bf16", "bench-fp32"], default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check runs on a GPU machine", file=sys.stderr)
        return 2
    cache = args.cache or Path(tempfile.mkdtemp(prefix="vqr1-gpu-"))
    if args.task:
        if args.task.startswith("zero"):
            result = check_stage(int(args.task[-1]), cache)
        else:
            result = time_bench_step(args.task == "bench-bf16", cache)
        print(json.dumps(result))
        return 0

    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "stages": [run_child(task, cache) for task in ("zero2", "zero3")],
        "bench_steps": [run_child(task, cache) for task in ("bench-fp32", "bench-bf16")],
    }
    steps = report["bench_steps"]
    if all("step_seconds" in s for s in steps):
        report["bf16_speedup_over_fp32"] = steps[0]["step_seconds"] / steps[1]["step_seconds"]
    failed = [
        f"{s.get('zero_stage', s.get('task'))}: {name}"
        for s in report["stages"]
        for name, ok in s.get("checks", {"ran": False}).items()
        if not ok
    ]
    report["failed"] = failed
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
