"""Layers found on real models: weight accounting, the expected layer lists, merging, explicit
boundaries, and numeric agreement of the layered module with onnxruntime.

Models: the cachefit.models presets, the exported transformers of tests/data (torch's legacy and
dynamo exporters) and the onnx package's light zoo CNNs (no scopes: DiscoverLayers cuts them).
"""

from __future__ import annotations

import collections
import math
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from conftest import EXPORTED, EXPORTED_FILES, FLOAT, LIGHT_CNNS, TINY_PRESETS, load_test_model, make_onnx_model
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from cachefit.analysis import analyze_onnx
from cachefit.frontends.onnx import FLOAT_TYPES
from cachefit.models import build
from cachefit.passes import layering

ELEM_BYTES = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8}
EXPORTED_BY_FILE = {e["file"]: e for e in EXPORTED}

# The light CNNs whose analysis takes over ~10 s here (big fills, hundreds of nodes).
SLOW_CNNS = {"light_densenet121", "light_inception_v2", "light_resnet50", "light_vgg19", "light_zfnet512",
             "light_bvlc_alexnet", "light_inception_v1", "light_shufflenet"}


def _params(name_or_mark):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CNNS else n for n in name_or_mark]


def _unique_params(analysis) -> dict[str, int]:
    """name -> bytes over all layers; a parameter read by several layers must agree on its size."""
    out: dict[str, int] = {}
    for r in analysis.layers:
        for k, v in r.params.items():
            assert out.setdefault(k, v) == v, (k, out[k], v)
    return out


def _float_initializer_bytes(model: onnx.ModelProto, used_only: bool = False) -> dict[str, int]:
    """Bytes of the floating-point initializers, from dims (data may be lazy or external)."""
    used = {x for n in model.graph.node for x in n.input}
    return {t.name: math.prod(t.dims) * ELEM_BYTES[t.data_type] for t in model.graph.initializer
            if t.data_type in FLOAT_TYPES and (not used_only or t.name in used)}


# ---------------------------------------------------------------------------------------------
# Weight accounting
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_PRESETS + EXPORTED_FILES + _params(LIGHT_CNNS))
def test_layer_weights_are_exactly_the_float_initializers(name, analyzed):
    """Summed over the unique parameters of all layers, weight bytes equal the bytes of the
    floating-point initializers of the cleaned model (what was imported), name by name.

    Integer initializers are not weights: they are shape and index constants (Reshape targets,
    Gather indices, Slice bounds, the int64 shapes ConstantOfShape reads); the importer keeps them
    as constants baked into each layer, so no layer stores them as parameters. The light CNNs build
    their weights with ConstantOfShape, which cleanup folds into float initializers - hence the
    comparison with the cleaned model ``analysis.imported.onnx_model``.
    """
    a = analyzed(name)
    params = _unique_params(a)
    cleaned = _float_initializer_bytes(a.imported.onnx_model)
    assert params == cleaned
    assert sum(r.weight_bytes for r in a.layers) >= sum(params.values())  # shared weights counted per layer
    for r in a.layers:
        assert r.weight_bytes == sum(r.params.values())
    # integer initializers never become parameters
    ints = {t.name for t in a.imported.onnx_model.graph.initializer if t.data_type not in FLOAT_TYPES}
    assert not ints & set(params)


# Legacy exports compute the causal mask and the rotary tables from Constant nodes; cleanup folds
# them into float tensors of more than 16 elements, which become (small) parameters. The dynamo
# exports and the presets have no such computation: their parameters are their initializers.
LEGACY_FOLDED_PARAM_BYTES = {
    "bert_legacy.onnx": 0,
    "gpt2_legacy.onnx": 16 * 16 * 4,  # causal mask
    "llama_legacy.onnx": 3 * 16 * 16 * 4,  # causal mask, rotary cos and sin
    "mixtral_legacy.onnx": 3 * 16 * 16 * 4,
}


@pytest.mark.parametrize("name", TINY_PRESETS + EXPORTED_FILES)
def test_layer_weights_match_the_original_files_initializers(name, analyzed):
    """For models with real initializers: every float initializer of the file is a parameter of
    some layer, with the same byte size (looked up by its original name); nothing else is, except
    the float tensors cleanup computes from a legacy export's constants (table above)."""
    a = analyzed(name)
    original = _float_initializer_bytes(load_test_model(name))
    orig_name = a.imported.original_names
    params = {orig_name.get(k, k): v for k, v in _unique_params(a).items()}
    assert {k: params.get(k) for k in original} == original
    extra = {k: v for k, v in params.items() if k not in original}
    assert sum(extra.values()) == LEGACY_FOLDED_PARAM_BYTES.get(name, 0), extra
    if extra:  # computed by cleanup from nodes of the file, not invented
        produced = {o for n in load_test_model(name).graph.node for o in n.output}
        assert set(extra) <= produced


