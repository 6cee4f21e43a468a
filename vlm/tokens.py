"""Qwen2-VL's special tokens: the ones every checkpoint has, the ones generation stops on, and the ones
the policy must never sample."""

# In Qwen's id order (the model factory appends them after the learned BPE vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Sampled, these desynchronise image features and placeholder tokens in the learner's forward.
VISION_SPECIAL_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# End of turn, and end of text (Qwen's generation_config stops on both too).
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def token_id(tokenizer, token: str, source) -> int:
    """The id of one token; an error naming `source` when the tokenizer lacks it (a Qwen tokenizer never does)."""
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or found == tokenizer.unk_token_id:
        raise ValueError(f"{source}: the tokenizer has no {token} token (not a Qwen2-VL checkpoint?)")
    return found
