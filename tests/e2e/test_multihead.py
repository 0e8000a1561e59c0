"""The multihead module through the server: a model repository holding a safetensors file of
random weights (written here, independently of the C++ reader), requests of hidden states X from
tritonclient, checked against a float64 evaluation in numpy."""

import json
import os
import pathlib
import queue
import struct
import subprocess

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import cuda_ipc
import reference
from conftest import ServerProcess
from helpers import NUMPY_DTYPE, to_wire
from test_perf_analyzer import perf_analyzer

E, HEADS = 64, 4  # D = 16: a head dim the GPU kernels cover too
SEGMENTS, RATES = [32, 64], [1, 2]
# On a GPU server the module stores weights and activations in the request's 16-bit dtype (FP32
# requests in fp16) and rounds six times on the way; against the float64 definition that is up to
# four times the attention's own tolerance (tests/kernels/multihead_test.cc holds the GPU path
# to the attention's tolerance against a reference that rounds where it does).
SLACK = 4 if reference.ON_GPU else 1


def write_safetensors(path, tensors):
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def random_weights(rng, prefix="self_attn.", e=E):
    w = {}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        w[f"{prefix}{name}.weight"] = rng.uniform(-1, 1, (e, e)) * np.sqrt(3.0 / e)
        w[f"{prefix}{name}.bias"] = rng.uniform(-0.5, 0.5, e)
    w[f"{prefix}inner_attn_ln.weight"] = 1 + rng.uniform(-0.5, 0.5, e)
    w[f"{prefix}inner_attn_ln.bias"] = rng.uniform(-0.5, 0.5, e)
    return {k: v.astype(np.float32) for k, v in w.items()}


