"""Screenshots of a run's "Model metrics" and "System metrics" tabs in MLflow's UI, for docs/.

    python -m bench.screenshot_mlflow [--tracking-uri sqlite:////abs/mlflow.db] [--run-id ID] [--out docs]

Serves the store with `mlflow ui` on a free loopback port, opens both tabs of the run (default: the
newest finished run of the experiment `visualquality-r1`) in MLflow's model-training view with headless
Chromium (Debian's `chromium`: `apt-get install chromium`), waits until their charts are drawn, and
writes `mlflow-training.png` and `mlflow-system.png` to --out. Server and browser are stopped afterwards.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TABS = {"model-metrics": "mlflow-training.png", "system-metrics": "mlflow-system.png"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def newest_run(tracking_uri: str, experiment: str) -> tuple[str, str]:
    """(experiment id, run id) of the experiment's newest FINISHED run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"{tracking_uri}: no experiment named {experiment!r}")
    runs = client.search_runs(
        [found.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"]
    )
    if not runs:
        raise SystemExit(f"{tracking_uri}: experiment {experiment!r} has no finished run")
    return found.experiment_id, runs[0].info.run_id


def run_page(port: int, experiment_id: str, run_id: str, tab: str) -> str:
    # workflowType: MLflow 3.17's UI otherwise opens in its GenAI view, whatever the experiment's kind.
    return (
        f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{run_id}/{tab}"
        "?workflowType=machine_learning"
    )


def wait_until_serving(port: int, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow ui exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"mlflow ui did not answer on port {port} within {timeout:g} s")


class Browser:
    """Headless Chromium driven over the DevTools protocol (the `websockets` client that vLLM's server
    dependencies bring): real waits for the page's charts, which load after the page does."""

    def __init__(self, executable: str, size: tuple[int, int]) -> None:
        self.profile = tempfile.TemporaryDirectory(prefix="vqr1-chromium-")
        self.process = subprocess.Popen(
            [
                executable,
                "--headless=new",
                "--no-sandbox",  # root in a container
                "--disable-gpu",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",  # it writes the port it took into the profile folder
                f"--user-data-dir={self.profile.name}",
                f"--window-size={size[0]},{size[1]}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.size = size
        self.calls = 0
        self.closing = contextlib.ExitStack()

    def __enter__(self) -> Browser:
        from websockets.sync.client import connect

        active = Path(self.profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.is_file() and active.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit("headless Chromium did not start")
            time.sleep(0.2)
        port = int(active.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            page = next(target for target in json.load(answer) if target["type"] == "page")
        self.socket = self.closing.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None))
        width, height = self.size
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return self

    def __exit__(self, *exc) -> None:
        self.closing.close()
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)
        self.profile.cleanup()

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # events arrive in between; only the answer counts
            message = json.loads(self.socket.recv(timeout=120))
            if message.get("id") == self.calls:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 60
        while self.evaluate("document.readyState") != "complete" and time.monotonic() < deadline:
            time.sleep(0.5)

    def wait_for_charts(self, timeout: float) -> int:
        """Wait until the page shows charts and their number has not grown for 10 s; returns it."""
        deadline, count, steady_since = time.monotonic() + timeout, -1, time.monotonic()
        while time.monotonic() < deadline:
            now = self.evaluate("document.querySelectorAll('.js-plotly-plot').length") or 0
            if now != count:
                count, steady_since = now, time.monotonic()
            elif count > 0 and time.monotonic() - steady_since > 10:
                break
            time.sleep(1)
        time.sleep(2)  # the last chart's drawing
        return count

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))


def take_screenshots(
    executable: str, port: int, experiment_id: str, run_id: str, out: Path, size, timeout
) -> None:
    with Browser(executable, size) as browser:
        # Without this MLflow 3.17 opens its assistant panel over a third of the page on a first visit.
        browser.open(f"http://127.0.0.1:{port}/")
        browser.evaluate(
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
        )
        for tab, name in TABS.items():
            browser.open(run_page(port, experiment_id, run_id, tab))
            charts = browser.wait_for_charts(timeout)
            browser.screenshot(out / name)
            print(f"{out / name}: run {run_id}, {tab}, {charts} charts drawn")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    parser.add_argument("--experiment", default="visualquality-r1")
    parser.add_argument("--run-id", help="default: the experiment's newest finished run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=2450, help="tall enough for every role of a 1 + 1 run")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for a tab's charts")
    args = parser.parse_args(argv)

    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        raise SystemExit("no headless browser found: apt-get install chromium")
    if args.run_id:
        import mlflow

        experiment_id = mlflow.MlflowClient(args.tracking_uri).get_run(args.run_id).info.experiment_id
        run_id = args.run_id
    else:
        experiment_id, run_id = newest_run(args.tracking_uri, args.experiment)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [
            str(mlflow_cli),
            "ui",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            args.tracking_uri,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers in one process group, stopped together below
    )
    try:
        wait_until_serving(port, server)
        take_screenshots(
            browser, port, experiment_id, run_id, args.out, (args.width, args.height), args.timeout
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
