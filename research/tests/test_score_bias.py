"""research.score_bias: fixed-thought scores are digit expectations that follow the image."""

from __future__ import annotations

from configs.runtime_env import apply_default_env

apply_default_env()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from configs.schema import ModelConfig  # noqa: E402
from learner.policy import load_policy_model  # noqa: E402
from research.score_bias import fixed_thought_scores  # noqa: E402
from vlm.factory import build_checkpoint, load_processor  # noqa: E402

MIN_PIXELS, MAX_PIXELS = 3136, 12544


@pytest.fixture(scope="module")
def model_and_processor(tmp_path_factory):
    path = build_checkpoint(
        "tiny", tmp_path_factory.mktemp("models"), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )
    model = load_policy_model(path, ModelConfig(), torch.float32, trainable=False)
    return model, load_processor(path, MIN_PIXELS, MAX_PIXELS)


def test_fixed_thought_scores_are_digit_expectations_that_follow_the_image(model_and_processor):
    model, processor = model_and_processor
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(3)]
    scores = fixed_thought_scores(model, processor, images, thoughts=("a", "b c"))
    assert scores.shape == (3, 2)
    assert np.all((scores > 1.0) & (scores < 5.0))
    np.testing.assert_array_equal(
        scores, fixed_thought_scores(model, processor, images, thoughts=("a", "b c"))
    )
    assert np.ptp(scores[:, 0]) > 0  # a random model still passes some of the image to the answer
    assert np.ptp(scores[0]) > 0  # and of the thought
