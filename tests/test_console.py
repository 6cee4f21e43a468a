"""What a user sees on the console: only the run's own lines (library output goes to the run's log file,
actors' errors still show with the actor's name), one message for a user's error, and the time left."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import WATCHED_RUN_STEPS
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# Every console line of `vqr1 train` is one of these kinds (tqdm bars: each refresh counts as a line).
TRAIN_LINES = {
    "data check progress": r"(checking \S+ images|builtin benchmark):\s+\d+%\|.*",
    "header": r"model \S+ \| \d+ training images, \d+ held-out \| MLflow run \w+ in \S+.* \| library log: \S+/train\.log",
    "step": r"step \d+/\d+ \| reward .* tok/s( \| eta \w+)?",
    "evaluation progress": r"eval_\w+: scoring:\s+\d+%\|.*",
    "evaluation table": r"held-out evaluation\s+before\s+after|  \w+\s+(-?\d+\.\d{3}|-)\s+(-?\d+\.\d{3}|-)",
    "evaluation note": r"  \(\*_expected: .*|   \S.*",
    "paths": r"policy checkpoint \(Hugging Face format\): \S+|MLflow run \w+ in \S+.*|training curves: \S+\.png",
    "blank": r"\s*",
}
SCORE_LINES = {
    "model": r"scoring with \S+: .*",
    "progress": r"scoring:\s+\d+%\|.*",
    "score": r"\S+: (score -?[\d.]+( OUT OF RANGE \[.*\])? \+/- [\d.]+ \(\d+/\d+ parsed\)|no parsable score in \d+ samples) \| .*",
    "summary": r"\d+ images scored, \d+ bad files|\d+ mean scores outside .*",
    "paths": r"library log: \S+/score\.log",
    "blank": r"\s*",
}


def unexpected_lines(text: str, kinds: dict[str, str]) -> list[str]:
    patterns = [re.compile(pattern) for pattern in kinds.values()]
    lines = re.split(r"[\r\n]", text)
    return [line for line in lines if not any(p.fullmatch(line) for p in patterns)]


def run_cli(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_train_console_shows_only_the_runs_own_lines(watched_train_run):
    run = watched_train_run
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-3000:]
    wrong = unexpected_lines(run.stdout, TRAIN_LINES) + unexpected_lines(run.stderr, TRAIN_LINES)
    assert not wrong, "lines on the console that are not the run's own:\n" + "\n".join(wrong)
    assert [line.split(" |")[0] for line in run.stdout.splitlines() if line.startswith("step ")] == [
        f"step {step}/{WATCHED_RUN_STEPS}" for step in range(1, WATCHED_RUN_STEPS + 1)
    ]
    # The libraries' start-up output went to the log, C-level and actor output included.
    log = (run.tmp_path / "out" / "train.log").read_text()
    for chatter in ("vllm", "Setting accelerator to CPU", "Loading weights"):
        assert chatter in log, chatter


@pytest.mark.slow
def test_score_console_shows_only_the_scores(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)).save(tmp_path / name)
    run = run_cli(
        "cluster.cli",
        "score",
        str(tmp_path / "a.png"),
        str(tmp_path / "b.png"),
        "--preset",
        "tiny",
        "-n",
        "2",
        "--set",
        f"data.cache_dir={ROOT / '.cache' / 'vqr1'}",
        "--set",
        f"train.output_dir={tmp_path / 'out'}",
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    wrong = unexpected_lines(run.stdout, SCORE_LINES) + unexpected_lines(run.stderr, SCORE_LINES)
    assert not wrong, "lines on the console that are not the scores:\n" + "\n".join(wrong)
    assert "2 images scored, 0 bad files" in run.stderr
    assert "vllm" in (tmp_path / "out" / "score.log").read_text()


ACTOR = """
import sys, time
import ray
from cluster.system import start_ray
from configs.load import load_config
from configs.runtime_env import apply_default_env, route_logs

start_ray(load_config("cpu-tiny"), {**apply_default_env(), **route_logs(sys.argv[1])})

