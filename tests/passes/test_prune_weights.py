"""PruneWeights: structured pruning of MLP hidden units, shapes and FLOPs really shrink."""

import numpy as np
import pytest
import tvm
from relax_fixtures import HeadsLeave
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from cachefit.analysis import layer_records
from cachefit.errors import CachefitError
from cachefit.passes import run_pass
from cachefit.passes.annotate_footprint import AnnotateFootprint
from cachefit.passes.prune_weights import (
    PruneWeights,
    choose_units,
    find_mlp_pairs,
    kept_units,
    prune_weights,
    unit_scores,
)


@I.ir_module
class Mlp:
    """x + fc2(gelu(fc1(x) + b1)) + b2, GELU written out with erf as ONNX exports it."""

    @R.function(private=True)
    def layer_0(x: R.Tensor((4, 8), "float32"), w1: R.Tensor((8, 6), "float32"), b1: R.Tensor((6,), "float32"), w2: R.Tensor((6, 8), "float32"), b2: R.Tensor((8,), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "layers.0"})
        with R.dataflow():
            h = R.matmul(x, w1)
            hb = R.add(h, b1)
            t = R.divide(hb, R.const(1.4142135, "float32"))
            e = R.erf(t)
            e1 = R.add(e, R.const(1.0, "float32"))
            g = R.multiply(hb, e1)
            g2 = R.multiply(g, R.const(0.5, "float32"))
            y = R.matmul(g2, w2)
            yb = R.add(y, b2)
            gv = R.add(x, yb)
            R.output(gv)
        return gv

    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w1: R.Tensor((8, 6), "float32"), b1: R.Tensor((6,), "float32"), w2: R.Tensor((6, 8), "float32"), b2: R.Tensor((8,), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"num_input": 1})
        cls = Mlp
        with R.dataflow():
            gv = cls.layer_0(x, w1, b1, w2, b2)
            R.output(gv)
        return gv


