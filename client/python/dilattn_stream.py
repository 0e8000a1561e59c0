"""Python client of dilattn's native chunked stream (dilattn.v1.DilatedAttention/Attend), for
problems larger than one KServe message: NumPy arrays in, NumPy array out.

    import grpc, numpy as np
    import dilattn_stream
    with grpc.insecure_channel("localhost:8001") as channel:
        o = dilattn_stream.attend(channel, q, k, v, parameters={"causal": "true"},
                                  timeout_us=500_000)

The messages (dilattn/v1/attention_pb2.py) are generated at build time into build/python;
put that folder and this one on PYTHONPATH, or set DILATTN_PYTHON_PROTO to the folder holding
dilattn/. Needs grpcio, protobuf and numpy (ml_dtypes for BF16).
"""

import operator
import os
import pathlib
import sys

import numpy as np

_PROTO = os.environ.get("DILATTN_PYTHON_PROTO",
                        str(pathlib.Path(__file__).resolve().parents[2] / "build" / "python"))
if _PROTO not in sys.path:
    sys.path.append(_PROTO)
from dilattn.v1 import attention_pb2 as pb  # noqa: E402

METHOD = "/dilattn.v1.DilatedAttention/Attend"
# Leaves room in a 4 MiB message (gRPC's default limit) for everything but the data.
DEFAULT_CHUNK_BYTES = (4 << 20) - 1024


def _numpy_dtype(datatype):
    if datatype == "BF16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return {"FP32": np.float32, "FP16": np.float16}[datatype]


def _datatype_of(array):
    names = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}
    if str(array.dtype) not in names:
        raise ValueError(f"dtype {array.dtype} is not float32, float16 or bfloat16")
    return names[str(array.dtype)]


def header(model, shape, datatype="FP32", parameters=None, priority=0, request_id="",
           timeout_us=0):
    """The stream's first message. `parameters` maps names to strings, as in config.pbtxt;
    `priority` and `timeout_us` (microseconds) go in the header's fields, unchecked (attend
    checks them)."""
    h = pb.Header(model=model, datatype=getattr(pb, datatype), shape=[int(d) for d in shape],
                  priority=priority, id=request_id, timeout_microseconds=timeout_us)
    for key, value in (parameters or {}).items():
        h.parameters[key] = str(value)
    return pb.AttendRequest(header=h)


def chunk(tensor, token, data):
    return pb.AttendRequest(chunk=pb.Chunk(tensor=tensor, token=token, data=data))


def chunks(q, k, v, tokens_per_chunk, first=0, last=None):
    """Q, K and V ((B, N, H, D) arrays of one dtype) as chunks of tokens [first, last), the
    three tensors' chunks interleaved, so the server can compute each stretch as it arrives."""
    b, n, h, d = q.shape
    flat = [np.ascontiguousarray(x).reshape(b * n, h * d) for x in (q, k, v)]
    last = b * n if last is None else last
    for start in range(first, last, tokens_per_chunk):
        stop = min(start + tokens_per_chunk, last)
        for tensor, x in zip((pb.Q, pb.K, pb.V), flat):
            yield chunk(tensor, start, x[start:stop].tobytes())


def open_stream(channel):
    """The raw Attend call: messages in, AttendResponse messages out."""
    return channel.stream_stream(METHOD, request_serializer=pb.AttendRequest.SerializeToString,
                                 response_deserializer=pb.AttendResponse.FromString)


class StreamError(RuntimeError):
    pass


def collect(responses, shape, datatype):
    """(Accepted, O) from a response stream. Output chunks must arrive in token order, without
    gaps, and cover every token; otherwise StreamError."""
    b, n, h, d = shape
    out = np.empty((b * n, h * d), dtype=_numpy_dtype(datatype))
    accepted = None
    at = 0
    for r in responses:
        if r.HasField("accepted"):
            if accepted is not None or at:
                raise StreamError("Accepted after the stream had begun")
            accepted = r.accepted
            continue
        if accepted is None:
            raise StreamError("output before Accepted")
        if len(r.output.data) % (h * d * out.dtype.itemsize) != 0:
            raise StreamError(f"output chunk at token {r.output.token} of "
                              f"{len(r.output.data)} bytes is not whole tokens")
        part = np.frombuffer(r.output.data, dtype=out.dtype).reshape(-1, h * d)
        if r.output.token != at or at + part.shape[0] > b * n:
            raise StreamError(f"output chunk at token {r.output.token}, expected {at}")
        if len(r.output.data) > accepted.max_chunk_bytes:
            raise StreamError("output chunk larger than the server announced")
        out[at:at + part.shape[0]] = part
        at += part.shape[0]
    if at != b * n:
        raise StreamError(f"the output ended after {at} of {b * n} tokens")
    return accepted, out.reshape(b, n, h, d)


def _timeout_us(value):
    try:
        us = operator.index(value)  # ints and NumPy integers; not floats, strings or bools
    except TypeError:
        us = None
    if us is None or isinstance(value, bool) or not 0 <= us < 2**63:
        raise ValueError("timeout_us must be a non-negative integer of microseconds "
                         f"(0: the model's default), got {value!r}")
    return us


def attend(channel, q, k, v, model="dilated_attention", parameters=None, priority=0,
           request_id="", chunk_bytes=DEFAULT_CHUNK_BYTES, timeout=None, timeout_us=0):
    """O for Q, K and V ((B, N, H, D) NumPy arrays of float32, float16 or bfloat16), computed by
    `model` with `parameters` overriding its own. O comes back stretch by stretch while the
    input is still going out.

    `priority` and `timeout_us` schedule the stream's stretches as KServe's `priority` and
    `timeout` parameters schedule a request: a stretch is queued once its input is complete and
    may wait `timeout_us` microseconds from then (0: the model's default timeout; a model that
    does not allow overriding its default keeps it); one that has not started by then is not
    computed and the stream ends with DEADLINE_EXCEEDED. `timeout` (seconds, None for none) is
    the gRPC deadline of the whole call.

    Raises ValueError for arguments it cannot send, grpc.RpcError with the server's status
    (INVALID_ARGUMENT naming the problem, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...) and
    StreamError for a malformed reply."""
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype) or q.ndim != 4:
        raise ValueError("Q, K and V must be (B, N, H, D) arrays of one shape and dtype")
    if q.size == 0:
        raise ValueError(f"every dimension must be >= 1, got shape {q.shape}")
    if not 0 <= priority < 2**32:
        raise ValueError(f"priority must be an unsigned 32-bit integer, got {priority}")
    timeout_us = _timeout_us(timeout_us)
    datatype = _datatype_of(q)
    token_bytes = q.shape[2] * q.shape[3] * q.dtype.itemsize
    per_chunk = max(1, chunk_bytes // token_bytes)
    # Built here, not in the generator: gRPC runs that on its own thread, and an error there
    # reaches the caller only as UNKNOWN "Exception iterating requests!".
    first = header(model, q.shape, datatype, parameters, priority, request_id, timeout_us)

    def messages():
        # gRPC consumes this generator on its own thread, so chunks go out while O comes back.
        yield first
        yield from chunks(q, k, v, per_chunk)

    call = open_stream(channel)(messages(), timeout=timeout)
    _, o = collect(call, q.shape, datatype)
    return o


__all__ = ["attend", "header", "chunk", "chunks", "open_stream", "collect", "StreamError", "pb",
           "DEFAULT_CHUNK_BYTES"]
