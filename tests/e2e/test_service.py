"""Liveness, readiness, metadata, config, statistics, repository index, health and reflection."""

import os
import subprocess
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from helpers import make_inputs

MODELS = ["dilated_attention", "dilated_attention_head_groups", "block_sparse_attention"]


def test_live_and_ready(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    for m in MODELS:
        assert client.is_model_ready(m)


def test_server_metadata(client):
    meta = client.get_server_metadata()
    assert meta.name == "dilattn"
    assert "statistics" in meta.extensions


@pytest.mark.parametrize("model", MODELS)
def test_model_metadata_and_config(client, model):
    meta = client.get_model_metadata(model)
    assert meta.name == model
    assert [i.name for i in meta.inputs] == ["Q", "K", "V"]
    assert [o.name for o in meta.outputs] == ["O"]
    assert list(meta.inputs[0].shape) == [-1, -1, -1, -1]
    config = client.get_model_config(model).config
    assert config.name == model
    assert config.max_batch_size > 0
    assert "operator" in config.parameters


def test_repository_index(client):
    index = client.get_model_repository_index()
    assert sorted(m.name for m in index.models) == sorted(MODELS)
    assert all(m.state == "READY" for m in index.models)


def test_statistics_count_requests(client):
    before = client.get_inference_statistics("dilated_attention").model_stats[0]
    q = np.random.default_rng(0).standard_normal((2, 64, 2, 16)).astype(np.float32)
    client.infer("dilated_attention", make_inputs(q, q, q),
                 parameters={"segment_lengths": "16,32", "dilation_rates": "1,2"})
    after = client.get_inference_statistics("dilated_attention").model_stats[0]
    assert after.inference_count == before.inference_count + 2
    assert after.execution_count == before.execution_count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns

    # The execution is counted under its batch size in sequences (B=2), as Triton counts it.
    def batch_count(stats, size):
        return sum(b.compute_infer.count for b in stats.batch_stats if b.batch_size == size)
    assert batch_count(after, 2) == batch_count(before, 2) + 1
    all_stats = client.get_inference_statistics()
    assert sorted(s.name for s in all_stats.model_stats) == sorted(MODELS)


def test_prometheus_inference_count_counts_sequences(server, client):
    # nv_inference_count counts inferences, B of them for a request of batch B, as Triton does.
    before = server.metric("nv_inference_count", model="dilated_attention")
    q = np.random.default_rng(1).standard_normal((3, 64, 2, 16)).astype(np.float32)
    client.infer("dilated_attention", make_inputs(q, q, q),
                 parameters={"segment_lengths": "16,32", "dilation_rates": "1,2"})
    assert server.metric("nv_inference_count", model="dilated_attention") == before + 3


def test_unknown_model_metadata_is_not_found(client):
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no_such_model")
    assert "NOT_FOUND" in str(e.value.status())
    assert "no_such_model" in e.value.message()


def _raw_call(server, method, payload):
    with grpc.insecure_channel(server.url) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        return call(payload, timeout=10)


def _encode_string_field(number, text):
    data = text.encode()
    return bytes([number << 3 | 2, len(data)]) + data


def test_grpc_health_overall_and_per_model(server):
    # grpc.health.v1.HealthCheckResponse{status: SERVING} is the two bytes 08 01.
    assert _raw_call(server, "/grpc.health.v1.Health/Check", b"") == b"\x08\x01"
    for m in MODELS:
        reply = _raw_call(server, "/grpc.health.v1.Health/Check", _encode_string_field(1, m))
        assert reply == b"\x08\x01", m
    with pytest.raises(grpc.RpcError) as e:
        _raw_call(server, "/grpc.health.v1.Health/Check", _encode_string_field(1, "nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_http_health_on_the_metrics_port(server):
    # KServe's HTTP health paths, for HTTP probes: 200 is true, a 4xx false.
    assert server.http_get("/v2/health/live") == (200, "live\n")
    assert server.http_get("/v2/health/ready") == (200, "ready\n")
    url = f"http://127.0.0.1:{server.metrics_port}/v2/health/ready"
    head = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as r:
        assert r.status == 200 and r.read() == b""
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"), timeout=10)
    assert e.value.code == 405 and e.value.headers["Allow"] == "GET, HEAD"
    assert server.http_get("/v2/health/other")[0] == 404
    assert server.http_get("/metrics")[0] == 200


def test_server_reflection_lists_the_services(server):
    # ServerReflectionRequest{list_services: ""} on the bidirectional reflection stream.
    with grpc.insecure_channel(server.url) as channel:
        call = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                     request_serializer=None, response_deserializer=None)
        replies = list(call(iter([_encode_string_field(7, "")]), timeout=10))
    assert replies
    assert b"inference.GRPCInferenceService" in replies[0]
    assert b"grpc.health.v1.Health" in replies[0]


def test_unimplemented_rpcs_answer_unimplemented(client):
    with pytest.raises(InferenceServerException) as e:
        client.load_model("dilated_attention")
    assert "UNIMPLEMENTED" in str(e.value.status())
    assert client.is_server_live()


@pytest.mark.parametrize("flag, needle", [
    ("--bogus=1", "unknown flag --bogus"),
    ("--grpc-port=70000", "ports must be in [0, 65535]"),
    ("--host-pool-mib=0", "--host-pool-mib must be >= 1"),
    # Past 2^44 MiB the byte count wrapped: to a 1 MiB host pool, or to 0 (90% of the GPU).
    ("--host-pool-mib=17592186044417", "at most 1073741824 (1 PiB)"),
    ("--device-pool-mib=17592186044416", "at most 1073741824 (1 PiB)"),
    ("--pool-idle-release-seconds=-1", "--pool-idle-release-seconds must be >= 0 (0: never)"),
    ("--pool-idle-release-seconds=2m", "--pool-idle-release-seconds='2m' is not an integer"),
    ("--gpu-job-timeout-seconds=-5", "--gpu-job-timeout-seconds must be in [0, 31622400]"),
    ("--gpu-job-timeout-seconds=99999999", "(0: never), got 99999999"),
    ("--gpu-job-timeout-seconds=1h", "--gpu-job-timeout-seconds='1h' is not an integer"),
    ("--cpu-engines=0", "--cpu-engines must be in [1, 1024], got 0"),
    ("--cpu-engines=two", "--cpu-engines='two' is not an integer"),
    ("--malloc-arenas=-1", "--malloc-arenas must be in [0, 1024] (0: glibc's default), got -1"),
    ("--malloc-arenas=1025", "--malloc-arenas must be in [0, 1024]"),
    ("--malloc-trim-threshold-mib=-1",
     "--malloc-trim-threshold-mib must be in [0, 1024] (0: glibc's rising thresholds), got -1"),
    ("--malloc-trim-threshold-mib=4096", "--malloc-trim-threshold-mib must be in [0, 1024]"),
    ("--malloc-trim-threshold-mib=8M", "--malloc-trim-threshold-mib='8M' is not an integer"),
    ("--log-format=xml", "--log-format='xml' is not text or json"),
])
def test_bad_flags_stop_the_server_with_their_reason(flag, needle):
    from conftest import server_binary
    r = subprocess.run([server_binary(), "--grpc-port", "0", "--metrics-port", "-1", flag],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr


MALLOC_ENVIRONMENT = ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_",
                      "MALLOC_MMAP_THRESHOLD_")


@pytest.mark.parametrize("args, env, needles", [
    ((), {}, ["malloc arenas: the C library's default",
              "malloc thresholds: every arena hands back a free top above 8 MiB"]),
    (("--malloc-arenas", "1"), {}, ["malloc arenas: at most 1"]),
    (("--malloc-arenas", "4"), {}, ["malloc arenas: at most 4"]),
    (("--malloc-arenas", "2"), {"MALLOC_ARENA_MAX": "8"},
     ["malloc arenas: as the environment sets", "above 8 MiB"]),
    (("--malloc-trim-threshold-mib", "0"), {},
     ["malloc thresholds: the C library's, rising with large frees"]),
    (("--malloc-trim-threshold-mib", "2"), {}, ["free top above 2 MiB"]),
    ((), {"MALLOC_TRIM_THRESHOLD_": "1048576"},
     ["malloc arenas: the C library's default", "malloc thresholds: as the environment sets"]),
    (("--malloc-trim-threshold-mib", "2"), {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
     ["malloc thresholds: as the environment sets"]),
])
def test_malloc_options_are_logged_and_yield_to_the_environment(args, env, needles):
    """glibc's arenas and fixed thresholds by default, what the flags ask otherwise; an
    operator's MALLOC_ARENA_MAX, MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES
    is left as set."""
    from conftest import ServerProcess
    environment = {k: v for k, v in os.environ.items() if k not in MALLOC_ENVIRONMENT}
    s = ServerProcess("--metrics-port", "-1", *args, name="malloc-options",
                      env={**environment, **env})
    try:
        assert s.client().is_server_live()
    finally:
        assert s.stop() == 0
    log = s.log_path.read_text()
    for needle in needles:
        assert needle in log


def test_disabled_metrics_report_port_minus_one():
    """--metrics-port -1: the first stdout line says metrics_port=-1 and the log that metrics are
    off (both said port 0, which reads as a port picked for it)."""
    from conftest import ServerProcess
    s = ServerProcess("--metrics-port", "-1", name="metrics-off")
    try:
        assert s.metrics_port == -1
        assert s.client().is_server_live()
    finally:
        assert s.stop() == 0
    log = s.log_path.read_text()
    assert "metrics off" in log, log
    assert "metrics on port" not in log, log
