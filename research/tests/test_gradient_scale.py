"""research.gradient_scale: the clip table against hand-computed values, and the read-back from a real MLflow store."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pytest

from research.gradient_scale import gradient_scale_rows, main, read_run


def test_rows_match_the_formula_by_hand():
    grad_norm = np.array([0.01, 0.03, 1.0, 0.5])
    failed = np.array([False, False, True, True])
    unclipped, clipped = gradient_scale_rows(grad_norm, failed, clips=[10.0, 0.02])
    squares = 0.01**2 + 0.03**2 + 1.0 + 0.25
    assert unclipped["failure_share"] == pytest.approx(1.25 / squares)
    assert unclipped["rms_over_ordinary"] == pytest.approx(math.sqrt(squares / 4) / 0.02)
    assert unclipped["clipped"] == 0.0
    # Clipped to 0.02: three of the four steps lose norm; the malformed ones carry 2 of 3 equal-ish parts.
    squares = 0.01**2 + 3 * 0.02**2
    assert clipped["failure_share"] == pytest.approx(2 * 0.02**2 / squares)
    assert clipped["rms_over_ordinary"] == pytest.approx(math.sqrt(squares / 4) / 0.02)
    assert clipped["clipped"] == 0.75


def test_a_tighter_clip_never_raises_the_malformed_steps_share():
    rng = np.random.default_rng(0)
    failed = rng.random(200) < 0.3
    grad_norm = np.where(failed, rng.lognormal(-2.5, 1.0, 200), rng.lognormal(-4.4, 0.5, 200))
    rows = gradient_scale_rows(grad_norm, failed, clips=[1.0, 0.1, 0.05, 0.02, 0.01])
    shares = [row["failure_share"] for row in rows]
    assert shares == sorted(shares, reverse=True)
    assert rows[-1]["rms_over_ordinary"] < rows[0]["rms_over_ordinary"]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="equally long"):
        gradient_scale_rows(np.ones(3), np.zeros(2, dtype=bool))
    with pytest.raises(ValueError, match="no ordinary step"):
        gradient_scale_rows(np.ones(3), np.ones(3, dtype=bool))


def test_reads_a_runs_history_from_mlflow_and_prints_the_table(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("gradient-scale-test")
    with mlflow.start_run(run_name="exp-probe"):
        for step, (norm, fmt) in enumerate([(0.01, 1.0), (0.02, 1.0), (0.8, 0.9)], start=1):
            mlflow.log_metrics({"learner/grad_norm": norm, "reward/format_mean": fmt}, step=step)
    steps, grad_norm, format_mean = read_run(uri, "exp-probe")
    assert steps.tolist() == [1, 2, 3]
    assert grad_norm.tolist() == [0.01, 0.02, 0.8]
    assert format_mean.tolist() == [1.0, 1.0, 0.9]
    main(["--run-name", "exp-probe", "--tracking-uri", uri, "--clips", "1", "0.02"])
    out = capsys.readouterr().out
    assert "3 steps, 1 with a malformed completion" in out
    assert "| 0.02 | 0.444 |" in out  # clipped: 0.02^2 of 0.01^2 + 0.02^2 + 0.02^2
    with pytest.raises(SystemExit, match="no run named 'missing'"):
        read_run(uri, "missing")
