"""Hostile and mangled messages, in bulk: seeded random mutations of valid requests, byte by byte
and field by field, unary and on one stream. Every answer is a result or a clean error with a
message; the server never crashes and keeps serving; a message protobuf itself cannot parse is
never computed. Run under ASan/UBSan/LSan too (test.sh), where any memory error or leak on these
paths fails the run."""

import queue
import random

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

import reference

SHAPE = (1, 48, 2, 8)
SMALL = {"segment_lengths": "16,32", "dilation_rates": "1,2"}
CLEAN_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.UNAVAILABLE}
# Seeded: a failure reproduces from its case number.
BYTE_CASES = 600
FIELD_CASES = 500
STREAM_CASES = 200


def _inputs(rng):
    return [rng.uniform(-1, 1, SHAPE).astype(np.float32) for _ in range(3)]


def _request(q, k, v):
    req = service_pb2.ModelInferRequest(model_name="dilated_attention", id="hostile")
    for name, x in zip("QKV", (q, k, v)):
        t = req.inputs.add(name=name, datatype="FP32")
        t.shape.extend(x.shape)
        req.raw_input_contents.append(x.tobytes())
    for key, value in SMALL.items():
        req.parameters[key].string_param = value
    return req


def _check_output(reply, q, k, v):
    assert len(reply.raw_output_contents) == 1
    out = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(SHAPE)
    ref = reference.dilated_attention(q, k, v, [16, 32], [1, 2])
    assert reference.relative_error(out, ref) < reference.TOLERANCE["FP32"]


