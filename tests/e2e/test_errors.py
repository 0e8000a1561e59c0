"""Bad requests get INVALID_ARGUMENT (or NOT_FOUND) naming the problem; the server keeps serving."""

import os

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess
from helpers import make_inputs

GOOD = np.zeros((1, 64, 2, 16), dtype=np.float32) + 0.5
SMALL = {"segment_lengths": "16,32", "dilation_rates": "1,2"}


def _expect(client, code, needle, model="dilated_attention", inputs=None, parameters=None):
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, inputs if inputs is not None else make_inputs(GOOD, GOOD, GOOD),
                     parameters=parameters if parameters is not None else SMALL)
    assert code in str(e.value.status()), e.value
    assert needle in e.value.message(), e.value.message()
    assert client.is_server_live() and client.is_server_ready()


def test_unknown_model(client):
    _expect(client, "NOT_FOUND", "'no_such_model'", model="no_such_model")


def test_wrong_rank(client):
    x = GOOD.reshape(64, 2, 16)
    _expect(client, "INVALID_ARGUMENT", "expected [B, N, H, D]", inputs=make_inputs(x, x, x))


def test_shapes_differ(client):
    k = np.zeros((1, 32, 2, 16), dtype=np.float32)
    _expect(client, "INVALID_ARGUMENT", "'K' has shape [1,32,2,16] but 'Q' has [1,64,2,16]",
            inputs=make_inputs(GOOD, k, GOOD))


def test_unsupported_datatype(client):
    x = np.zeros((1, 8, 2, 4), dtype=np.int32)
    import tritonclient.grpc as g
    inputs = []
    for n in "QKV":
        t = g.InferInput(n, list(x.shape), "INT32")
        t.set_data_from_numpy(x)
        inputs.append(t)
    _expect(client, "INVALID_ARGUMENT", "datatype 'INT32'", inputs=inputs)


def test_mixed_datatypes(client):
    inputs = make_inputs(GOOD, GOOD, GOOD)
    inputs[1] = make_inputs(GOOD, GOOD, GOOD, "FP16")[1]
    _expect(client, "INVALID_ARGUMENT", "must share one datatype", inputs=inputs)


def test_zero_dimension(client):
    x = np.zeros((1, 0, 2, 16), dtype=np.float32)
    _expect(client, "INVALID_ARGUMENT", "dim N=0", inputs=make_inputs(x, x, x))


def test_batch_over_max_batch_size(client):
    x = np.zeros((65, 4, 1, 4), dtype=np.float32)
    _expect(client, "INVALID_ARGUMENT", "exceeds max_batch_size 64", inputs=make_inputs(x, x, x))


def test_batch_at_max_batch_size_is_accepted(client):
    # The limit is inclusive: B == max_batch_size (64) runs; 65 is refused (above).
    x = np.full((64, 4, 1, 4), 0.5, dtype=np.float32)
    out = client.infer("dilated_attention", make_inputs(x, x, x),
                       parameters={"segment_lengths": "4", "dilation_rates": "1"}).as_numpy("O")
    assert out.shape == (64, 4, 1, 4)
    assert np.allclose(out, 0.5)


@pytest.mark.parametrize("params,needle", [
    ({"segment_lengths": "16,32", "dilation_rates": "1"}, "segment_lengths has 2 entries but dilation_rates has 1"),
    ({"segment_lengths": "16,x", "dilation_rates": "1,2"}, "'segment_lengths'='16,x' is not a comma-separated list"),
    ({"segment_lengths": "4", "dilation_rates": "8"}, "dilation_rates[0]=8 must satisfy 1 <= r <= segment_lengths[0]=4"),
    ({"segment_lengths": "0", "dilation_rates": "1"}, "segment_lengths[0]=0 must be >= 1"),
    ({**SMALL, "mode": "ring"}, "mode 'ring' is not one of"),
    ({**SMALL, "causal": "maybe"}, "'causal'='maybe' is not a bool"),
    ({**SMALL, "softmax_scale": -1.0}, "softmax_scale must be finite and > 0, got -1"),
    ({**SMALL, "segment_length": "16"}, "'segment_length' is not known"),
])
def test_bad_parameters(client, params, needle):
    _expect(client, "INVALID_ARGUMENT", needle, parameters=params)


