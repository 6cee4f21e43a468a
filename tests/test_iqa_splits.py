"""Splits by reference: no reference in two splits, ratios, determinism, per-dataset splitting."""

from __future__ import annotations

from configs.runtime_env import apply_default_env

apply_default_env()

import pytest  # noqa: E402
from datasets import Dataset  # noqa: E402

from iqa.splits import split_by_reference  # noqa: E402


def _dataset(refs_per_dataset: dict[str, int], images_per_ref: int = 4) -> Dataset:
    rows = [
        {
            "id": f"{name}-{r}-{i}",
            "image": f"/x/{name}/{r}/{i}.png",
            "mos_raw": float(i),
            "mos": 1.0 + i,
            "dataset": name,
            "ref": f"ref{r}",
        }
        for name, count in refs_per_dataset.items()
        for r in range(count)
        for i in range(images_per_ref)
    ]
    return Dataset.from_list(rows)


def _refs(ds: Dataset) -> set[tuple[str, str]]:
    return set(zip(ds["dataset"], ds["ref"], strict=True))


def test_no_reference_in_two_splits_and_nothing_lost():
    ds = _dataset({"kadid": 81, "koniq": 30})
    splits = split_by_reference(ds)
    refs = {name: _refs(part) for name, part in splits.items()}
    assert (
        not refs["train"] & refs["val"]
        and not refs["train"] & refs["test"]
        and not refs["val"] & refs["test"]
    )
    assert sum(len(part) for part in splits.values()) == len(ds)
    assert sorted(i for part in splits.values() for i in part["id"]) == sorted(ds["id"])


def test_ratios_hold_per_dataset():
    splits = split_by_reference(_dataset({"kadid": 81, "koniq": 30}), (0.6, 0.2, 0.2))
    for name, total in (("kadid", 81), ("koniq", 30)):
        counts = [len({r for d, r in _refs(splits[s]) if d == name}) for s in ("train", "val", "test")]
        assert sum(counts) == total
        assert counts == pytest.approx([0.6 * total, 0.2 * total, 0.2 * total], abs=1)


def test_deterministic_and_seeded_and_independent_of_row_order():
    ds = _dataset({"kadid": 40})
    first = split_by_reference(ds, seed=42)
    again = split_by_reference(ds.shuffle(seed=3), seed=42)
    assert all(_refs(first[s]) == _refs(again[s]) for s in first)
    other = split_by_reference(ds, seed=7)
    assert _refs(first["test"]) != _refs(other["test"])


def test_bad_ratios_are_rejected():
    with pytest.raises(ValueError, match="ratios"):
        split_by_reference(_dataset({"a": 5}), (0.5, -0.1, 0.6))


def test_held_out_evaluation_is_val_plus_test_and_never_a_training_reference():
    from pathlib import Path

    from configs.load import load_config
    from iqa.splits import load_run_data, load_splits

    cache = Path(__file__).resolve().parents[1] / ".cache" / "vqr1"
    config = load_config("cpu-default", [f"data.cache_dir={cache}", "eval.split=held_out"])
    train, held_out, _ = load_run_data(config)
    splits, _ = load_splits(config.data.eval, config.data)
    assert _refs(held_out) == _refs(splits["val"]) | _refs(splits["test"])
    assert len(held_out) == len(splits["val"]) + len(splits["test"])
    assert not _refs(held_out) & _refs(train)
