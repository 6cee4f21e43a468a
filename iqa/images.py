"""Decode any image a user's dataset may hold into a plain 8-bit RGB `PIL.Image`, or fail clearly.

What `load_image` guarantees:
- the whole file is decoded now (a truncated file fails here, not later inside a training step);
- the EXIF orientation is applied (phone photos are stored sideways with an orientation tag);
- the result is 8-bit RGB: alpha (LA/RGBA/PA/P with transparency) is composited on white, CMYK and
  palette images are converted, and high-bit-depth grey modes are scaled down to 8 bits:
    I;16*  : value / 257 (the 16-bit range);
    I and F: the range is inferred from the image's maximum: <= 1 is a unit float image (x 255),
             <= 255 is already 8-bit, anything larger is 16-bit (/ 257), then clipped to [0, 255];
- multi-frame files (GIF, TIFF) give their first frame.
What it refuses, for a file or encoded bytes (an `ImageLoadError`, kind in brackets):
- a file that cannot be read: [missing], [broken link] (a symlink loop or a dangling link), [not a file],
  [unreadable] (permissions), [zero-byte];
- data that is no image Pillow can decode: [not an image] (text, HTML, ...), [unsupported format] (HEIC,
  or AVIF where Pillow lacks it), [truncated], [corrupt];
- sizes the model cannot use (`check_size`): [too small] (a side under one 14 px vision patch),
  [aspect ratio] (over 200:1, which Qwen2.5-VL's resize refuses), [too large] (over MAX_DECODE_PIXELS,
  Pillow's decompression-bomb limit: a 20000x15000 photo is refused; anything below it is decoded whole
  and downscaled to model.max_pixels by the processor).
Every path that turns an image into pixels (rollout, learner, scoring, evaluation, data check, the
base-model pipeline) decodes with it. Every failure is an `ImageLoadError` whose message names the file and the reason.
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# What every path that turns an image into pixels accepts: a decoded image, encoded bytes or a file.
ImageInput = Image.Image | bytes | str | Path
BYTES_NAME = "<bytes>"
# Errors Pillow's decoders raise on damaged data (truncated streams, broken chunks, bad headers).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)
# Qwen2.5-VL sees an image as 14x14 px patches: a side below one patch holds no detail the model can judge
# (the processor would blow it up into blur).
MIN_SIDE = 14
# Qwen2.5-VL's smart_resize raises on a longer/shorter side ratio above this, mid-step; refuse it up front.
MAX_ASPECT_RATIO = 200
# Pillow's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS; vLLM's VLLM_MAX_IMAGE_PIXELS too), kept
# here so that a library lifting Pillow's global cannot lift it.
MAX_DECODE_PIXELS = 178_956_970
# ISO media "ftyp" brands of formats Pillow may lack a decoder for, and what to call them.
FTYP_FORMATS = {
    **dict.fromkeys((b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"), "HEIC/HEIF"),
    **dict.fromkeys((b"avif", b"avis"), "AVIF"),
}


class ImageLoadError(ValueError):
    """An image that cannot be used; `source` names the file, `kind` is the short category
    ("missing", "zero-byte", "truncated", ...) and `reason` the full explanation."""

    def __init__(self, source: str, kind: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.kind = kind
        self.reason = reason


def _damage_kind(exc: Exception) -> str:
    # Pillow says "truncated" both for a cut header ("Truncated File Read") and cut pixel data.
    return "truncated" if "truncat" in str(exc).lower() else "corrupt"


def _missing(path: Path, exc: OSError) -> ImageLoadError:
    """Why `path` could not even be looked at (its stat failed)."""
    name = str(path)
    if exc.errno == errno.ELOOP:
        return ImageLoadError(name, "broken link", "symbolic link loop (the link leads back to itself)")
    if path.is_symlink():
        return ImageLoadError(name, "broken link", f"symbolic link to a missing file ({os.readlink(path)})")
    if exc.errno == errno.ENOENT:
        return ImageLoadError(name, "missing", "file is missing")
    return ImageLoadError(name, "unreadable", f"cannot read the file ({exc.strerror or exc})")


def _read(path: Path) -> bytes:
    name = str(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise _missing(path, exc) from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageLoadError(name, "not a file", "not a regular file")
    if info.st_size == 0:
        raise ImageLoadError(name, "zero-byte", "zero-byte file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageLoadError(name, "unreadable", f"cannot read the file ({exc.strerror or exc})") from None


def _unidentified(data: bytes, name: str) -> ImageLoadError:
    """What a file Pillow does not recognise is, as far as its first bytes tell."""
    brand = FTYP_FORMATS.get(data[8:12]) if data[4:8] == b"ftyp" else None
    if brand:
        return ImageLoadError(
            name,
            "unsupported format",
            f"{brand} image, which this installation cannot decode (no Pillow plugin for it); "
            "convert it to JPEG or PNG",
        )
    head = data[:512].lstrip().lower()
    if head.startswith(b"<!doctype html") or b"<html" in head:
        what = "an HTML page, perhaps a failed download saved under an image name"
    elif head.startswith((b"<svg", b"<?xml")):
        what = "SVG/XML text, a vector drawing rather than pixels"
    elif _is_text(data[:512]):
        what = "text"
    else:
        what = "no known image format"
    return ImageLoadError(name, "not an image", f"not an image: {what}")


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c.isspace() for c in text)


def check_size(width: int, height: int, name: str = BYTES_NAME) -> None:
    """Raise `ImageLoadError` for a size Qwen2.5-VL cannot use: see MIN_SIDE, MAX_ASPECT_RATIO and
    MAX_DECODE_PIXELS."""
    size = f"{width}x{height} px"
    if width * height > MAX_DECODE_PIXELS:
        megapixels, limit = width * height / 1e6, MAX_DECODE_PIXELS / 1e6
        raise ImageLoadError(
            name,
            "too large",
            f"too large: {size} ({megapixels:.0f} Mpx) is over the {limit:.0f} Mpx decompression-bomb limit; "
            "downscale it first",
        )
    if min(width, height) < MIN_SIDE:
        raise ImageLoadError(
            name,
            "too small",
            f"too small: {size}; Qwen2.5-VL needs at least {MIN_SIDE} px (one vision patch) on each side",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageLoadError(
            name,
            "aspect ratio",
            f"aspect ratio {ratio:.0f}:1 ({size}) is over {MAX_ASPECT_RATIO}:1, which Qwen2.5-VL's image "
            "resize refuses; crop it",
        )


def _open(source: str | Path | bytes) -> tuple[Image.Image, str]:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if not data:
            raise ImageLoadError(BYTES_NAME, "zero-byte", "zero-byte image data")
        name = BYTES_NAME
    elif isinstance(source, str | Path):
        name = str(source)
        data = _read(Path(source))
    else:
        raise TypeError(f"an image must be a PIL image, encoded bytes or a path, got {type(source).__name__}")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise _unidentified(data, name) from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(name, "too large", f"too large to decode safely ({exc})") from None
    except DECODE_ERRORS as exc:
        kind = _damage_kind(exc)
        raise ImageLoadError(name, kind, f"{kind} image header ({exc})") from None
    try:
        check_size(*img.size, name)
    except ImageLoadError:
        img.close()
        raise
    return img, name


def _decode(img: Image.Image, name: str) -> None:
    try:
        img.load()
    except DECODE_ERRORS as exc:
        kind = _damage_kind(exc)
        raise ImageLoadError(name, kind, f"{kind} image data ({exc})") from None


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        scale = 1 / 257
    else:
        peak = float(np.nanmax(values)) if values.size else 0.0
        scale = 255.0 if peak <= 1.0 else 1.0 if peak <= 255.0 else 1 / 257
    grey = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, by the rules in the module docstring; always a new image."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_8bit(img)
    has_alpha = mode in ("LA", "La", "RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        return _on_white(img)
    return img.convert("RGB")


def load_image(source: ImageInput) -> Image.Image:
    """Decode a file path or encoded bytes into an upright 8-bit RGB image (see module docstring); an
    image already decoded (a PIL image) is converted to 8-bit RGB by the same rules."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    img, name = _open(source)
    with img:
        _decode(img, name)
        try:
            upright = ImageOps.exif_transpose(img)
        except DECODE_ERRORS as exc:
            raise ImageLoadError(name, "corrupt", f"corrupt EXIF orientation data ({exc})") from None
        return to_rgb(upright)


