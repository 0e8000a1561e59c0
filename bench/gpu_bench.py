#!/usr/bin/env python3
"""GPU benchmark: dilattn's fused kernel against dense SDPA and both peers' algorithms.

One command on a GPU machine; prints one table and writes a CSV and a PNG plot. Every
implementation computes the same operator (bf16, B = 1, attention core only) and is timed with
CUDA events (median of repeated runs after warm-up) in the same process run:

  dilattn      build/bench/cuda_attention_bench (the fused kernel, one launch for all branches)
  torchscale   Microsoft torchscale's LongNet algorithm in PyTorch: per branch, gather each
               head group's strided rows of every segment, dense attention (torch SDPA's flash
               kernel, returning the log-sum-exp), scatter back, then merge the branches by their
               softmax denominators (longnet mode only)
  dap          dilated-attention-pytorch's algorithm: each head group gathers its branch's
               strided rows, torch SDPA stands in for xformers/flash-attn, scatter back
               (head_groups mode only; its output normalisation bug is not reproduced)
  sdpa_dense   torch SDPA on the whole sequence (the dense attention roofline), N <= 128K only:
               its rate does not depend on N and larger N take minutes

Effective TFLOP/s use DESIGN.md's formula, 4 * N * w * D / r^2 per branch and head (halved
with causal), for every implementation, dense included (4 * N^2 * D per head).

  python3 bench/gpu_bench.py [--binary build/bench/cuda_attention_bench] [--ns 32768,...]
                             [--out-dir docs] [--quick]
"""

import argparse
import csv
import os
import pathlib
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEGMENTS = [2048, 4096, 8192, 16384, 32768]
RATES = [1, 2, 4, 8, 16]
HEADG_SEGMENTS = [2048, 4096, 8192, 16384, 32768]
HEADG_RATES = [1, 2, 4, 8, 16]


def flops(n, heads, dim, segments, rates, mode, causal):
    total = 0.0
    groups = len(segments)
    for i, (w, r) in enumerate(zip(segments, rates)):
        hs = heads if mode == "longnet" else heads // groups + (1 if i < heads % groups else 0)
        total += hs * 4.0 * n * min(w, n) * dim / (r * r)
    return total / 2 if causal else total


def time_cuda(fn, reps):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def flash_with_lse(q, k, v, causal):
    """SDPA's flash kernel on (B, L, H, D) returning (out (B, L, H, D), lse (B, H, L))."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal)
    return out[0].transpose(1, 2), out[1]


def torchscale_longnet(q, k, v, causal):
    """torchscale's LongNet algorithm: branch by branch, then a merge weighted by lse."""
    b, n, h, d = q.shape
    outs, lses = [], []
    for w, r in zip(SEGMENTS, RATES):
        w = min(w, n)
        pad = (w - n % w) % w
        groups = -(-h // r)  # heads per offset block
        out = torch.zeros_like(q)
        lse = torch.full((b, n, h), -float("inf"), device=q.device, dtype=torch.float32)
        for g in range(r):
            heads = slice(g * groups, min(h, (g + 1) * groups))
            if heads.start >= h:
                break
            def gather(x):
                x = x[:, :, heads]
                if pad:
                    x = F.pad(x, (0, 0, 0, 0, 0, pad))
                x = x.reshape(b, -1, w, x.shape[2], d)[:, :, g::r]
                return x.reshape(-1, x.shape[2], x.shape[3], d)
            o, l = flash_with_lse(gather(q), gather(k), gather(v), causal)
            nseg = (n + pad) // w
            full = torch.zeros(b, nseg, w, o.shape[2], d, device=q.device, dtype=q.dtype)
            full[:, :, g::r] = o.reshape(b, nseg, -1, o.shape[2], d)
            out[:, :, heads] = full.reshape(b, n + pad, -1, d)[:, :n]
            lfull = torch.full((b, nseg, w, o.shape[2]), -float("inf"), device=q.device)
            lfull[:, :, g::r] = l.transpose(1, 2).reshape(b, nseg, -1, o.shape[2])
            lse[:, :, heads] = lfull.reshape(b, n + pad, -1)[:, :n]
        outs.append(out)
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses), dim=0).nan_to_num(0.0)
    return (torch.stack(outs).float() * weights.unsqueeze(-1)).sum(0).to(q.dtype)


def dap_head_groups(q, k, v, causal):
    """dilated-attention-pytorch's algorithm (head groups, one branch each)."""
    b, n, h, d = q.shape
    out = torch.zeros_like(q)
    groups = len(HEADG_SEGMENTS)
    begin = 0
    for i, (w, r) in enumerate(zip(HEADG_SEGMENTS, HEADG_RATES)):
        size = h // groups + (1 if i < h % groups else 0)
        heads = slice(begin, begin + size)
        begin += size
        w = min(w, n)
        off = i % r
        nseg = n // w
        def gather(x):
            x = x[:, : nseg * w, heads].reshape(b, nseg, w, size, d)[:, :, off::r]
            return x.reshape(b * nseg, -1, size, d)
        o = F.scaled_dot_product_attention(*(gather(x).transpose(1, 2) for x in (q, k, v)),
                                           is_causal=causal).transpose(1, 2)
        view = out[:, : nseg * w, heads].view(b, nseg, w, size, d)
        view[:, :, off::r] = o.reshape(b, nseg, -1, size, d)
    return out


