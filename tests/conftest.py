import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def tracking_uri_left_alone():
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI, which every later test's processes inherit."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    assert os.environ.get("MLFLOW_TRACKING_URI") == before, "the test changed MLFLOW_TRACKING_URI"


@pytest.fixture(scope="session")
def tiny_overrides():
    """Overrides that put a cpu-tiny run's outputs, checkpoints and MLflow store under a test folder,
    sharing the model and benchmark cache of the repository."""

    def overrides(tmp_path: Path, steps: int, *extra: str) -> list[str]:
        return [
            f"train.steps={steps}",
            f"train.output_dir={tmp_path / 'out'}",
            f"checkpoint.dir={tmp_path / 'checkpoints'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"data.cache_dir={ROOT / '.cache' / 'vqr1'}",
            *extra,
        ]

    return overrides


@pytest.fixture(scope="session")
def first_run(tmp_path_factory, tiny_overrides):
    """An uninterrupted 3-step cpu-tiny run with a checkpoint after every step and weight-sync checks,
    shared by the tests of the trainer and of its recovery (which compare their runs with it)."""
    from cluster.train import run
    from configs.load import load_config

    tmp_path = tmp_path_factory.mktemp("run")
    config = load_config(
        "cpu-tiny", tiny_overrides(tmp_path, 3, "checkpoint.every=1", "train.verify_weight_sync=true")
    )
    return tmp_path, config, run(config)


@pytest.fixture(scope="session")
def async_run(tmp_path_factory, tiny_overrides):
    """The same 3-step run with train.max_staleness=2 (step 1 queues the batches of steps 1-3 at once),
    shared by the asynchronous-pipeline tests and the resume test."""
    from cluster.train import run
    from configs.load import load_config

    tmp_path = tmp_path_factory.mktemp("async-run")
    config = load_config(
        "cpu-tiny",
        tiny_overrides(
            tmp_path,
            3,
            "train.max_staleness=2",
            "eval.max_images=4",
            "checkpoint.every=1",
            "checkpoint.keep_last=3",
        ),
    )
    return tmp_path, config, run(config)
