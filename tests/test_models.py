"""Reference model generators (cachefit.models): structure, numerics, shape-only paper presets."""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from cachefit import models
from cachefit.errors import CachefitError

TINY = ["mlp-tiny", "dense-tiny", "moe-tiny"]
PAPER = ["paper-dense", "paper-dense-30b", "paper-moe"]

# Hand-computed parameter counts (see the formulas in cachefit/models/__init__.py).
# mlp-tiny:   6 * (512^2 + 512)
# dense-tiny: 4 * (4*160^2 + 4*160 + 4*160 + 2*160*640 + 640 + 160)
# moe-tiny:   4 * (4*128^2 + 4*128 + 4*128 + 128*4 + 4*(2*128*256 + 256 + 128))
EXPECTED_PARAMS = {
    "mlp-tiny": 1_575_936,
    "dense-tiny": 1_237_120,
    "moe-tiny": 1_323_008,
    "paper-dense": 16 * (4 * 8192**2 + 8 * 8192 + 2 * 8192 * 32768 + 32768 + 8192),
    "paper-dense-30b": 16 * (4 * 16384**2 + 8 * 16384 + 2 * 16384 * 32768 + 32768 + 16384),
    "paper-moe": 16 * (4 * 8192**2 + 8 * 8192 + 8192 * 8 + 8 * (2 * 8192 * 4096 + 4096 + 8192)),
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

SCOPE = re.compile(r"^/(?:layers\.(\d+)|(embed)|(head))/")


def _input_feed(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = models.model_params(model)
    feed = {}
    for inp in model.graph.input:
        tt = inp.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        if tt.elem_type == TensorProto.INT64:
            feed[inp.name] = rng.integers(0, params["vocab"], shape, dtype=np.int64)
        else:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def _run_ort(model: onnx.ModelProto, feed: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feed)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# --- numpy references ---------------------------------------------------------------------------

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _np_ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _np_act(x, kind):
    return np.maximum(x, 0) if kind == "relu" else 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_linear(W, prefix, x):
    y = x @ W[prefix + ".weight"]
    return y + W[prefix + ".bias"] if prefix + ".bias" in W else y


def _np_gates(logits: np.ndarray, k: int) -> np.ndarray:
    """Sparse top-k routing: softmax over the k largest logits of each token, zero elsewhere."""
    top = np.argsort(-logits, axis=-1)[..., :k]
    gates = np.zeros_like(logits)
    sel = np.take_along_axis(logits, top, -1)
    np.put_along_axis(gates, top, _np_softmax(sel), -1)
    return gates


def _np_transformer(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """A float64 forward pass of a dense or MoE model built from its own initializers."""
    p = models.model_params(model)
    W = {k: v.astype(np.float64) for k, v in _weights(model).items()}
    B, S, H = p["batch"], p["seq"], p["heads"]
    D = p["hidden"] // H
    x = x.astype(np.float64)
    for i in range(p["layers"]):
        pre = f"layers.{i}"
        h = _np_ln(x, W[f"{pre}.ln1.weight"], W[f"{pre}.ln1.bias"])
        q, k, v = (_np_linear(W, f"{pre}.attn.{n}_proj", h).reshape(B, S, H, D).transpose(0, 2, 1, 3)
                   for n in "qkv")
        probs = _np_softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(D))
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(B, S, H * D)
        x = x + _np_linear(W, f"{pre}.attn.o_proj", ctx)
        h = _np_ln(x, W[f"{pre}.ln2.weight"], W[f"{pre}.ln2.bias"])
        if p["family"] == "dense":
            m = _np_linear(W, f"{pre}.mlp.fc2", _np_act(_np_linear(W, f"{pre}.mlp.fc1", h), p["activation"]))
        else:
            gates = _np_gates(h @ W[f"{pre}.moe.router.weight"], p["top_k"])
            m = np.zeros_like(x)
            for e in range(p["experts"]):
                ex = f"{pre}.moe.experts.{e}"
                y = _np_linear(W, f"{ex}.fc2", _np_act(_np_linear(W, f"{ex}.fc1", h), p["activation"]))
                m += y * gates[..., e:e + 1]
        x = x + m
    return x


# --- tiny presets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_is_valid_onnx_and_runs_in_onnxruntime(name):
    """Tiny presets pass the full checker (IR 9, opset 17) and run in onnxruntime with finite output."""
    model = models.build(name)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 9
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert not models.is_shape_only(model)
    p = models.model_params(model)
    (out,) = _run_ort(model, _input_feed(model))
    want = [p["batch"], p["hidden"]] if name == "mlp-tiny" else [p["batch"], p["seq"], p["hidden"]]
    assert list(out.shape) == want
    assert np.isfinite(out).all() and np.abs(out).max() > 1e-2


@pytest.mark.parametrize("name,overrides", [(n, {}) for n in TINY] + [
    ("dense-tiny", {"vocab": 64}),
    ("moe-tiny", {"vocab": 64, "tie_embeddings": True}),
])
def test_every_node_is_in_exactly_one_layer_scope_in_order(name, overrides):
    """Every node is named /layers.i/, /embed/ or /head/; scopes appear contiguously in execution
    order (embed, layers.0..L-1, head) and each weight is read only inside its own scope."""
    model = models.build(name, **overrides)
    p = models.model_params(model)
    seen: list[str] = []
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names)
    scope_of_node = {}
    for node in model.graph.node:
        m = SCOPE.match(node.name)
        assert m, f"node {node.name!r} ({node.op_type}) is outside every layer scope"
        scope = f"layers.{m.group(1)}" if m.group(1) is not None else (m.group(2) or m.group(3))
        if not seen or seen[-1] != scope:
            assert scope not in seen, f"scope {scope} is split around {node.name}"
            seen.append(scope)
        scope_of_node[node.name] = scope
    assert seen == p["layer_names"]
    expected = [f"layers.{i}" for i in range(p["layers"])]
    if p.get("vocab"):
        expected = ["embed", *expected, "head"]
    assert seen == expected
    # weights: read only by nodes of the scope they are named after (tied embedding: embed + head)
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for i in node.input:
            readers.setdefault(i, set()).add(scope_of_node[node.name])
    for init in model.graph.initializer:
        owner = re.match(r"^(layers\.\d+|embed|head)\.", init.name).group(1)
        allowed = {"embed", "head"} if init.name == "embed.weight" and p.get("tie_embeddings") else {owner}
        assert readers[init.name] <= allowed and owner in readers[init.name], init.name
    # no integer constant is an initializer: shapes are Constant nodes inside their layer
    assert all(t.data_type != TensorProto.INT64 for t in model.graph.initializer)


def test_node_names_follow_the_torch_legacy_exporter():
    """Names as the layer-discovery pass expects them (/layers.3/attn/q_proj/MatMul, ...)."""
    dense = {n.name for n in models.build("dense-tiny", vocab=32).graph.node}
    for want in ["/embed/Gather", "/layers.3/attn/q_proj/MatMul", "/layers.3/attn/q_proj/Add",
                 "/layers.3/attn/o_proj/MatMul", "/layers.3/attn/Softmax", "/layers.3/attn/MatMul_1",
                 "/layers.3/ln1/LayerNormalization", "/layers.3/mlp/fc1/MatMul", "/layers.3/mlp/act/Erf",
                 "/layers.3/mlp/fc2/MatMul", "/layers.3/Add", "/layers.3/Add_1",
                 "/head/norm/LayerNormalization", "/head/MatMul"]:
        assert want in dense, want
    moe = {n.name for n in models.build("moe-tiny").graph.node}
    for e in range(4):
        assert f"/layers.2/moe/experts.{e}/fc1/MatMul" in moe
        assert f"/layers.2/moe/experts.{e}/Mul" in moe
    for want in ["/layers.2/moe/router/MatMul", "/layers.2/moe/TopK", "/layers.2/moe/Softmax", "/layers.2/moe/Sum"]:
        assert want in moe, want
    mlp = {n.name for n in models.build("mlp-tiny").graph.node}
    assert {"/layers.5/fc/MatMul", "/layers.5/fc/Add", "/layers.5/act/Relu"} <= mlp


@pytest.mark.parametrize("name", TINY + PAPER)
def test_parameter_counts(name):
    """num_params (formula), the initializers' dims and the metadata agree with the hand counts."""
    model = models.build(name)
    p = models.model_params(model)
    n = EXPECTED_PARAMS[name]
    assert models.num_params(name) == n
    assert models.count_params(model) == n
    assert p["num_params"] == n
    assert p["weight_bytes"] == n * DTYPE_BYTES[p["dtype"]]
    assert p["family"] == models.PRESETS[name]["family"] and p["preset"] == name
    assert p["layers"] == models.PRESETS[name]["layers"]


def test_tiny_layers_fit_2mb_but_models_do_not():
    """Each tiny layer is under a 2 MB budget, the whole model needs several stages."""
    for name in TINY:
        p = models.resolve(name)
        per_layer = models.num_params(name) // p["layers"] * 4
        assert per_layer < 2_000_000 and per_layer * p["layers"] > 2 * 2_000_000


def test_moe_active_params():
    """moe-tiny reads the router and 2 of 4 experts per token; dense models read everything."""
    per_expert = 2 * 128 * 256 + 256 + 128
    assert models.active_params("moe-tiny") == EXPECTED_PARAMS["moe-tiny"] - 4 * 2 * per_expert
    assert models.active_params("dense-tiny") == EXPECTED_PARAMS["dense-tiny"]


@pytest.mark.parametrize("name", ["dense-tiny", "moe-tiny"])
def test_onnxruntime_matches_numpy_reference(name):
    """The graph computes the documented transformer (float64 numpy re-implementation)."""
    model = models.build(name)
    feed = _input_feed(model)
    (out,) = _run_ort(model, feed)
    ref = _np_transformer(model, feed["x"])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_mlp_matches_numpy_reference():
    model = models.build("mlp-tiny")
    feed = _input_feed(model)
    (out,) = _run_ort(model, feed)
    W = _weights(model)
    ref = feed["x"].astype(np.float64)
    for i in range(6):
        ref = np.maximum(_np_linear(W, f"layers.{i}.fc", ref), 0)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("experts,top_k", [(4, 2), (4, 1), (5, 3), (4, 4)])
def test_moe_router_selects_top_k(experts, top_k):
    """The router's gates are a softmax over exactly the k largest logits of each token, zero elsewhere."""
    model = models.build("moe", layers=1, experts=experts, top_k=top_k, seq=8)
    nodes = {n.name: n for n in model.graph.node}
    ln2 = nodes["/layers.0/ln2/LayerNormalization"].output[0]
    gates = nodes["/layers.0/moe/Softmax"].output[0]
    model.graph.output.extend([onnx.helper.make_empty_tensor_value_info(ln2),
                               onnx.helper.make_empty_tensor_value_info(gates)])
    feed = _input_feed(model, seed=7)
    h, g = _run_ort(model, feed, [ln2, gates])
    logits = h.astype(np.float64) @ _weights(model)["layers.0.moe.router.weight"].astype(np.float64)
    ref = _np_gates(logits, top_k)
    assert ((g > 0).sum(-1) == top_k).all()
    np.testing.assert_array_equal(g > 0, ref > 0)
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.sum(-1), 1.0, rtol=1e-5)


