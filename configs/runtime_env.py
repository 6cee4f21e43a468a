"""Process environment every entry point sets before importing vLLM, Ray, DeepSpeed or transformers.

Nothing is fetched from a hub at run time, servers bind to loopback, and DeepSpeed's JIT builds go
to a folder of their own. Values already in the environment win, so a cluster can override them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_env() -> dict[str, str]:
    prefix = Path(sys.prefix)
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TORCH_EXTENSIONS_DIR": str(prefix / "torch_extensions"),
        "TOKENIZERS_PARALLELISM": "false",
    }


def apply_default_env() -> dict[str, str]:
    """Set the defaults that are not set yet; returns the resulting values (for Ray's runtime_env)."""
    for key, value in default_env().items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in default_env()}


# The run's log file, for every process of the run (the driver sets it; Ray passes it to the actors).
LOG_FILE_VARIABLE = "VQR1_LOG_FILE"
# Library loggers whose INFO lines (start-up banners, one pair of weight-reload lines per step) belong in
# the log file, not on the console; their warnings and errors still show.
LIBRARY_LOGGERS = ("vllm", "DeepSpeed", "ray", "mlflow", "transformers", "datasets", "httpx")


def logging_config(log_file: str | Path) -> dict:
    """A logging.config.dictConfig: everything at INFO into `log_file`, warnings and errors on stderr."""
    handlers = {
        "file": {
            "class": "logging.FileHandler",
            "filename": str(log_file),
            "mode": "a",
            "level": "INFO",
            "formatter": "plain",
        },
        "console": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "level": "WARNING"},
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"}},
        "handlers": handlers,
        "root": {"level": "INFO", "handlers": list(handlers)},
        "loggers": {
            name: {"level": "INFO", "handlers": list(handlers), "propagate": False}
            for name in LIBRARY_LOGGERS
        },
    }


def route_logs(log_file: str | Path) -> dict[str, str]:
    """Send this process's logging to `log_file` (INFO) and stderr (WARNING), and write the same setup as
    JSON beside the log for vLLM, which configures its own processes from VLLM_LOGGING_CONFIG_PATH.
    Returns the variables that give other processes of the run the same routing."""
    import json
    import logging.config

    log_file = Path(log_file).resolve()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    config = logging_config(log_file)
    logging.config.dictConfig(config)
    vllm_config = log_file.with_suffix(".logging.json")
    vllm_config.write_text(json.dumps(config, indent=1))
    variables = {LOG_FILE_VARIABLE: str(log_file), "VLLM_LOGGING_CONFIG_PATH": str(vllm_config)}
    os.environ.update(variables)
    return variables


def route_logs_from_env() -> None:
    """In an actor: the routing of the run that started it, if any (see route_logs)."""
    if os.environ.get(LOG_FILE_VARIABLE):
        import logging.config

        logging.config.dictConfig(logging_config(os.environ[LOG_FILE_VARIABLE]))


# The cores an actor's process is pinned to (cluster.<role>.cpu_affinity), set per actor by the driver.
CPU_AFFINITY_VARIABLE = "VQR1_CPU_AFFINITY"


def cpu_affinity_env(cores: list[int] | None) -> dict[str, str]:
    """The environment variable that pins an actor to `cores` ({} for no pinning)."""
    return {CPU_AFFINITY_VARIABLE: ",".join(str(core) for core in cores)} if cores else {}


def pin_from_env() -> None:
    """In an actor, before any library starts its threads: run on the cores the driver named, with as
    many torch threads (vLLM's CPU worker binds its threads within the same set)."""
    cores = os.environ.get(CPU_AFFINITY_VARIABLE)
    if cores:
        import torch

        allowed = {int(core) for core in cores.split(",")}
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(len(allowed))
