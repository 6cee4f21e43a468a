import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
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


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and every process under it ([] once it has exited)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def listening_sockets(processes: list[psutil.Process]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP/UDP socket of the processes."""
    sockets = []
    for process in processes:
        try:
            name = process.name()
            connections = process.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue  # a short-lived helper that has exited: it listens on nothing
        sockets += [
            (process.pid, name, c.laddr.ip, c.laddr.port)
            for c in connections
            if c.status == psutil.CONN_LISTEN
        ]
    return sockets


@dataclass
class WatchedRun:
    returncode: int
    stdout: str
    stderr: str
    samples: list[tuple[int, list]]  # (step lines printed so far, listening sockets)
    tmp_path: Path


WATCHED_RUN_STEPS = 5


@pytest.fixture(scope="session")
def watched_train_run(tmp_path_factory, tiny_overrides) -> WatchedRun:
    """`vqr1 train` of cpu-tiny for 5 steps as a user starts it (its own process, the single-node
    default: no RAY_ADDRESS), stdout and stderr kept apart, and the listening sockets of its whole process
    tree sampled from start-up to exit: every second, and back to back between the first and the last
    step line (a tiny step takes well under a second). The console test and the loopback test read this one run."""
    tmp_path = tmp_path_factory.mktemp("watched-run")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "cluster.cli", "train", "--config", "cpu-tiny"]
    command += tiny_overrides(tmp_path, WATCHED_RUN_STEPS, "eval.max_images=4")
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda: out.extend(process.stdout), daemon=True),
        threading.Thread(target=lambda: err.extend(process.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    samples = []
    deadline = time.monotonic() + 1500
    try:
        while process.poll() is None and time.monotonic() < deadline:
            steps = sum(line.startswith("step ") for line in list(out))
            samples.append((steps, listening_sockets(process_tree(process.pid))))
            time.sleep(0.0 if 0 < steps < WATCHED_RUN_STEPS else 1.0)
    finally:
        if process.poll() is None:
            for child in process_tree(process.pid)[::-1]:
                child.kill()
        process.wait(timeout=60)
    for reader in readers:
        reader.join(timeout=30)
    return WatchedRun(process.returncode, "".join(out), "".join(err), samples, tmp_path)


def policy_shards(processor, world_size: int) -> list[tuple[list, list[list[float]]]]:
    """Per learner rank: two images (two sizes) with two completions each (ragged lengths) and their
    advantages, a positive and a negative completion per image as group-normalised advantages come out."""
    import numpy as np
    from PIL import Image

    from learner.policy import PolicySample
    from vlm.prompts import build_prompt_text

    prompt = build_prompt_text(processor, thinking=True)
    rng = np.random.default_rng(0)
    shards = []
    for rank in range(world_size):
        samples = []
        for height, width in [(84, 112), (112, 112)]:
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            completions = [rng.integers(20, 500, n).tolist() for n in rng.integers(2, 9, size=2)]
            samples.append(PolicySample(Image.fromarray(pixels), prompt, completions))
        shards.append((samples, [[1.0, -1.0], [-0.5, 0.5]] if rank == 0 else [[0.8, -0.8], [1.2, -1.2]]))
    return shards
