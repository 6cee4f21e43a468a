"""What a colocated rollout engine keeps while it sleeps, against what the weight push brings back.

Colocated (cluster.placement=colocate), a rollout engine sleeps while the learner rank on its device
trains. vLLM's level 1 copies the engine's weights to host memory and drops its KV cache; level 2 drops
the weights too, except the parameters named by `sleep_preserve_parameter_names` (fnmatch patterns over
vLLM's parameter names, copied to host memory and back; vllm/v1/worker/gpu_worker.py). After a level-2
wake every other weight holds whatever the freed memory held until the push writes it, so level 2 is
sound only when each weight group is pushed again after every update or kept by name
(cluster.colocate.keep_weights).

The groups are those of vLLM's Qwen2-VL / Qwen2.5-VL models (vllm/model_executor/models/qwen2_5_vl.py
maps the checkpoint's names to these). What a push covers: full fine-tuning sends every trainable
parameter (all of them, less the vision tower under model.freeze_vision); a LoRA merged push sends the
packed layers of the adapted projections (learner/lora.py, push_plan) and never a whole vision tower.
"""

from __future__ import annotations

# Weight group -> the fnmatch pattern of its vLLM parameter names.
WEIGHT_GROUPS: dict[str, str] = {
    "vision_tower": "visual.*",
    "embed_tokens": "language_model.model.embed_tokens.*",
    "lm_head": "language_model.lm_head.*",  # absent where the head is tied to the embeddings
    "norms": "language_model.model.*norm.*",
    "qkv_proj": "language_model.model.layers.*.self_attn.qkv_proj.*",
    "o_proj": "language_model.model.layers.*.self_attn.o_proj.*",
    "gate_up_proj": "language_model.model.layers.*.mlp.gate_up_proj.*",
    "down_proj": "language_model.model.layers.*.mlp.down_proj.*",
}
# LoRA target (Hugging Face projection) -> the packed vLLM layer its merged push sends whole.
PACKED_LAYER = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "o_proj": "o_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
    "down_proj": "down_proj",
}


def pushed_weight_groups(freeze_vision: bool, lora_targets: list[str] | None) -> set[str]:
    """The weight groups every push writes whole: full fine-tuning's (lora_targets None) under
    model.freeze_vision, or a LoRA merged push's of learner.lora.target_modules (an adapter push writes no
    base weight: `lora_push_targets`)."""
    if lora_targets is None:
        return set(WEIGHT_GROUPS) - ({"vision_tower"} if freeze_vision else set())
    return {PACKED_LAYER[name] for name in lora_targets}


def lora_push_targets(lora) -> list[str] | None:
    """`pushed_weight_groups`'s lora_targets for learner.lora: none for full fine-tuning, the adapted
    projections for a merged push, [] for an adapter push."""
    if lora is None:
        return None
    return list(lora.target_modules) if lora.push == "merged" else []


def sleep_level_problem(level: int, pushed: set[str], keep: set[str]) -> str | None:
    """Why `level` cannot go with a push of the `pushed` groups and the `keep` groups kept by name, or
    None. Level 1 keeps every weight; level 2 keeps only `keep`, so every other group must be pushed."""
    unknown = sorted(keep - set(WEIGHT_GROUPS))
    if unknown:
        return f"cluster.colocate.keep_weights names unknown weight groups {unknown} (groups: {list(WEIGHT_GROUPS)})"
    if level == 1:
        return None
    lost = [group for group in WEIGHT_GROUPS if group not in pushed | keep]
    if lost:
        return (
            f"cluster.colocate.sleep_level=2 drops the rollout engines' weights while the learners train, "
            f"and the push does not send {lost}: add them to cluster.colocate.keep_weights (kept in host "
            "memory by name) or use cluster.colocate.sleep_level=1 (all weights kept in host memory)"
        )
    return None


def preserve_patterns(keep: list[str], tied_embeddings: bool) -> list[str]:
    """vLLM's `sleep_preserve_parameter_names` for the kept groups. A tied output head is the embedding
    matrix (vLLM lists it once, as embed_tokens), and a pattern that matches nothing fails the sleep."""
    return [WEIGHT_GROUPS[group] for group in keep if not (group == "lm_head" and tied_embeddings)]
