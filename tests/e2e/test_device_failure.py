"""A GPU that fails while serving: a CUDA error that corrupts its context (an illegal address, a
kernel trap, an uncorrectable ECC error, a device fallen off the bus), after which CUDA reports
the error for every GPU of the process. The server stops using its GPUs, answers every later
request UNAVAILABLE at once (clients retry on another replica), reports NOT_SERVING so that
Kubernetes takes the replica out of service and restarts it, exports dilattn_device_failed for
the GPU the error showed on, and still shuts down cleanly; likewise for a GPU whose job does not
finish within --gpu-job-timeout-seconds (hung), except that on SIGTERM the process exits at once
(status 1) rather than wait for the hung job, and 5 s after its grace period when the hang was not
yet found. DILATTN_TEST_TRAP_DEVICE=N makes GPU N's first
job launch a kernel that traps, DILATTN_TEST_HANG_DEVICE=N one that runs for 20 seconds after
its work."""

import base64
import concurrent.futures
import os
import signal
import time

import grpc
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

import attend
import reference
from conftest import ServerProcess, wait_until
from helpers import gpu_count, make_inputs, random_qkv

pytestmark = pytest.mark.skipif(not reference.ON_GPU,
                                reason="needs a GPU server (DILATTN_E2E_DEVICE=cuda)")

PARAMS = {"segment_lengths": "256,512", "dilation_rates": "1,2"}

# grpc.health.v1.HealthCheckResponse{status: SERVING} and {status: NOT_SERVING}.
SERVING, NOT_SERVING = b"\x08\x01", b"\x08\x02"


def _health(server, service=""):
    request = b"" if not service else bytes([0x0A, len(service)]) + service.encode()
    with grpc.insecure_channel(server.url) as channel:
        call = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                   response_deserializer=None)
        return call(request, timeout=10)


def _faulty_server(fault, gpu, name, *args):
    """A server whose GPU `gpu` has DILATTN_TEST_{fault}_DEVICE's fault (TRAP or HANG)."""
    return ServerProcess(*args, name=name,
                         env=dict(os.environ, **{f"DILATTN_TEST_{fault}_DEVICE": str(gpu)}))


def _inputs(heads, seed):
    return tuple(x.astype(np.float16) for x in random_qkv((1, 1024, heads, 64), seed))


def _check(out, q, k, v):
    expected = reference.dilated_attention(*(x.astype(np.float32) for x in (q, k, v)),
                                           [256, 512], [1, 2])
    err = reference.relative_error(out.astype(np.float32), expected)
    assert err <= reference.TOLERANCE["FP16"], err


def _infer(client, heads, seed):
    """(status code name or None, message, output)."""
    q, k, v = _inputs(heads, seed)
    try:
        result = client.infer("dilated_attention", make_inputs(q, k, v, "FP16"),
                              parameters=PARAMS)
    except InferenceServerException as e:
        return e.status(), e.message(), None
    out = result.as_numpy("O")
    _check(out, q, k, v)
    return None, "", out


def test_a_failed_gpu_takes_the_server_out_of_service():
    server = _faulty_server("TRAP", 0, "device-failure-one", "--device", "cuda:0")
    client = server.client()
    try:
        assert _health(server) == SERVING
        assert client.is_server_ready()
        code, message, _ = _infer(client, 2, 1)  # GPU 0's first job traps
        assert code == "StatusCode.INTERNAL", (code, message)
        assert wait_until(lambda: _health(server) == NOT_SERVING)
        assert _health(server, "dilated_attention") == NOT_SERVING
        assert not client.is_server_ready()
        # Not live either: only a restart cures it (HTTP probes ask the metrics port).
        assert not client.is_server_live()
        assert server.http_get("/v2/health/live") == (400, "not live\n")
        assert server.metric("dilattn_device_failed", device="cuda:0") == 1
        # Every later request: UNAVAILABLE, naming the failure, at once (whatever its size: none
        # needs the pinned pool, which cannot grow now).
        for seed in range(2, 6):
            code, message, _ = _infer(client, seed, seed)
            assert code == "StatusCode.UNAVAILABLE", (code, message)
            assert "this server's GPUs stopped after a device error (cuda:0: " in message, message
            assert "retry on another replica" in message, message
        # A CUDA region too: refused as the requests are, not as a bad handle.
        with pytest.raises(InferenceServerException) as e:
            client.register_cuda_shared_memory("c", base64.b64encode(b"\0" * 64), 0, 1024)
        assert e.value.status() == "StatusCode.UNAVAILABLE", e.value
        assert "this server's GPUs stopped after a device error" in e.value.message()
    finally:
        assert server.stop(signal.SIGTERM, timeout=60) == 0, server.log_path.read_text()
    log = server.log_path.read_text()
    assert "DILATTN_TEST_TRAP_DEVICE is set" in log
    assert "cuda:0: cudaErrorLaunchFailure" in log, log


