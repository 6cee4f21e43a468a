"""Where a built-in-benchmark ranking is won and lost (issue 8): the overall SRCC of an evaluation's
predictions split into the parts the benchmark's structure allows.

The built-in MOS is a function of the distortion level and family only (iqa/builtin.py), so every
reference photo spans the same MOS range. Three readings of one predictions CSV:

- overall: the evaluation's SRCC over all images;
- within reference: the mean SRCC among each photo's versions (the photo's content offset taken out);
- within (reference, family): the mean SRCC among one photo's levels of one distortion, i.e. how well
  the model orders severity where nothing else changes;

and per family that last reading and the family's mean MOS against its mean prediction (a model that
orders each family's levels but places the families on different scales loses the difference between
"within (reference, family)" and "within reference"); the sd of the photos' mean predictions is the
content offset (their mean MOS are equal).

    python -m research.ranking_breakdown RUN/eval-after/eval_after_predictions.csv [more CSVs]
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from iqa.metrics import within_group_srcc


def parse_builtin_id(image_id: str) -> tuple[str, str, int]:
    """(reference, family, level) of a built-in image id "images/<reference>_<family>_<level>.png"."""
    stem = Path(image_id).stem
    parts = stem.rsplit("_", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        raise ValueError(
            f"{image_id!r} is not a built-in benchmark id (images/<reference>_<family>_<level>.png)"
        )
    return parts[0], parts[1], int(parts[2])


def ranking_breakdown(ids: Sequence[str], mos: Sequence[float], pred: Sequence[float]) -> dict:
    """The readings described in the module docstring, from image ids, MOS and predictions."""
    mos = np.asarray(mos, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    parsed = [parse_builtin_id(image_id) for image_id in ids]
    refs = np.array([ref for ref, _, _ in parsed])
    families = np.array([family for _, family, _ in parsed])
    ref_family = np.array([f"{ref}/{family}" for ref, family, _ in parsed])
    per_family = {}
    for family in sorted(set(families)):
        rows = families == family
        per_family[family] = {
            "srcc_within_reference": within_group_srcc(pred[rows], mos[rows], ref_family[rows])[0],
            "mean_mos": float(mos[rows].mean()),
            "mean_prediction": float(pred[rows].mean()),
        }
    reference_means = [pred[refs == ref].mean() for ref in sorted(set(refs))]
    return {
        "n": len(pred),
        "srcc": float(spearmanr(pred, mos).statistic),
        "srcc_within_reference": within_group_srcc(pred, mos, refs)[0],
        "srcc_within_reference_family": within_group_srcc(pred, mos, ref_family)[0],
        "reference_offset_sd": float(np.std(reference_means)),
        "per_family": per_family,
    }


def read_predictions(path: Path, column: str) -> tuple[list[str], list[float], list[float]]:
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    if not rows or column not in rows[0]:
        raise ValueError(f"{path}: no column {column!r} (columns: {list(rows[0]) if rows else 'none'})")
    return [r["id"] for r in rows], [float(r["mos"]) for r in rows], [float(r[column]) for r in rows]


def format_breakdown(name: str, result: dict) -> str:
    lines = [
        f"{name} ({result['n']} images): SRCC {result['srcc']:+.3f} | within reference "
        f"{result['srcc_within_reference']:+.3f} | within (reference, family) "
        f"{result['srcc_within_reference_family']:+.3f} | photos' offset sd {result['reference_offset_sd']:.3f}",
        "  family     levels ranked   mean MOS   mean prediction",
    ]
    for family, row in result["per_family"].items():
        lines.append(
            f"  {family:<10} {row['srcc_within_reference']:+13.3f} {row['mean_mos']:10.2f} {row['mean_prediction']:17.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path, nargs="+", help="<prefix>_predictions.csv of an evaluation")
    parser.add_argument(
        "--column", default="pred_expected", help="pred_expected (default) or pred_mean (the sampled scores)"
    )
    args = parser.parse_args(argv)
    for path in args.predictions:
        print(format_breakdown(str(path), ranking_breakdown(*read_predictions(path, args.column))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
