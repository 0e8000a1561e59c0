"""Several GPUs in one server (--device cuda: every GPU): one engine thread per GPU, batches go
to whichever GPU is free, and every GPU gives the right answer."""

import concurrent.futures
import uuid

import numpy as np
import pytest
import tritonclient.utils.shared_memory as shm

import cuda_ipc
import reference
from conftest import ServerProcess
from helpers import gpu_count, make_inputs, shared_memory_tensors


def _in_cuda_shared_memory(client, cudart, gpu, name, q, k, v):
    """Q, K, V and room for O in one allocation on `gpu`, registered with the server as `name`:
    the buffer, the inputs naming it, and the output naming it."""
    n = q.nbytes
    buf = cuda_ipc.DeviceBuffer(cudart, 4 * n, device=gpu)
    for i, x in enumerate((q, k, v)):
        buf.write(x, offset=i * n)
    client.register_cuda_shared_memory(name, buf.raw_handle(), gpu, 4 * n)
    return (buf, *shared_memory_tensors(name, q.shape, "FP16", n))


pytestmark = pytest.mark.skipif(
    not reference.ON_GPU or gpu_count() < 2,
    reason="needs a GPU server (DILATTN_E2E_DEVICE=cuda) on a machine with two or more GPUs")


def test_requests_spread_over_every_gpu_with_the_same_answers(server, client):
    rng = np.random.default_rng(11)
    # Head counts differ, so no two shapes share a batch; each shape is sent twice, at once.
    shapes = [(1, 131072, h, 64) for h in (2, 3, 4, 5)]
    inputs = {s: [rng.uniform(-1, 1, s).astype(np.float16) for _ in range(3)] for s in shapes}
    params = {"segment_lengths": "2048,8192", "dilation_rates": "1,4"}

    def infer(shape):
        q, k, v = inputs[shape]
        return shape, client.infer("dilated_attention", make_inputs(q, k, v, "FP16"),
                                   parameters=params).as_numpy("O")

    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(infer, shapes + shapes))
        outputs = {}
        for shape, out in results:
            # The branches' segments (2048, 8192) tile the first and the last 8192 tokens
            # exactly, so those outputs are the reference's on those tokens alone.
            q, k, v = (x.astype(np.float32) for x in inputs[shape])
            for part in (slice(0, 8192), slice(-8192, None)):
                expected = reference.dilated_attention(q[:, part], k[:, part], v[:, part],
                                                       [2048, 8192], [1, 4], "longnet", False)
                err = reference.relative_error(out[:, part].astype(np.float32), expected)
                assert err <= reference.TOLERANCE["FP16"], f"{shape} {part}: {err}"
            if shape in outputs:  # the same kernel on the same inputs, on either GPU
                assert np.array_equal(outputs[shape], out), f"{shape}: answers differ"
            outputs[shape] = out
    used = [server.metric("dilattn_buffer_pool_bytes", pool=f"cuda:{g}", state="high_water")
            for g in range(gpu_count())]
    assert all(u is not None and u > 0 for u in used), f"per-GPU pool high water: {used}"


