"""The native streaming API (dilattn.v1.DilatedAttention/Attend): Q, K and V in chunks, O back in
chunks; stretches computed as their tokens arrive; problems larger than one message; every bad
stream ended with a status naming the problem."""

import threading

import grpc
import numpy as np
import pytest

import attend
import reference
from conftest import ServerProcess, wait_until
from helpers import make_inputs, random_qkv, to_wire

SMALL = {"segment_lengths": "16,32,64", "dilation_rates": "1,2,4"}


def _run(server, messages, shape, datatype, timeout=60):
    with grpc.insecure_channel(server.url) as channel:
        return attend.collect(attend.stream(channel)(iter(messages), timeout=timeout), shape,
                              datatype)


@pytest.mark.parametrize("model,datatype,params,stretch", [
    ("dilated_attention", "FP32", SMALL, 64),
    ("dilated_attention", "BF16", {**SMALL, "causal": "true"}, 64),
    ("dilated_attention_head_groups", "FP16", {**SMALL, "segment_lengths": "16,48,24"}, 48),
    ("dilated_attention", "FP32", {"segment_lengths": "500", "dilation_rates": "2"}, 200),
])
def test_stream_matches_the_reference(server, model, datatype, params, stretch):
    shape = (2, 200, 4, 16)  # stretches of 64: 64, 64, 64 and a short 8 per sequence
    q, k, v = random_qkv(shape, 1)
    messages = [attend.header(model, shape, datatype, params)]
    messages += attend.chunks(q, k, v, datatype, tokens_per_chunk=24)
    accepted, o = _run(server, messages, shape, datatype)
    assert accepted.stretch_tokens == stretch
    mode = "head_groups" if model.endswith("head_groups") else "longnet"
    ref = reference.dilated_attention(
        *(to_wire(x, datatype) for x in (q, k, v)),
        [int(w) for w in params["segment_lengths"].split(",")],
        [int(r) for r in params["dilation_rates"].split(",")], mode=mode,
        causal=params.get("causal") == "true")
    err = reference.relative_error(o, ref)
    assert err <= reference.TOLERANCE[datatype], err


def test_block_sparse_stream_equals_unary(server, client):
    shape = (1, 256, 2, 16)
    q, k, v = random_qkv(shape, 2)
    params = {"block_size": "32", "pattern": "global_local", "global_blocks": "1", "window": "1"}
    messages = [attend.header("block_sparse_attention", shape, "FP32", params)]
    messages += attend.chunks(q, k, v, "FP32", tokens_per_chunk=100)
    accepted, o = _run(server, messages, shape, "FP32")
    assert accepted.stretch_tokens == 256  # patterns span the sequence: one stretch
    unary = client.infer("block_sparse_attention", make_inputs(q, k, v),
                         parameters={**params, "block_size": 32, "global_blocks": 1,
                                     "window": 1}).as_numpy("O")
    assert np.array_equal(o, unary)


def test_output_streams_while_input_still_arrives(server):
    # The client holds back everything after the first stretch until that stretch's output has
    # come back: a server that waited for the whole input would never answer (the test's timeout).
    shape = (1, 512, 2, 8)
    q, k, v = random_qkv(shape, 3)
    params = {"segment_lengths": "32,64", "dilation_rates": "1,2"}
    first_output = threading.Event()
    outbox = attend.Outbox([attend.header("dilated_attention", shape, "FP32", params)] +
                           attend.chunks(q, k, v, "FP32", 64, first=0, last=64))

    def responses(it):
        for r in it:
            if r.HasField("output") and not first_output.is_set():
                first_output.set()
                assert r.output.token == 0
                for m in attend.chunks(q, k, v, "FP32", 64, first=64):
                    outbox.put(m)
                outbox.close()
            yield r

    with grpc.insecure_channel(server.url) as channel:
        call = attend.stream(channel)(iter(outbox), timeout=30)
        _, o = attend.collect(responses(call), shape, "FP32")
    assert first_output.is_set()
    ref = reference.dilated_attention(q, k, v, [32, 64], [1, 2])
    assert reference.relative_error(o, ref) <= reference.TOLERANCE["FP32"]


