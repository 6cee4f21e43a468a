"""The project's base model: a Qwen2.5-VL that already sees, made here without any quality label.

No pretrained weights can be had on these machines, and a randomly initialised Qwen2.5-VL passes almost
no image information to its answer tokens (docs/base-model.md), so RL has nothing to
amplify. This module makes the stand-in for "a pretrained Qwen2.5-VL" from a preset's random checkpoint:

1. vision pretraining: the vision tower plus two linear heads on its pooled output learn the dominant
   colour and six low-level statistics computed from the pixels themselves (`image_statistics`:
   sharpness, noise, contrast, blockiness, colourfulness, gradient energy) of FRESH images: every
   example is a random crop (and flip) of a full-resolution TRAINING reference photo of the built-in
   benchmark, with a random distortion of random strength. Held-out reference photos are never seen;
   MOS labels and distortion levels are never targets (strengths are drawn continuously, never named).
   Naming the distortion family instead made the features strength-invariant (a nonlinear probe from
   them to held-out MOS: 0.10, below the random tower's 0.21; with the statistics: 0.55).
2. perception pretraining: with the vision tower frozen, the model answers "which distortion" and
   "which colour" questions as text ("Which distortion does this picture have?" -> "blur"), so the
   language model learns to read the image tokens.
-> the base checkpoint.
3. format cold start: on the published prompt the model answers `<think> short text </think>
   <answer>X.XX</answer>` with a score drawn at random, independent of the image (`--score-decimals`
   sets the decimals; 0 makes the score one token); a share of the
   examples stays perception questions so the image stays in use. The vision tower is frozen (the
   targets carry no image information to learn from).
-> the cold-start checkpoint: the default start of GRPO.

Both are Hugging Face checkpoints of the preset's architecture (safetensors, tokenizer, processor), so
transformers and vLLM load them like any Qwen2.5-VL. They are cached under a key of their recipe.

    vqr1 base-model [--preset small] [--threads 1] [--out DIR]          (make base-model)

builds (or reuses) both, measures them against the random init, and copies them to DIR;
`--cold-start-from CHECKPOINT` runs only the cold start, on top of the given checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from configs.schema import DataConfig
from iqa.builtin import DEFAULT_FAMILIES, DISTORTIONS, REFERENCE_PHOTOS, file_sha256, skimage_data_dir
from iqa.folders import build_folder
from iqa.images import load_image, random_view
from learner.policy import PolicySample, build_micro_batches, completion_logprobs, pad_token, vision_tower
from rewards.parsing import extract_score, format_reward
from vlm.factory import DEFAULT_CACHE_DIR, build_checkpoint, is_checkpoint, load_processor
from vlm.prompts import build_prompt_text
from vlm.tokens import VISION_SPECIAL_TOKENS

# Bump when the training code changes what it makes, so old cached checkpoints are not reused.
BASE_MODEL_VERSION = 3
CLEAN = "clean"
# Answer words of the family question (the tiny tokenizer splits them into 2-3 tokens each).
FAMILY_WORDS = {
    CLEAN: "clean",
    "blur": "blur",
    "noise": "noise",
    "jpeg": "compression",
    "contrast": "contrast",
    "pixelate": "pixelation",
}
COLOURS = ("red", "green", "blue", "gray")
FAMILY_QUESTION = "Which distortion does this picture have?"
COLOUR_QUESTION = "What is the main colour of this picture?"
# Short thinking texts of the cold start, in words the preset tokenizers know well.
THOUGHTS = (
    "The image is sharp and clear.",
    "The picture looks blurry and noisy.",
    "The contrast is low.",
    "There is no visible distortion.",
)
# Learning-rate schedule of every stage: warm-up share of the steps, and the final lr as a share of the peak.
# The decay matters: sampling at temperature 1 needs a low-entropy, annealed fit of the format.
WARMUP_SHARE = 0.05
LR_FLOOR = 0.1
# Channel-mean spread (of 255) under which a view counts as gray.
GRAY_SPREAD = 12.0


@dataclass(frozen=True)
class BaseModelRecipe:
    """Everything that defines the base and cold-start checkpoints; every field enters a cache key."""

    preset: str = "small"
    min_pixels: int = 3136
    max_pixels: int = 12544
    image_size: int = 112  # fresh views are resized to the benchmark's size
    families: tuple[str, ...] = DEFAULT_FAMILIES
    split_ratios: tuple[float, float, float] = (0.6, 0.2, 0.2)
    split_seed: int = 42
    seed: int = 0
    batch_size: int = 32
    vision_steps: int = 800
    vision_lr: float = 1e-3
    perception_steps: int = 150
    perception_lr: float = 3e-4
    cold_start_steps: int = 200
    cold_start_batch_size: int = 16
    cold_start_lr: float = 1e-3
    cold_start_perception_share: float = 0.25
    # Decimals of the cold start's random scores. 0: a whole number, one token; every extra digit is a
    # token of pure noise whose gradient dilutes the first digit's under Adam (README, "Does it learn?").
    cold_start_score_decimals: int = 2

    def base_fields(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("cold_start_")}

    def base_key(self) -> str:
        return _hash({"recipe": self.base_fields(), "version": BASE_MODEL_VERSION})

    def cold_start_key(self) -> str:
        return _hash({"recipe": asdict(self), "version": BASE_MODEL_VERSION})

    def data_config(self) -> DataConfig:
        """The built-in benchmark (and its split) whose training references the recipe may use."""
        return DataConfig(
            builtin_size=self.image_size,
            builtin_families=list(self.families),
            split_ratios=self.split_ratios,
            split_seed=self.split_seed,
        )


def _hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- data


def benchmark_splits(recipe: BaseModelRecipe) -> dict:
    """The built-in benchmark split by reference, exactly as the training run splits it."""
    from iqa.splits import load_splits

    data = recipe.data_config()
    splits, _ = load_splits(data.train, data)
    return splits


def training_photos(recipe: BaseModelRecipe) -> list[Image.Image]:
    """The full-resolution photos of the benchmark's TRAINING references (held-out ones never load)."""
    train_refs = set(benchmark_splits(recipe)["train"]["ref"])
    folder = skimage_data_dir()
    return [load_image(folder / name) for name in REFERENCE_PHOTOS if Path(name).stem in train_refs]


