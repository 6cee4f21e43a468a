"""IQA metrics against scipy and known values; the logistic mapping and its fallback; bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import kendalltau, pearsonr, spearmanr

from iqa.metrics import evaluate_scores, fit_logistic, logistic4


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
