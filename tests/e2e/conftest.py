"""Fixtures: the real dilattn-server binary on free ports, and clients for it.

DILATTN_SERVER_BIN overrides the binary (default: build/server/dilattn-server);
DILATTN_E2E_DEVICE picks the backend (--device; default cpu, 'cuda' on a GPU machine);
DILATTN_E2E_RESULTS names a directory for artifacts such as perf_analyzer reports.
"""

import os
import pathlib
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient

ROOT = pathlib.Path(__file__).resolve().parents[2]


def server_binary():
    path = os.environ.get("DILATTN_SERVER_BIN", str(ROOT / "build" / "server" / "dilattn-server"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"server binary {path} is missing; build first (./setup.sh --no-serve)")
    return path


def results_dir():
    path = pathlib.Path(os.environ.get("DILATTN_E2E_RESULTS", ROOT / "build" / "e2e-results"))
    path.mkdir(parents=True, exist_ok=True)
    return path


class ServerProcess:
    """dilattn-server started on free ports; its log goes to a file under the results dir."""

    def __init__(self, *args, name="server", binary=None, env=None):
        self.log_path = results_dir() / f"{name}.log"
        self.log = open(self.log_path, "w")
        device = os.environ.get("DILATTN_E2E_DEVICE", "cpu")
        cmd = [binary or server_binary(), "--grpc-port", "0", "--metrics-port", "0",
               "--bind-address", "127.0.0.1", "--device", device, *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)
        line = self.proc.stdout.readline()
        match = re.search(r"grpc_port=(\d+) metrics_port=(-?\d+)", line)
        if not match:
            self.proc.kill()
            self.log.flush()
            raise RuntimeError(f"server did not start: {line!r}; log: {self.log_path.read_text()}")
        self.grpc_port = int(match.group(1))
        self.metrics_port = int(match.group(2))
        self.url = f"127.0.0.1:{self.grpc_port}"
        # Keep draining stdout so the server never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def client(self):
        return grpcclient.InferenceServerClient(self.url)

    def metrics_text(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def http_get(self, path):
        """(status, body) of GET `path` on the metrics port."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}",
                                        timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name, **labels):
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def alive(self):
        return self.proc.poll() is None


def repository_server(root, models, name, *args):
    """A server over a model repository written under `root` (a directory): `models` maps each
    model's name to its config.pbtxt without the name line."""
    for model, text in models.items():
        (root / model).mkdir()
        (root / model / "config.pbtxt").write_text(f'name: "{model}"\n{text}')
    return ServerProcess("--model-repository", str(root), *args, name=name)

@pytest.fixture(scope="module")
def server():
    s = ServerProcess(name="default-models")
    yield s
    assert s.stop() == 0, s.log_path.read_text()


@pytest.fixture
def client(server):
    return server.client()


def wait_until(predicate, timeout=10.0, interval=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
