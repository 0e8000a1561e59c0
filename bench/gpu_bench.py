#!/usr/bin/env python3
"""GPU benchmark: dilattn's fused kernel against dense SDPA and both peers' algorithms.

One command on a GPU machine; prints one table and writes a CSV and a PNG plot. Every
implementation runs on the same inputs (bf16, B = 1, attention core only) and is timed with
CUDA events (median of repeated runs after warm-up) in the same process run:

  dilattn          build/bench/cuda_attention_bench (the fused kernel, one launch for all
                   branches)
  torchscale       Microsoft torchscale's LongNet forward pass (DilatedAttention), operation for
                   operation: per branch, gather every segment's dilated rows for all heads at
                   once (pad, reshape, diagonal), one dense attention call returning the
                   log-sum-exp (torch SDPA's flash kernel standing in for flash-attn), scatter
                   back through diag_embed, then merge the branches weighted by their softmax
                   denominators (longnet mode only)
  dap              dilated-attention-pytorch 0.2.0's forward pass, operation for operation: each
                   head group gathers its branch's rows, attention (torch SDPA standing in for
                   xformers), its normalisation by x.sum, += into the output, the final division
                   (head_groups mode only; its output is wrong, but this is its cost)
  torchscale_lean  the same algorithms restated for speed rather than fidelity (slices instead
  dap_lean         of diagonal / diag_embed; no normalisation passes): what a careful PyTorch
                   user could get from either algorithm
  sdpa_dense       torch SDPA on the whole sequence (the dense attention roofline), N <= 128K
                   only: its rate does not depend on N and larger N take minutes
  sdpa_segments    torch SDPA on the sequence cut into 2048-token sequences, the shape of every
                   branch of the default configuration (w / r = 2048 rows per segment): the
                   dense kernel's rate on the geometry our branches are made of (longnet rows)

Every implementation is timed the same way: warm-up calls for at least --warmup-ms (and at least
3), then the median of --reps calls, each synchronised. Long runs are power-bound on H100/H200
(700 W), so a short burst measures higher clocks than a sustained one; equal warm-up puts every
implementation at the clocks its own load sustains.

Before timing, the torchscale port and its lean restatement are run on the first N and must agree
(the bench stops otherwise).

Effective TFLOP/s use DESIGN.md's formula, 4 * N * w * D / r^2 per branch and head (halved
with causal), for every implementation, dense included (4 * N^2 * D per head).

  python3 bench/gpu_bench.py [--binary build/bench/cuda_attention_bench] [--ns 32768,...]
                             [--dim 64] [--out-dir docs] [--quick] [--reps 10]
                             [--warmup-ms 1000] [--modes longnet,head_groups] [--causal 0,1]
  python3 bench/gpu_bench.py --from-csv docs/gpu_bench.csv   (table and plot again, no GPU)
"""

import argparse
import csv
import pathlib
import subprocess
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # --from-csv needs neither
    torch = F = None

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEGMENTS = [2048, 4096, 8192, 16384, 32768]
RATES = [1, 2, 4, 8, 16]
HEADG_SEGMENTS = [2048, 4096, 8192, 16384, 32768]
HEADG_RATES = [1, 2, 4, 8, 16]
SEGMENT_ROWS = 2048  # w / r of every default branch: the rows of one branch segment


def flops(n, heads, dim, segments, rates, mode, causal):
    total = 0.0
    groups = len(segments)
    for i, (w, r) in enumerate(zip(segments, rates)):
        hs = heads if mode == "longnet" else heads // groups + (1 if i < heads % groups else 0)
        total += hs * 4.0 * n * min(w, n) * dim / (r * r)
    return total / 2 if causal else total


def time_cuda(fn, reps, warmup_ms):
    """Median ms of fn over reps calls, each timed alone and synchronised, after warm-up calls
    (at least 3, and at least warmup_ms of them): cuda_attention_bench's TimeMs, the same
    protocol for every implementation, so that each is timed at the clocks the card sustains
    under its own load rather than at whatever a cooler start gives a short run."""
    start_warm = time.monotonic()
    warm = 0
    while warm < 3 or (time.monotonic() - start_warm) * 1e3 < warmup_ms:
        fn()
        torch.cuda.synchronize()
        warm += 1
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


def sdpa_with_lse(q, k, v, causal):
    """SDPA's flash kernel on (B, H, L, D) views: (out (B, H, L, D) view of (B, L, H, D) memory,
    lse (B, H, L) float32), what flash_attn_func(return_attn_probs=True) gives the peers."""
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
    return out[0], out[1]


