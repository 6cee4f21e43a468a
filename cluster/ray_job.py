"""A driver started by `ray job submit --working-dir .` runs in Ray's copy of the project, unpacked under
the Ray session's `runtime_resources/working_dir_files/<package>/` on the head node: relative result
paths would land in that temporary copy, which Ray garbage-collects, instead of where the job was
submitted from. Such a run is refused before anything starts, with one message naming every key that
needs an absolute path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

# Ray unpacks a job's working_dir into <session>/runtime_resources/working_dir_files/_ray_pkg_<hash>
# (ray._private.runtime_env.working_dir, packaging.RAY_PKG_PREFIX).
RAY_COPY_FOLDER, RAY_PACKAGE_PREFIX = "working_dir_files", "_ray_pkg_"
# Set by Ray's job supervisor for a job's entrypoint (ray.dashboard.modules.job.job_supervisor).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_ray_working_dir_copy(cwd: Path, environ: Mapping[str, str]) -> bool:
    """Whether `cwd` is (inside) Ray's unpacked copy of a job's working_dir."""
    parts = cwd.parts
    if any(part.startswith(RAY_PACKAGE_PREFIX) for part in parts):
        return True
    if RAY_COPY_FOLDER in parts[:-1]:
        return True
    try:  # a job with a working_dir whose copy lies under a cache folder of another name
        working_dir = json.loads(environ.get(RAY_JOB_ENV, "{}")).get("runtime_env", {}).get("working_dir")
    except (ValueError, AttributeError):
        return False
    return bool(working_dir) and "runtime_resources" in parts


def relative_store(uri: str | None) -> bool:
    """Whether an MLflow tracking URI (None: the default, ./mlflow.db) names a store by a relative path."""
    if uri is None:
        return True
    if uri.startswith("sqlite:///"):
        return not uri.removeprefix("sqlite:///").startswith("/")
    if uri.startswith("file:"):
        return not uri.removeprefix("file:").removeprefix("//").startswith("/")
    return "://" not in uri and not uri.startswith("/")  # a plain folder path


def ray_copy_problem(config, cwd: Path, environ: Mapping[str, str]) -> str | None:
    """The message refusing a run whose results would land in Ray's working_dir copy, or None."""
    if not in_ray_working_dir_copy(cwd, environ):
        return None
    uri = config.tracking.tracking_uri or environ.get("MLFLOW_TRACKING_URI")
    relative = [
        f"{key}={value}"
        for key, value in (
            ("train.output_dir", config.train.output_dir),
            ("checkpoint.dir", config.checkpoint.dir),
        )
        if not Path(value).is_absolute()
    ]
    if relative_store(uri):
        relative.append(
            f"tracking.tracking_uri={uri}" if uri else "tracking.tracking_uri (unset: ./mlflow.db)"
        )
    if not relative:
        return None
    return (
        f"this run's working directory is Ray's temporary copy of the project ({cwd}), as under "
        "`ray job submit --working-dir`: relative paths would leave the results there, and Ray deletes "
        f"that copy. Give absolute paths for {', '.join(relative)}; checkpoint.dir on storage every "
        "node sees. For example:\n"
        "  ray job submit --working-dir . -- python -m cluster.train --config <preset> "
        "train.output_dir=/srv/vqr1/run-1 checkpoint.dir=/srv/vqr1/run-1/checkpoints "
        "tracking.tracking_uri=sqlite:////srv/vqr1/mlflow.db"
    )