def test_problem_larger_than_any_message():
    # Messages are capped at 256 KiB here; Q, K and V hold 6 MiB, O 2 MiB.
    s = ServerProcess("--max-message-bytes", str(256 << 10), name="small-messages")
    try:
        shape = (1, 4096, 4, 32)
        q, k, v = random_qkv(shape, 4)
        params = {"segment_lengths": "1024,2048", "dilation_rates": "1,4"}
        messages = [attend.header("dilated_attention", shape, "FP32", params)]
        messages += attend.chunks(q, k, v, "FP32", tokens_per_chunk=256)  # 128 KiB each
        accepted, o = _run(s, messages, shape, "FP32")
        assert accepted.max_chunk_bytes <= 256 << 10
        ref = reference.dilated_attention(q, k, v, [1024, 2048], [1, 4])
        assert reference.relative_error(o, ref) <= reference.TOLERANCE["FP32"]
        c = s.client()
        with pytest.raises(Exception):
            c.infer("dilated_attention", make_inputs(q, k, v), parameters=params)
    finally:
        assert s.stop() == 0


def _expect_error(server, messages, code, needle):
    with grpc.insecure_channel(server.url) as channel:
        with pytest.raises(grpc.RpcError) as e:
            for _ in attend.stream(channel)(iter(messages), timeout=30):
                pass
    assert e.value.code() == code, (e.value.code(), e.value.details())
    assert needle in e.value.details(), e.value.details()


SHAPE = (1, 64, 2, 8)
X = np.zeros(SHAPE, dtype=np.float32)
HEADER = attend.header("dilated_attention", SHAPE, "FP32", SMALL)
TOKEN = 2 * 8 * 4
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("messages,code,needle", [
    ([], INVALID, "the stream ended before its header"),
    ([attend.chunk(attend.pb.Q, 0, b"\0" * TOKEN)], INVALID, "a chunk before the header"),
    ([attend.header("nope", SHAPE)], grpc.StatusCode.NOT_FOUND, "'nope'"),
    ([attend.header("dilated_attention", (64, 2, 8))], INVALID,
     "shape [64,2,8] has 3 dims; expected [B, N, H, D]"),
    ([attend.header("dilated_attention", (1, 0, 2, 8))], INVALID, "dim N=0"),
    ([attend.pb.AttendRequest(header=attend.pb.Header(model="dilated_attention",
                                                      shape=list(SHAPE)))], INVALID,
     "datatype 0 (DATA_TYPE_UNSPECIFIED) is not FP32, FP16 or BF16"),
    ([attend.header("dilated_attention", (1, 2**40, 2**20, 2**20))], INVALID, "overflows"),
    ([attend.header("dilated_attention", (1, 2**30, 64, 64))], grpc.StatusCode.RESOURCE_EXHAUSTED,
     "bytes of staging memory"),
    ([attend.header("dilated_attention", SHAPE, "FP32", {"segment_lengths": "16"})], INVALID,
     "segment_lengths has 1 entries but dilation_rates has 5"),
    ([attend.header("dilated_attention", SHAPE, "FP32", {"nope": "1"})], INVALID,
     "header parameter 'nope' is not known"),
    ([HEADER, HEADER], INVALID, "a second header"),
    ([HEADER, attend.chunk(attend.pb.Q, 8, b"\0" * TOKEN)], INVALID,
     "chunk of Q at token 8: expected token 0"),
    ([HEADER, attend.chunk(attend.pb.K, 0, b"\0" * (TOKEN + 4))], INVALID,
     "is not a positive whole number of tokens of 64 bytes"),
    ([HEADER, attend.chunk(attend.pb.V, 0, b"\0" * (65 * TOKEN))], INVALID,
     "65 tokens run past the 64"),
    ([HEADER, attend.chunk(attend.pb.TENSOR_UNSPECIFIED, 0, b"\0" * TOKEN)], INVALID,
     "tensor 0 is not Q, K or V"),
    ([HEADER, attend.pb.AttendRequest()], INVALID, "neither header nor chunk"),
    ([HEADER] + attend.chunks(X, X, X, "FP32", 16, last=32), INVALID,
     "the stream ended after tokens Q 32, K 32, V 32 of 64"),
    # One token short: the boundary of the same check.
    ([HEADER] + attend.chunks(X, X, X, "FP32", 16, last=63), INVALID,
     "the stream ended after tokens Q 63, K 63, V 63 of 64"),
])
def test_bad_streams(server, client, messages, code, needle):
    _expect_error(server, messages, code, needle)
    assert client.is_server_live() and client.is_server_ready()


