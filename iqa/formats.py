"""IQA label files -> one `datasets.Dataset` per dataset, all through one validation path.

Columns of every loaded dataset:
  id       the image's name as the label file gives it (unique within the dataset)
  image    absolute path of the image file
  mos_raw  the label as written in the file
  mos      the label rescaled per dataset by min-max to [1, 5], higher = better (direction-corrected)
  dataset  the dataset's name (comparison groups never span two names)
  ref      the reference (pristine) image's name, for content-independent splits; the image's own id
           where the dataset has no references (authentic-distortion sets)

Formats (`FORMATS`; add one with a small reader function decorated by `register_format`):
  name       label file (in the dataset folder, or given as `path`)   label, direction, range
  kadid10k   dmos.csv (dist_img, ref_img, dmos, var); images/          "dmos" is in fact a 1-5 MOS,
                                                                       HIGHER is better
  koniq10k   koniq10k_scores_and_distributions.csv (image_name, MOS);  MOS 1-5, higher is better
             1024x768/ or 512x384/
  spaq       [Annotations/]MOS and Image attribute scores.xlsx          MOS 0-100, higher is better
             (Image name, MOS); TestImage/
  livec      [Data/]AllImages_release.mat + AllMOS_release.mat;        MOS 0-100, higher is better
             Images/ (the first 7 entries, the practice images, are left out as usual: 1,162 images)
  agiqa3k    data.csv (name, mos_quality); AGIQA-3K/ or images/        mos_quality 0-5, higher is better
  csiq       csiq.DMOS.xlsx, or a CSV with its columns (image,          DMOS 0-1, LOWER is better
             dst_type, dst_lev, dmos); dst_imgs/<type>/<image>.<TYPE>.<lev>.png
  text       a text file of "name score [ref]" lines (# comments)       higher is better unless the
                                                                        spec sets higher_is_better
  jsonl      the published JSONL (see `write_jsonl`)                    already [1, 5]: not rescaled
  builtin    the built-in benchmark (iqa.builtin)                       formula in [1, 5]: not rescaled
  tint       the tint check (iqa.tint_check): red > gray > blue views   4.5 / 3.0 / 1.5: not rescaled
A dataset spec's `higher_is_better` overrides a format's direction; `image_dir` its image folder.
A dataset whose labels are all equal gets mos 3 (the midpoint) for every image.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, Features, Value, concatenate_datasets
from tqdm import tqdm

from configs.load import ConfigError
from configs.schema import DataConfig, DatasetSpec
from iqa.builtin import build_builtin_benchmark, read_manifest
from iqa.images import ImageLoadError, check_image
from iqa.report import BadInputError, BadInputReport, BadRow, OnBadInput, fail
from iqa.tint_check import build_tint_check

FEATURES = Features(
    {
        "id": Value("string"),
        "image": Value("string"),
        "mos_raw": Value("float64"),
        "mos": Value("float64"),
        "dataset": Value("string"),
        "ref": Value("string"),
    }
)
MOS_RANGE = (1.0, 5.0)
# Decoding is mostly done in Pillow's C code, which releases the GIL: threads overlap I/O and decode.
IMAGE_CHECK_WORKERS = min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class LabelRow:
    row: int  # where the row is in the label file (see BadRow.row)
    image: str  # image path relative to the image folder, as written in the label file
    mos: object  # the raw cell; checked in `_mos_problem`
    ref: str | None = None  # reference image; None: the image is its own reference
    dataset: str | None = None  # a per-row dataset name (JSONL); None: the spec's name
    id: str | None = None  # an explicit id (JSONL); None: `image`


@dataclass(frozen=True)
class LabelTable:
    label_file: Path
    image_dir: Path
    rows: list[LabelRow]


@dataclass(frozen=True)
class Format:
    name: str
    read: Callable[[DatasetSpec, DataConfig], LabelTable]
    higher_is_better: bool
    rescale: bool  # min-max to [1, 5]; False where the file already holds the [1, 5] target


FORMATS: dict[str, Format] = {}


def register_format(name: str, *, higher_is_better: bool = True, rescale: bool = True):
    """Decorator: `read(spec, data) -> LabelTable` becomes the reader of format `name`."""

    def decorate(read: Callable[[DatasetSpec, DataConfig], LabelTable]):
        if name in FORMATS:
            raise ValueError(f"dataset format {name!r} is registered twice")
        FORMATS[name] = Format(name, read, higher_is_better, rescale)
        return read

    return decorate


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown dataset format {name!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


# ---------------------------------------------------------------- locating files


def _dataset_root(spec: DatasetSpec) -> Path:
    if spec.path is None:
        raise BadInputError(f"dataset format {spec.format!r} needs a path (the dataset folder or label file)")
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise BadInputError(f"{path}: dataset path does not exist")
    return path if path.is_dir() else path.parent


def locate_label_file(spec: DatasetSpec, *candidates: str) -> Path:
    """`spec.path` itself when it is a file, else the first of `candidates` inside that folder."""
    root = _dataset_root(spec)
    path = Path(spec.path).expanduser()
    if path.is_file():
        return path
    for name in candidates:
        if (root / name).is_file():
            return root / name
    raise BadInputError(f"{root}: no {spec.format} label file found (looked for {', '.join(candidates)})")


def locate_image_dir(spec: DatasetSpec, *candidates: str) -> Path:
    """`spec.image_dir` when set, else the first existing candidate folder, else the dataset folder."""
    root = _dataset_root(spec)
    if spec.image_dir is not None:
        folder = root / Path(spec.image_dir).expanduser()
        if not folder.is_dir():
            raise BadInputError(f"{folder}: image folder (image_dir) does not exist")
        return folder.absolute()
    for name in candidates:
        if (root / name).is_dir():
            return (root / name).absolute()
    return root.absolute()


def _require(columns: Iterable[str], required: Iterable[str], label_file: Path) -> None:
    have = [str(c).strip() for c in columns if c is not None]
    missing = [c for c in required if c not in have]
    if missing:
        raise BadInputError(f"{label_file}: missing column(s) {missing}; the header has {have}")


def read_label_text(label_file: Path) -> str:
    """The label file as text: UTF-8, with or without a byte-order mark; anything else is refused by name."""
    try:
        return label_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInputError(
            f"{label_file}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    except OSError as exc:
        raise BadInputError(f"{label_file}: cannot read the label file ({exc.strerror or exc})") from None


def read_csv_rows(label_file: Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a CSV file with a header line; the line number counts the header as 1.

    Fields are separated by commas, or by the semicolons or tabs of a spreadsheet export: whichever the
    header line holds most of. CRLF line ends and a UTF-8 byte-order mark are fine.
    """
    text = read_label_text(label_file)
    header = text.partition("\n")[0]
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=max(",;\t", key=header.count))
    rows = []
    try:
        _require(reader.fieldnames or [], required, label_file)
        for row in reader:
            if any(value and value.strip() for value in row.values() if isinstance(value, str)):
                rows.append((reader.line_num, {str(k).strip(): v for k, v in row.items()}))
    except csv.Error as exc:
        raise BadInputError(f"{label_file}:{reader.line_num}: unreadable CSV ({exc})") from None
    return rows