def check_image(source: str | Path | bytes) -> tuple[int, int]:
    """Raise `ImageLoadError` unless the image decodes completely; returns its (width, height).

    Cheaper than `load_image` for validating a dataset: a JPEG is decoded at 1/8 scale (DCT
    scaling still reads the whole entropy-coded stream, so a truncated file is still caught).
    """
    img, name = _open(source)
    with img:
        size = img.size
        if img.format == "JPEG":
            img.draft(img.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
        _decode(img, name)
    return size


def fit_pixels(img: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Resize keeping the aspect ratio so that width*height lies in [min_pixels, max_pixels].

    The Qwen processor does the exact resize (smart_resize); this only pre-shrinks big photos
    (or enlarges tiny ones) so that the processor and the transfer of pixels stay cheap.
    """
    if min_pixels <= 0 or max_pixels < min_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    width, height = img.size
    area = width * height
    if min_pixels <= area <= max_pixels:
        return img
    scale = math.sqrt((max_pixels if area > max_pixels else min_pixels) / area)
    # floor when shrinking keeps the area <= max; ceil when growing keeps it >= min.
    rounding = math.floor if area > max_pixels else math.ceil
    size = (max(1, rounding(width * scale)), max(1, rounding(height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


# A random view keeps at least this share of the photo's shorter side.
MIN_CROP = 0.4


def random_view(photo: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """A random square crop (MIN_CROP..1 of the shorter side), randomly flipped, resized to size x size."""
    side = int(min(photo.size) * rng.uniform(MIN_CROP, 1.0))
    left = int(rng.integers(0, photo.width - side + 1))
    top = int(rng.integers(0, photo.height - side + 1))
    view = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    return view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view
