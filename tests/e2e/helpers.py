"""Building requests with tritonclient the way users do."""

import re
import subprocess

import ml_dtypes
import numpy as np
import tritonclient.grpc as grpcclient

import reference

NUMPY_DTYPE = {"FP32": np.float32, "FP16": np.float16, "BF16": ml_dtypes.bfloat16}


def gpu_count():
    """GPUs on this machine (nvidia-smi), 0 without any."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def random_qkv(shape, seed):
    """Q, K and V of `shape`, uniform in [-1, 1), fp32."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(3)]


def to_wire(x, datatype):
    """The values the server will see for `x` sent as `datatype`."""
    return np.asarray(x, dtype=np.float32).astype(NUMPY_DTYPE[datatype]).astype(np.float32)


def make_inputs(q, k, v, datatype="FP32"):
    inputs = []
    for name, x in zip("QKV", (q, k, v)):
        t = grpcclient.InferInput(name, list(x.shape), datatype)
        t.set_data_from_numpy(np.asarray(x, dtype=NUMPY_DTYPE[datatype]))
        inputs.append(t)
    return inputs


def shared_memory_tensors(region, shape, datatype, nbytes, out_region=None, out_offset=None):
    """Q, K and V at offsets 0, n and 2n of registered region `region` (n = `nbytes` each) and
    the output O at `out_offset` (3n by default) of `out_region` (`region` by default):
    (inputs, outputs) for client.infer."""
    inputs = []
    for i, label in enumerate("QKV"):
        t = grpcclient.InferInput(label, list(shape), datatype)
        t.set_shared_memory(region, nbytes, offset=i * nbytes)
        inputs.append(t)
    out = grpcclient.InferRequestedOutput("O")
    out.set_shared_memory(out_region or region, nbytes,
                          offset=3 * nbytes if out_offset is None else out_offset)
    return inputs, [out]


def case_parameters(case):
    params = {
        "segment_lengths": ",".join(str(w) for w in case["segment_lengths"]),
        "dilation_rates": ",".join(str(r) for r in case["dilation_rates"]),
        "mode": case["mode"],
        "causal": bool(case["causal"]),
    }
    if "softmax_scale" in case:
        params["softmax_scale"] = float(case["softmax_scale"])
    return params


def engine_seconds(server):
    """{(device, phase): seconds} from dilattn_engine_seconds_total."""
    out = {}
    for m in re.finditer(r'^dilattn_engine_seconds_total\{([^}]*)\} (\S+)$', server.metrics_text(),
                         re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out[(labels["device"], labels["phase"])] = float(m.group(2))
    return out


def infer_and_check(client, seed):
    """One small dilated_attention request (fresh fp32 inputs of (1, 256, 2, 16), branches 64 and
    128 at rates 1 and 2) through `client`, its answer checked against the reference: for tests
    whose subject is the connection, not the operator."""
    q, k, v = random_qkv((1, 256, 2, 16), seed)
    result = client.infer("dilated_attention", make_inputs(q, k, v),
                          parameters={"segment_lengths": "64,128", "dilation_rates": "1,2"},
                          client_timeout=60)
    expected = reference.dilated_attention(q, k, v, [64, 128], [1, 2])
    err = reference.relative_error(result.as_numpy("O").astype(np.float32), expected)
    assert err <= reference.TOLERANCE["FP32"], err
