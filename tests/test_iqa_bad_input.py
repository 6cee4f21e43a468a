"""Each kind of bad input, under on_bad_input="error" (stops, naming file, row and reason) and "skip"
(row left out and reported); and the `vqr1 data check` command."""

from __future__ import annotations

import argparse
import io

from configs.runtime_env import apply_default_env

apply_default_env()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from configs.schema import DatasetSpec  # noqa: E402
from iqa.data_check import add_data_parser  # noqa: E402
from iqa.formats import load_dataset_spec  # noqa: E402
from iqa.report import BadInputError  # noqa: E402

BAD_LINE = 3  # the bad row sits between good ones: lines 1, 2 and 4 are good


def _noise_image(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _corrupt_png() -> bytes:
    data = bytearray(_noise_image("PNG"))
    middle = len(data) // 2
    data[middle : middle + 40] = b"\xff" * 40  # inside IDAT: the header parses, the pixel data does not
    return bytes(data)


# case -> (the bad label line, files to write {name: bytes}, expected kind, expected reason pattern)
CASES = {
    "missing image": ("gone.png 3", {}, "missing", "file is missing"),
    "zero-byte image": ("empty.png 3", {"empty.png": b""}, "zero-byte", "zero-byte file"),
    "truncated image": (
        "cut.jpg 3",
        {"cut.jpg": _noise_image("JPEG")[:1000]},
        "truncated",
        "truncated image data",
    ),
    "corrupt image": ("broken.png 3", {"broken.png": _corrupt_png()}, "corrupt", "corrupt"),
    "not an image": (
        "notes.png 3",
        {"notes.png": b"this is text, not pixels\n"},
        "not an image",
        "not an image",
    ),
    "NaN MOS": ("b.png nan", {}, "bad MOS", "MOS is NaN"),
    "empty MOS": ("b.png", {}, "bad MOS", "MOS is empty"),
    "non-numeric MOS": ("b.png good", {}, "bad MOS", "MOS 'good' is not a number"),
    "duplicate row": ("a.png 3", {}, "duplicate", "duplicate of row 1"),
}


def _dataset(tmp_path, bad_line: str, files: dict[str, bytes]) -> DatasetSpec:
    for name, shade in (("a.png", 10), ("b.png", 90), ("c.png", 200)):
        Image.new("RGB", (16, 16), (shade,) * 3).save(tmp_path / name)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "scores.txt").write_text(f"a.png 1\nc.png 5\n{bad_line}\nb.png 2\n")
    return DatasetSpec(format="text", path=str(tmp_path / "scores.txt"))


@pytest.mark.parametrize("case", list(CASES))
def test_error_mode_stops_naming_file_row_and_reason(tmp_path, case):
    bad_line, files, _, reason = CASES[case]
    spec = _dataset(tmp_path, bad_line, files)
    with pytest.raises(BadInputError, match=rf"scores\.txt:{BAD_LINE}\b.*{reason}") as err:
        load_dataset_spec(spec, "error", progress=False)
    assert "on_bad_input=skip" in str(err.value)


@pytest.mark.parametrize("case", list(CASES))
def test_skip_mode_leaves_the_row_out_and_reports_it(tmp_path, case):
    bad_line, files, kind, reason = CASES[case]
    spec = _dataset(tmp_path, bad_line, files)
    ds, report = load_dataset_spec(spec, "skip", progress=False)
    assert ds["id"] == ["a.png", "c.png", "b.png"]
    assert report.rows_read == 4 and report.kept == 3
    [bad] = report.bad
    assert bad.row == BAD_LINE and bad.kind == kind and bad.label_file.endswith("scores.txt")
    assert reason in bad.reason
    assert report.reason_counts() == {kind: 1}
    assert f"1 bad rows left out (on_bad_input=skip: 1 x {kind})" in report.summary()
    assert f"scores.txt:{BAD_LINE}" in report.lines()[1]


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_missing_column_stops_in_both_modes(tmp_path, mode):
    (tmp_path / "dmos.csv").write_text("dist_img,ref_img,var\nI01_01_01.png,I01.png,0.1\n")
    with pytest.raises(BadInputError, match=r"dmos\.csv: missing column\(s\) \['dmos'\]"):
        load_dataset_spec(DatasetSpec(format="kadid10k", path=str(tmp_path)), mode, progress=False)


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_csv_row_numbers_are_file_lines(tmp_path, mode):
    Image.new("RGB", (16, 16)).save(tmp_path / "I01_01_01.png")
    (tmp_path / "dmos.csv").write_text(
        "dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4.1,0.1\nI01_01_02.png,I01.png,,0.1\n"
    )
    spec = DatasetSpec(format="kadid10k", path=str(tmp_path), image_dir=".")
    if mode == "error":
        with pytest.raises(
            BadInputError, match=r"dmos\.csv:3 \[mos\] \(image I01_01_02\.png\): MOS is empty"
        ):
            load_dataset_spec(spec, mode, progress=False)
    else:
        ds, report = load_dataset_spec(spec, mode, progress=False)
        assert len(ds) == 1 and [b.row for b in report.bad] == [3]


def test_skip_mode_with_no_usable_row_is_an_error(tmp_path):
    (tmp_path / "scores.txt").write_text("gone.png 1\nalso-gone.png 2\n")
    with pytest.raises(BadInputError, match="none of the 2 rows is usable"):
        load_dataset_spec(
            DatasetSpec(format="text", path=str(tmp_path / "scores.txt")), "skip", progress=False
        )


def _check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vqr1")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_data_check_lists_every_bad_row_and_fails(tmp_path, capsys):
    _dataset(tmp_path, "gone.png 3\nnotes.png 4", {"notes.png": b"text"})
    assert _check(["data", "check", "--format", "text", str(tmp_path / "scores.txt")]) == 1
    out = capsys.readouterr().out
    assert "5 rows, 2 bad rows left out" in out
    assert f"scores.txt:{BAD_LINE} [image]" in out and "file is missing" in out
    assert f"scores.txt:{BAD_LINE + 1} [image]" in out and "not an image" in out
    assert "usable: 3 images" in out


def test_data_check_passes_a_clean_dataset(tmp_path, capsys):
    _dataset(tmp_path, "", {})
    assert _check(["data", "check", "--format", "text", str(tmp_path / "scores.txt")]) == 0
    assert "3 rows, none bad" in capsys.readouterr().out


def test_data_check_unreadable_dataset_exits_2(tmp_path, capsys):
    (tmp_path / "dmos.csv").write_text("dist_img,var\n")
    assert _check(["data", "check", "--format", "kadid10k", str(tmp_path)]) == 2
    assert "missing column(s)" in capsys.readouterr().err
