"""DeepSpeed config dicts for the GRPO learner: the trained policy and the frozen reference model.

One function serves Qwen2.5-VL-7B on 8 GPUs (ZeRO-3, bf16, NCCL) and the tiny model on the CPU (gloo).
The learner sets the gradient-accumulation boundary itself (one optimizer step per `engine.step()`
after all of a rank's micro-batches), so the batch sizes here only have to describe one step truthfully.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from configs.schema import LearnerConfig

ADAM_EPS = 1e-8
# DeepSpeed prints a progress line every `steps_per_print` steps; the driver logs metrics itself.
STEPS_PER_PRINT = 10**9


def micro_batches_per_step(learner: LearnerConfig, train_batch_size: int, world_size: int) -> tuple[int, int]:
    """(sequences per forward, forwards per rank per optimizer step) for a batch of train_batch_size sequences."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if train_batch_size < 1 or train_batch_size % world_size:
        raise ValueError(
            f"train_batch_size ({train_batch_size}) must be a positive multiple of world_size ({world_size}): "
            "every rank takes the same number of completions"
        )
    per_rank = train_batch_size // world_size
    micro = min(learner.micro_batch_size, per_rank)
    return micro, math.ceil(per_rank / micro)


def lr_factor(learner: LearnerConfig, total_steps: int) -> Callable[[int], float]:
    """lr multiplier for optimizer step k (0-based): linear warm-up to 1, then constant or linear decay.

    Warm-up step k trains at (k + 1) / warmup_steps of lr (no step at lr 0); the linear schedule reaches
    0 at optimizer step total_steps * num_iterations. DeepSpeed's WarmupLR / WarmupDecayLR cannot do
    this: they start at warmup_min_lr for at least two steps, so a run without warm-up would waste them.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = learner.warmup_steps
    optimizer_steps = total_steps * learner.num_iterations
    decay = learner.lr_schedule == "linear"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not decay:
            return 1.0
        return max(0.0, (optimizer_steps - step) / max(1, optimizer_steps - warmup))

    return factor


def lr_scheduler_factory(learner: LearnerConfig, total_steps: int) -> Callable:
    """`deepspeed.initialize(lr_scheduler=...)`: builds the schedule on DeepSpeed's optimizer.

    DeepSpeed steps it with every optimizer step and keeps its state in engine checkpoints.
    """
    factor = lr_factor(learner, total_steps)

    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    return build


def _zero_section(learner: LearnerConfig) -> dict:
    zero: dict = {"stage": learner.zero_stage}
    if learner.zero_stage >= 2:
        # Overlapping gradient reduction with the backward pass: the usual setting for multi-GPU runs.
        zero.update({"contiguous_gradients": True, "overlap_comm": True})
    if learner.zero_stage == 3:
        # save_checkpoint and the weight push need the full weights gathered onto rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if learner.offload_optimizer:
        if learner.zero_stage == 0:
            raise ValueError("learner.offload_optimizer needs learner.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return zero


def deepspeed_config(learner: LearnerConfig, train_batch_size: int, world_size: int) -> dict:
    """The DeepSpeed config of the trained policy.

    train_batch_size: completions (sequences) in one rollout batch, over all ranks.
    The LR schedule is not in it: pass `lr_scheduler_factory(learner, total_steps)` to deepspeed.initialize.
    """
    micro, accumulation = micro_batches_per_step(learner, train_batch_size, world_size)
    config: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": learner.grad_clip,
        "zero_optimization": _zero_section(learner),
        "bf16": {"enabled": learner.bf16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": learner.lr,
                "betas": list(learner.adam_betas),
                "eps": ADAM_EPS,
                "weight_decay": learner.weight_decay,
                # torch.optim.AdamW needs no JIT build (DeepSpeed's own Adam ops take ~50 s each to
                # compile on the CPU). With optimizer offload, DeepSpeedCPUAdam is far faster than
                # torch's on big models, so it is kept there (built once per TORCH_EXTENSIONS_DIR).
                "torch_adam": not learner.offload_optimizer,
            },
        },
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    return config


def reference_config(policy_config: dict) -> dict:
    """Config of the frozen reference model's inference-only engine (ZeRO-3: sharded like the policy)."""
    return {
        "train_micro_batch_size_per_gpu": policy_config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": policy_config["gradient_accumulation_steps"],
        "zero_optimization": {"stage": policy_config["zero_optimization"]["stage"]},
        "bf16": dict(policy_config["bf16"]),
        "steps_per_print": STEPS_PER_PRINT,
    }


class _Zero3Loading:
    """What transformers' DeepSpeed hook reads while a model loads: the config and that it is ZeRO-3
    (HfDeepSpeedConfig would do as well, through accelerate, which came in later with peft)."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def is_zero3(self) -> bool:
        return True


@contextlib.contextmanager
def partitioned_loading(config: dict) -> Iterator[None]:
    """Inside, transformers' `from_pretrained` builds the model under `deepspeed.zero.Init(config)` and
    loads the checkpoint into the partitions: a rank never holds more than its share of the weights
    (the checkpoint itself is memory-mapped, shared by the node's ranks through the page cache).

    `config` must be a ZeRO-3 config; the process group must exist. The hook is removed on exit, so
    models loaded later in the process (a CPU reference) load whole.
    """
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    if config.get("zero_optimization", {}).get("stage") != 3:
        raise ValueError("partitioned loading needs a ZeRO-3 DeepSpeed config")
    hook = _Zero3Loading(config)  # transformers keeps only a weak reference: hold it for the block
    set_hf_deepspeed_config(hook)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
