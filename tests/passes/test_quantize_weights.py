"""QuantizeWeights: INT8 / INT4 weight-only quantization, the dequantize fused into the matmul."""

import numpy as np
import pytest
import tvm
from relax_fixtures import ConvLayer
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from cachefit.analysis import layer_records
from cachefit.errors import CachefitError
from cachefit.passes import run_pass
from cachefit.passes.annotate_footprint import AnnotateFootprint
from cachefit.passes.quantize_weights import (
    QuantizeWeights,
    dequantize_array,
    quantizable_weights,
    quantize_array,
    quantize_weights,
)


# ---------------------------------------------------------------------------------------------
# the numbers
# ---------------------------------------------------------------------------------------------


def test_int4_packing_layout():
    """INT4: q + 8 of row 2i in the low nibble, of row 2i+1 in the high nibble; odd K padded."""
    w = np.array([[7.0], [-7.0], [1.0]], np.float32)  # K=3, N=1, absmax 7 -> scale 1
    q, s = quantize_array(w, 4)
    assert q.dtype == np.uint8 and q.shape == (2, 1)
    assert s.dtype == np.float32 and s.shape == (1, 1) and s[0, 0] == pytest.approx(1.0)
    assert q[0, 0] == (7 + 8) | ((-7 + 8) << 4)
    assert q[1, 0] == (1 + 8) | (8 << 4)  # the padding row holds a zero
    np.testing.assert_array_equal(dequantize_array(q, s, 4, 3), w)


