"""LoRA math for the learner (no Ray, no DeepSpeed): which modules peft adapts, the merged weights the
rollout engines get, and the names that connect peft's parameters to the checkpoint's.

An adapted linear layer computes x W^T + scaling * (x A^T) B^T, scaling = alpha / rank, so the policy the
learner trains is the plain model with W replaced by W + scaling * B A. That merged weight is computed
out of place for every push (`merged_weight`): the learner's W is never written, so no rounding of a
merge and unmerge builds up over steps, and the adapter disabled is exactly the reference model.

peft wraps the Hugging Face model as `base_model.model.<module>`; an adapted module keeps its weight in
`<module>.base_layer.weight` and the adapter in `<module>.lora_A.<adapter>.weight` /
`<module>.lora_B.<adapter>.weight` (`hf_name` strips the wrapping; `adapter_tensor_name` gives the name
peft's adapter_model.safetensors stores it under, the adapter push's). vLLM packs q/k/v and gate/up into one
layer each and reloads a layer only when all of its tensors arrive (a layer loaded in part is processed
with the rest uninitialised), so a push carries the whole packed layer of every adapted module
(`push_plan`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from configs.schema import LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "default"
# Hugging Face module names that vLLM's Qwen2-VL / Qwen2.5-VL models load into one layer.
PACKED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Vision blocks: attention qkv / proj, and the MLP (Qwen2.5-VL's gate/up/down, Qwen2-VL's fc1/fc2).
VISION_BLOCK_PROJECTIONS = (
    r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:gate_proj|up_proj|down_proj|fc1|fc2))"
)
MERGER_PROJECTIONS = r"model\.visual\.merger\.mlp\.(?:0|2)"


def scaling(lora: LoraConfig) -> float:
    return lora.alpha / lora.rank


def target_modules_pattern(lora: LoraConfig) -> str:
    """The regular expression peft full-matches module names against (the names in the model as
    transformers loads it: `model.language_model.layers.N...`, `model.visual...`)."""
    projections = "|".join(re.escape(name) for name in lora.target_modules)
    parts = [rf"model\.language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{projections})"]
    if lora.vision_tower:
        parts.append(VISION_BLOCK_PROJECTIONS)
    if lora.merger:
        parts.append(MERGER_PROJECTIONS)
    return "|".join(f"(?:{part})" for part in parts)


def merged_weight(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """W + scale * B @ A as a new tensor in W's dtype (computed in fp32; W is left untouched).

    weight (out, in), or (in, out) with fan_in_fan_out (Conv1D layers store it transposed); lora_a
    (rank, in); lora_b (out, rank). Dropout is not part of it: it acts on the adapter's input in training
    only, and the model it samples from is this one.
    """
    delta = lora_b.float() @ lora_a.float()
    if fan_in_fan_out:
        delta = delta.T
    if delta.shape != weight.shape:
        raise ValueError(
            f"B @ A has shape {tuple(delta.shape)}, the weight {tuple(weight.shape)}"
            + (" (fan_in_fan_out)" if fan_in_fan_out else "")
        )
    return (weight.float() + scale * delta).to(weight.dtype)


def hf_name(peft_name: str) -> str:
    """peft parameter name -> the Hugging Face model's (`base_model.model.` and `.base_layer` removed)."""
    if not peft_name.startswith(PEFT_PREFIX):
        raise ValueError(f"{peft_name!r} is not a peft parameter name (no {PEFT_PREFIX!r} prefix)")
    return peft_name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def is_adapter_parameter(peft_name: str) -> bool:
    return ".lora_A." in peft_name or ".lora_B." in peft_name


def adapter_tensor_name(peft_name: str, adapter: str = ADAPTER_NAME) -> str:
    """peft parameter name of an adapter weight -> its name in peft's saved adapter (the adapter's name
    dropped: `...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`), which vLLM's LoRA loader
    reads."""
    parts = _adapter_parts(peft_name, adapter)
    if parts is None or not peft_name.startswith(PEFT_PREFIX):
        raise ValueError(f"{peft_name!r} is not a weight of peft adapter {adapter!r}")
    module, part = parts
    return f"{module}.lora_{part}.weight"