def test_pruned_shapes_shape_only():
    """Pruning half of 6 hidden units leaves 3: W1 [8,3], b1 [3], W2 [3,8]; everything between
    fc1 and fc2 becomes [4,3]; fc2's output and b2 keep their shapes. Without values the first
    units are kept."""

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def layer_0(x: R.Tensor((4, 8), "float32"), w1: R.Tensor((8, 3), "float32"), b1: R.Tensor((3,), "float32"), w2: R.Tensor((3, 8), "float32"), b2: R.Tensor((8,), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "layers.0"})
            with R.dataflow():
                h = R.matmul(x, w1)
                hb = R.add(h, b1)
                t = R.divide(hb, R.const(1.4142135, "float32"))
                e = R.erf(t)
                e1 = R.add(e, R.const(1.0, "float32"))
                g = R.multiply(hb, e1)
                g2 = R.multiply(g, R.const(0.5, "float32"))
                y = R.matmul(g2, w2)
                yb = R.add(y, b2)
                gv = R.add(x, yb)
                R.output(gv)
            return gv

        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w1: R.Tensor((8, 3), "float32"), b1: R.Tensor((3,), "float32"), w2: R.Tensor((3, 8), "float32"), b2: R.Tensor((8,), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                gv = cls.layer_0(x, w1, b1, w2, b2)
                R.output(gv)
            return gv

    p = PruneWeights({"w1": None, "b1": None, "w2": None, "b2": None}, ratio=0.5)
    tvm.ir.assert_structural_equal(Expected, p(Mlp))
    assert p.new_params == {"w1": None, "b1": None, "w2": None, "b2": None}
    assert [(d.hidden_before, d.hidden_after, d.kept) for d in p.pruned] == [(6, 3, (0, 1, 2))]


def test_scores_and_choice():
    """A unit's score is ||W1[:, j]|| * ||W2[j, :]||; the top (1 - ratio) are kept, in order."""
    w1 = np.array([[1.0, 0.0, 3.0, 1.0], [0.0, 0.1, 4.0, 0.0]])   # column norms 1, 0.1, 5, 1
    w2 = np.array([[2.0, 0.0], [100.0, 0.0], [0.1, 0.0], [0.0, 2.0]])  # row norms 2, 100, 0.1, 2
    np.testing.assert_allclose(unit_scores([w1], w2), [2.0, 10.0, 0.5, 2.0])
    assert choose_units([w1], w2, 0.5).tolist() == [0, 1]     # tie 2.0 / 2.0: the lower index
    assert choose_units([w1], w2, 0.25).tolist() == [0, 1, 3]
    assert kept_units(0.5, 640) == 320 and kept_units(0.99, 3) == 1 and kept_units(0.0, 7) == 7


def _run(mod, args):
    from cachefit.codegen.pipeline import compile_relax

    ex = compile_relax(mod, tvm.target.Target({"kind": "llvm"}), threads=1)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def _gelu(v):
    from math import erf

    return 0.5 * v * (1 + np.vectorize(erf)(v / np.sqrt(2)))


def test_pruned_module_matches_numpy_pruning():
    """The compiled pruned module equals numpy on weights pruned the same way (units chosen in
    the test, independently of the pass)."""
    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((8, 6)).astype(np.float32), "b1": rng.standard_normal(6).astype(np.float32),
              "w2": rng.standard_normal((6, 8)).astype(np.float32), "b2": rng.standard_normal(8).astype(np.float32)}
    x = rng.standard_normal((4, 8)).astype(np.float32)
    out, new, done = prune_weights(Mlp, params, 1 / 3)
    score = np.linalg.norm(params["w1"], axis=0) * np.linalg.norm(params["w2"], axis=1)
    keep = np.sort(np.argsort(-score)[:4])
    assert list(done[0].kept) == keep.tolist()
    np.testing.assert_array_equal(new["w1"], params["w1"][:, keep])
    np.testing.assert_array_equal(new["b1"], params["b1"][keep])
    np.testing.assert_array_equal(new["w2"], params["w2"][keep])
    got = _run(out, [x, new["w1"], new["b1"], new["w2"], new["b2"]])
    want = x + _gelu(x @ params["w1"][:, keep] + params["b1"][keep]) @ params["w2"][keep] + params["b2"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@I.ir_module
class Gated:
    """SwiGLU with Gemm(transB) weights: down(silu(x @ Wg.T) * (x @ Wu.T)), no biases."""

    @R.function(private=True)
    def layer_0(x: R.Tensor((2, 8), "float32"), wg: R.Tensor((10, 8), "float32"), wu: R.Tensor((10, 8), "float32"), wd: R.Tensor((8, 10), "float32")) -> R.Tensor((2, 8), "float32"):
        R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "layers.0"})
        with R.dataflow():
            g = R.matmul(x, R.permute_dims(wg, axes=[1, 0]))
            u = R.matmul(x, R.permute_dims(wu, axes=[1, 0]))
            a = R.multiply(R.nn.silu(g), u)
            gv = R.matmul(a, R.permute_dims(wd, axes=[1, 0]))
            R.output(gv)
        return gv

    @R.function
    def main(x: R.Tensor((2, 8), "float32"), wg: R.Tensor((10, 8), "float32"), wu: R.Tensor((10, 8), "float32"), wd: R.Tensor((8, 10), "float32")) -> R.Tensor((2, 8), "float32"):
        R.func_attr({"num_input": 1})
        cls = Gated
        with R.dataflow():
            gv = cls.layer_0(x, wg, wu, wd)
            R.output(gv)
        return gv


def test_gated_mlp_with_transposed_weights():
    """Both gates lose the same rows (Gemm transB layout [F, K]); down loses the same columns;
    the score multiplies the norms of every fc1."""
    rng = np.random.default_rng(1)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in (("wg", (10, 8)), ("wu", (10, 8)), ("wd", (8, 10)))}
    pairs = find_mlp_pairs(Gated)
    assert len(pairs) == 1 and pairs[0].fc1 == (("wg", "nk"), ("wu", "nk")) and pairs[0].fc2 == ("wd", "nk")
    out, new, _ = prune_weights(Gated, params, 0.3)
    score = (np.linalg.norm(params["wg"], axis=1) * np.linalg.norm(params["wu"], axis=1)
             * np.linalg.norm(params["wd"], axis=0))
    keep = np.sort(np.argsort(-score)[:7])
    assert new["wg"].shape == (7, 8) and new["wd"].shape == (8, 7)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    got = _run(out, [x, new["wg"], new["wu"], new["wd"]])
    g, u = x @ params["wg"][keep].T, x @ params["wu"][keep].T
    want = (g / (1 + np.exp(-g)) * u) @ params["wd"][:, keep].T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@I.ir_module
