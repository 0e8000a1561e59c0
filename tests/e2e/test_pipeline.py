"""Long jobs in pieces (--pipeline-min-tokens): on a GPU server each piece's kernel starts once its
own inputs are in and its output leaves while later pieces compute. With a low threshold, short
requests take that path too: every answer must equal the float64 reference, whether the pieces cut
one sequence (with a shorter rest), group several, cross request boundaries in a batch, or cannot
cut at all; in FP16, BF16 and FP32 (converted to fp16 piece by piece on a GPU); through tensors in
messages and in system shared memory. A sequence that no cut splits into independent problems (a
segment as long as it) runs instead as launches over parts of its rows, K and V copied whole
first and Q and O part by part. On a CPU server the flag changes nothing and the
same answers are checked."""

import concurrent.futures
import uuid

import numpy as np
import pytest
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

import reference
from conftest import ServerProcess, wait_until
from helpers import NUMPY_DTYPE, make_inputs, random_qkv, shared_memory_tensors, to_wire

MODEL = "dilated_attention"
MIN_TOKENS = 2048  # pieces of >= 512 tokens, about an eighth of a job each


@pytest.fixture(scope="module")
def piece_server():
    s = ServerProcess("--pipeline-min-tokens", str(MIN_TOKENS), name="pipeline")
    yield s
    assert s.stop() == 0, s.log_path.read_text()


def _params(segments, rates, mode="longnet", causal=False):
    return {"segment_lengths": ",".join(map(str, segments)),
            "dilation_rates": ",".join(map(str, rates)), "mode": mode, "causal": causal}


def _check(out, q, k, v, datatype, segments, rates, mode="longnet", causal=False):
    wire = [to_wire(x, datatype) for x in (q, k, v)]
    expected = reference.dilated_attention(*wire, segments, rates, mode=mode, causal=causal)
    error = reference.relative_error(out, expected)
    assert error <= reference.TOLERANCE[datatype], error


# (shape, segments, rates, mode, causal): one sequence cut into equal pieces; the same with a rest
# that is no multiple of every segment length; a batch of sequences shorter than a piece, grouped;
# head groups with causal.
CASES = [
    ((1, 8192, 4, 64), [64, 128, 256], [1, 2, 4], "longnet", False),
    ((1, 8192 + 300, 2, 32), [64, 192], [1, 3], "longnet", True),
    ((5, 700, 2, 64), [64, 128], [1, 2], "longnet", False),
    ((2, 3000, 6, 64), [100, 200, 400], [1, 2, 4], "head_groups", True),
]
# Sequences that no cut splits (a segment as long as the sequence): launches over parts of their
# rows.
UNCUT = [
    ((1, 4096, 2, 64), [128, 4096], [1, 16], "longnet", False),
    ((1, 6000, 3, 64), [100, 6000], [1, 4], "longnet", True),
    ((1, 5000, 4, 64), [200, 600, 5000], [1, 2, 8], "head_groups", False),
]


@pytest.mark.parametrize("datatype", ["FP16", "BF16", "FP32"])
@pytest.mark.parametrize("shape,segments,rates,mode,causal", CASES + UNCUT)
def test_pieces_match_the_reference(piece_server, datatype, shape, segments, rates, mode, causal):
    q, k, v = random_qkv(shape, seed=sum(shape) + len(segments) + (datatype == "BF16"))
    out = piece_server.client().infer(
        MODEL, make_inputs(q, k, v, datatype),
        parameters=_params(segments, rates, mode, causal)).as_numpy("O")
    _check(out, q, k, v, datatype, segments, rates, mode, causal)
    if reference.ON_GPU:
        # The path under test has run (each is logged once, at its first job).
        uncut = (shape, segments, rates, mode, causal) in UNCUT
        line = "over parts of their rows" if uncut else "run in pieces"
        assert wait_until(lambda: line in piece_server.log_path.read_text())


# Cut into pieces, the value in V; uncut (parts over the rows), in the last part's Q rows.
@pytest.mark.parametrize("segments,rates,tensor", [([64, 128], [1, 2], 2),
                                                   ([64, 8192], [1, 16], 0)])
