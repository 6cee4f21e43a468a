"""The learner sees the pixels vLLM saw: images in the forms real IQA datasets hold them (phone photos
with EXIF orientation, transparency, 16-bit, CMYK, palette, progressive JPEG, WebP, multi-frame files)
go through one decoder (iqa.images.load_image) on the rollout side and in the learner.

Without that, an EXIF-rotated photo reaches the learner sideways (another number of image tokens) and the
policy-gradient ratio compares two different inputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from configs.runtime_env import apply_default_env

apply_default_env()

from configs.schema import ModelConfig, RolloutConfig  # noqa: E402
from iqa.images import load_image  # noqa: E402
from learner.policy import (  # noqa: E402  # noqa: E402
    PolicySample,
    build_micro_batches,
    completion_logprobs,
    encode_prompt,
    load_policy_model,
    pad_token,
)
from vlm.factory import build_checkpoint, load_processor  # noqa: E402
from vlm.prompts import build_prompt_text  # noqa: E402

MIN_PIXELS, MAX_PIXELS = 3136, 12544
WIDTH, HEIGHT = 112, 56  # not square, so a rotation changes the image's token grid


def photo(mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    return rgb.convert(mode)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(photo(), "JPEG", exif=exif.tobytes(), quality=95)


def transparent(mode: str) -> bytes:
    image = photo("RGBA")
    alpha = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    alpha[:, : WIDTH // 2] = 255
    image.putalpha(Image.fromarray(alpha))
    return encoded(image.convert(mode) if mode != "RGBA" else image, "PNG")


def palette_with_transparency() -> bytes:
    image = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encoded(image, "PNG", transparency=0)


def sixteen_bit() -> bytes:
    ramp = (np.linspace(0, 65535, WIDTH)[None, :] * np.ones((HEIGHT, 1))).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I;16")
    return encoded(image, "PNG")


def frames(fmt: str) -> bytes:
    first, second = photo(), photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if fmt == "GIF":
        first, second = first.convert("P"), second.convert("P")
    return encoded(first, fmt, save_all=True, append_images=[second])


KINDS = {
    **{f"exif-orientation-{o}": (lambda o=o: with_orientation(o)) for o in range(2, 9)},
    "rgba": lambda: transparent("RGBA"),
    "la": lambda: transparent("LA"),
    "palette-transparency": palette_with_transparency,
    "16-bit-grey": sixteen_bit,
    "cmyk-jpeg": lambda: encoded(photo("CMYK"), "JPEG"),
    "greyscale": lambda: encoded(photo("L"), "PNG"),
    "progressive-jpeg": lambda: encoded(photo(), "JPEG", progressive=True),
    "webp": lambda: encoded(photo(), "WEBP"),
    "gif-two-frames": lambda: frames("GIF"),
    "tiff-two-frames": lambda: frames("TIFF"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint("tiny", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def processor(checkpoint):
    return load_processor(checkpoint, MIN_PIXELS, MAX_PIXELS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_learner_encodes_the_decoders_upright_rgb_image(kind, processor):
    data = KINDS[kind]()
    prompt = build_prompt_text(processor, thinking=True)
    learner = encode_prompt(processor, PolicySample(image=data, prompt=prompt, completions=[[1]]))
    decoded = load_image(data)
    expected = processor(text=[prompt], images=[decoded], return_tensors="pt")
    assert torch.equal(learner.pixel_values, expected["pixel_values"])
    assert torch.equal(learner.input_ids, expected["input_ids"][0])
    # Orientations 5-8 turn the photo a quarter: the grid follows the upright image, not the stored one.
    rows, columns = learner.image_grid_thw[0, 1:].tolist()
    upright_portrait = kind in {f"exif-orientation-{o}" for o in (5, 6, 7, 8)}
    assert (rows > columns) == upright_portrait, (kind, rows, columns)


@pytest.mark.slow
def test_vllm_and_the_learner_read_the_same_log_probs_on_every_kind(checkpoint, processor):
    """As train.verify_weight_sync does after a push: greedy tokens from the real engine, their fp32
    log-probs in the learner's forward, on every kind of image."""
    from actor.rollout_engine import RolloutEngine

    model_cfg = ModelConfig(preset="tiny", dtype="float32")
    rollout_cfg = RolloutConfig(max_new_tokens=12, enforce_eager=True, kv_cache_gib=0.25, seed=0)
    engine = RolloutEngine(checkpoint, model_cfg, rollout_cfg)
    try:
        images = [KINDS[kind]() for kind in sorted(KINDS)]
        rollouts = engine.generate(images, 1, temperature=0.0)
    finally:
        engine.shutdown()
    model = load_policy_model(checkpoint, model_cfg, torch.float32, trainable=False)
    prompt = build_prompt_text(processor, thinking=True)
    for kind, data, rollout in zip(sorted(KINDS), images, rollouts, strict=True):
        completion = rollout.completions[0]
        sample = PolicySample(image=data, prompt=prompt, completions=[completion.token_ids])
        (batch,) = build_micro_batches(processor, [sample], 1)
        assert batch.prompts[0].input_ids.tolist() == rollout.prompt_token_ids, kind
        with torch.no_grad():
            logp, mask = completion_logprobs(model, batch, pad_token(processor))
        gap = (logp[0][mask[0]] - torch.tensor(completion.logprobs)).abs().max().item()
        assert gap < 1e-3, f"{kind}: vLLM and the learner differ by {gap:.2e} in log-prob"