def test_cuda_shared_memory_requests_run_on_the_gpu_that_holds_them():
    """A request whose tensors lie in CUDA shared memory on GPU g runs on g's engine thread, in
    place: the other GPUs' pools lease nothing for it (run elsewhere, it would lease Q, K, V and
    O there and copy across GPUs)."""
    cudart = cuda_ipc.load_cudart()
    if cudart is None:
        pytest.skip("no CUDA runtime library for the client side")
    shape = (1, 65536, 4, 64)
    rng = np.random.default_rng(5)
    q, k, v = (rng.uniform(-1, 1, shape).astype(np.float16) for _ in range(3))
    n = q.nbytes
    params = {"segment_lengths": "2048,8192", "dilation_rates": "1,4"}
    expected = reference.dilated_attention(*(x[:, :8192].astype(np.float32) for x in (q, k, v)),
                                           [2048, 8192], [1, 4])
    for gpu in range(gpu_count()):
        server = ServerProcess(name=f"multi-gpu-shm-{gpu}")
        client = server.client()
        buf = None
        try:
            buf, inputs, outputs = _in_cuda_shared_memory(client, cudart, gpu, "t", q, k, v)
            for _ in range(3):
                client.infer("dilated_attention", inputs, outputs=outputs, parameters=params)
            o = buf.read(np.float16, shape, offset=3 * n)[:, :8192].astype(np.float32)
            assert reference.relative_error(o, expected) <= reference.TOLERANCE["FP16"]
            for other in range(gpu_count()):
                leased = server.metric("dilattn_buffer_pool_bytes", pool=f"cuda:{other}",
                                       state="high_water")
                if other == gpu:
                    assert leased < n, f"GPU {gpu} copied the tensors: {leased} bytes leased"
                else:
                    assert leased == 0, f"GPU {other} ran a request of GPU {gpu}: {leased}"
            client.unregister_cuda_shared_memory("t")
        finally:
            client.close()
            server.stop()
            if buf is not None:
                buf.free()


SPLIT_PARAMS = {"segment_lengths": "2048,8192,131072", "dilation_rates": "1,4,16",
                "causal": True}