def dominant_colour(image: Image.Image) -> str:
    means = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    return "gray" if np.ptp(means) < GRAY_SPREAD else COLOURS[int(np.argmax(means))]


@dataclass(frozen=True)
class PerceptionExample:
    image: Image.Image
    family: str  # a name in DISTORTIONS, or CLEAN
    colour: str  # of the undistorted view


def perception_examples(
    photos: Sequence[Image.Image], families: Sequence[str], rng: np.random.Generator, count: int, size: int
) -> list[PerceptionExample]:
    """Fresh examples: a random view of a random photo with a random family at a random strength."""
    examples = []
    for _ in range(count):
        view = random_view(photos[int(rng.integers(len(photos)))], rng, size)
        family = (CLEAN, *families)[int(rng.integers(len(families) + 1))]
        image = view
        if family != CLEAN:
            distortion = DISTORTIONS[family]
            # Log-uniform over the benchmark's strength range: continuous, so no level is ever a target.
            low, high = sorted((distortion.mildest, distortion.strongest))
            image = distortion.apply(view, float(np.exp(rng.uniform(np.log(low), np.log(high)))), rng)
        examples.append(PerceptionExample(image, family, dominant_colour(view)))
    return examples


def question_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answer_ids(processor, text: str) -> list[int]:
    """Token ids of an assistant answer, ending with the end-of-turn token the engines stop on."""
    return processor.tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]


def perception_samples(processor, examples: Sequence[PerceptionExample], rng: np.random.Generator):
    """Each example asks, at random, the family or the colour question, with its answer as completion."""
    prompts = {q: question_prompt(processor, q) for q in (FAMILY_QUESTION, COLOUR_QUESTION)}
    samples = []
    for example in examples:
        if rng.random() < 0.5:
            prompt, answer = prompts[FAMILY_QUESTION], FAMILY_WORDS[example.family]
        else:
            prompt, answer = prompts[COLOUR_QUESTION], example.colour
        samples.append(PolicySample(example.image, prompt, [answer_ids(processor, answer)]))
    return samples


