"""Process environment every entry point sets before importing vLLM, Ray, DeepSpeed or transformers.

Nothing is fetched from a hub at run time, servers bind to loopback, and DeepSpeed's JIT builds go
to a folder of their own. Values already in the environment win, so a cluster can override them.

The console keeps a run's own lines and everyone's errors: the libraries' logging and warnings
(`route_logs`), the output of the run's Ray workers (`actor_output_to_log`) and of an engine in the
command's own process (`output_to_log`) go to the run's log file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
# Library loggers whose INFO lines (start-up banners, one pair of weight-reload lines per step) and
# warnings belong in the log file, not on the console; only their errors show. py.warnings: Python's
# warnings (FutureWarning, ...), captured into logging by route_logs.
LIBRARY_LOGGERS = (
    "vllm",
    "DeepSpeed",
    "ray",
    "mlflow",
    "transformers",
    "datasets",
    "httpx",
    "torch",
    "py.warnings",
)


class _Console:
    """The stream the console handlers write to: this process's stderr, or, while its own output goes to
    the log file (`actor_output_to_log`, `output_to_log`), the stream that still reaches the console
    (in an actor: the one Ray forwards to the driver, which prefixes the actor's name)."""

    stream = None

    def write(self, text: str) -> int:
        return (self.stream or sys.stderr).write(text)

    def flush(self) -> None:
        (self.stream or sys.stderr).flush()


CONSOLE = _Console()


def logging_config(log_file: str | Path) -> dict:
    """A logging.config.dictConfig: everything at INFO into `log_file`; on the console (`CONSOLE`) the
    project's own warnings and everyone's errors, libraries' warnings not."""
    console = "ext://configs.runtime_env.CONSOLE"  # by name: vLLM reads this config from JSON
    handlers = {
        "file": {
            "class": "logging.FileHandler",
            "filename": str(log_file),
            "mode": "a",
            "level": "INFO",
            "formatter": "plain",
        },
        "console": {"class": "logging.StreamHandler", "stream": console, "level": "WARNING"},
        "library_console": {
            "class": "logging.StreamHandler",
            "stream": console,
            "level": "ERROR",
            "formatter": "named",
        },
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"},
            "named": {"format": "%(levelname)s %(name)s: %(message)s"},
        },
        "handlers": handlers,
        "root": {"level": "INFO", "handlers": ["file", "console"]},
        "loggers": {
            name: {"level": "INFO", "handlers": ["file", "library_console"], "propagate": False}
            for name in LIBRARY_LOGGERS
        },
    }


def route_logs(log_file: str | Path) -> dict[str, str]:
    """Send this process's logging to `log_file` (INFO) and the console (see logging_config), and write
    the same setup as JSON beside the log for vLLM, which configures its own processes from
    VLLM_LOGGING_CONFIG_PATH. Returns the variables that give other processes of the run the same routing."""
    import json
    import logging.config

    log_file = Path(log_file).resolve()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    config = logging_config(log_file)
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    vllm_config = log_file.with_suffix(".logging.json")
    vllm_config.write_text(json.dumps(config, indent=1))
    variables = {LOG_FILE_VARIABLE: str(log_file), "VLLM_LOGGING_CONFIG_PATH": str(vllm_config)}
    os.environ.update(variables)
    return variables


def route_logs_from_env() -> None:
    """In an actor: the routing of the run that started it, if any (see route_logs)."""
    if os.environ.get(LOG_FILE_VARIABLE):
        import logging
        import logging.config

        logging.config.dictConfig(logging_config(os.environ[LOG_FILE_VARIABLE]))
        logging.captureWarnings(True)


# Lines a Ray worker writes to its stdout and stderr to tell the driver which actor or task the lines
# after them come from (ray._private.ray_constants.LOG_PREFIX_*); the driver prefixes them "(Name pid=N)".
RAY_MARKERS = (":actor_name:", ":task_name:", ":job_id:")


class _IntoLog:
    """An actor's sys.stdout or sys.stderr after actor_output_to_log: text into `log` (the process's fd 1
    or 2, now the log file), Ray's marker lines to `forwarded` (the stream Ray forwards to the driver)."""

    def __init__(self, log, forwarded) -> None:
        self.log, self.forwarded = log, forwarded

    def write(self, text: str) -> int:
        if text.startswith(RAY_MARKERS):
            self.forwarded.write(text)
            self.forwarded.flush()
            return len(text)
        return self.log.write(text)

    def flush(self) -> None:
        self.log.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self.log, name)  # fileno, encoding, buffer, ...


def _redirect_fds(target: str | Path) -> tuple:
    """Point this process's fd 1 and 2 at `target` (appending); returns text streams on the old ones."""
    sys.stdout.flush()
    sys.stderr.flush()
    old = (os.fdopen(os.dup(1), "w", buffering=1), os.fdopen(os.dup(2), "w", buffering=1))
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    return old


def actor_output_to_log() -> None:
    """Ray's worker_process_setup_hook (cluster.system.start_ray), in every worker process of the run
    before its actor starts: all the process writes (libraries' start-up lines and warnings, progress
    bars, C-level output) goes to the run's log file. The stream Ray forwards to the driver keeps
    the errors (ERROR log records, via CONSOLE) and a crash's Python traceback (faulthandler), which the
    driver prints with the actor's name."""
    log_file = os.environ.get(LOG_FILE_VARIABLE)
    if not log_file:
        return
    import faulthandler

    try:
        forwarded_out, forwarded_err = _redirect_fds(log_file)
    except OSError as exc:  # the log cannot be opened here: the output stays where Ray put it
        print(f"{log_file}: {exc}; this process's output stays in Ray's log", file=sys.stderr)
        return
    sys.stdout = _IntoLog(sys.stdout, forwarded_out)
    sys.stderr = _IntoLog(sys.stderr, forwarded_err)
    CONSOLE.stream = forwarded_err
    faulthandler.enable(forwarded_err)
    route_logs_from_env()


@contextmanager
def output_to_log(log_file: str | Path) -> Iterator[None]:
    """Within: this process's fd 1 and 2 (what libraries print, their progress bars and C-level lines)
    go to `log_file`, errors logged meanwhile to the console (for `vqr1 score` and `vqr1 eval`, whose
    engine runs in this process; wrap the library calls, not the lines the command prints)."""
    console_out, console_err = _redirect_fds(log_file)
    previous, CONSOLE.stream = CONSOLE.stream, console_err
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(console_out.fileno(), 1)
        os.dup2(console_err.fileno(), 2)
        CONSOLE.stream = previous
        console_out.close()
        console_err.close()


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
