"""gRPC over TLS and mutual TLS (--grpc-server-cert, --grpc-server-key, --grpc-root-cert), with
the clients users run: tritonclient, perf_analyzer, the native stream's Python client and
dilattn-client. Certificates come from openssl, made fresh for each run."""

import json
import os
import pathlib
import shutil
import subprocess
import time

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import attend
import reference
from conftest import ServerProcess, wait_until
from helpers import infer_and_check, random_qkv
from pki import Pki
from test_perf_analyzer import perf_analyzer, write_input_data

CLIENT = os.environ.get("DILATTN_CLIENT_BIN", str(
    pathlib.Path(__file__).resolve().parents[2] / "build" / "client" / "dilattn-client"))
PARAMS = {"segment_lengths": "64,128", "dilation_rates": "1,2"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    return Pki(root, "main"), Pki(root, "other")


def _tls_server(name, cert, key, *args):
    return ServerProcess("--grpc-server-cert", str(cert), "--grpc-server-key", str(key), *args,
                         name=name)


def _client(server, ca, cert=None, key=None):
    return grpcclient.InferenceServerClient(
        server.url, ssl=True, root_certificates=str(ca),
        private_key=None if key is None else str(key),
        certificate_chain=None if cert is None else str(cert))


def _refused(client):
    """The handshake fails: tritonclient's call ends UNAVAILABLE."""
    with pytest.raises(InferenceServerException) as e:
        client.is_server_live(client_timeout=10)
    return str(e.value.status())


def test_tls_serves_every_client(pki, tmp_path):
    ca, _ = pki
    cert, key = ca.server()
    server = _tls_server("tls", cert, key)
    try:
        client = _client(server, ca.ca)
        assert client.is_server_live()
        infer_and_check(client, 1)
        # The native stream, through the Python client users get.
        q, k, v = random_qkv((1, 300, 2, 16), 2)
        creds = grpc.ssl_channel_credentials(root_certificates=ca.ca.read_bytes())
        with grpc.secure_channel(server.url, creds) as channel:
            o = attend.dilattn_stream.attend(channel, q, k, v, parameters=PARAMS, timeout=60)
        expected = reference.dilated_attention(q, k, v, [64, 128], [1, 2])
        assert reference.relative_error(o, expected) <= reference.TOLERANCE["FP32"]
        # dilattn-client, both ways of connecting.
        for command in ("health", "infer"):
            done = subprocess.run([CLIENT, command, "--url", server.url, "--tls-ca", str(ca.ca),
                                   "--shape", "1,256,2,16", "--param", "segment_lengths=64,128",
                                   "--param", "dilation_rates=1,2"],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stdout + done.stderr
        done = subprocess.run([CLIENT, "health", "--url", server.url], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode != 0, done.stdout
        # perf_analyzer, unmodified, with its own TLS flags.
        binary, env = perf_analyzer()
        data = write_input_data(tmp_path / "inputs", (1, 256, 2, 16))
        r = subprocess.run([binary, "-m", "dilated_attention", "-u", server.url, "-i", "grpc",
                            "--ssl-grpc-use-ssl", "true",
                            "--ssl-grpc-root-certifications-file", str(ca.ca),
                            "--input-data", str(data), "--shape", "Q:256,2,16",
                            "--shape", "K:256,2,16", "--shape", "V:256,2,16",
                            "--measurement-interval", "500", "--max-trials", "4",
                            "--stability-percentage", "100"],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Throughput" in r.stdout
        # A plaintext client, and one that does not trust the server's CA, get nowhere; the
        # server goes on serving.
        assert "UNAVAILABLE" in _refused(grpcclient.InferenceServerClient(server.url))
        assert "UNAVAILABLE" in _refused(_client(server, pki[1].ca))
        assert client.is_server_ready()
        # Probes that cannot speak TLS ask the metrics port.
        assert server.http_get("/v2/health/ready") == (200, "ready\n")
    finally:
        assert server.stop() == 0, server.log_path.read_text()
    assert "gRPC (TLS) on 127.0.0.1:" in server.log_path.read_text()


def test_mutual_tls_takes_only_clients_the_ca_signed(pki):
    ca, other = pki
    cert, key = ca.server()
    server = _tls_server("mtls", cert, key, "--grpc-root-cert", str(ca.ca))
    try:
        good_cert, good_key = ca.issue("client")
        infer_and_check(_client(server, ca.ca, good_cert, good_key), 3)
        assert "UNAVAILABLE" in _refused(_client(server, ca.ca))  # shows no certificate
        stranger_cert, stranger_key = other.issue("client")
        assert "UNAVAILABLE" in _refused(_client(server, ca.ca, stranger_cert, stranger_key))
        done = subprocess.run([CLIENT, "health", "--url", server.url, "--tls-ca", str(ca.ca),
                               "--tls-cert", str(good_cert), "--tls-key", str(good_key)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        done = subprocess.run([CLIENT, "health", "--url", server.url, "--tls-ca", str(ca.ca),
                               "--tls-cert", str(good_cert)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "go together" in done.stderr, done.stderr
        for ca_file, needle in (("/dev/zero", "CA file /dev/zero: larger than 1 MiB"),
                                ("/nonexistent.pem", "CA file /nonexistent.pem: cannot be read")):
            done = subprocess.run([CLIENT, "health", "--url", server.url, "--tls-ca", ca_file],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode != 0 and needle in done.stderr, done.stderr
    finally:
        assert server.stop() == 0, server.log_path.read_text()
    assert "gRPC (mutual TLS: clients show certificates) on" in server.log_path.read_text()


def test_a_rotated_certificate_serves_new_connections_without_a_restart(pki, tmp_path):
    # As a Kubernetes Secret volume updates: the new files appear at once, through a renamed
    # directory behind a symlink.
    ca, other = pki
    live = tmp_path / "tls"
    first = tmp_path / "first"
    first.mkdir()
    cert, key = ca.server()
    shutil.copy(cert, first / "tls.crt")
    shutil.copy(key, first / "tls.key")
    live.symlink_to(first)
    server = _tls_server("tls-rotation", live / "tls.crt", live / "tls.key")
    try:
        infer_and_check(_client(server, ca.ca), 4)
        cert, key = other.server()
        _rotate(tmp_path, live, "second", cert, key)
        began = time.monotonic()
        # Read again within the 10 s refresh; a new channel each time, as new connections.
        assert wait_until(lambda: _live(_client(server, other.ca)), timeout=30, interval=0.5)
        assert time.monotonic() - began < 25
        infer_and_check(_client(server, other.ca), 5)
        assert "UNAVAILABLE" in _refused(_client(server, ca.ca))
        # A rotation to a pair gRPC cannot load (the key of another certificate) fails new
        # handshakes, saying why, until good files are back.
        _rotate(tmp_path, live, "bad", cert, ca.server()[1])
        assert wait_until(lambda: "grpc: Invalid private key" in server.log_path.read_text(),
                          timeout=30, interval=0.5)
        assert "UNAVAILABLE" in _refused(_client(server, other.ca))
        _rotate(tmp_path, live, "good", *ca.server())
        assert wait_until(lambda: _live(_client(server, ca.ca)), timeout=30, interval=0.5)
    finally:
        assert server.stop() == 0, server.log_path.read_text()


def _rotate(tmp_path, live, name, cert, key):
    """Points the symlink `live` at a new directory holding `cert` and `key`, at once."""
    new = tmp_path / name
    new.mkdir()
    shutil.copy(cert, new / "tls.crt")
    shutil.copy(key, new / "tls.key")
    swap = tmp_path / "swap"
    swap.symlink_to(new)
    os.replace(swap, live)


def _live(client):
    try:
        return client.is_server_live(client_timeout=5)
    except InferenceServerException:
        return False


def _start_error(*args):
    with pytest.raises(RuntimeError) as e:
        ServerProcess(*args, name="tls-refused")
    return str(e.value)


def test_bad_tls_files_stop_the_server_at_start_naming_them(pki, tmp_path):
    ca, other = pki
    cert, key = ca.server()
    _, other_key = other.server()
    missing = tmp_path / "missing.pem"
    log = _start_error("--grpc-server-cert", str(missing), "--grpc-server-key", str(key))
    assert f"--grpc-server-cert {missing}: cannot be read (No such file or directory)" in log, log
    log = _start_error("--grpc-server-cert", str(key), "--grpc-server-key", str(key))
    assert "holds no PEM certificate" in log, log
    log = _start_error("--grpc-server-cert", str(cert), "--grpc-server-key", str(cert))
    assert "--grpc-server-key" in log and "holds no PEM private key" in log, log
    log = _start_error("--grpc-server-cert", str(cert), "--grpc-server-key", str(other_key))
    assert f"--grpc-server-key {other_key} is not the private key of --grpc-server-cert" in log, log
    log = _start_error("--grpc-server-cert", str(cert))
    assert "--grpc-server-cert and --grpc-server-key go together" in log, log
    log = _start_error("--grpc-root-cert", str(ca.ca))
    assert "--grpc-root-cert needs --grpc-server-cert and --grpc-server-key" in log, log
    log = _start_error("--grpc-server-cert", str(cert), "--grpc-server-key", str(key),
                       "--grpc-root-cert", str(key))
    assert "--grpc-root-cert" in log and "holds no PEM certificate" in log, log


def test_json_logs_carry_grpcs_own_records_too(pki):
    # A log collector parses every line: the server's records and gRPC's (here, the failed
    # handshake of a plaintext client) are JSON objects alike.
    ca, _ = pki
    cert, key = ca.server()
    server = _tls_server("tls-json-log", cert, key, "--log-format", "json")
    try:
        assert "UNAVAILABLE" in _refused(grpcclient.InferenceServerClient(server.url))
        assert wait_until(lambda: "Handshake failed" in server.log_path.read_text())
    finally:
        assert server.stop() == 0, server.log_path.read_text()
    records = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    assert all(set(r) == {"time", "severity", "message"} for r in records), records
    messages = [r["message"] for r in records]
    assert any(m.startswith("dilattn-server: backend ") for m in messages), messages
    handshake = [r for r in records if r["message"].startswith("grpc: Handshake failed")]
    assert handshake and handshake[0]["severity"] == "ERROR", records
    assert records[-1]["message"] == "dilattn-server: shut down", records
