"""The gRPC port's keepalive pings and the ping policy it enforces (--grpc-keepalive-*,
--grpc-http2-*), with the clients users run."""

import pathlib
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import tritonclient.grpc as grpcclient

from conftest import ServerProcess, wait_until
from helpers import infer_and_check

class ConnectionWatch:
    """Counts the connections a client's channel makes: the times it turns READY. (The kernel's
    socket table would be the neutral witness, but sandboxes such as gVisor do not list
    loopback connections in it.) A connection that ends (a GOAWAY, a close) turns the channel
    IDLE or CONNECTING, and the next connection READY again."""

    def __init__(self, client):
        self._channel = client._channel  # tritonclient's grpc.Channel
        self._lock = threading.Lock()
        self.states = []
        self._channel.subscribe(self._on_change, try_to_connect=False)

    def _on_change(self, state):
        with self._lock:
            self.states.append(state)

    def connections(self):
        with self._lock:
            return sum(1 for s in self.states if s == grpc.ChannelConnectivity.READY)

    def state(self):
        with self._lock:
            return self.states[-1] if self.states else None

    def stop(self):
        self._channel.unsubscribe(self._on_change)
        return self.connections()


def _pinging_client(server):
    """A client whose keepalive pings every 200 ms, calls open or not (as some deployments
    configure clients, to keep idle connections through NATs)."""
    return grpcclient.InferenceServerClient(
        server.url, keepalive_options=grpcclient.KeepAliveOptions(
            keepalive_time_ms=200, keepalive_timeout_ms=5000,
            keepalive_permit_without_calls=True, http2_max_pings_without_data=0))


@pytest.mark.parametrize("permissive", [False, True])
def test_keepalive_ping_policy(permissive):
    args = (["--grpc-keepalive-permit-without-calls", "1",
             "--grpc-http2-min-recv-ping-interval-without-data", "10"] if permissive else [])
    server = ServerProcess(*args, name=f"keepalive-{'permissive' if permissive else 'default'}")
    try:
        client = _pinging_client(server)
        watch = ConnectionWatch(client)
        assert client.is_server_live()
        # gRPC reports state changes from a thread of its own, maybe after the call returned.
        assert wait_until(lambda: watch.connections() == 1), watch.states
        if permissive:
            # The pings are within the policy (10 ms, not 200: a server busy elsewhere may read
            # two pings at once): the idle connection stays.
            time.sleep(2.0)
            assert watch.state() == grpc.ChannelConnectivity.READY, watch.states
        else:
            # gRPC's default policy (one ping in 5 minutes without data, 2 strikes) closes the
            # connection (GOAWAY "too_many_pings") within a few pings.
            assert wait_until(lambda: watch.state() != grpc.ChannelConnectivity.READY,
                              timeout=10), watch.states
        infer_and_check(client, 3)
        connections = 1 if permissive else 2
        assert wait_until(lambda: watch.connections() == connections), watch.states
        assert watch.stop() == connections, watch.states
    finally:
        assert server.stop() == 0, server.log_path.read_text()


@pytest.mark.parametrize("flag,value,needle", [
    ("--grpc-keepalive-time", "0", "--grpc-keepalive-time must be in [1, 2147483647]"),
    ("--grpc-http2-min-recv-ping-interval-without-data", "2147483648",
     "--grpc-http2-min-recv-ping-interval-without-data must be in [0, 2147483647]"),
    ("--grpc-max-connection-age", "300000", "unknown flag --grpc-max-connection-age"),
    ("--grpc-http2-max-ping-strikes", "x", "flag --grpc-http2-max-ping-strikes='x' is not an"),
    ("--grpc-keepalive-permit-without-calls", "yes", "is not 0, 1, true or false"),
])
def test_connection_flags_out_of_range_are_refused(flag, value, needle):
    with pytest.raises(RuntimeError) as e:
        ServerProcess(flag, value, name="connection-flag-refused")
    assert needle in str(e.value), str(e.value)


# A client that opens a native stream, sends its header and half of its input, says so, and
# then waits: the test stops it (SIGSTOP), as a client whose host froze or vanished from the
# network, whose connection no FIN or RST will ever close.
_STALLED_CLIENT = r"""
import sys, time
import grpc
import numpy as np
sys.path.insert(0, sys.argv[2])
import attend
shape = (1, 4096, 2, 16)
q = np.random.default_rng(5).uniform(-1, 1, shape).astype(np.float32)
outbox = attend.Outbox([attend.header("dilated_attention", shape, "FP32",
                                      {"segment_lengths": "256", "dilation_rates": "1"})] +
                       attend.chunks(q, q, q, "FP32", 512, last=2048))
channel = grpc.insecure_channel(sys.argv[1])
call = attend.stream(channel)(iter(outbox))
print("open", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("keepalive", [False, True])
def test_server_keepalive_ends_the_calls_of_a_vanished_client(keepalive):
    args = ["--grpc-keepalive-time", "300", "--grpc-keepalive-timeout", "500"] if keepalive else []
    # No idle limit on native streams: only the keepalive pings can find the client gone.
    server = ServerProcess("--stream-idle-seconds", "0", *args,
                           name=f"server-keepalive-{'on' if keepalive else 'off'}")
    client = subprocess.Popen([sys.executable, "-c", _STALLED_CLIENT, server.url,
                               str(pathlib.Path(__file__).parent)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "open"
        assert wait_until(lambda: server.metric("dilattn_native_streams_open") == 1, timeout=30)
        client.send_signal(signal.SIGSTOP)
        if keepalive:
            # A ping every 300 ms, 500 ms for its answer: the connection and its stream end,
            # and the stream's memory goes back.
            assert wait_until(lambda: server.metric("dilattn_native_streams_open") == 0,
                              timeout=10)
            assert wait_until(lambda: server.metric("dilattn_buffer_pool_leases") == 0,
                              timeout=10)
        else:
            # gRPC's default (a ping after two hours of silence) holds it meanwhile.
            time.sleep(3)
            assert server.metric("dilattn_native_streams_open") == 1
    finally:
        client.kill()
        client.wait(timeout=30)
        assert server.stop() == 0, server.log_path.read_text()
