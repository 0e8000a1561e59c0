"""The native dilattn.v1 streaming API from Python: messages generated at build time into
build/python (DILATTN_PYTHON_PROTO overrides the folder), calls through grpc's generic stream."""

import os
import pathlib
import sys

import grpc
import numpy as np

from helpers import NUMPY_DTYPE

sys.path.insert(0, os.environ.get("DILATTN_PYTHON_PROTO",
                                  str(pathlib.Path(__file__).resolve().parents[2] / "build" /
                                      "python")))
from dilattn.v1 import attention_pb2 as pb  # noqa: E402

METHOD = "/dilattn.v1.DilatedAttention/Attend"
DATATYPE = {"FP32": pb.FP32, "FP16": pb.FP16, "BF16": pb.BF16}


def header(model, shape, datatype="FP32", parameters=None, priority=0, request_id=""):
    h = pb.Header(model=model, datatype=DATATYPE[datatype], shape=list(shape), priority=priority,
                  id=request_id)
    for key, value in (parameters or {}).items():
        h.parameters[key] = value
    return pb.AttendRequest(header=h)


def chunk(tensor, token, data):
    return pb.AttendRequest(chunk=pb.Chunk(tensor=tensor, token=token, data=data))


def chunks(q, k, v, datatype, tokens_per_chunk, first=0, last=None):
    """Q, K and V ((B, N, H, D) arrays) as chunks of tokens [first, last), the three tensors'
    chunks interleaved."""
    tensors = [np.ascontiguousarray(x, dtype=NUMPY_DTYPE[datatype]) for x in (q, k, v)]
    b, n, h, d = tensors[0].shape
    flat = [x.reshape(b * n, h * d) for x in tensors]
    last = b * n if last is None else last
    out = []
    for start in range(first, last, tokens_per_chunk):
        stop = min(start + tokens_per_chunk, last)
        for t, x in zip((pb.Q, pb.K, pb.V), flat):
            out.append(chunk(t, start, x[start:stop].tobytes()))
    return out


def stream(channel):
    return channel.stream_stream(METHOD, request_serializer=pb.AttendRequest.SerializeToString,
                                 response_deserializer=pb.AttendResponse.FromString)


def collect(responses, shape, datatype):
    """(Accepted, O as float32 (B, N, H, D)) from a response stream; the output chunks must
    arrive in token order, without gaps, and cover every token."""
    b, n, h, d = shape
    accepted = None
    parts = []
    at = 0
    for r in responses:
        if r.HasField("accepted"):
            assert accepted is None and not parts
            accepted = r.accepted
            continue
        assert accepted is not None, "output before Accepted"
        assert r.output.token == at, (r.output.token, at)
        assert len(r.output.data) <= accepted.max_chunk_bytes
        part = np.frombuffer(r.output.data, dtype=NUMPY_DTYPE[datatype]).reshape(-1, h * d)
        parts.append(part)
        at += part.shape[0]
    assert at == b * n, (at, b * n)
    o = np.concatenate(parts).astype(np.float32).reshape(b, n, h, d)
    return accepted, o
