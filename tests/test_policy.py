"""Policy log-probs (learner.policy) and the DeepSpeed config, on a tiny Qwen2.5-VL built locally (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from configs.runtime_env import apply_default_env

apply_default_env()

from configs.schema import LearnerConfig, ModelConfig  # noqa: E402
from learner.deepspeed_config import (  # noqa: E402
    deepspeed_config,
    lr_scheduler_factory,
    micro_batches_per_step,
    reference_config,
)
from learner.grpo import grpo_loss  # noqa: E402
from learner.policy import (  # noqa: E402
    PolicySample,
    build_micro_batches,
    checkpoint_names,
    load_policy_model,
    sequence_logprobs,
    vision_tower,
)
from vlm.factory import build_checkpoint, load_processor  # noqa: E402
from vlm.prompts import build_prompt_text  # noqa: E402

MIN_PIXELS, MAX_PIXELS = 3136, 12544


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(
        "tiny", tmp_path_factory.mktemp("models"), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )


@pytest.fixture(scope="module")
def processor(checkpoint):
    return load_processor(checkpoint, MIN_PIXELS, MAX_PIXELS)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_policy_model(checkpoint, ModelConfig(), torch.float32, trainable=True)


def random_image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def samples(processor):
    prompt = build_prompt_text(processor, thinking=True)
    rng = np.random.default_rng(1)
    # Two image sizes (12 and 16 image tokens) and ragged completions: padding on both ends of a row.
    return [
        PolicySample(random_image(84, 112, 0), prompt, [rng.integers(20, 500, n).tolist() for n in (3, 7)]),
        PolicySample(
            random_image(112, 112, 1), prompt, [rng.integers(20, 500, n).tolist() for n in (5, 1, 4)]
        ),
    ]


def unbatched_logprobs(model, processor, sample: PolicySample, completion: list[int], temperature: float):
    """Independent reference: one unpadded sequence, full logits, log-softmax at each completion token."""
    encoded = processor(text=[sample.prompt], images=[sample.image], return_tensors="pt")
    prompt_length = encoded["input_ids"].shape[1]
    input_ids = torch.cat([encoded["input_ids"], torch.tensor([completion])], dim=1)
    mm_token_type_ids = torch.cat(
        [encoded["mm_token_type_ids"], torch.zeros((1, len(completion)), dtype=torch.long)], dim=1
    )
    logits = model(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=mm_token_type_ids,
        pixel_values=encoded["pixel_values"],
        image_grid_thw=encoded["image_grid_thw"],
    ).logits[0]
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    positions = torch.arange(prompt_length - 1, prompt_length - 1 + len(completion))
    return logp[positions, torch.tensor(completion)]


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize(("micro_batch_size", "temperature"), [(1, 1.0), (3, 1.0), (8, 0.7)])
def test_logprobs_equal_unbatched_per_sequence_computation(
    model, processor, samples, micro_batch_size, temperature, share_prompt
):
    # micro_batch_size 3 splits the second image's completions over two micro-batches; 8 puts both
    # prompt lengths in one.
    with torch.no_grad():
        logp, mask = sequence_logprobs(model, processor, samples, micro_batch_size, temperature, share_prompt)
        pairs = [(s, c) for s in samples for c in s.completions]
        assert logp.shape == mask.shape == (len(pairs), max(len(c) for _, c in pairs))
        for row, (sample, completion) in enumerate(pairs):
            expected = unbatched_logprobs(model, processor, sample, completion, temperature)
            assert mask[row].sum() == len(completion)
            assert not mask[row, len(completion) :].any()
            torch.testing.assert_close(logp[row, : len(completion)].double(), expected, atol=2e-5, rtol=1e-5)
            assert (logp[row, len(completion) :] == 0).all()


def test_micro_batches_keep_sequence_order_and_share_one_encoding_per_image(processor, samples):
    batches = build_micro_batches(processor, samples, micro_batch_size=2)
    assert [b.sequence_ids for b in batches] == [[0, 1], [2, 3], [4]]
    assert [b.completions for b in batches] == [
        samples[0].completions,
        samples[1].completions[:2],
        samples[1].completions[2:],
    ]
    # Sequences of one image reuse its processor output instead of re-decoding the image.
    assert batches[1].prompts[0] is batches[1].prompts[1] is batches[2].prompts[0]
    inputs = batches[1].model_inputs(pad_token_id=0)
    assert inputs["image_grid_thw"].shape == (2, 3)
    assert inputs["pixel_values"].shape[0] == 2 * batches[1].prompts[0].pixel_values.shape[0]


def test_sample_errors_are_clear(processor, samples):
    prompt = samples[0].prompt
    with pytest.raises(ValueError, match="completion 1 is empty"):
        build_micro_batches(processor, [PolicySample(samples[0].image, prompt, [[5], []])], 2)
    with pytest.raises(ValueError, match="no completions"):
        build_micro_batches(processor, [PolicySample(samples[0].image, prompt, [])], 2)


def test_frozen_vision_and_gradient_checkpointing_keep_the_language_gradients(
    checkpoint, processor, samples, model
):
    options = ModelConfig(freeze_vision=True, gradient_checkpointing=True)
    frozen = load_policy_model(checkpoint, options, torch.float32, trainable=True)
    assert frozen.is_gradient_checkpointing and frozen.training
    assert not any(p.requires_grad for p in vision_tower(frozen).parameters())
    vision_ids = {id(p) for p in vision_tower(frozen).parameters()}
    assert all(p.requires_grad for p in frozen.parameters() if id(p) not in vision_ids)

    def gradients(policy):
        policy.zero_grad(set_to_none=True)
        logp, mask = sequence_logprobs(policy, processor, samples, micro_batch_size=3)
        advantages = torch.linspace(-1.0, 1.0, logp.shape[0])
        loss, _ = grpo_loss(logp, logp.detach(), advantages, mask, beta=0.0)
        loss.backward()
        return {name: p.grad for name, p in policy.named_parameters()}

    plain, checkpointed = gradients(model), gradients(frozen)
    for name, grad in checkpointed.items():
        if name.startswith("model.visual."):
            assert grad is None, name
        else:
            torch.testing.assert_close(grad, plain[name], atol=1e-6, rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_shared_prompt_gradients_equal_the_per_sequence_forward(model, processor, samples):
    """Each image's prompt runs once for its completions: the gradient on every weight (vision tower
    included: this model trains it) is the per-sequence forward's, where the prompt runs G times."""

    def gradients(share_prompt: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        logp, mask = sequence_logprobs(model, processor, samples, 3, share_prompt=share_prompt)
        advantages = torch.linspace(-1.0, 1.0, logp.shape[0])
        loss, _ = grpo_loss(logp, logp.detach() + 0.1, advantages, mask, beta=0.0)
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    per_sequence, shared = gradients(False), gradients(True)
    model.zero_grad(set_to_none=True)
    assert set(shared) == set(per_sequence)
    assert any(name.startswith("model.visual.") for name in shared)
    for name, grad in shared.items():
        torch.testing.assert_close(grad, per_sequence[name], atol=1e-6, rtol=1e-4)


def test_shared_prompt_refuses_gradient_checkpointing(checkpoint, processor, samples):
    checkpointed = load_policy_model(
        checkpoint, ModelConfig(gradient_checkpointing=True), torch.float32, trainable=True
    )
    with pytest.raises(ValueError, match="gradient checkpointing"):
        sequence_logprobs(checkpointed, processor, samples, 3, share_prompt=True)


def test_checkpoint_names_are_the_saved_tensor_names(checkpoint, model):
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as saved:
        saved_names = set(saved.keys())
    names = checkpoint_names(model)
    assert set(names) == {name for name, _ in model.named_parameters()}
    assert set(names.values()) == saved_names
    assert names["model.visual.patch_embed.proj.weight"] == "visual.patch_embed.proj.weight"


# ----------------------------------------------------------------------------------- DeepSpeed config


def test_micro_batches_per_step_cover_the_rank_share():
    learner = LearnerConfig(micro_batch_size=4)
    assert micro_batches_per_step(learner, train_batch_size=48, world_size=8) == (4, 2)
    assert micro_batches_per_step(learner, train_batch_size=16, world_size=8) == (2, 1)
    with pytest.raises(ValueError, match="multiple of world_size"):
        micro_batches_per_step(learner, train_batch_size=50, world_size=8)


def test_zero3_bf16_config_for_a_7b_run_on_8_gpus():
    learner = LearnerConfig(
        num_workers=8, zero_stage=3, bf16=True, lr=1e-6, micro_batch_size=8, grad_clip=1.0
    )
    config = deepspeed_config(learner, train_batch_size=768, world_size=8)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["bf16"] == {"enabled": True}
    assert config["gradient_clipping"] == 1.0
    assert config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * 8 == 768
    assert config["optimizer"]["type"] == "AdamW" and config["optimizer"]["params"]["torch_adam"] is True
    assert config["optimizer"]["params"]["lr"] == 1e-6
    reference = reference_config(config)
    assert reference["zero_optimization"] == {"stage": 3} and reference["bf16"] == {"enabled": True}
    assert "optimizer" not in reference


def test_offload_uses_deepspeed_cpu_adam_and_needs_zero():
    config = deepspeed_config(LearnerConfig(offload_optimizer=True), 8, 1)
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["optimizer"]["params"]["torch_adam"] is False
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        deepspeed_config(LearnerConfig(offload_optimizer=True, zero_stage=0), 8, 1)


def lr_sequence(learner: LearnerConfig, total_steps: int, steps: int) -> list[float]:
    """The lr of each optimizer step with the scheduler DeepSpeed is given, on a torch AdamW."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=learner.lr)
    scheduler = lr_scheduler_factory(learner, total_steps)(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_linear_schedule_starts_at_full_lr_and_reaches_zero_after_all_optimizer_steps():
    learner = LearnerConfig(lr=1e-3, lr_schedule="linear", num_iterations=2)
    lrs = lr_sequence(learner, total_steps=5, steps=11)
    assert lrs[:10] == pytest.approx([1e-3 * (10 - k) / 10 for k in range(10)])
    assert lrs[10] == 0.0


def test_warmup_rises_to_lr_then_stays_constant():
    learner = LearnerConfig(lr=1e-3, lr_schedule="constant", warmup_steps=4)
    assert lr_sequence(learner, total_steps=10, steps=7) == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3]
    )


def test_warmup_then_linear_decay():
    learner = LearnerConfig(lr=1.0, lr_schedule="linear", warmup_steps=2)
    assert lr_sequence(learner, total_steps=6, steps=7) == pytest.approx(
        [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    )
