"""The built-in benchmark: real photographs shipped inside scikit-image's wheel, synthetically degraded.

No download: only the files inside the installed `skimage/data/` folder are read (never the
`skimage.data` functions, some of which fetch files with pooch). Each reference photo is centre-cropped
to a square and resized to `size` x `size`, then degraded by every distortion family at `levels`
strengths, mildest (level 1) to strongest (level L). The label is a documented formula of the level:

    MOS = clip(1 + 4 * (L + 0.5 - level) / L + offset[family], 1, 5)

which for L = 5 is 5.4 - 0.8 * level (4.6, 3.8, 3.0, 2.2, 1.4) plus a small per-family offset (|offset|
<= 0.2, less than half a level step, so within a family MOS always falls with the level). Everything is
deterministic from `seed` (noise is drawn from a generator seeded by (seed, reference, family, level)).

The images are generated once into a cache folder with a `manifest.json` (formula, parameters, files and
their SHA-256); they are regenerated when the manifest is missing, was made with other parameters, or a
file is missing or altered.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from tqdm import tqdm

from iqa.folders import build_folder
from iqa.images import load_image

MANIFEST = "manifest.json"
# Bump when the generation code changes what it writes, so old caches count as stale.
GENERATOR_VERSION = 1
MOS_FORMULA = "MOS = clip(1 + 4 * (L + 0.5 - level) / L + offset[family], 1, 5), level 1 (mildest) .. L"

# Real photographs (and micrographs) in scikit-image's wheel. Left out: synthetic or near-duplicate
# images (color, phantom, logo, chessboards, horse silhouette, motorcycle_right), an already
# motion-blurred one (clock_motion) and very small or nearly flat ones (microaneurysms, cell).
REFERENCE_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)


def _gaussian_blur(img: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def _gaussian_noise(img: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(img, dtype=np.float64)
    noisy = pixels + rng.normal(0.0, sigma, size=pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), mode="RGB")


def _jpeg(img: Image.Image, quality: float, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=round(quality))
    return load_image(buf.getvalue())


def _contrast(img: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(factor)


def _pixelate(img: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    small = (max(1, round(img.width / factor)), max(1, round(img.height / factor)))
    return img.resize(small, Image.Resampling.BOX).resize(img.size, Image.Resampling.NEAREST)


@dataclass(frozen=True)
class Distortion:
    apply: Callable[[Image.Image, float, np.random.Generator], Image.Image]
    mildest: float  # strength parameter at level 1
    strongest: float  # strength parameter at level L; levels in between are spaced geometrically
    mos_offset: float

    def strengths(self, levels: int) -> list[float]:
        return [float(s) for s in np.geomspace(self.mildest, self.strongest, levels)]


# Parameters: blur sigma (px), noise sigma (of 255), JPEG quality, contrast factor, pixelation factor.
DISTORTIONS: dict[str, Distortion] = {
    "blur": Distortion(_gaussian_blur, 0.6, 4.0, +0.1),
    "noise": Distortion(_gaussian_noise, 6.0, 60.0, -0.1),
    "jpeg": Distortion(_jpeg, 40.0, 2.0, 0.0),
    "contrast": Distortion(_contrast, 0.8, 0.15, +0.2),
    "pixelate": Distortion(_pixelate, 1.5, 6.0, -0.2),
}
DEFAULT_FAMILIES = tuple(DISTORTIONS)
DEFAULT_LEVELS = 5


def builtin_mos(level: int, levels: int, family: str) -> float:
    """The label of an image at `level` (1 = mildest) of `levels`; see MOS_FORMULA."""
    mos = 1 + 4 * (levels + 0.5 - level) / levels + DISTORTIONS[family].mos_offset
    return round(float(np.clip(mos, 1.0, 5.0)), 6)


def skimage_data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise RuntimeError("scikit-image is not installed; the built-in benchmark needs its photographs")
    return Path(spec.origin).parent / "data"


def reference_photo(path: Path, size: int, view: int = 0, seed: int = 0) -> Image.Image:
    """Size x size, 8-bit RGB. View 0 is the photo's centre square; view k > 0 a seeded random square of
    50-90% of the short side (never under `size` px where the photo allows, so no view is upscaled
    blurry), mirrored half of the time: more content per photo for training, same photo for the split."""
    img = load_image(path)
    short = min(img.size)
    if view == 0:
        side, left, top, mirror = short, (img.width - short) // 2, (img.height - short) // 2, False
    else:
        rng = np.random.default_rng([seed, view, *path.name.encode()])
        side = max(min(size, short), round(short * rng.uniform(0.5, 0.9)))
        left, top = int(rng.integers(0, img.width - side + 1)), int(rng.integers(0, img.height - side + 1))
        mirror = bool(rng.integers(0, 2))
    square = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    return square.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else square


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _parameters(size: int, seed: int, families: Sequence[str], levels: int, views: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "size": size,
        "seed": seed,
        "levels": levels,
        "views": views,
        "families": {
            name: {
                "strengths": DISTORTIONS[name].strengths(levels),
                "mos_offset": DISTORTIONS[name].mos_offset,
            }
            for name in families
        },
        "references": list(REFERENCE_PHOTOS),
    }


def _is_fresh(folder: Path, parameters: dict) -> bool:
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return False
    if manifest.get("parameters") != parameters:
        return False
    return all(
        (folder / entry["file"]).is_file() and file_sha256(folder / entry["file"]) == entry["sha256"]
        for entry in manifest["files"]
    )


def build_cached_dataset(
    cache_dir: str | Path,
    name: str,
    formula: str,
    parameters: dict,
    write_files: Callable[[Path], list[dict]],
) -> Path:
    """The folder `<name>-<size>px-seed<seed>-<hash of parameters>` under `cache_dir`, with its
    `manifest.json` ({"formula": how labels are made, "parameters", "files"}); when the cached one is
    missing or stale, `write_files(folder)` fills a new one and returns the manifest's file entries
    (each with "file" and "sha256")."""
    key = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(cache_dir) / f"{name}-{parameters['size']}px-seed{parameters['seed']}-{key}"

    def write(staging: Path) -> None:
        files = write_files(staging)
        (staging / MANIFEST).write_text(
            json.dumps({"formula": formula, "parameters": parameters, "files": files}, indent=1)
        )

    return build_folder(folder, write, lambda path: _is_fresh(path, parameters))


def _write_benchmark(folder: Path, parameters: dict) -> list[dict]:
    size, seed, levels, views = (parameters[key] for key in ("size", "seed", "levels", "views"))
    families = list(parameters["families"])
    source_dir = skimage_data_dir()
    missing = [name for name in REFERENCE_PHOTOS if not (source_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"scikit-image's data folder {source_dir} lacks {missing}; reinstall scikit-image")
    (folder / "references").mkdir()
    (folder / "images").mkdir()
    files = []
    photo_views = [
        (ref_index, photo, view) for ref_index, photo in enumerate(REFERENCE_PHOTOS) for view in range(views)
    ]
    for ref_index, photo, view in tqdm(photo_views, desc="builtin benchmark", unit="view"):
        ref = Path(photo).stem
        # View 0 keeps the names (and noise draws) that the benchmark had before it had views.
        name = ref if view == 0 else f"{ref}-view{view}"
        reference = reference_photo(source_dir / photo, size, view, seed)
        reference.save(folder / "references" / f"{name}.png")
        for family_index, family in enumerate(families):
            distortion = DISTORTIONS[family]
            for level, strength in enumerate(distortion.strengths(levels), start=1):
                rng = np.random.default_rng([seed, ref_index, family_index, level] + ([view] if view else []))
                relpath = f"images/{name}_{family}_{level}.png"
                distortion.apply(reference, strength, rng).save(folder / relpath)
                files.append(
                    {
                        "file": relpath,
                        "ref": ref,
                        "view": view,
                        "family": family,
                        "level": level,
                        "strength": strength,
                        "mos": builtin_mos(level, levels, family),
                        "sha256": file_sha256(folder / relpath),
                    }
                )
    return files


def build_builtin_benchmark(
    cache_dir: str | Path,
    size: int = 112,
    seed: int = 0,
    families: Sequence[str] = DEFAULT_FAMILIES,
    levels: int = DEFAULT_LEVELS,
    views: int = 1,
) -> Path:
    """The benchmark's folder (with `manifest.json`), generated now if missing or stale. Each reference
    photo gives `views` crops (see reference_photo), all with the photo's name as their `ref`."""
    unknown = [name for name in families if name not in DISTORTIONS]
    if unknown or not families:
        raise ValueError(f"unknown distortion families {unknown}; known: {', '.join(DISTORTIONS)}")
    if len(set(families)) != len(families):
        raise ValueError(f"distortion families listed twice: {list(families)}")
    if levels < 2:
        raise ValueError(f"the built-in benchmark needs at least 2 levels per family, got {levels}")
    if views < 1:
        raise ValueError(f"the built-in benchmark needs at least 1 view per photo, got {views}")
    parameters = _parameters(size, seed, families, levels, views)
    return build_cached_dataset(
        cache_dir, "builtin", MOS_FORMULA, parameters, lambda folder: _write_benchmark(folder, parameters)
    )


def read_manifest(folder: Path) -> list[dict]:
    """The manifest's file entries (file, ref, view, family, level, strength, mos, sha256)."""
    return json.loads((folder / MANIFEST).read_text())["files"]