class Escaping:
    """The hidden activation is also an output of the layer: its units cannot be removed."""

    @R.function(private=True)
    def layer_0(x: R.Tensor((4, 8), "float32"), w1: R.Tensor((8, 6), "float32"), w2: R.Tensor((6, 8), "float32")) -> R.Tuple(R.Tensor((4, 8), "float32"), R.Tensor((4, 6), "float32")):
        R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "layers.0"})
        with R.dataflow():
            h = R.nn.relu(R.matmul(x, w1))
            y = R.matmul(h, w2)
            gv = (y, h)
            R.output(gv)
        return gv

    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w1: R.Tensor((8, 6), "float32"), w2: R.Tensor((6, 8), "float32")) -> R.Tuple(R.Tensor((4, 8), "float32"), R.Tensor((4, 6), "float32")):
        R.func_attr({"num_input": 1})
        cls = Escaping
        with R.dataflow():
            gv = cls.layer_0(x, w1, w2)
            R.output(gv)
        return gv


def test_pairs_that_cannot_be_pruned_are_left_alone():
    assert find_mlp_pairs(Escaping) == []
    assert PruneWeights({}, 0.5)(Escaping).same_as(Escaping)
    with pytest.raises(CachefitError, match="not a fraction"):
        PruneWeights({}, 1.0)


def test_moe_experts_are_pruned_per_expert(analyzed):
    """Each expert of moe-tiny is its own pair (4 layers x 4 experts); the router is untouched."""
    a = analyzed("moe-tiny")
    pairs = find_mlp_pairs(a.mod)
    assert len(pairs) == 16
    assert {p.fc1[0][0] for p in pairs if p.layer == 2} == {f"layers_2_moe_experts_{e}_fc1_weight" for e in range(4)}
    out, params, done = prune_weights(a.mod, a.params, 0.25, layers=["layers.1"])
    assert {d.layer for d in done} == {1} and all(d.hidden_after == 192 for d in done)
    assert params["layers_1_moe_experts_3_fc2_weight"].shape == (192, 128)
    assert params["layers_1_moe_router_weight"].shape == (128, 4)
    assert params["layers_0_moe_experts_0_fc1_weight"].shape == (128, 256)


def test_dense_flops_and_bytes_drop_by_the_ratio(analyzed):
    """dense-tiny at ratio 0.5: each layer's weight bytes drop by half of its MLP weights (fc1, its
    bias, fc2) and its FLOPs by half of the MLP's (two 32x160x640 matmuls and six element-wise ops
    on the [32, 640] hidden activation)."""
    a = analyzed("dense-tiny")
    mod, _params, done = prune_weights(a.mod, a.params, 0.5)
    assert len(done) == 4
    records = layer_records(run_pass(AnnotateFootprint(), mod))
    mlp_bytes = (160 * 640 + 640 + 640 * 160) * 4
    mlp_flops = 2 * (2 * 32 * 160 * 640) + 6 * 32 * 640
    for old, new in zip(a.layers, records):
        assert old.weight_bytes - new.weight_bytes == mlp_bytes // 2
        assert old.flops - new.flops == mlp_flops // 2
        assert new.activation_bytes < old.activation_bytes