def test_vocab_and_float16_variants_run():
    """vocab adds input_ids -> logits; float16 models run in onnxruntime and track float32."""
    m = models.build("dense-tiny", vocab=100, layers=2)
    assert [i.name for i in m.graph.input] == ["input_ids"] and [o.name for o in m.graph.output] == ["logits"]
    (logits,) = _run_ort(m, _input_feed(m))
    assert logits.shape == (2, 16, 100) and np.isfinite(logits).all()
    f32 = models.build("moe-tiny", layers=2)
    f16 = models.build("moe-tiny", layers=2, dtype="float16")
    assert {t.data_type for t in f16.graph.initializer} == {TensorProto.FLOAT16}
    x = _input_feed(f32)["x"]
    (y32,) = _run_ort(f32, {"x": x})
    (y16,) = _run_ort(f16, {"x": x.astype(np.float16)})
    assert np.abs(y16.astype(np.float32) - y32).max() < 0.05 * np.abs(y32).max()


def test_bfloat16_tiny_materialises_weights():
    m = models.build("dense", layers=1, dtype="bfloat16")
    onnx.checker.check_model(m, full_check=True)
    assert {t.data_type for t in m.graph.initializer} == {TensorProto.BFLOAT16}
    assert all(len(t.raw_data) == 2 * math.prod(t.dims) for t in m.graph.initializer)


