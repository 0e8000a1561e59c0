#!/usr/bin/env python3
"""Serving benchmark: perf_analyzer against dilattn-server, one table.

For each shape and concurrency, runs Triton's perf_analyzer (unmodified) on the model and prints
client throughput and latency percentiles next to the server's own split of its time: mean
request time, mean compute (kernel) time, and the server overhead, request minus compute, as a
mean (from the statistics RPC) and a median (from the dilattn_request_overhead_seconds histogram),
with the mean time spent queued (waiting for the engine) shown on its own; and where the engine
threads' time went (dilattn_engine_seconds_total): the share busy, in Executor::Start (planning,
leasing, issuing; the CPU path computes there), waiting for the device, and completing requests,
and the busy time per batch.

Then, with --release-seconds R, the server's resident memory: its peak, after the last run, and
once the pools' idle release (the server's --pool-idle-release-seconds R, and the heap trim that
follows it) has run, so that allocator settings (--server-args '--malloc-arenas 1', or glibc's
environment variables) can be compared on what a server keeps after a load as well as on speed.

  .venv/bin/python bench/serve_bench.py [--device cpu|cuda] [--shapes 4096,8,64 512,8,64]
                                        [--concurrency 1 4 16] [--window-ms 5000]
                                        [--server-args '...'] [--release-seconds R]
"""

import argparse
import csv
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import tritonclient.grpc as grpcclient  # noqa: E402
from test_perf_analyzer import write_input_data  # noqa: E402


def start_server(binary, device, extra_args, log):
    proc = subprocess.Popen([binary, "--grpc-port", "0", "--metrics-port", "0", "--bind-address",
                             "127.0.0.1", "--device", device, *extra_args], stdout=subprocess.PIPE,
                            stderr=log, text=True)
    line = proc.stdout.readline()
    m = re.search(r"grpc_port=(\d+) metrics_port=(\d+)", line)
    if not m:
        proc.kill()
        sys.exit(f"server did not start: {line!r}")
    return proc, int(m.group(1)), int(m.group(2))


def metrics_text(metrics_port):
    return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()


