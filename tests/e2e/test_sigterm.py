"""SIGTERM under load: every request accepted before the signal gets its correct answer, the
server exits 0."""

import queue
import signal

import numpy as np

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


def test_sigterm_finishes_accepted_requests(tmp_path):
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "config.pbtxt").write_text(HELD_MODEL)
    s = ServerProcess("--model-repository", str(tmp_path), "--grace-period-seconds", "60",
                      name="sigterm")
    c = s.client()
    rng = np.random.default_rng(11)
    results = queue.Queue()
    expected = {}
    for i in range(24):
        n = (64, 100, 128)[i % 3]
        q, k, v = (rng.uniform(-1, 1, (1, n, 2, 16)).astype(np.float32) for _ in range(3))
        expected[str(i)] = reference.dilated_attention(q, k, v, [32, 64], [1, 2])
        c.async_infer("held", make_inputs(q, k, v), request_id=str(i),
                      callback=lambda result, error: results.put((result, error)))
    # All 24 are queued (held by the 30 s batching delay) when the signal arrives.
    assert wait_until(lambda: s.metric("nv_inference_pending_request_count", model="held") == 24)
    s.proc.send_signal(signal.SIGTERM)
    for _ in range(24):
        result, error = results.get(timeout=60)
        assert error is None, error
        rid = result.get_response().id
        assert reference.relative_error(result.as_numpy("O"), expected[rid]) <= reference.FP32
    assert s.stop(timeout=60) == 0
    log = s.log_path.read_text()
    assert "finishing in-flight requests" in log and "shut down" in log


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
