"""The single-node default (no cluster.address, no RAY_ADDRESS) starts Ray so that every process it
starts listens on loopback only: nothing of a `make train` run is reachable from the network."""

from __future__ import annotations

import ipaddress

from configs.runtime_env import apply_default_env

apply_default_env()

import psutil  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402

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


def _listening(processes: list[psutil.Process]) -> list[tuple[int, str, str, int]]:
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
    sockets = _listening(_ray_processes(ray.get_runtime_context().get_session_name()))
    names = {name for _, name, _, _ in sockets}
    # The sweep saw the servers it is meant to judge, not an empty list.
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), sockets
    assert any("Trivial" in n for n in names), sockets
    exposed = [s for s in sockets if not _is_loopback(s[2])]
    assert not exposed, "listening beyond loopback (pid, process, address, port):\n" + "\n".join(
        map(str, exposed)
    )
