"""Concurrent clients with mixed lengths: every answer correct, and the batcher really batched."""

import concurrent.futures

import numpy as np

import reference
from helpers import engine_seconds, make_inputs

PARAMS = {"segment_lengths": "32,64", "dilation_rates": "1,2"}
LENGTHS = [48, 64, 100, 128, 200]


def _client_run(server, index):
    c = server.client()
    rng = np.random.default_rng(1000 + index)
    worst = 0.0
    for i in range(20):
        n = LENGTHS[(index + i) % len(LENGTHS)]
        q, k, v = (rng.uniform(-1, 1, (1, n, 4, 32)).astype(np.float32) for _ in range(3))
        out = c.infer("dilated_attention", make_inputs(q, k, v), parameters=PARAMS).as_numpy("O")
        expected = reference.dilated_attention(q, k, v, [32, 64], [1, 2])
        worst = max(worst, reference.relative_error(out, expected))
    return worst


def test_32_clients_20_requests_each_mixed_lengths(server):
    count_before = server.metric("nv_inference_count", model="dilated_attention")
    exec_before = server.metric("nv_inference_exec_count", model="dilated_attention")
    singles_before = server.metric("dilattn_batch_size_bucket", model="dilated_attention", le="1")
    # Every one of them computes where the server's device is: D = 32 has a GPU kernel.
    path = "gpu" if reference.ON_GPU else "cpu"
    path_before = server.metric("dilattn_executions_total", model="dilated_attention", path=path)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        worst = list(pool.map(lambda i: _client_run(server, i), range(32)))
    assert max(worst) <= reference.FP32, worst
    count = server.metric("nv_inference_count", model="dilated_attention") - count_before
    executions = server.metric("nv_inference_exec_count", model="dilated_attention") - exec_before
    assert count == 32 * 20
    assert executions < count, f"{executions} executions for {count} inferences: nothing batched"
    assert server.metric("dilattn_executions_total", model="dilated_attention",
                         path=path) - path_before == executions
    # Mixed lengths were packed together: some executions held more than one sequence.
    singles = server.metric("dilattn_batch_size_bucket", model="dilated_attention", le="1")
    assert singles - singles_before < executions


def test_cpu_engines_take_batches_side_by_side():
    """--cpu-engines 2: two engine threads on the CPU, each computing batches of its own over one
    host pool. Every answer is right, both threads computed, and each reports as cpu:N."""
    from conftest import ServerProcess, wait_until
    s = ServerProcess("--device", "cpu", "--cpu-engines", "2", "--cpu-threads", "2",
                      name="cpu-engines")
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            worst = list(pool.map(lambda i: _client_run(s, i), range(16)))
        assert max(worst) <= reference.FP32, worst
        assert s.metric("nv_inference_count", model="dilated_attention") == 16 * 20
        started = {d: t for (d, p), t in engine_seconds(s).items() if p == "start"}
        assert set(started) == {"cpu:0", "cpu:1"}, started
        assert all(t > 0 for t in started.values()), started
        assert wait_until(lambda: s.metric("dilattn_buffer_pool_leases") == 0, timeout=30)
    finally:
        assert s.stop() == 0, s.log_path.read_text()
