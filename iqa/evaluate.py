"""Score a dataset split with any `score_images` callable and report IQA metrics, files and MLflow entries.

`score_images(images) -> scores`: for each PIL image, the n sampled scores, None where a completion had
no parsable score (the caller, e.g. the vLLM scorer, owns sampling and parsing), as a list or as
`ImageSamples`, which may also carry each sample's distribution over its score's leading digit: then
the report adds the same metrics for the expected scores (`rewards.parsing.expected_scores`), the
policy's mean score per image read without the digit's sampling noise. Per image the mean of
the parsed scores is the prediction and their sample standard deviation the spread; scores outside
`score_range` are kept (published), clipped or dropped by `out_of_range_policy`, the reward's own rule
(one "4058" from a tiny model that lost its decimal point would otherwise decide its image's rank and
wreck PLCC's fit). An image whose n samples ALL failed gets the midpoint of `score_range` (3.0 for
[1, 5]) as its prediction, so the metrics cover the whole split; such images are counted
("images_all_failed") and marked in the CSV and the plot. Metrics are computed per dataset (MOS
scales differ between datasets) and over all rows.

Files written to `out_dir`: `<prefix>_predictions.csv`, `<prefix>_metrics.json` (with the decoding
settings), `<prefix>_scatter.png`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset
from PIL import Image
from tqdm import tqdm

from iqa.images import load_image
from iqa.metrics import evaluate_scores, within_group_srcc
from iqa.plots import Panel, scatter_plot
from rewards.parsing import OutOfRangePolicy, apply_score_range, expected_scores


@dataclass(frozen=True)
class ImageSamples:
    scores: list[float | None]  # each sample's parsed score, None where none parsed
    # Each sample's p(leading digit = 0..9), None where the scorer could not read it.
    digit_probs: Sequence[Sequence[float] | None] | None = None


ScoreImages = Callable[[list[Image.Image]], list[list[float | None] | ImageSamples]]
MIN_IMAGES = 3  # correlations over fewer images are meaningless


def _as_samples(result) -> ImageSamples:
    return result if isinstance(result, ImageSamples) else ImageSamples(list(result))


def _expected_prediction(
    samples: ImageSamples, score_range: tuple[float, float], out_of_range: OutOfRangePolicy
) -> tuple[float, int]:
    """(mean expected score, samples that had a digit distribution) of one image: a sample without one
    counts with its sampled score (range rule applied); no usable sample gives the midpoint."""
    probs = samples.digit_probs or [None] * len(samples.scores)
    values, read = [], 0
    for score, digits in zip(samples.scores, probs, strict=True):
        if score is None:
            continue
        if digits is not None:
            value = float(
                expected_scores(np.array([score]), np.array([digits]), out_of_range, score_range)[0]
            )
            read += 1
        else:
            ranged, ok = apply_score_range(np.array([float(score)]), out_of_range, score_range)
            value = float(ranged[0]) if ok[0] else math.nan
        if math.isfinite(value):
            values.append(value)
    return (float(np.mean(values)) if values else (score_range[0] + score_range[1]) / 2), read


def _summarise(
    samples: list[float | None], score_range: tuple[float, float], out_of_range: OutOfRangePolicy
) -> tuple[float, float, int, bool]:
    """(prediction, spread, parsed samples, all failed) of one image's samples, out-of-range scores
    kept, clipped or dropped as the reward treats them."""
    values = np.array([math.nan if s is None else float(s) for s in samples], dtype=np.float64)
    values, ok = apply_score_range(values, out_of_range, score_range)
    parsed = values[ok].tolist()
    if not parsed:
        return (score_range[0] + score_range[1]) / 2, math.nan, 0, True
    spread = float(np.std(parsed, ddof=1)) if len(parsed) > 1 else 0.0
    return float(np.mean(parsed)), spread, len(parsed), False


def _json_safe(value):
    """NaN/inf become null: JSON has no NaN, and readers choke on Python's extension."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def output_files(out_dir: str | Path, prefix: str) -> list[Path]:
    """The predictions CSV, metrics JSON and scatter plot that run_evaluation writes."""
    out_dir = Path(out_dir)
    return [
        out_dir / f"{prefix}_predictions.csv",
        out_dir / f"{prefix}_metrics.json",
        out_dir / f"{prefix}_scatter.png",
    ]