def test_compiled_pruned_dense_model_matches_numpy_pruning_in_onnxruntime(analyzed, tmp_path):
    """Acceptance: ``compile --prune 0.5`` of dense-tiny runs and equals onnxruntime on the ONNX
    model whose MLP weights were pruned in numpy (units by the norm-product score)."""
    import onnx
    from onnx import numpy_helper

    from cachefit.compiler import compile_model, reference_outputs
    from cachefit.models import build
    from cachefit.runtime import load

    model = build("dense-tiny")
    a = analyzed("dense-tiny")
    res = compile_model(model, out_dir=tmp_path / "pruned", cache="64MB", threads=1, analysis=a, prune=0.5)
    assert res.fit is not None and len(res.fit.pruned) == 4
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    inits = {t.name: t for t in pruned.graph.initializer}
    for i in range(4):
        w1 = numpy_helper.to_array(inits[f"layers.{i}.mlp.fc1.weight"])
        b1 = numpy_helper.to_array(inits[f"layers.{i}.mlp.fc1.bias"])
        w2 = numpy_helper.to_array(inits[f"layers.{i}.mlp.fc2.weight"])
        score = np.linalg.norm(w1.astype(np.float64), axis=0) * np.linalg.norm(w2.astype(np.float64), axis=1)
        keep = np.sort(np.argsort(-score, kind="stable")[:320])
        for name, arr in ((f"layers.{i}.mlp.fc1.weight", w1[:, keep]), (f"layers.{i}.mlp.fc1.bias", b1[keep]),
                          (f"layers.{i}.mlp.fc2.weight", w2[keep])):
            inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
    del pruned.graph.value_info[:]   # intermediate shapes of the unpruned model
    onnx.save(pruned, str(tmp_path / "pruned.onnx"))
    x = np.random.default_rng(7).standard_normal((2, 16, 160)).astype(np.float32)
    want = reference_outputs(tmp_path / "pruned.onnx", {"x": x})["y"]
    got = load(res.artifact_dir).run({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert res.analysis.layers[0].weight_bytes == a.layers[0].weight_bytes - (160 * 640 + 640 + 640 * 160) * 2


@I.ir_module
class Flattened:
    """GPT-2's Gemm export: the hidden activation is reshaped [16, F] <-> [1, 16, F] between fc1
    and fc2 (the hidden axis stays last)."""

    @R.function(private=True)
    def layer_0(x: R.Tensor((16, 8), "float32"), w1: R.Tensor((8, 6), "float32"), b1: R.Tensor((6,), "float32"), w2: R.Tensor((6, 8), "float32")) -> R.Tensor((16, 8), "float32"):
        R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "layers.0"})
        with R.dataflow():
            h = R.add(R.matmul(x, w1), b1)
            h3 = R.reshape(h, R.shape([1, 16, 6]))
            t = R.multiply(R.tanh(h3), h3)
            h2 = R.reshape(t, R.shape([16, 6]))
            gv = R.matmul(h2, w2)
            R.output(gv)
        return gv

    @R.function
    def main(x: R.Tensor((16, 8), "float32"), w1: R.Tensor((8, 6), "float32"), b1: R.Tensor((6,), "float32"), w2: R.Tensor((6, 8), "float32")) -> R.Tensor((16, 8), "float32"):
        R.func_attr({"num_input": 1})
        cls = Flattened
        with R.dataflow():
            gv = cls.layer_0(x, w1, b1, w2)
            R.output(gv)
        return gv


def test_reshapes_on_the_hidden_path_shrink_too():
    """The reshapes' target shapes follow the pruned hidden size; the numbers match numpy."""
    rng = np.random.default_rng(4)
    params = {"w1": rng.standard_normal((8, 6)).astype(np.float32), "b1": rng.standard_normal(6).astype(np.float32),
              "w2": rng.standard_normal((6, 8)).astype(np.float32)}
    out, new, done = prune_weights(Flattened, params, 0.5)
    assert len(done) == 1 and done[0].hidden_after == 3
    shapes = [tuple(int(d) for d in b.var.ty.shape) for b in out["layer_0"].body.blocks[0].bindings]
    assert (1, 16, 3) in shapes and (16, 3) in shapes
    keep = np.array(done[0].kept)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    got = _run(out, [x, new["w1"], new["b1"], new["w2"]])
    h = x @ params["w1"][:, keep] + params["b1"][keep]
    np.testing.assert_allclose(got, (np.tanh(h) * h) @ params["w2"][keep], rtol=1e-4, atol=1e-4)


def test_exported_gpt2_mlps_are_found(analyzed):
    """The transformers GPT-2 export (Gemm-style reshapes, GELU-tanh with pow) has one pair per block."""
    a = analyzed("gpt2_dynamo.onnx")
    pairs = find_mlp_pairs(a.mod)
    assert [p.layer for p in pairs] == [1, 2, 3] and all(p.reshapes for p in pairs)


# ---------------------------------------------------------------------------------------------
# attention heads
# ---------------------------------------------------------------------------------------------


