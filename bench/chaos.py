"""A chaos run: a cpu-tiny run (train.max_staleness = 0 unless --max-staleness) while a seeded schedule
SIGKILLs, at random steps and moments of a step, each kind of process of the run at least once, against
a fault-free run of the same seed.

    python -m bench.chaos --steps 12 --faults 20 --seed 0          (the long schedule, docs/reliability.md)
    python -m bench.chaos --steps 4 --faults 5                     (one fault of each kind)
    python -m bench.chaos --steps 8 --faults 8 --max-staleness 1   (batches generated one version ahead)

Kinds: a rollout worker's actor process, its vLLM EngineCore process (rollout.in_process_engine=false),
the reward actor, one learner rank, and the driver with every process it started (then resumed with
checkpoint.resume=true, as a person would). Both runs checkpoint every step and sample with
rollout.reproducible_batches (a batch generated again gets the same completions). The run holds when
its trained-images log and the sha256 of its final weights equal the fault-free run's; it prints the
faults injected and survived, the replacements the driver recorded (phase, steps redone) and the wall
time lost.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("rollout actor", "engine process", "reward actor", "learner rank", "driver")


@dataclass
class Fault:
    """Kill a process of `kind` `delay_s` seconds after step `step` starts (the line of step - 1; a later
    step where the run is ahead of the schedule, `run_with_faults`)."""

    step: int
    kind: str
    delay_s: float
    killed: list[int] = field(default_factory=list)  # the PIDs it killed
    hit_step: int | None = None  # the step running when it fired (`step` or later)
    # A killed driver: seconds from the kill to its resumed successor's "resumed from" line.
    recovery_s: float | None = None


def schedule(seed: int, steps: int, faults: int, step_s: float) -> list[Fault]:
    """`faults` faults (at least one of each kind, the rest of random kinds) at random steps 2..steps,
    each at a random moment within a step of `step_s` seconds, in the order they fire."""
    if faults < len(KINDS) or steps < 2:
        raise ValueError(f"need at least {len(KINDS)} faults and 2 steps, got {faults} and {steps}")
    rng = random.Random(seed)
    kinds = [*KINDS, *(rng.choice(KINDS) for _ in range(faults - len(KINDS)))]
    rng.shuffle(kinds)
    chosen = [Fault(rng.randint(2, steps), kind, round(rng.uniform(0.0, step_s), 2)) for kind in kinds]
    return sorted(chosen, key=lambda fault: (fault.step, fault.delay_s))


def overrides(work: Path, steps: int, *extra: str) -> list[str]:
    """The chaos runs' settings: cpu-tiny at k = 0 (an `extra` train.max_staleness overrides it), the
    multiprocess engine, a checkpoint every step."""
    return [
        f"train.steps={steps}",
        f"train.output_dir={work / 'out'}",
        f"checkpoint.dir={work / 'checkpoints'}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        f"data.cache_dir={ROOT / '.cache' / 'vqr1'}",
        "train.max_staleness=0",
        "checkpoint.every=1",
        "checkpoint.keep_last=2",
        "eval.max_images=4",
        "rollout.in_process_engine=false",
        "rollout.reproducible_batches=true",
        *extra,
    ]


# --- the processes of a run --------------------------------------------------------------------------


def processes_of(pid: int, actor_class: str) -> list:
    """The processes of `actor_class` actors started by the driver `pid` (Ray's workers are its
    descendants), never another Ray session's on the same machine."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if any(actor_class in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def kill(processes: list) -> list[int]:
    import psutil

    killed = []
    for process in processes:
        try:
            process.kill()
            killed.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    return killed


def kill_actors_of(pid: int, actor_class: str) -> list[int]:
    """SIGKILL every `actor_class` actor process of the run `pid`."""
    return kill(processes_of(pid, actor_class))


