"""The loop learns to rank what its base model sees (issue 8's loop test).

The tint check (iqa/tint_check.py: views tinted red > gray > blue) through the real loop (Ray, vLLM,
DeepSpeed) from the shipped cold start, with TINT_CHECK's settings on cpu-default: held-out SRCC (views
of photos never trained on) must rise from the cold start's level, where it sits near 0. About 28 min.
The run is `python -m cluster.train` in its own process, as `make tint-check` runs it (run inside the
pytest process, the engines it leaves behind made the interpreter crash at exit on a fresh clone).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.proof import TINT_CHECK

ROOT = Path(__file__).resolve().parents[1]
# Measured gains over 150 steps: see the README ("Does it learn?").
MIN_GAIN = 0.2


@pytest.mark.slow
def test_grpo_learns_to_rank_the_tint_check(tmp_path):
    command = [
        sys.executable,
        "-m",
        "cluster.train",
        "--config",
        "cpu-default",
        *TINT_CHECK,
        f"train.output_dir={tmp_path / 'out'}",
        f"checkpoint.dir={tmp_path / 'checkpoints'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"data.cache_dir={ROOT / '.cache' / 'vqr1'}",
        "eval.bootstrap=0",
    ]
    subprocess.run(command, cwd=ROOT, check=True)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    before, after = result["before"]["srcc"], result["after"]["srcc"]
    assert abs(before) < 0.2, f"the cold start already ranks the tints (SRCC {before:.3f})"
    assert after - before >= MIN_GAIN, f"held-out SRCC {before:.3f} -> {after:.3f}: the loop did not learn"
