"""Every kind of bad input a real IQA dataset brings, run through `vqr1 data check`, the training loader
under both data.on_bad_input policies, and (for images) the decoder that scoring and evaluation use.

One table: each case builds a small dataset in tmp_path with one bad row (or a bad label file) between
good rows, and says what must happen. docs/reliability.md ("Bad inputs") lists the same kinds.
"""

from __future__ import annotations

import argparse
import errno
import functools
import io
import json
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from configs.runtime_env import apply_default_env

apply_default_env()

import numpy as np  # noqa: E402
import openpyxl  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, features  # noqa: E402

from configs.schema import DataConfig, DatasetSpec  # noqa: E402
from iqa.data_check import add_data_parser  # noqa: E402
from iqa.images import ImageLoadError, check_image, load_image  # noqa: E402
from iqa.report import BadInputError  # noqa: E402
from iqa.splits import load_splits  # noqa: E402

BAD_ROW = 3  # the bad row sits between good ones: rows 1, 2 and 4 are good
WHOLE_FILE = "whole file"  # the label file itself is unusable: both policies stop, data check exits 2
ACCEPTED = "accepted"  # not bad at all: every row loads


# ---------------------------------------------------------------- files


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _noise(fmt: str, width: int = 64, height: int = 48) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return _encoded(Image.fromarray(pixels), fmt)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png(width: int, height: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@functools.cache
def _huge_photo() -> bytes:
    """A valid 20000x15000 solid grey PNG (300 Mpx), written row by row: no 300 MB image in memory."""
    width, height = 20000, 15000
    stream = zlib.compressobj(1)
    row = b"\x00" + b"\x80" * width  # filter byte "none", then the row
    idat = b"".join(stream.compress(row) for _ in range(height)) + stream.flush()
    return _png(width, height, idat)


def _bomb() -> bytes:
    """A decompression bomb: a ~100-byte PNG whose header claims 100000x100000 px (10 Gpx)."""
    return _png(100_000, 100_000, zlib.compress(b"\x00" * 64))


def _corrupt_png() -> bytes:
    data = bytearray(_noise("PNG", 48, 48))
    middle = len(data) // 2
    data[middle : middle + 40] = b"\xff" * 40  # inside IDAT: the header parses, the pixel data does not
    return bytes(data)


def _ftyp(brand: bytes) -> bytes:
    """The start of an ISO media file (HEIC, AVIF): an "ftyp" box naming the brand, then other boxes."""
    box = b"ftyp" + brand + b"\x00\x00\x00\x00" + b"mif1" + brand
    return struct.pack(">I", len(box) + 4) + box + b"\x00\x00\x00\x08free" + b"\x00" * 64


def _avif() -> bytes:
    return _encoded(Image.new("RGB", (32, 24), (200, 40, 40)), "AVIF") if AVIF else _ftyp(b"avif")


AVIF = features.check("avif")  # Pillow 11.2+ wheels decode AVIF; without it an AVIF is an unsupported format
HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
LOCKED = "locked.jpg"


def _symlink_loop(path: Path) -> None:
    path.symlink_to(path.with_name("loop-b.jpg"))
    path.with_name("loop-b.jpg").symlink_to(path)


def _locked(path: Path) -> None:
    path.write_bytes(_noise("JPEG"))
    path.chmod(0)


FileMaker = bytes | Callable[[Path], None]


def _write(folder: Path, files: dict[str, FileMaker]) -> None:
    for name, content in files.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content(path)


def _good_images(folder: Path) -> None:
    for name, shade in (("a.png", 10), ("b.png", 90), ("c.png", 200), ("d.png", 140)):
        Image.new("RGB", (32, 24), (shade, 255 - shade, 60)).save(folder / name)


# ---------------------------------------------------------------- datasets


def text_dataset(
    bad_line: str, files: dict[str, FileMaker] | None = None, prefix: str = ""
) -> Callable[[Path], DatasetSpec]:
    """scores.txt with lines "a.png 1", "c.png 5", `bad_line`, "b.png 2" (name score [ref])."""

    def build(folder: Path) -> DatasetSpec:
        _good_images(folder)
        _write(folder, files or {})
        (folder / "scores.txt").write_text(f"{prefix}a.png 1\nc.png 5\n{bad_line}\nb.png 2\n")
        return DatasetSpec(format="text", path=str(folder / "scores.txt"))

    return build


def csv_dataset(text: str, encoding: str = "utf-8") -> Callable[[Path], DatasetSpec]:
    """A KADID-10K style dmos.csv, written byte for byte as given (BOM, CRLF, separators, encoding)."""

    def build(folder: Path) -> DatasetSpec:
        _good_images(folder)
        (folder / "dmos.csv").write_bytes(text.encode(encoding))
        return DatasetSpec(format="kadid10k", path=str(folder), image_dir=".")

    return build


def kadid_csv(separator: str = ",", newline: str = "\n", bad_row: str | None = None) -> str:
    rows = [["dist_img", "ref_img", "dmos", "var"], ["a.png", "r1.png", "1.5", "0.1"]]
    rows += [["c.png", "r2.png", "4.5", "0.1"], *([bad_row.split(",")] if bad_row else [])]
    rows += [["b.png", "r1.png", "2.5", "0.1"]]
    return newline.join(separator.join(row) for row in rows) + newline


def xlsx_dataset(rows: list[list]) -> Callable[[Path], DatasetSpec]:
    """A SPAQ style spreadsheet with `rows` as the first sheet, images beside it."""

    def build(folder: Path) -> DatasetSpec:
        _good_images(folder)
        workbook = openpyxl.Workbook()
        for row in rows:
            workbook.active.append(row)
        workbook.save(folder / "MOS and Image attribute scores.xlsx")
        return DatasetSpec(format="spaq", path=str(folder), image_dir=".")

    return build


def jsonl_dataset(bad_image: str | None = None, prefix: bytes = b"") -> Callable[[Path], DatasetSpec]:
    """train.jsonl in the published layout; `bad_image` is the third record's image path."""

    def build(folder: Path) -> DatasetSpec:
        _good_images(folder)
        images = ["a.png", "c.png", *([bad_image] if bad_image is not None else []), "b.png"]
        lines = [
            json.dumps(
                {
                    "id": f"row{index}",
                    "image": [image],
                    "conversations": [{"from": "human", "value": "rate"}, {"from": "gpt", "value": 3.0}],
                }
            )
            for index, image in enumerate(images, start=1)
        ]
        (folder / "train.jsonl").write_bytes(prefix + ("\n".join(lines) + "\n").encode())
        return DatasetSpec(format="jsonl", path=str(folder / "train.jsonl"))

    return build


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], DatasetSpec]
    kind: str  # the report's kind of the bad row, or WHOLE_FILE, or ACCEPTED
    reason: str = ""  # a regex the reason must match
    image: str | None = None  # the bad image's file name: the decoder is checked on it too
    row: int = BAD_ROW
    label_file: str = "scores.txt"


