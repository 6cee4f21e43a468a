"""load_image: decoding, orientation, mode conversion and the failure messages; fit_pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from iqa.images import ImageLoadError, check_image, check_size, fit_pixels, load_image


def _gradient(width: int = 24, height: int = 16) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (height, 1))] * 3, axis=-1)
    rgb[..., 1] = 128
    return Image.fromarray(rgb, mode="RGB")


def _encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP"])
def test_decodes_common_formats_to_rgb(tmp_path, fmt):
    path = tmp_path / f"img.{fmt.lower()}"
    _gradient().save(path, format=fmt)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (24, 16)
    assert abs(int(np.asarray(img)[0, -1, 0]) - 255) <= 8


def test_bytes_and_str_sources(tmp_path):
    data = _encoded(_gradient(), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    from_bytes = np.asarray(load_image(data))
    assert np.array_equal(from_bytes, np.asarray(load_image(str(tmp_path / "a.png"))))
    assert np.array_equal(from_bytes, np.asarray(_gradient()))


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a sideways phone photo
    path = tmp_path / "sideways.jpg"
    _gradient(24, 16).save(path, exif=exif.tobytes())
    assert load_image(path).size == (16, 24)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = np.asarray(load_image(_encoded(rgba, "PNG")))
    assert tuple(out[1, 1]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (255, 0, 0)
    la = Image.new("LA", (16, 16), (0, 128))
    assert tuple(np.asarray(load_image(_encoded(la, "PNG")))[0, 0]) == (127, 127, 127)


def test_palette_with_transparency_and_cmyk():
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    pal.info["transparency"] = 0
    assert tuple(np.asarray(load_image(_encoded(pal, "PNG")))[0, 0]) == (255, 255, 255)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(load_image(_encoded(cmyk, "JPEG", quality=95)))[0, 0]
    assert out[0] > 240 and out[1] < 15 and out[2] < 15


def test_high_bit_depth_is_scaled_to_8bit(tmp_path):
    sixteen = Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))
    path = tmp_path / "deep.png"
    sixteen.save(path)
    assert tuple(np.asarray(load_image(path))[0, 0]) == (255, 255, 255)
    unit_float = Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32), mode="F")
    assert tuple(np.asarray(load_image(_encoded(unit_float, "TIFF")))[0, 0]) == (128, 128, 128)
    int32 = Image.fromarray(np.full((16, 16), 100, dtype=np.int32), mode="I")
    assert tuple(np.asarray(load_image(_encoded(int32, "TIFF")))[0, 0]) == (100, 100, 100)


def test_missing_file_names_file_and_reason(tmp_path):
    with pytest.raises(ImageLoadError, match=r"nope\.png: file is missing"):
        load_image(tmp_path / "nope.png")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.jpg: zero-byte"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageLoadError, match="zero-byte"):
        load_image(b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = _encoded(noisy, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.\w+: (truncated|corrupt)") as err:
        load_image(path)
    assert isinstance(err.value, ValueError)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("name,score\na.png,3\n")
    with pytest.raises(ImageLoadError, match=r"notes\.png: not an image"):
        load_image(path)


def test_fit_pixels_bounds_and_aspect():
    big = Image.new("RGB", (400, 300))
    small = fit_pixels(big, 100, 12544)
    assert small.width * small.height <= 12544
    assert abs(small.width / small.height - 4 / 3) < 0.05
    tiny = fit_pixels(Image.new("RGB", (10, 5)), 3136, 12544)
    assert tiny.width * tiny.height >= 3136
    same = Image.new("RGB", (60, 60))
    assert fit_pixels(same, 3136, 12544) is same
    with pytest.raises(ValueError, match="min_pixels"):
        fit_pixels(same, 10, 5)


def test_check_image_catches_truncated_jpeg_at_draft_scale(tmp_path):
    rng = np.random.default_rng(1)
    data = _encoded(Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)), "JPEG")
    (tmp_path / "ok.jpg").write_bytes(data)
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * 0.95)])
    assert check_image(tmp_path / "ok.jpg") == (320, 256)
    with pytest.raises(ImageLoadError, match=r"cut\.jpg: truncated"):
        check_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageLoadError, match="file is missing"):
        check_image(tmp_path / "gone.jpg")


def test_a_decoded_image_goes_through_the_same_conversion():
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, as from a file
    rgb = _gradient()
    converted = load_image(rgb)
    assert converted is not rgb and np.array_equal(np.asarray(converted), np.asarray(rgb))
    with pytest.raises(TypeError, match="PIL image, encoded bytes or a path"):
        load_image(3)


def test_size_limits_are_the_qwen_processors():
    """check_size refuses exactly the aspect ratios that smart_resize (transformers and vLLM) raises on."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for width, height in ((4000, 20), (20, 4000), (14, 14), (13_000, 13_000)):
        check_size(width, height)
        smart_resize(height, width)
    for width, height in ((4020, 20), (20, 4020)):
        with pytest.raises(ImageLoadError, match="aspect ratio 201:1"):
            check_size(width, height)
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(height, width)
    with pytest.raises(ImageLoadError, match="too small: 13x100 px"):
        check_size(13, 100)
    with pytest.raises(ImageLoadError, match=r"too large: 20000x15000 px \(300 Mpx\)"):
        check_size(20000, 15000)