def test_dense_attention_heads_are_found(analyzed):
    """dense-tiny: one attention per block, 4 heads of 40; Q/K/V columns and biases and O rows are
    sliced per head (40 consecutive entries), O along its reduction axis."""
    from cachefit.passes.prune_weights import HeadLayout, find_attention_heads

    atts = find_attention_heads(analyzed("dense-tiny").mod)
    assert [(t.layer, t.units, t.heads, t.head_dim) for t in atts] == [(i, 4, 4, 40) for i in range(4)]
    w = {n: (ax, lay) for n, ax, lay in atts[2].weights}
    p = "layers_2_attn_"
    assert w == {p + "q_proj_weight": (1, HeadLayout(1, (40,))), p + "k_proj_weight": (1, HeadLayout(1, (40,))),
                 p + "v_proj_weight": (1, HeadLayout(1, (40,))), p + "q_proj_bias": (0, HeadLayout(0, (40,))),
                 p + "k_proj_bias": (0, HeadLayout(0, (40,))), p + "v_proj_bias": (0, HeadLayout(0, (40,))),
                 p + "o_proj_weight": (0, HeadLayout(0, (40,)))}
    assert atts[2].reduced == (p + "o_proj_weight",)
    # a fused QKV layout: head 1 of 2 owns entries 2-3, 6-7 and 10-11 of a [12] axis
    assert HeadLayout(0, (2, 2, 2)).indices(2, [1]).tolist() == [2, 3, 6, 7, 10, 11]


