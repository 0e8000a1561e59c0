#!/usr/bin/env python3
"""GPU benchmark of block-sparse attention: dilattn's fused kernels against PyTorch's
block-sparse attention (FlexAttention with a block mask, compiled) and dense SDPA.

One command on a GPU machine; prints one table. Every implementation runs on bf16 inputs
(B = 1, attention core only) and is timed with CUDA events (median of repeated runs after
warm-up) in the same process run:

  dilattn     build/bench/cuda_block_sparse_bench: the fused kernels over each query block's
              runs of selected key blocks; its first line per N is dense attention on the same
              kernel (one branch, segment N, rate 1)
  flex        torch.nn.attention.flex_attention under torch.compile, its BlockMask built from
              the same layout (kept blocks as full blocks; with causal the diagonal block as a
              partial one whose mask_mod compares positions); one softmax over all kept keys,
              the semantics DESIGN.md asks for
  sdpa_dense  torch SDPA (flash) on the whole sequence, causal where the row is

The layouts are rebuilt here from the same pattern rules (DESIGN.md section 1, the README's
`random` rule) and their kept pair counts must equal the ones the binary prints (the bench
stops otherwise), so both sides run the same pattern. Effective TFLOP/s count visible pairs
only, 4 * D per pair and head.

  python3 bench/block_sparse_gpu_bench.py [--binary build/bench/cuda_block_sparse_bench]
      [--ns 32768,131072] [--dim 64] [--block 128] [--iters 20]
"""

import argparse
import csv
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
MASK64 = (1 << 64) - 1


def mix(z):
    """SplitMix64's output function on uint64 arrays."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def kept_blocks(pattern, nb, causal):
    """Boolean (nb, nb) layout of the bench's named pattern, causal applied (j <= i)."""
    i = np.arange(nb)[:, None]
    j = np.arange(nb)[None, :]
    d = np.abs(i - j)
    name, _, arg = pattern.partition("(")
    args = [float(x) for x in arg.rstrip(")").split(",")] if arg else []
    if name == "random":
        with np.errstate(over="ignore"):
            key = (i.astype(np.uint64) << np.uint64(32)) | j.astype(np.uint64)
            z = mix(np.uint64(1) ^ mix(key))  # the bench's seed is 1
        kept = ((z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 < args[0]) | (d == 0)
    elif name == "local_window":
        kept = d <= args[0]
    elif name == "global_local":
        g, w = args
        kept = (i < g) | (j < g) | (d <= w)
    elif name == "strided":
        kept = d % int(args[0]) == 0
    elif name == "dilated_sparse":
        kept = (d == 0) | np.isin(d, [int(r) for r in args])
    else:
        sys.exit(f"unknown pattern {pattern}")
    return kept & (j <= i) if causal else kept


def run_ours(binary, n, dim, block, causal, iters):
    cmd = [binary, "--n", str(n), "--heads", "16", "--dim", str(dim), "--block", str(block),
           "--causal", "1" if causal else "0", "--iters", str(iters)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stdout + r.stderr)
    return list(csv.DictReader(r.stdout.splitlines()))


def time_ms(fn, iters):
    import torch
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for it in range(iters + 3):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        if it >= 3:
            times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def flex_runner(q, k, v, kept, block, causal):
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    nb = kept.shape[0]
    eye = np.eye(nb, dtype=bool)
    full = kept & ~eye if causal else kept
    partial = kept & eye if causal else np.zeros_like(kept)

    def lists(m):
        counts = m.sum(axis=1).astype(np.int32)
        idx = np.zeros((nb, nb), dtype=np.int32)
        for r in range(nb):
            cols = np.nonzero(m[r])[0]
            idx[r, :len(cols)] = cols
        dev = q.device
        return (torch.from_numpy(counts)[None, None].to(dev),
                torch.from_numpy(idx)[None, None].to(dev))

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)

    # The whole mask as mask_mod too: the compiled kernel evaluates it only on partial blocks
    # (the causal diagonal) and skips it on full ones; eager mode evaluates it everywhere.
    kept_t = torch.from_numpy(kept).to(q.device)

    def mask_mod(b, h, qi, ki):
        visible = kept_t[qi // block, ki // block]
        return visible & (ki <= qi) if causal else visible

    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=mask_mod)
    compiled = flex_runner.compiled
    return lambda: compiled(q, k, v, block_mask=mask)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=str(ROOT / "build" / "bench" / "cuda_block_sparse_bench"))
    p.add_argument("--ns", default="32768,131072")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()

    import torch
    import torch.nn.functional as F
    try:
        from torch.nn.attention.flex_attention import flex_attention
        flex_runner.compiled = torch.compile(flex_attention, dynamic=False)
        have_flex = True
    except ImportError:
        have_flex = False
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    print("| pattern | causal | N | kept share | dilattn ms | TFLOP/s | flex ms | dilattn / flex "
          "speed-up | dense SDPA ms | dilattn / dense SDPA time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in [int(x) for x in a.ns.split(",")]:
        torch.manual_seed(0)
        # (B, H, N, D) for torch; the kernel bench fills its own tensors of the same shape.
        q, k, v = (torch.randn(1, 16, n, a.dim, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        nb = -(-n // a.block)
        for causal in (False, True):
            dense = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                            a.iters)
            for row in run_ours(a.binary, n, a.dim, a.block, causal, a.iters):
                if row["kernel"] != "dilattn":
                    continue
                kept = kept_blocks(row["pattern"], nb, causal)
                if int(kept.sum()) != int(row["kept_pairs"]):
                    sys.exit(f"{row['pattern']}: layout here keeps {int(kept.sum())} pairs, the "
                             f"binary {row['kept_pairs']}")
                ours = float(row["ms"])
                flex = time_ms(flex_runner(q, k, v, kept, a.block, causal), a.iters) \
                    if have_flex else float("nan")
                print(f"| {row['pattern']} | {int(causal)} | {n} | {float(row['kept_share']):.3f} "
                      f"| {ours:.3f} | {float(row['tflops']):.0f} | {flex:.3f} | "
                      f"{flex / ours:.2f} x | {dense:.2f} | {ours / dense:.3f} |", flush=True)


if __name__ == "__main__":
    main()