def run_evaluation(
    dataset: Dataset,
    score_images: ScoreImages,
    out_dir: str | Path,
    *,
    num_samples: int,
    temperature: float,
    thinking: bool,
    prefix: str = "eval",
    step: int | None = None,
    chunk_size: int = 16,
    bootstrap: int = 1000,
    seed: int = 0,
    score_range: tuple[float, float] = (1.0, 5.0),
    out_of_range_policy: OutOfRangePolicy = "keep",
    decoding: Mapping | None = None,
) -> dict:
    """Score every row of `dataset` (columns id, image, mos, dataset) and write/log the results.

    `num_samples`, `temperature`, `thinking` (and any further `decoding` settings) are recorded in the
    JSON; each image must get exactly `num_samples` entries from `score_images`. Writes `output_files`
    and returns the content of the metrics JSON (cluster.tracking.Tracker.log_evaluation logs it).
    """
    missing = [c for c in ("id", "image", "mos", "dataset") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset lacks column(s) {missing}; it has {dataset.column_names}")
    if len(dataset) < MIN_IMAGES:
        raise ValueError(f"need at least {MIN_IMAGES} images to evaluate, got {len(dataset)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, ids, all_samples = dataset["image"], dataset["id"], []
    with tqdm(total=len(paths), desc=f"{prefix}: scoring", unit="img") as bar:
        for start in range(0, len(paths), chunk_size):
            chunk = paths[start : start + chunk_size]
            scores = score_images([load_image(p) for p in chunk])
            if len(scores) != len(chunk):
                raise ValueError(f"score_images returned {len(scores)} score lists for {len(chunk)} images")
            scores = [_as_samples(result) for result in scores]
            for path, samples in zip(chunk, scores, strict=True):
                if len(samples.scores) != num_samples:
                    raise ValueError(
                        f"score_images gave {len(samples.scores)} samples for {path}, expected {num_samples}"
                    )
                if samples.digit_probs is not None and len(samples.digit_probs) != num_samples:
                    raise ValueError(
                        f"score_images gave {len(samples.digit_probs)} digit distributions for {path}, "
                        f"expected {num_samples}"
                    )
            all_samples.extend(scores)
            bar.update(len(chunk))

    summaries = [_summarise(s.scores, score_range, out_of_range_policy) for s in all_samples]
    pred = np.array([s[0] for s in summaries])
    failed = np.array([s[3] for s in summaries])
    mos = np.asarray(dataset["mos"], dtype=np.float64)
    names = list(dataset["dataset"])
    dataset_of = np.asarray(names)
    parsed_samples = sum(s[2] for s in summaries)
    out_of_range = sum(
        1
        for samples in all_samples
        for v in samples.scores
        if v is not None and math.isfinite(v) and not score_range[0] <= v <= score_range[1]
    )

    per_dataset, panels = {}, []
    for name in sorted(set(names)):
        rows = dataset_of == name
        if rows.sum() < MIN_IMAGES:
            per_dataset[name] = {"n": int(rows.sum()), "skipped": f"fewer than {MIN_IMAGES} images"}
            continue
        per_dataset[name] = evaluate_scores(pred[rows], mos[rows], bootstrap=bootstrap, seed=seed)
        panels.append(Panel(name, pred[rows], mos[rows], per_dataset[name], failed[rows]))
    overall = evaluate_scores(pred, mos, bootstrap=bootstrap, seed=seed)
    # Signal against noise: an image's mean of n samples moves by about spread_within_image / sqrt(n), so
    # the sampled SRCC sees the policy's ranking only where its expected scores differ across images
    # (spread_across_images) by a comparable amount.
    spreads = [spread for _, spread, parsed, _ in summaries if parsed > 1]
    overall["spread_within_image"] = float(np.mean(spreads)) if spreads else math.nan
    # Where images share reference photos: the ranking with each photo's content offset taken out.
    refs = list(dataset["ref"]) if "ref" in dataset.column_names else None
    if refs is not None:
        overall["srcc_within_reference"], overall["references_ranked"] = within_group_srcc(pred, mos, refs)
    with_digits = any(s.digit_probs is not None for s in all_samples)
    expected = [_expected_prediction(s, score_range, out_of_range_policy) for s in all_samples]
    pred_expected = np.array([e[0] for e in expected])
    total_samples = len(all_samples) * num_samples
    report = {
        "prefix": prefix,
        "step": step,
        "decoding": {
            "num_samples": num_samples,
            "temperature": temperature,
            "thinking": thinking,
            **(decoding or {}),
        },
        "n_images": len(pred),
        "samples_per_image": num_samples,
        "sample_parse_failures": total_samples - parsed_samples,
        "sample_parse_failure_rate": (total_samples - parsed_samples) / total_samples,
        "samples_out_of_range": out_of_range,
        "out_of_range_rule": out_of_range_policy,
        "images_all_failed": int(failed.sum()),
        "all_failed_rule": f"scored as the midpoint {(score_range[0] + score_range[1]) / 2} of {list(score_range)}",
        "overall": overall,
        "per_dataset": per_dataset,
    }
    if with_digits:
        report["expected_score"] = {
            "samples_with_digit_probs": sum(e[1] for e in expected),
            "overall": evaluate_scores(pred_expected, mos, bootstrap=bootstrap, seed=seed),
        }
        finite = pred_expected[np.isfinite(pred_expected)]
        report["expected_score"]["overall"]["spread_across_images"] = (
            float(np.std(finite)) if finite.size > 1 else math.nan
        )
        if refs is not None:
            report["expected_score"]["overall"]["srcc_within_reference"] = within_group_srcc(
                pred_expected, mos, refs
            )[0]

    csv_path, json_path, plot_path = output_files(out_dir, prefix)
    with open(csv_path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(
            ["id", "dataset", "image", "mos", "pred_mean", "pred_std", "n_parsed", "all_failed", "samples"]
            + (["pred_expected"] if with_digits else [])
        )
        for row in zip(ids, names, paths, mos, summaries, all_samples, pred_expected, strict=True):
            *columns, summary, samples, expected_value = row
            extra = [expected_value] if with_digits else []
            writer.writerow([*columns, *summary, json.dumps(_json_safe(list(samples.scores))), *extra])
    json_path.write_text(json.dumps(_json_safe(report), indent=2))
    if not panels:
        panels = [Panel("all", pred, mos, overall, failed)]
    plot_path = scatter_plot(
        panels,
        plot_path,
        title=f"{prefix}" + (f" step {step}" if step is not None else ""),
    )
    return report
