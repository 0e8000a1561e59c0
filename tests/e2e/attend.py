"""The native stream's test helpers, over the Python client users run (client/python/
dilattn_stream.py; its messages come from build/python, DILATTN_PYTHON_PROTO overrides)."""

import pathlib
import queue
import sys

import numpy as np

from helpers import NUMPY_DTYPE

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "client" / "python"))
import dilattn_stream  # noqa: E402
from dilattn_stream import chunk, header, pb  # noqa: E402,F401

stream = dilattn_stream.open_stream


def chunks(q, k, v, datatype, tokens_per_chunk, first=0, last=None):
    """Float arrays sent as `datatype`, as a list of chunk messages."""
    wire = [np.asarray(x, dtype=np.float32).astype(NUMPY_DTYPE[datatype]) for x in (q, k, v)]
    return list(dilattn_stream.chunks(*wire, tokens_per_chunk, first, last))


def collect(responses, shape, datatype):
    """(Accepted, O as float32), checked by the client: token order, no gaps, every token."""
    accepted, o = dilattn_stream.collect(responses, shape, datatype)
    return accepted, o.astype(np.float32)


class Outbox:
    """Messages a test releases over time: the call's generator blocks until each is put, and
    ends at close()."""

    def __init__(self, messages=()):
        self._queue = queue.Queue()
        for m in messages:
            self.put(m)

    def put(self, message):
        self._queue.put(message)

    def close(self):
        self._queue.put(None)

    def __iter__(self):
        while (m := self._queue.get()) is not None:
            yield m