def kill_engine_cores_of(pid: int) -> list[int]:
    """SIGKILL the vLLM EngineCore processes under the rollout workers of the run `pid`
    (rollout.in_process_engine=false), leaving the workers' own processes alive."""
    import psutil

    cores = []
    for worker in processes_of(pid, "RolloutWorker"):
        try:
            children = worker.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for child in children:
            try:
                if "EngineCore" in child.name() or any("EngineCore" in part for part in child.cmdline()):
                    cores.append(child)
            except psutil.NoSuchProcess:
                continue
    return kill(cores)


def kill_process_tree(pid: int) -> list[int]:
    """SIGKILL the driver and everything it started (Ray's GCS, raylet and workers): a node that dies."""
    import psutil

    driver = psutil.Process(pid)
    return kill([*driver.children(recursive=True), driver])


def kill_one(pid: int, kind: str, rng: random.Random) -> list[int]:
    if kind == "rollout actor":
        return kill_actors_of(pid, "RolloutWorker")
    if kind == "engine process":
        return kill_engine_cores_of(pid)
    if kind == "reward actor":
        return kill_actors_of(pid, "RewardWorker")
    if kind == "learner rank":
        ranks = processes_of(pid, "LearnerWorker")
        return kill([rng.choice(ranks)]) if ranks else []
    if kind == "driver":
        return kill_process_tree(pid)
    raise ValueError(f"unknown fault kind {kind!r}; kinds: {', '.join(KINDS)}")


class Driver:
    """`python -m cluster.train --config cpu-tiny` running, its output collected line by line."""

    def __init__(self, run_overrides: list[str]) -> None:
        command = [sys.executable, "-m", "cluster.train", "--config", "cpu-tiny", *run_overrides]
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def wait(self, deadline: float) -> int:
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.process.poll() is None:
            kill_process_tree(self.process.pid)
            self.process.wait(timeout=60)
            raise TimeoutError("the run did not end in time\n" + self.output()[-3000:])
        self.reader.join(timeout=10)
        return self.process.returncode

    def output(self) -> str:
        return "".join(self.lines)


def wait_for_line(driver: Driver, prefix: str, seen: int, deadline: float) -> int | None:
    """The index of the first output line from `seen` on that starts with `prefix`, once it appears;
    None if the driver ended (or the deadline passed) first."""
    while time.monotonic() < deadline:
        lines = list(driver.lines)
        for index in range(seen, len(lines)):
            if lines[index].startswith(prefix):
                return index
        if driver.process.poll() is not None:
            return None
        time.sleep(0.1)
    return None


STEP_LINE = re.compile(r"step (\d+)/\d+ ")


def wait_for_step(driver: Driver, step: int, seen: int, lines: int, deadline: float) -> int | None:
    """The index of the first step line from `seen` on that is the `lines`-th step line from there or a
    later one, and of step `step` or later, once it appears; None if the driver ended (or the deadline
    passed) first."""
    while time.monotonic() < deadline:
        output = list(driver.lines)
        step_lines = [index for index in range(seen, len(output)) if STEP_LINE.match(output[index])]
        for count, index in enumerate(step_lines, start=1):
            if count >= lines and int(STEP_LINE.match(output[index])[1]) >= step:
                return index
        if driver.process.poll() is not None:
            return None
        time.sleep(0.1)
    return None


# --- one run, with faults or none --------------------------------------------------------------------


@dataclass
class RunResult:
    work: Path
    seconds: float
    output: str
    faults: list[Fault]
    code: int