def cold_start_answer(rng: np.random.Generator, decimals: int = 2) -> str:
    """A well-formed answer whose score is a uniform draw from the grid of `decimals` decimals in [1, 5],
    independent of the image."""
    if decimals < 0:
        raise ValueError(f"cold_start_score_decimals must be 0 or more, got {decimals}")
    steps = 4 * 10**decimals
    score = 1 + int(rng.integers(steps + 1)) / 10**decimals
    thought = THOUGHTS[int(rng.integers(len(THOUGHTS)))]
    return f"{cold_start_prefix(thought)}{score:.{decimals}f}</answer>"


def cold_start_prefix(thought: str) -> str:
    """The cold start's completion up to its score: the thought, then the opening answer tag."""
    return f"<think> {thought} </think> <answer>"


# ---------------------------------------------------------------- model pieces


def load_model(path: str | Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)


def pooled_vision_features(model, processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """(n, 2 * hidden): mean and std over each image's merged vision tokens (what the LM is given)."""
    encoded = processor.image_processor(images=list(images), return_tensors="pt")
    tokens = vision_tower(model)(encoded["pixel_values"], grid_thw=encoded["image_grid_thw"]).pooler_output
    merge = vision_tower(model).spatial_merge_size ** 2
    per_image = (encoded["image_grid_thw"].prod(dim=1) // merge).tolist()
    pooled = [torch.cat([t.mean(0), t.std(0)]) for t in torch.split(tokens, per_image)]
    return torch.stack(pooled)


def answer_loss(model, processor, samples: Sequence[PolicySample]) -> torch.Tensor:
    """Mean negative log-likelihood of the completion tokens, with the learner's own log-prob code."""
    (batch,) = build_micro_batches(processor, samples, micro_batch_size=len(samples))
    logp, mask = completion_logprobs(model, batch, pad_token(processor))
    return -(logp * mask).sum() / mask.sum()


def _train(
    desc: str,
    parameters: list[torch.nn.Parameter],
    lr: float,
    steps: int,
    loss_of_step: Callable[[int], torch.Tensor],
) -> list[float]:
    """AdamW with gradient clipping, linear warm-up then cosine decay to LR_FLOOR * lr; returns the losses."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, round(WARMUP_SHARE * steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses = []
    with tqdm(range(steps), desc=desc, unit="step") as bar:
        for step in bar:
            loss = loss_of_step(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


def image_statistics(image: Image.Image) -> np.ndarray:
    """Six low-level statistics of an image's own pixels, the kind a quality-aware eye tracks: log
    variance of the Laplacian (sharpness), robust noise sigma of the diagonal high-pass (Donoho's MAD),
    log RMS contrast, 8-px block-edge excess of horizontal gradients (JPEG blocking), log colourfulness
    (Hasler and Suesstrunk) and log mean gradient magnitude."""
    rgb = np.asarray(image, dtype=np.float64)
    gray = rgb @ np.array([0.299, 0.587, 0.114])
    laplacian = 4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]
    diagonal = gray[1:, 1:] - gray[:-1, 1:] - gray[1:, :-1] + gray[:-1, :-1]
    dx, dy = np.abs(np.diff(gray, axis=1)), np.abs(np.diff(gray, axis=0))
    on_block_edge = np.arange(dx.shape[1]) % 8 == 7
    red_green = rgb[..., 0] - rgb[..., 1]
    yellow_blue = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colourfulness = np.hypot(red_green.std(), yellow_blue.std()) + 0.3 * np.hypot(
        red_green.mean(), yellow_blue.mean()
    )
    return np.array(
        [
            np.log1p(laplacian.var()),
            np.log1p(np.median(np.abs(diagonal)) / 0.6745),
            np.log1p(gray.std()),
            np.log((dx[:, on_block_edge].mean() + 1) / (dx[:, ~on_block_edge].mean() + 1)),
            np.log1p(colourfulness),
            np.log1p(dx.mean() + dy.mean()),
        ]
    )


def _train_with_vision_frozen(
    model, desc: str, lr: float, steps: int, loss_of_step: Callable[[int], torch.Tensor]
) -> list[float]:
    """`_train` on every parameter but the vision tower's, which stays as it is (and trainable after)."""
    vision_tower(model).requires_grad_(False)
    try:
        parameters = [p for p in model.parameters() if p.requires_grad]
        return _train(desc, parameters, lr, steps, loss_of_step)
    finally:
        vision_tower(model).requires_grad_(True)


def pretrain_vision(model, processor, photos, recipe: BaseModelRecipe) -> list[float]:
    """Stage 1: vision tower + linear colour and image-statistics heads on pooled features (heads
    discarded). The statistics are standardised with a fixed calibration batch of fresh examples."""
    rng = np.random.default_rng([recipe.seed, 1])
    torch.manual_seed(recipe.seed)
    calibration = np.stack(
        [
            image_statistics(e.image)
            for e in perception_examples(
                photos, recipe.families, np.random.default_rng([recipe.seed, 0]), 512, recipe.image_size
            )
        ]
    )
    mean, std = calibration.mean(axis=0), calibration.std(axis=0) + 1e-6
    width = 2 * model.config.vision_config.out_hidden_size
    colour_head = torch.nn.Linear(width, len(COLOURS))
    statistics_head = torch.nn.Linear(width, len(mean))
    parameters = [*vision_tower(model).parameters(), *colour_head.parameters(), *statistics_head.parameters()]

    def loss_of_step(step: int) -> torch.Tensor:
        examples = perception_examples(photos, recipe.families, rng, recipe.batch_size, recipe.image_size)
        features = pooled_vision_features(model, processor, [e.image for e in examples])
        colours = torch.tensor([COLOURS.index(e.colour) for e in examples])
        statistics = np.stack([image_statistics(e.image) for e in examples])
        targets = torch.tensor((statistics - mean) / std, dtype=torch.float32)
        return torch.nn.functional.cross_entropy(
            colour_head(features), colours
        ) + torch.nn.functional.mse_loss(statistics_head(features), targets)

    return _train("vision pretraining", parameters, recipe.vision_lr, recipe.vision_steps, loss_of_step)


def pretrain_perception(model, processor, photos, recipe: BaseModelRecipe) -> list[float]:
    """Stage 2: with the vision tower frozen (its features stay as measured), the model answers the
    family / colour questions as text."""
    rng = np.random.default_rng([recipe.seed, 2])
    torch.manual_seed(recipe.seed)

    def loss_of_step(step: int) -> torch.Tensor:
        examples = perception_examples(photos, recipe.families, rng, recipe.batch_size, recipe.image_size)
        return answer_loss(model, processor, perception_samples(processor, examples, rng))

    return _train_with_vision_frozen(
        model, "perception pretraining", recipe.perception_lr, recipe.perception_steps, loss_of_step
    )


def train_cold_start(model, processor, photos, recipe: BaseModelRecipe) -> list[float]:
    """Stage 3: the published prompt answered in format with random scores; perception mixed in."""
    rng = np.random.default_rng([recipe.seed, 3])
    torch.manual_seed(recipe.seed)
    prompt = build_prompt_text(processor, thinking=True)
    perception_count = round(recipe.cold_start_batch_size * recipe.cold_start_perception_share)
    format_count = recipe.cold_start_batch_size - perception_count

    def loss_of_step(step: int) -> torch.Tensor:
        examples = perception_examples(
            photos, recipe.families, rng, recipe.cold_start_batch_size, recipe.image_size
        )
        samples = [
            PolicySample(
                e.image,
                prompt,
                [answer_ids(processor, cold_start_answer(rng, recipe.cold_start_score_decimals))],
            )
            for e in examples[:format_count]
        ]
        samples += perception_samples(processor, examples[format_count:], rng)
        return answer_loss(model, processor, samples)

    return _train_with_vision_frozen(
        model, "format cold start", recipe.cold_start_lr, recipe.cold_start_steps, loss_of_step
    )


# ---------------------------------------------------------------- checkpoints


def _save(model, source: Path, folder: Path, recipe: BaseModelRecipe, stage: str, record: dict) -> None:
    """The model's weights plus the source checkpoint's tokenizer, processor and generation config."""
    model.save_pretrained(folder)
    for item in source.iterdir():
        if item.is_file() and not item.name.startswith(("model", "config.json", "vqr1_")):
            shutil.copy2(item, folder / item.name)
    (folder / "vqr1_recipe.json").write_text(
        json.dumps(
            {"stage": stage, "recipe": asdict(recipe), "version": BASE_MODEL_VERSION, **record}, indent=2
        )
    )


def _random_init(recipe: BaseModelRecipe, cache_dir: Path) -> Path:
    return build_checkpoint(
        recipe.preset, cache_dir, min_pixels=recipe.min_pixels, max_pixels=recipe.max_pixels, seed=recipe.seed
    )


def base_checkpoint(
    recipe: BaseModelRecipe = BaseModelRecipe(), cache_dir: str | Path = DEFAULT_CACHE_DIR
) -> Path:
    """The perception-pretrained base model's folder, trained on first use (minutes) and cached."""
    cache_dir = Path(cache_dir)
    source = _random_init(recipe, cache_dir)

    def write(folder: Path) -> None:
        model = load_model(source).train()
        processor = load_processor(source, recipe.min_pixels, recipe.max_pixels)
        photos = training_photos(recipe)
        start = time.perf_counter()
        vision_losses = pretrain_vision(model, processor, photos, recipe)
        perception_losses = pretrain_perception(model, processor, photos, recipe)
        record = {
            "wall_s": round(time.perf_counter() - start, 1),
            "torch_threads": torch.get_num_threads(),
            "final_loss": {
                "vision": np.mean(vision_losses[-20:]),
                "perception": np.mean(perception_losses[-20:]),
            },
        }
        _save(model, source, folder, recipe, "base", record)

    return build_folder(cache_dir / f"base-{recipe.preset}-{recipe.base_key()}", write, is_checkpoint)


def cold_start_checkpoint(
    recipe: BaseModelRecipe = BaseModelRecipe(),
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    start: str | Path | None = None,
) -> Path:
    """The format cold start: where GRPO starts. Trained on top of `start` (a checkpoint folder; default
    the recipe's base model, built first), on first use, and cached under the recipe and the start's
    weights."""
    cache_dir = Path(cache_dir)
    if start is None:
        source, start_record, key = base_checkpoint(recipe, cache_dir), {}, recipe.cold_start_key()
    else:
        source = Path(start)
        start_record = {"start": str(source), "start_sha256": file_sha256(source / "model.safetensors")}
        key = _hash({"recipe": recipe.cold_start_key(), "start": start_record["start_sha256"]})

    def write(folder: Path) -> None:
        model = load_model(source).train()
        processor = load_processor(source, recipe.min_pixels, recipe.max_pixels)
        start_time = time.perf_counter()
        losses = train_cold_start(model, processor, training_photos(recipe), recipe)
        record = {
            **start_record,
            "wall_s": round(time.perf_counter() - start_time, 1),
            "torch_threads": torch.get_num_threads(),
            "final_loss": np.mean(losses[-20:]),
        }
        _save(model, source, folder, recipe, "cold_start", record)

    return build_folder(cache_dir / f"cold-start-{recipe.preset}-{key}", write, is_checkpoint)


def cold_start_for_run(config, start: Path) -> Path:
    """config.model.cold_start on top of `start`, on the training references of the run's built-in
    benchmark (its size, families and split), cached under the recipe and the start's weights. The
    recipe's own seed, not the run's: every seed of a proof starts from the same policy."""
    data, model = config.data, config.model
    recipe = replace(
        BaseModelRecipe(),
        preset=model.preset or BaseModelRecipe.preset,
        min_pixels=model.min_pixels,
        max_pixels=model.max_pixels,
        image_size=data.builtin_size,
        families=tuple(data.builtin_families),
        split_ratios=tuple(data.split_ratios),
        split_seed=data.split_seed,
        cold_start_steps=model.cold_start.steps,
        cold_start_score_decimals=model.cold_start.score_decimals,
    )
    return cold_start_checkpoint(recipe, config.data.models_cache_dir, start)


# ---------------------------------------------------------------- measurements


@dataclass(frozen=True)
class LabelledImages:
    images: list[Image.Image]
    mos: np.ndarray
    families: list[str]


def benchmark_images(recipe: BaseModelRecipe) -> tuple[LabelledImages, LabelledImages]:
    """(training references' images, held-out = val + test references' images) of the benchmark."""
    splits = benchmark_splits(recipe)

    def labelled(rows) -> LabelledImages:
        families = [Path(path).stem.rsplit("_", 2)[1] for path in rows["image"]]
        return LabelledImages([load_image(p) for p in rows["image"]], np.asarray(rows["mos"]), families)

    from datasets import concatenate_datasets

    return labelled(splits["train"]), labelled(concatenate_datasets([splits["val"], splits["test"]]))


def _batched(items: Sequence, size: int):
    return (items[start : start + size] for start in range(0, len(items), size))


@torch.no_grad()
def vision_probes(model, processor, train: LabelledImages, held_out: LabelledImages) -> dict:
    """Probes on pooled vision features, fitted on training references, scored on held-out ones: linear
    (ridge) and nonlinear (gradient boosting; MOS is a different function of the features per family,
    so the linear probe understates what the language model can read out) to MOS, and the family."""
    from scipy.stats import spearmanr
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def features(images: LabelledImages) -> np.ndarray:
        chunks = [pooled_vision_features(model, processor, chunk) for chunk in _batched(images.images, 64)]
        return torch.cat(chunks).numpy()

    x_train, x_held_out = features(train), features(held_out)
    ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    mos_pred = ridge.fit(x_train, train.mos).predict(x_held_out)
    boosted_pred = GradientBoostingRegressor(random_state=0).fit(x_train, train.mos).predict(x_held_out)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    family_pred = classifier.fit(x_train, train.families).predict(x_held_out)
    return {
        "probe_mos_srcc": float(spearmanr(mos_pred, held_out.mos).statistic),
        "nonlinear_probe_mos_srcc": float(spearmanr(boosted_pred, held_out.mos).statistic),
        "probe_family_accuracy": float(np.mean(family_pred == np.asarray(held_out.families))),
    }


@torch.no_grad()
def answered_family_accuracy(model, processor, held_out: LabelledImages, families: Sequence[str]) -> float:
    """Accuracy of the model's own answer to the family question: the most likely family word."""
    prompt = question_prompt(processor, FAMILY_QUESTION)
    candidates = [answer_ids(processor, FAMILY_WORDS[f]) for f in families]
    correct = 0
    for start in tqdm(range(0, len(held_out.images), 16), desc="family answers", unit="batch"):
        images = held_out.images[start : start + 16]
        samples = [PolicySample(image, prompt, candidates) for image in images]
        (batch,) = build_micro_batches(processor, samples, micro_batch_size=len(samples) * len(candidates))
        logp, _ = completion_logprobs(model, batch, pad_token(processor))
        choice = logp.sum(dim=1).view(len(images), len(candidates)).argmax(dim=1)
        truth = held_out.families[start : start + 16]
        correct += sum(families[int(c)] == t for c, t in zip(choice, truth, strict=True))
    return correct / len(held_out.images)


@torch.no_grad()
def sampled_answers(
    model, processor, images: Sequence[Image.Image], num_samples: int, seed: int, max_new_tokens: int = 48
) -> list[list[str]]:
    """num_samples completions per image of the published prompt: temperature 1, no top-k / top-p, vision
    special tokens suppressed (the rollout engine's settings)."""
    prompt = build_prompt_text(processor, thinking=True)
    tokenizer = processor.tokenizer
    suppressed = [tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]
    torch.manual_seed(seed)
    texts = []
    for chunk in tqdm(list(_batched(images, 8)), desc="sampling", unit="batch"):
        inputs = processor(text=[prompt] * len(chunk), images=list(chunk), return_tensors="pt")
        output = model.generate(
            **inputs,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=num_samples,
            max_new_tokens=max_new_tokens,
            suppress_tokens=suppressed,
        )
        decoded = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        texts += [decoded[i : i + num_samples] for i in range(0, len(decoded), num_samples)]
    return texts


def score_answers(answers: list[list[str]], mos: np.ndarray) -> dict:
    """Parse rate (a number in [1, 5] in the answer), format rate, score spread and SRCC/PLCC vs MOS."""
    from iqa.metrics import evaluate_scores

    flat = [text for per_image in answers for text in per_image]
    parsed = [[extract_score(t) for t in per_image] for per_image in answers]
    valid = [[s for s in scores if s is not None and 1.0 <= s <= 5.0] for scores in parsed]
    # An image whose samples all failed gets the midpoint, as iqa.evaluate does.
    means = np.array([np.mean(scores) if scores else 3.0 for scores in valid])
    spreads = [np.std(scores, ddof=1) for scores in valid if len(scores) > 1]
    metrics = evaluate_scores(means, mos, bootstrap=0)
    return {
        "parse_rate": sum(map(len, valid)) / len(flat),
        "format_rate": float(format_reward(flat).mean()),
        "score_spread_within_image": float(np.mean(spreads)) if spreads else math.nan,
        "srcc": metrics["srcc"],
        "plcc": metrics["plcc"],
        "example": flat[0],
    }


def measure(path: Path, recipe: BaseModelRecipe, *, answers: bool, num_samples: int = 8) -> dict:
    """The measurements of one checkpoint on the benchmark (held-out = val + test references)."""
    model = load_model(path).eval()
    processor = load_processor(path, recipe.min_pixels, recipe.max_pixels)
    train, held_out = benchmark_images(recipe)
    result = {"held_out_images": len(held_out.images), **vision_probes(model, processor, train, held_out)}
    result["answered_family_accuracy"] = answered_family_accuracy(model, processor, held_out, recipe.families)
    if answers:
        sampled = sampled_answers(model, processor, held_out.images, num_samples, seed=recipe.seed)
        result.update(score_answers(sampled, held_out.mos))
    return result


def add_base_model_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "base-model",
        help="build (or reuse) the base model and its format cold start, measure them, copy them out",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default=BaseModelRecipe.preset, help="model preset of vlm.factory")
    parser.add_argument("--seed", type=int, default=BaseModelRecipe.seed)
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    parser.add_argument(
        "--out", type=Path, help="copy the base and cold-start checkpoints to DIR/base, DIR/cold-start"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-measure", action="store_true", help="build only; skip the measurements")
    parser.add_argument(
        "--cold-start-from",
        type=Path,
        help="run only the format cold start, on top of this checkpoint folder instead of the base model",
    )
    parser.add_argument("--cold-start-steps", type=int, default=BaseModelRecipe.cold_start_steps)
    parser.add_argument(
        "--score-decimals",
        type=int,
        default=BaseModelRecipe.cold_start_score_decimals,
        help="decimals of the cold start's random scores (0: whole numbers)",
    )
    parser.set_defaults(handler=run_base_model)


def run_base_model(args) -> int:
    torch.set_num_threads(args.threads)
    recipe = replace(
        BaseModelRecipe(),
        preset=args.preset,
        seed=args.seed,
        cold_start_steps=args.cold_start_steps,
        cold_start_score_decimals=args.score_decimals,
    )
    if args.cold_start_from is None:
        checkpoints = {
            "random_init": _random_init(recipe, Path(args.cache_dir)),
            "base": base_checkpoint(recipe, args.cache_dir),
            "cold_start": cold_start_checkpoint(recipe, args.cache_dir),
        }
    else:
        checkpoints = {"cold_start": cold_start_checkpoint(recipe, args.cache_dir, args.cold_start_from)}
    for stage, path in checkpoints.items():
        print(f"{stage}: {path}")
    if not args.no_measure:
        report = {
            stage: measure(path, recipe, answers=stage == "cold_start") for stage, path in checkpoints.items()
        }
        print(json.dumps(report, indent=2))
    if args.out is not None:
        for stage in [stage for stage in checkpoints if stage != "random_init"]:
            target = args.out / stage.replace("_", "-")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(checkpoints[stage], target)
            print(f"copied {stage} to {target}")
    return 0
