"""What one GRPO step asks of each image's scores, under a policy that does not yet rank (issue 8).

For a rollout batch from a cold-start-like policy (every image's G scores drawn from the same
distribution, independent of the image), the policy gradient moves image i's score distribution
along its advantages. Two numbers per image say where:
  push  = mean_k (s_ik - mean_k s_ik) * A_ik     > 0: toward higher scores for this image
  widen = mean_k (|s_ik - median_k s_ik| - mean) * A_ik   < 0: toward narrower scores (hedging)
A reward that teaches ranking pushes the images of high MOS rank in their batch up and the low ones
down (push correlates with the centred rank), without rewarding narrower scores for everyone.

A second draw gives every image its own score offset (sd OFFSET_SD, independent of its MOS), as after
some training: whatever push correlates with that offset comes from the scores, not the labels. The
published fidelity reward pulls each image towards the batch middle (its label-free part pays scores
near the other images' means); `reward.fidelity=label_only` takes that part out.

Measured here on the built-in benchmark's labels with the project's fidelity reward and both advantage
modes, and, as a reference, a pointwise reward 1 - |s - MOS| / 4 (not a project reward). Pure
functions only (rewards.fidelity, learner.grpo): a few seconds.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from scipy.stats import rankdata

from iqa.builtin import build_builtin_benchmark, read_manifest
from learner.grpo import group_advantages
from rewards.fidelity import fidelity_reward

IMAGES, GENERATIONS, BATCHES = 16, 8, 2000
# The cold start's scores: mean ~3, spread within an image ~1.1 (README), clipped to [1, 5].
SCORE_MEAN, SCORE_SD = 3.0, 1.1
# Per-image offsets of the mean score, like the 0.1-0.2 spread across images of the trained runs.
OFFSET_SD = 0.2
REWARDS = ("fidelity", "fidelity_label_only", "pointwise")


def centred_rank(mos: np.ndarray) -> np.ndarray:
    """Each image's MOS rank in its batch scaled to [-1, 1] (ties share their mean rank)."""
    return (rankdata(mos) - (len(mos) + 1) / 2) / ((len(mos) - 1) / 2)


def pushes(scores: np.ndarray, advantages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(push, widen) per image, as in the module docstring; scores and advantages are (B, G)."""
    push = ((scores - scores.mean(axis=1, keepdims=True)) * advantages).mean(axis=1)
    distance = np.abs(scores - np.median(scores, axis=1, keepdims=True))
    widen = ((distance - distance.mean(axis=1, keepdims=True)) * advantages).mean(axis=1)
    return push, widen


def batch_pushes(
    rng: np.random.Generator, all_mos: np.ndarray, reward: str, mode: str, offset_sd: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(push, widen, centred MOS rank, score offset) per image over BATCHES batches."""
    push, widen, rank, offsets = [], [], [], []
    for _ in range(BATCHES):
        mos = rng.choice(all_mos, IMAGES, replace=False)
        # No draw without offsets: the offset-free rows keep the random stream (and figures) they had.
        offset = rng.normal(0.0, offset_sd, IMAGES) if offset_sd > 0 else np.zeros(IMAGES)
        scores = np.clip(rng.normal(SCORE_MEAN + offset[:, None], SCORE_SD, (IMAGES, GENERATIONS)), 1.0, 5.0)
        if reward == "pointwise":
            rewards = 1.0 - np.abs(scores - mos[:, None]) / 4.0
        else:
            groups = np.zeros(IMAGES, dtype=np.int64)
            rewards = fidelity_reward(scores, mos, groups, label_only=reward == "fidelity_label_only")
        advantages = group_advantages(torch.from_numpy(rewards), mode).numpy()
        batch_push, batch_widen = pushes(scores, advantages)
        push.append(batch_push)
        widen.append(batch_widen)
        rank.append(centred_rank(mos))
        offsets.append(offset)
    return tuple(np.concatenate(x) for x in (push, widen, rank, offsets))


def measure(all_mos: np.ndarray, reward: str, mode: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    push, widen, rank, _ = batch_pushes(rng, all_mos, reward, mode, offset_sd=0.0)
    top, bottom, middle = push[rank > 0.5], push[rank < -0.5], push[np.abs(rank) < 0.25]
    # Signal: how far apart the top and bottom quarters are pushed, in units of one image's push noise.
    noise = np.sqrt((top.var() + bottom.var()) / 2)
    half_gap = (top.mean() - bottom.mean()) / 2
    # The same with image offsets: the push an image one offset sd above the batch gets from its offset
    # alone (regression of push on offset, the MOS rank held out), against the push its labels give.
    offset_push, _, offset_rank, offsets = batch_pushes(rng, all_mos, reward, mode, offset_sd=OFFSET_SD)
    design = np.column_stack([offsets, offset_rank, np.ones_like(offsets)])
    slope = np.linalg.lstsq(design, offset_push, rcond=None)[0][0]
    return {
        "reward": reward,
        "advantage": mode,
        "corr_push_rank": float(np.corrcoef(push, rank)[0, 1]),
        "push_top": float(top.mean()),
        "push_middle": float(middle.mean()),
        "push_bottom": float(bottom.mean()),
        "push_snr": float((top.mean() - bottom.mean()) / (2 * noise)),
        # Middle images have no rank to learn; what they get is noise, relative to the real push.
        "middle_noise_over_push": float(middle.std() / half_gap),
        "widen_mean": float(widen.mean()),
        "widen_over_push": float(widen.mean() / half_gap),
        "offset_push_over_push": float(slope * OFFSET_SD / half_gap),
    }


def main() -> list[dict]:
    with tempfile.TemporaryDirectory() as cache:
        all_mos = np.array([entry["mos"] for entry in read_manifest(build_builtin_benchmark(cache))])
    rows = [measure(all_mos, reward, mode) for reward in REWARDS for mode in ("std", "mean_only")]
    print(
        f"\n## What a GRPO step asks of each image ({BATCHES} batches of {IMAGES} images x {GENERATIONS} "
        f"scores ~ N({SCORE_MEAN}, {SCORE_SD}) clipped, the same for every image)\n"
    )
    print(
        "| reward | advantage | corr(push, MOS rank) | push top / middle / bottom quarter | push SNR "
        f"| middle noise / push | widen / push | offset push / push (offsets sd {OFFSET_SD}) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['reward']} | {row['advantage']} | {row['corr_push_rank']:.3f} | "
            f"{row['push_top']:+.4f} / {row['push_middle']:+.4f} / {row['push_bottom']:+.4f} | "
            f"{row['push_snr']:.2f} | {row['middle_noise_over_push']:.2f} | {row['widen_over_push']:+.2f} | "
            f"{row['offset_push_over_push']:+.3f} |"
        )
    return rows


if __name__ == "__main__":
    main()
