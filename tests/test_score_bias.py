"""bench.score_bias: image statistics by their definitions; fixed-thought scores are digit expectations
that follow the image."""

from __future__ import annotations

from cluster.runtime_env import apply_default_env

apply_default_env()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.score_bias import fixed_thought_scores, image_statistics  # noqa: E402
from configs.schema import ModelConfig  # noqa: E402
from learner.model_factory import build_checkpoint, load_processor  # noqa: E402
from learner.policy import load_policy_model  # noqa: E402

MIN_PIXELS, MAX_PIXELS = 3136, 12544


def test_image_statistics_of_a_flat_and_a_striped_image():
    flat = Image.new("L", (8, 8), 100)
    np.testing.assert_allclose(image_statistics(flat), [0.0, 0.0, 100.0])
    stripes = np.zeros((8, 8), dtype=np.uint8)
    stripes[:, ::2] = 200  # columns alternate 200, 0: every horizontal step is 200, no vertical one
    np.testing.assert_allclose(image_statistics(Image.fromarray(stripes)), [100.0, 200.0, 100.0])


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
