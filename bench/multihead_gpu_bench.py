#!/usr/bin/env python3
"""GPU benchmark of the multihead module: dilattn against the same module in PyTorch.

One command on a GPU machine; prints one table. Both sides compute X (1, N, E) -> q/k/v
projections -> LongNet dilated attention over H = 16 heads of D = 64 -> sub-layer norm -> out
projection, in bf16 with the same branches (w = 2048..32768, r = 1..16):

  dilattn           build/bench/cuda_multihead_bench: cuBLASLt projections with the bias in the
                    epilogue, the fused attention kernel, a layer-norm kernel
  torchscale        torchscale's DilatedAttention module as it runs: nn.Linear projections, its
                    attention (bench/gpu_bench.py's port, torch SDPA standing in for flash-attn),
                    inner_attn_ln, out_proj
  torchscale_lean   the same with gpu_bench.py's lean restatement of the attention

The attention-only columns come from the same runs (dilattn's from the bench, the peers' timed
alone on their own projections' outputs), so the projections' share shows on both sides.

  python3 bench/multihead_gpu_bench.py [--binary build/bench/cuda_multihead_bench]
                                        [--ns 32768,131072,524288]
"""

import argparse
import csv
import pathlib
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402  (the peers' attention ports and the timer)

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADS, DIM = 16, 64


def run_ours(binary, ns, iters):
    cmd = [binary, "--n", ",".join(map(str, ns)), "--heads", str(HEADS), "--dim", str(DIM),
           "--dtype", "bf16", "--norm", "1", "--iters", str(iters)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stdout + r.stderr)
    return {int(row["N"]): row for row in csv.DictReader(r.stdout.splitlines())}


def torch_module(attention):
    e = HEADS * DIM
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    lin = [(torch.randn(e, e, device=dev, generator=g, dtype=torch.bfloat16) * e ** -0.5,
            torch.randn(e, device=dev, generator=g, dtype=torch.bfloat16) * 0.1) for _ in range(4)]
    ln = torch.nn.LayerNorm(e, eps=1e-5, device=dev, dtype=torch.bfloat16)

    def forward(x):
        b, n, _ = x.shape
        q, k, v = (F.linear(x, w, bias).view(b, n, HEADS, DIM) for w, bias in lin[:3])
        a = attention(q, k, v, False).reshape(b, n, e)
        return F.linear(ln(a), *lin[3])

    def attention_only(x):
        b, n, _ = x.shape
        q, k, v = (F.linear(x, w, bias).view(b, n, HEADS, DIM) for w, bias in lin[:3])
        return lambda: attention(q, k, v, False)

    return forward, attention_only


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=str(ROOT / "build" / "bench" / "cuda_multihead_bench"))
    p.add_argument("--ns", default="32768,131072,524288")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ours = run_ours(args.binary, ns, args.iters * 2)
    rows = []
    for n in ns:
        o = ours[n]
        rows.append(("dilattn", n, float(o["ms"]), float(o["attention_ms"])))
        x = torch.randn(1, n, HEADS * DIM, device="cuda", dtype=torch.bfloat16)
        for name, attention in (("torchscale", gpu_bench.torchscale_longnet),
                                ("torchscale_lean", gpu_bench.torchscale_lean)):
            forward, attention_only = torch_module(attention)
            with torch.no_grad():
                ms = gpu_bench.time_cuda(lambda: forward(x), max(3, args.iters // 2))
                att = gpu_bench.time_cuda(attention_only(x), max(3, args.iters // 2))
            rows.append((name, n, ms, att))
            torch.cuda.empty_cache()
    print("| N | impl | ms | attention ms | projections + norm ms | dilattn speed-up |")
    print("|---|---|---|---|---|---|")
    for name, n, ms, att in rows:
        base = next(r[2] for r in rows if r[0] == "dilattn" and r[1] == n)
        speed = "" if name == "dilattn" else f"{ms / base:.2f}x"
        print(f"| {n} | {name} | {ms:.3f} | {att:.3f} | {ms - att:.3f} | {speed} |")


if __name__ == "__main__":
    main()
