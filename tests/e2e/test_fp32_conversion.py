"""FP32 requests on a GPU server are computed in fp16 (README): their tensors are converted on the
device, and a request holding a value fp16 cannot represent is refused by name. The refusal is that
request's alone: the requests batched with it are answered. A small job's Q, K and V go in one
batch of copies and one conversion; a large one's tensor by tensor, with the same answers and the
same refusals. On a CPU server everything here is computed in fp32 and answered."""

import concurrent.futures

import pytest
from tritonclient.utils import InferenceServerException

import reference
from conftest import repository_server
from helpers import make_inputs, random_qkv

# Three requests wait for each other (the preferred size, or a long delay): one job.
TRIO_MODEL = """
max_batch_size: 8
dynamic_batching {
  preferred_batch_size: [ 3 ]
  max_queue_delay_microseconds: 5000000
}
parameters { key: "segment_lengths" value { string_value: "32,64" } }
parameters { key: "dilation_rates" value { string_value: "1,2" } }
"""


@pytest.fixture(scope="module")
def trio_server(tmp_path_factory):
    s = repository_server(tmp_path_factory.mktemp("trio_repo"), {"trio": TRIO_MODEL},
                          "fp32-trio")
    yield s
    assert s.stop() == 0, s.log_path.read_text()


def _refused_for_fp16(error):
    assert isinstance(error, InferenceServerException), error
    assert "INVALID_ARGUMENT" in str(error.status()), error
    assert "beyond fp16's range" in error.message(), error


@pytest.mark.parametrize("tensor", [0, 1, 2])
@pytest.mark.parametrize("bad", [0, 1, 2])
def test_a_value_beyond_fp16_fails_only_its_own_request(trio_server, tensor, bad):
    """Three FP32 requests of different lengths in one job; request `bad` holds 1e6 in Q, K or V.
    On a GPU it alone is refused, and the other two are answered correctly."""
    lengths = [40, 64, 100]
    requests = [random_qkv((1, n, 2, 16), seed=10 * tensor + i) for i, n in enumerate(lengths)]
    requests[bad][tensor][0, lengths[bad] // 2, 1, 3] = 1e6
    executions = trio_server.metric("nv_inference_exec_count", model="trio")

    def run(i):
        try:
            out = trio_server.client().infer("trio", make_inputs(*requests[i]),
                                             parameters={}).as_numpy("O")
            return out, None
        except InferenceServerException as e:
            return None, e

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, range(3)))
    assert trio_server.metric("nv_inference_exec_count", model="trio") == executions + 1, \
        "the three requests were not one job"
    for i, (out, error) in enumerate(results):
        if i == bad and reference.ON_GPU:
            _refused_for_fp16(error)
            continue
        assert error is None, (i, error)
        expected = reference.dilated_attention(*requests[i], [32, 64], [1, 2])
        assert reference.relative_error(out, expected) <= reference.TOLERANCE["FP32"]


# 3 x 24 MiB of FP32 inputs: past the size up to which a job's inputs are staged side by side
# (64 MiB), and below --pipeline-min-tokens, so one launch after Q, K and V converted in turn.
LARGE = (1, 12288, 8, 64)


def test_a_large_fp32_job_converts_tensor_by_tensor(server):
    if not reference.ON_GPU:
        pytest.skip("the conversion runs on a GPU server; the CPU path computes FP32 as it is")
    client = server.client()
    segments, rates = [2048, 4096], [1, 2]
    params = {"segment_lengths": "2048,4096", "dilation_rates": "1,2"}
    q, k, v = random_qkv(LARGE, seed=77)
    out = client.infer("dilated_attention", make_inputs(q, k, v), parameters=params).as_numpy("O")
    expected = reference.dilated_attention(q, k, v, segments, rates)
    assert reference.relative_error(out, expected) <= reference.TOLERANCE["FP32"]
    # A value beyond fp16 in the last tensor converted is found too.
    v[0, -1, 7, 63] = -1e6
    with pytest.raises(InferenceServerException) as e:
        client.infer("dilated_attention", make_inputs(q, k, v), parameters=params)
    _refused_for_fp16(e.value)
