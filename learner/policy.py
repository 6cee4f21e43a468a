"""Policy model code for the learner (no Ray; DeepSpeed only to load into ZeRO-3 partitions): per-token
log-probs of sampled completions.

A `PolicySample` is one image with its prompt text and the completions sampled for it. Each image is
decoded and run through the processor once; its G (or fewer, on a shard) sequences share that encoding
and only their micro-batch concatenates pixel values per sequence, as Qwen2.5-VL's forward expects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from configs.schema import LoraConfig, ModelConfig
from iqa.images import ImageInput, load_image
from learner.grpo import token_logprobs


@dataclass
class PolicySample:
    """One image, its prompt (from `vlm.prompts.build_prompt_text`) and its completions' token ids."""

    image: ImageInput
    prompt: str
    completions: list[list[int]]
    # Per completion, each token's log-prob under the policy that sampled it (the rollout engine's); the
    # importance weights of the off-policy correction need them.
    behaviour_logprobs: list[list[float]] | None = None


@dataclass
class EncodedPrompt:
    """The processor's output for one (prompt, image): image pads expanded, pixel patches, grid."""

    input_ids: torch.Tensor  # (L,)
    mm_token_type_ids: torch.Tensor  # (L,): 0 text, 1 image
    pixel_values: torch.Tensor  # (patches, C * T * P * P)
    image_grid_thw: torch.Tensor  # (1, 3)