# --- TVM agreement --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_tvm_matches_onnxruntime(name):
    """TVM 0.27's Relax ONNX importer + LLVM build computes what onnxruntime computes (TopK included)."""
    import tvm
    import tvm.relax.frontend.onnx  # noqa: F401
    from tvm import relax

    model = models.build(name)
    feed = _input_feed(model)
    (ref,) = _run_ort(model, feed)
    mod = tvm.relax.frontend.onnx.from_onnx(model)
    ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(feed["x"])).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# --- paper presets --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_are_shape_only_and_small(name, tmp_path):
    """Paper presets declare every weight as external data that is never written; the saved
    file is small, reloads without data, and passes the checker next to an (empty) data file."""
    model = models.build(name)
    p = models.model_params(model)
    assert models.is_shape_only(model) and p["shape_only"] is True
    offset = 0
    for t in model.graph.initializer:
        assert t.data_location == TensorProto.EXTERNAL
        assert not t.raw_data and not t.float_data and not t.int32_data
        ext = {e.key: e.value for e in t.external_data}
        assert ext["location"] == f"{name}.weights.bin"
        assert int(ext["offset"]) == offset
        offset += int(ext["length"])
        assert int(ext["length"]) == math.prod(t.dims) * DTYPE_BYTES[p["dtype"]]
    assert offset == EXPECTED_PARAMS[name] * DTYPE_BYTES[p["dtype"]]

    path = models.export(name, tmp_path / f"{name}.onnx")
    assert path.stat().st_size < 10_000_000
    loaded = onnx.load(str(path), load_external_data=False)
    assert models.is_shape_only(loaded) and models.count_params(loaded) == EXPECTED_PARAMS[name]
    (tmp_path / f"{name}.weights.bin").touch()
    onnx.checker.check_model(str(path), full_check=True)