def _fills_and_used_initializers(model: onnx.ModelProto) -> int:
    """Weight bytes of a zoo light CNN counted on the file: float ConstantOfShape fills (shape read
    from their int64 shape initializer) plus the float initializers some node reads."""
    inits = {t.name: t for t in model.graph.initializer}
    total = sum(_float_initializer_bytes(model, used_only=True).values())
    for n in model.graph.node:
        if n.op_type == "ConstantOfShape":
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            dtype = value.data_type if value is not None else TensorProto.FLOAT
            if dtype in FLOAT_TYPES:
                total += int(numpy_helper.to_array(inits[n.input[0]]).prod()) * ELEM_BYTES[dtype]
    return total


# Parameter counts of the zoo architectures (the light files keep the shapes, not the values).
KNOWN_PARAMS = {"light_vgg19": 143_667_240, "light_resnet50": 25_610_152, "light_bvlc_alexnet": 60_965_224}


@pytest.mark.parametrize("name", _params(LIGHT_CNNS))
def test_light_cnn_weights_count_every_fill(name, analyzed):
    """Every weight the file builds with ConstantOfShape is a parameter, however large (VGG19's
    fc6 is 102.8 M elements: it once stayed a run-time ConstantOfShape and its 411 MB went
    uncounted)."""
    a = analyzed(name)
    total = sum(_unique_params(a).values())
    assert total == _fills_and_used_initializers(load_test_model(name))
    if name in KNOWN_PARAMS:
        assert total == 4 * KNOWN_PARAMS[name]
    assert not [n for n in a.imported.onnx_model.graph.node if n.op_type == "ConstantOfShape"]