def _attend_error(server, shape, seed):
    """The status a native stream of `shape` (FP16, stretches of 1024 tokens) ends with."""
    q, k, v = random_qkv(shape, seed)
    messages = [attend.header("dilated_attention", shape, "FP16",
                              {"segment_lengths": "512,1024", "dilation_rates": "1,2"})]
    messages += attend.chunks(q, k, v, "FP16", 512)
    with grpc.insecure_channel(server.url) as channel:
        with pytest.raises(grpc.RpcError) as e:
            for _ in attend.stream(channel)(iter(messages), timeout=60):
                pass
    return e.value.code(), e.value.details()


def test_a_native_stream_on_a_failed_gpu_ends_with_the_error():
    server = _faulty_server("TRAP", 0, "device-failure-stream", "--device", "cuda:0")
    try:
        # Its first stretch traps; the others fail or are refused, and the stream ends with the
        # first error to come back (the trap's, or a refusal naming it) rather than waiting for
        # its deadline.
        code, details = _attend_error(server, (1, 4096, 2, 64), 1)
        assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE), (code, details)
        assert "cudaErrorLaunchFailure" in details, details
        code, details = _attend_error(server, (1, 2048, 2, 64), 2)
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "this server's GPUs stopped after a device error (cuda:0: " in details, details
        assert not server.client().is_server_live()  # answers, and asks for a restart
        # Nothing of either stream is left behind.
        assert wait_until(lambda: server.metric("dilattn_buffer_pool_leases") == 0, timeout=30)
    finally:
        assert server.stop(signal.SIGTERM, timeout=60) == 0, server.log_path.read_text()


def _stop(server, hung, pool):
    """SIGTERM while `hung` (a future of _infer on `pool`) waits: the exit status, the seconds the
    process took to end, the hung request's _infer result, and the log."""
    stopping = time.monotonic()
    exit_code = server.stop(signal.SIGTERM, timeout=90)
    stopped_in = time.monotonic() - stopping
    result = hung.result(timeout=60)
    pool.shutdown()
    return exit_code, stopped_in, result, server.log_path.read_text()


def _hang(name, job_timeout):
    """A one-GPU server (grace period 1 s) whose first job runs for 20 s, and that job's request
    sent: (server, its client, the pool, the request's future, when it was sent)."""
    server = _faulty_server("HANG", 0, name, "--device", "cuda:0", "--gpu-job-timeout-seconds",
                            str(job_timeout), "--grace-period-seconds", "1")
    client = server.client()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    began = time.monotonic()
    return server, client, pool, pool.submit(_infer, client, 2, 1), began


