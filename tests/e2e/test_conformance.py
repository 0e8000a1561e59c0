"""Every shared conformance case round-trips through ModelInfer and ModelStreamInfer."""

import queue

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

import reference
from helpers import case_parameters, make_inputs, to_wire

CASES = reference.conformance_cases()
MODEL = {"longnet": "dilated_attention", "head_groups": "dilated_attention_head_groups"}


def _ids(case):
    return case["name"]


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16"])
def test_model_infer(client, case, datatype):
    q, k, v = reference.case_inputs(case)
    model = MODEL[case["mode"]]
    params = case_parameters(case)
    if "expect_error" in case:
        with pytest.raises(InferenceServerException) as e:
            client.infer(model, make_inputs(q, k, v, datatype), parameters=params)
        assert case["expect_error"] in str(e.value.status())
        assert "num_heads" in e.value.message()
        return
    result = client.infer(model, make_inputs(q, k, v, datatype), parameters=params)
    out = result.as_numpy("O").astype(np.float32)
    assert out.shape == tuple(case["shape"])
    if datatype == "FP32":
        expected = reference.expected_output(case)
    else:
        expected = reference.dilated_attention(
            *(to_wire(x, datatype) for x in (q, k, v)), case["segment_lengths"],
            case["dilation_rates"], case["mode"], case["causal"], case.get("softmax_scale"))
    err = reference.relative_error(out, expected)
    assert err <= reference.TOLERANCE[datatype], f"{case['name']} {datatype}: {err}"


def test_model_stream_infer_all_cases(server):
    c = server.client()
    results = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for case in CASES:
            q, k, v = reference.case_inputs(case)
            c.async_stream_infer(MODEL[case["mode"]], make_inputs(q, k, v), request_id=case["name"],
                                 parameters=case_parameters(case))
        by_id = {}
        for _ in CASES:
            result, error = results.get(timeout=60)
            if error is not None:
                by_id[_error_id(error)] = error
            else:
                by_id[result.get_response().id] = result
    finally:
        c.stop_stream()
    for case in CASES:
        if "expect_error" in case:
            errors = [e for e in by_id.values() if isinstance(e, Exception)]
            assert any("num_heads" in e.message() for e in errors), case["name"]
            continue
        result = by_id[case["name"]]
        assert not isinstance(result, Exception), result
        err = reference.relative_error(result.as_numpy("O"), reference.expected_output(case))
        assert err <= reference.FP32, f"{case['name']}: {err}"


def _error_id(error):
    return f"error:{error.message()}"