def test_large_fill_weights_are_lazy_and_right():
    """A fill too large to fold is a parameter whose array is a broadcast view of the fill value."""
    # one 5 M-element fill: over the folding limit (4 M elements)
    shape = numpy_helper.from_array(np.array([2500, 2000], np.int64), "wshape")
    nodes = [helper.make_node("ConstantOfShape", ["wshape"], ["w"], name="fill",
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    m = make_onnx_model(nodes, [("x", FLOAT, [1, 2500])], [("y", FLOAT, [1, 2000])], [shape])
    b = analyze_onnx(m)
    assert b.layers[0].params == {"w": 2500 * 2000 * 4}
    w = b.params["w"]
    assert w.shape == (2500, 2000) and w.dtype == np.float32 and w.strides == (0, 0)
    assert float(w[1234, 567]) == 0.5


# ---------------------------------------------------------------------------------------------
# Which layers are found
# ---------------------------------------------------------------------------------------------


def _per_layer(p: dict) -> int:
    h, f = p["hidden"], p.get("ffn", 0)
    if p["family"] == "mlp":
        return h * h + h
    if p["family"] == "dense":
        return 4 * h * h + 2 * h * f + 9 * h + f
    e = p["experts"]
    return 4 * h * h + 8 * h + h * e + e * (2 * h * f + f + h)


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_presets_give_one_layer_per_block(name, analyzed):
    from cachefit.models import PRESETS, resolve

    a = analyzed(name)
    n = PRESETS[name]["layers"]
    assert a.imported.layer_method == "scopes"
    assert [r.name for r in a.layers] == [f"layers.{i}" for i in range(n)]
    assert [r.weight_bytes for r in a.layers] == [4 * _per_layer(resolve(name))] * n


@pytest.mark.parametrize("family", ["dense", "moe"])
@pytest.mark.parametrize("tied", [False, True])
def test_presets_with_vocab_add_embed_and_head(family, tied):
    p = dict(layers=2, hidden=64, heads=2, ffn=128, seq=8, batch=1, vocab=100, tie_embeddings=tied)
    if family == "moe":
        p.update(experts=2, top_k=1)
    a = analyze_onnx(build(family, **p))
    assert [r.name for r in a.layers] == ["embed", "layers.0", "layers.1", "head"]
    h, v = 64, 100
    assert a.layers[0].weight_bytes == 4 * v * h
    assert a.layers[-1].weight_bytes == 4 * (2 * h + v * h)  # final norm + head (the tied table too)
    shared = set(a.layers[0].params) & set(a.layers[-1].params)
    assert len(shared) == (1 if tied else 0)
    unique = sum(_unique_params(a).values())
    assert unique == sum(r.weight_bytes for r in a.layers) - (4 * v * h if tied else 0)


@pytest.mark.parametrize("name", EXPORTED_FILES)
def test_exported_transformers_give_the_listed_layers(name, analyzed):
    """The layer list of models.json, for both exporters: scopes from node names (legacy) or from
    metadata_props (dynamo). Each block's parameters that name a block index name its own, and
    all blocks are the same size."""
    a = analyzed(name)
    entry = EXPORTED_BY_FILE[name]
    assert a.imported.layer_method == "scopes"
    assert [r.name for r in a.layers] == entry["layers"]
    blocks = [r for r in a.layers if r.name.startswith("layers.")]
    assert len(blocks) == entry["num_blocks"]
    assert len({r.weight_bytes for r in blocks}) == 1
    index = re.compile(r"(?:^|_)(?:layers|layer|h)_(\d+)_")
    for r in blocks:
        own = int(r.name.split(".")[1])
        found = {int(m.group(1)) for k in r.params if (m := index.search(a.imported.original_names.get(k, k).replace(".", "_")))}
        assert found == {own}, (r.name, sorted(r.params))


def _op_counts(fn) -> collections.Counter:
    ops: collections.Counter = collections.Counter()

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            ops[e.op.name] += 1

    relax.analysis.post_order_visit(fn.body, visit)
    return ops


def _heavy(analysis) -> list[tuple[int, int]]:
    """(conv2d count, matmul count) per layer function."""
    out = []
    for _, fn in layering.layer_functions(analysis.mod):
        ops = _op_counts(fn)
        out.append((ops["relax.nn.conv2d"], ops["relax.matmul"]))
    return out


@pytest.mark.slow
def test_resnet50_is_stem_16_bottlenecks_and_head(analyzed):
    """Cut points of ResNet-50: the stem (conv1 + pool), the 3 + 4 + 6 + 3 bottleneck blocks
    (each a residual: one cut per block), and the classifier head."""
    a = analyzed("light_resnet50")
    assert a.imported.layer_method == ""  # no scopes: found by DiscoverLayers
    assert len(a.layers) == 18
    blocks = []
    for n in (3, 4, 6, 3):
        blocks += [(4, 0)] + [(3, 0)] * (n - 1)  # the first block of a stage has the projection shortcut
    assert _heavy(a) == [(1, 0)] + blocks + [(0, 1)]
    # every conv comes with its batch norm's 4 parameters besides its weight
    for (convs, mms), r in zip(_heavy(a), a.layers):
        assert len(r.params) == 5 * convs + 2 * mms


@pytest.mark.slow
def test_vgg19_has_one_conv_or_dense_per_layer(analyzed):
    """VGG-19 is a chain: 16 convolutions and 3 dense layers, each its own layer with its weight
    and bias; the pools and ReLUs join the layer before them."""
    a = analyzed("light_vgg19")
    assert len(a.layers) == 19
    assert _heavy(a) == [(1, 0)] * 16 + [(0, 1)] * 3
    assert [len(r.params) for r in a.layers] == [2] * 19
    assert a.layers[16].weight_bytes == 4 * (25088 * 4096 + 4096)  # fc6


def test_squeezenet_splits_fire_modules_into_squeeze_and_expand(analyzed):
    """SqueezeNet 1.0: conv1, then each of the 8 fire modules as two layers - the squeeze 1x1
    conv, then the two parallel expand convs (1x1 and 3x3, concatenated: the cut after the squeeze
    is the last point where one tensor is live) - then conv10."""
    a = analyzed("light_squeezenet")
    assert len(a.layers) == 18
    assert _heavy(a) == [(1, 0)] + [(1, 0), (2, 0)] * 8 + [(1, 0)]
    for (convs, _), r in zip(_heavy(a), a.layers):
        assert len(r.params) == 2 * convs  # weight and bias per conv
    # one activation crosses every cut
    assert all(r.in_bytes > 0 and r.out_bytes > 0 for r in a.layers)


# ---------------------------------------------------------------------------------------------
# --layers N and --layer-boundaries
# ---------------------------------------------------------------------------------------------


def test_merge_dense_tiny_into_two_layers(analyzed):
    base, merged = analyzed("dense-tiny"), analyzed("dense-tiny", layers=2)
    assert [r.name for r in merged.layers] == ["layers.0..layers.1", "layers.2..layers.3"]
    w = [r.weight_bytes for r in base.layers]
    assert [r.weight_bytes for r in merged.layers] == [w[0] + w[1], w[2] + w[3]]
    assert _unique_params(merged) == _unique_params(base)
    assert len(layering.layer_functions(merged.mod)) == 2


def test_merge_balances_weight_bytes(analyzed):
    """mlp-tiny's 6 equal layers into 4: the largest group holds 2 layers, never 3; MergeLayers'
    tie break (the partitioner's ``late``) puts the two pairs last, so layers.0 stays alone."""
    merged = analyzed("mlp-tiny", layers=4)
    sizes = [r.weight_bytes for r in merged.layers]
    one = analyzed("mlp-tiny").layers[0].weight_bytes
    assert sorted(sizes) == [one, one, 2 * one, 2 * one]
    assert merged.layers[0].name == "layers.0" and merged.layers[-1].name.endswith("layers.5")


@pytest.mark.slow
def test_merge_resnet50_into_four(analyzed):
    base, merged = analyzed("light_resnet50"), analyzed("light_resnet50", layers=4)
    assert len(merged.layers) == 4
    assert _unique_params(merged) == _unique_params(base)
    assert merged.layers[0].name.startswith("cut.0..") and merged.layers[-1].name.endswith("cut.17")
    biggest = max(r.weight_bytes for r in merged.layers)
    total = sum(r.weight_bytes for r in base.layers)
    assert biggest < total / 2


def test_merge_into_as_many_layers_is_unchanged(analyzed):
    a = analyzed("moe-tiny", layers=4)
    assert [r.name for r in a.layers] == [f"layers.{i}" for i in range(4)]


def test_layer_boundaries_by_node_name(analyzed):
    a = analyzed("mlp-tiny", layer_boundaries=["/layers.2/fc/MatMul", "/layers.4/fc/MatMul"])
    assert a.imported.layer_method == "boundaries"
    assert [r.name for r in a.layers] == ["part.0", "part.1", "part.2"]
    assert [sorted(r.params) for r in a.layers] == [
        [f"layers_{i}_fc_{k}" for i in (a0, a0 + 1) for k in ("bias", "weight")] for a0 in (0, 2, 4)
    ]


def test_layer_boundaries_by_tensor_name_with_slashes():
    """Boundaries may name a node's output tensor by its name in the file, slashes included."""
    rng = np.random.default_rng(0)
    ws = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"blk/{i}/w") for i in range(4)]
    nodes, x = [], "in/x"
    for i in range(4):
        nodes.append(helper.make_node("MatMul", [x, f"blk/{i}/w"], [f"blk/{i}/mm"]))
        nodes.append(helper.make_node("Relu", [f"blk/{i}/mm"], [f"blk/{i}/out"]))
        x = f"blk/{i}/out"
    m = make_onnx_model(nodes, [("in/x", FLOAT, [2, 8])], [(x, FLOAT, [2, 8])], ws)
    a = analyze_onnx(m, layer_boundaries=["blk/1/mm", "blk/3/mm"])
    assert [r.name for r in a.layers] == ["part.0", "part.1", "part.2"]
    assert [sorted(a.imported.original_names[k] for k in r.params) for r in a.layers] == [
        ["blk/0/w"], ["blk/1/w", "blk/2/w"], ["blk/3/w"]]
    # without boundaries the unnamed chain is cut at every matmul
    assert len(analyze_onnx(m).layers) == 4