# The peers as published. Each function below issues the same sequence of tensor operations, with
# the same shapes and the same copies, as the package's forward pass (torchscale: the
# DilatedAttention module of microsoft/torchscale; dap: DilatedAttention of the PyPI package
# dilated-attention-pytorch 0.2.0), with torch SDPA standing in for flash-attn / xformers. The
# einops rearranges are spelled as view / permute / reshape, which is what einops itself runs:
# a reshape of a permuted tensor copies exactly when einops' does.


def torchscale_longnet(q, k, v, causal):
    """torchscale's LongNet forward pass from (B, N, H, D) q, k, v to the attention output."""
    b, n, h, d = q.shape

    def dense_to_sparse(x, r):  # (bn, g, h, d) -> (bn, g / r, h, d): head block j keeps offset j
        bn, g = x.shape[:2]
        pad, head_pad = -g % r, -h % r
        if pad or head_pad:
            x = F.pad(x, (0, 0, 0, head_pad, 0, pad))
        hh = x.shape[2] // r
        x = x.view(bn, x.shape[1] // r, r, r, hh, d).permute(0, 1, 4, 5, 2, 3)
        x = torch.diagonal(x, 0, 4, 5)                     # (bn, l, hh, d, r)
        x = x.permute(0, 1, 4, 2, 3).reshape(bn, -1, r * hh, d)
        return x[:, :, :h] if head_pad else x

    def gathering(x, r, sl):  # (b, n, h, d) -> ((b n h), l, d)
        sl = min(sl, x.shape[1])
        pad = -x.shape[1] % sl
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        x = x.view(b * (x.shape[1] // sl), sl, h, d)
        x = dense_to_sparse(x, r)
        return x.permute(0, 2, 1, 3).reshape(-1, x.shape[1], d)

    def sparse_to_dense(o, lse, r):  # o (bn, l, h, d), lse (bn, h, l)
        head_pad = -h % r
        if head_pad:
            o = F.pad(o, (0, 0, 0, head_pad))
            lse = F.pad(lse, (0, 0, 0, head_pad), value=-1e8)
        bn, l, hp = o.shape[:3]
        o = o.view(bn, l, r, hp // r, d).permute(0, 1, 3, 4, 2)
        o = torch.diag_embed(o, 0, 4, 5)                   # (bn, l, hh, d, r, r)
        o = o.permute(0, 5, 2, 1, 4, 3).reshape(bn, hp, l * r, d)
        lse = lse.view(bn, r, hp // r, l).permute(0, 3, 2, 1)
        lse = torch.diag_embed(lse, 0, 3, 4)               # (bn, l, hh, r, r)
        lse = lse.masked_fill_(lse == 0, -1e8)
        lse = lse.permute(0, 4, 2, 1, 3).reshape(bn, hp, l * r, 1)
        return (o[:, :h], lse[:, :h]) if head_pad else (o, lse)

    outs, lses = [], []
    for sl, r in zip(SEGMENTS, RATES):
        ki, vi, qi = (gathering(x, r, sl) for x in (k, v, q))
        l = qi.shape[1]
        # attention_ops: (b h) l d -> b l h d views for flash-attn, which reads strides.
        o, lse = sdpa_with_lse(*(x.view(-1, h, l, d) for x in (qi, ki, vi)), causal)
        outs.append(o.transpose(1, 2).reshape(-1, l, h * d))
        lses.append(lse)
    all_outs, all_lses = [], []
    for r, o, lse in zip(RATES, outs, lses):  # scattering
        o, lse = sparse_to_dense(o.view(o.shape[0], o.shape[1], h, d), lse, r)
        nseg = o.shape[0] // b
        o = o.view(b, nseg, h, -1, d).permute(0, 2, 1, 3, 4).reshape(b * h, -1, d)
        lse = lse.view(b, nseg, h, -1, 1).permute(0, 2, 1, 3, 4).reshape(b * h, -1, 1)
        all_outs.append(o[:, :n])
        all_lses.append(lse[:, :n])
    with torch.no_grad():
        max_lse = torch.stack(all_lses, dim=0).max(0)[0]
        all_lses = [torch.exp(lse - max_lse) for lse in all_lses]
        lse_sum = torch.stack(all_lses, dim=0).sum(0)
        all_lses = [lse / lse_sum for lse in all_lses]
    out = 0
    for o, lse in zip(all_outs, all_lses):
        out += o * lse.type_as(o)
    return out.view(b, h, n, d).permute(0, 2, 1, 3).reshape(b, n, h * d).view(b, n, h, d)


def dap_head_groups(q, k, v, causal):
    """dilated-attention-pytorch's forward pass (head groups, one branch each), including its
    per-branch normalisation x / x.sum(dim=(1, 2)), the += into the output and the final division
    by the number of groups (which make its output wrong, but are its cost)."""
    b, n, h, d = q.shape
    out = torch.zeros_like(q)
    num_groups = len(HEADG_RATES)
    sizes = [h // num_groups + (1 if i < h % num_groups else 0) for i in range(num_groups)]
    for i, (g, r, s) in enumerate(zip(sizes, HEADG_RATES, HEADG_SEGMENTS)):
        offset, hmin, hmax = i % r, i * g, (i + 1) * g

        def split(x):
            x = x.view(b, -1, s, h, d)[:, :, offset::r, hmin:hmax, :]
            return x.reshape(-1, x.shape[2], x.shape[3], d)   # (b n) s h d: a copy

        qi, ki, vi = split(q), split(k), split(v)
        # xformers.ops.memory_efficient_attention on (B, M, H, K): SDPA on the transposed views.
        x = F.scaled_dot_product_attention(qi.transpose(1, 2), ki.transpose(1, 2),
                                           vi.transpose(1, 2), is_causal=causal).transpose(1, 2)
        x = x.reshape(b, -1, x.shape[1], x.shape[2], d)
        x = x / x.sum(dim=(1, 2), keepdim=True)
        out = out.view(b, -1, s, h, d)
        out[:, :, offset::r, hmin:hmax, :] += x
        out = out.view(b, -1, h, d)
    return out / num_groups


# Lean restatements of the same two algorithms, written for speed rather than fidelity: one
# dense call per (branch, head block) on slices instead of torchscale's diagonal / diag_embed
# reshuffles, and dilated-attention-pytorch without its normalisation passes. They bound what a
# careful PyTorch user could get from either algorithm; the targets are read against the packages.


def torchscale_lean(q, k, v, causal):
    """torchscale's algorithm, lean: per branch and head block, gather, attend, scatter; merge."""
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
            o, l = sdpa_with_lse(*(gather(x).transpose(1, 2) for x in (q, k, v)), causal)
            o = o.transpose(1, 2)
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


def dap_lean(q, k, v, causal):
    """dilated-attention-pytorch's algorithm, lean: gather, attend, scatter; no normalisation."""
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


PEERS = {
    "longnet": (("torchscale", torchscale_longnet), ("torchscale_lean", torchscale_lean)),
    "head_groups": (("dap", dap_head_groups), ("dap_lean", dap_lean)),
}


def check_same_operator(q, k, v, causal):
    """The port of torchscale and the lean restatement are written independently (diagonal and
    diag_embed reshuffles against slices); they must agree, or a table row times something else."""
    a = torchscale_longnet(q, k, v, causal).float()
    b = torchscale_lean(q, k, v, causal).float()
    err = ((a - b).abs().max() / b.abs().max()).item()
    if not err <= 2e-2:  # torchscale merges the branches in bf16
        sys.exit(f"torchscale port and lean restatement disagree: relative error {err:.3g}")
    print(f"# torchscale port vs lean restatement (causal={int(causal)}): relative max "
          f"difference {err:.2e}", flush=True)


def run_ours(binary, ns, dim, mode, causal, iters, warmup_ms):
    cmd = [binary, "--n", ",".join(map(str, ns)), "--heads", "16", "--dim", str(dim), "--dtype",
           "bf16", "--mode", mode, "--causal", "1" if causal else "0", "--iters", str(iters),
           "--warmup-ms", str(warmup_ms)]
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
    p.add_argument("--dim", type=int, default=64, help="head dim (the issue's targets are at 64)")
    p.add_argument("--quick", action="store_true", help="5 repetitions and 300 ms of warm-up")
    p.add_argument("--modes", default="longnet,head_groups", help="which modes to run")
    p.add_argument("--causal", default="0,1", help="causal settings to run (0, 1 or both)")
    p.add_argument("--reps", type=int, default=10, help="timed calls per implementation")
    p.add_argument("--warmup-ms", type=int, default=1000,
                   help="warm-up per implementation and N before timing")
    p.add_argument("--from-csv", help="print the table and draw the plot of an earlier run's CSV")
    args = p.parse_args()
    if args.from_csv:
        with open(args.from_csv, newline="") as f:
            rows = [dict(r, N=int(r["N"]), causal=int(r["causal"]), ms=float(r["ms"]),
                         tflops=float(r["tflops"])) for r in csv.DictReader(f)]
        report(rows, pathlib.Path(args.out_dir), args.dim, write_csv=False)
        return
    if not set(args.modes.split(",")) <= set(PEERS) or not set(args.causal.split(",")) <= {"0", "1"}:
        p.error("--modes takes longnet and/or head_groups, --causal 0 and/or 1")
    ns = [int(x) for x in args.ns.split(",")]
    reps = 5 if args.quick else args.reps
    warmup_ms = 300 if args.quick else args.warmup_ms
    heads, dim = 16, args.dim
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    rows = []
    for causal in (c == "1" for c in args.causal.split(",")):
        for mode in args.modes.split(","):
            segs, rts = (SEGMENTS, RATES) if mode == "longnet" else (HEADG_SEGMENTS, HEADG_RATES)
            ours = run_ours(args.binary, ns, dim, mode, causal, reps, warmup_ms)
            for n in ns:
                first = len(rows)
                f = flops(n, heads, dim, segs, rts, mode, causal)
                rows.append(dict(mode=mode, causal=int(causal), N=n, impl="dilattn",
                                 ms=ours[n], tflops=f / ours[n] / 1e9))
                torch.manual_seed(0)
                q, k, v = (torch.randn(1, n, heads, dim, device=dev, dtype=torch.bfloat16)
                           for _ in range(3))
                peers = PEERS[mode]
                if n == ns[0] and mode == "longnet":
                    check_same_operator(q, k, v, causal)
                for name, peer in peers:
                    try:
                        ms = time_cuda(lambda: peer(q, k, v, causal), reps, warmup_ms)
                    except torch.OutOfMemoryError:
                        ms = float("nan")
                    rows.append(dict(mode=mode, causal=int(causal), N=n, impl=name, ms=ms,
                                     tflops=f / ms / 1e9))
                    torch.cuda.empty_cache()
                if mode == "longnet" and n <= 131072:
                    fd = 4.0 * n * n * dim * heads / (2 if causal else 1)
                    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                    ms = time_cuda(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                                   reps, warmup_ms)
                    rows.append(dict(mode="dense", causal=int(causal), N=n, impl="sdpa_dense",
                                     ms=ms, tflops=fd / ms / 1e9))
                if mode == "longnet" and n % SEGMENT_ROWS == 0:
                    fs = 4.0 * n * SEGMENT_ROWS * dim * heads / (2 if causal else 1)
                    qs, ks, vs = (x.view(n // SEGMENT_ROWS, SEGMENT_ROWS, heads, dim).transpose(1, 2)
                                  for x in (q, k, v))
                    ms = time_cuda(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal),
                                   reps, warmup_ms)
                    rows.append(dict(mode="dense", causal=int(causal), N=n, impl="sdpa_segments",
                                     ms=ms, tflops=fs / ms / 1e9))
                del q, k, v
                torch.cuda.empty_cache()
                for r in rows[first:]:
                    print(f"{time.strftime('%H:%M:%S')} {r['mode']} causal={r['causal']} N={n} "
                          f"{r['impl']}: {r['ms']:.3f} ms, {r['tflops']:.1f} TFLOP/s",
                          file=sys.stderr, flush=True)

    for r in rows:
        r["card"] = gpu
    report(rows, pathlib.Path(args.out_dir), dim)


def report(rows, out_dir, dim, write_csv=True):
    """The table on stdout; the CSV and the plot into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if write_csv:
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
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    # Columns: the two modes; rows: rate and time. Colour per implementation, dashed with causal.
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    colors = {"dilattn": "C0", "torchscale": "C1", "torchscale_lean": "C3", "dap": "C2",
              "dap_lean": "C4", "sdpa_dense": "k", "sdpa_segments": "C7"}
    for col, mode in enumerate(("longnet", "head_groups")):
        for impl, color in colors.items():
            for causal, style in ((0, "-"), (1, "--")):
                want = "dense" if impl.startswith("sdpa") else mode
                if impl.startswith("sdpa") and mode != "longnet":
                    continue
                pts = [r for r in rows if r["impl"] == impl and r["mode"] == want
                       and int(r["causal"]) == causal]
                if not pts:
                    continue
                label = f"{impl}{' causal' if causal else ''}"
                for row, key in ((0, "tflops"), (1, "ms")):
                    if impl == "sdpa_segments" and key == "ms":
                        continue  # its time is one branch's work, not the whole operator's
                    axes[row][col].plot([r["N"] for r in pts], [r[key] for r in pts], style,
                                        color=color, marker="o", ms=4, label=label)
        axes[0][col].set_title(mode)
        axes[0][col].set_ylabel("effective TFLOP/s")
        axes[1][col].set_ylabel("ms")
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel(f"N (tokens), B = 1, H = 16, D = {dim}, bf16")
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].grid(True, alpha=0.3)
        axes[0][col].legend(fontsize=7, loc="center right", ncol=2)
    card = rows[0].get("card", "")
    fig.suptitle(f"dilated attention{' on ' + card if card else ''}")
    fig.tight_layout()
    fig.savefig(out_dir / "gpu_bench.png", dpi=110)


if __name__ == "__main__":
    main()
