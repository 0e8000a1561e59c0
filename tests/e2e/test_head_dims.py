"""Head dims without a GPU kernel of their own (any up to 256 but 16, 32, 64, 128 and 256), in
dilated and block-sparse attention: a GPU server runs them as the next head dim that has one, with
zero columns in Q and K and the real dim's softmax scale, copying only the real columns of O back;
a CPU server computes them on the CPU path. Either way every answer equals the float64 reference."""

import concurrent.futures

import pytest

import reference
from conftest import wait_until
from helpers import make_inputs, random_qkv, to_wire

# (shape, segments, rates, mode, causal, softmax_scale)
CASES = [
    ((1, 300, 3, 96), [64, 128], [1, 2], "longnet", False, None),
    ((2, 200, 4, 48), [50, 100], [1, 2], "head_groups", True, None),
    ((1, 256, 2, 8), [32, 64, 128], [1, 2, 4], "longnet", True, None),
    ((1, 130, 2, 200), [64, 130], [1, 2], "longnet", False, 0.05),
    ((1, 160, 2, 24), [160], [1], "longnet", False, None),
]


def _params(segments, rates, mode, causal, scale):
    params = {"segment_lengths": ",".join(map(str, segments)),
              "dilation_rates": ",".join(map(str, rates)), "mode": mode, "causal": causal}
    if scale is not None:
        params["softmax_scale"] = scale
    return params


def _check(out, qkv, datatype, segments, rates, mode, causal, scale):
    wire = [to_wire(x, datatype) for x in qkv]
    expected = reference.dilated_attention(*wire, segments, rates, mode=mode, causal=causal,
                                           softmax_scale=scale)
    assert out.shape == expected.shape
    assert reference.relative_error(out, expected) <= reference.TOLERANCE[datatype]


@pytest.mark.parametrize("datatype", ["FP16", "BF16", "FP32"])
@pytest.mark.parametrize("shape,segments,rates,mode,causal,scale", CASES)
def test_padded_head_dims_match_the_reference(server, datatype, shape, segments, rates, mode,
                                              causal, scale):
    qkv = random_qkv(shape, seed=sum(shape) + (datatype == "BF16"))
    params = _params(segments, rates, mode, causal, scale)
    out = server.client().infer("dilated_attention", make_inputs(*qkv, datatype),
                                parameters=params).as_numpy("O")
    _check(out.astype("float32"), qkv, datatype, segments, rates, mode, causal, scale)
    if reference.ON_GPU:
        assert wait_until(lambda: "head dims without a kernel run padded" in
                          server.log_path.read_text())


def test_padded_executions_are_counted_as_such(server):
    """dilattn_executions_total says where each batch computed: gpu_padded on a GPU server, cpu on
    a CPU one, where every head dim up to 256 has its own kernel."""
    path = "gpu_padded" if reference.ON_GPU else "cpu"
    before = server.metric("dilattn_executions_total", model="dilated_attention", path=path)
    qkv = random_qkv((1, 64, 2, 96), seed=1)
    server.client().infer("dilated_attention", make_inputs(*qkv, "FP16"),
                          parameters=_params([32, 64], [1, 2], "longnet", False, None))
    assert wait_until(lambda: server.metric("dilattn_executions_total", model="dilated_attention",
                                            path=path) == before + 1)


def test_padded_requests_batched_together(server):
    """Requests of D = 96 and different lengths, sent at once: batched (packed end to end) and each
    answered with its own rows, FP32 converted on the way on a GPU."""
    segments, rates = [32, 64], [1, 2]
    lengths = [40, 64, 100, 128, 200, 77]

    def run(i):
        qkv = random_qkv((1, lengths[i % len(lengths)], 2, 96), seed=300 + i)
        out = server.client().infer("dilated_attention", make_inputs(*qkv),
                                    parameters=_params(segments, rates, "longnet", False, None))
        expected = reference.dilated_attention(*qkv, segments, rates)
        return reference.relative_error(out.as_numpy("O"), expected)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        errors = list(pool.map(run, range(24)))
    assert max(errors) <= reference.TOLERANCE["FP32"], errors


@pytest.mark.parametrize("datatype", ["FP16", "BF16", "FP32"])
@pytest.mark.parametrize("dim,causal", [(96, False), (40, True)])
def test_padded_block_sparse_matches_the_reference(server, datatype, dim, causal):
    """Block-sparse attention over explicit block pairs (one query block keeps none) at D = 96
    and 40, blocks of 50 tokens and a short last one."""
    qkv = random_qkv((2, 230, 2, dim), seed=dim + causal)
    pairs = {(0, 0), (1, 0), (2, 1), (2, 2), (4, 3), (4, 4), (0, 4)}  # block 3 keeps none
    params = {"block_size": "50", "pattern": "explicit", "causal": causal,
              "pairs": ",".join(f"{i}:{j}" for i, j in sorted(pairs))}
    out = server.client().infer("block_sparse_attention", make_inputs(*qkv, datatype),
                                parameters=params).as_numpy("O").astype("float32")
    wire = [to_wire(x, datatype) for x in qkv]
    expected = reference.block_sparse_attention(*wire, 50, lambda i, j, nb: (i, j) in pairs,
                                                causal)
    assert reference.relative_error(out, expected) <= reference.TOLERANCE[datatype]
    assert (out[:, 150:200] == 0).all()
    if reference.ON_GPU:
        assert wait_until(lambda: "head dims without a kernel run padded" in
                          server.log_path.read_text())
