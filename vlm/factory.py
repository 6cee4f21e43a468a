"""Qwen2.5-VL checkpoints: built locally with random weights (no hub access), or a local folder.

A preset checkpoint is a real Qwen2.5-VL in Hugging Face format (safetensors, processor, chat
template) that both transformers and vLLM load with the same code as Qwen2.5-VL-3B/7B-Instruct:
- tokenizer: a byte-level BPE trained here on inline text with Qwen2's normalizer, split regex and
  byte-level pre-tokenizer (so every digit is one token, as in real Qwen), Qwen's special tokens
  and the Qwen2-VL chat template;
- processor: Qwen2_5_VLProcessor with Qwen2VLImageProcessor(min_pixels, max_pixels);
- weights: seeded random initialisation.

Checkpoints are cached under a folder keyed by a hash of everything that defines them and built
once (in a temporary folder renamed into place, so a crash or a concurrent build never leaves a
half-written checkpoint behind).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from configs.schema import ModelConfig
from iqa.folders import build_folder
from vlm.tokens import SPECIAL_TOKENS

DEFAULT_CACHE_DIR = ".cache/vqr1/models"
# Bump when the build recipe changes, so old cached checkpoints are not reused.
FACTORY_VERSION = 1

# The chat template shipped with Qwen2-VL / Qwen2.5-VL-Instruct.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# English the tiny tokenizer learns its merges from; any text tokenizes (byte-level), this only
# makes the prompt and typical answers short.
TOKENIZER_TEXT = """
The image is sharp and clear, with natural colours and fine detail. The picture looks blurry and
noisy; edges are soft and the texture is lost. Strong compression artifacts and blocking are visible.
The contrast is low, the exposure is too dark or too bright, and the colours are washed out.
Overall the quality is good, fair, poor, bad or excellent. I think the score should be high because
the subject is in focus and there is no visible distortion. The noise level is moderate, so the
rating is average. Pixelation and ringing reduce the perceived quality of this photograph.
<think> The image shows a clear scene with little noise. </think> <answer> 3.75 </answer>
<think> Heavy blur and low contrast make this picture poor. </think> <answer>1.50</answer>
0 1 2 3 4 5 6 7 8 9 1.00 2.25 3.50 4.75 5.00 0.5 4.12 2.89 3.33
"""


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a preset; every field enters the cache key."""

    max_vocab_size: int  # the BPE stops earlier when the training text has no more merges
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mrope_section(self) -> list[int]:
        # Qwen's split of the rotary half-dimension into (temporal, height, width): 1/4, 3/8, 3/8.
        half = self.head_dim // 2
        return [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]


# head_dim 32/64 only: the sizes vLLM's CPU attention supports (and common on GPU).
PRESETS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        max_vocab_size=1024,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=256,
        vision_depth=2,
        vision_hidden=64,
        vision_heads=2,
        vision_intermediate=128,
    ),
    "small": ModelSpec(
        max_vocab_size=2048,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=768,
        vision_depth=4,
        vision_hidden=128,
        vision_heads=4,
        vision_intermediate=384,
    ),
    "bench": ModelSpec(
        max_vocab_size=2048,
        hidden_size=1024,
        num_layers=10,
        num_heads=16,
        num_kv_heads=4,
        intermediate_size=2816,
        vision_depth=4,
        vision_hidden=256,
        vision_heads=4,
        vision_intermediate=768,
    ),
}


def _checkpoint_key(spec: ModelSpec, min_pixels: int, max_pixels: int, seed: int) -> str:
    payload = json.dumps(
        {
            "spec": asdict(spec),
            "min_pixels": min_pixels,
            "max_pixels": max_pixels,
            "seed": seed,
            "version": FACTORY_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_tokenizer(max_vocab_size: int):
    """A Qwen2Tokenizer whose BPE merges are learned from TOKENIZER_TEXT and the published prompts."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from vlm.prompts import prompt_question

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    learned_size = max_vocab_size - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=learned_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [TOKENIZER_TEXT, prompt_question(True), prompt_question(False)]
    bpe.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    # transformers 5 wants merges as (left, right) tuples.
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _model_config(spec: ModelSpec, tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": spec.mrope_section,
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_intermediate,
        "num_heads": spec.vision_heads,
        "out_hidden_size": spec.hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        # Qwen2.5-VL alternates windowed and full attention; the last block attends fully.
        "fullatt_block_indexes": [spec.vision_depth - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_processor(tokenizer, min_pixels: int, max_pixels: int):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _write_checkpoint(spec: ModelSpec, folder: Path, min_pixels: int, max_pixels: int, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer(spec.max_vocab_size)
    config = _model_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # Only stop tokens: sampling settings stay explicit in the rollout and learner configs.
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, end_of_text], pad_token_id=end_of_text, bos_token_id=end_of_text
    )
    model.save_pretrained(folder)
    build_processor(tokenizer, min_pixels, max_pixels).save_pretrained(folder)
    (folder / "vqr1_spec.json").write_text(
        json.dumps(
            {
                "spec": asdict(spec),
                "min_pixels": min_pixels,
                "max_pixels": max_pixels,
                "seed": seed,
                "num_parameters": sum(p.numel() for p in model.parameters()),
            },
            indent=2,
        )
    )


def build_checkpoint(
    preset: str,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    *,
    min_pixels: int = 3136,
    max_pixels: int = 12544,
    seed: int = 0,
) -> Path:
    """The folder of the preset's checkpoint, built on first use and reused afterwards."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; presets: {', '.join(PRESETS)}")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(
            f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}"
        )
    spec = PRESETS[preset]
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{preset}-{_checkpoint_key(spec, min_pixels, max_pixels, seed)}"
    return build_folder(
        final, lambda staging: _write_checkpoint(spec, staging, min_pixels, max_pixels, seed), is_checkpoint
    )


def is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def resolve_model_path(model: ModelConfig, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """model.path when set (a local Hugging Face folder), else the preset's locally built checkpoint."""
    if model.path is not None:
        path = Path(model.path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"model.path {model.path!r} is not a folder; give a local Hugging Face checkpoint "
                "(nothing is downloaded: hub access is off)"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.path {model.path!r} has no config.json: not a Hugging Face checkpoint"
            )
        return path
    return build_checkpoint(model.preset, cache_dir, min_pixels=model.min_pixels, max_pixels=model.max_pixels)


def load_processor(path: str | Path, min_pixels: int, max_pixels: int):
    """The checkpoint's processor with the run's image bounds (the same ones vLLM is given)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(
        str(path), local_files_only=True, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}
    )
    size = processor.image_processor.size
    if (size["shortest_edge"], size["longest_edge"]) != (min_pixels, max_pixels):
        raise ValueError(
            f"{path}: processor kept image bounds {size}, expected min_pixels={min_pixels}, max_pixels={max_pixels}"
        )
    return processor