def histogram(metrics_port, name, model):
    text = metrics_text(metrics_port)
    buckets = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{") and f'model="{model}"' in line:
            le = re.search(r'le="([^"]+)"', line).group(1)
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def median_from(before, after):
    """Median of the observations between two scrapes, interpolated within its bucket."""
    diff = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = diff[-1][1]
    if total <= 0:
        return float("nan")
    lower, below = 0.0, 0.0
    for le, cumulative in diff:
        if cumulative >= total / 2:
            if le == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (le - lower) * ((total / 2 - below) / inside if inside else 1.0)
        lower, below = le, cumulative
    return lower


def resident_mib(pid):
    """(current, peak) resident memory of a process, MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def pools_empty(metrics_port):
    """True when no buffer pool holds a byte (leased or cached)."""
    text = metrics_text(metrics_port)
    held = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("dilattn_buffer_pool_bytes{") and 'state="held"' in line]
    return bool(held) and not any(held)


def engine_seconds(metrics_port):
    """{phase: seconds summed over the devices' engine threads}."""
    phases = {}
    for m in re.finditer(r'^dilattn_engine_seconds_total\{[^}]*phase="(\w+)"[^}]*\} (\S+)$',
                         metrics_text(metrics_port), re.MULTILINE):
        phases[m.group(1)] = phases.get(m.group(1), 0.0) + float(m.group(2))
    return phases


def stats(client, model):
    s = client.get_inference_statistics(model).model_stats[0]
    i = s.inference_stats
    return s.execution_count, i.success.count, i.success.ns, i.compute_infer.ns, i.queue.ns


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default=str(ROOT / "build" / "server" / "dilattn-server"))
    p.add_argument("--perf-analyzer-home", default=str(ROOT / "third_party" / "perf_analyzer"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="dilated_attention")
    p.add_argument("--dtype", default="FP32")
    p.add_argument("--shapes", nargs="+", default=["4096,8,64", "512,8,64"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--window-ms", type=int, default=5000)
    p.add_argument("--server-args", default="", help="more flags for the server, one string")
    p.add_argument("--release-seconds", type=int, default=0,
                   help="the server's --pool-idle-release-seconds; > 0: report resident memory")
    args = p.parse_args()
    extra = shlex.split(args.server_args)
    if args.release_seconds > 0:
        extra += ["--pool-idle-release-seconds", str(args.release_seconds)]

    home = pathlib.Path(args.perf_analyzer_home)
    env = dict(os.environ, LD_LIBRARY_PATH=f"{home / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, open(pathlib.Path(tmp) / "server.log", "w") as log:
        proc, port, metrics_port = start_server(args.server, args.device, extra, log)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            for shape in args.shapes:
                n, h, d = (int(x) for x in shape.split(","))
                mib = n * h * d * {"FP32": 4, "FP16": 2, "BF16": 2}[args.dtype] / 2**20
                for c in args.concurrency:
                    report = pathlib.Path(tmp) / f"pa_{n}_{c}.csv"
                    before = stats(client, args.model)
                    hist_before = histogram(metrics_port, "dilattn_request_overhead_seconds", args.model)
                    engine_before = engine_seconds(metrics_port)
                    cmd = [str(home / "bin" / "perf_analyzer"), "-m", args.model, "-i", "grpc",
                           "-u", f"127.0.0.1:{port}", "--concurrency-range", str(c),
                           "--measurement-interval", str(args.window_ms), "--max-trials", "6",
                           "--stability-percentage", "50", "-f", str(report)]
                    data = pathlib.Path(tmp) / f"inputs_{n}_{h}_{d}"
                    if not data.exists():
                        write_input_data(data, (1, n, h, d))
                    cmd += ["--input-data", str(data)]
                    for t in "QKV":
                        cmd += ["--shape", f"{t}:{n},{h},{d}"]
                    if args.dtype != "FP32":
                        sys.exit("perf_analyzer sends the model's declared type (FP32 here)")
                    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if r.returncode != 0:
                        sys.exit(r.stdout + r.stderr)
                    after = stats(client, args.model)
                    hist_after = histogram(metrics_port, "dilattn_request_overhead_seconds", args.model)
                    engine_after = engine_seconds(metrics_port)
                    spent = {k: engine_after[k] - engine_before.get(k, 0.0) for k in engine_after}
                    wall = max(sum(spent.values()), 1e-9)  # every thread's, over all trials
                    with open(report) as f:
                        row = next(csv.DictReader(f))
                    count = after[1] - before[1]
                    request_us = (after[2] - before[2]) / count / 1e3
                    compute_us = (after[3] - before[3]) / count / 1e3
                    rows.append({
                        "shape": f"[1,{n},{h},{d}] ({mib:.0f} MiB/tensor)", "c": c,
                        "infer/s": float(row["Inferences/Second"]),
                        "p50 ms": int(row["p50 latency"]) / 1e3,
                        "p99 ms": int(row["p99 latency"]) / 1e3,
                        "batch": count / max(1, after[0] - before[0]),
                        "request us": request_us, "compute us": compute_us,
                        "queue mean us": (after[4] - before[4]) / count / 1e3,
                        "overhead mean us": request_us - compute_us,
                        "overhead p50 us": median_from(hist_before, hist_after) * 1e6,
                        # Where the engine threads' time went over the same trials (per thread,
                        # averaged over the devices): busy is everything but idle.
                        "engine busy %": 100 * (1 - spent.get("idle", 0.0) / wall),
                        "start %": 100 * spent.get("start", 0.0) / wall,
                        "wait %": 100 * spent.get("wait", 0.0) / wall,
                        "complete %": 100 * spent.get("complete", 0.0) / wall,
                        "engine us/batch": 1e6 * (wall - spent.get("idle", 0.0))
                                           / max(1, after[0] - before[0]),
                    })
                    print(f"done: {rows[-1]['shape']} concurrency {c}", file=sys.stderr)
            if args.release_seconds > 0:
                after_load, peak = resident_mib(proc.pid)
                # The release runs within 1.5 x its period of the last job; the trim after it.
                deadline = time.monotonic() + 2 * args.release_seconds + 30
                while not pools_empty(metrics_port) and time.monotonic() < deadline:
                    time.sleep(1)
                time.sleep(min(args.release_seconds, 10))
                idle, _ = resident_mib(proc.pid)
                memory = (f"server resident memory, MiB: peak {peak:.0f}, after the last run "
                          f"{after_load:.0f}, after the idle release {idle:.0f}"
                          + ("" if pools_empty(metrics_port) else " (pools not yet empty)"))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) and k.endswith("ms")
                                else f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k])
                                for k in cols) + " |")
    if args.release_seconds > 0:
        print(memory)


if __name__ == "__main__":
    main()
