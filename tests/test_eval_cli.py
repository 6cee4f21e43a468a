"""`vqr1 eval` end to end: the tiny checkpoint through the real vLLM engine on the built-in benchmark."""

import json

import mlflow
import pytest

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
    assert -1.0 <= report["overall"]["srcc"] <= 1.0
    runs = mlflow.search_runs(experiment_names=["visualquality-r1"], output_format="list")
    assert any("eval/srcc" in run.data.metrics for run in runs)
