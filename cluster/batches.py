"""Rollout batches: each batch draws its images from ONE dataset, as in the original, so comparison
groups never span datasets; the order is a pure function of (seed, epoch), so a resumed run gets exactly
the batch that would have come next and no image is trained twice or skipped within an epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # batches already taken in this epoch


class DatasetBatchSampler:
    def __init__(self, dataset_names: Sequence[str], images_per_step: int, seed: int):
        self.images_per_step = images_per_step
        self.seed = seed
        names = np.asarray(dataset_names)
        self.indices_by_dataset = {name: np.flatnonzero(names == name) for name in sorted(set(dataset_names))}
        too_small = {k: len(v) for k, v in self.indices_by_dataset.items() if len(v) < images_per_step}
        if too_small:
            raise ValueError(
                f"train.images_per_step={images_per_step} exceeds the training images of datasets {too_small}"
            )
        self.state = SamplerState()

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """All full batches of one epoch, in order (a last partial batch per dataset is dropped)."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for indices in self.indices_by_dataset.values():
            order = rng.permutation(indices)
            full = len(order) // self.images_per_step * self.images_per_step
            batches.extend(order[:full].reshape(-1, self.images_per_step))
        return [batches[i] for i in rng.permutation(len(batches))]

    def next_batch(self) -> np.ndarray:
        batches = self.epoch_batches(self.state.epoch)
        if self.state.position >= len(batches):
            self.state = SamplerState(epoch=self.state.epoch + 1, position=0)
            batches = self.epoch_batches(self.state.epoch)
        batch = batches[self.state.position]
        self.state.position += 1
        return batch
