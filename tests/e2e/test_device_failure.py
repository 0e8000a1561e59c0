"""A GPU that fails while serving: a CUDA error that leaves its context unusable for the rest of
the process (an illegal address, a kernel trap, an uncorrectable ECC error, a device fallen off the
bus). The server sends that GPU no more batches, answers on the other GPUs (UNAVAILABLE once none
is left, so that clients retry elsewhere), reports NOT_SERVING so that Kubernetes takes the
replica out of service and restarts it, exports dilattn_device_failed, and still shuts down
cleanly. DILATTN_TEST_TRAP_DEVICE=N makes GPU N's first job launch a kernel that traps."""

import concurrent.futures
import os
import signal

import grpc
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

import cuda_ipc
import reference
from conftest import ServerProcess, wait_until
from helpers import gpu_count, make_inputs, shared_memory_tensors

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


def _trap_server(gpu, name, *args):
    return ServerProcess(*args, name=name,
                         env=dict(os.environ, DILATTN_TEST_TRAP_DEVICE=str(gpu)))


def _inputs(heads, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.uniform(-1, 1, (1, 1024, heads, 64)).astype(np.float16) for _ in range(3))
    return q, k, v


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
    server = _trap_server(0, "device-failure-one", "--device", "cuda:0")
    client = server.client()
    try:
        assert _health(server) == SERVING
        assert client.is_server_ready()
        code, message, _ = _infer(client, 2, 1)  # GPU 0's first job traps
        assert code == "StatusCode.INTERNAL", (code, message)
        assert wait_until(lambda: _health(server) == NOT_SERVING)
        assert _health(server, "dilated_attention") == NOT_SERVING
        assert not client.is_server_ready()
        assert client.is_server_live()  # the process works: the orchestrator restarts it
        assert server.metric("dilattn_device_failed", device="cuda:0") == 1
        # Every later request: UNAVAILABLE, naming the failure, at once.
        for seed in range(2, 6):
            code, message, _ = _infer(client, 2, seed)
            assert code == "StatusCode.UNAVAILABLE", (code, message)
            assert "every GPU of this server has failed (cuda:0: " in message, message
            assert "retry on another replica" in message, message
    finally:
        assert server.stop(signal.SIGTERM, timeout=60) == 0, server.log_path.read_text()
    log = server.log_path.read_text()
    assert "DILATTN_TEST_TRAP_DEVICE is set" in log
    assert "device cuda:0 failed" in log


@pytest.mark.skipif(gpu_count() < 2, reason="needs two or more GPUs")
@pytest.mark.parametrize("failed", [0, 1])
def test_the_other_gpus_serve_after_one_fails(failed):
    """GPU 0 too: the pinned staging pool the GPUs share was allocated through it."""
    cudart = cuda_ipc.load_cudart()
    if cudart is None:
        pytest.skip("no CUDA runtime library for the client side")
    gpus = gpu_count()
    server = _trap_server(failed, f"device-failure-gpu{failed}", "--device", "cuda")
    client = server.client()
    q, k, v = _inputs(2, 7)
    n = q.nbytes
    buf = cuda_ipc.DeviceBuffer(cudart, 4 * n, device=failed)
    try:
        # A region on the GPU that will fail, registered (mapped by the server) while it works.
        for i, x in enumerate((q, k, v)):
            buf.write(x, offset=i * n)
        client.register_cuda_shared_memory("region", buf.raw_handle(), failed, 4 * n)
        inputs, outputs = shared_memory_tensors("region", q.shape, "FP16", n)
        # Rounds of requests of different shapes (no two batched together) at once, until the
        # failing GPU has taken one: its first job traps.
        failures = []
        for round_ in range(20):
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                results = list(pool.map(lambda h: _infer(client, h, 100 * round_ + h),
                                        range(1, 9)))
            failures += [(code, message) for code, message, _ in results if code is not None]
            if failures:
                break
        assert failures, f"GPU {failed} never took a request"
        assert all(code == "StatusCode.INTERNAL" for code, _ in failures), failures
        assert wait_until(
            lambda: server.metric("dilattn_device_failed", device=f"cuda:{failed}") == 1)
        assert _health(server) == NOT_SERVING
        for g in range(gpus):
            if g != failed:
                assert server.metric("dilattn_device_failed", device=f"cuda:{g}") == 0
        # The working GPUs answer everything from now on, right.
        for round_ in range(3):
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                results = list(pool.map(lambda h: _infer(client, h, 1000 + 10 * round_ + h),
                                        range(1, 9)))
            assert all(code is None for code, _, _ in results), results
        # A request in the failed GPU's memory is refused, not run on another GPU (reading the
        # failed GPU's mapping would fault that GPU too).
        with pytest.raises(InferenceServerException) as e:
            client.infer("dilated_attention", inputs, outputs=outputs, parameters=PARAMS)
        assert e.value.status() == "StatusCode.UNAVAILABLE", e.value
        assert f"CUDA shared memory on cuda:{failed}, which failed" in e.value.message()
        code, message, _ = _infer(client, 3, 5000)
        assert code is None, (code, message)
        for g in range(gpus):
            if g != failed:
                assert server.metric("dilattn_device_failed", device=f"cuda:{g}") == 0
    finally:
        assert server.stop(signal.SIGTERM, timeout=60) == 0, server.log_path.read_text()
        buf.free()
    assert f"device cuda:{failed} failed" in server.log_path.read_text()
