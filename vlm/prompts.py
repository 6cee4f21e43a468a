"""The published VisualQuality-R1 prompt (docs/method.md), rendered with the checkpoint's chat template.

The user turn is [image, text] with no extra system prompt (Qwen's template adds its own default
system turn, as in the published code). The rollout engine and the learner both call
`build_prompt_text`, so vLLM samples from exactly the prompt tokens the learner scores.
"""

from __future__ import annotations

QUESTION = (
    "You are doing the image quality assessment task. Here is the question: What is your overall "
    "rating on the quality of this picture? The rating should be a float between 1 and 5, rounded "
    "to two decimal places, with 1 representing very poor quality and 5 representing excellent quality."
)
THINKING_INSTRUCTION = (
    "First output the thinking process in <think> </think> tags and then output the final answer "
    "with only one score in <answer> </answer> tags."
)
NO_THINKING_INSTRUCTION = (
    "Please only output the final answer with only one score in <answer> </answer> tags."
)


def prompt_question(thinking: bool) -> str:
    """The text part of the user turn: the published question plus the (non-)thinking instruction."""
    return f"{QUESTION} {THINKING_INSTRUCTION if thinking else NO_THINKING_INSTRUCTION}"


def build_messages(thinking: bool) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": prompt_question(thinking)}],
        }
    ]


def build_prompt_text(processor, thinking: bool) -> str:
    """The chat-templated prompt with one (unexpanded) image placeholder, ready for generation."""
    text = processor.apply_chat_template(build_messages(thinking), tokenize=False, add_generation_prompt=True)
    image_token = processor.image_token
    if text.count(image_token) != 1:
        raise ValueError(
            f"the chat template rendered {text.count(image_token)} {image_token} placeholders, expected 1"
        )
    return text
