"""Every loader on small files in its real format, MOS direction and rescaling, the registry, JSONL round trip."""

from __future__ import annotations

import json

from configs.runtime_env import apply_default_env

apply_default_env()

import numpy as np  # noqa: E402
import openpyxl  # noqa: E402
import pytest  # noqa: E402
import scipy.io  # noqa: E402
from datasets import Dataset  # noqa: E402
from PIL import Image  # noqa: E402

from configs.schema import DataConfig, DatasetSpec  # noqa: E402
from iqa.formats import (  # noqa: E402
    FORMATS,
    LabelRow,
    LabelTable,
    load_dataset_spec,
    load_datasets,
    locate_image_dir,
    locate_label_file,
    register_format,
    write_jsonl,
)
from vlm.prompts import prompt_question  # noqa: E402

COLUMNS = ["id", "image", "mos_raw", "mos", "dataset", "ref"]


def write_image(path, shade: int = 128, fmt: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 14), (shade, 255 - shade, 60)).save(path, format=fmt)
    return path


def write_csv(path, header: list[str], rows: list[list]):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def write_xlsx(path, rows: list[list], sheets_before: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    workbook = openpyxl.Workbook()
    for index in range(sheets_before):  # e.g. a notes sheet first, as some releases have
        workbook.active.append([f"notes {index}"])
        workbook.create_sheet()
        workbook.active = len(workbook.worksheets) - 1
    for row in rows:
        workbook.active.append(row)
    workbook.save(path)


def load(fmt: str, path, **spec_fields) -> Dataset:
    ds, report = load_dataset_spec(DatasetSpec(format=fmt, path=str(path), **spec_fields), progress=False)
    assert not report.bad
    assert ds.column_names == COLUMNS
    return ds


def test_kadid10k_dmos_is_higher_is_better(tmp_path):
    root = tmp_path / "kadid10k"
    names = ["I01_01_01.png", "I01_01_05.png", "I02_03_02.png"]
    for name in names:
        write_image(root / "images" / name)
    write_csv(
        root / "dmos.csv",
        ["dist_img", "ref_img", "dmos", "var"],
        [[names[0], "I01.png", 4.5, 0.1], [names[1], "I01.png", 1.5, 0.2], [names[2], "I02.png", 3.0, 0.3]],
    )
    ds = load("kadid10k", root)
    assert ds["id"] == names
    assert ds["mos_raw"] == [4.5, 1.5, 3.0]
    assert list(ds["mos"]) == pytest.approx([5.0, 1.0, 3.0])
    assert ds["ref"] == ["I01.png", "I01.png", "I02.png"]
    assert ds["dataset"] == ["kadid10k"] * 3
    assert ds["image"][0] == str((root / "images" / names[0]).absolute())
    # The label file itself is also accepted as the path.
    assert load("kadid10k", root / "dmos.csv")["mos"] == ds["mos"]


def test_koniq10k(tmp_path):
    root = tmp_path / "koniq"
    for name in ("10004473376.jpg", "10007357496.jpg", "10008004183.jpg"):
        write_image(root / "1024x768" / name, fmt="JPEG")
    header = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]
    write_csv(
        root / "koniq10k_scores_and_distributions.csv",
        header,
        [
            ["10004473376.jpg", 0, 1, 2, 3, 4, 10, 3.83, 0.6, 77.3],
            ["10007357496.jpg", 0, 1, 2, 3, 4, 10, 3.35, 0.5, 67.9],
            ["10008004183.jpg", 0, 1, 2, 3, 4, 10, 1.23, 0.5, 20.1],
        ],
    )
    ds = load("koniq10k", root, name="koniq")
    assert ds["mos"][0] == 5.0 and ds["mos"][2] == 1.0
    assert np.isclose(ds["mos"][1], 1 + 4 * (3.35 - 1.23) / (3.83 - 1.23))
    assert ds["ref"] == ds["id"]  # no references: each image is its own
    assert set(ds["dataset"]) == {"koniq"}
    assert all("/1024x768/" in p for p in ds["image"])