@dataclass(frozen=True)
class PushedTensor:
    """One tensor of a push: its Hugging Face name and the peft parameters it is computed from (the
    base tensor alone, or the base weight with the adapter's A and B)."""

    name: str
    base: str
    lora_a: str | None = None
    lora_b: str | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(p for p in (self.base, self.lora_a, self.lora_b) if p is not None)


def _adapter_parts(peft_name: str, adapter: str) -> tuple[str, str] | None:
    """(module, "A" | "B") of an adapter weight, else None."""
    for part in ("A", "B"):
        suffix = f".lora_{part}.{adapter}.weight"
        if peft_name.endswith(suffix):
            return peft_name.removesuffix(suffix), part
    return None


def _siblings(module: str) -> list[str]:
    """The module and those vLLM packs into one layer with it (same parent)."""
    parent, _, leaf = module.rpartition(".")
    for group in PACKED_SIBLINGS:
        if leaf in group:
            return [f"{parent}.{name}" for name in group]
    return [module]


def push_plan(peft_names: Sequence[str], adapter: str = ADAPTER_NAME) -> list[PushedTensor]:
    """What a merged push sends, in the model's parameter order: every parameter (weight, bias) of each
    adapted module and of the modules vLLM packs with it; an adapted module's weight merged.

    peft_names: the peft model's parameter names (`named_parameters()` order).
    """
    adapted = {}
    for name in peft_names:
        parts = _adapter_parts(name, adapter)
        if parts is not None:
            adapted.setdefault(parts[0], {})[parts[1]] = name
    if not adapted:
        raise ValueError(f"no parameter of adapter {adapter!r} among the {len(peft_names)} names")
    incomplete = sorted(module for module, parts in adapted.items() if len(parts) != 2)
    if incomplete:
        raise ValueError(f"modules with only one of lora_A / lora_B: {incomplete}")
    pushed_modules = {sibling for module in adapted for sibling in _siblings(module)}
    plan, covered = [], set()
    for name in peft_names:
        if is_adapter_parameter(name):
            continue
        module = name.rsplit(".", 1)[0].removesuffix(".base_layer")
        if module not in pushed_modules:
            continue
        covered.add(module)
        merge = module in adapted and name == f"{module}.base_layer.weight"
        parts = adapted[module] if merge else {}
        plan.append(PushedTensor(hf_name(name), name, parts.get("A"), parts.get("B")))
    missing = sorted(pushed_modules - covered)
    if missing:
        raise ValueError(f"modules vLLM packs with an adapted one are not in the model: {missing}")
    return plan


def pushed_tensors(
    plan: Sequence[PushedTensor], tensors: Mapping[str, torch.Tensor], scale: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) of each planned tensor; `tensors` holds (at least) its sources by peft
    name. Unmerged tensors are yielded as they are (the caller copies them if it must)."""
    for item in plan:
        base = tensors[item.base]
        if item.lora_a is None:
            yield item.name, base
        else:
            yield item.name, merged_weight(base, tensors[item.lora_a], tensors[item.lora_b], scale)


def merged_state_dict(
    peft_state: Mapping[str, torch.Tensor], scale: float, adapter: str = ADAPTER_NAME
) -> dict[str, torch.Tensor]:
    """The whole model's state dict under Hugging Face names with every adapter merged in: the model a
    plain checkpoint of the policy holds. peft_state: the peft model's full state dict."""
    plan = {item.base: item for item in push_plan(list(peft_state), adapter)}
    merged = {}
    for name, tensor in peft_state.items():
        if is_adapter_parameter(name):
            continue
        item = plan.get(name)
        if item is not None and item.lora_a is not None:
            tensor = merged_weight(tensor, peft_state[item.lora_a], peft_state[item.lora_b], scale)
        merged[hf_name(name)] = tensor
    return merged
