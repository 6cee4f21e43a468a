"""run_evaluation with a deterministic sharpness scorer on the built-in benchmark: CSV, JSON, PNG, MLflow."""

from __future__ import annotations

import csv
import json

from configs.runtime_env import apply_default_env

apply_default_env()

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from configs.schema import DataConfig, DatasetSpec  # noqa: E402
from iqa.evaluate import ImageSamples, output_files, run_evaluation  # noqa: E402
from iqa.formats import load_dataset_spec  # noqa: E402
from iqa.metrics import evaluate_scores  # noqa: E402

SAMPLES = 3
FAIL_EVERY = 10  # every 10th image scored gets no parsable sample at all


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data = DataConfig(
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        builtin_size=32,
        builtin_levels=3,
        builtin_families=["blur", "contrast"],
    )
    ds, _ = load_dataset_spec(DatasetSpec(format="builtin"), data=data, progress=False)
    return ds


def sharpness_scorer():
    """Score = a log of the Laplacian's energy (blur and low contrast lower it); the second of the three
    samples never parses, and every FAIL_EVERY-th image gets no parsable sample."""
    seen = [0]

    def score_images(images: list[Image.Image]) -> list[list[float | None]]:
        out = []
        for img in images:
            seen[0] += 1
            grey = np.asarray(img.convert("L"), dtype=np.float64)
            laplacian = (
                4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
            )
            score = float(np.clip(np.log1p(laplacian.var()) / 2, 1, 5))
            out.append([None] * SAMPLES if seen[0] % FAIL_EVERY == 0 else [score - 0.1, None, score + 0.1])
        return out

    return score_images


def evaluate_quickly(dataset, score_images, out_dir, num_samples, **options):
    """run_evaluation at temperature 1 with thinking and no bootstrap, unless options say otherwise."""
    return run_evaluation(
        dataset,
        score_images,
        out_dir,
        num_samples=num_samples,
        **{"temperature": 1.0, "thinking": True, "bootstrap": 0, **options},
    )


