"""All rewards of one rollout batch in one call: parse -> format -> fidelity -> total.

The fidelity reward compares images with each other, so it needs the whole batch at once, with
each image's MOS and dataset. This is the pure function the reward actor wraps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from configs.schema import RewardConfig
from rewards.fidelity import comparison_groups, fidelity_reward, total_reward
from rewards.parsing import format_reward, parse_scores


@dataclass(frozen=True)
class BatchRewards:
    total: np.ndarray  # (B, G)
    fidelity: np.ndarray  # (B, G)
    format: np.ndarray  # (B, G)
    scores: np.ndarray  # (B, G), after the failure policy
    parse_ok: np.ndarray  # (B, G) bool
    group_ids: np.ndarray  # (B,)
    mos: np.ndarray  # (B,), the labels the fidelity reward used

    def batch_srcc(self) -> float:
        """SRCC between each image's mean parsed score and its MOS within its comparison group, averaged
        over groups of 3+ images with untied means, weighted by size: does the policy rank what it is
        trained on? NaN when no group qualifies."""
        counts = self.parse_ok.sum(axis=1)
        means = np.divide(
            np.where(self.parse_ok, self.scores, 0.0).sum(axis=1),
            counts,
            out=np.full(len(counts), np.nan),
            where=counts > 0,
        )
        correlations, sizes = [], []
        for group in np.unique(self.group_ids):
            members = (self.group_ids == group) & (counts > 0)
            if members.sum() < 3 or np.ptp(means[members]) == 0 or np.ptp(self.mos[members]) == 0:
                continue
            correlations.append(spearmanr(means[members], self.mos[members]).statistic)
            sizes.append(members.sum())
        return float(np.average(correlations, weights=sizes)) if correlations else float("nan")

    def metrics(self) -> dict[str, float]:
        valid_scores = np.where(self.parse_ok, self.scores, np.nan)
        # Spread of the G scores of one image: the signal the fidelity reward feeds on.
        with np.errstate(invalid="ignore"):
            counts = self.parse_ok.sum(axis=1)
            spread = (
                np.nanstd(valid_scores[counts > 1], axis=1, ddof=1) if (counts > 1).any() else np.zeros(1)
            )
        return {
            "reward/total_mean": float(self.total.mean()),
            "reward/total_std": float(self.total.std()),
            "reward/fidelity_mean": float(self.fidelity.mean()),
            "reward/fidelity_std": float(self.fidelity.std()),
            "reward/format_mean": float(self.format.mean()),
            "reward/format_std": float(self.format.std()),
            "reward/parse_failure_rate": float(1.0 - self.parse_ok.mean()),
            "score/mean": float(np.nanmean(valid_scores)) if self.parse_ok.any() else float("nan"),
            "score/spread_within_image": float(np.mean(spread)),
            "score/batch_srcc": self.batch_srcc(),
        }


def batch_rewards(
    completions: Sequence[Sequence[str]],
    mos: Sequence[float],
    dataset_names: Sequence[str],
    config: RewardConfig,
    rng: np.random.Generator | None = None,
) -> BatchRewards:
    """Rewards for B images x G completions; `completions[i]` are the G texts of image i."""
    num_images = len(completions)
    if len(mos) != num_images or len(dataset_names) != num_images:
        raise ValueError(
            f"{num_images} images of completions, but {len(mos)} MOS values and {len(dataset_names)} dataset names"
        )
    group_sizes = {len(c) for c in completions}
    if len(group_sizes) > 1:
        raise ValueError(f"every image needs the same number of completions, got {sorted(group_sizes)}")
    num_generations = group_sizes.pop() if group_sizes else 0
    flat = [text for per_image in completions for text in per_image]

    parsed = parse_scores(
        flat,
        on_failure=config.on_parse_failure,
        out_of_range=config.out_of_range,
        score_range=config.score_range,
        rng=rng,
    )
    shape = (num_images, num_generations)
    scores = parsed.scores.reshape(shape)
    parse_ok = parsed.ok.reshape(shape)
    fmt = format_reward(flat).reshape(shape)
    group_ids = comparison_groups(dataset_names, config.group_size)
    # Under "random" a failed parse still takes part with its drawn score (the published behaviour).
    valid = parse_ok if config.on_parse_failure == "exclude" else None
    mos = np.asarray(mos, dtype=np.float64)
    fidelity = fidelity_reward(
        scores, mos, group_ids, valid=valid, label_only=config.fidelity == "label_only"
    )
    total = total_reward(fidelity, fmt, config.fidelity_weight, config.format_weight)
    return BatchRewards(
        total=total,
        fidelity=fidelity,
        format=fmt,
        scores=scores,
        parse_ok=parse_ok,
        group_ids=group_ids,
        mos=mos,
    )