def test_cancelled_stream_leaves_nothing_behind(server, client):
    shape = (1, 4096, 8, 64)
    q, k, v = random_qkv(shape, 5)
    params = {"segment_lengths": "512,1024", "dilation_rates": "1,2"}  # stretches of 1024
    outbox = attend.Outbox([attend.header("dilated_attention", shape, "FP32", params)] +
                           attend.chunks(q, k, v, "FP32", 512, last=2048))

    with grpc.insecure_channel(server.url) as channel:
        call = attend.stream(channel)(iter(outbox), timeout=30)
        first = next(call)
        assert first.HasField("accepted")
        call.cancel()
        outbox.close()
        with pytest.raises(grpc.RpcError) as e:
            for _ in call:
                pass
        assert e.value.code() == grpc.StatusCode.CANCELLED
    assert client.is_server_live()
    # The pool's leases all come back once the stream's stretches have drained.
    assert wait_until(lambda: server.metric("dilattn_buffer_pool_leases") == 0, timeout=30)
    assert server.metric("nv_inference_pending_request_count") == 0


def test_cli_attend_equals_unary_infer(server):
    # dilattn-client's attend command (the C++ client library's chunked stream) and its infer
    # command send the same random tensors: their outputs' checksums agree.
    import os
    import pathlib
    import re
    import subprocess

    binary = os.environ.get("DILATTN_CLIENT_BIN", str(
        pathlib.Path(__file__).resolve().parents[2] / "build" / "client" / "dilattn-client"))
    common = ["--url", server.url, "--shape", "2,3000,4,32", "--param",
              "segment_lengths=512,1024", "--param", "dilation_rates=1,2"]
    sums = {}
    for command in ("infer", "attend"):
        extra = ["--chunk-mib", "0.25"] if command == "attend" else []
        out = subprocess.run([binary, command, *common, *extra], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        sums[command] = float(re.search(r"sum (\S+)", out).group(1))
        if command == "attend":
            assert "stretches of 1024 tokens" in out, out
    # On the GPU the fp32 tensors are computed in fp16, as stretches or as one problem.
    tolerance = 1e-3 if reference.ON_GPU else 1e-6
    assert sums["attend"] == pytest.approx(sums["infer"], rel=tolerance, abs=tolerance), sums


def test_python_client_attend(server):
    # The shipped client's one-call API, with bf16 arrays and chunks smaller than a stretch.
    import ml_dtypes

    shape = (1, 700, 4, 32)
    q, k, v = (x.astype(ml_dtypes.bfloat16) for x in random_qkv(shape, 6))
    params = {"segment_lengths": "128,256", "dilation_rates": "1,2", "causal": "true"}
    with grpc.insecure_channel(server.url) as channel:
        o = attend.dilattn_stream.attend(channel, q, k, v, parameters=params,
                                         chunk_bytes=100 * 4 * 32 * 2, timeout=60)
        with pytest.raises(ValueError):
            attend.dilattn_stream.attend(channel, q.astype(np.float64), k, v)
        with pytest.raises(grpc.RpcError) as e:
            attend.dilattn_stream.attend(channel, q, k, v, model="nope")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # Refused before the stream opens, with the reason (raised in gRPC's request thread
        # they came back as UNKNOWN "Exception iterating requests!"; an empty dim divided by 0).
        with pytest.raises(ValueError, match="unsigned 32-bit"):
            attend.dilattn_stream.attend(channel, q, k, v, priority=-1)
        empty = np.zeros((1, 16, 0, 32), dtype=ml_dtypes.bfloat16)
        with pytest.raises(ValueError, match=">= 1"):
            attend.dilattn_stream.attend(channel, empty, empty, empty)
    assert o.dtype == ml_dtypes.bfloat16 and o.shape == shape
    ref = reference.dilated_attention(*(x.astype(np.float32) for x in (q, k, v)), [128, 256],
                                      [1, 2], causal=True)
    assert reference.relative_error(o.astype(np.float32), ref) <= reference.TOLERANCE["BF16"]


def test_python_client_refuses_output_that_is_not_whole_tokens():
    """A reply chunk whose bytes are not whole tokens is the documented StreamError, not a
    NumPy reshape error."""
    pb = attend.dilattn_stream.pb
    replies = [pb.AttendResponse(accepted=pb.Accepted(stretch_tokens=8, max_chunk_bytes=1 << 20)),
               pb.AttendResponse(output=pb.OutputChunk(token=0, data=b"\0" * 6))]
    with pytest.raises(attend.dilattn_stream.StreamError, match="not whole tokens"):
        attend.dilattn_stream.collect(iter(replies), (1, 4, 1, 2), "FP32")


def test_idle_stream_is_ended_and_its_memory_released():
    # A client that stops sending before its input is complete holds a lease of four tensors;
    # after --stream-idle-seconds the server ends the stream and takes the lease back. A client
    # that sends slowly but steadily, or that has sent everything and waits for O, is not idle.
    import time

    s = ServerProcess("--stream-idle-seconds", "1", name="stream-idle")
    try:
        shape = (1, 512, 2, 8)
        q, k, v = random_qkv(shape, 7)
        params = {"segment_lengths": "64", "dilation_rates": "1"}
        first = [attend.header("dilated_attention", shape, "FP32", params)]
        outbox = attend.Outbox(first + attend.chunks(q, k, v, "FP32", 64, last=128))
        with grpc.insecure_channel(s.url) as channel:
            start = time.time()
            with pytest.raises(grpc.RpcError) as e:
                for _ in attend.stream(channel)(iter(outbox), timeout=30):
                    pass
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
            assert "sent nothing for 1s" in e.value.details()
            assert 1 <= time.time() - start < 10
            outbox.close()
            assert wait_until(lambda: s.metric("dilattn_buffer_pool_leases") == 0, timeout=30)

            def slow():
                yield first[0]
                for m in attend.chunks(q, k, v, "FP32", 64):
                    time.sleep(0.1)  # 24 messages over 2.4 s, never 1 s apart
                    yield m

            _, o = attend.collect(attend.stream(channel)(slow(), timeout=30), shape, "FP32")
            ref = reference.dilated_attention(q, k, v, [64], [1])
            assert reference.relative_error(o, ref) <= reference.TOLERANCE["FP32"]

            # All input sent at once, then a computation that may well outlast the idle limit
            # (about 1.5 s on two cores): the stream is waiting for the server, not idle.
            big = (1, 32768, 8, 64)
            bq, bk, bv = random_qkv(big, 8)
            _, o = attend.collect(attend.stream(channel)(iter(
                [attend.header("dilated_attention", big, "FP32")] +
                attend.chunks(bq, bk, bv, "FP32", 4096)), timeout=120), big, "FP32")
            assert np.isfinite(o).all()
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("all_input", [False, True], ids=["half-sent", "all-sent"])
def test_stream_that_stops_reading_is_ended_and_its_memory_released(all_input):
    # The client stops reading its output (32 or 64 MB: more than any flow-control window), so
    # the server's write waits on flow control forever. Half-sent, it also stops sending; all
    # sent, the stream waits for no input and only the unread output can make it idle. Either
    # way the stream must end after --stream-idle-seconds and give its lease back.
    s = ServerProcess("--stream-idle-seconds", "1",
                      name="stream-unread-full" if all_input else "stream-unread")
    try:
        shape = (1, 65536, 4, 64)
        q = np.random.default_rng(3).uniform(-1, 1, shape).astype(np.float32)
        params = {"segment_lengths": "256", "dilation_rates": "1"}
        last = None if all_input else shape[1] // 2
        outbox = attend.Outbox([attend.header("dilated_attention", shape, "FP32", params)] +
                               attend.chunks(q, q, q, "FP32", 2048, last=last))
        with grpc.insecure_channel(s.url) as channel:
            call = attend.stream(channel)(iter(outbox), timeout=60)
            assert wait_until(lambda: s.metric("dilattn_buffer_pool_leases") >= 1, timeout=30)
            # Not reading: the lease must go back within the idle limit and the watchdog's period.
            assert wait_until(lambda: s.metric("dilattn_buffer_pool_leases") == 0, timeout=30)
            with pytest.raises(grpc.RpcError) as e:
                for _ in call:
                    pass
            assert e.value.code() in (grpc.StatusCode.CANCELLED,
                                      grpc.StatusCode.DEADLINE_EXCEEDED), e.value.details()
            outbox.close()
        assert s.metric("dilattn_native_streams_open") == 0
    finally:
        assert s.stop() == 0


def test_stream_metrics(server):
    shape = (1, 300, 2, 8)
    q, k, v = random_qkv(shape, 9)
    before_in = server.metric("dilattn_native_stream_bytes_total", direction="in")
    before_out = server.metric("dilattn_native_stream_bytes_total", direction="out")
    messages = [attend.header("dilated_attention", shape, "FP32", SMALL)]
    messages += attend.chunks(q, k, v, "FP32", tokens_per_chunk=50)
    _run(server, messages, shape, "FP32")
    tensor = 300 * 2 * 8 * 4
    assert server.metric("dilattn_native_stream_bytes_total", direction="in") == (
        before_in + 3 * tensor)
    assert server.metric("dilattn_native_stream_bytes_total", direction="out") == (
        before_out + tensor)
    assert wait_until(lambda: server.metric("dilattn_native_streams_open") == 0)


def test_concurrent_streams_stay_exact(server, client):
    # Stretches of several streams share the model's batcher and may be packed into one
    # execution with each other; every stream still gets exactly its own output, and each
    # stretch counts as one inference.
    from concurrent.futures import ThreadPoolExecutor

    params = {"segment_lengths": "32,64", "dilation_rates": "1,2"}
    shapes = [(1, n, 2, 8) for n in (200, 333, 512, 640, 1000, 1024, 64, 129)]
    inputs = [random_qkv(shape, 20 + i) for i, shape in enumerate(shapes)]
    before = client.get_inference_statistics("dilated_attention").model_stats[0]

    def one(i):
        q, k, v = inputs[i]
        messages = [attend.header("dilated_attention", shapes[i], "FP32", params)]
        messages += attend.chunks(q, k, v, "FP32", tokens_per_chunk=37)
        return _run(server, messages, shapes[i], "FP32")[1]

    with ThreadPoolExecutor(len(shapes)) as pool:
        outputs = list(pool.map(one, range(len(shapes))))
    for (q, k, v), o in zip(inputs, outputs):
        ref = reference.dilated_attention(q, k, v, [32, 64], [1, 2])
        assert reference.relative_error(o, ref) <= reference.TOLERANCE["FP32"]
    after = client.get_inference_statistics("dilated_attention").model_stats[0]
    stretches = sum(-(-shape[1] // 64) for shape in shapes)
    assert after.inference_count - before.inference_count == stretches