def run_with_faults(
    work: Path, steps: int, faults: list[Fault], seed: int = 0, timeout_s: float = 3600, extra: tuple = ()
) -> RunResult:
    """Train in `work`, firing `faults` in order. Fault i waits, after fault i - 1 fired, for the second
    step line (the first step to start after the kill has met every process of the run, so the death is
    found first) and for the line of its step - 1 or a later one, then its delay; a fault of the same step
    as the one before follows it after the difference of their delays. A killed driver is started again
    with checkpoint.resume=true (its first step line is enough). Each fault records the step it hit."""
    rng = random.Random(seed)
    # Every fault may hit one role: the restart limit must not end the run.
    run_overrides = overrides(work, steps, f"cluster.max_restarts={max(3, len(faults))}", *extra)
    started = time.monotonic()
    deadline = started + timeout_s
    driver = Driver(run_overrides)
    outputs = []
    seen, lines, previous = 0, 1, None
    for fault in faults:
        if previous is not None and previous.step == fault.step and previous.kind != "driver":
            time.sleep(max(0.0, fault.delay_s - previous.delay_s))  # the same step as the fault before
            fault.hit_step = previous.hit_step
        else:
            at = wait_for_step(driver, fault.step - 1, seen, lines, deadline)
            if at is None:
                break  # the run ended (or failed) before the fault's step
            fault.hit_step = int(STEP_LINE.match(driver.lines[at])[1]) + 1
            time.sleep(fault.delay_s)
        previous = fault
        if driver.process.poll() is not None:
            break
        fault.killed = kill_one(driver.process.pid, fault.kind, rng)
        seen, lines = len(driver.lines), 2
        if fault.kind == "driver" and fault.killed:
            killed_at = time.monotonic()
            driver.wait(deadline)
            outputs.append(driver.output())
            driver = Driver([*run_overrides, "checkpoint.resume=true"])
            seen, lines = 0, 1
            if wait_for_line(driver, "resumed from ", 0, deadline) is not None:
                fault.recovery_s = round(time.monotonic() - killed_at, 1)
    code = driver.wait(deadline)
    outputs.append(driver.output())
    return RunResult(work, time.monotonic() - started, "\n".join(outputs), faults, code)


def final_weights_sha256(work: Path, steps: int) -> dict[str, str] | None:
    """sha256 of each weights file of the final checkpoint, from its manifest (None: there is none)."""
    path = work / "checkpoints" / f"step-{steps:06d}" / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return {name: entry["sha256"] for name, entry in manifest.items() if name.endswith(".safetensors")}


