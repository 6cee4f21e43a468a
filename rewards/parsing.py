"""Score parsing and the format reward, exactly as published (see docs/method.md).

- score: the LAST `<answer>...</answer>` (dot matches newline), else the whole completion; then the
  first number `-?\\d+(\\.\\d+)?` in it.
- format: 1 when the whole completion is `<think>...</think>` then `<answer>...</answer>`.

Also the expected score of a sampled completion (evaluation only): its score with the leading digit
replaced by the model's expectation over the ten digits at that position, a lower-variance reading of
the same policy (see `expected_scores`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER_RE = re.compile(r"-?\d+(\.\d+)?")
FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)

FailurePolicy = Literal["random", "exclude"]
OutOfRangePolicy = Literal["keep", "clip", "fail"]


def extract_score(completion: str) -> float | None:
    """The published parser: None when no number is found."""
    answers = ANSWER_RE.findall(completion)
    region = answers[-1] if answers else completion
    match = NUMBER_RE.search(region)
    return float(match.group(0)) if match else None


@dataclass(frozen=True)
class ParsedScores:
    """Scores of a flat list of completions.

    `ok[i]` is False where completion i had no parsable score (or one out of range under the
    "fail" policy). `scores[i]` is then the value the failure policy chose: a uniform draw under
    "random", NaN under "exclude" (the fidelity reward masks those out).
    """

    scores: np.ndarray  # float64, (N,)
    ok: np.ndarray  # bool, (N,)

    @property
    def failure_rate(self) -> float:
        return float(1.0 - self.ok.mean()) if self.ok.size else 0.0


def apply_score_range(
    scores: np.ndarray, out_of_range: OutOfRangePolicy, score_range: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ok) for parsed scores (NaN = none parsed): out-of-range values kept, clipped into
    score_range, or marked failed (ok False). A digit run of hundreds of characters parses to inf;
    that is no score either."""
    ok = np.isfinite(scores)
    if out_of_range == "clip":
        scores = np.where(ok, np.clip(scores, *score_range), scores)
    elif out_of_range == "fail":
        ok &= (scores >= score_range[0]) & (scores <= score_range[1])
    elif out_of_range != "keep":
        raise ValueError(f"out_of_range must be 'keep', 'clip' or 'fail', got {out_of_range!r}")
    return scores, ok


def parse_scores(
    completions: Sequence[str],
    on_failure: FailurePolicy = "random",
    out_of_range: OutOfRangePolicy = "keep",
    score_range: tuple[float, float] = (1.0, 5.0),
    rng: np.random.Generator | None = None,
) -> ParsedScores:
    low, high = score_range
    raw = [extract_score(c) for c in completions]
    scores, ok = apply_score_range(
        np.array([np.nan if s is None else s for s in raw], dtype=np.float64), out_of_range, score_range
    )
    failed = ~ok
    if on_failure == "random":
        rng = rng if rng is not None else np.random.default_rng()
        scores[failed] = rng.uniform(low, high, size=int(failed.sum()))
    elif on_failure == "exclude":
        scores[failed] = np.nan
    else:
        raise ValueError(f"on_failure must be 'random' or 'exclude', got {on_failure!r}")
    return ParsedScores(scores=scores, ok=ok)


def score_digit_offset(completion: str) -> int | None:
    """Character offset of the leading digit of the score `extract_score` reads, when that score has a
    one-digit integer part ("3", "3.45"); None when there is no such score ("-2", "10", "4058", none)."""
    answers = list(ANSWER_RE.finditer(completion))
    region_start, region = (answers[-1].start(1), answers[-1].group(1)) if answers else (0, completion)
    match = NUMBER_RE.search(region)
    if match is None or len(match.group(0).split(".")[0]) != 1:  # "-2" and "10" fail here too
        return None
    return region_start + match.start()


def expected_scores(
    scores: np.ndarray,
    digit_probs: np.ndarray,
    out_of_range: OutOfRangePolicy = "keep",
    score_range: tuple[float, float] = (1.0, 5.0),
) -> np.ndarray:
    """Rao-Blackwellised scores: sum_d p_d v(d + f) / sum_d p_d over the leading digit d = 0..9.

    scores (N,): sampled scores with a one-digit integer part; digit_probs (N, 10): the model's
    probabilities of the digits 0..9 at the leading digit's position (the engine's top-k, so digits
    outside it count 0); f = the sampled score's fractional part; v applies the out-of-range policy
    (keep: identity; clip: into score_range; fail: digits whose value falls outside get weight 0).
    For whole-number scores this is exactly E[score | the sampled thought], the quantity the mean of
    sampled scores estimates, without the digit's sampling noise. NaN where no weight is left.
    """
    scores = np.asarray(scores, dtype=np.float64)
    probs = np.asarray(digit_probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (scores.shape[0], 10):
        raise ValueError(f"digit_probs must be (N, 10) for N = {scores.shape[0]} scores, got {probs.shape}")
    values = np.arange(10.0) + (scores - np.floor(scores))[:, None]
    low, high = score_range
    if out_of_range == "clip":
        values = np.clip(values, low, high)
    elif out_of_range == "fail":
        probs = np.where((values >= low) & (values <= high), probs, 0.0)
    elif out_of_range != "keep":
        raise ValueError(f"out_of_range must be 'keep', 'clip' or 'fail', got {out_of_range!r}")
    total = probs.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (probs * values).sum(axis=1) / total, np.nan)


def format_reward(completions: Sequence[str]) -> np.ndarray:
    """1.0 where the completion is exactly `<think>..</think> <answer>..</answer>`, else 0.0."""
    return np.array([1.0 if FORMAT_RE.fullmatch(c) else 0.0 for c in completions], dtype=np.float64)