SPAQ_HEADER = ["Image name", "MOS", "Brightness"]
CASES = {
    # ---- image files
    "truncated JPEG": Case(
        text_dataset("cut.jpg 3", {"cut.jpg": _noise("JPEG")[:1500]}), "truncated", "truncated", "cut.jpg"
    ),
    "truncated PNG": Case(
        text_dataset("cut.png 3", {"cut.png": _noise("PNG")[:3000]}), "truncated", "truncated", "cut.png"
    ),
    "corrupt PNG data": Case(
        text_dataset("broken.png 3", {"broken.png": _corrupt_png()}), "corrupt", "corrupt", "broken.png"
    ),
    "zero-byte file": Case(
        text_dataset("empty.jpg 3", {"empty.jpg": b""}), "zero-byte", "zero-byte file", "empty.jpg"
    ),
    "text saved as .jpg": Case(
        text_dataset("notes.jpg 3", {"notes.jpg": b"name,score\na.png,3\n"}),
        "not an image",
        "not an image: text",
        "notes.jpg",
    ),
    "HTML saved as .jpg": Case(
        text_dataset("page.jpg 3", {"page.jpg": HTML}), "not an image", "an HTML page", "page.jpg"
    ),
    "decompression bomb": Case(
        text_dataset("bomb.png 3", {"bomb.png": _bomb()}), "too large", "too large", "bomb.png"
    ),
    "very large photo (20000x15000)": Case(
        text_dataset("huge.png 3", {"huge.png": lambda p: p.write_bytes(_huge_photo())}),
        "too large",
        "too large",
        "huge.png",
    ),
    "1x1 image": Case(
        text_dataset("dot.png 3", {"dot.png": _encoded(Image.new("RGB", (1, 1)), "PNG")}),
        "too small",
        r"too small: 1x1 px",
        "dot.png",
    ),
    "panorama over 200:1": Case(
        text_dataset("pano.png 3", {"pano.png": _encoded(Image.new("RGB", (4020, 20)), "PNG")}),
        "aspect ratio",
        r"aspect ratio 201:1 \(4020x20 px\) is over 200:1",
        "pano.png",
    ),
    "HEIC photo": Case(
        text_dataset("phone.heic 3", {"phone.heic": _ftyp(b"heic")}),
        "unsupported format",
        "HEIC/HEIF image",
        "phone.heic",
    ),
    "AVIF image": Case(
        text_dataset("web.avif 3", {"web.avif": _avif()}),
        ACCEPTED if AVIF else "unsupported format",
        "" if AVIF else "AVIF image",
        "web.avif",
    ),
    "unreadable file (chmod 000)": Case(
        text_dataset(f"{LOCKED} 3", {LOCKED: _locked}), "unreadable", "cannot read the file", LOCKED
    ),
    "missing file": Case(text_dataset("gone.jpg 3"), "missing", "file is missing", "gone.jpg"),
    "a folder named like an image": Case(
        text_dataset("dir.jpg 3", {"dir.jpg": Path.mkdir}), "not a file", "not a regular file", "dir.jpg"
    ),
    "symlink loop": Case(
        text_dataset("loop-a.jpg 3", {"loop-a.jpg": _symlink_loop}),
        "broken link",
        "symbolic link loop",
        "loop-a.jpg",
    ),
    "dangling symlink": Case(
        text_dataset("link.jpg 3", {"link.jpg": lambda p: p.symlink_to(p.with_name("nowhere.jpg"))}),
        "broken link",
        r"symbolic link to a missing file \(.*nowhere\.jpg\)",
        "link.jpg",
    ),
    "JSONL image path escaping the dataset (../../etc/passwd)": Case(
        jsonl_dataset("../../etc/passwd"),
        "outside dataset",
        "leads outside the image folder",
        label_file="train.jsonl",
    ),
    "absolute image path outside the dataset": Case(
        text_dataset("/etc/passwd 3"), "outside dataset", "leads outside the image folder"
    ),
    "JSONL record with an empty image path": Case(
        jsonl_dataset(""), "no image", "image name is empty", label_file="train.jsonl"
    ),
    # ---- labels
    "NaN label": Case(text_dataset("d.png nan"), "bad MOS", "MOS is NaN"),
    "inf label": Case(text_dataset("d.png inf"), "bad MOS", "MOS is infinite"),
    "-inf label": Case(text_dataset("d.png -inf"), "bad MOS", "MOS is infinite"),
    "empty label": Case(text_dataset("d.png"), "bad MOS", "MOS is empty"),
    "text label": Case(text_dataset("d.png good"), "bad MOS", "MOS 'good' is not a number"),
    "decimal-comma label": Case(text_dataset("d.png 4,5"), "bad MOS", "a decimal comma"),
    "duplicated id, different label": Case(
        text_dataset("a.png 3"),
        "duplicate",
        r"duplicate of row 1 \(a\.png\), with a different label \(1, now 3\)",
    ),
    "duplicated id, same label": Case(text_dataset("a.png 1"), "duplicate", "with the same label"),
    # ---- label files
    "CSV with a UTF-8 BOM": Case(csv_dataset("\ufeff" + kadid_csv()), ACCEPTED),
    "text list with a UTF-8 BOM": Case(text_dataset("d.png 3", prefix="\ufeff"), ACCEPTED),
    "JSONL with a UTF-8 BOM": Case(jsonl_dataset(prefix="\ufeff".encode()), ACCEPTED),
    "CSV with CRLF line ends": Case(csv_dataset(kadid_csv(newline="\r\n")), ACCEPTED),
    "CSV with ; separators": Case(csv_dataset(kadid_csv(separator=";")), ACCEPTED),
    "CSV with tab separators": Case(csv_dataset(kadid_csv(separator="\t")), ACCEPTED),
    "CSV row with too few fields": Case(
        csv_dataset(kadid_csv(bad_row="d.png,r3.png")),
        "bad MOS",
        "MOS is empty",
        row=BAD_ROW + 1,  # CSV rows are file lines, and the header is line 1
        label_file="dmos.csv",
    ),
    "xlsx with a title row above the header": Case(
        xlsx_dataset(
            [["SPAQ MOS (title)"], SPAQ_HEADER, ["a.png", 10, 1], ["c.png", 90, 1], ["b.png", 40, 1]]
        ),
        ACCEPTED,
    ),
    "xlsx with an extra header row among the rows": Case(
        xlsx_dataset([SPAQ_HEADER, ["a.png", 10, 1], SPAQ_HEADER, ["c.png", 90, 1], ["b.png", 40, 1]]),
        "bad MOS",
        "MOS 'MOS' is not a number",
        label_file="MOS and Image attribute scores.xlsx",
    ),
    "label file not in UTF-8 (Latin-1)": Case(
        csv_dataset(kadid_csv(bad_row="caf\u00e9.png,r3.png,3.0,0.1"), encoding="latin-1"),
        WHOLE_FILE,
        r"not UTF-8 text \(byte 0xe9",
        label_file="dmos.csv",
    ),
    "CSV without the label column": Case(
        csv_dataset("dist_img,ref_img,var\na.png,r1.png,0.1\n"),
        WHOLE_FILE,
        r"missing column\(s\) \['dmos'\]",
        label_file="dmos.csv",
    ),
    "xlsx that is not a workbook": Case(
        lambda folder: (
            (folder / "MOS and Image attribute scores.xlsx").write_bytes(b"PK\x03\x04 not really a zip"),
            DatasetSpec(format="spaq", path=str(folder)),
        )[1],
        WHOLE_FILE,
        "not a readable .xlsx workbook",
        label_file="MOS and Image attribute scores.xlsx",
    ),
    "JSONL line that is not JSON": Case(
        jsonl_dataset(prefix=b'{"id": "x", "image": \n'),
        WHOLE_FILE,
        "not valid JSON",
        label_file="train.jsonl",
    ),
    "JSONL line that is not an object": Case(
        jsonl_dataset(prefix=b'["a.png", 3]\n'),
        WHOLE_FILE,
        "expected a JSON object",
        label_file="train.jsonl",
    ),
    "empty label file": Case(
        lambda folder: ((folder / "scores.txt").write_text(""), DatasetSpec(format="text", path=str(folder)))[
            1
        ],
        WHOLE_FILE,
        "no rows",
    ),
}


