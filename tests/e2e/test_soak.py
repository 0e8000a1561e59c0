"""A short run of bench/soak.py: mixed traffic from several threads (valid, cancelled, long,
malformed, shared-memory, native-stream, dropped and bidirectional calls to one server, bursts of
scheduled requests to a second), every answer judged, the pools empty once idle, memory flat
between two idle points, and a clean SIGTERM exit with no error in the servers' logs. The script
runs for minutes when started by hand."""

import os
import signal
import subprocess
import sys

from conftest import ROOT, results_dir, server_binary


def test_soak_briefly():
    log = results_dir() / "soak-server.log"
    cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--server", server_binary(),
           "--device", os.environ.get("DILATTN_E2E_DEVICE", "cpu"), "--minutes", "0.4",
           "--workers", "3", "--sample-seconds", "4", "--server-args", "--malloc-arenas 1",
           "--log", str(log)]
    # One malloc arena: glibc keeps the free top of every other arena resident beyond
    # malloc_trim's reach (up to the trim threshold each: 8 MiB by default, 64 MiB with glibc's
    # rising thresholds, which once made 71 MiB of growth between the idle points of this run in
    # CI), filling as threads take arenas. With one, growth is what the server holds
    # (docs/BENCHMARKS.md, "Resident memory after load").
    # Its own process group, servers included, so that a timeout leaves no process behind.
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        stdout, stderr = run.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        stdout, stderr = run.communicate()
        raise AssertionError(f"the soak ran past 600 s\n{stdout}\n{stderr[-4000:]}")
    except BaseException:  # interrupted: the process group goes too
        os.killpg(run.pid, signal.SIGKILL)
        raise
    assert run.returncode == 0 and "soak: passed" in stdout, (
        f"{stdout}\n{stderr[-4000:]}\nserver log: {log}")
    for action in ("infer", "bad", "scheduled"):
        assert f"| {action} |" in stdout, f"{action} never ran\n{stdout}"