def _header_index(sheet_rows: list[tuple], required: list[str]) -> int | None:
    """The first of the top rows that names every required column (title rows may sit above it)."""
    for index, cells in enumerate(sheet_rows[:20]):
        if set(required) <= {str(c).strip() for c in cells if c is not None}:
            return index
    return None


def read_xlsx_rows(label_file: Path, required: list[str]) -> list[tuple[int, dict[str, object]]]:
    """(spreadsheet row, row) pairs of the first sheet whose header names all `required` columns."""
    from openpyxl import load_workbook  # only spreadsheet formats need it
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        workbook = load_workbook(label_file, read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError, OSError) as exc:
        raise BadInputError(f"{label_file}: not a readable .xlsx workbook ({exc})") from None
    try:
        sheets = [list(sheet.iter_rows(values_only=True)) for sheet in workbook.worksheets]
    finally:
        workbook.close()
    found = [(rows, _header_index(rows, required)) for rows in sheets]
    found = [(rows, index) for rows, index in found if index is not None]
    if not found:
        first_rows = sheets[0] if sheets and sheets[0] else [()]
        _require(first_rows[0], required, label_file)
    sheet_rows, header_index = found[0]
    header = [str(c).strip() if c is not None else "" for c in sheet_rows[header_index]]
    rows = []
    for number, cells in enumerate(sheet_rows[header_index + 1 :], start=header_index + 2):
        if any(c is not None and str(c).strip() for c in cells):
            rows.append((number, dict(zip(header, cells, strict=False))))
    return rows


# ---------------------------------------------------------------- formats