# ---------------------------------------------------------------- running a case


def _build(case: Case, folder: Path, monkeypatch) -> DatasetSpec:
    spec = case.build(folder)
    if case.image == LOCKED and os.geteuid() == 0:
        # root reads a chmod 000 file, so the permission error a normal user gets is simulated here.
        read_bytes = Path.read_bytes

        def refuse(path: Path) -> bytes:
            if path.name == LOCKED:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return read_bytes(path)

        monkeypatch.setattr(Path, "read_bytes", refuse)
    return spec


def _where(case: Case) -> str:
    """How a message names the bad row: `label_file:row`."""
    return rf"{re.escape(case.label_file)}:{case.row}\b"


def _data_check(spec: DatasetSpec) -> int:
    parser = argparse.ArgumentParser(prog="vqr1")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    argv = ["data", "check", "--format", spec.format, spec.path]
    args = parser.parse_args(argv + (["--image-dir", spec.image_dir] if spec.image_dir else []))
    return args.handler(args)


def _load(spec: DatasetSpec, policy: str):
    """The training path: iqa.splits.load_splits with data.on_bad_input=policy; (rows kept, report)."""
    splits, report = load_splits([spec], DataConfig(train=[spec], eval=[spec], on_bad_input=policy))
    return sum(len(split) for split in splits.values()), report


