"""The training-curves PNG, the moving average drawn over noisy per-step metrics, the step log line."""

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
    evaluations = {0: {"srcc": 0.0, "srcc_expected": 0.1}, 5: {"srcc": 0.4, "srcc_expected": 0.5}}
    path = plot_training_curves(history, evaluations, tmp_path / "curves" / "training_curves.png")
    with Image.open(path) as image:
        width, height = image.size
    assert path.is_file() and width > height * (len(PANELS) + 1) / 2


STEP_METRICS = {
    "reward/total_mean": 1.5,
    "reward/fidelity_mean": 0.7,
    "reward/format_mean": 0.8,
    "reward/parse_failure_rate": 0.0,
    "score/spread_within_image": 1.1,
    "score/batch_srcc": 0.25,
    "learner/kl": 0.01,
    "learner/loss": 0.002,
    "time/generate_s": 2.0,
    "time/generate_wait_s": 0.1,
    "time/train_s": 7.0,
    "async/staleness_mean": 1.0,
    "time/weight_push_s": 0.1,
    "perf/rollout_tokens_per_s": 1300.0,
}


def test_step_line_shows_the_training_batch_srcc():
    from cluster.train import step_line

    line = step_line(3, 30, STEP_METRICS)
    assert line.startswith("step 3/30 |") and "| batch srcc +0.25 |" in line
    assert "batch srcc +nan" in step_line(3, 30, STEP_METRICS | {"score/batch_srcc": float("nan")})


def test_step_line_ends_with_the_time_left():
    from cluster.train import step_line

    line = step_line(3, 30, STEP_METRICS, [20.0, 8.0, 8.0])
    assert line.startswith("step 3/30 |") and line.endswith("tok/s | eta 3m36s")
    assert step_line(30, 30, STEP_METRICS, [8.0] * 30).endswith("tok/s")  # the last step: nothing left
    assert step_line(3, 30, STEP_METRICS).endswith("tok/s")


def test_overlap_seconds_counts_time_covered_by_both_lists_once():
    from cluster.train import overlap_seconds

    # Two generation shards overlapping each other (1-4 and 2-5: 1-5 once) against training 3-4.5 and 4.8-9.
    assert overlap_seconds([(1.0, 4.0), (2.0, 5.0)], [(3.0, 4.5), (4.8, 9.0)]) == pytest.approx(1.5 + 0.2)
    assert overlap_seconds([(0.0, 1.0)], [(1.0, 2.0)]) == 0.0
    assert overlap_seconds([(0.0, 1.0)], []) == 0.0


def test_summary_table_shows_a_dash_where_nothing_was_measured(capsys):
    """A value that could not be computed (NaN: e.g. no image with two parsed scores) or was not measured
    reads "-", as the console test's line kinds expect; the others keep three decimals."""
    from cluster.train import print_summary

    class Tracker:
        def describe(self) -> str:
            return "MLflow run abc in sqlite:///mlflow.db"

    before = {"srcc": 0.0921, "spread_within_image": 1.2}
    after = {"srcc": 0.4419, "spread_within_image": float("nan")}
    print_summary(before, after, "outputs/checkpoint", Tracker())
    rows = {
        line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line[:2] == "  "
    }
    assert rows["srcc"] == ["0.092", "0.442"]
    assert rows["spread_within_image"] == ["1.200", "-"]
    assert rows["plcc"] == ["-", "-"]
