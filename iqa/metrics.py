"""Agreement between predicted quality scores and MOS, as the IQA field reports it.

- SRCC: Spearman rank correlation; KRCC: Kendall's tau-b; PLCC_raw: Pearson on the raw predictions.
- PLCC and RMSE after the 4-parameter logistic mapping (VQEG) from prediction x to MOS:
      f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2
  fitted by least squares (scipy.optimize.curve_fit), started from b1, b2 = the MOS extremes (swapped
  when the ranking is inverted), b3 = mean(x), b4 = std(x) / 4. A decreasing fit (a model that ranks
  images inversely) would turn a bad model's PLCC positive, so PLCC carries the sign of the mapping's
  direction (b1 - b2, or the line's slope). Where the fit fails or is not finite,
  a least-squares line is used instead; the result's "fit" says which ("logistic4", "linear", or
  "none" for constant predictions, where the correlations are undefined, NaN).
- SRCC within reference (`within_group_srcc`): the mean over reference photos of the SRCC among that
  photo's distorted versions. It ignores every offset the model puts on a photo's content, which the
  overall SRCC counts; on a synthetic set whose photos share one MOS range, the gap between the two is
  what content costs the ranking.
- 95% bootstrap intervals: `bootstrap` resamples of the images with replacement (seeded), the 2.5th
  and 97.5th percentiles. For PLCC and RMSE the resamples reuse the mapping fitted on the whole set
  (refitting a thousand times would cost much and move the interval little).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.stats import kendalltau, rankdata
from tqdm import tqdm

METRICS = ("srcc", "krcc", "plcc", "plcc_raw", "rmse")
BOOTSTRAP_BLOCK = 100  # resamples per vectorised block (bounds memory at block x n floats)


def _sigmoid(x: np.ndarray, b3: float, b4: float) -> np.ndarray:
    z = np.clip(-(x - b3) / max(abs(b4), 1e-12), -500, 500)  # keeps exp finite for extreme x
    return 1 / (1 + np.exp(z))


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    return (b1 - b2) * _sigmoid(x, b3, b4) + b2


def _logistic4_jacobian(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    # Analytic: finite differences scale their step with |b|, so a parameter starting near 0 never moves.
    s = _sigmoid(x, b3, b4)
    slope = (b1 - b2) * s * (1 - s)
    width = max(abs(b4), 1e-12)
    return np.stack([s, 1 - s, -slope / width, -slope * (x - b3) * np.sign(b4) / width**2], axis=1)


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=-1) / denominator, np.nan)


def fit_logistic(pred: np.ndarray, mos: np.ndarray, max_evaluations: int = 20000) -> tuple[str, list[float]]:
    """("logistic4", [b1..b4]) or the fallback ("linear", [slope, intercept]) or ("none", [])."""
    if np.ptp(pred) == 0:
        return "none", []
    increasing = _rowwise_pearson(rankdata(pred), rankdata(mos)) >= 0
    high, low = float(mos.max()), float(mos.min())
    start = [high, low, float(pred.mean()), float(pred.std()) / 4]
    if not increasing:
        start[0], start[1] = low, high
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(
                logistic4, pred, mos, p0=start, jac=_logistic4_jacobian, maxfev=max_evaluations
            )
        if np.all(np.isfinite(params)) and np.all(np.isfinite(logistic4(pred, *params))):
            return "logistic4", [float(p) for p in params]
    except (RuntimeError, ValueError):
        pass  # no convergence: fall back to the line below
    slope, intercept = np.polyfit(pred, mos, 1)
    return "linear", [float(slope), float(intercept)]


def apply_fit(fit: str, params: list[float], pred: np.ndarray, mos_mean: float) -> np.ndarray:
    if fit == "logistic4":
        return logistic4(pred, *params)
    if fit == "linear":
        return params[0] * pred + params[1]
    return np.full_like(pred, mos_mean, dtype=np.float64)


def fit_direction(fit: str, params: list[float]) -> float:
    """+1 for an increasing mapping, -1 for a decreasing one (see the module docstring)."""
    if fit == "logistic4":
        return 1.0 if params[0] >= params[1] else -1.0
    if fit == "linear":
        return 1.0 if params[0] >= 0 else -1.0
    return 1.0


def _metrics(
    pred: np.ndarray, mos: np.ndarray, mapped: np.ndarray, direction: float
) -> dict[str, np.ndarray]:
    """The metrics but KRCC for each row of (resamples, n) arrays (or for one 1-D set of images)."""
    return {
        "srcc": _rowwise_pearson(rankdata(pred, axis=-1), rankdata(mos, axis=-1)),
        "plcc": direction * _rowwise_pearson(mapped, mos),
        "plcc_raw": _rowwise_pearson(pred, mos),
        "rmse": np.sqrt(((mapped - mos) ** 2).mean(axis=-1)),
    }


def _krcc(pred: np.ndarray, mos: np.ndarray) -> float:
    if np.ptp(pred) == 0 or np.ptp(mos) == 0:
        return math.nan
    return float(kendalltau(pred, mos).statistic)


def evaluate_scores(pred_mean, mos, bootstrap: int = 1000, seed: int = 0) -> dict:
    """SRCC, KRCC, PLCC (after the logistic), PLCC_raw, RMSE, with `<metric>_ci95_low/high` when bootstrap > 0.

    Also "n", "fit" and "fit_params" (see the module docstring).
    """
    pred = np.asarray(pred_mean, dtype=np.float64)
    mos = np.asarray(mos, dtype=np.float64)
    if pred.shape != mos.shape or pred.ndim != 1:
        raise ValueError(f"pred_mean and mos must be 1-D of equal length, got {pred.shape} and {mos.shape}")
    if len(pred) < 3:
        raise ValueError(f"need at least 3 images to evaluate, got {len(pred)}")
    if not (np.all(np.isfinite(pred)) and np.all(np.isfinite(mos))):
        raise ValueError("pred_mean and mos must be finite (score parse failures must be resolved first)")
    fit, params = fit_logistic(pred, mos)
    mapped = apply_fit(fit, params, pred, float(mos.mean()))
    direction = fit_direction(fit, params)
    result: dict = {"n": int(len(pred)), "fit": fit, "fit_params": params}
    result.update({name: float(value) for name, value in _metrics(pred, mos, mapped, direction).items()})
    result["krcc"] = _krcc(pred, mos)
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples: dict[str, list[np.ndarray]] = {name: [] for name in METRICS}
        blocks = range(0, bootstrap, BOOTSTRAP_BLOCK)
        for start in tqdm(blocks, desc="bootstrap", unit="block", disable=len(pred) * bootstrap < 1e6):
            index = rng.integers(0, len(pred), size=(min(BOOTSTRAP_BLOCK, bootstrap - start), len(pred)))
            for name, values in _metrics(pred[index], mos[index], mapped[index], direction).items():
                samples[name].append(values)
            samples["krcc"].append(np.array([_krcc(pred[row], mos[row]) for row in index]))
        for name in METRICS:
            values = np.concatenate(samples[name])
            values = values[np.isfinite(values)]
            low, high = np.percentile(values, [2.5, 97.5]) if values.size else (math.nan, math.nan)
            result[f"{name}_ci95_low"], result[f"{name}_ci95_high"] = float(low), float(high)
    result["bootstrap"] = int(bootstrap)
    return result


def within_group_srcc(pred, mos, groups, min_size: int = 3) -> tuple[float, int]:
    """(mean SRCC within groups, groups counted): the SRCC of pred with MOS among the rows of each group
    that has at least min_size rows and more than one MOS value, averaged with equal weight; a group whose
    predictions are all equal ranks nothing and counts as 0. NaN and 0 when no group qualifies."""
    pred = np.asarray(pred, dtype=np.float64)
    mos = np.asarray(mos, dtype=np.float64)
    groups = np.asarray(groups)
    if not (pred.shape == mos.shape == groups.shape) or pred.ndim != 1:
        raise ValueError(
            f"pred, mos and groups must be 1-D of equal length: {pred.shape}, {mos.shape}, {groups.shape}"
        )
    values = []
    for group in np.unique(groups):
        rows = groups == group
        if rows.sum() < min_size or np.ptp(mos[rows]) == 0:
            continue
        value = _rowwise_pearson(rankdata(pred[rows])[None], rankdata(mos[rows])[None])[0]
        values.append(float(value) if math.isfinite(value) else 0.0)
    return (float(np.mean(values)), len(values)) if values else (math.nan, 0)
