"""What deploy/ ships, checked without a Docker engine or a cluster: the image's contents (the
build context scripts/image_context.sh writes for deploy/docker/Dockerfile) are self-contained
and serve, and the Kubernetes manifests build with kustomize and agree with the server."""

import os
import pathlib
import re
import shutil
import subprocess

import grpc
import numpy as np
import pytest

import reference
from conftest import ROOT, ServerProcess, server_binary
from helpers import make_inputs
from pki import Pki

# What the image's base (Ubuntu 24.04) has in newer versions; scripts/runtime_libs.sh leaves
# them out.
BASE_LIBS = ("linux-vdso", "libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so",
             "ld-linux", "libstdc++.so", "libgcc_s.so")


def _server_flags():
    out = subprocess.run([server_binary(), "--help"],
                         capture_output=True, text=True, timeout=30)
    return set(re.findall(r"^\s+(--[a-z-]+)", out.stdout + out.stderr, re.M))


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    if not (ROOT / "build" / "server" / "dilattn-server").exists():
        pytest.skip("the image context is made from build/ (./setup.sh), absent here")
    out = tmp_path_factory.mktemp("image") / "context"
    r = subprocess.run([str(ROOT / "scripts" / "image_context.sh"), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_image_context_holds_every_library_its_binaries_load(context):
    assert (context / "Dockerfile").read_text() == (ROOT / "deploy/docker/Dockerfile").read_text()
    env = {"LD_LIBRARY_PATH": str(context / "lib"), "PATH": "/usr/bin:/bin"}
    for binary in ("dilattn-server", "dilattn-client"):
        out = subprocess.run(["ldd", str(context / "bin" / binary)], capture_output=True,
                             text=True, env=env, timeout=60).stdout
        for line in out.splitlines():
            assert "not found" not in line, line
            lib = os.path.basename(line.split()[0])
            path = line.split("=>")[-1].split()[0] if "=>" in line else ""
            assert path.startswith(str(context / "lib")) or lib.startswith(BASE_LIBS), line


def test_dockerfile_copies_the_context_and_runs_the_server_flags(context):
    text = (context / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", text, re.M):
        assert (context / source).exists(), source
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, re.M).group(1)
    assert entry == "/opt/dilattn/bin/dilattn-server"
    cmd_flags = set(re.findall(r'"(--[a-z-]+)"', re.search(r"^CMD (.*)$", text, re.M).group(1)))
    assert cmd_flags and cmd_flags <= _server_flags()


def test_server_from_the_image_context_serves(context):
    """The context's binary, with only the context's libraries on the path, serves a request."""
    env = {"LD_LIBRARY_PATH": str(context / "lib"), "PATH": "/usr/bin:/bin"}
    server = ServerProcess("--device", "cpu", name="image-context",
                           binary=str(context / "bin" / "dilattn-server"), env=env)
    try:
        rng = np.random.default_rng(3)
        q, k, v = (rng.uniform(-1, 1, (1, 96, 2, 16)).astype(np.float32) for _ in range(3))
        out = server.client().infer("dilated_attention", make_inputs(q, k, v), parameters={
            "segment_lengths": "32,96", "dilation_rates": "1,3"}).as_numpy("O")
        expected = reference.dilated_attention(q, k, v, [32, 96], [1, 3])
        assert reference.relative_error(out, expected) <= 1e-5
    finally:
        server.stop()


def _kustomize(path=ROOT / "deploy" / "k8s"):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (for its built-in kustomize) is not installed here")
    r = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _docs(text):
    return {re.search(r"^kind: (\w+)", d, re.M).group(1): d
            for d in text.split("\n---\n") if re.search(r"^kind: ", d, re.M)}


def _hpa_metrics(text):
    """The HPA's metric types, and the names of its Pods metrics."""
    hpa = _docs(text)["HorizontalPodAutoscaler"]
    return (re.findall(r"^    type: (\w+)$", hpa, re.M),
            re.findall(r"^  - pods:\n      metric:\n        name: (\S+)", hpa, re.M))


def test_k8s_manifests_build_and_agree_with_the_server():
    text = _kustomize()
    kinds = set(re.findall(r"^kind: (\w+)", text, re.M))
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "ServiceMonitor"}
    docs = _docs(text)
    deployment = docs["Deployment"]
    args = re.findall(r"^\s+- (--[a-z-]+)=(\S+)", deployment, re.M)
    flags = dict(args)
    assert set(flags) <= _server_flags(), sorted(set(flags) - _server_flags())
    # Container ports by name (kustomize sorts keys), the probes on the metrics port's health
    # paths, the Service and the ServiceMonitor by port name.
    ports = {name: port for port, name in
             re.findall(r"- containerPort: (\d+)\n\s+name: (\w+)", deployment)}
    assert ports == {"grpc": flags["--grpc-port"], "metrics": flags["--metrics-port"]}
    probe = r"(\w+Probe):\n(?:\s+failureThreshold: \d+\n)?\s+httpGet:\n\s+path: (\S+)\n\s+port: metrics\n"
    probes = dict(re.findall(probe, deployment))
    assert probes == {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
                      "livenessProbe": "/v2/health/live"}, probes
    assert set(re.findall(r"targetPort: (\w+)", docs["Service"])) == set(ports)
    assert re.findall(r"^\s+port: (\w+)", docs["ServiceMonitor"], re.M) == ["metrics"]
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", deployment).group(1))
    pre_stop = int(re.search(r'preStop:\s+exec:\s+command:\s+- sleep\s+- "(\d+)"',
                             deployment).group(1))
    # The server's shutdown ends at most 5 s past its grace period (main.cc).
    assert grace >= pre_stop + int(flags["--grace-period-seconds"]) + 5


def test_server_starts_with_the_deployments_arguments_and_reports_serving():
    text = _kustomize()
    args = [f"{f}={v}" for f, v in re.findall(r"^\s+- (--[a-z-]+)=(\S+)", text, re.M)
            if f not in ("--grpc-port", "--metrics-port")]  # free ports instead, here
    server = ServerProcess(*args, name="deployment-args")
    try:
        # What the probes ask.
        assert server.http_get("/v2/health/ready") == (200, "ready\n")
        assert server.http_get("/v2/health/live") == (200, "live\n")
        with grpc.insecure_channel(server.url) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                        response_deserializer=None)
            assert check(b"", timeout=10) == b"\x08\x01"  # SERVING
    finally:
        server.stop()


