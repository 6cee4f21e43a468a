"""The learning-proof summary: per-run changes, the seeds' mean and spread, the evaluation noise, the control."""

import math
from pathlib import Path

import pytest

from cluster.proof import format_table, run_plan, summarize


def result(before_srcc, after_srcc, before_plcc=0.0, after_plcc=0.0):
    return {
        "before": {"srcc": before_srcc, "plcc": before_plcc},
        "after": {"srcc": after_srcc, "plcc": after_plcc},
    }


def test_summary_of_seeds_and_control():
    summary = summarize(
        {
            "seed-0": result(0.1, 0.5, 0.2, 0.4),
            "seed-1": result(0.0, 0.6, 0.1, 0.5),
            "seed-2": result(0.2, 0.5, 0.0, 0.6),
            "control-seed-0": result(0.1, 0.05),
        }
    )
    srcc = summary["srcc"]
    assert srcc["mean_change"] == pytest.approx((0.4 + 0.6 + 0.3) / 3)
    assert srcc["sd_change"] == pytest.approx(0.152752523, rel=1e-6)
    assert srcc["sd_before"] == pytest.approx(0.1)
    assert srcc["control_change"] == pytest.approx(-0.05)
    assert summary["plcc"]["mean_change"] == pytest.approx((0.2 + 0.4 + 0.6) / 3)
    assert summary["runs"]["seed-1"]["srcc"] == pytest.approx({"before": 0.0, "after": 0.6, "change": 0.6})
    table = format_table(summary)
    assert "| seed-1 | 0.000 | 0.600 | +0.600 |" in table and "control change -0.050" in table


def test_one_seed_has_no_spread_and_no_control_is_nan():
    summary = summarize({"seed-0": result(0.1, 0.2)})
    assert summary["srcc"]["mean_change"] == pytest.approx(0.1)
    assert math.isnan(summary["srcc"]["sd_change"]) and math.isnan(summary["srcc"]["control_change"])
    assert "nan" not in format_table(summary) and "mean change over seeds +0.100" in format_table(summary)


def test_plan_runs_each_seed_then_the_permuted_label_control_in_its_own_folder():
    plan = dict(run_plan([3, 4], Path("/o"), control="also"))
    assert list(plan) == ["seed-3", "seed-4", "control-seed-3"]
    assert "train.seed=4" in plan["seed-4"] and "reward.permute_labels=true" not in plan["seed-4"]
    # Each seed draws its own evaluation samples (the seeds' "before" measure the evaluation's noise).
    assert {"rollout.seed=4", "eval.seed=4"} <= set(plan["seed-4"])
    assert "reward.permute_labels=true" in plan["control-seed-3"] and "train.seed=3" in plan["control-seed-3"]
    assert "train.output_dir=/o/control-seed-3" in plan["control-seed-3"]


def test_expected_score_metrics_are_reported_only_where_every_run_has_them():
    with_expected = {
        "before": {"srcc": 0.0, "plcc": 0.0, "srcc_expected": 0.01, "plcc_expected": 0.02},
        "after": {"srcc": 0.2, "plcc": 0.1, "srcc_expected": 0.41, "plcc_expected": 0.32},
    }
    both = summarize({"seed-0": with_expected, "seed-1": with_expected})
    assert both["metrics"] == ["srcc", "plcc", "srcc_expected", "plcc_expected"]
    assert both["srcc_expected"]["mean_change"] == pytest.approx(0.40)
    assert "SRCC_EXPECTED before" in format_table(both)
    mixed = summarize({"seed-0": with_expected, "seed-1": result(0.0, 0.1)})
    assert mixed["metrics"] == ["srcc", "plcc"] and "srcc_expected" not in mixed


def test_control_alone_reports_its_change_and_no_seed_mean():
    table = format_table(summarize({"control-seed-0": result(0.131, -0.026)}))
    assert "SRCC: control change -0.157" in table and "nan" not in table


def test_control_only_plan_is_the_permuted_label_run_alone():
    plan = dict(run_plan([3, 4], Path("/o"), control="only"))
    assert list(plan) == ["control-seed-3"] and "reward.permute_labels=true" in plan["control-seed-3"]


def test_plan_without_control_runs_only_the_seeds():
    plan = dict(run_plan([3], Path("/o"), control="none"))
    assert list(plan) == ["seed-3"] and "reward.permute_labels=true" not in plan["seed-3"]