def test_spaq_spreadsheet(tmp_path):
    root = tmp_path / "spaq"
    for name in ("00001.jpg", "00002.jpg", "00003.jpg"):
        write_image(root / "TestImage" / name, fmt="JPEG")
    header = ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"]
    write_xlsx(
        root / "Annotations" / "MOS and Image attribute scores.xlsx",
        [
            header,
            ["00001.jpg", 42.5, 1, 2, 3, 4, 5],
            ["00002.jpg", 85.0, 1, 2, 3, 4, 5],
            ["00003.jpg", 0.0, 1, 2, 3, 4, 5],
        ],
    )
    ds = load("spaq", root)
    assert ds["mos_raw"] == [42.5, 85.0, 0.0]
    assert list(ds["mos"]) == pytest.approx([3.0, 5.0, 1.0])


def test_live_challenge_mat_files_skip_practice_images(tmp_path):
    root = tmp_path / "ChallengeDB_release"
    names = [f"t{i}.bmp" for i in range(1, 8)] + ["10.bmp", "100.bmp", "1000.JPG"]
    for name in names[7:]:
        write_image(root / "Images" / name, fmt="BMP" if name.endswith("bmp") else "JPEG")
    cells = np.empty((len(names), 1), dtype=object)
    for i, name in enumerate(names):
        cells[i, 0] = name
    (root / "Data").mkdir()
    scipy.io.savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cells})
    mos = np.array([[50.0] * 7 + [20.0, 80.0, 65.0]])
    scipy.io.savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": mos})
    ds = load("livec", root)
    assert ds["id"] == ["10.bmp", "100.bmp", "1000.JPG"]
    assert list(ds["mos"]) == pytest.approx([1.0, 5.0, 4.0])


def test_agiqa3k(tmp_path):
    root = tmp_path / "agiqa"
    names = ["AttnGAN_normal_000.jpg", "sd1.5_normal_001.jpg", "midjourney_lowstep_002.jpg"]
    for name in names:
        write_image(root / "AGIQA-3K" / name, fmt="JPEG")
    header = [
        "name",
        "prompt",
        "adj1",
        "adj2",
        "style",
        "mos_quality",
        "std_quality",
        "mos_align",
        "std_align",
    ]
    write_csv(
        root / "data.csv",
        header,
        [[n, "a cat", "", "", "", q, 0.5, 3.0, 0.4] for n, q in zip(names, [0.5, 4.5, 2.5], strict=True)],
    )
    assert list(load("agiqa3k", root)["mos"]) == pytest.approx([1.0, 5.0, 3.0])


def test_csiq_dmos_is_lower_is_better(tmp_path):
    root = tmp_path / "CSIQ"
    write_image(root / "dst_imgs" / "awgn" / "1600.AWGN.1.png")
    write_image(root / "dst_imgs" / "blur" / "1600.blur.5.png")  # a copy with a lower-case tag
    write_image(root / "dst_imgs" / "jpeg2000" / "cactus.jpeg2000.3.png")
    write_xlsx(
        root / "csiq.DMOS.xlsx",
        [
            ["CSIQ DMOS (title row above the header, as in the release)"],
            ["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"],
            [1600, 1, "noise", 1, 0.02, 0.05],
            [1600, 5, "blur", 5, 0.05, 0.85],
            ["cactus", 3, "jpeg 2000", 3, 0.04, 0.45],
        ],
        sheets_before=1,
    )
    ds = load("csiq", root)
    assert ds["id"] == ["awgn/1600.AWGN.1.png", "blur/1600.blur.5.png", "jpeg2000/cactus.jpeg2000.3.png"]
    assert list(ds["mos"]) == pytest.approx([5.0, 1.0, 3.0])  # lowest DMOS = best quality
    assert ds["ref"] == ["1600", "1600", "cactus"]


def test_text_list_with_optional_ref_and_direction_override(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / "imgs" / name)
    (tmp_path / "scores.txt").write_text("# name score [ref]\na.png 30\n\nb.png 50 refB\nc.png 70\n")
    ds = load("text", tmp_path / "scores.txt", image_dir="imgs")
    assert list(ds["mos"]) == pytest.approx([1.0, 3.0, 5.0])
    assert ds["ref"] == ["a.png", "refB", "c.png"]
    reversed_ds = load("text", tmp_path / "scores.txt", image_dir="imgs", higher_is_better=False)
    assert list(reversed_ds["mos"]) == pytest.approx([5.0, 3.0, 1.0])