def _split_matches_one_gpu(split, client, shape, seed):
    """One FP16 sequence of `shape` with SPLIT_PARAMS through `split` (a server that splits it) and
    through `client` (one GPU): the two agree, and the first 8192 tokens match the float64
    reference. The whole-sequence branch spans the GPUs, so its dilated rows cross between them;
    causal, the first 8192 tokens see only each other, so their reference is theirs alone.
    Returns Q, K, V and the one-GPU answer."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.uniform(-1, 1, shape).astype(np.float16) for _ in range(3))
    out = split.client().infer("dilated_attention", make_inputs(q, k, v, "FP16"),
                               parameters=SPLIT_PARAMS).as_numpy("O")
    alone = client.infer("dilated_attention", make_inputs(q, k, v, "FP16"),
                         parameters=SPLIT_PARAMS).as_numpy("O")
    assert np.all(np.isfinite(out))
    err = reference.relative_error(out.astype(np.float32), alone.astype(np.float32))
    assert err <= 1e-3, err
    part = slice(0, 8192)
    expected = reference.dilated_attention(
        *(x[:, part].astype(np.float32) for x in (q, k, v)), [2048, 8192, 131072], [1, 4, 16],
        "longnet", True)
    assert reference.relative_error(out[:, part].astype(np.float32),
                                    expected) <= reference.TOLERANCE["FP16"]
    return q, k, v, alone


def _stops_after_one_split(split):
    """The server computed one split run of 131072 tokens, by its metric and its log."""
    assert split.metric("dilattn_executions_total", model="dilated_attention", path="split") == 1
    assert split.stop() == 0
    runs = split.log_path.read_text().count("sequence-parallel run: 131072 tokens across")
    assert runs == 1, runs


def test_a_long_sequence_runs_split_across_the_gpus(client):
    """--sequence-parallel-min-tokens: one sequence over the threshold runs on every GPU at once
    (NCCL exchanges of the spanning branches' rows) and answers as one GPU does."""
    split = ServerProcess("--sequence-parallel-min-tokens", "65536", name="sequence-parallel")
    try:
        shape = (1, 131072, 4, 64)
        q, k, v, alone = _split_matches_one_gpu(split, client, shape, seed=12)
        # The same from CUDA shared memory on the last GPU: not split, since it runs in place
        # there with no copies, where a split would copy half of it to the other GPUs.
        cudart = cuda_ipc.load_cudart()
        if cudart is not None:
            c = split.client()
            buf = None
            try:
                buf, inputs, outputs = _in_cuda_shared_memory(c, cudart, gpu_count() - 1, "sp",
                                                              q, k, v)
                c.infer("dilated_attention", inputs, outputs=outputs, parameters=SPLIT_PARAMS)
                from_shm = buf.read(np.float16, shape, offset=3 * q.nbytes)
                assert np.array_equal(from_shm, alone), "not the one-GPU answer"
                c.unregister_cuda_shared_memory("sp")
            finally:
                c.close()
                if buf is not None:
                    buf.free()
        # The metric tells the two apart: the in-place run on one GPU, and one split run.
        assert split.metric("dilattn_executions_total", model="dilated_attention",
                            path="gpu") == (1 if cudart is not None else 0)
        _stops_after_one_split(split)
    finally:
        if split.alive():
            split.stop()


def test_split_with_unaligned_segments_and_outputs_over_inputs(client):
    """Segments with no common boundary inside a slice (2048 and 3000) still split: the branch
    that does not align is exchanged, and the answer is one GPU's. An output over its own inputs
    in system shared memory (O over Q's second half, through a second registration) is not
    split: each GPU copies its slice of O back while the others may still read their inputs."""
    split = ServerProcess("--sequence-parallel-min-tokens", "65536", name="sequence-parallel-2")
    try:
        rng = np.random.default_rng(13)
        shape = (1, 131072, 2, 64)
        q, k, v = (rng.uniform(-1, 1, shape).astype(np.float16) for _ in range(3))
        params = {"segment_lengths": "2048,3000", "dilation_rates": "1,2"}
        out = split.client().infer("dilated_attention", make_inputs(q, k, v, "FP16"),
                                   parameters=params).as_numpy("O")
        alone = client.infer("dilated_attention", make_inputs(q, k, v, "FP16"),
                             parameters=params).as_numpy("O")
        assert reference.relative_error(out.astype(np.float32), alone.astype(np.float32)) <= 1e-3

        size = q.nbytes
        c = split.client()
        name, key = f"r_{uuid.uuid4().hex[:10]}", f"/dilattn_sp_{uuid.uuid4().hex[:10]}"
        alias = f"a_{uuid.uuid4().hex[:10]}"
        handle = shm.create_shared_memory_region(name, key, 4 * size)
        try:
            shm.set_shared_memory_region(handle, [q, k, v])
            c.register_system_shared_memory(name, key, 4 * size)
            c.register_system_shared_memory(alias, key, 4 * size)
            inputs, outputs = shared_memory_tensors(name, shape, "FP16", size, out_region=alias,
                                                    out_offset=size // 2)
            c.infer("dilated_attention", inputs, outputs=outputs, parameters=params)
            got = shm.get_contents_as_numpy(handle, np.float16, list(shape), offset=size // 2)
            assert reference.relative_error(got.astype(np.float32),
                                            alone.astype(np.float32)) <= 1e-3
        finally:
            try:
                c.unregister_system_shared_memory(name)
                c.unregister_system_shared_memory(alias)
            finally:
                shm.destroy_shared_memory_region(handle)
                c.close()
        assert split.stop() == 0
        runs = split.log_path.read_text().count("sequence-parallel run: 131072 tokens across")
        assert runs == 1, f"{runs} split runs: the output over the inputs was split"
    finally:
        if split.alive():
            split.stop()


def test_a_head_dim_without_a_kernel_splits_padded(client):
    """D = 96 has no kernel of its own: split across the GPUs it runs as D = 128, each GPU's slice
    copied in with zero columns after each head's 96 and only those copied back, and it answers
    as one GPU does (which pads the same way) and as the float64 reference does."""
    split = ServerProcess("--sequence-parallel-min-tokens", "65536", name="sequence-parallel-3")
    try:
        _split_matches_one_gpu(split, client, (1, 131072, 2, 96), seed=14)
        _stops_after_one_split(split)
    finally:
        if split.alive():
            split.stop()
