"""The central reward actor: it holds the labels and scores each WHOLE rollout batch in one call.

The fidelity reward compares images with each other, so it needs every image of the batch at once.
Labels live here, keyed by image id (MOS and dataset), so the driver sends only ids and texts. With
`reward.permute_labels` the MOS values are permuted once within each dataset: the control run whose
model must not learn to rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import ray

from configs.schema import PlacementConfig, RewardConfig
from rewards.batch import BatchRewards, batch_rewards


def permute_within_datasets(
    labels: Mapping[str, tuple[float, str]], seed: int
) -> dict[str, tuple[float, str]]:
    rng = np.random.default_rng(seed)
    by_dataset: dict[str, list[str]] = {}
    for image_id, (_, dataset) in sorted(labels.items()):
        by_dataset.setdefault(dataset, []).append(image_id)
    permuted = {}
    for dataset, ids in by_dataset.items():
        shuffled = rng.permutation([labels[i][0] for i in ids])
        permuted.update(
            {image_id: (float(mos), dataset) for image_id, mos in zip(ids, shuffled, strict=True)}
        )
    return permuted


class RewardWorker:
    def __init__(self, config: RewardConfig, labels: Mapping[str, tuple[float, str]], seed: int = 0):
        self.config = config
        self.labels = permute_within_datasets(labels, seed) if config.permute_labels else dict(labels)
        self.seed = seed

    def score(
        self, image_ids: Sequence[str], completions: Sequence[Sequence[str]], step: int
    ) -> BatchRewards:
        """The batch of step `step`. Its random draws (reward.on_parse_failure=random) come from a stream of
        (seed, step), so a step scored again, by this actor or a replacement, gets the same rewards."""
        missing = [i for i in image_ids if i not in self.labels]
        if missing:
            raise KeyError(f"reward actor has no label for image ids {missing[:5]}")
        mos = [self.labels[i][0] for i in image_ids]
        datasets = [self.labels[i][1] for i in image_ids]
        rng = np.random.default_rng([self.seed, step])
        return batch_rewards(completions, mos, datasets, self.config, rng=rng)

    def ping(self) -> bool:
        return True

    def system_metrics(self) -> dict:
        """This actor's CPU and memory figures since the previous call (configs.system_metrics.sample)."""
        from configs.system_metrics import sample

        return sample()


def create_reward_worker(
    config: RewardConfig,
    labels: Mapping[str, tuple[float, str]],
    placement: PlacementConfig,
    seed: int = 0,
    **options,
):
    return (
        ray.remote(RewardWorker)
        .options(num_cpus=placement.num_cpus, num_gpus=placement.num_gpus, **options)
        .remote(config, labels, seed)
    )