@dataclass
class MicroBatch:
    """Sequences (prompt + completion) for one forward; tensors are built on demand by `model_inputs`."""

    prompts: list[EncodedPrompt]
    completions: list[list[int]]
    # Positions of these sequences in the flattened (sample, completion) order of the whole shard.
    sequence_ids: list[int]
    behaviour_logprobs: list[list[float]] | None = None

    def behaviour(self, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The behaviour log-probs as (B, width), zero past each completion (as the learner's logp)."""
        if self.behaviour_logprobs is None:
            raise ValueError("this micro-batch carries no behaviour log-probs")
        out = torch.zeros((len(self), width), dtype=torch.float32)
        for row, values in enumerate(self.behaviour_logprobs):
            out[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
        return out.to(device)

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def completion_lengths(self) -> torch.Tensor:
        return torch.tensor([len(c) for c in self.completions], dtype=torch.long)

    @property
    def prompt_lengths(self) -> torch.Tensor:
        return torch.tensor([p.input_ids.numel() for p in self.prompts], dtype=torch.long)

    def model_inputs(self, pad_token_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Right-padded input_ids / attention_mask / mm_token_type_ids plus per-sequence image tensors."""
        sequences = [
            torch.cat([p.input_ids, torch.tensor(c, dtype=p.input_ids.dtype)])
            for p, c in zip(self.prompts, self.completions, strict=True)
        ]
        lengths = [s.numel() for s in sequences]
        width = max(lengths)
        input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        mm_token_type_ids = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, (prompt, sequence) in enumerate(zip(self.prompts, sequences, strict=True)):
            input_ids[row, : sequence.numel()] = sequence
            attention_mask[row, : sequence.numel()] = 1
            mm_token_type_ids[row, : prompt.mm_token_type_ids.numel()] = prompt.mm_token_type_ids
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids,
            "pixel_values": torch.cat([p.pixel_values for p in self.prompts]),
            "image_grid_thw": torch.cat([p.image_grid_thw for p in self.prompts]),
        }
        return {name: tensor.to(device) for name, tensor in inputs.items()}


def encode_prompt(processor, sample: PolicySample) -> EncodedPrompt:
    """Run the processor once for the sample's image (the same min/max pixels as the rollout engine)."""
    encoded = processor(text=[sample.prompt], images=[load_image(sample.image)], return_tensors="pt")
    if "mm_token_type_ids" not in encoded:
        raise ValueError("the processor returned no mm_token_type_ids; Qwen2.5-VL's 3D positions need them")
    num_image_tokens = int((encoded["mm_token_type_ids"] == 1).sum())
    if num_image_tokens == 0:
        raise ValueError("the prompt has no image placeholder; build it with vlm.prompts.build_prompt_text")
    return EncodedPrompt(
        input_ids=encoded["input_ids"][0],
        mm_token_type_ids=encoded["mm_token_type_ids"][0],
        pixel_values=encoded["pixel_values"],
        image_grid_thw=encoded["image_grid_thw"],
    )


def build_micro_batches(
    processor, samples: Sequence[PolicySample], micro_batch_size: int
) -> list[MicroBatch]:
    """Flatten samples into (sample, completion) sequences in order and cut them into micro-batches."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    with_behaviour = {sample.behaviour_logprobs is not None for sample in samples}
    if len(with_behaviour) > 1:
        raise ValueError("some samples carry behaviour log-probs and others do not")
    flat: list[tuple[EncodedPrompt, list[int], list[float] | None]] = []
    for index, sample in enumerate(samples):
        if not sample.completions:
            raise ValueError(f"sample {index} has no completions")
        behaviour = sample.behaviour_logprobs or [None] * len(sample.completions)
        if len(behaviour) != len(sample.completions):
            raise ValueError(
                f"sample {index}: {len(behaviour)} behaviour log-prob lists for {len(sample.completions)} completions"
            )
        for number, (completion, logprobs) in enumerate(zip(sample.completions, behaviour, strict=True)):
            if len(completion) == 0:
                raise ValueError(f"sample {index}: completion {number} is empty")
            if logprobs is not None and len(logprobs) != len(completion):
                raise ValueError(
                    f"sample {index}: completion {number} has {len(completion)} tokens and "
                    f"{len(logprobs)} behaviour log-probs"
                )
        prompt = encode_prompt(processor, sample)
        flat.extend(
            (prompt, list(completion), logprobs)
            for completion, logprobs in zip(sample.completions, behaviour, strict=True)
        )
    batches = []
    for start in range(0, len(flat), micro_batch_size):
        part = flat[start : start + micro_batch_size]
        batches.append(
            MicroBatch(
                prompts=[prompt for prompt, _, _ in part],
                completions=[completion for _, completion, _ in part],
                sequence_ids=list(range(start, start + len(part))),
                behaviour_logprobs=None if with_behaviour == {False} else [list(b) for _, _, b in part],
            )
        )
    return batches


def completion_logprobs(
    model, batch: MicroBatch, pad_token_id: int, temperature: float = 1.0, share_prompt: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, mask), both (B, T) with T the longest completion: log pi(completion token | prefix).

    `model` is a Qwen2.5-VL / Qwen2-VL causal LM or a DeepSpeed engine wrapping one. Only the positions
    that predict completion tokens go through the LM head (the vocabulary projection is the largest
    activation). Gradients flow when called with grad enabled. share_prompt: run each image's prompt
    once for all its completions (`shared_prompt_logprobs`); the same values, less arithmetic.
    """
    if share_prompt:
        return shared_prompt_logprobs(model, batch, pad_token_id, temperature)
    device = next(iter(_module(model).parameters())).device
    inputs = batch.model_inputs(pad_token_id, device)
    prompt_lengths = batch.prompt_lengths.to(device)
    completion_lengths = batch.completion_lengths.to(device)
    width = inputs["input_ids"].shape[1]
    # Completion token j of row i sits at prompt_length_i + j and is predicted at the position before it.
    first_predicting = int(prompt_lengths.min()) - 1
    kept = width - first_predicting
    logits = model(**inputs, logits_to_keep=kept, use_cache=False).logits  # (B, kept, V)
    logits = tempered(logits, temperature)
    kept_logp = token_logprobs(
        logits[:, :-1], inputs["input_ids"][:, first_predicting + 1 :]
    )  # (B, kept - 1)
    steps = torch.arange(int(completion_lengths.max()), device=device)
    index = (prompt_lengths - 1 - first_predicting).unsqueeze(1) + steps.unsqueeze(0)
    mask = steps.unsqueeze(0) < completion_lengths.unsqueeze(1)
    logp = torch.gather(kept_logp, 1, index.clamp(max=kept_logp.shape[1] - 1)).masked_fill(~mask, 0.0)
    return logp, mask


def shared_prompt_logprobs(
    model, batch: MicroBatch, pad_token_id: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logprobs` with each distinct prompt (image + text) run once, not once per completion.

    The G completions of an image share its prompt, which is most of each sequence (the image tokens
    and the chat template): the prompts of one length are run together with a KV cache, the cache is
    expanded to their completions, and the completions run on it, so the gradient of the prompt's keys
    and values sums over every completion that attends to them, as in the per-sequence forward. Needs
    the model's KV cache, which transformers drops under gradient checkpointing (rejected here).
    """
    from transformers import DynamicCache

    hf_model = _hf_model(model)
    if getattr(hf_model, "is_gradient_checkpointing", False) and hf_model.training:
        raise ValueError("shared-prompt log-probs need the KV cache, which gradient checkpointing disables")
    device = next(iter(hf_model.parameters())).device
    width = int(batch.completion_lengths.max())
    completions = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    for row, completion in enumerate(batch.completions):
        completions[row, : len(completion)] = torch.tensor(completion, dtype=torch.long)
    completions = completions.to(device)
    mask = (torch.arange(width).unsqueeze(0) < batch.completion_lengths.unsqueeze(1)).to(device)

    # Distinct prompts (an image's completions share one EncodedPrompt object), grouped by length.
    distinct: dict[int, EncodedPrompt] = {}
    for prompt in batch.prompts:
        distinct.setdefault(id(prompt), prompt)
    by_length: dict[int, list[int]] = {}
    for key, prompt in distinct.items():
        by_length.setdefault(prompt.input_ids.numel(), []).append(key)

    logp = torch.zeros((len(batch), width), device=device)
    for length, keys in by_length.items():
        prompts = [distinct[key] for key in keys]
        input_ids = torch.stack([p.input_ids for p in prompts]).to(device)
        mm_token_type_ids = torch.stack([p.mm_token_type_ids for p in prompts]).to(device)
        image_grid_thw = torch.cat([p.image_grid_thw for p in prompts]).to(device)
        prompt_mask = torch.ones_like(input_ids)
        positions, rope_deltas = hf_model.model.get_rope_index(
            input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=prompt_mask
        )
        cache = DynamicCache(config=hf_model.config)
        prefill = model(
            input_ids=input_ids,
            attention_mask=prompt_mask,
            position_ids=positions,
            mm_token_type_ids=mm_token_type_ids,
            pixel_values=torch.cat([p.pixel_values for p in prompts]).to(device),
            image_grid_thw=image_grid_thw,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        rows = [row for row, prompt in enumerate(batch.prompts) if id(prompt) in keys]
        source = torch.tensor([keys.index(id(batch.prompts[row])) for row in rows], device=device)
        cache.batch_select_indices(source)
        # Text after the prompt advances all three rotary axes together, from the prompt's offset.
        steps = torch.arange(length, length + width, device=device)
        text_positions = (steps.unsqueeze(0) + rope_deltas.to(device)[source]).unsqueeze(0).expand(3, -1, -1)
        attention_mask = torch.cat(
            [torch.ones((len(rows), length), dtype=torch.long, device=device), mask[rows].long()], dim=1
        )
        continued = model(
            input_ids=completions[rows],
            attention_mask=attention_mask,
            position_ids=text_positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=width,
        )
        # The prompt's last position predicts completion token 0; completion token j predicts j + 1.
        logits = torch.cat([prefill.logits[source, -1:], continued.logits[:, :-1]], dim=1)
        logits = tempered(logits, temperature)
        logp[rows] = token_logprobs(logits, completions[rows])
    return logp.masked_fill(~mask, 0.0), mask


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The rollout samples from softmax(logits / temperature); score that distribution (greedy, 0,
    has none: it is scored untempered)."""
    return logits / temperature if temperature > 0 and temperature != 1.0 else logits


def pad_to_width(tensors: Sequence[torch.Tensor], value: float | bool = 0) -> torch.Tensor:
    """Concatenate (B_i, T_i) tensors along B, right-padding each to the widest T."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])


def sequence_logprobs(
    model,
    processor,
    samples: Sequence[PolicySample],
    micro_batch_size: int,
    temperature: float = 1.0,
    share_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, mask), (N, T) over all N = sum of completions, in (sample, completion) order."""
    batches = build_micro_batches(processor, samples, micro_batch_size)
    pad_token_id = pad_token(processor)
    results = [
        completion_logprobs(model, batch, pad_token_id, temperature, share_prompt) for batch in batches
    ]
    return pad_to_width([logp for logp, _ in results]), pad_to_width([mask for _, mask in results], False)


def pad_token(processor) -> int:
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to right-pad sequences with")
    return pad


def _module(model) -> torch.nn.Module:
    # A DeepSpeed engine keeps the HF model in `.module`.
    return getattr(model, "module", model)


def _hf_model(model) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine and / or a peft wrapper (adapters injected)."""
    module = _module(model)
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def vision_tower(model) -> torch.nn.Module:
    """The vision encoder (patch embedding, blocks and merger) of a Qwen2-VL / Qwen2.5-VL model."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    if visual is None:
        raise ValueError(f"{type(model).__name__} has no model.visual: not a Qwen2-VL / Qwen2.5-VL model")
    return visual


def load_policy_model(
    path: str | Path,
    model_config: ModelConfig,
    dtype: torch.dtype,
    trainable: bool,
    zero3_config: dict | None = None,
):
    """Load the HF checkpoint for training (trainable) or as a frozen reference, with the config's options.

    zero3_config (a ZeRO-3 DeepSpeed config, process group up): load straight into this rank's
    partitions (`learner.deepspeed_config.partitioned_loading`) instead of the whole model on the host.
    """
    from transformers import AutoModelForImageTextToText

    from learner.deepspeed_config import partitioned_loading

    loading = partitioned_loading(zero3_config) if zero3_config is not None else contextlib.nullcontext()
    with loading:
        model = AutoModelForImageTextToText.from_pretrained(
            str(path),
            dtype=dtype,
            attn_implementation=model_config.attn_implementation,
            trust_remote_code=model_config.trust_remote_code,
            local_files_only=True,
        )
    vision_tower(model)
    model.config.use_cache = False
    if not trainable:
        return model.requires_grad_(False).eval()
    if model_config.freeze_vision:
        vision_tower(model).requires_grad_(False)
    if model_config.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the frozen-vision case).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Train mode only switches gradient checkpointing on (Qwen2.5-VL has no dropout), so old, new
    # and reference log-probs come from the same computation.
    return model.train()


# The adapters' initial A (B starts at zero) drawn from this seed: the same on every rank and every run.
LORA_INIT_SEED = 0


def apply_lora(model, lora: LoraConfig):
    """Wrap a loaded policy with peft LoRA adapters on `lora`'s target modules: only the adapters train
    (peft freezes the rest). B starts at zero, so the wrapped model computes exactly the base model's
    outputs until the first update, and with its adapter disabled (`peft_model.disable_adapter()`) it is
    the reference model. Under ZeRO-3 the adapters are created whole and DeepSpeed partitions them when
    it wraps the model."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from learner.lora import ADAPTER_NAME, target_modules_pattern

    peft_config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules_pattern(lora),
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(LORA_INIT_SEED)
        peft_model = get_peft_model(model, peft_config, adapter_name=ADAPTER_NAME)
    return peft_model


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Eval mode inside (LoRA dropout off: the log-probs of the model vLLM samples from), the previous
    mode restored after. Qwen2.5-VL itself has no dropout."""
    module = _module(model)
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """Module parameter name -> the name the HF checkpoint stores it under (what save_pretrained writes).

    transformers 5 renames Qwen2.5-VL's modules on load ("visual." -> "model.visual.", ...) and reverts
    the renaming on save; the weight push uses the saved names so vLLM's loader maps them as it maps a
    checkpoint. Call it before DeepSpeed wraps (and under ZeRO-3 empties) the parameters.
    """
    from transformers.core_model_loading import revert_weight_conversion

    names = {}
    for name, _ in model.named_parameters():
        renamed = list(revert_weight_conversion(model, {name: torch.empty(0)}))
        if len(renamed) != 1:
            raise ValueError(
                f"parameter {name!r} maps to {len(renamed)} checkpoint tensors; only renamings are supported"
            )
        names[name] = renamed[0]
    return names