@pytest.mark.parametrize("name", list(CASES))
def test_data_check(name, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    status = _data_check(_build(case, tmp_path, monkeypatch))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if case.kind == ACCEPTED:
        assert status == 0 and "none bad" in out, out + err
    elif case.kind == WHOLE_FILE:
        assert status == 2 and re.search(rf"error: .*{re.escape(case.label_file)}.*{case.reason}", err), err
    else:
        assert status == 1, out + err
        assert re.search(rf"{_where(case)}.*: .*{case.reason}", out), out
        assert f"1 bad rows left out (on_bad_input=skip: 1 x {case.kind})" in out
        assert "usable: 3 images" in out


@pytest.mark.parametrize("name", list(CASES))
def test_error_policy(name, tmp_path, monkeypatch):
    case = CASES[name]
    spec = _build(case, tmp_path, monkeypatch)
    if case.kind == ACCEPTED:
        kept, report = _load(spec, "error")
        assert kept == report.rows_read >= 3 and not report.bad
        return
    with pytest.raises(BadInputError) as err:
        _load(spec, "error")
    message = str(err.value)
    if case.kind == WHOLE_FILE:
        assert re.search(rf"{re.escape(case.label_file)}.*{case.reason}", message), message
    else:
        assert re.search(rf"{_where(case)}.*: .*{case.reason}", message), message
        assert "data.on_bad_input=error stops at the first bad row" in message


@pytest.mark.parametrize("name", list(CASES))
def test_skip_policy(name, tmp_path, monkeypatch):
    case = CASES[name]
    spec = _build(case, tmp_path, monkeypatch)
    if case.kind == WHOLE_FILE:
        with pytest.raises(BadInputError, match=case.reason):
            _load(spec, "skip")
        return
    kept, report = _load(spec, "skip")
    if case.kind == ACCEPTED:
        assert kept == report.rows_read and not report.bad
        return
    # Nothing dropped without being counted: every row read is kept or reported.
    assert (kept, report.rows_read, report.kept) == (3, 4, 3)
    [bad] = report.bad
    assert (bad.row, bad.kind) == (case.row, case.kind) and Path(bad.label_file).name == case.label_file
    assert re.search(case.reason, bad.reason), bad.reason
    assert report.reason_counts() == {case.kind: 1}


IMAGE_CASES = [name for name, case in CASES.items() if case.image]


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_decoder(name, tmp_path, monkeypatch):
    """`vqr1 score` and evaluation decode with load_image; data check and training check with check_image."""
    case = CASES[name]
    _build(case, tmp_path, monkeypatch)
    path = tmp_path / case.image
    for decode in (load_image, check_image):
        if case.kind == ACCEPTED:
            assert decode(path)
            continue
        with pytest.raises(ImageLoadError) as err:
            decode(path)
        assert err.value.kind == case.kind and str(err.value).startswith(f"{path}: ")
        assert re.search(case.reason, err.value.reason), err.value.reason


def test_the_table_covers_every_kind_of_bad_row():
    kinds = {case.kind for case in CASES.values()} - {ACCEPTED, WHOLE_FILE}
    assert kinds >= {
        "truncated",
        "corrupt",
        "zero-byte",
        "not an image",
        "too large",
        "too small",
        "aspect ratio",
        "unsupported format",
        "unreadable",
        "missing",
        "not a file",
        "broken link",
        "outside dataset",
        "no image",
        "bad MOS",
        "duplicate",
    }
    assert len(CASES) >= 25