def test_head_groups_with_too_few_heads(client):
    _expect(client, "INVALID_ARGUMENT", "num_heads=2 for 3 branches",
            model="dilated_attention_head_groups",
            parameters={"segment_lengths": "16,32,64", "dilation_rates": "1,2,4"})


def test_block_sparse_bad_pattern(client):
    _expect(client, "INVALID_ARGUMENT", "pattern 'diagonal' is not one of",
            model="block_sparse_attention", parameters={"pattern": "diagonal"})
    _expect(client, "INVALID_ARGUMENT", "'segment_lengths' is not known for block-sparse",
            model="block_sparse_attention", parameters={"segment_lengths": "16"})


def _raw_request(shape=(1, 64, 2, 16), datatype="FP32", data=None):
    req = service_pb2.ModelInferRequest(model_name="dilated_attention")
    for name in "QKV":
        t = req.inputs.add(name=name, datatype=datatype)
        t.shape.extend(shape)
        req.raw_input_contents.append(data if data is not None else GOOD.tobytes())
    for key, value in SMALL.items():
        req.parameters[key].string_param = value
    return req


def _raw_infer(server, request, timeout=10):
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return stub.ModelInfer(request, timeout=timeout)


def test_byte_count_mismatch(server, client):
    with pytest.raises(grpc.RpcError) as e:
        _raw_infer(server, _raw_request(data=GOOD.tobytes()[:-4]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has 8188 bytes of data but shape [1,64,2,16] of FP32 needs 8192" in e.value.details()
    assert client.is_server_live()


def test_extra_raw_contents_and_repeated_inputs_are_refused(server, client):
    # One raw_input_contents more than inputs: refused (as Triton does), not the extra ignored.
    req = _raw_request()
    req.raw_input_contents.append(GOOD.tobytes())
    with pytest.raises(grpc.RpcError) as e:
        _raw_infer(server, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "3 inputs but 4 raw_input_contents" in e.value.details()
    # Q twice, with contents for each: which one would be computed is undefined, so neither is.
    req = _raw_request()
    q2 = req.inputs.add(name="Q", datatype="FP32")
    q2.shape.extend((1, 64, 2, 16))
    req.raw_input_contents.append((GOOD * 2).tobytes())
    with pytest.raises(grpc.RpcError) as e:
        _raw_infer(server, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'Q' given twice" in e.value.details()
    assert client.is_server_live()


def test_shape_product_overflow(server, client):
    with pytest.raises(grpc.RpcError) as e:
        _raw_infer(server, _raw_request(shape=(1, 2**40, 2**20, 2**20), data=b""))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "overflows" in e.value.details()
    assert client.is_server_live()


def test_missing_and_unknown_tensors(server, client):
    req = _raw_request()
    del req.inputs[2]
    del req.raw_input_contents[2]
    with pytest.raises(grpc.RpcError) as e:
        _raw_infer(server, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing input 'V'" in e.value.details()
    req = _raw_request()
    req.outputs.add(name="P")
    with pytest.raises(grpc.RpcError) as e:
        _raw_infer(server, req)
    assert "requested output 'P' does not exist" in e.value.details()
    req = _raw_request()
    del req.raw_input_contents[1]
    with pytest.raises(grpc.RpcError) as e:
        _raw_infer(server, req)
    assert "3 inputs but 2 raw_input_contents" in e.value.details()
    assert client.is_server_live()


def test_typed_contents_beside_raw_contents_are_refused(server, client):
    """Triton's rule: with raw_input_contents no input carries typed contents; they were read
    neither way before, so the request ran on data the client did not mean."""
    req = _raw_request()
    req.inputs[0].contents.fp32_contents.extend([7.0] * GOOD.size)
    with pytest.raises(grpc.RpcError) as e:
        _raw_infer(server, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'Q' carries typed contents" in e.value.details()
    req = _raw_request()
    del req.raw_input_contents[1:]
    for t in req.inputs[1:]:
        t.contents.fp32_contents.extend(GOOD.ravel().tolist())
    with pytest.raises(grpc.RpcError) as e:
        _raw_infer(server, req)
    assert "input 'K' carries typed contents" in e.value.details()
    assert client.is_server_live()


def test_explicit_pairs_are_parsed_whole(server, client):
    """Each entry of `pairs` is exactly i:j; "0:0:junk" was read as 0:0."""
    for pairs in ["0:0:junk,1:1", "0:0,1:1:2", "0"]:
        _expect(client, "INVALID_ARGUMENT", "pairs", model="block_sparse_attention",
                parameters={"block_size": 16, "pattern": "explicit", "pairs": pairs})
    out = client.infer("block_sparse_attention", make_inputs(GOOD, GOOD, GOOD),
                       parameters={"block_size": 16, "pattern": "explicit", "pairs": "0:0, 1:1"})
    assert not np.isnan(out.as_numpy("O")).any()


def test_causal_takes_every_integer_form(server):
    """A bool parameter given as an unsigned integer 0 or 1 is the bool, as a signed one is."""
    req = _raw_request()
    req.parameters["causal"].uint64_param = 1
    reply = _raw_infer(server, req)
    assert reply.model_name == "dilated_attention"
    req.parameters["causal"].uint64_param = 2
    with pytest.raises(grpc.RpcError) as e:
        _raw_infer(server, req)
    assert "causal" in e.value.details()


def test_sequence_parameters_are_refused(server):
    # tritonclient reserves these names; other clients may still send them.
    req = _raw_request()
    req.parameters["sequence_id"].int64_param = 7
    with pytest.raises(grpc.RpcError) as e:
        _raw_infer(server, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequence batching is not supported" in e.value.details()


@pytest.mark.parametrize("payload", [b"\x0a\xff\xff\xff\xff\x0f", b"\x2a\x05\x0a\x01", bytes(range(256))])
def test_truncated_or_garbage_messages(server, client, payload):
    with grpc.insecure_channel(server.url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            call(payload, timeout=10)
    assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL,
                              grpc.StatusCode.NOT_FOUND)
    assert client.is_server_live()


def test_typed_fp32_contents_are_accepted(server):
    req = _raw_request()
    del req.raw_input_contents[:]
    for t in req.inputs:
        t.contents.fp32_contents.extend(GOOD.ravel().tolist())
    reply = _raw_infer(server, req)
    out = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)
    assert np.allclose(out, 0.5)


def test_refused_requests_count_as_failures(server, client):
    """A request that names a served model and fails to parse is a failure of that model
    (Triton's reason OTHER), so that the failure metrics see client errors too."""
    def count(name, **labels):
        return server.metric(name, model="dilated_attention", **labels)

    failed = count("nv_inference_request_failure", reason="OTHER")
    succeeded = count("nv_inference_request_success")
    x = GOOD.reshape(64, 2, 16)
    _expect(client, "INVALID_ARGUMENT", "expected [B, N, H, D]", inputs=make_inputs(x, x, x))
    _expect(client, "INVALID_ARGUMENT", "segment_lengths",
            parameters={"segment_lengths": "12abc", "dilation_rates": "1"})
    assert count("nv_inference_request_failure", reason="OTHER") == failed + 2
    assert count("nv_inference_request_success") == succeeded
    # A model that is not served is no model's failure (its name never becomes a label).
    _expect(client, "NOT_FOUND", "'no_such_model'", model="no_such_model")
    assert 'model="no_such_model"' not in server.metrics_text()


@pytest.mark.skipif(os.environ.get("DILATTN_E2E_DEVICE", "cpu") != "cpu",
                    reason="the CPU path leases Q, K, V and O from the host pool")
def test_request_larger_than_a_pool_is_turned_away_not_a_fault():
    """A request larger than the host pool's cap gets RESOURCE_EXHAUSTED and counts as turned
    away (REJECTED) and as the pool's `oversize` event: neither the BACKEND alert nor the pool's
    exhaustion alert (timeouts) fires for one client's request size."""
    s = ServerProcess("--host-pool-mib", "1", name="tiny-host-pool")
    try:
        c = s.client()
        x = np.zeros((1, 4096, 2, 64), dtype=np.float32) + 0.5  # 2 MiB a tensor
        _expect(c, "RESOURCE_EXHAUSTED", "exceeds its cap", inputs=make_inputs(x, x, x),
                parameters={"segment_lengths": "1024", "dilation_rates": "1"})
        assert s.metric("nv_inference_request_failure", model="dilated_attention",
                        reason="REJECTED") == 1
        assert s.metric("nv_inference_request_failure", reason="BACKEND") == 0
        assert s.metric("dilattn_buffer_pool_events_total", event="oversize") >= 1
        assert s.metric("dilattn_buffer_pool_events_total", event="timeout") == 0
    finally:
        assert s.stop() == 0
