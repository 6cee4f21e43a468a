"""IQA metrics against scipy and known values; the logistic mapping and its fallback; bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import kendalltau, pearsonr, spearmanr

from iqa.metrics import evaluate_scores, fit_logistic, logistic4, within_group_srcc


@pytest.fixture
def noisy():
    rng = np.random.default_rng(0)
    mos = rng.uniform(1, 5, 200)
    pred = 2 + np.tanh(mos - 3) + rng.normal(0, 0.3, 200)
    return pred, mos


def test_correlations_equal_scipy(noisy):
    pred, mos = noisy
    result = evaluate_scores(pred, mos, bootstrap=0)
    assert result["srcc"] == pytest.approx(spearmanr(pred, mos).statistic, abs=1e-12)
    assert result["krcc"] == pytest.approx(kendalltau(pred, mos).statistic, abs=1e-12)
    assert result["plcc_raw"] == pytest.approx(pearsonr(pred, mos).statistic, abs=1e-12)
    mapped = logistic4(pred, *result["fit_params"])
    assert result["plcc"] == pytest.approx(pearsonr(mapped, mos).statistic, abs=1e-12)
    assert result["rmse"] == pytest.approx(math.sqrt(np.mean((mapped - mos) ** 2)), abs=1e-12)
    assert result["fit"] == "logistic4" and result["n"] == 200


def test_known_values_on_an_exact_logistic_relation():
    pred = np.linspace(-3, 3, 50)
    mos = logistic4(pred, 4.8, 1.2, 0.5, 0.7)
    result = evaluate_scores(pred, mos, bootstrap=0)
    assert result["srcc"] == pytest.approx(1.0) and result["krcc"] == pytest.approx(1.0)
    assert result["plcc"] == pytest.approx(1.0, abs=1e-9) and result["rmse"] == pytest.approx(0.0, abs=1e-6)
    assert result["fit_params"] == pytest.approx([4.8, 1.2, 0.5, 0.7], abs=1e-4)
    assert result["plcc_raw"] < 0.99  # the raw relation is not linear: the mapping matters


def test_inverted_ranking_gives_negative_plcc():
    pred = np.linspace(1, 5, 30)
    result = evaluate_scores(-pred, pred, bootstrap=0)
    assert result["srcc"] == pytest.approx(-1.0) and result["plcc"] == pytest.approx(-1.0, abs=1e-6)


def test_linear_fallback_when_the_logistic_does_not_converge(noisy):
    pred, mos = noisy
    fit, params = fit_logistic(pred, mos, max_evaluations=1)
    assert fit == "linear"
    assert params == pytest.approx(list(np.polyfit(pred, mos, 1)))


def test_constant_predictions_have_undefined_correlations():
    result = evaluate_scores(np.full(10, 3.0), np.arange(10.0), bootstrap=20)
    assert result["fit"] == "none"
    assert all(math.isnan(result[k]) for k in ("srcc", "krcc", "plcc", "plcc_raw"))
    assert result["rmse"] == pytest.approx(np.std(np.arange(10.0)))


def test_bootstrap_intervals_are_seeded_and_bracket_the_estimate(noisy):
    pred, mos = noisy
    first = evaluate_scores(pred, mos, bootstrap=300, seed=1)
    assert first == evaluate_scores(pred, mos, bootstrap=300, seed=1)
    assert first["srcc_ci95_low"] != evaluate_scores(pred, mos, bootstrap=300, seed=2)["srcc_ci95_low"]
    for name in ("srcc", "krcc", "plcc", "plcc_raw", "rmse"):
        assert first[f"{name}_ci95_low"] <= first[name] <= first[f"{name}_ci95_high"], name
    wide = evaluate_scores(pred[:30], mos[:30], bootstrap=300, seed=1)
    assert wide["srcc_ci95_high"] - wide["srcc_ci95_low"] > first["srcc_ci95_high"] - first["srcc_ci95_low"]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="equal length"):
        evaluate_scores([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 3"):
        evaluate_scores([1, 2], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        evaluate_scores([1, float("nan"), 3], [1, 2, 3])


def test_within_group_srcc_is_the_mean_of_each_groups_spearman():
    rng = np.random.default_rng(3)
    groups = np.repeat(["a", "b", "c"], [6, 5, 4])
    mos = rng.uniform(1, 5, size=15)
    pred = mos + rng.normal(0, 1.0, size=15) + np.repeat([0.0, 3.0, -3.0], [6, 5, 4])
    value, counted = within_group_srcc(pred, mos, groups)
    reference = np.mean([spearmanr(pred[groups == g], mos[groups == g]).statistic for g in "abc"])
    assert counted == 3 and value == pytest.approx(reference)


def test_within_group_srcc_ignores_content_offsets_the_overall_srcc_counts():
    mos = np.tile([1.0, 2.0, 3.0, 4.0], 3)
    groups = np.repeat(["a", "b", "c"], 4)
    pred = mos * 0.1 + np.repeat([0.0, 1.0, 2.0], 4)  # every photo ranked right, photos far apart
    assert within_group_srcc(pred, mos, groups) == (pytest.approx(1.0), 3)
    assert evaluate_scores(pred, mos, bootstrap=0)["srcc"] < 0.9


def test_within_group_srcc_edge_cases():
    mos = np.array([1.0, 2.0, 3.0, 2.0, 2.0, 2.0, 1.0, 5.0])
    groups = np.array(["tied", "tied", "tied", "same_mos", "same_mos", "same_mos", "small", "small"])
    pred = np.array([2.0, 2.0, 2.0, 1.0, 2.0, 3.0, 1.0, 2.0])
    # "tied": constant predictions rank nothing (0); "same_mos": nothing to rank; "small": under 3 rows.
    assert within_group_srcc(pred, mos, groups) == (0.0, 1)
    value, counted = within_group_srcc(pred[3:], mos[3:], groups[3:])
    assert math.isnan(value) and counted == 0
    with pytest.raises(ValueError, match="equal length"):
        within_group_srcc(pred, mos, groups[:-1])
