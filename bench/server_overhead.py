#!/usr/bin/env python3
"""Server-side time of one large request against its kernel time, through the real server.

Starts dilattn-server, sends FP16 (or --datatype FP32) requests of (1, N, 16, 64) to the default
longnet model one at a time, and reads the statistics RPC: the server-side request time (from the
moment the message has arrived, so the wire is excluded, to the response), and its split into
queue, input (unpack, copies to the device), kernel (CUDA events around the launch) and output.

With --shm cuda the client keeps Q, K, V and O in one CUDA allocation that it shares with the
server through Triton's CUDA shared-memory extension (a model server on the same host does this),
so no tensor crosses the message or the PCIe bus. With --shm system they lie in one registered
POSIX region (the server pins it), so they cross the PCIe bus but not the message: the case that
runs long jobs in pieces (--pipeline-min-tokens; pass '--pipeline-min-tokens 0' in --server-args
to compare without).

  python3 bench/server_overhead.py [--server build/server/dilattn-server] [--device cuda]
                                   [--ns 32768,131072] [--reps 3] [--shm none|cuda|system]
                                   [--heads 16] [--datatype FP16|FP32] [--global-branch]
                                   [--server-args '...']

--global-branch sends LongNet's whole-sequence branch with each request: no cut then splits the
sequence into independent pieces, and a long job runs as launches over parts of its rows.
"""

import argparse
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
import cuda_ipc  # noqa: E402  (the client side of CUDA shared memory, by ctypes)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default=str(ROOT / "build" / "server" / "dilattn-server"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--ns", default="32768,131072")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--shm", choices=["none", "cuda", "system"], default="none")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--datatype", choices=["FP16", "FP32"], default="FP16")
    p.add_argument("--server-log", help="file for the server's log (default: discarded)")
    p.add_argument("--global-branch", action="store_true",
                   help="add LongNet's whole-sequence branch (w = N, r = N / 2048) to the default "
                        "branches, as request parameters")
    p.add_argument("--server-args", default="",
                   help="more server flags, e.g. '--sequence-parallel-min-tokens 524288'")
    args = p.parse_args()
    cudart = cuda_ipc.load_cudart() if args.shm == "cuda" else None
    if args.shm == "cuda" and cudart is None:
        sys.exit("--shm cuda needs the CUDA runtime library (libcudart) on the library path")
    proc = subprocess.Popen([args.server, "--grpc-port", "0", "--metrics-port", "-1",
                             "--bind-address", "127.0.0.1", "--device", args.device,
                             *args.server_args.split()],
                            stdout=subprocess.PIPE, text=True,
                            stderr=open(args.server_log, "w") if args.server_log
                            else subprocess.DEVNULL)
    port = int(re.search(r"grpc_port=(\d+)", proc.stdout.readline()).group(1))
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    where = {"none": "in the gRPC messages", "cuda": "in CUDA shared memory",
             "system": "in system shared memory"}[args.shm]
    print(f"tensors: {where}; server flags: {args.server_args or '(none)'}"
          + ("; with the whole-sequence branch" if args.global_branch else ""))
    print("| N | request ms (server) | queue | input | kernel | output | unaccounted | server / kernel | client ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for n in (int(x) for x in args.ns.split(",")):
            # Long inputs repeat one random block: the time does not depend on the values, and a
            # float64 draw of 2M tokens would take 16 GiB.
            block = min(n, 32768)
            dtype = np.float16 if args.datatype == "FP16" else np.float32
            x = np.random.default_rng(0).uniform(-1, 1, (1, block, args.heads, 64)).astype(dtype)
            x = np.tile(x, (1, -(-n // block), 1, 1))[:, :n]
            inputs = []
            outputs = None
            buf = None
            region = None
            if args.shm == "system":
                nbytes = x.nbytes
                region = shm.create_shared_memory_region(f"bench{n}", f"/dilattn_bench{n}",
                                                         4 * nbytes)
                shm.set_shared_memory_region(region, [x, x, x])
                c.register_system_shared_memory(f"bench{n}", f"/dilattn_bench{n}", 4 * nbytes)
                out = grpcclient.InferRequestedOutput("O")
                out.set_shared_memory(f"bench{n}", nbytes, offset=3 * nbytes)
                outputs = [out]
            if args.shm == "cuda":
                nbytes = x.nbytes
                buf = cuda_ipc.DeviceBuffer(cudart, 4 * nbytes)
                for i in range(3):
                    buf.write(x, offset=i * nbytes)
                c.register_cuda_shared_memory(f"bench{n}", buf.raw_handle(), 0, 4 * nbytes)
                out = grpcclient.InferRequestedOutput("O")
                out.set_shared_memory(f"bench{n}", nbytes, offset=3 * nbytes)
                outputs = [out]
            for i, name in enumerate("QKV"):
                t = grpcclient.InferInput(name, list(x.shape), args.datatype)
                if buf is not None or region is not None:
                    t.set_shared_memory(f"bench{n}", x.nbytes, offset=i * x.nbytes)
                else:
                    t.set_data_from_numpy(x)
                inputs.append(t)
            params = None
            if args.global_branch:
                params = {"segment_lengths": f"2048,4096,8192,16384,32768,{n}",
                          "dilation_rates": f"1,2,4,8,16,{max(1, n // 2048)}"}
            # warm-up: pools, module load
            c.infer("dilated_attention", inputs, outputs=outputs, parameters=params)
            rows = []
            for _ in range(args.reps):
                s0 = c.get_inference_statistics("dilated_attention").model_stats[0].inference_stats
                t0 = time.perf_counter()
                c.infer("dilated_attention", inputs, outputs=outputs, parameters=params)
                client = (time.perf_counter() - t0) * 1e3
                s1 = c.get_inference_statistics("dilated_attention").model_stats[0].inference_stats
                d = lambda f: (getattr(s1, f).ns - getattr(s0, f).ns) / 1e6
                rows.append((d("success"), d("queue"), d("compute_input"), d("compute_infer"),
                             d("compute_output"), client))
            r = sorted(rows)[len(rows) // 2]
            rest = r[0] - sum(r[1:5])
            print(f"| {n} | {r[0]:.2f} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | "
                  f"{rest:.2f} | {r[0] / r[3]:.2f} | {r[5]:.1f} |", flush=True)
            if buf is not None:
                c.unregister_cuda_shared_memory(f"bench{n}")
                buf.free()
            if region is not None:
                c.unregister_system_shared_memory(f"bench{n}")
                shm.destroy_shared_memory_region(region)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
