"""Float64 reference of the operators for end-to-end checks, and the conformance input generator.

Written independently of the C++ code, from DESIGN.md section 1: each branch's attention per
segment, merged across branches by their softmax denominators (longnet), or one branch per head
group (head_groups); block-sparse as one softmax over every visible key.
"""

import json
import os
import pathlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64_floats(seed, count, scale=1.0):
    """`count` float32 values in [-1, 1) * scale, as ../shared/conformance/README.md draws them."""
    with np.errstate(over="ignore"):
        k = np.arange(1, count + 1, dtype=np.uint64)
        z = np.uint64(seed) + k * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    u = ((z >> np.uint64(40)).astype(np.float64) / 2.0**24 * 2 - 1).astype(np.float32)
    return u * np.float32(scale)


def conformance_dir():
    env = os.environ.get("DILATTN_CONFORMANCE_DIR")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[3] / "shared" / "conformance"


def conformance_cases():
    with open(conformance_dir() / "cases.json") as f:
        return json.load(f)["cases"]


def case_inputs(case):
    b, n, h, d = case["shape"]
    count = b * n * h * d
    values = splitmix64_floats(case["seed"], 3 * count, case["input_scale"])
    return [values[i * count:(i + 1) * count].reshape(b, n, h, d) for i in range(3)]


def expected_output(case):
    raw = np.fromfile(conformance_dir() / case["output_file"], dtype="<f4")
    return raw.reshape(case["shape"])


def _head_offset(mode, heads, groups, branch, head, rate):
    if mode == "longnet":
        return head // -(-heads // rate)
    begin = 0
    for g in range(branch):
        begin += heads // groups + (1 if g < heads % groups else 0)
    size = heads // groups + (1 if branch < heads % groups else 0)
    if not begin <= head < begin + size:
        return None
    return branch % rate


def dilated_attention(q, k, v, segment_lengths, dilation_rates, mode="longnet", causal=False,
                      softmax_scale=None):
    """q, k, v: (B, N, H, D) arrays; returns float64 (B, N, H, D)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, n, heads, dim = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / np.sqrt(dim)
    groups = len(segment_lengths)
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            lse_total = np.full(n, -np.inf)
            mixed = np.zeros((n, dim))
            for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
                offset = _head_offset(mode, heads, groups, i, h, r)
                if offset is None:
                    continue
                w = min(w, n)
                lse = np.full(n, -np.inf)
                branch = np.zeros((n, dim))
                for start in range(0, n, w):
                    pos = np.arange(start + offset, min(start + w, n), r)
                    if pos.size == 0:
                        continue
                    s = q[b, pos, h] @ k[b, pos, h].T * scale
                    if causal:
                        s = np.where(pos[None, :] > pos[:, None], -np.inf, s)
                    m = s.max(axis=1, keepdims=True)
                    p = np.exp(s - m)
                    den = p.sum(axis=1, keepdims=True)
                    branch[pos] = (p / den) @ v[b, pos, h]
                    lse[pos] = (m + np.log(den))[:, 0]
                hit = np.isfinite(lse)
                new_total = np.logaddexp(lse_total[hit], lse[hit])
                keep = np.exp(lse_total[hit] - new_total)
                add = np.exp(lse[hit] - new_total)
                mixed[hit] = mixed[hit] * keep[:, None] + branch[hit] * add[:, None]
                lse_total[hit] = new_total
            out[b, :, h] = mixed
    return out


def block_sparse_attention(q, k, v, block_size, kept, causal=False, softmax_scale=None):
    """kept(i, j, num_blocks) -> bool says which key blocks query block i attends to."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, n, heads, dim = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / np.sqrt(dim)
    nb = -(-n // block_size)
    blocks = np.arange(n) // block_size
    mask = np.array([[kept(i, j, nb) for j in range(nb)] for i in range(nb)])[blocks][:, blocks]
    if causal:
        mask &= np.arange(n)[None, :] <= np.arange(n)[:, None]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            s = np.where(mask, q[b, :, h] @ k[b, :, h].T * scale, -np.inf)
            m = s.max(axis=1, keepdims=True)
            rows = np.isfinite(m[:, 0])
            p = np.exp(s[rows] - m[rows])
            out[b, rows, h] = (p / p.sum(axis=1, keepdims=True)) @ v[b, :, h]
    return out


def relative_error(out, ref):
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        return np.inf
    norm = np.linalg.norm(ref)
    return np.linalg.norm(out - ref) / (norm if norm > 0 else 1.0)


# On the GPU backend FP32 requests are computed in fp16 (README), so they meet fp16's tolerance.
ON_GPU = os.environ.get("DILATTN_E2E_DEVICE", "cpu").startswith("cuda")
TOLERANCE = {"FP32": 2e-3 if ON_GPU else 1e-5, "FP16": 2e-3, "BF16": 1e-2}
FP32 = TOLERANCE["FP32"]