def replacement_events(work: Path) -> list[dict]:
    """Every replacement the driver recorded (MLflow tags events.replacement.<n>), over the chain of
    MLflow runs of the run (a restart or resume that went back opens a new one), each once."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    events = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            for key, value in run.data.tags.items():
                if key.startswith("events.replacement."):
                    events[value] = json.loads(value)
    return sorted(events.values(), key=lambda event: event["step"])


def driver_steps_redone(output: str) -> int:
    """Steps a killed driver had finished after the checkpoint its resume went on from."""
    redone, last = 0, 0
    for line in output.splitlines():
        finished = STEP_LINE.match(line)
        if finished:
            last = int(finished[1])
        resumed = re.match(r"resumed from .* at step (\d+)", line)
        if resumed:
            redone += max(0, last - int(resumed[1]))
    return redone


def compare(reference: RunResult, chaos: RunResult, steps: int) -> dict:
    """The verdict and the figures of a chaos run against its fault-free reference."""
    from cluster.checkpoints import read_trained_images

    events = replacement_events(chaos.work)
    injected = [fault for fault in chaos.faults if fault.killed]
    same_images = read_trained_images(chaos.work / "out") == read_trained_images(reference.work / "out")
    weights = final_weights_sha256(chaos.work, steps)
    same_weights = weights is not None and weights == final_weights_sha256(reference.work, steps)
    return {
        "holds": chaos.code == 0 and same_images and same_weights,
        "finished": chaos.code == 0,
        "same_trained_images": same_images,
        "same_final_weights": same_weights,
        "faults_planned": len(chaos.faults),
        "faults_injected": len(injected),
        "faults_survived": len(injected) if chaos.code == 0 else 0,
        "injected": [
            {
                "step": f.hit_step,
                "planned_step": f.step,
                "kind": f.kind,
                "delay_s": f.delay_s,
                "driver_recovery_s": f.recovery_s,
            }
            for f in injected
        ],
        "replacements": events,
        "steps_redone": sum(event["steps_redone"] for event in events) + driver_steps_redone(chaos.output),
        "reference_s": round(reference.seconds, 1),
        "chaos_s": round(chaos.seconds, 1),
        "wall_time_lost_s": round(chaos.seconds - reference.seconds, 1),
    }


# `--colocate`: each rollout worker shares its bundle with a learner rank and sleeps while it trains.
COLOCATED = (
    "cluster.placement=colocate",
    "cluster.colocate.sleep_level=2",
    "cluster.colocate.offload_learner_states=true",
)


def chaos_run(
    steps: int, faults: list[Fault], work: Path, seed: int = 0, max_staleness: int = 0, extra: tuple = ()
) -> tuple[dict, RunResult]:
    """The fault-free reference run, then the run with `faults`, both with the `extra` overrides; their
    comparison and the chaos run. The reference runs the in-process engine (it starts faster): with
    per-request seeds both engines draw the same completions."""
    settings = (f"train.max_staleness={max_staleness}", *extra)
    reference = run_with_faults(
        work / "reference", steps, [], extra=(*settings, "rollout.in_process_engine=true")
    )
    if reference.code != 0:
        raise RuntimeError("the fault-free run failed\n" + reference.output[-3000:])
    chaos = run_with_faults(work / "chaos", steps, faults, seed, extra=settings)
    return compare(reference, chaos, steps), chaos


def print_report(report: dict) -> None:
    print(f"\n{'kind':<16}{'step':>5}{'delay s':>9}")
    for fault in report["injected"]:
        print(f"{fault['kind']:<16}{fault['step']:>5}{fault['delay_s']:>9.2f}")
    print(f"\n{'replacement':<16}{'step':>5}  {'phase':<20}{'redone':>7}{'seconds':>9}  cause")
    for event in report["replacements"]:
        print(
            f"{event['role']:<16}{event['step']:>5}  {event['phase']:<20}{event['steps_redone']:>7}"
            f"{event.get('seconds', float('nan')):>9.1f}  {event['cause']}"
        )
    for fault in report["injected"]:
        if fault["driver_recovery_s"] is not None:
            print(f"driver killed at step {fault['step']}: resumed {fault['driver_recovery_s']:.1f}s later")
    print(
        f"\nfaults injected {report['faults_injected']} of {report['faults_planned']}, survived "
        f"{report['faults_survived']} | steps redone {report['steps_redone']} | wall time "
        f"{report['chaos_s']:.0f}s against {report['reference_s']:.0f}s fault-free "
        f"(lost {report['wall_time_lost_s']:.0f}s)"
    )
    print(
        f"trained images equal: {report['same_trained_images']} | final weights equal: "
        f"{report['same_final_weights']} | {'HOLDS' if report['holds'] else 'FAILS'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--faults", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="the schedule's seed")
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=1.0,
        help="faults land within this many seconds of a step's line (a cpu-tiny step takes about a second)",
    )
    parser.add_argument("--max-staleness", type=int, default=0, help="train.max_staleness k of both runs")
    parser.add_argument(
        "--colocate",
        action="store_true",
        help="both runs colocated (cluster.placement=colocate, sleep level 2, learner states offloaded)",
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for both runs (default: a temporary one)"
    )
    args = parser.parse_args(argv)
    faults = schedule(args.seed, args.steps, args.faults, args.step_seconds)
    work = args.work or Path(tempfile.mkdtemp(prefix="vqr1-chaos-"))
    extra = COLOCATED if args.colocate else ()
    report, _ = chaos_run(args.steps, faults, work, args.seed, args.max_staleness, extra)
    print_report(report)
    (work / "chaos.json").write_text(json.dumps(report, indent=1))
    print(f"report: {work / 'chaos.json'}")
    return 0 if report["holds"] else 1


if __name__ == "__main__":
    sys.exit(main())