def test_paper_shapes_are_inferred():
    """Shape inference gives the documented activation shapes (value_info is stored)."""
    m = models.build("paper-dense-30b")
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.value_info}
    node = {n.name: n for n in m.graph.node}
    assert shapes[node["/layers.0/attn/Softmax"].output[0]] == [128, 128, 10000, 10000]
    assert shapes[node["/layers.15/mlp/fc1/MatMul"].output[0]] == [128, 10000, 32768]
    pm = models.build("paper-moe")
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in pm.graph.value_info}
    node = {n.name: n for n in pm.graph.node}
    assert shapes[node["/layers.0/moe/router/MatMul"].output[0]] == [1024, 1, 8]
    assert shapes[node["/layers.0/moe/experts.7/fc1/MatMul"].output[0]] == [1024, 1, 4096]


# --- API behaviour --------------------------------------------------------------------------------

def test_family_build_with_overrides_and_metadata():
    m = models.build("dense", layers=2, hidden=128, heads=8, ffn=256, batch=4, seq=3, dtype="float16", seed=5)
    p = models.model_params(m)
    assert (p["family"], p["layers"], p["hidden"], p["heads"], p["ffn"], p["batch"], p["seq"], p["dtype"], p["seed"]) == (
        "dense", 2, 128, 8, 256, 4, 3, "float16", 5)
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 128]
    assert p["layer_names"] == ["layers.0", "layers.1"]


def test_seed_controls_weights():
    a, b, c = (models.build("mlp", layers=1, hidden=16, seed=s) for s in (0, 0, 1))
    wa, wb, wc = (_weights(m)["layers.0.fc.weight"] for m in (a, b, c))
    np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(wa, wc)


