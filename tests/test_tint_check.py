"""The tint check's data: labels follow the tint, the tint is in the pixels, the build is cached."""

import numpy as np
from PIL import Image

from configs.schema import DataConfig, DatasetSpec
from iqa.formats import load_dataset_spec
from iqa.tint_check import TINTS, build_tint_check


def test_tint_check_labels_follow_the_visible_tint(tmp_path):
    data = DataConfig(cache_dir=str(tmp_path), builtin_size=32)
    ds, report = load_dataset_spec(DatasetSpec(format="tint"), data=data, progress=False)
    assert not report.bad and len(ds) == 16 * 15 and len(set(ds["ref"])) == 16
    for row in ds.select(range(0, len(ds), 7)):
        tint = row["id"].rsplit("_", 1)[1].removesuffix(".png")
        assert row["mos"] == TINTS[tint][1]
        red, green, blue = np.asarray(Image.open(row["image"]), dtype=float).reshape(-1, 3).mean(axis=0)
        if tint == "red":
            assert red > 1.5 * blue
        elif tint == "blue":
            assert blue > 1.5 * red
        else:
            assert abs(red - blue) < 1 and abs(red - green) < 1


def test_tint_check_is_deterministic_and_cached(tmp_path):
    first = build_tint_check(tmp_path / "a", size=32, seed=3)
    again = build_tint_check(tmp_path / "b", size=32, seed=3)
    assert (first / "manifest.json").read_text() == (again / "manifest.json").read_text()
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert build_tint_check(tmp_path / "a", size=32, seed=3) == first  # fresh: not regenerated
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    assert build_tint_check(tmp_path / "a", size=32, seed=4) != first
