"""A model's image bias without the thought's sampling noise: the expected first score digit per image
when the thought is fixed to each of the cold start's thoughts (issue 8).

A held-out evaluation averages 8 sampled thoughts per image, and the score's dependence on the thought
(~0.03 across images in the cold start) hides any smaller dependence on the image. Teacher-forcing
`<think> {thought} </think> <answer>` and reading the digit distribution removes that noise, so this
says what ranking of the images the model itself carries, and which low-level image statistic it
follows (the base model's six pixel statistics, `models.base_model.image_statistics`).

    python -m research.score_bias --predictions EVAL/eval_before_predictions.csv --model COLD_START \
        [--compare TRAINED_CHECKPOINT]

--predictions is a `make eval` CSV (its image paths and MOS); with --compare the table adds the second
model and the per-image change from the first to it.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr

from iqa.images import load_image
from models.base_model import THOUGHTS, cold_start_prefix, image_statistics
from vlm.prompts import build_prompt_text
from vlm.tokens import token_id

# The names of models.base_model.image_statistics, in its order.
STATISTICS = ("sharpness", "noise", "contrast", "blockiness", "colourfulness", "gradient energy")


@torch.no_grad()
def fixed_thought_scores(model, processor, images: list[Image.Image], thoughts=THOUGHTS) -> np.ndarray:
    """(images, thoughts): E[first score digit] over 1..5 after `<think> {thought} </think> <answer>`."""
    prompt = build_prompt_text(processor, thinking=True)
    digits = [token_id(processor.tokenizer, str(d), "research.score_bias") for d in range(1, 6)]
    scores = np.empty((len(images), len(thoughts)))
    for i, image in enumerate(images):
        for t, thought in enumerate(thoughts):
            inputs = processor(
                text=[prompt + cold_start_prefix(thought)], images=[image], return_tensors="pt"
            )
            probs = torch.softmax(model(**inputs).logits[0, -1, digits].double(), dim=-1).numpy()
            scores[i, t] = probs @ np.arange(1, 6)
    return scores


def describe(name: str, scores: np.ndarray, mos: np.ndarray, statistics: np.ndarray) -> str:
    per_image = scores.mean(axis=1)
    per_thought = [spearmanr(scores[:, t], mos).statistic for t in range(scores.shape[1])]
    with_statistics = " | ".join(f"{spearmanr(per_image, column).statistic:+.3f}" for column in statistics.T)
    return (
        f"| {name} | {spearmanr(per_image, mos).statistic:+.3f} | {min(per_thought):+.3f} .. "
        f"{max(per_thought):+.3f} | {per_image.std():.4f} | {with_statistics} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=Path, required=True, help="a `make eval` predictions CSV")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--compare", type=Path, default=None)
    parser.add_argument("--config", default="cpu-default", help="preset for the processor's pixel limits")
    args = parser.parse_args(argv)

    from configs.load import load_config
    from learner.policy import load_policy_model
    from vlm.factory import load_processor

    config = load_config(args.config)
    with args.predictions.open() as handle:
        rows = list(csv.DictReader(handle))
    images = [load_image(row["image"]) for row in rows]
    mos = np.array([float(row["mos"]) for row in rows])
    statistics = np.stack([image_statistics(image) for image in images])

    def scores_of(path: Path) -> np.ndarray:
        processor = load_processor(path, config.model.min_pixels, config.model.max_pixels)
        model = load_policy_model(path, config.model, torch.float32, trainable=False)
        return fixed_thought_scores(model, processor, images)

    header = " | ".join(f"SRCC with {name}" for name in STATISTICS)
    print(f"\n{len(images)} images, {len(THOUGHTS)} fixed thoughts; SRCC of each image's mean over thoughts")
    print(f"| model | SRCC with MOS | per thought | spread across images | {header} |")
    print("|---|---|---|---|" + "---|" * len(STATISTICS))
    print(f"| MOS | +1.000 | | | {' | '.join(f'{spearmanr(mos, c).statistic:+.3f}' for c in statistics.T)} |")
    first = scores_of(args.model)
    print(describe(str(args.model), first, mos, statistics))
    if args.compare is not None:
        second = scores_of(args.compare)
        print(describe(str(args.compare), second, mos, statistics))
        print(describe("change", second - first, mos, statistics))


if __name__ == "__main__":
    main()
