from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