def _mutate_bytes(data, rnd):
    data = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        kind = rnd.randrange(6)
        at = rnd.randrange(len(data) + 1)
        if kind == 0 and data:  # flip bits of one byte
            data[at % len(data)] ^= 1 << rnd.randrange(8)
        elif kind == 1 and data:  # overwrite with a byte that often starts a tag or a varint
            data[at % len(data)] = rnd.choice([0x00, 0x08, 0x0A, 0x3A, 0x7F, 0x80, 0xFF])
        elif kind == 2:  # truncate
            del data[at:]
        elif kind == 3:  # insert a run of varint continuation bytes or a huge length
            data[at:at] = rnd.choice([b"\xff" * rnd.randint(1, 12),
                                      b"\x3a\xff\xff\xff\xff\x0f",
                                      b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x01"])
        elif kind == 4 and data:  # drop a span
            del data[at:at + rnd.randint(1, 16)]
        else:  # duplicate a span
            data[at:at] = data[at:at + rnd.randint(1, 32)]
    return bytes(data)


def _parses(data):
    try:
        service_pb2.ModelInferRequest.FromString(data)
        return True
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and its upb variants
        return False


def _mutate_fields(req, rnd):
    """Edits one to three fields of a valid request the way a broken or hostile client might."""
    huge = [-2**63, -1, 0, 1, 7, 47, 48, 49, 2**31, 2**32 + 48, 2**62, 2**63 - 1]
    for _ in range(rnd.randint(1, 3)):
        kind = rnd.randrange(12)
        t = req.inputs[rnd.randrange(len(req.inputs))] if req.inputs else None
        if kind == 0 and t is not None and t.shape:
            t.shape[rnd.randrange(len(t.shape))] = rnd.choice(huge)
        elif kind == 1 and t is not None:
            del t.shape[:]
            t.shape.extend(rnd.choice(huge) for _ in range(rnd.randrange(7)))
        elif kind == 2 and t is not None:
            t.datatype = rnd.choice(["FP16", "BF16", "INT8", "BYTES", "fp32", "", "FP32\x00",
                                     "F" * 300])
        elif kind == 3 and t is not None:
            t.name = rnd.choice(["Q", "K", "V", "O", "", "q", "QQ", "\u00e9"])
        elif kind == 4 and req.raw_input_contents:
            i = rnd.randrange(len(req.raw_input_contents))
            raw = req.raw_input_contents[i]
            req.raw_input_contents[i] = rnd.choice([b"", raw[:-1], raw + b"\x00", raw[:7]])
        elif kind == 5:
            if rnd.random() < 0.5 and req.raw_input_contents:
                del req.raw_input_contents[-1]
            else:
                req.raw_input_contents.append(b"\x00" * rnd.choice([0, 4, 3072]))
        elif kind == 6:
            key = rnd.choice(["segment_lengths", "dilation_rates", "mode", "causal",
                              "softmax_scale", "priority", "timeout", "sequence_id",
                              "binary_data_output", "unknown_key", ""])
            p = req.parameters[key]
            which = rnd.randrange(5)
            if which == 0:
                p.string_param = rnd.choice(["", "16", "1,2,3", "-1", "0", "16,,32", "1e9",
                                             "18446744073709551617", "longnet", "x" * 4096])
            elif which == 1:
                p.int64_param = rnd.choice(huge)
            elif which == 2:
                p.bool_param = rnd.random() < 0.5
            elif which == 3:
                p.double_param = rnd.choice([0.0, -1.0, float("nan"), float("inf"), 1e-300,
                                             1e300, 0.125])
            else:
                p.uint64_param = rnd.choice([0, 1, 2**64 - 1])
        elif kind == 7 and t is not None:
            # Typed contents beside or instead of the raw ones.
            t.contents.fp32_contents.extend([0.5] * rnd.choice([0, 1, 768]))
            if rnd.random() < 0.3:
                t.contents.int_contents.extend([1, 2, 3])
        elif kind == 8 and t is not None:
            key = rnd.choice(["shared_memory_region", "shared_memory_offset",
                              "shared_memory_byte_size", "binary_data_size"])
            if key == "shared_memory_region":
                t.parameters[key].string_param = rnd.choice(["", "nope", "../etc/passwd"])
            else:
                t.parameters[key].int64_param = rnd.choice(huge)
        elif kind == 9:
            out = req.outputs.add(name=rnd.choice(["O", "P", ""]))
            if rnd.random() < 0.5:
                out.parameters["shared_memory_region"].string_param = "nope"
                out.parameters["shared_memory_byte_size"].int64_param = rnd.choice(huge)
        elif kind == 10:
            req.model_name = rnd.choice(["", "dilated_attention_head_groups",
                                         "block_sparse_attention", "x" * 1000, "dilated"])
            req.model_version = rnd.choice(["", "1", "2", "-1", "01"])
        else:
            dup = req.inputs.add()
            dup.CopyFrom(req.inputs[rnd.randrange(len(req.inputs))] if req.inputs else dup)
    return req


def _unary(channel):
    return channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=None, response_deserializer=None)


def _classify(call, payload):
    """The status code of one call and its reply bytes (None unless OK)."""
    try:
        return grpc.StatusCode.OK, call(payload, timeout=30)
    except grpc.RpcError as e:
        assert e.code() in CLEAN_ERRORS, (e.code(), e.details())
        assert e.details(), e.code()
        return e.code(), None


def _still_serves(channel, rng):
    q, k, v = _inputs(rng)
    reply = service_pb2.ModelInferResponse.FromString(
        _unary(channel)(_request(q, k, v).SerializeToString(), timeout=30))
    _check_output(reply, q, k, v)


def test_mutated_bytes(server, client):
    rng = np.random.default_rng(11)
    rnd = random.Random(11)
    codes = {}
    with grpc.insecure_channel(server.url) as channel:
        call = _unary(channel)
        valid = [_request(*_inputs(rng)).SerializeToString() for _ in range(4)]
        for case in range(BYTE_CASES):
            payload = _mutate_bytes(valid[case % len(valid)], rnd)
            code, reply = _classify(call, payload)
            codes[code] = codes.get(code, 0) + 1
            if not _parses(payload):
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (case, code)
            if reply is not None:
                service_pb2.ModelInferResponse.FromString(reply)
        _still_serves(channel, rng)
    # The mutations must reach past the framing: some still run, most are refused.
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > BYTE_CASES // 4, codes
    assert client.is_server_live() and client.is_server_ready()


def test_mutated_fields(server, client):
    rng = np.random.default_rng(12)
    rnd = random.Random(12)
    codes = {}
    with grpc.insecure_channel(server.url) as channel:
        call = _unary(channel)
        for case in range(FIELD_CASES):
            q, k, v = _inputs(rng)
            req = _mutate_fields(_request(q, k, v), rnd)
            code, reply = _classify(call, req.SerializeToString())
            codes[code] = codes.get(code, 0) + 1
            if reply is not None:
                out = service_pb2.ModelInferResponse.FromString(reply)
                assert [o.name for o in out.outputs] == ["O"], (case, out.outputs)
                assert len(out.raw_output_contents[0]) == int(np.prod(out.outputs[0].shape)) * {
                    "FP32": 4, "FP16": 2, "BF16": 2}[out.outputs[0].datatype], case
        _still_serves(channel, rng)
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > FIELD_CASES // 2, codes
    assert codes.get(grpc.StatusCode.OK, 0) > 0, codes
    assert client.is_server_live() and client.is_server_ready()


def test_mutated_requests_on_one_stream(server, client):
    # Each bad request is answered on the stream with its error_message; the stream stays open
    # and the valid request sent last is computed.
    rng = np.random.default_rng(13)
    rnd = random.Random(13)
    sent = queue.Queue()
    requests = []
    for case in range(STREAM_CASES):
        req = _mutate_fields(_request(*_inputs(rng)), rnd)
        req.id = f"case-{case}"
        requests.append(req)
    q, k, v = _inputs(rng)
    last = _request(q, k, v)
    last.id = "last"
    requests.append(last)
    for r in requests:
        sent.put(r.SerializeToString())

    def messages():
        while not sent.empty():
            yield sent.get()

    with grpc.insecure_channel(server.url) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       request_serializer=None, response_deserializer=None)
        answers = {}
        for raw in stream(messages(), timeout=120):
            msg = service_pb2.ModelStreamInferResponse.FromString(raw)
            answers[msg.infer_response.id if not msg.error_message else len(answers)] = msg
            if msg.infer_response.id == "last":
                _check_output(msg.infer_response, q, k, v)
                break
    assert "last" in answers
    errors = [m for m in answers.values() if m.error_message]
    assert errors and all(m.error_message.strip() for m in errors)
    assert client.is_server_live() and client.is_server_ready()