def test_run_evaluation_writes_csv_json_png(tmp_path, dataset):
    report = run_evaluation(
        dataset,
        sharpness_scorer(),
        tmp_path,
        num_samples=SAMPLES,
        temperature=1.0,
        thinking=False,
        chunk_size=7,
        bootstrap=200,
        decoding={"max_new_tokens": 64},
    )
    n = len(dataset)
    all_failed = n // FAIL_EVERY
    with open(tmp_path / "eval_predictions.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["id"] for r in rows] == dataset["id"]
    assert sum(r["all_failed"] == "True" for r in rows) == all_failed
    assert all(float(r["pred_mean"]) == 3.0 for r in rows if r["all_failed"] == "True")  # the midpoint rule
    ok = [r for r in rows if r["all_failed"] == "False"]
    assert all(
        int(r["n_parsed"]) == 2 and float(r["pred_std"]) == pytest.approx(0.2 / np.sqrt(2)) for r in ok
    )

    saved = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert saved["decoding"] == {
        "num_samples": 3,
        "temperature": 1.0,
        "thinking": False,
        "max_new_tokens": 64,
    }
    assert saved["images_all_failed"] == all_failed == report["images_all_failed"]
    failures = all_failed * SAMPLES + (n - all_failed)
    assert saved["sample_parse_failure_rate"] == pytest.approx(failures / (n * SAMPLES))
    expected = evaluate_scores([float(r["pred_mean"]) for r in rows], dataset["mos"], bootstrap=200, seed=0)
    assert saved["overall"]["srcc"] == pytest.approx(expected["srcc"])
    assert saved["per_dataset"]["builtin"]["srcc"] == pytest.approx(expected["srcc"])
    assert report["overall"]["srcc"] > 0.5  # sharpness does track blur and contrast loss
    # The mean spread of the images with two or more parsed samples (all-failed images have none).
    assert saved["overall"]["spread_within_image"] == pytest.approx(0.2 / np.sqrt(2))

    with Image.open(tmp_path / "eval_scatter.png") as plot:
        assert plot.format == "PNG" and plot.width >= 300


def test_an_evaluation_is_logged_to_the_runs_mlflow_store(tmp_path, dataset):
    from cluster.tracking import Tracker
    from configs.load import load_config

    config = load_config("cpu-tiny", [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    tracker = Tracker(config)
    report = run_evaluation(
        dataset,
        sharpness_scorer(),
        tmp_path / "out",
        num_samples=SAMPLES,
        temperature=0.7,
        thinking=True,
        prefix="test_eval",
        step=5,
        bootstrap=50,
    )
    tracker.log_evaluation("test_eval", report, output_files(tmp_path / "out", "test_eval"), step=5)
    tracker.finish()
    client = mlflow.MlflowClient(tracker.uri)
    logged = client.get_run(tracker.run_id).data.metrics
    assert logged["test_eval/srcc"] == pytest.approx(report["overall"]["srcc"])
    assert logged["test_eval/plcc_ci95_low"] == pytest.approx(report["overall"]["plcc_ci95_low"])
    assert logged["test_eval/images_all_failed"] == report["images_all_failed"]
    assert client.get_metric_history(tracker.run_id, "test_eval/srcc")[0].step == 5
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id, "test_eval")}
    assert artifacts == {
        "test_eval/test_eval_predictions.csv",
        "test_eval/test_eval_metrics.json",
        "test_eval/test_eval_scatter.png",
    }


def test_wrong_number_of_samples_is_an_error(tmp_path, dataset):
    with pytest.raises(ValueError, match="gave 3 samples for .* expected 4"):
        run_evaluation(dataset, sharpness_scorer(), tmp_path, num_samples=4, temperature=1.0, thinking=True)


@pytest.mark.parametrize(
    ("policy", "expected_mean", "expected_parsed"),
    [("keep", (2.0 + 4058.0) / 2, 2), ("clip", (2.0 + 5.0) / 2, 2), ("fail", 2.0, 1)],
)
def test_out_of_range_samples_follow_the_rewards_policy(
    tmp_path, dataset, policy, expected_mean, expected_parsed
):
    # One sample a tiny model wrote without its decimal point ("4058" for "4.058") per image.
    def score_images(images):
        return [[2.0, 4058.0] for _ in images]

    report = evaluate_quickly(dataset, score_images, tmp_path, 2, out_of_range_policy=policy)
    with open(tmp_path / "eval_predictions.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert all(float(r["pred_mean"]) == pytest.approx(expected_mean) for r in rows)
    assert all(int(r["n_parsed"]) == expected_parsed for r in rows)
    assert all(json.loads(r["samples"]) == [2.0, 4058.0] for r in rows)  # the raw samples are kept
    assert report["samples_out_of_range"] == len(rows)
    assert report["out_of_range_rule"] == policy


def test_digit_distributions_add_the_expected_score_metrics(tmp_path, dataset):
    """Sampled digits are pure noise here, while each image's digit distribution has the MOS-ordered mean:
    the expected scores rank the images, the sampled ones do not."""
    mos = np.asarray(dataset["mos"], dtype=np.float64)
    rank = {image_id: r for r, image_id in enumerate(np.array(dataset["id"])[np.argsort(mos)])}
    ids_by_path = dict(zip(dataset["image"], dataset["id"], strict=True))
    rng = np.random.default_rng(0)
    paths = iter(dataset["image"])

    def score_images(images):
        out = []
        for _ in images:
            mean = 1.5 + 3.0 * rank[ids_by_path[next(paths)]] / len(rank)  # in [1.5, 4.5)
            probs = np.zeros(10)
            low = int(mean)
            probs[low], probs[low + 1] = low + 1 - mean, mean - low  # E[digit] = mean
            scores = [float(rng.integers(1, 6)), float(rng.integers(1, 6)), None]
            out.append(ImageSamples(scores, [tuple(probs), None, None]))
        return out

    report = evaluate_quickly(dataset, score_images, tmp_path, 3, out_of_range_policy="clip")
    expected = report["expected_score"]
    assert expected["samples_with_digit_probs"] == len(dataset)
    assert abs(report["overall"]["srcc"]) < 0.5
    # Each image's second sample has no distribution and counts with its sampled score: a 50/50 mix.
    assert 0.5 < expected["overall"]["srcc"] < 1.0
    with open(tmp_path / "eval_predictions.csv") as stream:
        rows = list(csv.DictReader(stream))
    first = rows[0]
    sampled = json.loads(first["samples"])
    assert float(first["pred_expected"]) == pytest.approx(
        (1.5 + 3.0 * rank[first["id"]] / len(rank) + sampled[1]) / 2
    )
    predicted = np.array([float(r["pred_expected"]) for r in rows])
    assert expected["overall"]["spread_across_images"] == pytest.approx(np.std(predicted))


def test_without_digit_distributions_the_report_has_no_expected_scores(tmp_path, dataset):
    report = evaluate_quickly(dataset, sharpness_scorer(), tmp_path, SAMPLES)
    assert "expected_score" not in report
    with open(tmp_path / "eval_predictions.csv") as stream:
        assert "pred_expected" not in csv.DictReader(stream).fieldnames


def test_srcc_within_reference_takes_each_photos_content_offset_out(tmp_path, dataset):
    """Predictions that rank every photo's versions right but shift each photo by a large offset: the
    overall SRCC suffers, the within-reference SRCC is 1, for sampled and expected scores alike."""
    refs = sorted(set(dataset["ref"]))
    offset = {ref: 10.0 * index for index, ref in enumerate(refs)}
    row = {
        path: (mos, ref)
        for path, mos, ref in zip(dataset["image"], dataset["mos"], dataset["ref"], strict=True)
    }
    paths = iter(dataset["image"])

    def score_images(images):
        out = []
        for _ in images:
            mos, ref = row[next(paths)]
            score = offset[ref] + mos / 10
            # No digit distributions: the expected reading falls back to the sampled scores.
            out.append(ImageSamples([score, score], [None, None]))
        return out

    report = evaluate_quickly(dataset, score_images, tmp_path, 2, score_range=(0.0, 1000.0))
    assert len(refs) > 1 and report["overall"]["references_ranked"] == len(refs)
    assert report["overall"]["srcc_within_reference"] == pytest.approx(1.0)
    assert report["overall"]["srcc"] < 0.9
    assert report["expected_score"]["overall"]["srcc_within_reference"] == pytest.approx(1.0)
