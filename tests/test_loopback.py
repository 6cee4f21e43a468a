"""The single-node default (no cluster.address, no RAY_ADDRESS) starts Ray so that every process it
starts listens on loopback only: nothing of a `make train` run is reachable from the network."""

from __future__ import annotations

import ipaddress

from configs.runtime_env import apply_default_env

apply_default_env()

import psutil  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
from conftest import WATCHED_RUN_STEPS, listening_sockets  # noqa: E402

from cluster.system import start_ray  # noqa: E402
from configs.load import load_config  # noqa: E402


@ray.remote(num_cpus=0)
class Trivial:
    def ping(self) -> str:
        return "pong"


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    # A dual-stack socket bound to ::ffff:127.0.0.1 is 127.0.0.1: it accepts loopback connections only.
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _ray_processes(session_name: str) -> list[psutil.Process]:
    """This driver, every process under it, and any process whose command line names this session
    (a process the raylet started may be re-parented away from us)."""
    me = psutil.Process()
    found = {p.pid: p for p in [me, *me.children(recursive=True)]}
    for process in psutil.process_iter(["cmdline"]):
        if session_name in " ".join(process.info["cmdline"] or []):
            found.setdefault(process.pid, process)
    return list(found.values())


@pytest.fixture
def local_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = load_config("cpu-tiny")
    assert config.cluster.address is None
    start_ray(config, apply_default_env())
    try:
        yield
    finally:
        ray.shutdown()


def test_every_process_of_the_local_ray_listens_on_loopback_only(local_ray):
    actor = Trivial.remote()
    assert ray.get(actor.ping.remote(), timeout=120) == "pong"  # a worker process now exists
    sockets = listening_sockets(_ray_processes(ray.get_runtime_context().get_session_name()))
    names = {name for _, name, _, _ in sockets}
    # The sweep saw the servers it is meant to judge, not an empty list.
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), sockets
    assert any("Trivial" in n for n in names), sockets
    exposed = [s for s in sockets if not _is_loopback(s[2])]
    assert not exposed, "listening beyond loopback (pid, process, address, port):\n" + "\n".join(
        map(str, exposed)
    )


@pytest.mark.slow
def test_nothing_of_a_training_run_listens_beyond_loopback_while_its_steps_run(watched_train_run):
    """A cpu-tiny run as a user starts it, its listening sockets sampled from start-up to the end, back
    to back while the training steps run: every socket of the command and of every process under it (Ray's
    servers, the rollout worker, the reward actor, the learner ranks with their torch.distributed store and
    gloo) is bound to loopback."""
    run = watched_train_run
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    # Samples while the steps ran (after step 1's line, before the last one's), the learners' sockets
    # among them.
    during = [sockets for steps, sockets in run.samples if 1 <= steps < WATCHED_RUN_STEPS]
    assert during, f"no sample while the steps ran ({len(run.samples)} samples)"
    names = {name for sockets in during for _, name, _, _ in sockets}
    assert any("LearnerWor" in name for name in names), names  # a process name may be cut at 15
    exposed = sorted({s for _, sockets in run.samples for s in sockets if not _is_loopback(s[2])})
    assert not exposed, "listening beyond loopback (pid, process, address, port):\n" + "\n".join(
        map(str, exposed)
    )
