"""Block-sparse attention through the server against the float64 reference."""

import numpy as np
import pytest

import reference
from helpers import make_inputs, to_wire


def _kept(pattern, **p):
    def kept(i, j, nb):
        d = abs(i - j)
        if pattern == "local_window":
            return d <= p["window"]
        if pattern == "strided":
            return d % p["stride"] == 0
        if pattern == "global_local":
            return i < p["global_blocks"] or j < p["global_blocks"] or d <= p["window"]
        if pattern == "dilated_sparse":
            return d == 0 or d in p["rates"]
        raise ValueError(pattern)
    return kept


@pytest.mark.parametrize("pattern,params,extra", [
    ("local_window", {"window": "1"}, {"window": 1}),
    ("strided", {"stride": "3"}, {"stride": 3}),
    ("global_local", {"global_blocks": "1", "window": "0"}, {"global_blocks": 1, "window": 0}),
    ("dilated_sparse", {"rates": "2,5"}, {"rates": [2, 5]}),
])
@pytest.mark.parametrize("causal", [False, True])
def test_patterns(client, pattern, params, extra, causal):
    rng = np.random.default_rng(7)
    q, k, v = (rng.uniform(-1, 1, (2, 200, 3, 16)).astype(np.float32) for _ in range(3))
    request = {"block_size": "32", "pattern": pattern, "causal": causal, **params}
    out = client.infer("block_sparse_attention", make_inputs(q, k, v),
                       parameters=request).as_numpy("O")
    expected = reference.block_sparse_attention(q, k, v, 32, _kept(pattern, **extra), causal)
    # D = 16: on a GPU server the GPU kernels run it (FP32 computed in fp16 there).
    assert reference.relative_error(out, expected) <= reference.TOLERANCE["FP32"]


def test_explicit_pairs_and_empty_rows(client):
    rng = np.random.default_rng(8)
    q, k, v = (rng.uniform(-1, 1, (1, 96, 2, 8)).astype(np.float32) for _ in range(3))
    pairs = {(1, 0), (2, 2), (0, 2)}
    out = client.infer("block_sparse_attention", make_inputs(q, k, v),
                       parameters={"block_size": "32", "pattern": "explicit",
                                   "pairs": "1:0,2:2,0:2", "causal": True}).as_numpy("O")
    expected = reference.block_sparse_attention(q, k, v, 32, lambda i, j, nb: (i, j) in pairs,
                                                causal=True)
    # D = 8: padded to 16 on a GPU server (FP32 computed in fp16 there), the CPU path elsewhere.
    assert reference.relative_error(out, expected) <= reference.TOLERANCE["FP32"]
    assert np.all(out[0, :32] == 0)  # block 0 keeps only (0, 2), which causal removes


@pytest.mark.parametrize("datatype", ["FP16", "BF16", "FP32"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dim", [64, 128])
def test_head_dims_of_the_gpu_kernels(client, datatype, causal, dim):
    """D = 64 and 128 (the wgmma kernels on Hopper) run on the GPU kernels on a GPU server (FP32
    computed in fp16 there), and on the CPU path elsewhere; the same answer within the dtype's
    tolerance either way. Blocks of 100 tokens: tiles that end inside a block, and a short last
    block."""
    rng = np.random.default_rng(dim + causal)
    q, k, v = (rng.uniform(-1, 1, (2, 430, 2, dim)).astype(np.float32) for _ in range(3))
    q, k, v = (to_wire(x, datatype) for x in (q, k, v))
    pairs = {(0, 0), (2, 0), (2, 1), (4, 4), (4, 2), (1, 3)}  # block 3 keeps none
    request = {"block_size": "100", "pattern": "explicit", "causal": causal,
               "pairs": ",".join(f"{i}:{j}" for i, j in sorted(pairs))}
    out = client.infer("block_sparse_attention", make_inputs(q, k, v, datatype),
                       parameters=request).as_numpy("O").astype(np.float32)
    expected = reference.block_sparse_attention(q, k, v, 100, lambda i, j, nb: (i, j) in pairs,
                                                causal)
    assert reference.relative_error(out, expected) <= reference.TOLERANCE[datatype]
    assert np.all(out[:, 300:400] == 0)
