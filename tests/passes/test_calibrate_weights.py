"""Calibration for quantization: input Hessians from onnxruntime, GPTQ error compensation."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cachefit.errors import CachefitError
from cachefit.passes.calibrate_weights import (
    collect_hessians,
    gptq_quantize,
    matmul_inputs,
    output_error,
    random_inputs,
)
from cachefit.passes.quantize_weights import dequantize_array, quantize_array, quantize_weights


@pytest.mark.parametrize("bits,group", [(4, None), (4, 16), (8, 32), (4, 24)])
def test_identity_hessian_is_round_to_nearest(bits, group):
    """With a diagonal H the errors of one row have nothing to compensate in the others: GPTQ
    returns exactly quantize_array's integers and scales (also with a last group shorter than the
    others), in natural or in act-order (rows by decreasing diag H)."""
    w = np.random.default_rng(0).standard_normal((64, 12)).astype(np.float32)
    q0, s0 = quantize_array(w, bits, group)
    for act_order in (False, True):   # act-order with static groups: the same scales, any row order
        q, s = gptq_quantize(w, np.diag(np.linspace(2.0, 1.0, 64)[::-1]), bits, group, act_order=act_order)
        np.testing.assert_array_equal(q, q0)
        np.testing.assert_array_equal(s, s0)


@pytest.mark.parametrize("group", [None, 16])
def test_gptq_reduces_the_output_error(group):
    """On correlated inputs X, GPTQ's ||X W - X Wq|| is well below round-to-nearest's (here by
    more than a quarter), on held-out rows too, while its stored format is RTN's: packed INT4,
    half a byte per value, float32 scales per group."""
    rng = np.random.default_rng(1)
    k, n = 64, 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    mix = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / 8.0)[:, None]
    x, held = rng.standard_normal((4096, k)) @ mix, rng.standard_normal((1024, k)) @ mix
    h = x.T @ x / len(x)
    q, s = gptq_quantize(w, h, 4, group)
    assert q.dtype == np.uint8 and q.shape == (k // 2, n) and q.nbytes == k * n // 2
    assert s.dtype == np.float32 and s.shape == ((k // group if group else 1), n)
    g = dequantize_array(q, s, 4, k, group)
    r = dequantize_array(*quantize_array(w, 4, group), 4, k, group)
    assert output_error(w, g, h) < 0.75 * output_error(w, r, h)
    o = dequantize_array(*gptq_quantize(w, h, 4, group, act_order=True), 4, k, group)
    assert output_error(w, o, h) < 0.75 * output_error(w, r, h)
    assert np.linalg.norm(held @ (w - g)) < 0.75 * np.linalg.norm(held @ (w - r))
    # the value grid is the quantizer's: every decoded value is an integer multiple of its scale
    rows = np.arange(k) // (group or k)
    np.testing.assert_allclose(g / s[rows], np.rint(g / s[rows]), atol=1e-4)


def test_dead_inputs_and_bad_hessians():
    """A row whose input is always zero quantizes to 0; a Hessian of the wrong size is refused."""
    w = np.ones((4, 2), np.float32)
    h = np.diag([1.0, 0.0, 1.0, 1.0])
    d = dequantize_array(*gptq_quantize(w, h, 8), 8, 4)
    assert (d[1] == 0).all() and np.allclose(d[[0, 2, 3]], 1.0)
    with pytest.raises(CachefitError, match=r"must be \[4, 4\]"):
        gptq_quantize(w, np.eye(3), 8)


def _model():
    """x [2, 3, 4] -> MatMul(W1 [4, 5]) -> Gemm-like MatMul with Transpose(W2 [6, 5]) -> Relu ->
    MatMul(W1^T-shaped W3 [6, 4]) and W1 read a second time by another MatMul."""
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((4, 5)).astype(np.float32)
    w2 = rng.standard_normal((6, 5)).astype(np.float32)
    w3 = rng.standard_normal((6, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("Transpose", ["w2"], ["w2t"], perm=[1, 0]),
        helper.make_node("MatMul", ["a", "w2t"], ["b"]),
        helper.make_node("Relu", ["b"], ["c"]),
        helper.make_node("MatMul", ["c", "w3"], ["d"]),
        helper.make_node("MatMul", ["d", "w1"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                           numpy_helper.from_array(w3, "w3")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), (w1, w2, w3)


def test_hessians_from_onnxruntime_are_exact():
    """H(W) = X^T X / M over every row that multiplies W, all its uses and all feeds summed:
    computed here by hand in float64 from the same activations."""
    model, (w1, w2, w3) = _model()
    assert matmul_inputs(model) == {"w1": ["x", "d"], "w2": ["a"], "w3": ["c"]}
    feeds = random_inputs(model, 3, seed=5)
    assert len(feeds) == 3 and feeds[0]["x"].shape == (2, 3, 4) and feeds[0]["x"].dtype == np.float32
    h = collect_hessians(model, feeds)
    xs, as_, cs, ds = [], [], [], []
    for f in feeds:
        x = f["x"].reshape(-1, 4).astype(np.float64)
        a = x @ w1
        c = np.maximum(a @ w2.T, 0)
        d = c @ w3
        xs.append(x), as_.append(a), cs.append(c), ds.append(d)
    x1 = np.concatenate(xs + ds)
    np.testing.assert_allclose(h["w1"], x1.T @ x1 / len(x1), rtol=1e-5, atol=1e-6)
    a = np.concatenate(as_)
    np.testing.assert_allclose(h["w2"], a.T @ a / len(a), rtol=1e-5, atol=1e-6)
    c = np.concatenate(cs)
    np.testing.assert_allclose(h["w3"], c.T @ c / len(c), rtol=1e-5, atol=1e-6)
    assert set(collect_hessians(model, feeds, weights=["w3"])) == {"w3"}


def test_calibrated_quantize_weights_pass(analyzed):
    """QuantizeWeights with Hessians: matmul weights are rounded by GPTQ (method "gptq"), in the
    same shapes and bytes as without; a Hessian of the wrong size falls back to round to nearest."""
    a = analyzed("dense-tiny")
    feeds = random_inputs(a.imported.onnx_model, 2)
    hess = collect_hessians(a.imported.onnx_model, feeds)
    assert hess["layers_0_mlp_fc2_weight"].shape == (640, 640)
    hess["layers_3_mlp_fc1_weight"] = np.eye(7)
    _mod, params, done = quantize_weights(a.mod, a.params, bits=4, group_size=128, hessians=hess)
    _mod0, params0, done0 = quantize_weights(a.mod, a.params, bits=4, group_size=128)
    method = {q.name: q.method for q in done}
    assert method.pop("layers_3_mlp_fc1_weight") == "rtn"
    assert set(method.values()) == {"gptq"}
    assert [(q.q_shape, q.bytes_after) for q in done] == [(q.q_shape, q.bytes_after) for q in done0]
    assert not np.array_equal(params["layers_0_mlp_fc2_weight_int4"], params0["layers_0_mlp_fc2_weight_int4"])


def test_random_inputs_index_the_embedding():
    """Integer inputs feeding a Gather of an initializer table are drawn over its rows."""
    table = numpy_helper.from_array(np.zeros((7, 2), np.float32), "emb")
    g = helper.make_graph([helper.make_node("Gather", ["emb", "ids"], ["y"])], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [4, 50])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 50, 2])], [table])
    (feed,) = random_inputs(helper.make_model(g), 1)
    assert feed["ids"].dtype == np.int64 and feed["ids"].min() >= 0 and feed["ids"].max() == 6
    onnx.checker.check_model(helper.make_model(g))
    # GPT-2's export reshapes the ids before its Gather
    gpt2 = onnx.load(str(Path(__file__).parents[1] / "data" / "gpt2_legacy.onnx"))
    a, b = random_inputs(gpt2, 2, seed=1)
    assert a["input_ids"].max() > 50 and not np.array_equal(a["input_ids"], b["input_ids"])
