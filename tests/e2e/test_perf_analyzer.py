"""Triton's perf_analyzer, unmodified, against dilattn-server; its latency report is saved."""

import csv
import os
import pathlib
import subprocess

import numpy as np

from conftest import ROOT, results_dir


def perf_analyzer():
    home = pathlib.Path(os.environ.get("DILATTN_PERF_ANALYZER_HOME",
                                       ROOT / "third_party" / "perf_analyzer"))
    binary = home / "bin" / "perf_analyzer"
    assert binary.exists(), f"{binary} is missing; run ./setup.sh"
    env = dict(os.environ, LD_LIBRARY_PATH=f"{home / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    return str(binary), env


def write_input_data(directory, shape, seed=0):
    """perf_analyzer's default random data is random bytes (NaN and 1e38 among them); real
    attention inputs are moderate floats. A directory of raw files named after the inputs."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in "QKV":
        rng.uniform(-1, 1, shape).astype(np.float32).tofile(directory / name)
    return directory


def test_perf_analyzer_runs_and_reports(server, tmp_path):
    binary, env = perf_analyzer()
    report = results_dir() / "perf_analyzer.csv"
    data = write_input_data(tmp_path / "inputs", (1, 256, 4, 32))
    cmd = [binary, "-m", "dilated_attention", "-u", server.url, "-i", "grpc",
           "--input-data", str(data),
           "--shape", "Q:256,4,32", "--shape", "K:256,4,32", "--shape", "V:256,4,32",
           "--concurrency-range", "1:4:3", "--measurement-interval", "1000",
           "--max-trials", "4", "--stability-percentage", "100", "-f", str(report)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    (results_dir() / "perf_analyzer.txt").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Throughput" in r.stdout
    with open(report) as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["Concurrency"] for row in rows) == ["1", "4"]
    for row in rows:
        assert float(row["Inferences/Second"]) > 0
        assert int(row["p99 latency"]) >= int(row["p50 latency"]) > 0


def test_perf_analyzer_system_shared_memory(server, tmp_path):
    """perf_analyzer's own shared-memory mode: it registers a region per tensor, and the server
    reads inputs from and writes outputs to them."""
    binary, env = perf_analyzer()
    data = write_input_data(tmp_path / "inputs", (1, 256, 4, 32))
    cmd = [binary, "-m", "dilated_attention", "-u", server.url, "-i", "grpc",
           "--input-data", str(data), "--shared-memory", "system",
           "--output-shared-memory-size", str(256 * 4 * 32 * 4),
           "--shape", "Q:256,4,32", "--shape", "K:256,4,32", "--shape", "V:256,4,32",
           "--concurrency-range", "2", "--measurement-interval", "1000",
           "--max-trials", "4", "--stability-percentage", "100"]
    before = server.client().get_inference_statistics("dilated_attention")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    (results_dir() / "perf_analyzer_shm.txt").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Throughput" in r.stdout
    after = server.client().get_inference_statistics("dilated_attention")
    done = lambda s: s.model_stats[0].inference_stats.success.count
    fail = lambda s: s.model_stats[0].inference_stats.fail.count
    assert done(after) > done(before)
    assert fail(after) == fail(before)
    # perf_analyzer unregisters what it registered.
    assert not server.client().get_system_shared_memory_status().regions