@ray.remote(num_cpus=0)
class Failing:
    def __init__(self):
        import logging, os, warnings
        print("start-up chatter")
        os.write(2, b"C-level chatter\\n")
        warnings.warn("a library's FutureWarning", FutureWarning)
        logging.getLogger("vllm.engine").warning("a library's warning")
        logging.getLogger("vllm.engine").error("the engine broke")

    def crash(self):
        import ctypes
        ctypes.string_at(0)

actor = Failing.remote()
try:
    ray.get(actor.crash.remote())
except ray.exceptions.RayActorError:
    print("driver: the actor died")
time.sleep(5)  # Ray forwards the actor's lines to the driver asynchronously
ray.shutdown()
"""


@pytest.mark.slow
def test_actor_output_goes_to_the_log_and_its_errors_to_the_console(tmp_path):
    log = tmp_path / "train.log"
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(ACTOR), str(log)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-3000:]
    assert "driver: the actor died" in console
    # The error and the crash's traceback, each line with the actor's name.
    assert re.search(r"\(Failing pid=\d+\)\S* ERROR vllm.engine: the engine broke", console), console[-3000:]
    assert re.search(r"\(Failing pid=\d+\)\S* Fatal Python error: Segmentation fault", console), console[
        -3000:
    ]
    assert re.search(r"\(Failing pid=\d+\)\S*\s+File .* in crash", console), console[-3000:]
    for chatter in ("start-up chatter", "C-level chatter", "FutureWarning", "a library's warning"):
        assert chatter not in console, chatter
        assert chatter in log.read_text(), chatter


def write_jsonl_dataset(folder: Path, count: int, missing: int = 0) -> Path:
    """`count` real images in the published JSONL layout (README, "Training on your own data"), plus
    `missing` rows whose image file does not exist."""
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count + missing):
        image = f"images/{i:04d}.jpg"
        if i < count:
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / image)
        turns = [{"from": "human", "value": "..."}, {"from": "gpt", "value": round(1 + 4 * rng.random(), 2)}]
        lines.append(
            json.dumps({"id": f"{i:04d}", "dataset_name": "mine", "image": [image], "conversations": turns})
        )
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


@pytest.mark.parametrize(
    "entry", [("cluster.cli", "train"), ("cluster.train",)], ids=["vqr1", "python -m cluster.train"]
)
def test_a_dataset_too_small_for_a_step_stops_with_one_message(tmp_path, tiny_overrides, entry):
    """A new user's 16 images (one of them missing) with the default 16 images per step: one message
    naming the key and the split sizes, the bad-row report once, no traceback, before Ray starts."""
    label_file = write_jsonl_dataset(tmp_path / "mine", 16, missing=1)
    spec = f"[{{format: jsonl, path: {label_file}, name: mine}}]"
    run = run_cli(
        *entry,
        "--config",
        "cpu-default",
        *tiny_overrides(tmp_path, 2),
        f"data.train={spec}",
        f"data.eval={spec}",
        "data.on_bad_input=skip",
        timeout=300,
    )
    console = run.stdout + run.stderr
    assert run.returncode == 2, console[-3000:]
    assert "Traceback" not in console, console[-3000:]
    message = (
        "train.images_per_step=16 is more than the training images of dataset 'mine' (split by reference, "
        "data.split_ratios [0.6, 0.2, 0.2]: 'mine' 16 images -> 10 train, 3 val, 3 test)"
    )
    assert console.count(message) == 1, console[-3000:]
    assert "set train.images_per_step=10 or less" in console
    assert console.count("mine: 17 rows, 1 bad rows left out") == 1, console
    assert console.count("data.jsonl:17 [image]") == 1, console
    assert "Started a local Ray instance" not in (tmp_path / "out" / "train.log").read_text()


def test_time_left_is_the_median_step_time_times_the_steps_left():
    from cluster.train import format_duration, time_left

    # The slow first step does not stretch the estimate: median 10 s x 5 steps left.
    assert time_left([60.0, 10.0, 11.0, 9.0, 10.0], 5) == pytest.approx(50.0)
    assert time_left([12.0], 0) == 0.0 and time_left([], 3) == 0.0
    assert [format_duration(s) for s in (0, 44.6, 60, 192, 3599, 3600, 3900)] == [
        "0s",
        "45s",
        "1m00s",
        "3m12s",
        "59m59s",
        "1h00m",
        "1h05m",
    ]
