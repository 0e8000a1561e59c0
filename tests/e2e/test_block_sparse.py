"""Block-sparse attention through the server against the float64 reference."""

import numpy as np
import pytest

import reference
from helpers import make_inputs


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
    assert reference.relative_error(out, expected) <= 1e-5  # block-sparse runs on the CPU path on every device


def test_explicit_pairs_and_empty_rows(client):
    rng = np.random.default_rng(8)
    q, k, v = (rng.uniform(-1, 1, (1, 96, 2, 8)).astype(np.float32) for _ in range(3))
    pairs = {(1, 0), (2, 2), (0, 2)}
    out = client.infer("block_sparse_attention", make_inputs(q, k, v),
                       parameters={"block_size": "32", "pattern": "explicit",
                                   "pairs": "1:0,2:2,0:2", "causal": True}).as_numpy("O")
    expected = reference.block_sparse_attention(q, k, v, 32, lambda i, j, nb: (i, j) in pairs,
                                                causal=True)
    assert reference.relative_error(out, expected) <= 1e-5  # block-sparse runs on the CPU path on every device
    assert np.all(out[0, :32] == 0)  # block 0 keeps only (0, 2), which causal removes