def _fewer_heads_onnx(model, keep_of, heads, head_dim, batch, seq):
    """The dense reference model with only the heads ``keep_of[i]`` of block i, built in numpy:
    Q/K/V columns and biases, O rows taken, and the attention's reshape constants rewritten."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    for i, keep in keep_of.items():
        cols = np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim) for h in keep])
        for n in "qkv":
            for leaf, axis in (("weight", 1), ("bias", 0)):
                name = f"layers.{i}.attn.{n}_proj.{leaf}"
                arr = np.take(numpy_helper.to_array(inits[name]), cols, axis=axis)
                inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        name = f"layers.{i}.attn.o_proj.weight"
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[name])[cols]), name))
    hidden = heads * head_dim
    for node in m.graph.node:
        if node.op_type != "Constant" or "/attn/" not in node.name:
            continue
        v = numpy_helper.to_array(node.attribute[0].t)
        k = len(keep_of[int(node.name.split("/")[1].split(".")[1])])
        if v.dtype == np.int64 and v.tolist() == [batch, seq, heads, head_dim]:
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array([batch, seq, k, head_dim], np.int64)))
        elif v.dtype == np.int64 and v.tolist() == [batch, seq, hidden]:
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array([batch, seq, k * head_dim], np.int64)))
    del m.graph.value_info[:]
    return m


@pytest.mark.slow
def test_compiled_head_pruned_dense_model_matches_an_onnx_model_with_fewer_heads(analyzed, tmp_path):
    """Acceptance: ``compile(prune_heads=0.5)`` of dense-tiny runs and equals onnxruntime on an ONNX
    model with 2 heads per block, built in numpy (heads by the product of the L2 norms of their
    Q, K, V columns and O rows). Weight bytes drop by exactly half of Q/K/V/O and their Q/K/V
    biases; the FLOPs and bytes equal those of the smaller model analysed on its own."""
    import onnx
    from onnx import numpy_helper

    from cachefit.analysis import analyze_onnx
    from cachefit.compiler import compile_model, reference_outputs
    from cachefit.models import build
    from cachefit.runtime import load

    model = build("dense-tiny")
    a = analyzed("dense-tiny")
    res = compile_model(model, out_dir=tmp_path / "heads", cache="64MB", threads=1, analysis=a, prune_heads=0.5)
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    keep_of = {}
    for i in range(4):
        w = {n: inits[f"layers.{i}.attn.{n}_proj.weight"] for n in "qkvo"}
        score = [np.prod([np.linalg.norm(w[n][:, h * 40:(h + 1) * 40]) for n in "qkv"])
                 * np.linalg.norm(w["o"][h * 40:(h + 1) * 40]) for h in range(4)]
        keep_of[i] = np.sort(np.argsort(-np.array(score), kind="stable")[:2])
    assert [d["kept_units"] for d in res.fit.pruned] == [keep_of[i].tolist() for i in range(4)]
    assert [(d["heads_before"], d["heads_after"]) for d in res.fit.pruned] == [(4, 2)] * 4
    small = _fewer_heads_onnx(model, keep_of, 4, 40, 2, 16)
    onnx.save(small, str(tmp_path / "small.onnx"))
    x = np.random.default_rng(7).standard_normal((2, 16, 160)).astype(np.float32)
    want = reference_outputs(tmp_path / "small.onnx", {"x": x})["y"]
    got = load(res.artifact_dir).run({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    b = analyze_onnx(tmp_path / "small.onnx")
    attn = (4 * 160 * 160 + 3 * 160) * 4
    for old, new, ref in zip(a.layers, res.analysis.layers, b.layers):
        assert old.weight_bytes - new.weight_bytes == attn // 2
        assert (new.weight_bytes, new.flops, new.activation_bytes) == (ref.weight_bytes, ref.flops, ref.activation_bytes)
    # the attention's FLOPs (4 projections, scores and context) halve
    proj = 4 * 2 * 32 * 160 * 160
    bmm = 2 * (2 * 2 * 4 * 16 * 16 * 40)
    assert a.layers[0].flops - res.analysis.layers[0].flops >= (proj + bmm) // 2


def _run_layered(mod, params, feeds):
    main = mod["main"]
    n = int(main.attrs["num_input"])
    args = [feeds[p.name] for p in main.params[:n]] + [params[p.name] for p in main.params[n:]]
    return _run(mod, args)


def _zero_heads_reference(name, a, done, feeds):
    """onnxruntime on the original export with the rows of the output projection that belong to
    the removed heads set to zero: a head whose output rows are zero contributes nothing, so this
    is the model without those heads."""
    import onnx
    from onnx import numpy_helper

    from cachefit.compiler import reference_outputs
    from tests.conftest import DATA_DIR

    m = onnx.load(str(DATA_DIR / name))
    inits = {t.name: t for t in m.graph.initializer}
    orig = a.imported.original_names
    for d in done:
        for wname, rows in d.reduced:
            t = inits[orig.get(wname, wname)]
            arr = numpy_helper.to_array(t).copy()
            mask = np.ones(arr.shape[0], bool)
            mask[list(rows)] = False
            arr[mask] = 0
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(m, str(Path(tmp) / "z.onnx"))
        return next(iter(reference_outputs(Path(tmp) / "z.onnx", feeds).values()))


@pytest.mark.slow
@pytest.mark.parametrize("name,units,kept_rows", [("gpt2_legacy.onnx", 4, 32), ("llama_dynamo.onnx", 2, 32)])
def test_exported_models_heads_are_pruned(analyzed, name, units, kept_rows):
    """Real exports: GPT-2 (one fused QKV projection split in three: each head owns a slice of
    each third) and Llama (rotary embeddings, GQA with 4 query heads over 2 key/value heads, so a
    whole key/value group goes). Half the units are removed; the pruned module equals onnxruntime
    on the original export whose output-projection rows of the removed heads are zero."""
    from cachefit.passes.prune_weights import find_attention_heads

    a = analyzed(name)
    atts = find_attention_heads(a.mod)
    assert len(atts) == (3 if "gpt2" in name else 4) and all(t.units == units and t.heads == 4 for t in atts)
    mod, params, done = prune_weights(a.mod, a.params, 0.0, heads=0.5)
    assert all(d.heads_after == 2 and len(d.kept) == units // 2 for d in done)
    assert all(len(rows) == kept_rows for d in done for _, rows in d.reduced)
    if "gpt2" in name:
        w = params["transformer_h_0_attn_c_attn_weight"]
        assert w.shape == (64, 96) and params["transformer_h_0_attn_c_attn_bias"].shape == (96,)
    ids = np.random.default_rng(3).integers(0, 100, size=(1, 16)).astype(np.int64)
    got = _run_layered(mod, params, {"input_ids": ids})
    want = _zero_heads_reference(name, a, done, {"input_ids": ids})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    old = sum(r.weight_bytes for r in a.layers)
    new = sum(r.weight_bytes for r in layer_records(run_pass(AnnotateFootprint(), mod)))
    attn = sum(int(np.prod(a.params[n].shape)) * 4 for t in atts for n, _, _ in t.weights)
    assert old - new == attn // 2


def test_heads_that_cannot_be_followed_are_refused_by_name():
    """A layer whose head axis leaves the layer raises HeadsNotFound naming the layer and why;
    without --prune-heads the same module is left alone."""
    from cachefit.passes.prune_weights import HeadsNotFound

    with pytest.raises(HeadsNotFound, match=r"layer layers\.0: gv, which carries the heads, leaves the layer"):
        prune_weights(HeadsLeave, {}, 0.0, heads=0.5)
    assert prune_weights(HeadsLeave, {}, 0.0)[0].same_as(HeadsLeave)
    with pytest.raises(CachefitError, match="prune-heads 1.0 is not a fraction"):
        PruneWeights({}, 0.0, heads=1.0)
