"""The training-curves PNG and the moving average drawn over noisy per-step metrics."""

import math

import pytest
from PIL import Image

from cluster.curves import PANELS, moving_average, plot_training_curves


def test_moving_average_matches_a_plain_window_mean_and_skips_nan():
    values = [1.0, 3.0, float("nan"), 5.0, 7.0]
    # Windows of the last 2 non-NaN values: [1], [1, 3], [1, 3], [3, 5], [5, 7].
    assert moving_average(values, 2) == pytest.approx([1.0, 2.0, 2.0, 4.0, 6.0])
    leading = moving_average([float("nan"), 2.0], 3)
    assert math.isnan(leading[0]) and leading[1] == 2.0


def test_training_curves_png_has_a_panel_per_metric_group_and_held_out_srcc(tmp_path):
    history = [
        {"step": s, "reward/total_mean": 1.0 + s / 10, "score/batch_srcc": float("nan") if s == 2 else s / 10}
        for s in range(1, 6)
    ]
    path = plot_training_curves(history, {0: 0.0, 5: 0.4}, tmp_path / "curves" / "training_curves.png")
    with Image.open(path) as image:
        width, height = image.size
    assert path.is_file() and width > height * (len(PANELS) + 1) / 2