def run_ours(binary, ns, mode, causal, iters):
    cmd = [binary, "--n", ",".join(map(str, ns)), "--heads", "16", "--dim", "64", "--dtype",
           "bf16", "--mode", mode, "--causal", "1" if causal else "0", "--iters", str(iters)]
    if mode == "head_groups":
        cmd += ["--segments", ",".join(map(str, HEADG_SEGMENTS)),
                "--rates", ",".join(map(str, HEADG_RATES))]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stdout + r.stderr)
    rows = list(csv.DictReader(r.stdout.splitlines()))
    return {int(row["N"]): float(row["ms"]) for row in rows}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=str(ROOT / "build" / "bench" / "cuda_attention_bench"))
    p.add_argument("--ns", default="32768,131072,524288,2097152")
    p.add_argument("--out-dir", default=str(ROOT / "docs"))
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = p.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    reps = 5 if args.quick else 10
    heads, dim = 16, 64
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    rows = []
    for causal in (False, True):
        for mode in ("longnet", "head_groups"):
            segs, rts = (SEGMENTS, RATES) if mode == "longnet" else (HEADG_SEGMENTS, HEADG_RATES)
            ours = run_ours(args.binary, ns, mode, causal, reps * 2)
            for n in ns:
                f = flops(n, heads, dim, segs, rts, mode, causal)
                rows.append(dict(mode=mode, causal=int(causal), N=n, impl="dilattn",
                                 ms=ours[n], tflops=f / ours[n] / 1e9))
                torch.manual_seed(0)
                q, k, v = (torch.randn(1, n, heads, dim, device=dev, dtype=torch.bfloat16)
                           for _ in range(3))
                peer = torchscale_longnet if mode == "longnet" else dap_head_groups
                name = "torchscale" if mode == "longnet" else "dap"
                try:
                    ms = time_cuda(lambda: peer(q, k, v, causal), max(3, reps // 2))
                    rows.append(dict(mode=mode, causal=int(causal), N=n, impl=name, ms=ms,
                                     tflops=f / ms / 1e9))
                except torch.OutOfMemoryError:
                    rows.append(dict(mode=mode, causal=int(causal), N=n, impl=name,
                                     ms=float("nan"), tflops=float("nan")))
                torch.cuda.empty_cache()
                if mode == "longnet" and n <= 131072:
                    fd = 4.0 * n * n * dim * heads / (2 if causal else 1)
                    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                    ms = time_cuda(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                                   3)
                    rows.append(dict(mode="dense", causal=int(causal), N=n, impl="sdpa_dense",
                                     ms=ms, tflops=fd / ms / 1e9))
                del q, k, v
                torch.cuda.empty_cache()
                print(f"done {mode} causal={int(causal)} N={n}", file=sys.stderr, flush=True)

    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "gpu_bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("| mode | causal | N | impl | ms | TFLOP/s | dilattn speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mine = next((x for x in rows if x["impl"] == "dilattn" and x["N"] == r["N"]
                     and x["causal"] == r["causal"]
                     and (x["mode"] == r["mode"] or r["mode"] == "dense" and x["mode"] == "longnet")),
                    None)
        speed = "" if r["impl"] == "dilattn" or mine is None else f"{mine['tflops'] / r['tflops']:.2f}x"
        print(f"| {r['mode']} | {r['causal']} | {r['N']} | {r['impl']} | {r['ms']:.3f} | "
              f"{r['tflops']:.1f} | {speed} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for (mode, causal), style in {("longnet", 0): "-", ("head_groups", 0): "--",
                                      ("longnet", 1): ":", ("head_groups", 1): "-."}.items():
            for impl, color in (("dilattn", "C0"), ("torchscale", "C1"), ("dap", "C2")):
                pts = [r for r in rows if r["impl"] == impl and r["mode"] == mode
                       and r["causal"] == causal]
                if not pts:
                    continue
                label = f"{impl} {mode}{' causal' if causal else ''}"
                axes[0].plot([r["N"] for r in pts], [r["tflops"] for r in pts], style, color=color,
                             marker="o", label=label)
                axes[1].plot([r["N"] for r in pts], [r["ms"] for r in pts], style, color=color,
                             marker="o", label=label)
        dense = [r for r in rows if r["impl"] == "sdpa_dense" and r["causal"] == 0]
        if dense:
            axes[0].axhline(sum(r["tflops"] for r in dense) / len(dense), color="k", lw=0.8,
                            label="dense SDPA (flash)")
        for ax, label in ((axes[0], "effective TFLOP/s"), (axes[1], "ms")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N (tokens), B=1, H=16, D=64, bf16")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"dilated attention on {gpu}")
        fig.tight_layout()
        fig.savefig(out_dir / "gpu_bench.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
