"""Vectorised fidelity reward against the plain loop written from the formula (issue: foundation).

Prints, for B in {8, 64, 512} images and G = 8, the time of each and the speed-up.
"""

from __future__ import annotations

import math
import time

import numpy as np

from rewards.fidelity import EPS, fidelity_reward


def loop_fidelity(scores: np.ndarray, mos: np.ndarray) -> np.ndarray:
    """The seed pseudocode: every image against every other image of one comparison group."""
    num_images, num_gen = scores.shape
    mean = scores.mean(axis=1)
    var = scores.var(axis=1, ddof=1)
    out = np.zeros_like(scores)
    for i in range(num_images):
        for k in range(num_gen):
            total = 0.0
            for j in range(num_images):
                if j == i:
                    continue
                p = 0.5 * (
                    1 + math.erf((scores[i, k] - mean[j]) / math.sqrt(var[i] + var[j] + EPS) / math.sqrt(2))
                )
                gt = 1.0 if mos[i] > mos[j] else 0.0 if mos[i] < mos[j] else 0.5
                total += math.sqrt(p * gt + EPS) + math.sqrt((1 - p) * (1 - gt) + EPS)
            out[i, k] = total / (num_images - 1)
    return out


def best_of(fn, args: tuple, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    print("\nFidelity reward: vectorised (numpy) vs plain loop, G = 8, one comparison group")
    print(f"{'B':>5} {'loop s':>10} {'vectorised s':>13} {'speed-up':>9} {'max |diff|':>11}")
    for num_images in (8, 64, 512):
        scores = rng.uniform(1, 5, size=(num_images, 8)).round(2)
        mos = rng.uniform(1, 5, size=num_images)
        groups = np.zeros(num_images, dtype=int)
        loop_s = best_of(loop_fidelity, (scores, mos), 1 if num_images > 64 else 3)
        vec_s = best_of(fidelity_reward, (scores, mos, groups), 5)
        diff = float(np.abs(loop_fidelity(scores, mos) - fidelity_reward(scores, mos, groups)).max())
        rows.append(
            {"B": num_images, "G": 8, "loop_s": loop_s, "vectorised_s": vec_s, "speedup": loop_s / vec_s}
        )
        print(f"{num_images:>5} {loop_s:>10.4f} {vec_s:>13.5f} {loop_s / vec_s:>8.0f}x {diff:>11.1e}")
    return rows


if __name__ == "__main__":
    main()