# ---------------------------------------------------------------------------------------------
# Numerics: the layered module against onnxruntime
# ---------------------------------------------------------------------------------------------


def _feed(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feed = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        if tt.elem_type == TensorProto.INT64:
            feed[i.name] = rng.integers(0, 100, shape).astype(np.int64)  # every vocab here is >= 100
        else:
            feed[i.name] = rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return feed


def _layered_outputs(analysis, feed: dict) -> list[np.ndarray]:
    mod = analysis.mod
    ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    main = mod["main"]
    n_in = int(main.attrs["num_input"])
    names = analysis.imported.original_names
    ins = [tvm.runtime.tensor(feed[names.get(p.name, p.name)]) for p in main.params[:n_in]]
    ws = [tvm.runtime.tensor(np.asarray(analysis.params[p.name])) for p in main.params[n_in:]]
    res = vm["main"](*ins, *ws)
    return [res.numpy()] if isinstance(res, tvm.runtime.Tensor) else [r.numpy() for r in res]


def _numeric_cases():
    cases = [pytest.param("dense-tiny", {}, id="dense-tiny")]
    cases += [pytest.param("moe-tiny", {}, id="moe-tiny", marks=pytest.mark.slow),
              pytest.param("mlp-tiny", {"layers": 4}, id="mlp-tiny-merged", marks=pytest.mark.slow)]
    cases += [pytest.param(f, {}, id=f, marks=pytest.mark.slow) for f in EXPORTED_FILES]
    return cases


@pytest.mark.parametrize("name,options", _numeric_cases())
def test_layered_module_matches_onnxruntime(name, options, analyzed):
    """analysis.mod (one private function per layer, main chaining them), built for LLVM and run
    with the weights as inputs, agrees with onnxruntime on the original file within 1e-4 of the
    output's scale, on random inputs."""
    a = analyzed(name, **options)
    assert len(a.layers) > 1 and layering.is_layered(a.mod)
    model = load_test_model(name)
    feed = _feed(model)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    got = _layered_outputs(a, feed)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        scale = float(np.abs(w).max())
        assert scale > 0
        assert float(np.abs(g.astype(np.float64) - w).max()) <= 1e-4 * scale
