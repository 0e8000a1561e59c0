"""The native stream's timeout (Header.timeout_microseconds), KServe's `timeout` for each stretch:
a stretch may wait that long in its model's queue from when its input is complete; one that has
not started by then is never computed and the stream ends with DEADLINE_EXCEEDED, releasing its
memory. Without one the model's default timeout applies, and a model that refuses overrides
keeps its default.

Every model here holds its requests 1.5 s for a batch of 64 that never forms, so a stretch waits
in the queue that long whatever the machine's speed: a 0.2 s timeout always expires first, and a
60 s one never does."""

import os
import pathlib
import re
import subprocess
import time

import grpc
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

import attend
import reference
from conftest import repository_server, wait_until
from helpers import make_inputs, random_qkv

BATCHER = """
max_batch_size: 64
dynamic_batching {
  preferred_batch_size: [ 64 ]
  max_queue_delay_microseconds: 1500000
  %s
}
parameters { key: "segment_lengths" value { string_value: "32" } }
parameters { key: "dilation_rates" value { string_value: "1" } }
"""
MODELS = {
    "waiting": BATCHER % "",
    # A default of 0.2 s that a request's own timeout replaces.
    "defaulted": BATCHER % ("default_queue_policy { default_timeout_microseconds: 200000 "
                            "allow_timeout_override: true }"),
    # A default of 0.2 s that stays whatever the request asks for.
    "strict": BATCHER % "default_queue_policy { default_timeout_microseconds: 200000 }",
}
SHAPE = (2, 64, 2, 8)  # stretches of 32 tokens: four requests
TINY_US = 200_000
GENEROUS_US = 60_000_000
CLIENT = os.environ.get("DILATTN_CLIENT_BIN", str(
    pathlib.Path(__file__).resolve().parents[2] / "build" / "client" / "dilattn-client"))


@pytest.fixture(scope="module")
def repo_server(tmp_path_factory):
    s = repository_server(tmp_path_factory.mktemp("repo"), MODELS, "attend-timeout")
    yield s
    assert s.stop() == 0, s.log_path.read_text()


def _qkv(seed):
    return random_qkv(SHAPE, seed)


def _computed(server, model):
    return server.client().get_inference_statistics(model).model_stats[0].inference_count


def _attend(server, model, q, k, v, **kwargs):
    with grpc.insecure_channel(server.url) as channel:
        return attend.dilattn_stream.attend(channel, q, k, v, model=model, timeout=60, **kwargs)


def _expect_expired(server, model, **kwargs):
    """The stream ends DEADLINE_EXCEEDED from the queue's timeout (the scheduler's message, not
    gRPC's for the call's 60 s deadline); none of its stretches is ever computed, and its memory
    comes back."""
    q, k, v = _qkv(2)
    before = _computed(server, model)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        _attend(server, model, q, k, v, **kwargs)
    elapsed = time.monotonic() - start
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
    assert "timeout expired before execution" in e.value.details(), e.value.details()
    assert elapsed < 10, elapsed  # at once, not at the call's deadline
    time.sleep(1.6)  # past the batcher's delay, by when the stretches would have run
    assert _computed(server, model) == before
    assert wait_until(lambda: server.metric("dilattn_buffer_pool_leases") == 0, timeout=30)
    assert server.metric("dilattn_native_streams_open") == 0


def _check_output(o, q, k, v):
    ref = reference.dilated_attention(q, k, v, [32], [1])
    err = reference.relative_error(o, ref)
    assert err <= reference.TOLERANCE["FP32"], err


def test_generous_timeout_computes_normally(repo_server):
    q, k, v = _qkv(1)
    before = _computed(repo_server, "waiting")
    o = _attend(repo_server, "waiting", q, k, v, timeout_us=GENEROUS_US)
    _check_output(o, q, k, v)
    assert _computed(repo_server, "waiting") == before + 4  # one inference per stretch


def test_tiny_timeout_ends_the_stream_with_deadline_exceeded(repo_server):
    _expect_expired(repo_server, "waiting", timeout_us=TINY_US)


