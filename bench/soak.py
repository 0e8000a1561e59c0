#!/usr/bin/env python3
"""Soak test: mixed traffic against dilattn-server for a while, every answer checked.

Starts two dilattn-servers, one with the built-in models and one with a model of scheduling
options, and --workers client threads send for --minutes a random mix of calls, each judged:

  infer     ModelInfer: a random model, shape, dtype and options; O against the float64 reference
  cancel    ModelInfer with a client deadline shorter than its compute: O checked if it comes in
            time, else DEADLINE_EXCEEDED
  long      ModelInfer of a long sequence (on a GPU server it runs in pieces, or in launches over
            parts of its rows when a branch spans the sequence); O checked on whole stretches
  bad       malformed requests (shapes, dtypes, options, byte counts): INVALID_ARGUMENT or
            NOT_FOUND with a message
  shm       system shared memory: register, infer with Q, K, V and O in the region, unregister
  cuda_shm  (GPU server) CUDA shared memory the same way, through cudaIpc handles
  stream    the native stream (dilattn.v1 Attend) in small chunks; O checked
  abandon   a native stream dropped halfway through its input
  bidi      ModelStreamInfer: a few requests, one of them bad, on one stream
  scheduled bursts of requests to a second server, whose model has priority levels, a queue delay,
            a bounded queue and a default timeout, with random priorities, timeouts and client
            deadlines: each answered correctly, turned away by the full queue, or expired, and
            none lost (its success counter agrees)

A monitor samples each server's resident memory, its GPU memory (nvidia-smi) and the buffer
pools' bytes (/metrics). After a warm-up (a fifth of --minutes) and after the main phase (the
rest), traffic pauses until every call has ended and the pools' idle release
(--pool-idle-release-seconds) has run: no buffer may then be leased or cached, and the memory at
the second point may exceed the memory at the first by at most --rss-slack-mib (host) and
--gpu-slack-mib. The scheduling server's success counter is read at the second point. Finally
SIGTERM must end each server with exit status 0, and their logs must hold no error lines. The
second server's log goes beside --log (its name + -scheduling).

Prints a table per action and the memory samples; exits 1 if any call was judged wrong (an
exception in the soak's own code counts), an action that should have run never did, memory grew,
a worker hung, or a server failed. No server outlives the script.

  python3 bench/soak.py [--server build/server/dilattn-server] [--device cpu|cuda]
                        [--minutes 10] [--workers 8] [--seed 1] [--server-args '...']
"""

import argparse
import collections
import math
import os
import pathlib
import queue
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "client" / "python"))
import cuda_ipc  # noqa: E402
import reference  # noqa: E402
from helpers import NUMPY_DTYPE, make_inputs, shared_memory_tensors, to_wire  # noqa: E402

TOLERANCE_GPU = {"FP32": 2e-3, "FP16": 2e-3, "BF16": 1e-2}  # FP32 is computed in fp16 on a GPU
TOLERANCE_CPU = {"FP32": 1e-5, "FP16": 2e-3, "BF16": 1e-2}
WEIGHTS = {"infer": 30, "cancel": 8, "long": 4, "bad": 12, "shm": 8, "cuda_shm": 6, "stream": 8,
           "abandon": 4, "bidi": 6, "scheduled": 10}
# Client deadlines of calls that should be answered: generous, so that a slow (sanitizer) build
# passes, but a hung call still ends as a failure instead of hanging the soak.
CALL_TIMEOUT = 300
LONG_CALL_TIMEOUT = 900
# Options of the dilated models a request may carry: (segment lengths, dilation rates); None
# keeps the model's own.
DILATED_OPTIONS = [None, ([256, 512, 1024], [1, 2, 4]), ([512, 2048], [1, 4]), ([128], [1]),
                   ([1024, 4096], [1, 2])]


class Wrong(Exception):
    """A call whose outcome is not one the contract allows."""


def stretch(segments):
    return math.lcm(*segments)


SCHEDULING_MODEL = """
name: "scheduled"
max_batch_size: 4
dynamic_batching {
  preferred_batch_size: [ 4 ]
  max_queue_delay_microseconds: 3000
  priority_levels: 3
  default_priority_level: 2
  default_queue_policy {
    max_queue_size: 24
    default_timeout_microseconds: 400000
    allow_timeout_override: true
  }
}
parameters { key: "segment_lengths" value { string_value: "256,512" } }
parameters { key: "dilation_rates" value { string_value: "1,2" } }
parameters { key: "max_batch_tokens" value { string_value: "12288" } }
"""