def test_a_hung_gpu_takes_the_server_out_of_service():
    server, client, pool, hung, began = _hang("device-hang", 2)
    try:
        assert wait_until(lambda: _health(server) == NOT_SERVING, timeout=15)
        assert time.monotonic() - began >= 2  # not before the timeout
        assert not hung.done()
        assert server.metric("dilattn_device_failed", device="cuda:0") == 1
        assert server.http_get("/v2/health/live") == (400, "not live\n")
        assert server.http_get("/v2/health/ready") == (400, "not ready\n")
        # Refused at once, though the hung device holds the server's only engine thread.
        asked = time.monotonic()
        code, message, _ = _infer(client, 2, 2)
        assert time.monotonic() - asked < 5
        assert not hung.done()
        assert code == "StatusCode.UNAVAILABLE", (code, message)
        assert "cuda:0: a GPU job has not finished in" in message, message
        assert "(--gpu-job-timeout-seconds 2); the device is taken as hung" in message, message
    finally:
        exit_code, stopped_in, (hung_code, hung_message, _), log = _stop(server, hung, pool)
    assert "the device is taken as hung" in log
    # Nothing waits for a hung device: the process ends at once, long before the 20 s kernel
    # would, and says so; the hung request's client sees the connection close.
    assert exit_code == 1, log
    assert stopped_in < 10, (stopped_in, log)
    assert ("1 request(s) the hung GPU holds can never be answered; exiting without waiting for "
            "them") in log, log
    assert hung_code == "StatusCode.UNAVAILABLE", (hung_code, hung_message)


def test_sigterm_does_not_wait_for_a_hang_not_yet_found():
    # The 20 s job is not yet past --gpu-job-timeout-seconds when SIGTERM comes, so nothing
    # knows the device is hung: the shutdown waits for it through the grace period and 5 s more,
    # then the process ends, saying what it left, long before the job would end.
    server, _, pool, hung, _ = _hang("device-hang-sigterm", 120)
    try:
        # On the device: its thread waits for it.
        assert wait_until(lambda: server.metric("dilattn_engine_seconds_total", device="cuda:0",
                                                phase="wait") > 1, timeout=15)
    finally:
        exit_code, stopped_in, (hung_code, hung_message, _), log = _stop(server, hung, pool)
    assert exit_code == 1, log
    assert 5.5 < stopped_in < 12, (stopped_in, log)
    assert "the device is taken as hung" not in log, log
    assert ("still shutting down 5s after the grace period (1 RPC(s) still open; cuda:0: a job "
            "running for ") in log, log
    assert ", 1 request(s)); exiting without waiting" in log, log
    assert hung_code in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"), (hung_code,
                                                                             hung_message)


@pytest.mark.skipif(gpu_count() < 2, reason="needs two or more GPUs")
@pytest.mark.parametrize("failed", [0, 1])
def test_an_error_on_one_gpu_stops_them_all(failed):
    gpus = gpu_count()
    server = _faulty_server("TRAP", failed, f"device-failure-gpu{failed}", "--device", "cuda")
    client = server.client()
    try:
        # Rounds of requests of different shapes (no two batched together) at once, until the
        # failing GPU has taken one: its first job traps. Requests running beside it on the
        # other GPU may fail too (INTERNAL), or find the GPUs stopped (UNAVAILABLE).
        failures = []
        for round_ in range(20):
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                results = list(pool.map(lambda h: _infer(client, h, 100 * round_ + h),
                                        range(1, 9)))
            failures += [(code, message) for code, message, _ in results if code is not None]
            if failures:
                break
        assert failures, f"GPU {failed} never took a request"
        assert any(code == "StatusCode.INTERNAL" for code, _ in failures), failures
        assert all(code in ("StatusCode.INTERNAL", "StatusCode.UNAVAILABLE")
                   for code, _ in failures), failures
        assert wait_until(
            lambda: server.metric("dilattn_device_failed", device=f"cuda:{failed}") == 1)
        assert _health(server) == NOT_SERVING
        assert not client.is_server_ready()
        for g in range(gpus):
            if g != failed:
                assert server.metric("dilattn_device_failed", device=f"cuda:{g}") == 0
        # Every later request, whichever GPU would have taken it: UNAVAILABLE at once.
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda h: _infer(client, h, 1000 + h), range(1, 9)))
        for code, message, _ in results:
            assert code == "StatusCode.UNAVAILABLE", (code, message)
            assert f"GPUs stopped after a device error (cuda:{failed}: " in message, message
    finally:
        assert server.stop(signal.SIGTERM, timeout=60) == 0, server.log_path.read_text()
    assert f"cuda:{failed}: cudaErrorLaunchFailure" in server.log_path.read_text()