@register_format("kadid10k", higher_is_better=True)
def read_kadid10k(spec: DatasetSpec, data: DataConfig) -> LabelTable:
    """KADID-10K: its "dmos" column is a 1-5 mean opinion score where higher is better."""
    label_file = locate_label_file(spec, "dmos.csv")
    rows = read_csv_rows(label_file, ["dist_img", "ref_img", "dmos"])
    return LabelTable(
        label_file,
        locate_image_dir(spec, "images"),
        [LabelRow(line, r["dist_img"], r["dmos"], ref=r["ref_img"]) for line, r in rows],
    )


@register_format("koniq10k", higher_is_better=True)
def read_koniq10k(spec: DatasetSpec, data: DataConfig) -> LabelTable:
    label_file = locate_label_file(spec, "koniq10k_scores_and_distributions.csv")
    rows = read_csv_rows(label_file, ["image_name", "MOS"])
    return LabelTable(
        label_file,
        locate_image_dir(spec, "1024x768", "512x384", "images"),
        [LabelRow(line, r["image_name"], r["MOS"]) for line, r in rows],
    )


@register_format("spaq", higher_is_better=True)
def read_spaq(spec: DatasetSpec, data: DataConfig) -> LabelTable:
    name = "MOS and Image attribute scores.xlsx"
    label_file = locate_label_file(spec, name, f"Annotations/{name}")
    rows = read_xlsx_rows(label_file, ["Image name", "MOS"])
    return LabelTable(
        label_file,
        locate_image_dir(spec, "TestImage", "images"),
        [LabelRow(line, str(r["Image name"] or ""), r["MOS"]) for line, r in rows],
    )


LIVEC_PRACTICE_IMAGES = 7


def _mat_strings(value) -> list[str]:
    """A MATLAB cell array of strings, as scipy.io.loadmat returns it, as a flat list."""
    import numpy as np

    return [str(np.asarray(cell).ravel()[0]) if np.asarray(cell).size else "" for cell in np.ravel(value)]


@register_format("livec", higher_is_better=True)
def read_livec(spec: DatasetSpec, data: DataConfig) -> LabelTable:
    """LIVE In the Wild Challenge; entries 1-7 (the practice images) are left out, as is usual."""
    import numpy as np
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    images_file = locate_label_file(spec, "AllImages_release.mat", "Data/AllImages_release.mat")
    mos_file = images_file.with_name("AllMOS_release.mat")
    tables = {}
    for path, key in ((images_file, "AllImages_release"), (mos_file, "AllMOS_release")):
        if not path.is_file():
            raise BadInputError(f"{path}: LIVE Challenge label file is missing")
        try:
            content = loadmat(path)
        except (MatReadError, ValueError, OSError) as exc:
            raise BadInputError(f"{path}: not a readable MATLAB file ({exc})") from None
        if key not in content:
            raise BadInputError(
                f"{path}: missing variable {key!r}; it has {sorted(k for k in content if k[0] != '_')}"
            )
        tables[key] = content[key]
    names = _mat_strings(tables["AllImages_release"])
    scores = np.ravel(tables["AllMOS_release"])
    if len(names) != len(scores):
        raise BadInputError(
            f"{images_file}: {len(names)} image names but {len(scores)} MOS values in {mos_file}"
        )
    return LabelTable(
        images_file,
        locate_image_dir(spec, "Images"),
        [
            LabelRow(index, names[index - 1], float(scores[index - 1]))
            for index in range(LIVEC_PRACTICE_IMAGES + 1, len(names) + 1)
        ],
    )


@register_format("agiqa3k", higher_is_better=True)
def read_agiqa3k(spec: DatasetSpec, data: DataConfig) -> LabelTable:
    label_file = locate_label_file(spec, "data.csv")
    rows = read_csv_rows(label_file, ["name", "mos_quality"])
    return LabelTable(
        label_file,
        locate_image_dir(spec, "AGIQA-3K", "images"),
        [LabelRow(line, r["name"], r["mos_quality"]) for line, r in rows],
    )


# CSIQ's distortion types (dst_type in its DMOS table) -> (folder under dst_imgs/, tag in the file name).
CSIQ_TYPES = {
    "noise": ("awgn", "AWGN"),
    "jpeg": ("jpeg", "JPEG"),
    "jpeg 2000": ("jpeg2000", "jpeg2000"),
    "fnoise": ("fnoise", "fnoise"),
    "blur": ("blur", "BLUR"),
    "contrast": ("contrast", "contrast"),
}