class Server:
    """One dilattn-server process on free ports, its log in a file."""

    def __init__(self, binary, device, log_path, args):
        self.device = device
        self.log_path = pathlib.Path(log_path)
        self.log = open(self.log_path, "w")
        cmd = [binary, "--grpc-port", "0", "--metrics-port", "0", "--bind-address", "127.0.0.1",
               "--device", device, *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        try:
            line = self.proc.stdout.readline()
        except BaseException:  # a signal while it starts
            self.kill()
            raise
        m = re.search(r"grpc_port=(\d+) metrics_port=(\d+)", line)
        if not m:
            self.kill()
            raise RuntimeError(f"server did not start: {line!r}; log in {self.log_path}")
        self.url = f"127.0.0.1:{m.group(1)}"
        self.metrics_port = int(m.group(2))
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        """For runs that end in an exception: no server outlives the script."""
        if self.alive():
            self.proc.kill()
            self.proc.wait()
        if not self.log.closed:
            self.log.close()

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as r:
            return r.read().decode()

    def sum_of(self, prefix, needle="", text=None):
        """The sum of the series starting with `prefix` and holding `needle` in `text` (a scrape
        of /metrics; a fresh one by default)."""
        text = self.metrics() if text is None else text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(prefix) and needle in line)

    def pools(self):
        """(MiB leased, MiB cached unused, leases) over every buffer pool."""
        text = self.metrics()
        return (self.sum_of("dilattn_buffer_pool_bytes{", 'state="in_use"', text) / 2**20,
                self.sum_of("dilattn_buffer_pool_bytes{", 'state="held"', text) / 2**20,
                self.sum_of("dilattn_buffer_pool_leases{", "", text))

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def gpu_mib(self):
        """The server's device memory as nvidia-smi lists it; NaN where it is not listed (in a
        container with its own process IDs nvidia-smi shows the host's)."""
        if not self.device.startswith("cuda"):
            return float("nan")
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                  "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return float("nan")
        used = [float(f.split(",")[1]) for f in out.splitlines()
                if f.split(",")[0].strip() == str(self.proc.pid)]
        return sum(used) if used else float("nan")

    def sample(self, t, label):
        in_use, held, leases = self.pools()
        return {"t": t, "label": label, "rss": self.rss_mib(), "gpu": self.gpu_mib(),
                "in_use": in_use, "held": held, "leases": leases}

    def stop(self):
        """SIGTERM; a failure message, or None for a clean exit."""
        if not self.alive():
            self.log.close()
            return f"the server died during the run (status {self.proc.returncode})"
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = "none: killed after 120 s"
        self.log.close()
        return None if rc == 0 else f"SIGTERM ended the server with status {rc}"

    def error_lines(self):
        return [line for line in self.log_path.read_text().splitlines()
                if re.match(r"\S+ E ", line)]


