"""The whole system on the cpu-tiny preset: real Ray, real vLLM CPU engine, DeepSpeed ZeRO-2 over gloo
with 2 ranks, the reward actor and a real MLflow sqlite store."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
import pytest

from cluster.tracking import metric_histories

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

STEP_METRICS = [
    "reward/total_mean",
    "reward/total_std",
    "reward/fidelity_mean",
    "reward/fidelity_std",
    "reward/format_mean",
    "reward/format_std",
    "reward/parse_failure_rate",
    "score/spread_within_image",
    "score/batch_srcc",
    "advantage/mean",
    "advantage/std",
    "learner/loss",
    "learner/kl",
    "learner/clip_fraction",
    "learner/grad_norm",
    "learner/lr",
    "response/length_mean",
    "perf/rollout_tokens_per_s",
    "time/generate_s",
    "time/reward_s",
    "time/logprob_s",
    "time/update_s",
    "time/weight_push_s",
    "sync/max_abs_logprob_diff",
]


def metric_history(tracking_uri: str, run_id: str, key: str) -> list:
    return metric_histories(tracking_uri, run_id, (key,))[key]


def test_tiny_run_logs_every_metric_for_every_step(first_run):
    tmp_path, config, result = first_run
    uri = config.tracking.tracking_uri
    for key in STEP_METRICS:
        steps = [m.step for m in metric_history(uri, result["mlflow_run_id"], key)]
        assert steps == [1, 2, 3], f"{key} logged at steps {steps}"
    run = mlflow.tracking.MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.data.params["rollout.num_generations"] == "4"
    # What the run returns is what it logged, before and after.
    for label in ("before", "after"):
        for key in ("srcc", "plcc", "spread_within_image"):
            assert run.data.metrics[f"eval_{label}/{key}"] == pytest.approx(result[label][key]), (label, key)
        # The evaluation read digit distributions from vLLM: the expected-score reading exists and is logged.
        assert run.data.metrics[f"eval_{label}/expected/srcc"] == pytest.approx(
            result[label]["srcc_expected"]
        )
    # The evaluation treats out-of-range scores as the reward does (the tiny preset clips them).
    saved = json.loads((tmp_path / "out" / "eval-after" / "eval_after_metrics.json").read_text())
    assert config.reward.out_of_range == "clip" and saved["out_of_range_rule"] == "clip"


def test_every_role_logs_its_system_figures_every_step(first_run):
    """The "System metrics" tab: each role's CPU and memory (the rollout worker's KV cache too) at every
    step, the machine's once, and a tag naming each role's machine."""
    _, config, result = first_run
    uri, run_id = config.tracking.tracking_uri, result["mlflow_run_id"]
    roles = ["driver", "rollout-0", "reward", "learner-0", "learner-1"]
    for role in roles:
        for name in ("cpu_percent", "rss_gib"):
            steps = [m.step for m in metric_history(uri, run_id, f"system/{role}/{name}")]
            assert steps == [1, 2, 3], f"system/{role}/{name} logged at steps {steps}"
    # The in-process engine filled part of its KV cache while generating, and freed it after.
    peaks = [m.value for m in metric_history(uri, run_id, "system/rollout-0/kv_cache_peak_percent")]
    assert len(peaks) == 3 and all(0 < peak <= 100 for peak in peaks), peaks
    run = mlflow.tracking.MlflowClient(uri).get_run(run_id)
    host = socket.gethostname()
    assert run.data.tags["system.learner-1.machine"].startswith(host)
    # The machine's figures once per step (the driver's sample; the actors' of the same machine add none).
    machine = metric_history(uri, run_id, f"system/machine-{host}/memory_used_percent")
    assert [m.step for m in machine] == [1, 2, 3]
    assert set(roles) == {
        key.split("/")[1] for key in run.data.metrics if key.startswith("system/") and "machine-" not in key
    }
    # The overview section: the charts to look at first.
    for name in ("reward", "format", "kl", "step_s"):
        assert [m.step for m in metric_history(uri, run_id, f"00-overview/{name}")] == [1, 2, 3], name
    assert [m.step for m in metric_history(uri, run_id, "00-overview/eval_srcc")] == [0, 3]


def test_pushed_weights_equal_the_learners_after_every_step(first_run):
    _, config, result = first_run
    history = metric_history(
        config.tracking.tracking_uri, result["mlflow_run_id"], "sync/max_abs_logprob_diff"
    )
    assert len(history) == 3
    # fp32 on both sides: vLLM's log-probs of its greedy tokens equal the learner's.
    assert all(m.value < 1e-3 for m in history), [m.value for m in history]


def test_final_checkpoint_is_complete_and_loadable(first_run):
    from transformers import AutoModelForImageTextToText

    from cluster.checkpoints import latest_valid

    tmp_path, _, result = first_run
    folder, state = latest_valid(tmp_path / "checkpoints")
    assert state["step"] == 3 and folder.name == "step-000003"
    AutoModelForImageTextToText.from_pretrained(folder)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head on 127.0.0.1, stopped afterwards; yields submit(args), which runs
    `ray job submit --working-dir <project> -- ARGS` against it and returns the finished process."""
    bin_dir = Path(sys.executable).parent
    gcs_port, dashboard_port = free_port(), free_port()
    # Ray's socket paths must stay under 107 bytes: pytest's tmp_path is too deep for them.
    ray_dir = Path(tempfile.mkdtemp(prefix="vqr1-ray-", dir="/tmp"))
    # Token authentication on both sides: the head requires the token and the job client sends it. The
    # test's own token (not ~/.ray/auth_token, which a fresh machine lacks) keeps it self-contained.
    token = uuid.uuid4().hex
    # Without MLFLOW_TRACKING_URI: the jobs name their store themselves, or test the default.
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env = {**inherited, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    head = subprocess.run(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            # Its own port: the default (52365) is taken while another Ray runs on the machine, and the
            # head's job agent then never starts ("No available agent").
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={ray_dir}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert head.returncode == 0, head.stderr

    def submit(args: list[str]) -> subprocess.CompletedProcess:
        # Under load the head's job agent can register after `ray start` returns; Ray answers "No
        # available agent" to a submit before that, so spaced attempts (up to 5 minutes, for a loaded
        # machine) stand in for a readiness probe.
        deadline = time.monotonic() + 300
        while True:
            job = subprocess.run(
                [
                    str(bin_dir / "ray"),
                    "job",
                    "submit",
                    f"--address=http://127.0.0.1:{dashboard_port}",
                    f"--working-dir={ROOT}",
                    "--",
                    *args,
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            if "No available agent" not in job.stdout + job.stderr or time.monotonic() > deadline:
                return job
            time.sleep(10)

    try:
        yield submit
    finally:
        stop_processes_of(ray_dir)
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_ray_job_submit_refuses_relative_result_paths(ray_head):
    """The job runs in Ray's copy of the project: relative outputs, checkpoints and MLflow store would
    land there. One message names them all and the job ends before any model loads."""
    job = ray_head([sys.executable, "-m", "cluster.train", "--config", "cpu-tiny"])
    output = job.stdout + job.stderr
    assert job.returncode != 0, output[-3000:]
    assert "Ray's temporary copy of the project" in output, output[-3000:]
    assert "working_dir_files" in output
    for key in ("train.output_dir=outputs/cpu-tiny", "checkpoint.dir=", "tracking.tracking_uri (unset"):
        assert key in output
    assert "Traceback" not in output


def test_ray_job_submit_runs_the_tiny_job(ray_head, tmp_path, tiny_overrides):
    """`ray job submit` of cpu-tiny to a local head on 127.0.0.1, which the test stops afterwards, with
    vLLM's multiprocess engine (the GPU presets'): its EngineCore process imports the weight-sync
    extension from the job's copy of the project, and the step's weight push reaches it."""
    overrides = tiny_overrides(
        tmp_path, 1, "rollout.in_process_engine=false", "train.verify_weight_sync=true"
    )
    job = ray_head([sys.executable, "-m", "cluster.train", "--config", "cpu-tiny", *overrides])
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout
    assert "step 1/1" in job.stdout
    assert (tmp_path / "checkpoints" / "step-000001" / "manifest.json").is_file()

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = json.loads((tmp_path / "out" / "result.json").read_text())["mlflow_run_id"]
    run = mlflow.tracking.MlflowClient(uri).get_run(run_id)
    report = json.loads(run.data.tags["rollout.worker_0.engine"])  # asked after the last push
    (engine,) = report["engine"]
    # Ray's unpacked copy of the job's working_dir (cluster.ray_job), not this checkout or an install.
    path = Path(engine["file"])
    assert path.parts[-2:] == ("actor", "rollout_engine.py"), path
    assert path.parts[-4] == "working_dir_files" and path.parts[-3].startswith("_ray_pkg_"), path
    assert ROOT not in path.parents and "site-packages" not in path.parts, path
    assert engine["pid"] != report["worker_pid"]  # a process of its own, not the rollout actor
    # The push after step 1 reached that process, and its weights are the learners' (greedy log-probs).
    assert engine["weight_version"] == 1
    (gap,) = metric_history(uri, run_id, "sync/max_abs_logprob_diff")
    assert gap.step == 1 and gap.value < 1e-3, gap
    # The user's view of the same: train.log names the engine's file and process at start-up.
    log = (tmp_path / "out" / "train.log").read_text()
    assert f"step 0: rollout worker 0 (pid {report['worker_pid']})" in log
    assert f"'file': '{path}', 'pid': {engine['pid']}" in log


def stop_processes_of(temp_dir: Path) -> None:
    """Stop the head this test started, by the PIDs of the processes that use its temp dir (not `ray stop`,
    which would stop every Ray session on the machine)."""
    import psutil

    ours = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(temp_dir) in part for part in process.info["cmdline"] or []):
            ours.append(process)
    # The raylet's agents and workers rename themselves (ray::DashboardAgent, ...): its children too.
    for process in list(ours):
        try:
            ours.extend(child for child in process.children(recursive=True) if child not in ours)
        except psutil.NoSuchProcess:
            pass
    for process in ours:
        process.terminate()
    _, alive = psutil.wait_procs(ours, timeout=20)
    for process in alive:
        process.kill()
    assert ours, "found no process of the Ray head this test started"


@pytest.mark.long  # make test's time: the chaos, one-GPU and adapter runs came in
def test_evaluations_between_steps_leave_the_training_samples_alone(first_run, tmp_path, tiny_overrides):
    """Evaluations draw from a stream of their own (eval.seed): the same run evaluating after every step
    trains on the very samples of the first run, which evaluates before and after only."""
    _, config, first = first_run
    overrides = tiny_overrides(
        tmp_path, 3, "checkpoint.every=1", "train.verify_weight_sync=true", "eval.every=1"
    )
    console = subprocess.run(
        [sys.executable, "-m", "cluster.train", "--config", "cpu-tiny", *overrides],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    evaluated = json.loads((tmp_path / "out" / "result.json").read_text())
    # One line per step on the console; vLLM's per-push INFO lines go to the run's log file only.
    output = console.stdout + console.stderr
    assert [line.split(" |")[0] for line in output.splitlines() if line.startswith("step ")] == [
        "step 1/3",
        "step 2/3",
        "step 3/3",
    ]
    assert "Reloading and processing weights" not in output
    assert "Reloading and processing weights" in (tmp_path / "out" / "train.log").read_text()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logged = mlflow.tracking.MlflowClient(uri).get_run(evaluated["mlflow_run_id"]).data.metrics
    assert "eval_step1/srcc" in logged and "eval_step2/srcc" in logged
    for key in ("reward/total_mean", "score/spread_within_image", "response/length_mean", "learner/loss"):
        alone = [m.value for m in metric_history(config.tracking.tracking_uri, first["mlflow_run_id"], key)]
        assert [m.value for m in metric_history(uri, evaluated["mlflow_run_id"], key)] == alone, key