def test_equal_labels_map_to_the_midpoint(tmp_path):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    (tmp_path / "scores.txt").write_text("a.png 2\nb.png 2\n")
    assert list(load("text", tmp_path / "scores.txt")["mos"]) == [3.0, 3.0]


def test_jsonl_round_trip_keeps_mixed_dataset_names(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        write_image(tmp_path / "imgs" / name)
    (tmp_path / "one.txt").write_text("imgs/a.png 1\nimgs/b.png 2\n")
    (tmp_path / "two.txt").write_text("imgs/c.png 10 r1\nimgs/d.png 20 r1\n")
    specs = [
        DatasetSpec(format="text", path=str(tmp_path / "one.txt"), name="one"),
        DatasetSpec(format="text", path=str(tmp_path / "two.txt"), name="two"),
    ]
    mixed, report = load_datasets(specs, DataConfig(), progress=False)
    assert mixed["dataset"] == ["one", "one", "two", "two"] and report.kept == 4
    with pytest.raises(ValueError, match="4 images lie outside"):  # the loader would refuse "../imgs/a.png"
        write_jsonl(mixed, tmp_path / "export" / "train.jsonl", prompt_question(thinking=True))
    out = write_jsonl(mixed, tmp_path / "train.jsonl", prompt_question(thinking=True))
    first = json.loads(out.read_text().splitlines()[0])
    assert first["image"] == ["imgs/a.png"] and first["dataset_name"] == "one"
    assert [turn["from"] for turn in first["conversations"]] == ["human", "gpt"]
    assert "image quality assessment" in first["conversations"][0]["value"]
    back = load("jsonl", out)
    assert back["dataset"] == mixed["dataset"]
    assert back["mos"] == mixed["mos"] and back["mos_raw"] == mixed["mos"]  # already [1, 5]: not rescaled
    assert back["image"] == mixed["image"] and back["ref"] == mixed["ref"]


def test_published_jsonl_without_ref(tmp_path):
    write_image(tmp_path / "kadid" / "I01_01_01.png")
    write_image(tmp_path / "kadid" / "I01_01_02.png")
    lines = [
        {
            "id": f"I01_01_0{i}",
            "dataset_name": "KADID-10K",
            "image": [f"kadid/I01_01_0{i}.png"],
            "conversations": [{"from": "human", "value": "prompt"}, {"from": "gpt", "value": mos}],
        }
        for i, mos in ((1, 4.2), (2, "2.5"))
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    ds = load("jsonl", tmp_path / "train.jsonl")
    assert ds["id"] == ["I01_01_01", "I01_01_02"] and list(ds["mos"]) == pytest.approx([4.2, 2.5])
    assert ds["dataset"] == ["KADID-10K"] * 2 and ds["ref"] == ds["id"]


def test_two_specs_with_one_name_are_rejected(tmp_path):
    spec = DatasetSpec(format="text", path=str(tmp_path / "x.txt"))
    with pytest.raises(ValueError, match="listed twice"):
        load_datasets([spec, spec], DataConfig())


def test_unknown_format_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset format 'kadid'.*kadid10k"):
        load_dataset_spec(DatasetSpec(format="kadid", path="."))


@pytest.fixture
def pipe_format():
    yield "pipe"
    FORMATS.pop("pipe", None)


def test_a_new_format_is_one_decorated_function(tmp_path, pipe_format):
    @register_format(pipe_format, higher_is_better=False)
    def read_pipe(spec: DatasetSpec, data: DataConfig) -> LabelTable:
        label_file = locate_label_file(spec, "labels.psv")
        rows = [line.split("|") for line in label_file.read_text().splitlines()]
        return LabelTable(
            label_file,
            locate_image_dir(spec),
            [LabelRow(i, name, score) for i, (name, score) in enumerate(rows, 1)],
        )

    write_image(tmp_path / "x.png")
    write_image(tmp_path / "y.png")
    (tmp_path / "labels.psv").write_text("x.png|0.2\ny.png|0.8\n")
    ds = load(pipe_format, tmp_path)
    assert list(ds["mos"]) == pytest.approx([5.0, 1.0]) and ds["dataset"] == ["pipe", "pipe"]
    with pytest.raises(ValueError, match="registered twice"):
        register_format(pipe_format)(read_pipe)
