"""Content-independent splits: every reference image (and so every distorted version of it) falls in
exactly one of train / val / test, so no test content was seen in training."""

from __future__ import annotations

import hashlib
import logging

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


def load_splits(specs: list[DatasetSpec], data: DataConfig) -> tuple[dict[str, Dataset], BadInputReport]:
    """Load the datasets of `specs` and split them by reference with data.split_ratios / data.split_seed."""
    ds, report = load_datasets(specs, data)
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


def load_run_data(config):
    """Train and eval splits, split by reference; bad rows stop the run or are reported and skipped."""
    from datasets import concatenate_datasets

    train_splits, train_report = load_splits(config.data.train, config.data)
    eval_splits, eval_report = load_splits(config.data.eval, config.data)
    for report in (train_report, eval_report):
        if report.bad:
            log.warning("\n".join(report.lines()))
    eval_split = concatenate_datasets([eval_splits[name] for name in EVAL_SPLIT_PARTS[config.eval.split]])
    if config.eval.max_images is not None and len(eval_split) > config.eval.max_images:
        eval_split = eval_split.shuffle(seed=config.data.split_seed).select(range(config.eval.max_images))
    return train_splits["train"], eval_split, train_report.merge(eval_report)
