"""Content-independent splits: every reference image (and so every distorted version of it) falls in
exactly one of train / val / test, so no test content was seen in training."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import Counter

import numpy as np
from datasets import Dataset

from configs.schema import DataConfig, DatasetSpec
from iqa.formats import load_datasets
from iqa.report import BadInputReport

SPLITS = ("train", "val", "test")


def _split_sizes(count: int, ratios: tuple[float, float, float]) -> list[int]:
    """Largest-remainder rounding: sizes sum to `count` and follow `ratios` as closely as integers can."""
    exact = np.asarray(ratios, dtype=np.float64) / sum(ratios) * count
    sizes = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - sizes), kind="stable")[: count - sizes.sum()]:
        sizes[index] += 1
    return sizes.tolist()


def split_by_reference(
    ds: Dataset, ratios: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 42
) -> dict[str, Dataset]:
    """{"train", "val", "test"}: each dataset's references are shuffled (seeded) and cut by `ratios`.

    References are split per dataset (the `dataset` column), so a mixed set keeps each dataset's
    proportions. Deterministic: the result depends on the set of (dataset, ref) names and `seed`,
    not on the row order.
    """
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(f"ratios must be three non-negative numbers with a positive sum, got {ratios}")
    datasets_col, refs_col = ds["dataset"], ds["ref"]
    split_of: dict[tuple[str, str], str] = {}
    for name in sorted(set(datasets_col)):
        refs = sorted({ref for d, ref in zip(datasets_col, refs_col, strict=True) if d == name})
        # The dataset name joins the seed so that two datasets' references are not shuffled alike.
        name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        order = np.random.default_rng([seed, name_key]).permutation(len(refs))
        start = 0
        for split, size in zip(SPLITS, _split_sizes(len(refs), ratios), strict=True):
            for index in order[start : start + size]:
                split_of[(name, refs[index])] = split
            start += size
    rows = {split: [] for split in SPLITS}
    for index, key in enumerate(zip(datasets_col, refs_col, strict=True)):
        rows[split_of[key]].append(index)
    return {split: ds.select(indices) for split, indices in rows.items()}


def load_splits(
    specs: list[DatasetSpec], data: DataConfig, cache: dict | None = None
) -> tuple[dict[str, Dataset], BadInputReport]:
    """Load the datasets of `specs` and split them by reference with data.split_ratios / data.split_seed
    (`cache`: see iqa.formats.load_datasets)."""
    ds, report = load_datasets(specs, data, cache=cache)
    return split_by_reference(ds, data.split_ratios, data.split_seed), report


# eval.split -> the parts of the eval datasets' split by reference that it evaluates on.
EVAL_SPLIT_PARTS = {
    "train": ("train",),
    "val": ("val",),
    "test": ("test",),
    "held_out": ("val", "test"),  # every reference the run never trains on
    "all": ("train", "val", "test"),
}


log = logging.getLogger("vqr1.data")


def load_run_data(config, images_per_step: int | None = None):
    """Train and eval splits, split by reference; bad rows stop the run or are reported (once per
    dataset, though both data.train and data.eval name it) and skipped. With `images_per_step` (the
    trainer's train.images_per_step), a training dataset too small for one step's batch is a ConfigError."""
    from datasets import concatenate_datasets

    loaded: dict = {}  # each dataset is read and checked once
    train_splits, _ = load_splits(config.data.train, config.data, loaded)
    eval_splits, _ = load_splits(config.data.eval, config.data, loaded)
    reports = [report for _, report in loaded.values()]
    for report in reports:
        if report.bad:
            log.warning("\n".join(report.lines()))
    if images_per_step is not None:
        check_images_per_step(train_splits, config, images_per_step)
    eval_split = concatenate_datasets([eval_splits[name] for name in EVAL_SPLIT_PARTS[config.eval.split]])
    if config.eval.max_images is not None and len(eval_split) > config.eval.max_images:
        eval_split = eval_split.shuffle(seed=config.data.split_seed).select(range(config.eval.max_images))
    return train_splits["train"], eval_split, functools.reduce(BadInputReport.merge, reports)


def check_images_per_step(splits: dict[str, Dataset], config, images_per_step: int) -> None:
    """Each step draws all its images from one dataset (cluster.batches): every training dataset must
    hold `images_per_step` training images. ConfigError naming the key, the datasets and their split sizes."""
    from configs.load import ConfigError

    counts = {split: Counter(part["dataset"]) for split, part in splits.items()}
    ratios = "[" + ", ".join(f"{ratio:g}" for ratio in config.data.split_ratios) + "]"
    if not counts["train"]:
        raise ConfigError(
            f"data.train: data.split_ratios {ratios} by reference leave no training images "
            f"({', '.join(f'{sum(counts[split].values())} {split}' for split in SPLITS)}); give it more images"
        )
    too_small = sorted(name for name, count in counts["train"].items() if count < images_per_step)
    if not too_small:
        return
    sizes = "; ".join(
        f"{name!r} {sum(counts[split][name] for split in SPLITS)} images -> "
        + ", ".join(f"{counts[split][name]} {split}" for split in SPLITS)
        for name in too_small
    )
    workers = config.learner.num_workers
    fits = min(counts["train"].values()) // workers * workers
    multiple = f" (a multiple of learner.num_workers={workers})" if workers > 1 else ""
    fix = f"set train.images_per_step={fits} or less{multiple}, or " if fits else ""
    raise ConfigError(
        f"train.images_per_step={images_per_step} is more than the training images of dataset "
        f"{' and '.join(repr(name) for name in too_small)} (split by reference, data.split_ratios {ratios}: "
        f"{sizes}), and every step takes all its images from one dataset: {fix}give it more images"
    )