def test_fp32_beyond_fp16_in_a_late_piece_is_refused(piece_server, segments, rates, tensor):
    """FP32 pieces (and parts) convert to fp16 on the GPU one at a time; a value beyond fp16's
    range in the last one is still refused by name (the CPU path computes in fp32 and answers)."""
    qkv = random_qkv((1, 8192, 2, 64), seed=9)
    qkv[tensor][0, -1, 1, 5] = 1e6
    client = piece_server.client()
    params = _params(segments, rates)
    if reference.ON_GPU:
        with pytest.raises(InferenceServerException) as e:
            client.infer(MODEL, make_inputs(*qkv, "FP32"), parameters=params)
        assert "INVALID_ARGUMENT" in str(e.value.status()), e.value
        assert "beyond fp16's range" in e.value.message()
    else:
        out = client.infer(MODEL, make_inputs(*qkv, "FP32"), parameters=params).as_numpy("O")
        _check(out, *qkv, "FP32", segments, rates)
    # The next request on the same server is unaffected.
    qkv[tensor][0, -1, 1, 5] = 0.5
    out = client.infer(MODEL, make_inputs(*qkv, "FP32"), parameters=params).as_numpy("O")
    _check(out, *qkv, "FP32", segments, rates)


def test_concurrent_requests_batched_across_pieces(piece_server):
    """Requests of mixed lengths batched into one job: its pieces cut across their boundaries."""
    segments, rates = [64, 128], [1, 2]
    lengths = [900, 1500, 2048, 640, 3000, 1100]

    def run(i):
        q, k, v = random_qkv((1, lengths[i % len(lengths)], 4, 64), seed=500 + i)
        out = piece_server.client().infer(MODEL, make_inputs(q, k, v, "FP16"),
                                          parameters=_params(segments, rates)).as_numpy("O")
        wire = [to_wire(x, "FP16") for x in (q, k, v)]
        return reference.relative_error(out, reference.dilated_attention(*wire, segments, rates))

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        errors = list(pool.map(run, range(36)))
    assert max(errors) <= reference.TOLERANCE["FP16"], errors


@pytest.mark.parametrize("over_inputs", [False, True])
@pytest.mark.parametrize("segments,rates", [([128, 256], [1, 2]), ([128, 8192], [1, 16])])
def test_pieces_through_system_shared_memory(piece_server, segments, rates, over_inputs):
    """Inputs and output in one registered (pinned) region: pieces (or, where no cut splits the
    sequence, parts of its rows) copy straight from and to it. With `over_inputs`, O lies over
    the second half of Q and the first of K, named through a second registration of the object
    (another mapping, another address): pieces would write early outputs over inputs that later
    pieces still have to copy, so such a job copies all its inputs first."""
    shape = (1, 8192, 4, 64)
    q, k, v = random_qkv(shape, seed=77)
    tensors = [np.asarray(x, dtype=NUMPY_DTYPE["FP16"]) for x in (q, k, v)]
    size = tensors[0].nbytes
    client = piece_server.client()
    name, key = f"r_{uuid.uuid4().hex[:10]}", f"/dilattn_pipe_{uuid.uuid4().hex[:10]}"
    alias = f"a_{uuid.uuid4().hex[:10]}"
    handle = shm.create_shared_memory_region(name, key, 4 * size)
    out_name, out_at = (alias, size // 2) if over_inputs else (name, 3 * size)
    try:
        shm.set_shared_memory_region(handle, tensors)
        if not over_inputs:
            # Poisoned output range: a piece that is not copied back shows up as NaN.
            shm.set_shared_memory_region(handle, [np.full(shape, np.nan, NUMPY_DTYPE["FP16"])],
                                         offset=3 * size)
        client.register_system_shared_memory(name, key, 4 * size)
        client.register_system_shared_memory(alias, key, 4 * size)
        inputs, outputs = shared_memory_tensors(name, shape, "FP16", size, out_region=out_name,
                                                out_offset=out_at)
        client.infer(MODEL, inputs, outputs=outputs, parameters=_params(segments, rates))
        out = shm.get_contents_as_numpy(handle, NUMPY_DTYPE["FP16"], list(shape), offset=out_at)
        out = out.astype(np.float32)
        assert not np.isnan(out).any()
        _check(out, q, k, v, "FP16", segments, rates)
    finally:
        try:
            client.unregister_system_shared_memory(name)
            client.unregister_system_shared_memory(alias)
        finally:
            shm.destroy_shared_memory_region(handle)


def test_flag_is_validated():
    with pytest.raises(RuntimeError, match="pipeline-min-tokens"):
        ServerProcess("--pipeline-min-tokens", "-1", name="pipeline-bad")
