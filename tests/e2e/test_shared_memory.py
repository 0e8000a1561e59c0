"""Triton's shared-memory extension with tritonclient's own helpers: tensors in registered
system (POSIX) regions, and on a GPU server in CUDA IPC regions; registration, status and
unregistration; every bad reference answered INVALID_ARGUMENT naming it."""

import base64
import os
import queue
import time
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

import cuda_ipc
import reference
from conftest import ServerProcess, wait_until
from helpers import NUMPY_DTYPE, random_qkv, shared_memory_tensors, to_wire

MODEL = "dilated_attention"
PARAMS = {"segment_lengths": "16,32", "dilation_rates": "1,2"}
SHAPE = (1, 64, 2, 16)


def _unique(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def region():
    """A fresh system region of a given size; destroyed (and unregistered) afterwards."""
    made = []

    def make(client, byte_size, register=True):
        name, key = _unique("r"), "/" + _unique("dilattn_test")
        handle = shm.create_shared_memory_region(name, key, byte_size)
        made.append((client, name, handle))
        if register:
            client.register_system_shared_memory(name, key, byte_size)
        return name, key, handle

    yield make
    for client, name, handle in made:
        try:
            client.unregister_system_shared_memory(name)
        except InferenceServerException:
            pass
        shm.destroy_shared_memory_region(handle)


def _qkv(seed=0):
    return random_qkv(SHAPE, seed)


def _expected(q, k, v, datatype):
    return reference.dilated_attention(*(to_wire(x, datatype) for x in (q, k, v)), [16, 32], [1, 2])


def _packed_tensors(name, n, datatype="FP32"):
    """Q, K, V at offsets 0, n, 2n of region `name` and the output O at 3n: (inputs, outputs)."""
    return shared_memory_tensors(name, SHAPE, datatype, n)


@pytest.mark.parametrize("datatype", ["FP32", "FP16"])
def test_inputs_and_output_in_one_region(client, region, datatype):
    q, k, v = _qkv()
    wire = [x.astype(NUMPY_DTYPE[datatype]) for x in (q, k, v)]
    n = wire[0].nbytes
    name, _, handle = region(client, 4 * n)
    shm.set_shared_memory_region(handle, wire)  # Q, K, V back to back
    poison = np.full(SHAPE, np.nan, dtype=NUMPY_DTYPE[datatype])
    shm.set_shared_memory_region(handle, [poison], offset=3 * n)
    inputs, outputs = _packed_tensors(name, n, datatype)
    result = client.infer(MODEL, inputs, outputs=outputs, parameters=PARAMS)
    response = result.get_response()
    assert list(response.raw_output_contents) == [b""]  # the tensor is in the region
    assert response.outputs[0].parameters["shared_memory_region"].string_param == name
    o = shm.get_contents_as_numpy(handle, NUMPY_DTYPE[datatype], list(SHAPE), offset=3 * n)
    o = o.astype(np.float32)
    assert not np.isnan(o).any()
    err = reference.relative_error(o, _expected(q, k, v, datatype))
    assert err <= reference.TOLERANCE[datatype], err


@pytest.mark.parametrize("datatype", ["FP32", "BF16"])
def test_unaligned_tensors_and_output_over_an_input(client, region, datatype):
    # Offsets are the client's to choose: tensors off their element alignment are computed (the
    # server copies them first), and so is an output placed over an input it is computed from.
    q, k, v = _qkv(7)
    wire = [x.astype(NUMPY_DTYPE[datatype]) for x in (q, k, v)]
    n = wire[0].nbytes
    name, _, handle = region(client, 3 * n + 8)
    at = (1, n + 3, 2 * n + 5)
    for x, off in zip(wire, at):
        shm.set_shared_memory_region(handle, [x], offset=off)
    inputs = []
    for label, off in zip("QKV", at):
        t = grpcclient.InferInput(label, list(SHAPE), datatype)
        t.set_shared_memory(name, n, offset=off)
        inputs.append(t)
    out = grpcclient.InferRequestedOutput("O")
    out.set_shared_memory(name, n, offset=1)  # exactly over Q
    client.infer(MODEL, inputs, outputs=[out], parameters=PARAMS)
    raw = shm.get_contents_as_numpy(handle, np.uint8, [3 * n + 8])
    o = np.frombuffer(raw[1:1 + n].tobytes(), dtype=NUMPY_DTYPE[datatype]).reshape(SHAPE)
    err = reference.relative_error(o.astype(np.float32), _expected(q, k, v, datatype))
    assert err <= reference.TOLERANCE[datatype], err


def test_mixed_shared_and_raw_inputs(client, region):
    q, k, v = _qkv(1)
    name, _, handle = region(client, q.nbytes)
    shm.set_shared_memory_region(handle, [k])
    inputs = []
    for label, x in zip("QKV", (q, k, v)):
        t = grpcclient.InferInput(label, list(SHAPE), "FP32")
        if label == "K":
            t.set_shared_memory(name, x.nbytes)
        else:
            t.set_data_from_numpy(x)
        inputs.append(t)
    o = client.infer(MODEL, inputs, parameters=PARAMS).as_numpy("O")
    assert reference.relative_error(o, _expected(q, k, v, "FP32")) <= reference.FP32


def test_stream_infer_with_shared_memory(server, region):
    c = server.client()
    q, k, v = _qkv(2)
    n = q.nbytes
    name, _, handle = region(c, 4 * n)
    shm.set_shared_memory_region(handle, [q, k, v])
    results = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        inputs, outputs = _packed_tensors(name, n)
        c.async_stream_infer(MODEL, inputs, outputs=outputs, parameters=PARAMS)
        result, error = results.get(timeout=60)
        assert error is None, error
    finally:
        c.stop_stream()
    o = shm.get_contents_as_numpy(handle, np.float32, list(SHAPE), offset=3 * n)
    assert reference.relative_error(o, _expected(q, k, v, "FP32")) <= reference.FP32


def test_register_status_unregister(client, region):
    name, key, _ = region(client, 4096)
    status = client.get_system_shared_memory_status(name)
    assert status.regions[name].key == key and status.regions[name].byte_size == 4096
    assert name in client.get_system_shared_memory_status().regions
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory(name, key, 4096)
    assert "ALREADY_EXISTS" in str(e.value.status()) and name in e.value.message()
    client.unregister_system_shared_memory(name)
    assert name not in client.get_system_shared_memory_status().regions
    client.unregister_system_shared_memory(name)  # idempotent
    with pytest.raises(InferenceServerException) as e:
        client.get_system_shared_memory_status(name)
    assert "NOT_FOUND" in str(e.value.status())
    assert "system_shared_memory" in client.get_server_metadata().extensions


def test_unregister_all(client, region):
    names = [region(client, 1024)[0] for _ in range(3)]
    assert set(names) <= set(client.get_system_shared_memory_status().regions)
    client.unregister_system_shared_memory()
    assert not set(names) & set(client.get_system_shared_memory_status().regions)


@pytest.mark.parametrize("key, needle", [
    ("/../../etc/passwd", "not a POSIX shared-memory object name"),
    ("/a/b", "not a POSIX shared-memory object name"),
    ("", "not a POSIX shared-memory object name"),
    ("/dilattn_no_such_object", "cannot open shared memory object"),
])
def test_register_bad_key(client, key, needle):
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory(_unique("bad"), key, 1024)
    assert "INVALID_ARGUMENT" in str(e.value.status())
    assert needle in e.value.message(), e.value.message()


def test_register_range_beyond_object(client, region):
    name, key, _ = region(client, 4096, register=False)
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory(name, key, 4096, offset=1)
    assert "INVALID_ARGUMENT" in str(e.value.status())
    assert "fewer than offset 1 + byte_size 4096" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory(name, key, 0)
    assert "byte_size is 0" in e.value.message()
    client.register_system_shared_memory(name, key, 1024, offset=3000)  # an unaligned offset maps


def _infer_expect(client, needle, inputs, outputs=None):
    with pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, inputs, outputs=outputs, parameters=PARAMS)
    assert "INVALID_ARGUMENT" in str(e.value.status()), e.value
    assert needle in e.value.message(), e.value.message()
    assert client.is_server_live()


