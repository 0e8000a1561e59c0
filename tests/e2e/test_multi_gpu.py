"""Several GPUs in one server (--device cuda: every GPU): one engine thread per GPU, batches go
to whichever GPU is free, and every GPU gives the right answer."""

import concurrent.futures
import subprocess

import numpy as np
import pytest

import reference
from helpers import make_inputs


def _gpu_count():
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


pytestmark = pytest.mark.skipif(
    not reference.ON_GPU or _gpu_count() < 2,
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
            for g in range(_gpu_count())]
    assert all(u is not None and u > 0 for u in used), f"per-GPU pool high water: {used}"