@pytest.mark.parametrize("bits,group,k", [(8, None, 64), (8, 16, 70), (4, None, 64), (4, 32, 64), (4, 16, 37)])
def test_quantize_error_within_half_step(bits, group, k):
    """Every value is within half a quantization step of its original, except values clipped by
    the scale search, which are within (|w| - qmax * scale) of it."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, 24)).astype(np.float32)
    q, s = quantize_array(w, bits, group)
    g = group or k
    groups = -(-k // g)
    assert s.shape == (groups, 24)
    assert q.shape == ((k if bits == 8 else (k + 1) // 2), 24)
    assert q.dtype == (np.int8 if bits == 8 else np.uint8)
    d = dequantize_array(q, s, bits, k, group)
    step = s[np.arange(k) // g]
    qmax = 127 if bits == 8 else 7
    bound = np.maximum(step / 2, np.abs(w) - qmax * step) + 1e-6
    assert np.all(np.abs(d - w) <= bound)
    # the scale search never does worse than absmax scaling
    absmax = np.abs(np.concatenate([w, np.zeros((groups * g - k, 24), np.float32)]).reshape(groups, g, 24)).max(1) / qmax
    plain = np.clip(np.rint(w / absmax[np.arange(k) // g]), -qmax, qmax) * absmax[np.arange(k) // g]
    assert np.square(d - w).sum() <= np.square(plain - w).sum() + 1e-6


# ---------------------------------------------------------------------------------------------
# the rewrite
# ---------------------------------------------------------------------------------------------


@I.ir_module
class Dense:
    @R.function(private=True)
    def layer_0(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 6), "float32"), b: R.Tensor((6,), "float32")) -> R.Tensor((4, 6), "float32"):
        R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "layers.0"})
        with R.dataflow():
            y = R.matmul(x, w)
            gv = R.add(y, b)
            R.output(gv)
        return gv

    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 6), "float32"), b: R.Tensor((6,), "float32")) -> R.Tensor((4, 6), "float32"):
        R.func_attr({"num_input": 1})
        cls = Dense
        with R.dataflow():
            gv = cls.layer_0(x, w, b)
            R.output(gv)
        return gv


def test_int4_groupwise_rewrite_structure():
    """matmul(x, W) becomes one call_tir of a kernel that decodes the packed weight inside the
    reduction (no float copy of W); W is replaced by W_int4 + W_scale in the layer and in main."""

    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def cachefit_dequant_matmul_int4_g4_4x8_8_6_float32_float32(x: T.Buffer((T.int64(4), T.int64(8)), "float32"), q: T.Buffer((T.int64(4), T.int64(6)), "uint8"), scale: T.Buffer((T.int64(2), T.int64(6)), "float32"), matmul: T.Buffer((T.int64(4), T.int64(6)), "float32")):
            T.func_attr({"cachefit.flops": T.int64(384), "op_pattern": 4, "tirx.noalias": True})
            for i0, i1, k in T.grid(T.int64(4), T.int64(6), T.int64(8)):
                with T.sblock("matmul"):
                    v_i0 = T.axis.spatial(T.int64(4), i0)
                    v_i1 = T.axis.spatial(T.int64(6), i1)
                    v_k = T.axis.reduce(T.int64(8), k)
                    T.reads(x[v_i0, v_k], q[v_k // T.int64(2), v_i1], scale[v_k // T.int64(4), v_i1])
                    T.writes(matmul[v_i0, v_i1])
                    with T.init():
                        matmul[v_i0, v_i1] = T.float32(0.0)
                    matmul[v_i0, v_i1] = matmul[v_i0, v_i1] + x[v_i0, v_k] * ((T.Cast("float32", q[v_k // T.int64(2), v_i1] >> T.Cast("uint8", v_k % T.int64(2) * T.int64(4)) & T.uint8(15)) - T.float32(8.0)) * scale[v_k // T.int64(4), v_i1])

        @R.function(private=True)
        def layer_0(x: R.Tensor((4, 8), "float32"), w_int4: R.Tensor((4, 6), "uint8"), w_scale: R.Tensor((2, 6), "float32"), b: R.Tensor((6,), "float32")) -> R.Tensor((4, 6), "float32"):
            R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "layers.0", "cachefit.weight_bits": 4})
            cls = Expected
            with R.dataflow():
                y = R.call_tir(cls.cachefit_dequant_matmul_int4_g4_4x8_8_6_float32_float32, (x, w_int4, w_scale), out_ty=R.Tensor((4, 6), "float32"))
                gv = R.add(y, b)
                R.output(gv)
            return gv

        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w_int4: R.Tensor((4, 6), "uint8"), w_scale: R.Tensor((2, 6), "float32"), b: R.Tensor((6,), "float32")) -> R.Tensor((4, 6), "float32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                gv = cls.layer_0(x, w_int4, w_scale, b)
                R.output(gv)
            return gv

    after = QuantizeWeights(None, bits=4, group_size=4)(Dense)
    # the kernel comes from TE, whose loop minima are int32 zeros where TVMScript reads int64:
    # compare the module as printed and parsed back
    tvm.ir.assert_structural_equal(Expected, tvm.script.from_source(after.script()))


def test_input_module_unchanged_and_params_replaced():
    """The pass leaves its input alone; new_params holds the integers and scales, not W."""
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((8, 6)).astype(np.float32), "b": np.zeros(6, np.float32)}
    before = Dense.script()
    p = QuantizeWeights(params, bits=8)
    after = p(Dense)
    assert Dense.script() == before
    assert set(p.new_params) == {"w_int8", "w_scale", "b"}
    q, s = quantize_array(params["w"], 8)
    np.testing.assert_array_equal(p.new_params["w_int8"], q)
    np.testing.assert_array_equal(p.new_params["w_scale"], s)
    assert [v.name for v in after["main"].params] == ["x", "w_int8", "w_scale", "b"]
    assert [(q.name, q.bytes_before, q.bytes_after) for q in p.quantized] == [("w", 8 * 6 * 4, 8 * 6 + 6 * 4)]


@I.ir_module
class Mixed:
    """layer 0: an embedding (take) and a Gemm(transB) weight; layer 1: the same embedding
    reused as a tied head (matmul with permute_dims) and an ordinary weight."""

    @R.function(private=True)
    def layer_0(ids: R.Tensor((4,), "int64"), emb: R.Tensor((10, 8), "float32"), wt: R.Tensor((6, 8), "float32")) -> R.Tensor((4, 6), "float32"):
        R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "embed"})
        with R.dataflow():
            h = R.take(emb, ids, axis=0)
            t = R.permute_dims(wt, axes=[1, 0])
            gv = R.matmul(h, t)
            R.output(gv)
        return gv

    @R.function(private=True)
    def layer_1(h: R.Tensor((4, 6), "float32"), w: R.Tensor((6, 8), "float32"), emb: R.Tensor((10, 8), "float32")) -> R.Tensor((4, 10), "float32"):
        R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "head"})
        with R.dataflow():
            z = R.matmul(h, w)
            gv = R.matmul(z, R.permute_dims(emb))
            R.output(gv)
        return gv

    @R.function
    def main(ids: R.Tensor((4,), "int64"), emb: R.Tensor((10, 8), "float32"), wt: R.Tensor((6, 8), "float32"), w: R.Tensor((6, 8), "float32")) -> R.Tensor((4, 10), "float32"):
        R.func_attr({"num_input": 1})
        cls = Mixed
        with R.dataflow():
            h = cls.layer_0(ids, emb, wt)
            gv = cls.layer_1(h, w, emb)
            R.output(gv)
        return gv


def test_which_weights_are_quantized():
    """Gemm(transB) weights and plain matmul weights are quantized; a table read by an embedding
    lookup in one layer and as a (tied) LM head in another is quantized for the head only;
    ``layers`` restricts the choice."""
    uses = quantizable_weights(Mixed)
    assert sorted(uses) == ["emb", "w", "wt"]
    assert (uses["wt"].kind, uses["wt"].k, uses["wt"].n, uses["wt"].shared) == ("nk", 8, 6, False)
    assert (uses["w"].kind, uses["w"].k, uses["w"].n) == ("kn", 6, 8)
    assert (uses["emb"].kind, uses["emb"].layers, uses["emb"].shared) == ("nk", (1,), True)
    assert sorted(quantizable_weights(Mixed, layers=["head"])) == ["emb", "w"]
    assert sorted(quantizable_weights(Mixed, layers=[0])) == ["wt"]
    with pytest.raises(CachefitError, match="no layer named 'nope'"):
        quantizable_weights(Mixed, layers=["nope"])


def test_shape_only_params_keep_none_values():
    """Without weight values the shapes and dtypes still change (planning sees the new sizes)."""
    out, params, done = quantize_weights(Mixed, {"emb": None, "wt": None, "w": None}, bits=4)
    assert params == {"emb": None, "emb_int4": None, "emb_scale": None, "wt_int4": None, "wt_scale": None,
                      "w_int4": None, "w_scale": None}
    main = out["main"]
    types = {p.name: (tuple(int(d) for d in p.ty.shape), str(p.ty.dtype)) for p in main.params}
    assert types["wt_int4"] == ((4, 6), "uint8")   # stored as [K/2, N]: the transpose of [N, K]
    assert types["w_int4"] == ((3, 8), "uint8")
    assert types["emb"] == ((10, 8), "float32") and types["emb_int4"] == ((4, 10), "uint8")
    assert [p.name for p in main.params] == ["ids", "emb", "emb_int4", "emb_scale", "wt_int4", "wt_scale",
                                              "w_int4", "w_scale"]
    # the embedding lookup keeps the float table, the head reads the quantized copy
    assert [p.name for p in out["layer_0"].params] == ["ids", "emb", "wt_int4", "wt_scale"]
    assert [p.name for p in out["layer_1"].params] == ["h", "w_int4", "w_scale", "emb_int4", "emb_scale"]
    assert {d.name for d in done} == {"w", "wt", "emb"}


def test_bad_options():
    with pytest.raises(CachefitError, match="use 8"):
        QuantizeWeights(None, bits=3)
    with pytest.raises(CachefitError, match="--group-size"):
        QuantizeWeights(None, bits=4, group_size=0)


# ---------------------------------------------------------------------------------------------
# numbers through TVM
# ---------------------------------------------------------------------------------------------


def _run(mod, args):
    from cachefit.codegen.pipeline import compile_relax

    ex = compile_relax(mod, tvm.target.Target({"kind": "llvm"}), threads=1)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


@pytest.mark.parametrize("bits,group", [(8, None), (4, 4), (4, None)])
def test_compiled_layers_compute_with_the_dequantized_weights(bits, group):
    """The compiled module equals numpy with the dequantized weights: a plain matmul weight, a
    Gemm(transB) weight (stored transposed) and a tied head's copy of the embedding table, through
    cachefit's CPU pipeline."""
    rng = np.random.default_rng(2)
    ids = np.array([1, 3, 9, 0], np.int64)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in (("emb", (10, 8)), ("wt", (6, 8)), ("w", (6, 8)))}
    out, new, _ = quantize_weights(Mixed, params, bits=bits, group_size=group)
    got = _run(out, [ids] + [new[p.name] for p in out["main"].params[1:]])
    deq = {n: dequantize_array(new[f"{n}_int{bits}"], new[f"{n}_scale"], bits, params[n].shape[0] if n == "w" else 8, group)
           for n in ("w", "wt", "emb")}
    assert "emb" in new   # the lookup still reads the float table
    h = params["emb"][ids] @ deq["wt"]       # wt was stored transposed: [K=8, N=6]
    want = (h @ deq["w"]) @ deq["emb"]       # so was the tied head's copy of emb: [K=8, N=10]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_conv2d_weight_per_output_channel(bits):
    """An OIHW conv weight is quantized per output channel over I*H*W and decoded by a kernel the
    convolution reads; the result equals the convolution with the dequantized weight."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    out, new, done = quantize_weights(ConvLayer, {"w": w}, bits=bits)
    assert done[0].kind == "oihw" and done[0].scale_shape == (1, 4)
    got = _run(out, [x, new[f"w_int{bits}"], new["w_scale"]])
    wd = dequantize_array(new[f"w_int{bits}"], new["w_scale"], bits, 27).T.reshape(4, 3, 3, 3)
    want = np.zeros((1, 4, 6, 6), np.float32)
    for i in range(6):
        for j in range(6):
            want[0, :, i, j] = np.tensordot(wd, x[0, :, i:i + 3, j:j + 3], axes=3)
    np.testing.assert_allclose(got, np.maximum(want, 0), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# footprints and the compiled reference model
# ---------------------------------------------------------------------------------------------


def test_footprint_sees_the_stored_sizes(analyzed):
    """After quantization the weight bytes are the integers plus scales, exactly; the activation
    peak does not grow (the kernel decodes the weight on the fly, no float copy is live)."""
    a = analyzed("dense-tiny")
    for bits, group in ((8, None), (4, 128)):
        mod, _params, done = quantize_weights(a.mod, a.params, bits=bits, group_size=group)
        records = layer_records(run_pass(AnnotateFootprint(), mod))
        by_layer = {}
        for q in done:
            layer = int(q.name.split("_")[1])
            by_layer.setdefault(layer, []).append(q)
        assert len(done) == 6 * 4   # q, k, v, o, fc1, fc2 per layer
        for i, (old, new) in enumerate(zip(a.layers, records)):
            saved = sum(q.bytes_before - q.bytes_after for q in by_layer[i])
            assert new.weight_bytes == old.weight_bytes - saved
            assert new.activation_bytes == old.activation_bytes
            assert new.buffer_bytes == old.buffer_bytes
        fc2 = next(q for q in done if q.name == "layers_0_mlp_fc2_weight")
        # fc2 is [640, 160]: 640*160 int8, or 320*160 bytes of packed int4 + 5 groups of scales
        assert fc2.bytes_after == (640 * 160 + 160 * 4 if bits == 8 else 320 * 160 + 5 * 160 * 4)


def _stage_weight_bytes(manifest):
    return sum(st["weights"]["bytes"] for st in manifest["stages"])


def _expected_file_bytes(params: dict) -> int:
    return sum(np.asarray(v).nbytes for v in params.values())


@pytest.mark.slow
def test_compiled_dense_model_int8_int4_against_onnxruntime(analyzed, tmp_path):
    """Acceptance: the stage weight files hold int8 / packed int4 data (about 1/4 and 1/8 of the
    float32 bytes plus the scales); the compiled INT8 model is within 2% of the float model run by
    onnxruntime (relative to the output's norm); the INT4 model computes exactly what its
    dequantized weights give in onnxruntime. (INT4's distance from the float model, about 18% on
    this model, is reported in BENCHMARKS.md: above the issue's 8% target.)"""
    import onnx
    from onnx import numpy_helper

    from cachefit.compiler import compile_model, reference_outputs
    from cachefit.models import build
    from cachefit.runtime import load
    from cachefit.runtime.weights import load_weights

    model = build("dense-tiny")
    path = tmp_path / "dense.onnx"
    onnx.save(model, str(path))
    a = analyzed("dense-tiny")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 16, 160)).astype(np.float32)
    ref = reference_outputs(path, {"x": x})["y"]
    float_bytes = sum(v.nbytes for v in a.params.values())
    results = {}
    for bits, group in ((8, None), (4, 128)):
        res = compile_model(path, out_dir=tmp_path / f"int{bits}", cache="64MB", threads=1, analysis=a,
                            quantize=f"int{bits}", group_size=group)
        pipe = load(res.artifact_dir)
        assert pipe.manifest["plan"]["fit"]["quantize"] == f"int{bits}"
        # the weights files: header + exactly the quantized arrays
        files = {}
        for st in pipe.manifest["stages"]:
            files.update(load_weights(res.artifact_dir / st["weights"]["file"]))
        qnames = [n for n in files if n.endswith(f"_int{bits}")]
        assert len(qnames) == 24
        assert all(files[n].dtype == (np.int8 if bits == 8 else np.uint8) for n in qnames)
        data = _expected_file_bytes(files)
        assert data == _expected_file_bytes(res.analysis.params)
        total = _stage_weight_bytes(pipe.manifest)
        assert data <= total < data + 64 * 1024   # the rest is the safetensors header
        q_bytes = sum(files[n].nbytes for n in qnames)
        q_float = sum(a.params[n[: -len(f"_int{bits}")]].nbytes for n in qnames)
        assert q_bytes * (32 // bits) == q_float                 # 1/4 and 1/8 exactly
        scale_bytes = sum(files[n].nbytes for n in files if n.endswith("_scale"))
        assert data == float_bytes - q_float + q_bytes + scale_bytes
        y = pipe.run({"x": x})["y"]
        results[bits] = (y, data / float_bytes, files)
    err8 = np.linalg.norm(results[8][0] - ref) / np.linalg.norm(ref)
    assert err8 < 0.02
    assert 0.25 < results[8][1] < 0.27 and 0.13 < results[4][1] < 0.15

    # INT4: the float model with the dequantized weights, in onnxruntime
    files = results[4][2]
    deq = onnx.ModelProto()
    deq.CopyFrom(model)
    for t in deq.graph.initializer:
        name = t.name.replace(".", "_")
        if f"{name}_int4" in files:
            w = dequantize_array(files[f"{name}_int4"], files[f"{name}_scale"], 4, a.params[name].shape[0], 128)
            t.CopyFrom(numpy_helper.from_array(w.astype(np.float32), t.name))
    onnx.save(deq, str(tmp_path / "deq.onnx"))
    want = reference_outputs(tmp_path / "deq.onnx", {"x": x})["y"]
    np.testing.assert_allclose(results[4][0], want, rtol=1e-3, atol=1e-3)
    err4 = np.linalg.norm(results[4][0] - ref) / np.linalg.norm(ref)
    assert err8 < err4 < 0.25


def test_mixed_precision_keeps_matching_weights_at_int8(analyzed):
    """--quantize int4 with int8_weights=SENSITIVE_INT8 on moe-tiny: each layer's router
    ([128, 4]) is stored as int8 [128, 4] (its own INT8 kernel), everything else as packed INT4."""
    from cachefit.passes.quantize_weights import SENSITIVE_INT8

    a = analyzed("moe-tiny")
    mod, params, done = quantize_weights(a.mod, a.params, bits=4, group_size=128, int8_weights=SENSITIVE_INT8)
    bits = {q.name: q.bits for q in done}
    routers = {n for n in bits if "router" in n}
    assert len(routers) == 4 and {bits[n] for n in routers} == {8}
    assert {b for n, b in bits.items() if n not in routers} == {4}
    assert params["layers_0_moe_router_weight_int8"].dtype == np.int8
    assert params["layers_0_moe_router_weight_int8"].shape == (128, 4)
    assert params["layers_0_moe_experts_0_fc1_weight_int4"].shape == (64, 256)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert any(n.startswith("cachefit_dequant_matmul_int8") for n in names)
    assert any(n.startswith("cachefit_dequant_matmul_int4") for n in names)
    # INT8 patterns do nothing at --quantize int8
    _, _, done8 = quantize_weights(a.mod, a.params, bits=8, int8_weights=SENSITIVE_INT8)
    assert {q.bits for q in done8} == {8}


def test_int8_by_layer_name(analyzed):
    """``@head`` keeps the weights the LM head reads at INT8: in the GPT-2 legacy export that is
    an anonymous ``onnx__MatMul_*`` [64, 256]; the blocks' weights stay INT4."""
    a = analyzed("gpt2_legacy.onnx")
    _mod, params, done = quantize_weights(a.mod, a.params, bits=4, int8_weights=["@head"])
    eight = [q for q in done if q.bits == 8]
    assert len(eight) == 1 and eight[0].name.startswith("onnx__MatMul_") and eight[0].q_shape == (64, 256)
    assert params[eight[0].q_name].dtype == np.int8
    assert {q.bits for q in done if q is not eight[0]} == {4} and len(done) == 13