def _shm_inputs(name, n, offsets=(0, None, None), size=None):
    q, k, v = _qkv()
    inputs = []
    for label, x, off in zip("QKV", (q, k, v), offsets):
        t = grpcclient.InferInput(label, list(SHAPE), "FP32")
        if off is None:
            t.set_data_from_numpy(x)
        else:
            t.set_shared_memory(name, size if size is not None else n, offset=off)
        inputs.append(t)
    return inputs


def test_bad_references(client, region):
    n = int(np.prod(SHAPE)) * 4
    name, _, handle = region(client, 2 * n)
    shm.set_shared_memory_region(handle, [np.zeros(2 * n // 4, dtype=np.float32)])
    _infer_expect(client, "region 'nope' is not registered", _shm_inputs("nope", n))
    _infer_expect(client, "shared_memory_byte_size 100 but shape [1,64,2,16] of FP32 needs 8192",
                  _shm_inputs(name, n, size=100))
    _infer_expect(client, f"offset {2 * n} + byte_size {n} lies outside",
                  _shm_inputs(name, n, offsets=(2 * n, None, None)))
    out = grpcclient.InferRequestedOutput("O")
    out.set_shared_memory(name, 16)
    _infer_expect(client, "output 'O' has shared_memory_byte_size 16", _shm_inputs(name, n), [out])
    out = grpcclient.InferRequestedOutput("O")
    out.set_shared_memory(name, n, offset=n + 1)
    _infer_expect(client, "lies outside shared memory region", _shm_inputs(name, n), [out])
    # Half a reference: a size without a region.
    inputs = _shm_inputs(name, n, offsets=(None, None, None))
    inputs[0]._input.parameters["shared_memory_byte_size"].int64_param = n
    _infer_expect(client, "without shared_memory_region", inputs)
    inputs = _shm_inputs(name, n, offsets=(None, None, None))
    inputs[2]._input.parameters["shared_memory_region"].string_param = name
    _infer_expect(client, "without shared_memory_byte_size", inputs)


def test_object_shrunk_after_registration(client, region):
    n = int(np.prod(SHAPE)) * 4
    name, key, _ = region(client, n)
    fd = os.open("/dev/shm/" + key.lstrip("/"), os.O_RDWR)
    try:
        os.ftruncate(fd, 100)
    finally:
        os.close(fd)
    _infer_expect(client, "has shrunk below the registered range", _shm_inputs(name, n))


def test_unregister_while_in_flight(client, region):
    """A request keeps its regions mapped: unregistering (and the client unlinking the object)
    right after sending cannot pull memory from under it."""
    q, k, v = _qkv(3)
    n = q.nbytes
    name, _, handle = region(client, 4 * n)
    shm.set_shared_memory_region(handle, [q, k, v])
    results = []
    inputs, outputs = _packed_tensors(name, n)
    for _ in range(8):
        client.async_infer(MODEL, inputs, outputs=outputs, parameters=PARAMS,
                           callback=lambda result, error: results.append((result, error)))
    client.unregister_system_shared_memory(name)
    assert wait_until(lambda: len(results) == 8, timeout=60)
    for result, error in results:
        # Each request either resolved the region before it went (and completed) or after
        # (and was refused); none crashed the server.
        assert error is None or "is not registered" in error.message(), error
    assert client.is_server_live()


def test_switched_off():
    s = ServerProcess("--shared-memory", "off", name="shm-off")
    try:
        c = s.client()
        handle = shm.create_shared_memory_region("x", "/" + _unique("dilattn_off"), 1024)
        try:
            with pytest.raises(InferenceServerException) as e:
                c.register_system_shared_memory("x", "/whatever", 1024)
            assert "UNAVAILABLE" in str(e.value.status())
            assert "system_shared_memory" not in c.get_server_metadata().extensions
        finally:
            shm.destroy_shared_memory_region(handle)
    finally:
        assert s.stop() == 0


def test_cuda_region_refused_without_gpu(client):
    if cuda_ipc.on_gpu():
        pytest.skip("this server has a GPU")
    with pytest.raises(InferenceServerException) as e:
        client.register_cuda_shared_memory("c", base64.b64encode(b"\0" * 64), 0, 1024)
    assert "INVALID_ARGUMENT" in str(e.value.status()) or "FAILED_PRECONDITION" in str(
        e.value.status())
    assert "CUDA" in e.value.message()
    assert "c" not in client.get_cuda_shared_memory_status().regions


@pytest.fixture
def cudart():
    if not cuda_ipc.on_gpu():
        pytest.skip("CUDA shared memory needs a GPU server (DILATTN_E2E_DEVICE=cuda)")
    lib = cuda_ipc.load_cudart()
    if lib is None:
        pytest.skip("no CUDA runtime library for the client side")
    return lib


@pytest.mark.parametrize("datatype", ["FP16", "FP32"])
def test_cuda_inputs_and_output(client, cudart, datatype):
    q, k, v = _qkv(4)
    wire = [x.astype(NUMPY_DTYPE[datatype]) for x in (q, k, v)]
    n = wire[0].nbytes
    buf = cuda_ipc.DeviceBuffer(cudart, 4 * n)
    name = _unique("cuda")
    try:
        buf.fill(0xFF)  # NaN in both FP16 and FP32: an unwritten output cannot pass
        for i, x in enumerate(wire):
            buf.write(x, offset=i * n)
        client.register_cuda_shared_memory(name, buf.raw_handle(), 0, 4 * n)
        assert client.get_cuda_shared_memory_status(name).regions[name].byte_size == 4 * n
        inputs, outputs = _packed_tensors(name, n, datatype)
        result = client.infer(MODEL, inputs, outputs=outputs, parameters=PARAMS)
        assert list(result.get_response().raw_output_contents) == [b""]
        o = buf.read(NUMPY_DTYPE[datatype], SHAPE, offset=3 * n).astype(np.float32)
        assert not np.isnan(o).any()
        err = reference.relative_error(o, _expected(q, k, v, datatype))
        assert err <= reference.TOLERANCE[datatype], err
    finally:
        client.unregister_cuda_shared_memory(name)
        buf.free()


@pytest.mark.parametrize("over_q", [True, False])
def test_cuda_output_over_an_input_or_unaligned(client, cudart, over_q):
    """O written over Q, or 2 bytes past an aligned offset: the kernel cannot run in place on
    those ranges, so the server copies through its own buffers, and the result is still right."""
    q, k, v = _qkv(5)
    wire = [x.astype(np.float16) for x in (q, k, v)]
    n = wire[0].nbytes
    buf = cuda_ipc.DeviceBuffer(cudart, 4 * n + 16)
    name = _unique("cuda_alias")
    at = 0 if over_q else 3 * n + 2
    try:
        buf.fill(0xFF)
        for i, x in enumerate(wire):
            buf.write(x, offset=i * n)
        client.register_cuda_shared_memory(name, buf.raw_handle(), 0, 4 * n + 16)
        inputs, _ = _packed_tensors(name, n, "FP16")
        out = grpcclient.InferRequestedOutput("O")
        out.set_shared_memory(name, n, offset=at)
        client.infer(MODEL, inputs, outputs=[out], parameters=PARAMS)
        o = buf.read(np.uint8, (n,), offset=at).view(np.float16).reshape(SHAPE).astype(np.float32)
        assert not np.isnan(o).any()
        err = reference.relative_error(o, _expected(q, k, v, "FP16"))
        assert err <= reference.TOLERANCE["FP16"], err
    finally:
        client.unregister_cuda_shared_memory(name)
        buf.free()


def test_cuda_region_errors(client, cudart):
    buf = cuda_ipc.DeviceBuffer(cudart, 4096)
    try:
        with pytest.raises(InferenceServerException) as e:
            client.register_cuda_shared_memory(_unique("big"), buf.raw_handle(), 0, 1 << 30)
        assert "exceeds the shared CUDA allocation" in e.value.message(), e.value.message()
        with pytest.raises(InferenceServerException) as e:
            client.register_cuda_shared_memory(_unique("short"), base64.b64encode(b"\1" * 10), 0,
                                              1024)
        assert "raw_handle has 10 bytes" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            client.register_cuda_shared_memory(_unique("dev"), buf.raw_handle(), 99, 1024)
        assert "device_id 99 does not exist" in e.value.message()
    finally:
        buf.free()


def test_output_through_a_second_registration_of_the_inputs_object(client, region):
    """Two registrations map one object at two addresses: an output placed over an input through
    the other name is still the same bytes, and must come out as right as over the same name."""
    q, k, v = _qkv(11)
    n = q.nbytes
    name, key, handle = region(client, 3 * n)
    shm.set_shared_memory_region(handle, [q, k, v])
    alias = _unique("alias")
    client.register_system_shared_memory(alias, key, 3 * n)
    try:
        expected = _expected(q, k, v, "FP32")
        for over in range(3):  # O over Q, K, then V
            shm.set_shared_memory_region(handle, [q, k, v])
            inputs, _ = _packed_tensors(name, n)
            out = grpcclient.InferRequestedOutput("O")
            out.set_shared_memory(alias, n, offset=over * n)
            client.infer(MODEL, inputs, outputs=[out], parameters=PARAMS)
            o = shm.get_contents_as_numpy(handle, np.float32, list(SHAPE), offset=over * n)
            err = reference.relative_error(o, expected)
            assert err <= reference.FP32, (over, err)
    finally:
        client.unregister_system_shared_memory(alias)


@pytest.mark.parametrize("output_in_region", [True, False])
def test_object_shrunk_while_the_request_waits(region, output_in_region):
    """The client shrinks the object after its request was accepted, while it waits behind
    another job: the request fails naming the region, the server lives on (touching the mapping
    past the object's end raises SIGBUS), and the job ahead is untouched. With O returned in the
    response, only the inputs' copy can notice the shrinking."""
    if reference.ON_GPU:
        pytest.skip("the GPU computes the job ahead in milliseconds, so there is no window to "
                    "shrink the object in; it reads pinned regions by DMA, which cannot fault")
    server = ServerProcess("--cpu-threads", "1", name="shm-shrunk")
    try:
        client = server.client()
        rng = np.random.default_rng(5)
        # About a second or more of one CPU thread: the shrinking happens while it runs.
        big_shape = (1, 32768, 4, 64)
        big = [rng.uniform(-1, 1, big_shape).astype(np.float32) for _ in range(3)]
        big_inputs = []
        for label, x in zip("QKV", big):
            t = grpcclient.InferInput(label, list(big_shape), "FP32")
            t.set_data_from_numpy(x)
            big_inputs.append(t)
        outcomes = queue.Queue()
        client.async_infer("dilated_attention_head_groups", big_inputs,
                           callback=lambda result, error: outcomes.put(("big", error)),
                           parameters={"segment_lengths": "4096", "dilation_rates": "1"})
        time.sleep(0.5)  # the big job is in and computing
        q, k, v = _qkv(2)
        n = q.nbytes
        name, key, handle = region(client, 4 * n)
        shm.set_shared_memory_region(handle, [q, k, v])
        inputs, outputs = _packed_tensors(name, n)
        client.async_infer(MODEL, inputs, outputs=outputs if output_in_region else None,
                           parameters=PARAMS,
                           callback=lambda result, error: outcomes.put(("shm", error)))
        time.sleep(0.2)  # accepted: its size check passed
        fd = os.open("/dev/shm/" + key.lstrip("/"), os.O_RDWR)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        got = dict(outcomes.get(timeout=120) for _ in range(2))
        assert got["big"] is None, got["big"].message()
        assert got["shm"] is not None, "the request read a shrunk object and succeeded"
        assert "shrank below the registered range while a request used it" in got["shm"].message()
        assert name in got["shm"].message()
        assert client.is_server_live()
        client.unregister_system_shared_memory(name)
    finally:
        server.stop()