def test_shape_only_override_and_export_roundtrip(tmp_path):
    so = models.build("moe-tiny", shape_only=True)
    assert models.is_shape_only(so) and models.count_params(so) == EXPECTED_PARAMS["moe-tiny"]
    path = models.export("mlp-tiny", tmp_path / "sub" / "m.onnx", layers=2)
    loaded = onnx.load(str(path))
    assert not models.is_shape_only(loaded)
    np.testing.assert_array_equal(_weights(loaded)["layers.1.fc.bias"], _weights(models.build("mlp-tiny", layers=2))["layers.1.fc.bias"])


@pytest.mark.parametrize("args,kwargs,needle", [
    (("resnet",), {}, "unknown model 'resnet'"),
    (("dense-tiny",), {"experts": 4}, "no parameter 'experts'"),
    (("dense",), {"heads": 7}, "not divisible by heads=7"),
    (("moe",), {"top_k": 5}, "top_k=5 exceeds experts=4"),
    (("dense",), {"dtype": "int8"}, "dtype='int8' unsupported"),
    (("dense",), {"layers": 0}, "layers=0 must be a positive integer"),
    (("dense",), {"activation": "silu"}, "activation='silu'"),
    (("paper-dense",), {"shape_only": False}, "pass shape_only=True"),
])
def test_bad_parameters_are_reported(args, kwargs, needle):
    with pytest.raises(CachefitError, match=re.escape(needle)):
        models.build(*args, **kwargs)


def test_gpt2_init_follows_the_published_scheme():
    """init="gpt2": matrices N(0, 0.02), residual projections (o_proj, fc2, every expert's fc2)
    N(0, 0.02 / sqrt(2 * layers)), biases 0, LayerNorm gains 1 and offsets 0. The default init
    is unchanged (init="default" gives the same bytes), and an unknown init is refused."""
    m = models.build("dense-tiny", init="gpt2")
    w = _weights(m)
    assert models.model_params(m)["init"] == "gpt2"
    for name in ("layers.0.attn.q_proj.weight", "layers.3.mlp.fc1.weight"):
        assert abs(w[name].std() / 0.02 - 1) < 0.03 and abs(w[name].mean()) < 1e-3
    for name in ("layers.1.attn.o_proj.weight", "layers.2.mlp.fc2.weight"):
        assert abs(w[name].std() / (0.02 / math.sqrt(8)) - 1) < 0.03
    assert all(not w[n].any() for n in w if n.endswith("bias"))
    assert all((w[n] == 1).all() for n in w if n.endswith(("ln1.weight", "ln2.weight")))
    moe = _weights(models.build("moe-tiny", init="gpt2"))
    assert abs(moe["layers.0.moe.router.weight"].std() / 0.02 - 1) < 0.1
    assert abs(moe["layers.0.moe.experts.3.fc2.weight"].std() / (0.02 / math.sqrt(8)) - 1) < 0.03
    default = models.build("dense-tiny")
    assert default.SerializeToString() == models.build("dense-tiny", init="default").SerializeToString()
    with pytest.raises(CachefitError, match="init='xavier' unsupported"):
        models.build("dense-tiny", init="xavier")


def test_gpt2_init_branches_are_small_next_to_the_residual():
    """What the init changes: with unit-gain matrices the blocks' updates are most of the output
    (||y - x|| / ||y|| = 0.85 on dense-tiny), with GPT-2's init they are 5% of it."""
    x = np.random.default_rng(100).standard_normal((2, 16, 160)).astype(np.float32)
    ratios = []
    for init in ("default", "gpt2"):
        m = models.build("dense-tiny", init=init)
        y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        ratios.append(np.linalg.norm(y - x) / np.linalg.norm(y))
    assert 0.8 < ratios[0] < 0.9 and 0.03 < ratios[1] < 0.07


def test_cli_models_export_init(tmp_path):
    """`cachefit models export dense-tiny --init gpt2` writes the GPT-2-initialised model."""
    from click.testing import CliRunner

    from cachefit.cli import main

    out = tmp_path / "g.onnx"
    r = CliRunner().invoke(main, ["models", "export", "dense-tiny", "-o", str(out), "--init", "gpt2"])
    assert r.exit_code == 0, r.output
    m = onnx.load(str(out))
    assert models.model_params(m)["init"] == "gpt2"
    assert m.SerializeToString() == models.build("dense-tiny", init="gpt2").SerializeToString()