def _csiq_image(row: dict) -> str:
    """dst_imgs-relative path of one CSIQ row, or "" when the row's type or level is unusable."""
    kind = CSIQ_TYPES.get(str(row["dst_type"] or "").strip().lower())
    ref = str(row["image"] or "").strip()
    try:
        level = int(float(row["dst_lev"]))
    except (TypeError, ValueError):
        return ""
    return f"{kind[0]}/{ref}.{kind[1]}.{level}.png" if kind and ref else ""


@register_format("csiq", higher_is_better=False)
def read_csiq(spec: DatasetSpec, data: DataConfig) -> LabelTable:
    """CSIQ: DMOS in [0, 1], LOWER is better."""
    label_file = locate_label_file(spec, "csiq.DMOS.xlsx", "csiq_dmos.csv")
    required = ["image", "dst_type", "dst_lev", "dmos"]
    reader = read_xlsx_rows if label_file.suffix.lower() in (".xlsx", ".xlsm") else read_csv_rows
    rows = reader(label_file, required)
    image_dir = locate_image_dir(spec, "dst_imgs")
    # The tags' case differs between types (AWGN, BLUR, jpeg2000, ...) and copies of the set: match any case.
    on_disk = {p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*.png")}
    by_lower = {name.lower(): name for name in on_disk}
    return LabelTable(
        label_file,
        image_dir,
        [
            LabelRow(
                line,
                by_lower.get(_csiq_image(r).lower(), _csiq_image(r)),
                r["dmos"],
                ref=str(r["image"] or "").strip() or None,
            )
            for line, r in rows
        ],
    )


@register_format("text", higher_is_better=True)
def read_text(spec: DatasetSpec, data: DataConfig) -> LabelTable:
    """Whitespace-separated "name score [ref]" lines; blank lines and lines starting with # are skipped."""
    label_file = locate_label_file(spec, "scores.txt", "mos.txt", "labels.txt")
    rows = []
    for line_number, line in enumerate(read_label_text(label_file).splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 3:
            raise BadInputError(f"{label_file}:{line_number}: expected 'name score [ref]', got {line!r}")
        rows.append(
            LabelRow(
                line_number,
                fields[0],
                fields[1] if len(fields) > 1 else None,
                ref=fields[2] if len(fields) > 2 else None,
            )
        )
    return LabelTable(label_file, locate_image_dir(spec), rows)


@register_format("jsonl", rescale=False)
def read_jsonl(spec: DatasetSpec, data: DataConfig) -> LabelTable:
    """The published JSONL; the MOS is the gpt turn's value; an optional "ref" key names the reference."""
    label_file = locate_label_file(spec, "data.jsonl", "train.jsonl")
    rows = []
    for line_number, line in enumerate(read_label_text(label_file).splitlines(), start=1):
        if not line.strip():
            continue
        record = _jsonl_record(label_file, line_number, line)
        images = record["image"] if isinstance(record["image"], list) else [record["image"]]
        answers = [turn.get("value") for turn in record["conversations"] if turn.get("from") == "gpt"]
        rows.append(
            LabelRow(
                line_number,
                str(images[0]) if len(images) == 1 else "",
                answers[-1] if answers else None,
                ref=record.get("ref"),
                dataset=record.get("dataset_name"),
                id=str(record["id"]),
            )
        )
    return LabelTable(label_file, locate_image_dir(spec), rows)


def _jsonl_record(label_file: Path, line_number: int, line: str) -> dict:
    """One JSONL line as a record with the fields `read_jsonl` needs; anything else stops the load."""
    where = f"{label_file}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise BadInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("id", "image", "conversations") if key not in record]
    if missing:
        raise BadInputError(f"{where}: missing field(s) {missing}")
    turns = record["conversations"]
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise BadInputError(f'{where}: "conversations" must be a list of {{from, value}} objects')
    return record


@register_format("builtin", rescale=False)
def read_builtin(spec: DatasetSpec, data: DataConfig) -> LabelTable:
    """The built-in benchmark, generated into data.cache_dir (or spec.path when given) on first use."""
    return _generated_table(
        build_builtin_benchmark(
            _generation_dir(spec, data),
            data.builtin_size,
            data.builtin_seed,
            data.builtin_families,
            data.builtin_levels,
            spec.views,
        )
    )


def _generation_dir(spec: DatasetSpec, data: DataConfig) -> Path:
    """Where a generated dataset lives: spec.path when given, else data.cache_dir."""
    return Path(spec.path).expanduser() if spec.path else Path(data.cache_dir)


def _generated_table(folder: Path) -> LabelTable:
    """The label table of a generated dataset's folder (its manifest.json: file, mos, ref per image)."""
    rows = [
        LabelRow(index, entry["file"], entry["mos"], ref=entry["ref"])
        for index, entry in enumerate(read_manifest(folder), start=1)
    ]
    return LabelTable(folder / "manifest.json", folder.absolute(), rows)


@register_format("tint", rescale=False)
def read_tint(spec: DatasetSpec, data: DataConfig) -> LabelTable:
    """The tint check (a loop test: rank red > gray > blue), generated into data.cache_dir (or spec.path)."""
    return _generated_table(
        build_tint_check(_generation_dir(spec, data), data.builtin_size, data.builtin_seed)
    )


def write_jsonl(dataset: Dataset, path: str | Path, question: str) -> Path:
    """Write rows in the published JSONL layout, `question` as the human turn (`vlm.prompts.prompt_question`);
    image paths relative to the JSONL file's folder, which must hold every image (the loader refuses paths
    that leave it)."""
    path = Path(path)
    outside = [image for image in dataset["image"] if _leaves(path.parent.absolute(), image)]
    if outside:
        raise ValueError(f"{path}: {len(outside)} images lie outside {path.parent}, e.g. {outside[0]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for row in dataset:
            record = {
                "id": row["id"],
                "dataset_name": row["dataset"],
                "image": [os.path.relpath(row["image"], path.parent.absolute())],
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": row["mos"]}],
                "ref": row["ref"],
            }
            out.write(json.dumps(record) + "\n")
    return path


# ---------------------------------------------------------------- the shared validation path


DECIMAL_COMMA = re.compile(r"[-+]?\d+,\d+")


def _mos_problem(value: object) -> tuple[float | None, str | None]:
    """(the label as a float, None) or (None, why it is not a usable label)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, "MOS is empty"
    if isinstance(value, bool):
        return None, f"MOS {value!r} is not a number"
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        if isinstance(value, str) and DECIMAL_COMMA.fullmatch(value.strip()):
            return None, f"MOS {value!r} is not a number (a decimal comma? write it with a point)"
        return None, f"MOS {value!r} is not a number"
    if math.isnan(number):
        return None, "MOS is NaN"
    if math.isinf(number):
        return None, "MOS is infinite"
    return number, None


def _image_error(path: Path) -> ImageLoadError | None:
    try:
        check_image(path)
    except ImageLoadError as exc:
        return exc
    return None


def _leaves(folder: Path, image: str) -> bool:
    """Whether the label file's `image` path ("../../etc/passwd", "/home/...") points outside `folder`.

    Judged on the path as written (not through symlinks), so a dataset may link its image folder elsewhere.
    """
    root = os.path.abspath(folder)
    return os.path.commonpath([root, os.path.abspath(os.path.join(root, image))]) != root


def _duplicate(first: LabelRow, name: str, mos: float) -> str:
    first_mos, _ = _mos_problem(first.mos)
    labels = "the same label" if first_mos == mos else f"a different label ({first_mos:g}, now {mos:g})"
    return f"duplicate of row {first.row} ({name}), with {labels}; the first row is kept"


@dataclass
class _Candidate:
    label: LabelRow
    path: Path
    mos_raw: float
    dataset: str


def _validate(
    table: LabelTable, dataset_name: str, on_bad_input: OnBadInput, check_images: bool, progress: bool
) -> tuple[list[_Candidate], BadInputReport]:
    report = BadInputReport(dataset_name, rows_read=len(table.rows))
    label_file = str(table.label_file)

    def reject(bad: BadRow) -> None:
        if on_bad_input == "error":
            raise fail(bad)
        report.bad.append(bad)

    first_seen: dict[tuple[str, str], LabelRow] = {}
    candidates = []
    for label in table.rows:
        image = label.image.strip()
        if not image:
            reject(
                BadRow(label_file, label.row, "no image", "image name is empty or unusable", field="image")
            )
            continue
        if _leaves(table.image_dir, image):
            reason = f"image path leads outside the image folder {table.image_dir}; refused"
            reject(BadRow(label_file, label.row, "outside dataset", reason, image=image, field="image"))
            continue
        mos, problem = _mos_problem(label.mos)
        if problem:
            reject(BadRow(label_file, label.row, "bad MOS", problem, image=image, field="mos"))
            continue
        dataset = label.dataset or dataset_name
        key = (dataset, label.id or image)
        if key in first_seen:
            reject(
                BadRow(
                    label_file, label.row, "duplicate", _duplicate(first_seen[key], key[1], mos), image=image
                )
            )
            continue
        first_seen[key] = label
        candidates.append(_Candidate(label, table.image_dir / image, mos, dataset))
    if not check_images:
        return candidates, report
    kept = []
    with ThreadPoolExecutor(IMAGE_CHECK_WORKERS) as pool:
        errors = pool.map(_image_error, [c.path for c in candidates])
        bar = tqdm(
            errors,
            total=len(candidates),
            desc=f"checking {dataset_name} images",
            unit="img",
            disable=not progress,
        )
        try:
            for candidate, error in zip(candidates, bar, strict=True):
                if error is None:
                    kept.append(candidate)
                else:
                    image_bad = BadRow(
                        label_file,
                        candidate.label.row,
                        error.kind,
                        error.reason,
                        image=str(candidate.path),
                        field="image",
                    )
                    reject(image_bad)
        except BadInputError:
            pool.shutdown(cancel_futures=True)
            raise
    return kept, report


def _rescaled(values: list[float], higher_is_better: bool) -> list[float]:
    low, high = min(values), max(values)
    if high == low:
        return [sum(MOS_RANGE) / 2] * len(values)
    span = MOS_RANGE[1] - MOS_RANGE[0]
    unit = [(v - low) / (high - low) for v in values]
    return [MOS_RANGE[0] + span * (u if higher_is_better else 1.0 - u) for u in unit]


def load_dataset_spec(
    spec: DatasetSpec,
    on_bad_input: OnBadInput = "error",
    *,
    data: DataConfig | None = None,
    check_images: bool = True,
    progress: bool = True,
) -> tuple[Dataset, BadInputReport]:
    """Read, validate and rescale one dataset (columns: see the module docstring).

    `data` supplies the built-in benchmark's settings (defaults when None). `check_images=False` skips
    decoding every image (label checks still run), for a quick look at a big dataset.
    """
    if on_bad_input not in ("error", "skip"):
        raise ValueError(f"on_bad_input must be 'error' or 'skip', got {on_bad_input!r}")
    fmt = get_format(spec.format)
    dataset_name = spec.name or fmt.name
    table = fmt.read(spec, data or DataConfig())
    if not table.rows:
        raise BadInputError(f"{table.label_file}: no rows")
    kept, report = _validate(table, dataset_name, on_bad_input, check_images, progress)
    report.bad.sort(key=lambda bad: bad.row or 0)  # label checks and image checks found them in two passes
    if not kept:
        raise BadInputError(
            f"{table.label_file}: none of the {len(table.rows)} rows is usable\n" + "\n".join(report.lines())
        )
    higher_is_better = fmt.higher_is_better if spec.higher_is_better is None else spec.higher_is_better
    raw = [c.mos_raw for c in kept]
    if fmt.rescale:
        mos = _rescaled(raw, higher_is_better)
    elif higher_is_better:
        mos = raw
    else:
        mos = [sum(MOS_RANGE) - v for v in raw]  # a [1, 5] label turned around
    columns = {
        "id": [c.label.id or c.label.image.strip() for c in kept],
        "image": [os.path.abspath(c.path) for c in kept],  # abspath also folds "../" from JSONL paths
        "mos_raw": raw,
        "mos": mos,
        "dataset": [c.dataset for c in kept],
        "ref": [c.label.ref or c.label.id or c.label.image.strip() for c in kept],
    }
    return Dataset.from_dict(columns, features=FEATURES), report


def load_datasets(
    specs: list[DatasetSpec],
    data: DataConfig,
    *,
    check_images: bool = True,
    progress: bool = True,
    cache: dict[str, tuple[Dataset, BadInputReport]] | None = None,
) -> tuple[Dataset, BadInputReport]:
    """Several datasets into one (each row keeps its dataset name), with one merged report. The caller
    prints the report. `cache` ({spec as JSON: (dataset, report)}), shared between calls, reads a dataset
    that both data.train and data.eval name once."""
    names = [spec.name or spec.format for spec in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"datasets {repeated} are listed twice; give each spec its own `name`")

    def load(spec: DatasetSpec) -> tuple[Dataset, BadInputReport]:
        key = spec.model_dump_json()
        if cache is not None and key in cache:
            return cache[key]
        result = load_dataset_spec(
            spec, data.on_bad_input, data=data, check_images=check_images, progress=progress
        )
        if cache is not None:
            cache[key] = result
        return result

    loaded = [load(spec) for spec in specs]
    report = loaded[0][1]
    for _, other in loaded[1:]:
        report = report.merge(other)
    return concatenate_datasets([ds for ds, _ in loaded]), report