class Soak:
    def __init__(self, args):
        self.args = args
        self.gpu = args.device.startswith("cuda")
        self.tolerance = TOLERANCE_GPU if self.gpu else TOLERANCE_CPU
        self.lock = threading.Lock()
        self.counts = collections.defaultdict(collections.Counter)
        self.wrong = []
        self.paused = threading.Event()
        self.stop = threading.Event()
        self.busy = 0
        self.busy_cv = threading.Condition()
        self.calls = collections.Counter()  # calls finished per action
        self.cudart = cuda_ipc.load_cudart() if self.gpu else None
        if self.gpu and self.cudart is None:
            raise RuntimeError("--device cuda: no libcudart here to make the CUDA shared-memory "
                               "calls with")
        self._tls = threading.local()  # a gRPC channel per worker thread
        self.t0 = time.monotonic()
        common = ["--pool-idle-release-seconds", str(args.release_seconds),
                  *shlex.split(args.server_args)]
        log = pathlib.Path(args.log)
        self.servers = {}
        self.repository = tempfile.TemporaryDirectory(prefix="soak-models-")
        try:
            # The built-in models; sequences from 16K tokens run in pieces or over parts of
            # their rows.
            self.servers["built-in"] = Server(args.server, args.device, log, [
                "--pipeline-min-tokens", "16384", *common])
            # A model of priorities, queue delays, a queue bound and timeouts, beside them.
            model = pathlib.Path(self.repository.name) / "scheduled"
            model.mkdir()
            (model / "config.pbtxt").write_text(SCHEDULING_MODEL)
            self.servers["scheduling"] = Server(
                args.server, args.device, log.with_name(log.stem + "-scheduling" + log.suffix),
                ["--model-repository", self.repository.name, *common])
        except BaseException:
            self.kill_servers()
            raise
        self.url = self.servers["built-in"].url

    def kill_servers(self):
        for server in self.servers.values():
            server.kill()
        self.repository.cleanup()

    # --- bookkeeping ----------------------------------------------------------------------------
    def record(self, action, outcome):
        with self.lock:
            self.counts[action][outcome] += 1

    def record_wrong(self, action, message):
        with self.lock:
            self.counts[action]["WRONG"] += 1
            if len(self.wrong) < 30:
                self.wrong.append(f"{action}: {message}")

    @staticmethod
    def check_shape(out, shape, what):
        """For outputs checked in parts: the whole is of the request's shape."""
        if out.shape != shape:
            raise Wrong(f"{what}: O is {out.shape}, expected {shape}")

    def check(self, out, expected, datatype, what):
        """`out` as it came (its wire dtype) against the float64 reference."""
        if out.dtype != NUMPY_DTYPE[datatype] or out.shape != expected.shape:
            raise Wrong(f"{what}: O is {out.dtype} {out.shape}, expected "
                        f"{np.dtype(NUMPY_DTYPE[datatype])} {expected.shape}")
        err = reference.relative_error(out.astype(np.float32), expected)
        if not err <= self.tolerance[datatype]:
            raise Wrong(f"{what}: relative error {err:.3g} over {self.tolerance[datatype]}")

    # --- inputs ---------------------------------------------------------------------------------
    def random_dilated(self, rng, max_n, on_gpu_kernels=False):
        """(model, params, segments, rates, mode, causal, shape, datatype) of a valid request;
        on a GPU server, D = 24 runs on the CPU path unless `on_gpu_kernels`."""
        model = rng.choice(["dilated_attention", "dilated_attention_head_groups"])
        options = rng.choice(DILATED_OPTIONS)
        if options is None:
            segments, rates = (([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16])
                               if model == "dilated_attention" else ([2048, 4096, 8192], [1, 2, 4]))
        else:
            segments, rates = options
        mode = "longnet" if model == "dilated_attention" else "head_groups"
        causal = rng.random() < 0.3
        heads = rng.choice([2, 4]) if mode == "longnet" else max(len(segments), rng.choice([3, 4]))
        dim = rng.choice(([32, 64, 64, 128] if on_gpu_kernels else [32, 64, 64, 128, 24])
                         if self.gpu else [16, 24, 32, 64])
        lengths = [n for n in (200, 1000, 2048, 3000, 4096, 8192) if n <= max_n]
        n = rng.choice(lengths)
        batch = rng.choice([1, 1, 2])
        params = {"causal": causal}
        if options is not None:
            params["segment_lengths"] = ",".join(map(str, segments))
            params["dilation_rates"] = ",".join(map(str, rates))
        datatype = rng.choice(["FP32", "FP16", "BF16"])
        return model, params, segments, rates, mode, causal, (batch, n, heads, dim), datatype

    @staticmethod
    def tensors(rng, shape, datatype):
        seed = rng.getrandbits(32)
        gen = np.random.default_rng(seed)
        return [to_wire(gen.uniform(-1, 1, shape).astype(np.float32), datatype) for _ in range(3)]

    # --- actions ----------------------------------------------------------------------------------
    def act_infer(self, rng, client):
        model, params, seg, rates, mode, causal, shape, dt = self.random_dilated(rng, 8192)
        if rng.random() < 0.25:
            shape = (shape[0], rng.choice([256, 1000]), shape[2], 16 if self.gpu else 8)
            q, k, v = self.tensors(rng, shape, dt)
            kept = lambda i, j, nb: abs(i - j) <= 1  # noqa: E731  (the model's local_window 1)
            out = client.infer("block_sparse_attention", make_inputs(q, k, v, dt),
                               parameters={"causal": causal},
                               client_timeout=CALL_TIMEOUT).as_numpy("O")
            self.check(out, reference.block_sparse_attention(q, k, v, 64, kept, causal), dt,
                       f"block-sparse {shape} {dt} causal={causal}")
            return "ok"
        q, k, v = self.tensors(rng, shape, dt)
        out = client.infer(model, make_inputs(q, k, v, dt), parameters=params,
                           client_timeout=CALL_TIMEOUT).as_numpy("O")
        self.check(out, reference.dilated_attention(q, k, v, seg, rates, mode, causal), dt,
                   f"{model} {shape} {dt} {params}")
        return "ok"

    def act_cancel(self, rng, client):
        segments, rates = [512, 1024], [1, 2]
        n = rng.choice([16384, 32768] if self.gpu else [8192, 16384])
        shape, dt = (1, n, 4, 64), rng.choice(["FP16", "BF16"])
        q, k, v = self.tensors(rng, shape, dt)
        params = {"segment_lengths": "512,1024", "dilation_rates": "1,2"}
        try:
            out = client.infer("dilated_attention", make_inputs(q, k, v, dt), parameters=params,
                               client_timeout=rng.choice([0.001, 0.005, 0.02])).as_numpy("O")
        except InferenceServerException as e:
            if "DEADLINE_EXCEEDED" in str(e.status()) or "Deadline" in str(e):
                return "deadline"
            raise
        self.check_shape(out, shape, "cancel")
        rows = stretch(segments)
        self.check(out[:, :rows],
                   reference.dilated_attention(q[:, :rows], k[:, :rows], v[:, :rows], segments,
                                               rates), dt, "cancel: first stretch")
        return "ok"

    def act_long(self, rng, client):
        dt = rng.choice(["FP32", "FP16", "BF16"])
        if rng.random() < 0.4:
            # A branch as long as the sequence: no cut leaves independent pieces.
            n = rng.choice([16384, 20000] if self.gpu else [4096])
            segments, rates, shape = [1024, n], [1, 8], (1, n, 2, 32)
            q, k, v = self.tensors(rng, shape, dt)
            params = {"segment_lengths": f"1024,{n}", "dilation_rates": "1,8"}
            out = client.infer("dilated_attention", make_inputs(q, k, v, dt), parameters=params,
                               client_timeout=LONG_CALL_TIMEOUT).as_numpy("O")
            self.check(out, reference.dilated_attention(q, k, v, segments, rates), dt,
                       f"long, global branch {shape} {dt}")
            return "ok"
        segments, rates = [512, 2048], [1, 4]
        n = rng.choice([65536, 131072, 200000] if self.gpu else [16384, 20000])
        shape = (rng.choice([1, 2]), n, 4, 64)
        q, k, v = self.tensors(rng, shape, dt)
        causal = rng.random() < 0.5
        params = {"segment_lengths": "512,2048", "dilation_rates": "1,4", "causal": causal}
        out = client.infer("dilated_attention", make_inputs(q, k, v, dt), parameters=params,
                           client_timeout=LONG_CALL_TIMEOUT).as_numpy("O")
        self.check_shape(out, shape, "long")
        rows = stretch(segments)
        whole = (n // rows) * rows
        # The first and the last whole stretch, one at random, and the short one after them.
        starts = {0, whole - rows, rng.randrange(n // rows) * rows}
        if whole < n:
            starts.add(whole)
        for b in range(shape[0]):
            for start in sorted(starts):
                end = min(start + rows, n)
                sl = slice(start, end)
                self.check(out[b:b + 1, sl],
                           reference.dilated_attention(q[b:b + 1, sl], k[b:b + 1, sl],
                                                       v[b:b + 1, sl], segments, rates,
                                                       causal=causal), dt,
                           f"long {shape} {dt} causal={causal}: rows {start}..{end}")
        if not np.all(np.isfinite(out.astype(np.float32))):
            raise Wrong(f"long {shape} {dt}: non-finite output")
        return "ok"

    def act_bad(self, rng, client):
        stub = self.stub()
        q = np.zeros((1, 64, 2, 16), np.float32)
        kind = rng.randrange(8)
        req = service_pb2.ModelInferRequest(model_name="dilated_attention")
        shapes = [q.shape] * 3
        datatypes = ["FP32"] * 3
        payloads = [q.tobytes()] * 3
        expect = grpc.StatusCode.INVALID_ARGUMENT
        if kind == 0:
            shapes[1] = (1, 64, 2, 8)
        elif kind == 1:
            datatypes = ["INT32"] * 3
        elif kind == 2:
            payloads[2] = payloads[2][:-4]
        elif kind == 3:
            req.parameters["segment_lengths"].string_param = "0"
        elif kind == 4:
            req.parameters["dilation_rates"].string_param = "1,2,3"
        elif kind == 5:
            req.model_name = "no_such_model"
            expect = grpc.StatusCode.NOT_FOUND
        elif kind == 6:
            shapes = [(1, 0, 2, 16)] * 3
            payloads = [b""] * 3
        else:
            req.model_name = "dilated_attention_head_groups"
            shapes = [(1, 64, 1, 16)] * 3  # fewer heads than branches
            payloads = [np.zeros(shapes[0], np.float32).tobytes()] * 3
        for name, shape, dt, data in zip("QKV", shapes, datatypes, payloads):
            t = req.inputs.add(name=name, datatype=dt)
            t.shape.extend(shape)
            req.raw_input_contents.append(data)
        try:
            stub.ModelInfer(req, timeout=30)
        except grpc.RpcError as e:
            if e.code() != expect or not e.details():
                raise Wrong(f"bad request {kind}: {e.code()} {e.details()!r}, expected {expect}")
            return "refused"
        raise Wrong(f"bad request {kind} was answered")

    def stub(self):
        channel = getattr(self._tls, "channel", None)
        if channel is None:
            channel = grpc.insecure_channel(self.url, options=[
                ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
            self._tls.channel = channel
        return service_pb2_grpc.GRPCInferenceServiceStub(channel)

    def act_shm(self, rng, client):
        model, params, seg, rates, mode, causal, shape, dt = self.random_dilated(rng, 4096)
        q, k, v = self.tensors(rng, shape, dt)
        wire = [x.astype(NUMPY_DTYPE[dt]) for x in (q, k, v)]
        nbytes = wire[0].nbytes
        name = f"soak_{os.getpid()}_{threading.get_ident()}_{rng.getrandbits(32)}"
        handle = shm.create_shared_memory_region(name, "/" + name, 4 * nbytes)
        try:
            shm.set_shared_memory_region(handle, wire)
            shm.set_shared_memory_region(handle, [np.full(wire[0].shape, np.nan, wire[0].dtype)],
                                         offset=3 * nbytes)
            client.register_system_shared_memory(name, "/" + name, 4 * nbytes)
            try:
                inputs, outputs = shared_memory_tensors(name, shape, dt, nbytes)
                client.infer(model, inputs, outputs=outputs, parameters=params,
                             client_timeout=CALL_TIMEOUT)
                # A copy: the array is a view of the mapping destroyed below.
                out = shm.get_contents_as_numpy(handle, NUMPY_DTYPE[dt], shape,
                                                offset=3 * nbytes).copy()
            finally:
                client.unregister_system_shared_memory(name)
        finally:
            shm.destroy_shared_memory_region(handle)
        self.check(out,
                   reference.dilated_attention(q, k, v, seg, rates, mode, causal), dt,
                   f"shm {model} {shape} {dt}")
        return "ok"

    def act_cuda_shm(self, rng, client):
        # CUDA shared memory is for requests the GPU computes (README): not D = 24.
        model, params, seg, rates, mode, causal, shape, dt = self.random_dilated(
            rng, 8192, on_gpu_kernels=True)
        q, k, v = self.tensors(rng, shape, dt)
        wire = [x.astype(NUMPY_DTYPE[dt]) for x in (q, k, v)]
        nbytes = wire[0].nbytes
        buf = cuda_ipc.DeviceBuffer(self.cudart, 4 * nbytes)
        name = f"soak_cuda_{threading.get_ident()}_{rng.getrandbits(32)}"
        try:
            for i, x in enumerate(wire):
                buf.write(x, offset=i * nbytes)
            buf.write(np.full(wire[0].shape, np.nan, wire[0].dtype), offset=3 * nbytes)
            client.register_cuda_shared_memory(name, buf.raw_handle(), 0, 4 * nbytes)
            try:
                inputs, outputs = shared_memory_tensors(name, shape, dt, nbytes)
                client.infer(model, inputs, outputs=outputs, parameters=params,
                             client_timeout=CALL_TIMEOUT)
                out = buf.read(NUMPY_DTYPE[dt], shape, offset=3 * nbytes)
            finally:
                client.unregister_cuda_shared_memory(name)
        finally:
            buf.free()
        self.check(out,
                   reference.dilated_attention(q, k, v, seg, rates, mode, causal), dt,
                   f"cuda shm {model} {shape} {dt}")
        return "ok"

    def stream_inputs(self, rng):
        segments, rates = [256, 1024], [1, 2]
        n = rng.choice([4096, 5000, 8192])
        dt = rng.choice(["FP32", "FP16", "BF16"])
        shape = (1, n, 2, rng.choice([32, 64]))
        q, k, v = self.tensors(rng, shape, dt)
        return segments, rates, shape, dt, q, k, v

    def act_stream(self, rng, client):
        import dilattn_stream
        segments, rates, shape, dt, q, k, v = self.stream_inputs(rng)
        wire = [x.astype(NUMPY_DTYPE[dt]) for x in (q, k, v)]
        token_bytes = shape[2] * shape[3] * wire[0].itemsize
        self.stub()
        out = dilattn_stream.attend(
            self._tls.channel, *wire, parameters={"segment_lengths": "256,1024",
                                                  "dilation_rates": "1,2"},
            chunk_bytes=token_bytes * rng.choice([100, 777, 4096]), timeout=CALL_TIMEOUT)
        self.check(out, reference.dilated_attention(q, k, v, segments, rates),
                   dt, f"stream {shape} {dt}")
        return "ok"

    def act_abandon(self, rng, client):
        import dilattn_stream
        _, _, shape, dt, q, k, v = self.stream_inputs(rng)
        wire = [x.astype(NUMPY_DTYPE[dt]) for x in (q, k, v)]
        self.stub()
        first = dilattn_stream.header("dilated_attention", shape, dt,
                                      {"segment_lengths": "256,1024", "dilation_rates": "1,2"})
        half = rng.randrange(1, shape[1])
        dropped = threading.Event()

        def messages():
            yield first
            yield from dilattn_stream.chunks(*wire, 500, 0, half)
            dropped.wait(60)  # the stream stays open, its input incomplete, until dropped

        call = dilattn_stream.open_stream(self._tls.channel)(messages(), timeout=60)
        try:
            accepted = next(call)
            if not accepted.HasField("accepted"):
                raise Wrong("abandoned stream: its first reply is not Accepted")
            time.sleep(rng.random() * 0.05)
        except grpc.RpcError as e:
            raise Wrong(f"abandoned stream failed before it was dropped: {e.code()}")
        finally:
            call.cancel()
            dropped.set()
        return "dropped"

    def act_bidi(self, rng, client):
        results = queue.Queue()
        c = grpcclient.InferenceServerClient(self.url)
        sent = {}
        finished = False
        try:
            c.start_stream(callback=lambda result, error: results.put((result, error)))
            for i in range(rng.randint(2, 4)):
                model, params, seg, rates, mode, causal, shape, dt = self.random_dilated(rng, 2048)
                q, k, v = self.tensors(rng, shape, dt)
                sent[f"r{i}"] = (q, k, v, seg, rates, mode, causal, dt)
                c.async_stream_infer(model, make_inputs(q, k, v, dt), request_id=f"r{i}",
                                     parameters=params)
            bad = make_inputs(*(np.zeros((1, 64, 2, 16), np.float32),) * 3)
            c.async_stream_infer("dilated_attention", bad, request_id="bad",
                                 parameters={"dilation_rates": "3,3,3"})
            got = 0
            errors = 0
            for _ in range(len(sent) + 1):
                result, error = results.get(timeout=120)
                if error is not None:
                    # ModelStreamInfer carries errors as text (Triton's protocol).
                    if "dilation_rates" not in str(error):
                        raise Wrong(f"bidi: unexpected error {error}")
                    errors += 1
                    continue
                rid = result.get_response().id
                q, k, v, seg, rates, mode, causal, dt = sent[rid]
                self.check(result.as_numpy("O"),
                           reference.dilated_attention(q, k, v, seg, rates, mode, causal), dt,
                           f"bidi {rid}")
                got += 1
            if got != len(sent) or errors != 1:
                raise Wrong(f"bidi: {got} answers and {errors} errors for {len(sent)} + 1")
            finished = True
        finally:
            # On a failure, requests may still be pending: cancel them rather than wait.
            c.stop_stream(cancel_requests=not finished)
            c.close()
        return "ok"

    def act_scheduled(self, rng, client):
        """A burst to the scheduling server's model: random priorities, queue timeouts and client
        deadlines. Each request is answered correctly, turned away by the full queue, or expired;
        every one is answered."""
        c = getattr(self._tls, "scheduled", None)
        if c is None:
            c = self._tls.scheduled = grpcclient.InferenceServerClient(
                self.servers["scheduling"].url)
        done = queue.Queue()
        sent = []
        for i in range(rng.randint(1, 8)):
            shape = (1, rng.choice([256, 700, 2048, 4096]), 2, 16)
            dt = rng.choice(["FP32", "FP16", "BF16"])
            q, k, v = self.tensors(rng, shape, dt)
            client_deadline = rng.choice([None, None, None, 0.002, 0.05])
            sent.append((q, k, v, dt, client_deadline))
            c.async_infer("scheduled", make_inputs(q, k, v, dt),
                          callback=lambda result, error, i=i: done.put((i, result, error)),
                          priority=rng.choice([0, 1, 2, 3]),
                          timeout=rng.choice([None, None, 100, 20000, 2000000]),
                          client_timeout=client_deadline)
        outcomes = collections.Counter()
        for _ in sent:
            try:
                i, result, error = done.get(timeout=120)
            except queue.Empty:
                raise Wrong(f"{len(sent) - sum(outcomes.values())} of {len(sent)} requests "
                            "were never answered")
            q, k, v, dt, client_deadline = sent[i]
            if error is None:
                self.check(result.as_numpy("O"),
                           reference.dilated_attention(q, k, v, [256, 512], [1, 2]), dt,
                           f"scheduled {q.shape} {dt}")
                outcomes["ok"] += 1
            elif "Exceeds maximum queue size" in str(error):
                outcomes["queue full"] += 1
            elif "DEADLINE_EXCEEDED" in str(error.status()):
                outcomes["client deadline" if client_deadline else "queue timeout"] += 1
            else:
                raise Wrong(f"scheduled: {error.status()} {error}")
        with self.lock:
            self.counts["scheduled"].update(outcomes)
        return None

    # --- running ----------------------------------------------------------------------------------
    def actions(self):
        return [a for a in WEIGHTS if a != "cuda_shm" or self.gpu]

    def worker(self, index):
        rng = random.Random(self.args.seed * 1000 + index)
        client = grpcclient.InferenceServerClient(self.url)
        actions = self.actions()
        weights = [WEIGHTS[a] for a in actions]
        while not self.stop.is_set():
            if self.paused.is_set():
                time.sleep(0.05)
                continue
            with self.busy_cv:
                if self.paused.is_set():
                    continue
                self.busy += 1
            action = rng.choices(actions, weights)[0]
            try:
                outcome = getattr(self, "act_" + action)(rng, client)
                if outcome is not None:  # else it counted its requests itself
                    self.record(action, outcome)
            except Wrong as e:
                self.record_wrong(action, str(e))
            except (InferenceServerException, grpc.RpcError) as e:
                self.record_wrong(action, f"{type(e).__name__}: {e}")
            except Exception as e:  # a fault of the soak itself is still a failed run
                self.record_wrong(action, f"{type(e).__name__}: {e}\n"
                                  + "".join(traceback.format_exc(limit=-4)))
            finally:
                with self.busy_cv:
                    self.busy -= 1
                    self.calls[action] += 1
                    self.busy_cv.notify_all()
        client.close()
        for name in ("scheduled", "channel"):
            if getattr(self._tls, name, None) is not None:
                getattr(self._tls, name).close()

    def quiesce(self, label, resume=True):
        """Pauses traffic until every call in progress has ended and the pools' idle release has
        run, then samples each server: (sample, failures). Traffic resumes if `resume`."""
        self.paused.set()
        failures = []
        with self.busy_cv:
            if not self.busy_cv.wait_for(lambda: self.busy == 0, timeout=LONG_CALL_TIMEOUT + 60):
                failures.append(f"{label}: {self.busy} calls still running past their deadlines")
        # A buffer goes back a whole release interval after its last use, at a look every half
        # interval, and the heap is trimmed at that look: one and a half intervals at least, more
        # while the pools still hold anything (a scheduling server may still finish requests
        # whose clients gave up).
        r = self.args.release_seconds
        now = time.monotonic()
        settled, give_up = now + 1.5 * r + 1, now + 4 * r + 30
        while time.monotonic() < give_up:
            time.sleep(0.25)
            if time.monotonic() >= settled and all(
                    not any(server.pools()) for server in self.servers.values()):
                break
        # With several devices, a release during another thread's trim leaves its own trim to
        # its next look, half an interval later.
        time.sleep(0.5 * r + 0.5)
        sample = self.sample(label)
        if resume:
            self.paused.clear()
        return sample, failures

    def sample(self, label):
        t = time.monotonic() - self.t0
        return {name: server.sample(t, label) for name, server in self.servers.items()}

    @staticmethod
    def idle_failures(name, sample):
        """An idle server past its idle release leases nothing and caches nothing."""
        if sample["in_use"] != 0 or sample["leases"] != 0 or sample["held"] != 0:
            return [f"{name} server, {sample['label']}: {sample['in_use']:.1f} MiB in "
                    f"{sample['leases']:.0f} leases still leased and {sample['held']:.1f} MiB "
                    "held after the idle release"]
        return []

    def growth_failures(self, name, baseline, final):
        failures = []
        grew = final["rss"] - baseline["rss"]
        if grew > self.args.rss_slack_mib:
            failures.append(f"{name} server: resident memory grew {grew:.0f} MiB between the idle "
                            f"points (slack {self.args.rss_slack_mib})")
        if self.gpu and self.args.gpu_slack_mib >= 0:
            grew = final["gpu"] - baseline["gpu"]
            if math.isnan(grew):
                failures.append(f"{name} server: nvidia-smi does not list its process, so its GPU "
                                "memory is unknown (--gpu-slack-mib -1 skips the check)")
            elif grew > self.args.gpu_slack_mib:
                failures.append(f"{name} server: GPU memory grew {grew:.0f} MiB between the idle "
                                f"points (slack {self.args.gpu_slack_mib})")
        return failures

    def counter_failures(self):
        """The scheduling server computed every request answered as computed, and at most those
        and the ones whose client gave up (it may have finished them)."""
        server = self.servers["scheduling"]
        success = server.sum_of("nv_inference_request_success{")
        c = self.counts["scheduled"]
        if not c["ok"] <= success <= c["ok"] + c["client deadline"]:
            return [f"scheduling server: {success:.0f} successes counted for {c['ok']} answers "
                    f"and {c['client deadline']} client deadlines"]
        return []

    def all_alive(self):
        return all(server.alive() for server in self.servers.values())

    def run(self):
        """Warm-up (a fifth of --minutes), an idle point, the main phase (the rest), an idle
        point: (samples, failures). The idle points' waits are on top of --minutes."""
        samples = [self.sample("start")]
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True)
                   for i in range(self.args.workers)]
        for t in threads:
            t.start()
        total = self.args.minutes * 60
        idle_points, calls_at_idle, failures = [], [], []
        phase_end = time.monotonic() + total / 5
        for label in ("after warm-up", "end"):
            while self.all_alive() and time.monotonic() < phase_end:
                time.sleep(min(self.args.sample_seconds, max(0.0, phase_end - time.monotonic())))
                if self.all_alive() and time.monotonic() < phase_end:
                    samples.append(self.sample("load"))
            if not self.all_alive():
                break
            # Traffic stays paused after the last point: the counters are read idle.
            point, waited = self.quiesce(label, resume=label != "end")
            failures += waited
            idle_points.append(point)
            samples.append(point)
            with self.busy_cv:
                calls_at_idle.append(sum(self.calls.values()))
            phase_end = time.monotonic() + total * 4 / 5
        if len(idle_points) == 2:
            failures += self.counter_failures()
            if calls_at_idle[1] == calls_at_idle[0]:
                failures.append("no call ran between the idle points: memory growth untested")
        self.stop.set()
        for t in threads:
            t.join(timeout=LONG_CALL_TIMEOUT + 60)
        stuck = sum(t.is_alive() for t in threads)
        if stuck:
            failures.append(f"{stuck} worker threads still running at the end")
        failures += self.coverage_failures()
        for point in idle_points:
            for name, sample in point.items():
                failures += self.idle_failures(name, sample)
        if len(idle_points) == 2:
            for name in self.servers:
                failures += self.growth_failures(name, idle_points[0][name], idle_points[1][name])
        for name, server in self.servers.items():
            stopped = server.stop()
            if stopped:
                failures.append(f"{name} server: {stopped}")
            errors = server.error_lines()
            if errors:
                failures.append(f"{name} server: {len(errors)} error lines in its log, first: "
                                f"{errors[0]}")
        return samples, failures

    def coverage_failures(self):
        """An action that should have run ten times or more and never ran (a chance of e^-10)
        means the mix is broken, not unlucky."""
        actions = self.actions()
        weight = sum(WEIGHTS[a] for a in actions)
        total = sum(self.calls.values())
        return [f"{a}: never ran in {total} calls" for a in actions
                if self.calls[a] == 0 and total * WEIGHTS[a] / weight >= 10]

    def report(self, samples, failures):
        outcomes = sorted({o for c in self.counts.values() for o in c})
        print(f"\nsoak: {self.args.minutes} min, {self.args.workers} workers, device "
              f"{self.args.device}, seed {self.args.seed}\n")
        print("| action | calls | " + " | ".join(outcomes) + " |")
        print("|---|---|" + "---|" * len(outcomes))
        for action in WEIGHTS:
            c = self.counts.get(action)
            if not c:
                continue
            print(f"| {action} | {sum(c.values())} | " +
                  " | ".join(str(c.get(o, 0)) for o in outcomes) + " |")
        total = sum(sum(c.values()) for c in self.counts.values())
        print(f"\n{total} calls (scheduled: requests)\n")
        print("| s | when | server | RSS MiB | GPU MiB (nvidia-smi) | pools in use MiB | "
              "pools held MiB |")
        print("|---|---|---|---|---|---|---|")
        for point in samples:
            for name, s in point.items():
                print(f"| {s['t']:.0f} | {s['label']} | {name} | {s['rss']:.0f} | {s['gpu']:.0f} | "
                      f"{s['in_use']:.1f} | {s['held']:.1f} |")
        for w in self.wrong:
            print("WRONG", w)
        for f in failures:
            print("FAILED", f)
        ok = not self.wrong and not failures
        print("\nsoak: " + ("passed" if ok else "FAILED"))
        return ok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", default=str(ROOT / "build" / "server" / "dilattn-server"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--server-args", default="")
    p.add_argument("--release-seconds", type=int, default=3,
                   help="the server's --pool-idle-release-seconds")
    p.add_argument("--sample-seconds", type=float, default=15)
    p.add_argument("--rss-slack-mib", type=float, default=48)
    p.add_argument("--gpu-slack-mib", type=float, default=64,
                   help="negative: no GPU memory check (where nvidia-smi cannot see the server)")
    p.add_argument("--log", default="soak-server.log")
    args = p.parse_args()
    # SIGTERM (a test runner's timeout) ends the run through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        soak = Soak(args)
    except RuntimeError as e:
        sys.exit(f"soak: {e}")
    try:
        samples, failures = soak.run()
        ok = soak.report(samples, failures)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not skip a server
        soak.kill_servers()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
