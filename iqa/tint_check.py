"""The tint check: a ranking task any model that sees colour can learn, to test the RL loop itself.

Random views of the built-in reference photos, turned grey and tinted red, gray or blue, labelled
"MOS" 4.5, 3.0 and 1.5. The project's base model names the dominant colour of a view (one of its vision
stage's targets), so a GRPO run that does not learn to rank these has a fault in the loop, not in what
the model can see. Deterministic from `seed`; generated once into a cache folder with a manifest (file,
ref = the source photo, tint, mos, sha256), in the built-in benchmark's layout (format `tint`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from iqa.builtin import REFERENCE_PHOTOS, build_cached_dataset, file_sha256, skimage_data_dir
from iqa.images import load_image, random_view

GENERATOR_VERSION = 1
# tint -> (RGB gain applied to the view's luminance, label)
TINTS = {"red": ((1.0, 0.35, 0.35), 4.5), "gray": ((0.8, 0.8, 0.8), 3.0), "blue": ((0.35, 0.35, 1.0), 1.5)}
LABEL_RULE = "MOS = " + ", ".join(f"{mos} {name}" for name, (_, mos) in TINTS.items())
LUMA = np.array([0.299, 0.587, 0.114])


def tinted(view: Image.Image, gain: tuple[float, float, float]) -> Image.Image:
    """The view's luminance times `gain` per channel (slightly brightened), 8-bit RGB."""
    luminance = np.asarray(view, dtype=np.float64) @ LUMA
    pixels = luminance[..., None] * np.asarray(gain) * 1.1 + 20
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def build_tint_check(
    cache_dir: str | Path, size: int = 112, seed: int = 0, views_per_photo: int = 15
) -> Path:
    """The tint check's folder (with `manifest.json`), generated now if missing or stale."""
    parameters = {
        "generator_version": GENERATOR_VERSION,
        "size": size,
        "seed": seed,
        "views_per_photo": views_per_photo,
        "tints": {name: list(gain) + [mos] for name, (gain, mos) in TINTS.items()},
        "references": list(REFERENCE_PHOTOS),
    }

    def write_views(folder: Path) -> list[dict]:
        (folder / "images").mkdir()
        files = []
        tint_names = list(TINTS)
        for photo_index, photo_name in enumerate(REFERENCE_PHOTOS):
            photo = load_image(skimage_data_dir() / photo_name)
            ref = Path(photo_name).stem
            for view_index in range(views_per_photo):
                rng = np.random.default_rng([seed, photo_index, view_index])
                tint = tint_names[view_index % len(tint_names)]
                gain, mos = TINTS[tint]
                relpath = f"images/{ref}_{view_index:02d}_{tint}.png"
                tinted(random_view(photo, rng, size), gain).save(folder / relpath)
                files.append(
                    {
                        "file": relpath,
                        "ref": ref,
                        "tint": tint,
                        "mos": mos,
                        "sha256": file_sha256(folder / relpath),
                    }
                )
        return files

    return build_cached_dataset(cache_dir, "tint", LABEL_RULE, parameters, write_views)
