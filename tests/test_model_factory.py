"""The locally built Qwen2.5-VL checkpoints: cache behaviour, tokenizer, processor bounds, loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from configs.runtime_env import apply_default_env

apply_default_env()

from configs.schema import ModelConfig  # noqa: E402
from vlm.factory import (  # noqa: E402
    PRESETS,
    build_checkpoint,
    load_processor,
    resolve_model_path,
)
from vlm.prompts import build_prompt_text, prompt_question  # noqa: E402
from vlm.tokens import SPECIAL_TOKENS, token_id  # noqa: E402


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny_path(cache_dir):
    return build_checkpoint("tiny", cache_dir)


def test_build_is_cached_and_keyed_by_pixel_bounds_and_seed(cache_dir, tiny_path):
    mtime = (tiny_path / "model.safetensors").stat().st_mtime_ns
    assert build_checkpoint("tiny", cache_dir) == tiny_path
    assert (tiny_path / "model.safetensors").stat().st_mtime_ns == mtime
    other_bounds = build_checkpoint("tiny", cache_dir, min_pixels=3136, max_pixels=50176)
    other_seed = build_checkpoint("tiny", cache_dir, seed=1)
    assert len({tiny_path, other_bounds, other_seed}) == 3
    # No staging folders are left behind after the atomic rename.
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]
    # Safetensors only: nothing a pickle loader would have to open.
    assert (tiny_path / "model.safetensors").is_file()
    assert not list(tiny_path.glob("*.bin"))


def test_same_seed_gives_same_weights_other_seed_differs(cache_dir, tiny_path, tmp_path):
    from safetensors.torch import load_file

    rebuilt = build_checkpoint("tiny", tmp_path)
    reseeded = build_checkpoint("tiny", cache_dir, seed=1)
    base = load_file(tiny_path / "model.safetensors")
    same = load_file(rebuilt / "model.safetensors")
    other = load_file(reseeded / "model.safetensors")
    # Saved under the original Qwen2.5-VL checkpoint names, as real checkpoints are.
    name = "model.layers.0.self_attn.q_proj.weight"
    assert name in base
    assert all((base[k] == same[k]).all() for k in base)
    assert not (base[name] == other[name]).all()


def test_tokenizer_digits_special_tokens_and_template(tiny_path):
    processor = load_processor(tiny_path, 3136, 12544)
    tokenizer = processor.tokenizer
    for digit in "0123456789":
        assert len(tokenizer.encode(digit, add_special_tokens=False)) == 1
    assert tokenizer.tokenize("4.75") == ["4", ".", "7", "5"]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [ids[2]]
    config = json.loads((tiny_path / "config.json").read_text())
    assert config["image_token_id"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    text = build_prompt_text(processor, thinking=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(f"{prompt_question(True)}<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_processor_uses_the_given_pixel_bounds(tiny_path):
    image = Image.fromarray(np.full((400, 300, 3), 128, dtype=np.uint8))
    small = load_processor(tiny_path, 3136, 12544)
    large = load_processor(tiny_path, 3136, 50176)
    grid_small = small.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    grid_large = large.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    assert int(grid_small.prod()) * 14 * 14 <= 12544
    assert int(grid_large.prod()) > int(grid_small.prod())


def test_presets_sizes(cache_dir):
    small = build_checkpoint("small", cache_dir)
    spec = json.loads((small / "vqr1_spec.json").read_text())
    assert 1_000_000 < spec["num_parameters"] < 10_000_000
    assert 128 <= PRESETS["small"].hidden_size <= 256
    tiny = PRESETS["tiny"]
    assert sum(tiny.mrope_section) == tiny.head_dim // 2
    bench = PRESETS["bench"]
    assert sum(bench.mrope_section) == bench.head_dim // 2
    assert bench.head_dim in (32, 64, 80, 128)


def test_transformers_loads_and_runs_the_checkpoint(tiny_path):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_path, dtype=torch.float32)
    assert 500_000 < sum(p.numel() for p in model.parameters()) < 2_000_000
    processor = load_processor(tiny_path, 3136, 12544)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (84, 112, 3), dtype=np.uint8))
    inputs = processor(text=[build_prompt_text(processor, True)], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def test_resolve_model_path(cache_dir, tiny_path, tmp_path):
    assert resolve_model_path(ModelConfig(preset="tiny"), cache_dir) == tiny_path
    assert resolve_model_path(ModelConfig(path=str(tiny_path)), cache_dir) == tiny_path
    with pytest.raises(FileNotFoundError, match="not a folder"):
        resolve_model_path(ModelConfig(path=str(tmp_path / "missing")), cache_dir)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(ModelConfig(path=str(tmp_path)), cache_dir)


def test_unknown_preset_and_bad_bounds_are_rejected(cache_dir):
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        build_checkpoint("huge", cache_dir)
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        build_checkpoint("tiny", cache_dir, min_pixels=20000, max_pixels=12544)


def test_token_id_finds_digits_and_names_the_source_of_a_missing_token(tiny_path):
    tokenizer = load_processor(tiny_path, 3136, 12544).tokenizer
    assert tokenizer.decode([token_id(tokenizer, "3", tiny_path)]) == "3"
    with pytest.raises(ValueError, match=f"{tiny_path}: the tokenizer has no <no-such-token> token"):
        token_id(tokenizer, "<no-such-token>", tiny_path)