def test_expiry_ends_a_stream_whose_input_is_still_arriving(repo_server):
    """The client sends the first stretch, then holds the rest back: the expired stretch ends
    the stream at once, without waiting for input that may never come."""
    q, k, v = _qkv(3)
    header = attend.header("waiting", SHAPE, "FP32", timeout_us=TINY_US)
    outbox = attend.Outbox([header] + attend.chunks(q, k, v, "FP32", 32, last=32))
    start = time.monotonic()
    with grpc.insecure_channel(repo_server.url) as channel:
        with pytest.raises(grpc.RpcError) as e:
            for _ in attend.stream(channel)(iter(outbox), timeout=60):
                pass
        outbox.close()
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
    assert "timeout expired before execution" in e.value.details(), e.value.details()
    assert time.monotonic() - start < 10  # at once, not at the call's 60 s deadline
    assert wait_until(lambda: repo_server.metric("dilattn_buffer_pool_leases") == 0, timeout=30)
    assert repo_server.metric("dilattn_native_streams_open") == 0


def test_the_models_default_timeout_applies_without_one(repo_server):
    _expect_expired(repo_server, "defaulted")


def test_a_timeout_replaces_the_default_where_the_model_allows_it(repo_server):
    q, k, v = _qkv(4)
    _check_output(_attend(repo_server, "defaulted", q, k, v, timeout_us=GENEROUS_US), q, k, v)


def test_a_model_that_refuses_overrides_keeps_its_default(repo_server):
    # As for a KServe request of the same model.
    _expect_expired(repo_server, "strict", timeout_us=GENEROUS_US)
    x = np.zeros((1, 32, 2, 8), dtype=np.float32)
    with pytest.raises(InferenceServerException) as e:
        repo_server.client().infer("strict", make_inputs(x, x, x), timeout=GENEROUS_US)
    assert "DEADLINE_EXCEEDED" in str(e.value.status())


@pytest.mark.parametrize("fields,needle", [
    ({"timeout_us": -1}, "header: timeout_microseconds -1 must be >= 0"),
    ({"parameters": {"timeout": "200000"}},
     "header parameter 'timeout' is not an operator parameter: set the header's "
     "timeout_microseconds field"),
])
def test_the_server_refuses_a_bad_timeout(repo_server, fields, needle):
    header = attend.header("waiting", SHAPE, "FP32", **fields)
    with grpc.insecure_channel(repo_server.url) as channel:
        with pytest.raises(grpc.RpcError) as e:
            for _ in attend.stream(channel)(iter([header]), timeout=30):
                pass
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert needle in e.value.details(), e.value.details()


@pytest.mark.parametrize("bad", [-1, 1.5, "200000", True, 2**63])
def test_the_python_client_refuses_a_bad_timeout(repo_server, bad):
    q, k, v = _qkv(5)
    with pytest.raises(ValueError, match="timeout_us must be a non-negative integer"):
        _attend(repo_server, "waiting", q, k, v, timeout_us=bad)


def _cli(server, *args):
    return subprocess.run([CLIENT, "attend", "--url", server.url, "--model", "waiting",
                           "--shape", "1,64,2,8", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_attend_sends_the_timeout_in_the_header(repo_server):
    done = _cli(repo_server, "--param", f"timeout={GENEROUS_US}")
    assert done.returncode == 0, done.stderr
    attend_sum = float(re.search(r"sum (\S+)", done.stdout).group(1))
    # infer sends the same random tensors through KServe, with the same timeout.
    infer = subprocess.run([CLIENT, "infer", "--url", repo_server.url, "--model", "waiting",
                            "--shape", "1,64,2,8", "--param", f"timeout={GENEROUS_US}"],
                           capture_output=True, text=True, timeout=120)
    assert infer.returncode == 0, infer.stderr
    infer_sum = float(re.search(r"sum (\S+)", infer.stdout).group(1))
    # On the GPU the fp32 tensors are computed in fp16, as stretches or as one problem.
    tolerance = 1e-3 if reference.ON_GPU else 1e-6
    assert attend_sum == pytest.approx(infer_sum, rel=tolerance, abs=tolerance)

    done = _cli(repo_server, "--param", f"timeout={TINY_US}")
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "DEADLINE_EXCEEDED" in done.stderr, done.stderr


@pytest.mark.parametrize("bad", ["timeout=-5", "timeout=1.5", "timeout=soon", "timeout="])
def test_cli_attend_refuses_a_bad_timeout(repo_server, bad):
    done = _cli(repo_server, "--param", bad)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "parameter 'timeout' must be a non-negative integer of microseconds" in done.stderr, \
        done.stderr
