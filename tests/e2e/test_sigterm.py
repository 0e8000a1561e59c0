"""SIGTERM under load: every request accepted before the signal gets its correct answer, new ones
are refused while the open ones finish, and the server exits 0 within its grace period."""

import queue
import signal
import socket
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

import reference
from conftest import ServerProcess, wait_until
from helpers import make_inputs

HELD_MODEL = """
name: "held"
max_batch_size: 64
dynamic_batching { preferred_batch_size: [ 64 ] max_queue_delay_microseconds: 30000000 }
parameters { key: "segment_lengths" value { string_value: "32,64" } }
parameters { key: "dilation_rates" value { string_value: "1,2" } }
"""
SMALL_MODEL = """
name: "small"
max_batch_size: 8
parameters { key: "segment_lengths" value { string_value: "32,64" } }
parameters { key: "dilation_rates" value { string_value: "1,2" } }
"""


def serve_model(tmp_path, name, config, log_name):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.pbtxt").write_text(config)
    return ServerProcess("--model-repository", str(tmp_path), "--grace-period-seconds", "60",
                         name=log_name)


def small_problem(rng, n):
    """Q, K, V of (1, n, 2, 16) and the output both models above must give."""
    q, k, v = (rng.uniform(-1, 1, (1, n, 2, 16)).astype(np.float32) for _ in range(3))
    return q, k, v, reference.dilated_attention(q, k, v, [32, 64], [1, 2])


def test_sigterm_finishes_accepted_requests(tmp_path):
    s = serve_model(tmp_path, "held", HELD_MODEL, "sigterm")
    c = s.client()
    rng = np.random.default_rng(11)
    results = queue.Queue()
    expected = {}
    for i in range(24):
        q, k, v, expected[str(i)] = small_problem(rng, (64, 100, 128)[i % 3])
        c.async_infer("held", make_inputs(q, k, v), request_id=str(i),
                      callback=lambda result, error: results.put((result, error)))
    # All 24 are queued (held by the 30 s batching delay) when the signal arrives.
    assert wait_until(lambda: s.metric("nv_inference_pending_request_count", model="held") == 24)
    s.proc.send_signal(signal.SIGTERM)
    for _ in range(24):
        result, error = results.get(timeout=60)
        assert error is None, f"{error.status()}: {error.message()}\n{s.log_path.read_text()}"
        rid = result.get_response().id
        assert reference.relative_error(result.as_numpy("O"), expected[rid]) <= reference.FP32
    assert s.stop(timeout=60) == 0
    log = s.log_path.read_text()
    assert "finishing in-flight requests" in log and "shut down" in log


def test_sigterm_refuses_new_requests_while_open_streams_finish(tmp_path):
    # An open ModelStreamInfer stream keeps the server draining: new RPCs are refused as
    # UNAVAILABLE (clients retry elsewhere), the stream's further requests are still answered,
    # and the server exits as soon as the stream closes, long before its grace period ends.
    s = serve_model(tmp_path, "small", SMALL_MODEL, "sigterm-drain")
    c = s.client()
    rng = np.random.default_rng(13)
    results = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        def stream_request():
            q, k, v, ref = small_problem(rng, 128)
            c.async_stream_infer("small", make_inputs(q, k, v))
            result, error = results.get(timeout=30)
            assert error is None, f"{error.status()}: {error.message()}"
            assert reference.relative_error(result.as_numpy("O"), ref) <= reference.FP32

        stream_request()
        s.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: "finishing in-flight requests" in s.log_path.read_text())
        assert not c.is_server_ready()
        # Out of the Service's endpoints, but not to be restarted while it drains.
        assert s.http_get("/v2/health/ready") == (400, "not ready\n")
        assert s.http_get("/v2/health/live") == (200, "live\n")
        other = s.client()
        q, k, v, _ = small_problem(rng, 128)
        with pytest.raises(InferenceServerException) as refused:
            other.infer("small", make_inputs(q, k, v))
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert "shutting down" in refused.value.message()
        stream_request()
        assert s.alive()
    finally:
        c.stop_stream()
    start = time.monotonic()
    assert s.stop(timeout=30) == 0
    assert time.monotonic() - start < 10


def test_sigterm_exits_within_the_grace_period_despite_a_peer_that_ignores_goaway():
    s = ServerProcess("--grace-period-seconds", "2", name="sigterm-peer")
    peer = socket.create_connection(("127.0.0.1", s.grpc_port))
    try:
        # An HTTP/2 client preface and SETTINGS, then silence: it never answers GOAWAY's ping.
        peer.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        assert s.client().is_server_live()
        start = time.monotonic()
        assert s.stop(timeout=30) == 0
        assert time.monotonic() - start < 10
    finally:
        peer.close()


def test_sigterm_lets_an_open_stream_finish():
    # A native stream half sent when the signal arrives still gets its whole output: its later
    # stretches are scheduled during the grace period.
    import threading

    import grpc

    import attend

    s = ServerProcess("--grace-period-seconds", "60", name="sigterm-stream")
    shape = (1, 1024, 2, 16)
    rng = np.random.default_rng(12)
    q, k, v = (rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(3))
    params = {"segment_lengths": "64,128", "dilation_rates": "1,2"}
    outbox = attend.Outbox([attend.header("dilated_attention", shape, "FP32", params)] +
                           attend.chunks(q, k, v, "FP32", 128, last=512))
    first_output = threading.Event()

    def responses(it):
        for r in it:
            if r.HasField("output"):
                first_output.set()
            yield r

    def finish_after_signal():
        assert first_output.wait(30)
        s.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: "finishing in-flight requests" in s.log_path.read_text())
        for m in attend.chunks(q, k, v, "FP32", 128, first=512):
            outbox.put(m)
        outbox.close()

    sender = threading.Thread(target=finish_after_signal)
    sender.start()
    with grpc.insecure_channel(s.url) as channel:
        _, o = attend.collect(responses(attend.stream(channel)(iter(outbox), timeout=60)), shape,
                              "FP32")
    sender.join()
    ref = reference.dilated_attention(q, k, v, [64, 128], [1, 2])
    assert reference.relative_error(o, ref) <= reference.FP32
    assert s.stop(timeout=60) == 0
