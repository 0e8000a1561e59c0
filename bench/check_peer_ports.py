#!/usr/bin/env python3
"""CPU check of gpu_bench.py's peer ports (no GPU; needs torch, and for the last check the PyPI
package dilated-attention-pytorch 0.2.0 with einops).

  - torchscale's port and its lean restatement against a per-branch float32 reference (small
    segments, causal and not; whole segments only: torchscale pads a short last segment with
    zero keys that take part in its softmax, which the operator's definition excludes);
  - the dap port against the package's own DilatedAttention, with a stand-in xformers.ops module
    that passes memory_efficient_attention to torch SDPA (skipped if the package is missing).

  python3 bench/check_peer_ports.py
"""

import importlib.util
import math
import pathlib
import sys
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu_bench.py")
gb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gb)


def attention_with_lse(q, k, v, causal):
    """(B, H, L, D) float attention returning (out as a view of (B, L, H, D) memory, lse)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -float("inf"))
    out = torch.softmax(s, -1) @ v
    return out.transpose(1, 2).contiguous().transpose(1, 2), torch.logsumexp(s, -1)


def reference(q, k, v, causal, segments, rates):
    """LongNet by definition: per branch and head, the head block's offset class of every
    segment attends within itself; branches merged by their softmax denominators."""
    b, n, h, d = q.shape
    outs, lses = [], []
    for w, r in zip(segments, rates):
        out = torch.zeros(b, n, h, d)
        lse = torch.full((b, n, h), -float("inf"))
        for head in range(h):
            offset = head // -(-h // r)
            for start in range(0, n, w):
                idx = torch.arange(start + offset, min(start + w, n), r)
                if len(idx) == 0:
                    continue
                o, l = attention_with_lse(*(x[:, idx, head][:, None] for x in (q, k, v)), causal)
                out[:, idx, head] = o[:, 0]
                lse[:, idx, head] = l[:, 0]
        outs.append(out)
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses), 0).nan_to_num(0.0)
    return (torch.stack(outs) * weights[..., None]).sum(0)


def main():
    gb.sdpa_with_lse = attention_with_lse
    gb.SEGMENTS = gb.HEADG_SEGMENTS = [64, 128, 256]
    gb.RATES = gb.HEADG_RATES = [1, 2, 4]
    torch.manual_seed(0)
    worst = 0.0
    for n in (512, 768):
        for causal in (False, True):
            q, k, v = (torch.randn(1, n, 8, 16) for _ in range(3))
            ref = reference(q, k, v, causal, gb.SEGMENTS, gb.RATES)
            for name, fn in (("torchscale", gb.torchscale_longnet), ("lean", gb.torchscale_lean)):
                err = (fn(q, k, v, causal) - ref).abs().max().item()
                worst = max(worst, err)
                print(f"{name:10s} N={n} causal={int(causal)}: max |diff| {err:.2e}")
    if worst > 1e-5:
        sys.exit("torchscale port or restatement differs from the reference")
    with tempfile.TemporaryDirectory() as shim:
        pkg = pathlib.Path(shim, "xformers")
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "ops.py").write_text(
            "import torch.nn.functional as F\n"
            "AttentionOp = object\n"
            "class LowerTriangularMask:\n    pass\n"
            "def memory_efficient_attention(query, key, value, op=None, attn_bias=None):\n"
            "    t = lambda x: x.transpose(1, 2)\n"
            "    return t(F.scaled_dot_product_attention(t(query), t(key), t(value),\n"
            "                                            is_causal=attn_bias is not None))\n")
        sys.path.insert(0, shim)
        try:
            from dilated_attention_pytorch.dilated_attention import DilatedAttention
        except ImportError as e:
            print(f"dap: package not importable ({e}); skipped")
            return
        for causal in (False, True):
            q, k, v = (torch.randn(2, 512, 8, 16) for _ in range(3))
            theirs = DilatedAttention(gb.HEADG_SEGMENTS, gb.HEADG_RATES)(q, k, v, is_causal=causal)
            err = (gb.dap_head_groups(q, k, v, causal) - theirs).abs().max().item()
            print(f"dap        N=512 causal={int(causal)}: max |diff| against the package {err:.2e}")
            if err != 0.0:
                sys.exit("dap port differs from the package")


if __name__ == "__main__":
    main()