def test_k8s_deployment_is_pod_security_restricted_without_shared_memory():
    """Pod Security "restricted" fields, and shared memory off behind a cluster-wide Service."""
    deployment = _docs(_kustomize())["Deployment"]
    assert "- --shared-memory=off" in deployment
    assert "mountPath: /dev/shm" not in deployment  # nothing needs more than the runtime's
    assert re.search(r"^        runAsNonRoot: true$", deployment, re.M)
    assert re.search(r"^        seccompProfile:\n          type: RuntimeDefault$", deployment, re.M)
    assert re.search(r"^          allowPrivilegeEscalation: false$", deployment, re.M)
    assert re.search(r"^          capabilities:\n            drop:\n            - ALL$", deployment,
                     re.M)


def test_k8s_hpa_needs_no_adapter_unless_its_component_is_added(tmp_path):
    """The default HPA scales on CPU alone: a Pods metric that no adapter serves is invalid, and
    the HPA controller then never scales down. The component adds the pending-requests metric."""
    assert _hpa_metrics(_kustomize()) == (["Resource"], [])
    base = pathlib.Path(os.path.relpath(ROOT / "deploy" / "k8s", tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {base}\ncomponents:\n  - {base / 'components/pending-requests-hpa'}\n")
    with_adapter = _kustomize(tmp_path)
    assert _hpa_metrics(with_adapter) == (["Resource", "Pods"],
                                          ["nv_inference_pending_request_count"])
    # Only the HPA differs.
    without = _kustomize()
    assert {k: v for k, v in _docs(with_adapter).items() if k != "HorizontalPodAutoscaler"} == \
        {k: v for k, v in _docs(without).items() if k != "HorizontalPodAutoscaler"}


def test_k8s_tls_component_mounts_the_secret_and_the_server_serves_tls_from_it(tmp_path):
    """components/grpc-tls changes the Deployment alone: the Secret's volume, its read-only mount,
    and the two flags naming its tls.crt and tls.key, with which the server serves TLS."""
    import tritonclient.grpc as grpcclient

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = pathlib.Path(os.path.relpath(ROOT / "deploy" / "k8s", overlay))
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {base}\ncomponents:\n  - {base / 'components/grpc-tls'}\n")
    with_tls = _docs(_kustomize(overlay))
    without = _docs(_kustomize())
    assert {k: v for k, v in with_tls.items() if k != "Deployment"} == \
        {k: v for k, v in without.items() if k != "Deployment"}
    deployment = with_tls["Deployment"]
    assert re.search(r"volumeMounts:\n\s+- mountPath: /etc/dilattn/tls\n\s+name: tls\n"
                     r"\s+readOnly: true\n", deployment), deployment
    assert re.search(r"volumes:\n\s+- name: tls\n\s+secret:\n\s+secretName: dilattn-tls$",
                     deployment, re.M), deployment
    flags = dict(re.findall(r"^\s+- (--[a-z-]+)=(\S+)", deployment, re.M))
    assert flags["--grpc-server-cert"] == "/etc/dilattn/tls/tls.crt"
    assert flags["--grpc-server-key"] == "/etc/dilattn/tls/tls.key"
    # The Secret's files as the kubelet mounts them, here under tmp_path.
    pki = Pki(tmp_path, "deploy")
    cert, key = pki.server()
    secret = tmp_path / "secret"
    secret.mkdir()
    shutil.copy(cert, secret / "tls.crt")
    shutil.copy(key, secret / "tls.key")
    args = [f"{f}={v.replace('/etc/dilattn/tls', str(secret))}" for f, v in flags.items()
            if f not in ("--grpc-port", "--metrics-port")]
    server = ServerProcess(*args, name="deployment-tls")
    try:
        assert server.http_get("/v2/health/ready") == (200, "ready\n")  # what the probes ask
        client = grpcclient.InferenceServerClient(server.url, ssl=True,
                                                  root_certificates=str(pki.ca))
        assert client.is_server_ready()
    finally:
        assert server.stop() == 0, server.log_path.read_text()
