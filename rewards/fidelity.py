"""The RL2R fidelity (ranking) reward and the total reward, vectorised over a whole rollout batch.

Notation (docs/method.md): image i has G completions with scores q_i1..q_iG; mu_i is their mean and
var_i their unbiased variance. For completion k of image i and every other image j of the same
comparison group:

    p  = Phi((q_ik - mu_j) / sqrt(var_i + var_j + eps))
    gt = 1 if MOS_i > MOS_j, 0 if MOS_i < MOS_j, 0.5 if equal
    r  = sqrt(p * gt + eps) + sqrt((1 - p) * (1 - gt) + eps)

and the reward is the mean of r over those j. Comparison groups never span datasets, because MOS
scales of different datasets are not comparable.

`label_only=True` subtracts from each r its mean over the two strict orders,
(r(p, 1) + r(p, 0)) / 2 = (sqrt(p) + sqrt(1 - p)) / 2: the part that does not depend on the label. That
part peaks at p = 0.5, so the published reward pays every completion for scoring near the other images'
means whatever the labels say (a push towards the batch middle that moves even a permuted-label run).
What is left is +-(sqrt(p) - sqrt(1 - p)) / 2 for a strict order, zero on average over random labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import ndtr

EPS = 1e-6


def comparison_groups(dataset_names: Sequence[str], group_size: int | None = None) -> np.ndarray:
    """Group id per image: images of one dataset, in batch order, cut into chunks of `group_size`.

    `group_size=None` puts all images of a dataset in the batch into one group. A last chunk smaller
    than `group_size` stays a group of its own (a chunk of one image has no pair to compare).
    """
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be >= 1 or None, got {group_size}")
    group_ids = np.empty(len(dataset_names), dtype=np.int64)
    seen_in_dataset: dict[str, int] = {}
    group_of: dict[tuple[str, int], int] = {}
    for index, name in enumerate(dataset_names):
        position = seen_in_dataset.get(name, 0)
        seen_in_dataset[name] = position + 1
        chunk = 0 if group_size is None else position // group_size
        group_ids[index] = group_of.setdefault((name, chunk), len(group_of))
    return group_ids


def score_statistics(scores: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image mean, unbiased variance and count of valid scores.

    An image with one valid score has variance 0; one with none has mean 0 and count 0 (it is then
    left out of every comparison).
    """
    count = valid.sum(axis=1)
    masked = np.where(valid, scores, 0.0)
    mean = masked.sum(axis=1) / np.maximum(count, 1)
    squared = np.where(valid, (scores - mean[:, None]) ** 2, 0.0).sum(axis=1)
    var = np.where(count > 1, squared / np.maximum(count - 1, 1), 0.0)
    return mean, var, count


def pair_fidelity(p: np.ndarray, gt: np.ndarray | float, eps: float) -> np.ndarray:
    """r for one comparison: P(this completion beats the partner) p against the label gt."""
    return np.sqrt(p * gt + eps) + np.sqrt((1.0 - p) * (1.0 - gt) + eps)


def fidelity_reward(
    scores: np.ndarray,
    mos: np.ndarray,
    group_ids: np.ndarray,
    valid: np.ndarray | None = None,
    eps: float = EPS,
    label_only: bool = False,
) -> np.ndarray:
    """Fidelity reward, shape (B, G), for scores (B, G), MOS (B,) and comparison group ids (B,).

    `valid` (B, G) marks completions whose score counts; an invalid one (a parse failure under the
    "exclude" policy) gets reward 0 and stays out of its image's mean and variance. A completion
    with no image to compare against (a group of one) also gets 0, the same for all G completions,
    so it adds no advantage.
    """
    scores = np.asarray(scores, dtype=np.float64)
    mos = np.asarray(mos, dtype=np.float64)
    group_ids = np.asarray(group_ids)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (images, generations), got shape {scores.shape}")
    num_images = scores.shape[0]
    if mos.shape != (num_images,) or group_ids.shape != (num_images,):
        raise ValueError(
            f"mos {mos.shape} and group_ids {group_ids.shape} must both be ({num_images},) for scores {scores.shape}"
        )
    valid = np.ones_like(scores, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    valid = valid & np.isfinite(scores)
    safe_scores = np.where(valid, scores, 0.0)
    mean, var, count = score_statistics(safe_scores, valid)

    # pair_mask[i, j]: image j is a comparison partner of image i.
    pair_mask = (group_ids[:, None] == group_ids[None, :]) & ~np.eye(num_images, dtype=bool)
    pair_mask &= (count > 0)[None, :]
    gt = np.where(mos[:, None] > mos[None, :], 1.0, np.where(mos[:, None] < mos[None, :], 0.0, 0.5))

    # (i, k, j): completion k of image i against image j.
    scale = np.sqrt(var[:, None] + var[None, :] + eps)  # (i, j)
    delta = (safe_scores[:, :, None] - mean[None, None, :]) / scale[:, None, :]
    p = ndtr(delta)
    gt3 = gt[:, None, :]
    r = pair_fidelity(p, gt3, eps)
    if label_only:
        r -= 0.5 * (pair_fidelity(p, 1.0, eps) + pair_fidelity(p, 0.0, eps))
    partners = pair_mask.sum(axis=1)  # (i,)
    total = np.where(pair_mask[:, None, :], r, 0.0).sum(axis=2)
    reward = total / np.maximum(partners, 1)[:, None]
    return np.where(valid & (partners > 0)[:, None], reward, 0.0)


def total_reward(
    fidelity: np.ndarray, fmt: np.ndarray, fidelity_weight: float = 1.0, format_weight: float = 1.0
) -> np.ndarray:
    """Weighted sum of the fidelity and format rewards (equal weights in the paper)."""
    return fidelity_weight * np.asarray(fidelity, dtype=np.float64) + format_weight * np.asarray(
        fmt, dtype=np.float64
    )
