"""A short run of bench/soak.py: mixed traffic from several threads (valid, cancelled, long,
malformed, shared-memory, native-stream, dropped and bidirectional calls), every answer judged,
the pools empty once idle, memory flat between two idle points, and a clean SIGTERM exit with no
error in the server's log. The script runs for minutes when started by hand."""

import os
import subprocess
import sys

from conftest import ROOT, results_dir, server_binary


def test_soak_briefly():
    log = results_dir() / "soak-server.log"
    cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--server", server_binary(),
           "--device", os.environ.get("DILATTN_E2E_DEVICE", "cpu"), "--minutes", "0.4",
           "--workers", "3", "--sample-seconds", "4", "--log", str(log)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "soak: passed" in run.stdout, (
        f"{run.stdout}\n{run.stderr[-4000:]}\nserver log: {log}")
    assert "| infer |" in run.stdout and "| bad |" in run.stdout
