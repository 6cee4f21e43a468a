"""`vqr1 eval` end to end: the tiny checkpoint through the real vLLM engine on the built-in benchmark."""

import csv
import json

import mlflow
import pytest
from scipy.stats import spearmanr

from cluster.cli import main


@pytest.mark.slow
def test_vqr1_eval_writes_csv_json_png_and_an_mlflow_run(tmp_path, tiny_overrides):
    out = tmp_path / "eval"
    code = main(
        ["eval", "--config", "cpu-tiny", "--out", str(out), *tiny_overrides(tmp_path, 1, "eval.max_images=8")]
    )
    assert code == 0
    for name in ("eval_predictions.csv", "eval_metrics.json", "eval_scatter.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "eval_metrics.json").read_text())
    assert report["n_images"] == 8 and report["samples_per_image"] == 2
    # The reported SRCC is the one of the predictions written beside it.
    with (out / "eval_predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    srcc = spearmanr([float(r["pred_mean"]) for r in rows], [float(r["mos"]) for r in rows]).statistic
    assert report["overall"]["srcc"] == pytest.approx(srcc)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("visualquality-r1").experiment_id])
    assert [run.data.metrics["eval/srcc"] for run in runs if "eval/srcc" in run.data.metrics] == [
        pytest.approx(srcc)
    ]