def test_every_message_on_a_stream_is_answered(server, client):
    # Regression: a stream whose client closed right after its last message could finish before
    # that message was counted, dropping its response and completing it on a deleted stream.
    rng = np.random.default_rng(17)
    good = _request(*_inputs(rng))
    bad = _request(*_inputs(rng))
    bad.inputs[0].datatype = "INT8"
    with grpc.insecure_channel(server.url) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       request_serializer=None, response_deserializer=None)
        for round_ in range(40):
            sent = [bad.SerializeToString()] * 30 + [good.SerializeToString()]
            answers = list(stream(iter(sent), timeout=60))
            assert len(answers) == len(sent), (round_, len(answers))
    assert client.is_server_live()


@pytest.mark.parametrize("payload", [b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256)), b"\x3a"])
def test_garbage_on_a_stream(server, client, payload):
    with grpc.insecure_channel(server.url) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       request_serializer=None, response_deserializer=None)
        try:
            for raw in stream(iter([payload]), timeout=30):
                msg = service_pb2.ModelStreamInferResponse.FromString(raw)
                assert msg.error_message, msg
        except grpc.RpcError as e:
            assert e.code() in CLEAN_ERRORS, (e.code(), e.details())
    assert client.is_server_live() and client.is_server_ready()


def test_echoed_client_text_is_bounded_and_escaped(server):
    req = _request(*_inputs(np.random.default_rng(14)))
    req.model_name = "m" * 5000
    with grpc.insecure_channel(server.url) as channel:
        with pytest.raises(grpc.RpcError) as e:
            _unary(channel)(req.SerializeToString(), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "(5000 bytes)" in e.value.details() and len(e.value.details()) < 400
        req.model_name = "dilated_attention"
        req.inputs[0].datatype = "FP32\x01\n"
        with pytest.raises(grpc.RpcError) as e:
            _unary(channel)(req.SerializeToString(), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "datatype 'FP32\\x01\\n'" in e.value.details(), e.value.details()


def test_mutated_shared_memory_references(server, client):
    # A real registered region, then requests whose tensors point into it at random offsets and
    # sizes, overflowing ones included: each is computed within the region or refused cleanly.
    import uuid

    import tritonclient.utils.shared_memory as shm

    rng = np.random.default_rng(15)
    rnd = random.Random(15)
    n = int(np.prod(SHAPE)) * 4
    name, key = "hostile_" + uuid.uuid4().hex[:8], "/dilattn_hostile_" + uuid.uuid4().hex[:8]
    handle = shm.create_shared_memory_region(name, key, 4 * n)
    q, k, v = _inputs(rng)
    shm.set_shared_memory_region(handle, [q, k, v])
    client.register_system_shared_memory(name, key, 4 * n)
    sizes = [0, 1, n - 1, n, n + 1, 4 * n, 2**63 - 1, -1, -(2**63)]
    offsets = [0, 1, n, 3 * n, 3 * n + 1, 4 * n, 4 * n - 1, 2**63 - 1, -1, 2**62]
    computed = 0
    try:
        with grpc.insecure_channel(server.url) as channel:
            call = _unary(channel)
            for case in range(300):
                req = _request(q, k, v)
                del req.raw_input_contents[:]
                targets = list(req.inputs) + [req.outputs.add(name="O")]
                for i, t in enumerate(targets):
                    p = t.parameters
                    if rnd.random() < 0.15:
                        continue  # left out: for an input, the raw contents count goes wrong
                    p["shared_memory_region"].string_param = rnd.choice([name] * 6 + ["", "x"])
                    p["shared_memory_offset"].int64_param = (
                        i * n if rnd.random() < 0.5 else rnd.choice(offsets))
                    p["shared_memory_byte_size"].int64_param = (
                        n if rnd.random() < 0.5 else rnd.choice(sizes))
                _, reply = _classify(call, req.SerializeToString())
                computed += reply is not None
            _still_serves(channel, rng)
    finally:
        client.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(handle)
    assert computed > 0
    assert client.is_server_live() and client.is_server_ready()


def _mutated_attend_stream(rnd, rng):
    import attend

    shape = [1, rnd.choice([16, 48, 64]), 2, 8]
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    messages = [attend.header("dilated_attention", shape, "FP32",
                              {"segment_lengths": "16,32", "dilation_rates": "1,2"})]
    messages += attend.chunks(x, x, x, "FP32", rnd.choice([1, 5, 16]))
    for _ in range(rnd.randint(1, 3)):
        if not messages:
            break
        i = rnd.randrange(len(messages))
        m = attend.pb.AttendRequest()
        m.CopyFrom(messages[i])
        kind = rnd.randrange(7)
        if kind == 0:
            del messages[i]
        elif kind == 1:
            messages.insert(i, m)  # a repeat
        elif kind == 2 and m.HasField("chunk"):
            m.chunk.token = rnd.choice([-1, 0, 1, 2**62, shape[1] - 1])
            messages[i] = m
        elif kind == 3 and m.HasField("chunk"):
            m.chunk.data = m.chunk.data[:rnd.randrange(len(m.chunk.data) + 1)]
            messages[i] = m
        elif kind == 4 and m.HasField("chunk"):
            m.chunk.tensor = rnd.choice([0, 1, 2, 3, 4, 99])
            messages[i] = m
        elif kind == 5 and m.HasField("header"):
            del m.header.shape[:]
            m.header.shape.extend(rnd.choice([[1, 64, 2, 8], [2**62, 2, 2, 8], [1, 64, 2],
                                              [1, 64, 2, 8, 1], [-1, 64, 2, 8]]))
            m.header.datatype = rnd.choice([0, 1, 2, 3, 77])
            messages[i] = m
        else:
            messages = messages[:i]  # the client stops early
    return messages


def test_mutated_attend_streams(server, client):
    import attend

    rng = np.random.default_rng(16)
    rnd = random.Random(16)
    codes = {}
    with grpc.insecure_channel(server.url) as channel:
        for _ in range(150):
            messages = _mutated_attend_stream(rnd, rng)
            try:
                for _ in attend.stream(channel)(iter(messages), timeout=30):
                    pass
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
                assert code in CLEAN_ERRORS | {grpc.StatusCode.RESOURCE_EXHAUSTED}, (
                    code, e.details())
                assert e.details()
            codes[code] = codes.get(code, 0) + 1
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0 and codes.get(
        grpc.StatusCode.OK, 0) > 0, codes
    assert client.is_server_live() and client.is_server_ready()


def test_mutated_shared_memory_registrations(server, client):
    # Registration RPCs with random names, keys, offsets, sizes and CUDA handles: each is
    # registered or refused cleanly, and whatever was registered unregisters.
    import uuid

    import tritonclient.utils.shared_memory as shm

    rnd = random.Random(18)
    key = "/dilattn_hostile_reg_" + uuid.uuid4().hex[:8]
    handle = shm.create_shared_memory_region("hostile_reg", key, 8192)
    names = ["", "r", "x" * 300, "a/b", "\u00e9", "dup"]
    keys = [key, "", "/", "//", key + "x", "/../" + key[1:], key[1:], "/" + "k" * 300]
    numbers = [0, 1, 4096, 8192, 8193, 2**31, 2**63 - 1]
    registered = set()
    try:
        with grpc.insecure_channel(server.url) as channel:
            sys_register = channel.unary_unary(
                "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
                request_serializer=service_pb2.SystemSharedMemoryRegisterRequest.SerializeToString,
                response_deserializer=service_pb2.SystemSharedMemoryRegisterResponse.FromString)
            cuda_register = channel.unary_unary(
                "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
                request_serializer=service_pb2.CudaSharedMemoryRegisterRequest.SerializeToString,
                response_deserializer=service_pb2.CudaSharedMemoryRegisterResponse.FromString)
            for case in range(200):
                name = rnd.choice(names) + (str(case) if rnd.random() < 0.5 else "")
                try:
                    if rnd.random() < 0.8:
                        sys_register(service_pb2.SystemSharedMemoryRegisterRequest(
                            name=name, key=rnd.choice(keys), offset=rnd.choice(numbers),
                            byte_size=rnd.choice(numbers)), timeout=10)
                    else:
                        cuda_register(service_pb2.CudaSharedMemoryRegisterRequest(
                            name=name, raw_handle=bytes(rnd.randrange(256) for _ in range(
                                rnd.choice([0, 8, 64, 65]))),
                            device_id=rnd.choice([-1, 0, 7, 2**62]),
                            byte_size=rnd.choice(numbers)), timeout=10)
                    registered.add(name)
                except grpc.RpcError as e:
                    # FAILED_PRECONDITION: a server built without CUDA refuses every CUDA region.
                    assert e.code() in CLEAN_ERRORS | {grpc.StatusCode.ALREADY_EXISTS,
                                                       grpc.StatusCode.FAILED_PRECONDITION}, (
                        case, e.code(), e.details())
                    assert e.details()
        assert registered, "no registration went through"
    finally:
        for name in registered:
            client.unregister_system_shared_memory(name)
            client.unregister_cuda_shared_memory(name)
        shm.destroy_shared_memory_region(handle)
    assert not client.get_system_shared_memory_status().regions
    assert client.is_server_live() and client.is_server_ready()


def test_a_stream_that_does_not_read_stops_taking_requests(server):
    # Every response holds its output in the host pool until it is written; a client that sends
    # requests on a stream and never reads would have the server compute and keep all of them.
    # Past 16 requests read and not written back, the server reads no more from that stream
    # (so the client's sends block on flow control), and everything is answered once it reads.
    import time

    rng = np.random.default_rng(23)
    shape = (1, 4096, 4, 64)  # 4 MB outputs: a few fill any flow-control window
    q, k, v = (rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(3))
    good = _request(q, k, v)
    good.parameters["segment_lengths"].string_param = "256"
    good.parameters["dilation_rates"].string_param = "1"
    sent = 40
    done = lambda: server.metric("nv_inference_request_success", model="dilated_attention")
    before = done()
    # Without BDP probing the client's transport keeps its initial 64 KiB windows: left on, it may
    # grow them while nothing reads and take in megabytes of responses, which the server then
    # counts as written (this test once saw all 40 computed on a loaded machine).
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
               ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(server.url, options=options) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       request_serializer=None, response_deserializer=None)
        call = stream(iter([good.SerializeToString()] * sent), timeout=300)
        last, since = done(), time.time()
        while time.time() - since < 3:  # until nothing more completes for 3 s
            time.sleep(0.2)
            if done() != last:
                last, since = done(), time.time()
        computed = last - before
        assert 16 <= computed < sent, computed
        answers = [service_pb2.ModelStreamInferResponse.FromString(raw) for raw in call]
    assert len(answers) == sent
    assert all(not a.error_message for a in answers), answers[0].error_message
    o = np.frombuffer(answers[-1].infer_response.raw_output_contents[0], np.float32)
    ref = reference.dilated_attention(q, k, v, [256], [1])
    assert reference.relative_error(o.reshape(shape), ref) <= reference.FP32


def test_string_field_that_is_not_utf8(server):
    # proto3 strings must be UTF-8; protobuf refuses the message and would log a line per such
    # request to the server's stderr, which a client could then fill. The client gets the error,
    # the log gets nothing.
    good = _request(*_inputs(np.random.default_rng(31))).SerializeToString()
    bad = good + b"\x0a\x02\xff\xfe"  # model_name again (the last one wins), not UTF-8
    with grpc.insecure_channel(server.url) as channel:
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as e:
                _unary(channel)(bad, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not UTF-8" in e.value.details()
    assert "libprotobuf" not in server.log_path.read_text()
