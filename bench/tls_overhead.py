#!/usr/bin/env python3
"""What TLS costs a request that carries its tensors in the message: dilattn-client's bench
against the same server binary over plaintext and over TLS (a fresh P-256 CA and server
certificate from openssl), for requests of a few sizes, on loopback. The operator is chosen cheap
(one 64-token segment) so that what is timed is mostly moving the bytes, which is what TLS
encrypts; prints one table.

  python3 bench/tls_overhead.py [--server build/server/dilattn-server]
                                [--client build/client/dilattn-client] [--device auto]
                                [--tokens 4096,65536,262144] [--concurrency 1,4] [--duration 5]
"""

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from pki import Pki  # noqa: E402  (the TLS tests' certificates)

HEADS, DIM = 8, 64


def start_server(args, extra):
    proc = subprocess.Popen([args.server, "--grpc-port", "0", "--metrics-port", "-1",
                             "--bind-address", "127.0.0.1", "--device", args.device, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    match = re.search(r"grpc_port=(\d+)", proc.stdout.readline())
    if not match:
        proc.kill()
        sys.exit("the server did not start")
    return proc, f"127.0.0.1:{match.group(1)}"


def bench(args, url, tokens, concurrency, tls_args):
    out = subprocess.run([args.client, "bench", "--url", url, *tls_args, "--shape",
                          f"1,{tokens},{HEADS},{DIM}", "--dtype", "fp16", "--param",
                          "segment_lengths=64", "--param", "dilation_rates=1", "--concurrency",
                          str(concurrency), "--duration", str(args.duration)],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    rate = float(re.search(r"throughput: (\S+) req/s", out).group(1))
    p50 = float(re.search(r"p50 (\S+)", out).group(1))
    return rate, p50


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default=str(ROOT / "build" / "server" / "dilattn-server"))
    p.add_argument("--client", default=str(ROOT / "build" / "client" / "dilattn-client"))
    p.add_argument("--device", default="auto")
    p.add_argument("--tokens", default="4096,65536,262144")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--duration", type=float, default=5)
    args = p.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        pki = Pki(pathlib.Path(tmp), "bench")
        ca = pki.ca
        cert, key = pki.server()
        results = {}
        for mode, extra, client_tls in (
                ("plaintext", [], []),
                ("tls", ["--grpc-server-cert", str(cert), "--grpc-server-key", str(key)],
                 ["--tls-ca", str(ca)])):
            proc, url = start_server(args, extra)
            try:
                for n in tokens:
                    for c in levels:
                        results[mode, n, c] = bench(args, url, n, c, client_tls)
            finally:
                proc.terminate()
                proc.wait(timeout=120)
    print("| tokens | MiB in + out | concurrency | plaintext req/s | TLS req/s | TLS / plaintext "
          "| plaintext p50 ms | TLS p50 ms | plaintext GB/s | TLS GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in tokens:
        mib = 4 * n * HEADS * DIM * 2 / 2**20  # Q, K, V in and O out, fp16
        for c in levels:
            (pr, pp), (tr, tp) = results["plaintext", n, c], results["tls", n, c]
            print(f"| {n} | {mib:.0f} | {c} | {pr:.1f} | {tr:.1f} | {tr / pr:.2f} | {pp:.1f} "
                  f"| {tp:.1f} | {pr * mib * 2**20 / 1e9:.2f} | {tr * mib * 2**20 / 1e9:.2f} |")


if __name__ == "__main__":
    main()
