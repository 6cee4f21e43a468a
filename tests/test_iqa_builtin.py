"""The built-in benchmark: real skimage photos, deterministic, MOS ordered by level, cached with a manifest."""

from __future__ import annotations

import json

from configs.runtime_env import apply_default_env

apply_default_env()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from configs.schema import DataConfig, DatasetSpec  # noqa: E402
from iqa.builtin import REFERENCE_PHOTOS, build_builtin_benchmark, builtin_mos, read_manifest  # noqa: E402
from iqa.formats import load_dataset_spec  # noqa: E402
from iqa.splits import split_by_reference  # noqa: E402

SMALL = {"size": 32, "families": ("blur", "noise", "jpeg", "contrast", "pixelate"), "levels": 3}


def small_data_config(cache_dir) -> DataConfig:
    return DataConfig(
        cache_dir=str(cache_dir), builtin_size=28, builtin_levels=2, builtin_families=["blur", "noise"]
    )


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    return build_builtin_benchmark(tmp_path_factory.mktemp("cache"), seed=0, **SMALL)


def test_every_reference_family_and_level_is_generated(benchmark):
    entries = read_manifest(benchmark)
    assert len(entries) == len(REFERENCE_PHOTOS) * 5 * 3
    assert {e["ref"] for e in entries} == {name.rsplit(".", 1)[0] for name in REFERENCE_PHOTOS}
    with Image.open(benchmark / entries[0]["file"]) as img:
        assert img.size == (32, 32) and img.mode == "RGB"
    manifest = json.loads((benchmark / "manifest.json").read_text())
    assert "level" in manifest["formula"] and manifest["parameters"]["seed"] == 0


def test_mos_falls_with_level_within_each_family(benchmark):
    entries = read_manifest(benchmark)
    for family in SMALL["families"]:
        by_level = [
            {e["mos"] for e in entries if e["family"] == family and e["level"] == lv} for lv in (1, 2, 3)
        ]
        assert all(len(s) == 1 for s in by_level)
        assert by_level[0].pop() > by_level[1].pop() > by_level[2].pop()
    assert all(1.0 <= e["mos"] <= 5.0 for e in entries)
    assert [builtin_mos(level, 5, "jpeg") for level in range(1, 6)] == pytest.approx(
        [4.6, 3.8, 3.0, 2.2, 1.4]
    )


def test_distortion_strength_grows_with_level(benchmark):
    def pixels(family, level):
        return np.asarray(Image.open(benchmark / f"images/astronaut_{family}_{level}.png"), dtype=np.float64)

    reference = np.asarray(Image.open(benchmark / "references/astronaut.png"), dtype=np.float64)
    for family in SMALL["families"]:
        errors = [np.abs(pixels(family, level) - reference).mean() for level in (1, 2, 3)]
        assert errors[0] < errors[2], family


def test_deterministic_and_seeded(tmp_path, benchmark):
    again = build_builtin_benchmark(tmp_path / "other", seed=0, **SMALL)
    assert [e["sha256"] for e in read_manifest(again)] == [e["sha256"] for e in read_manifest(benchmark)]
    reseeded = build_builtin_benchmark(tmp_path / "other", seed=1, **SMALL)
    noise = [e["sha256"] for e in read_manifest(reseeded) if e["family"] == "noise"]
    assert noise != [e["sha256"] for e in read_manifest(benchmark) if e["family"] == "noise"]


def test_cache_is_reused_and_regenerated_when_stale(tmp_path):
    folder = build_builtin_benchmark(tmp_path, size=28, families=("blur",), levels=2)
    first = folder / read_manifest(folder)[0]["file"]
    stamp = first.stat().st_mtime_ns
    assert build_builtin_benchmark(tmp_path, size=28, families=("blur",), levels=2) == folder
    assert first.stat().st_mtime_ns == stamp  # fresh cache: not rewritten
    first.write_bytes(b"tampered")
    build_builtin_benchmark(tmp_path, size=28, families=("blur",), levels=2)
    assert first.read_bytes() != b"tampered"


def test_bad_parameters_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown distortion families"):
        build_builtin_benchmark(tmp_path, families=("blur", "fog"))
    with pytest.raises(ValueError, match="at least 2 levels"):
        build_builtin_benchmark(tmp_path, levels=1)


def test_builtin_format_loads_and_splits_by_reference(tmp_path):
    data = small_data_config(tmp_path)
    ds, report = load_dataset_spec(DatasetSpec(format="builtin"), data=data, progress=False)
    assert len(ds) == len(REFERENCE_PHOTOS) * 2 * 2 and not report.bad
    assert set(ds["dataset"]) == {"builtin"} and ds["mos"] == ds["mos_raw"]
    splits = split_by_reference(ds, data.split_ratios, data.split_seed)
    refs = [set(part["ref"]) for part in splits.values()]
    assert not (refs[0] & refs[1] or refs[0] & refs[2] or refs[1] & refs[2])
    assert [len(r) for r in refs] == [10, 3, 3]


def test_views_add_crops_of_each_photo_and_keep_the_centre_view_unchanged(tmp_path, benchmark):
    folder = build_builtin_benchmark(tmp_path, seed=0, views=3, **SMALL)
    entries = read_manifest(folder)
    assert len(entries) == 3 * len(read_manifest(benchmark))
    centre = {e["file"]: e["sha256"] for e in entries if e["view"] == 0}
    assert centre == {e["file"]: e["sha256"] for e in read_manifest(benchmark)}
    for photo in REFERENCE_PHOTOS:
        ref = photo.rsplit(".", 1)[0]
        names = [ref, f"{ref}-view1", f"{ref}-view2"]
        crops = [np.asarray(Image.open(folder / "references" / f"{name}.png")) for name in names]
        assert all(crop.shape == (32, 32, 3) for crop in crops)
        assert not np.array_equal(crops[0], crops[1]) and not np.array_equal(crops[1], crops[2]), ref
        assert {e["ref"] for e in entries if e["file"].startswith(f"images/{ref}-view")} == {ref}
    with pytest.raises(ValueError, match="at least 1 view"):
        build_builtin_benchmark(tmp_path, views=0)


def test_a_photos_views_fall_in_the_split_of_its_centre_view(tmp_path):
    data = small_data_config(tmp_path)
    one, _ = load_dataset_spec(DatasetSpec(format="builtin"), data=data, progress=False)
    four, _ = load_dataset_spec(DatasetSpec(format="builtin", views=4), data=data, progress=False)
    assert len(four) == 4 * len(one)
    splits_one = split_by_reference(one, data.split_ratios, data.split_seed)
    splits_four = split_by_reference(four, data.split_ratios, data.split_seed)
    for split in splits_one:
        assert set(splits_four[split]["ref"]) == set(splits_one[split]["ref"])
        assert len(splits_four[split]) == 4 * len(splits_one[split])


def test_views_are_rejected_for_other_formats():
    with pytest.raises(ValueError, match="views applies to the builtin format only"):
        DatasetSpec(format="koniq10k", path="x", views=2)
    with pytest.raises(ValueError):
        DatasetSpec(format="builtin", views=0)
