#!/usr/bin/env python3
"""The native chunked stream (dilattn.v1 Attend) against one KServe ModelInfer message, through
the real server and the C++ client (dilattn-client), one problem at a time.

For each N: the unary request's end-to-end time (when Q, K and V fit in one message), and the
stream's time to its first output chunk and to its last. Prints one markdown table.

  python3 bench/stream_bench.py [--server build/server/dilattn-server]
                                [--client build/client/dilattn-client] [--device cpu]
                                [--ns 16384,65536] [--heads 8] [--dim 64] [--dtype fp32]
                                [--chunk-mib 4] [--reps 3]
"""

import argparse
import pathlib
import re
import statistics
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        m = re.search(r"(infer|attend) failed: (\w+)", out.stderr)
        return None, m.group(2) if m else "failed"
    return out.stdout, None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--server", default=str(ROOT / "build" / "server" / "dilattn-server"))
    p.add_argument("--client", default=str(ROOT / "build" / "client" / "dilattn-client"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--ns", default="16384,65536")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--chunk-mib", default="4")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    server = subprocess.Popen([args.server, "--grpc-port", "0", "--metrics-port", "-1",
                               "--bind-address", "127.0.0.1", "--device", args.device],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(re.search(r"grpc_port=(\d+)", server.stdout.readline()).group(1))
        url = f"127.0.0.1:{port}"
        print(f"server --device {args.device}; H = {args.heads}, D = {args.dim}, {args.dtype}, "
              f"default branches, medians of {args.reps}\n")
        print("| N | unary ms | stream: stretch | first output ms | all ms | all / unary |")
        print("|---|---|---|---|---|---|")
        for n in (int(x) for x in args.ns.split(",")):
            common = ["--url", url, "--shape", f"1,{n},{args.heads},{args.dim}", "--dtype",
                      args.dtype]
            unary, stream_first, stream_all, stretch, note = [], [], [], "", ""
            for _ in range(args.reps + 1):  # the first round warms the pool and the plan cache
                out, err = run([args.client, "infer", *common])
                if out:
                    unary.append(float(re.search(r"in ([\d.]+) ms", out).group(1)))
                else:
                    note = err
                out, err = run([args.client, "attend", *common, "--chunk-mib", args.chunk_mib])
                if not out:
                    raise SystemExit(f"attend failed at N = {n}: {err}")
                m = re.search(r"stretches of (\d+) tokens, first output after ([\d.]+) ms, "
                              r"all in ([\d.]+) ms", out)
                stretch = m.group(1)
                stream_first.append(float(m.group(2)))
                stream_all.append(float(m.group(3)))
            u = statistics.median(unary[1:]) if len(unary) > 1 else None
            a = statistics.median(stream_all[1:])
            print(f"| {n} | {f'{u:.1f}' if u else 'refused: ' + note} | {stretch} | "
                  f"{statistics.median(stream_first[1:]):.1f} | {a:.1f} | "
                  f"{f'{a / u:.2f}' if u else '-'} |")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