def multihead_reference(x, w, causal=False, prefix="self_attn.", eps=1e-5, heads=HEADS):
    """float64: y = out_proj(LN(attention(q_proj(x), k_proj(x), v_proj(x))))."""
    x = np.asarray(x, dtype=np.float64)
    b, n, e = x.shape
    lin = lambda t, p: t @ w[f"{prefix}{p}.weight"].astype(np.float64).T + w[f"{prefix}{p}.bias"]
    q, k, v = (lin(x, p).reshape(b, n, heads, e // heads) for p in ("q_proj", "k_proj", "v_proj"))
    a = reference.dilated_attention(q, k, v, SEGMENTS, RATES, causal=causal).reshape(b, n, e)
    mean = a.mean(axis=-1, keepdims=True)
    var = a.var(axis=-1, keepdims=True)
    a = (a - mean) / np.sqrt(var + eps) * w[f"{prefix}inner_attn_ln.weight"] + \
        w[f"{prefix}inner_attn_ln.bias"]
    return lin(a, "out_proj")


CONFIG = """
name: "{name}"
max_batch_size: 8
parameters {{ key: "operator" value {{ string_value: "multihead_dilated_attention" }} }}
parameters {{ key: "weights" value {{ string_value: "{weights}" }} }}
parameters {{ key: "weights_prefix" value {{ string_value: "self_attn." }} }}
parameters {{ key: "num_heads" value {{ string_value: "{heads}" }} }}
parameters {{ key: "segment_lengths" value {{ string_value: "32,64" }} }}
parameters {{ key: "dilation_rates" value {{ string_value: "1,2" }} }}
dynamic_batching {{ max_queue_delay_microseconds: 20000 }}
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("mh_repo")
    (root / "mha").mkdir()
    weights = random_weights(np.random.default_rng(11))
    write_safetensors(root / "mha" / "weights.safetensors", weights)
    (root / "mha" / "config.pbtxt").write_text(
        CONFIG.format(name="mha", weights="weights.safetensors", heads=HEADS))
    # Head dims without an attention kernel, which a GPU server runs padded to the next one: the
    # same weights as eight heads of D = 8, and two heads of D = 24 (E = 48).
    padded = {"mha_d8": (weights, 8),
              "mha_d24": (random_weights(np.random.default_rng(12), e=48), 2)}
    # E = 36 (three heads of 12): rows of X whose fp16 size is not a multiple of 16 bytes, which
    # a GPU server leaves to the CPU path.
    cpu_only = {"mha_e36": (random_weights(np.random.default_rng(13), e=36), 3)}
    for name, (w, heads) in {**padded, **cpu_only}.items():
        (root / name).mkdir()
        write_safetensors(root / name / "weights.safetensors", w)
        (root / name / "config.pbtxt").write_text(
            CONFIG.format(name=name, weights="weights.safetensors", heads=heads))
    return root, weights, padded


@pytest.fixture(scope="module")
def mh_server(repo):
    s = ServerProcess("--model-repository", str(repo[0]), name="multihead")
    yield s
    assert s.stop() == 0, s.log_path.read_text()


def infer(client, x, datatype="FP32", model="mha", **params):
    t = grpcclient.InferInput("X", list(x.shape), datatype)
    t.set_data_from_numpy(np.asarray(x, dtype=NUMPY_DTYPE[datatype]))
    return client.infer(model, [t], parameters=params or None).as_numpy("Y")


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_the_float64_module(mh_server, repo, datatype, causal):
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (2, 150, E)).astype(np.float32)
    y = infer(mh_server.client(), x, datatype, causal=causal)
    assert y.shape == (2, 150, E) and y.dtype == NUMPY_DTYPE[datatype]
    expected = multihead_reference(to_wire(x, datatype), repo[1], causal=causal)
    err = reference.relative_error(y.astype(np.float32), expected)
    assert err <= SLACK * reference.TOLERANCE[datatype], err


@pytest.mark.parametrize("model", ["mha_d8", "mha_d24"])
@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16"])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_without_a_kernel_match_the_float64_module(mh_server, repo, model, datatype,
                                                             causal):
    weights, heads = repo[2][model]
    e = weights["self_attn.q_proj.weight"].shape[0]
    x = np.random.default_rng(5).uniform(-1, 1, (2, 130, e)).astype(np.float32)
    y = infer(mh_server.client(), x, datatype, model=model, causal=causal)
    assert y.shape == x.shape and y.dtype == NUMPY_DTYPE[datatype]
    expected = multihead_reference(to_wire(x, datatype), weights, causal=causal, heads=heads)
    err = reference.relative_error(y.astype(np.float32), expected)
    assert err <= SLACK * reference.TOLERANCE[datatype], err
    path = "gpu_padded" if reference.ON_GPU else "cpu"
    assert mh_server.metric("dilattn_executions_total", model=model, path=path) > 0
    assert mh_server.metric("dilattn_executions_total", model=model, path="gpu") == 0


@pytest.mark.parametrize("model", ["mha_d8", "mha_d24"])
def test_head_dims_without_a_kernel_run_on_the_gpu(mh_server, repo, model):
    """The fp16 range check only the GPU path has tells where a padded model ran: hidden states
    of 50000 in FP32 are refused there, answered by the CPU path."""
    e = repo[2][model][0]["self_attn.q_proj.weight"].shape[0]
    x = np.full((1, 32, e), 50000.0, dtype=np.float32)
    if reference.ON_GPU:
        with pytest.raises(InferenceServerException) as err:
            infer(mh_server.client(), x, model=model)
        assert "exceeded fp16's range" in err.value.message()
    else:
        assert np.all(np.isfinite(infer(mh_server.client(), x, model=model)))


def test_concurrent_requests_of_different_lengths_batch_and_stay_apart(mh_server, repo):
    client = mh_server.client()
    before = client.get_inference_statistics("mha", as_json=True)["model_stats"][0]
    rng = np.random.default_rng(4)
    xs = [rng.uniform(-1, 1, (1, n, E)).astype(np.float32) for n in (40, 97, 128, 7, 64, 150)]
    done = queue.Queue()
    for i, x in enumerate(xs):
        t = grpcclient.InferInput("X", list(x.shape), "FP32")
        t.set_data_from_numpy(x)
        client.async_infer("mha", [t], callback=lambda result, error, i=i: done.put((i, result,
                                                                                     error)))
    for _ in xs:
        i, result, error = done.get(timeout=60)
        assert error is None, error
        y = result.as_numpy("Y")
        err = reference.relative_error(y, multihead_reference(xs[i], repo[1]))
        assert err <= SLACK * reference.TOLERANCE["FP32"], (xs[i].shape, err)
    after = client.get_inference_statistics("mha", as_json=True)["model_stats"][0]
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == len(xs)
    assert executions < len(xs)  # the 20 ms queue delay gathered some of them into one batch


def test_config_and_metadata_show_hidden_states(mh_server):
    client = mh_server.client()
    meta = client.get_model_metadata("mha", as_json=True)
    assert [t["name"] for t in meta["inputs"]] == ["X"]
    assert [t["name"] for t in meta["outputs"]] == ["Y"]
    config = client.get_model_config("mha", as_json=True)["config"]
    assert config["input"][0]["dims"] == ["-1", str(E)] or config["input"][0]["dims"] == ["-1", "-1"]


@pytest.mark.parametrize("build,needle", [
    (lambda: [grpcclient.InferInput("Q", [1, 8, E], "FP32")], "its input is X"),
    (lambda: [grpcclient.InferInput("X", [1, 8, 4, 16], "FP32")], "expected [B, N, E]"),
    (lambda: [grpcclient.InferInput("X", [1, 8, E + 1], "FP32")], "embed dim 64 (4 heads of 16)"),
    (lambda: [grpcclient.InferInput("X", [1, 0, E], "FP32")], "dim N=0"),
])
def test_bad_inputs_are_named(mh_server, build, needle):
    inputs = build()
    for t in inputs:
        shape = t.shape()
        t.set_data_from_numpy(np.zeros([max(1, d) for d in shape], dtype=np.float32)
                              if 0 not in shape else np.zeros(shape, dtype=np.float32))
    with pytest.raises(InferenceServerException) as e:
        mh_server.client().infer("mha", inputs)
    assert "INVALID_ARGUMENT" in str(e.value.status()), e.value
    assert needle in e.value.message(), e.value.message()


def test_requests_change_the_attention_not_the_weights(mh_server):
    x = np.zeros((1, 8, E), dtype=np.float32)
    with pytest.raises(InferenceServerException) as e:
        infer(mh_server.client(), x, weights="other.safetensors")
    assert "not known for multihead dilated attention" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        infer(mh_server.client(), x, dilation_rates="1,128")
    assert "dilation_rates" in e.value.message()


def test_broken_weights_stop_the_start_with_the_reason(tmp_path):
    (tmp_path / "mha").mkdir()
    (tmp_path / "mha" / "weights.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    (tmp_path / "mha" / "config.pbtxt").write_text(
        CONFIG.format(name="mha", weights="weights.safetensors", heads=HEADS))
    with pytest.raises(RuntimeError) as e:
        ServerProcess("--model-repository", str(tmp_path), name="multihead-broken")
    assert "not valid safetensors" in str(e.value)


def test_perf_analyzer_drives_a_multihead_model(mh_server, tmp_path):
    """Triton's perf_analyzer, unmodified, sends X and reads Y."""
    binary, env = perf_analyzer()
    # Earlier tests of this module sent requests that failed to parse, which count as failures.
    failed_before = (mh_server.client().get_inference_statistics("mha").model_stats[0]
                     .inference_stats.fail.count)
    data = tmp_path / "inputs"
    data.mkdir()
    # Moderate floats, as hidden states are (perf_analyzer's own random bytes include NaN).
    np.random.default_rng(6).uniform(-1, 1, (1, 128, E)).astype(np.float32).tofile(data / "X")
    r = subprocess.run([binary, "-m", "mha", "-u", mh_server.url, "-i", "grpc",
                        "--input-data", str(data), "--shape", f"X:128,{E}",
                        "--concurrency-range", "2", "--measurement-interval", "1000",
                        "--max-trials", "4", "--stability-percentage", "100"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Throughput" in r.stdout
    stats = mh_server.client().get_inference_statistics("mha").model_stats[0].inference_stats
    assert stats.success.count > 0 and stats.fail.count == failed_before


def test_values_beyond_fp16_inside_the_module_are_refused_not_returned_as_inf(mh_server):
    """Hidden states of 50000 are fine for FP32 (and in fp16 themselves), but their projections
    are not fp16 numbers. The GPU computes FP32 requests in fp16, so there it refuses them by
    name; the CPU path computes in fp32 and answers. BF16 has fp32's range everywhere."""
    x = np.full((1, 32, E), 50000.0, dtype=np.float32)
    if reference.ON_GPU:
        with pytest.raises(InferenceServerException) as e:
            infer(mh_server.client(), x)
        assert "INVALID_ARGUMENT" in str(e.value.status()), e.value
        assert "exceeded fp16's range" in e.value.message()
    else:
        assert np.all(np.isfinite(infer(mh_server.client(), x)))
    assert np.all(np.isfinite(infer(mh_server.client(), x, "BF16").astype(np.float32)))


@pytest.mark.parametrize("datatype", ["FP16", "FP32"])
def test_cuda_shared_memory_in_and_out(mh_server, repo, datatype):
    """X and Y in one CUDA allocation the client shares: FP16 runs in place on it (no copies),
    FP32 through the executor's conversion buffers; both give the answer of a request that
    carries X in its message."""
    cudart = cuda_ipc.load_cudart() if reference.ON_GPU else None
    if cudart is None:
        pytest.skip("CUDA shared memory needs a GPU server and the CUDA runtime on this side")
    x = np.random.default_rng(9).uniform(-1, 1, (1, 200, E)).astype(NUMPY_DTYPE[datatype])
    n = x.nbytes
    client = mh_server.client()
    buf = cuda_ipc.DeviceBuffer(cudart, 2 * n)
    try:
        buf.fill(0xFF)  # NaN in FP16 and FP32: an unwritten Y cannot pass
        buf.write(x, offset=0)
        client.register_cuda_shared_memory("mh", buf.raw_handle(), 0, 2 * n)
        t = grpcclient.InferInput("X", list(x.shape), datatype)
        t.set_shared_memory("mh", n, offset=0)
        out = grpcclient.InferRequestedOutput("Y")
        out.set_shared_memory("mh", n, offset=n)
        client.infer("mha", [t], outputs=[out])
        y = buf.read(NUMPY_DTYPE[datatype], x.shape, offset=n)
        assert np.array_equal(y, infer(client, x, datatype))
        client.unregister_cuda_shared_memory("mh")
    finally:
        buf.free()


def test_cuda_shared_memory_on_the_cpu_path_is_refused(mh_server):
    """A model the GPU does not run (E = 36) computes on the CPU path, which cannot read device
    memory: X in CUDA shared memory is refused by name, and the same X in the message is answered."""
    cudart = cuda_ipc.load_cudart() if reference.ON_GPU else None
    if cudart is None:
        pytest.skip("CUDA shared memory needs a GPU server and the CUDA runtime on this side")
    x = np.random.default_rng(10).uniform(-1, 1, (1, 64, 36)).astype(np.float32)
    client = mh_server.client()
    buf = cuda_ipc.DeviceBuffer(cudart, x.nbytes)
    try:
        buf.write(x, offset=0)
        client.register_cuda_shared_memory("mh_cpu", buf.raw_handle(), 0, x.nbytes)
        t = grpcclient.InferInput("X", list(x.shape), "FP32")
        t.set_shared_memory("mh_cpu", x.nbytes)
        with pytest.raises(InferenceServerException) as e:
            client.infer("mha_e36", [t])
        assert "CUDA shared memory" in e.value.message() and "CPU" in e.value.message()
        client.unregister_cuda_shared_memory("mh_cpu")
    finally:
        buf.free()
    t = grpcclient.InferInput("X", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    assert np.all(np.isfinite(client.infer("mha_e36", [t]).as_numpy("Y")))
    assert mh_server.metric("dilattn_executions_total", model="mha_e36", path="cpu") > 0


def test_dilattn_client_sends_hidden_states(mh_server):
    """dilattn-client's infer and bench take --shape B,N,E for a multihead model; attend, the
    native stream of Q, K and V, refuses it before sending anything."""
    binary = os.environ.get("DILATTN_CLIENT_BIN", str(
        pathlib.Path(__file__).resolve().parents[2] / "build" / "client" / "dilattn-client"))
    if not os.access(binary, os.X_OK):
        pytest.skip(f"{binary} is not built")
    r = subprocess.run([binary, "infer", "--url", mh_server.url, "--model", "mha", "--shape",
                        f"2,50,{E}", "--dtype", "bf16"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"Y [2,50,{E}] bf16 in "), r.stdout
    r = subprocess.run([binary, "bench", "--url", mh_server.url, "--model", "mha", "--shape",
                        f"1,64,{E}", "--duration", "1", "--concurrency", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "throughput:" in r.stdout
    r = subprocess.run([binary, "attend", "--url", mh_server.url, "--model", "mha", "--shape",
                        f"1,64,{E}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--shape B,N,H,D" in r.stderr, r.stdout + r.stderr
