"""cachefit.fit: the escalation ladder, micro-batch choice, re-batching, and --fit auto end to end."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from relax_fixtures import HeadsLeave

from cachefit.errors import CachefitError
from cachefit.fit import (
    FitReport,
    LayerFit,
    Recipe,
    candidates,
    choose_micro_batch,
    fit_model,
    layer_bytes,
    rebatch_onnx,
    scaled_bytes,
)
from cachefit.partition.records import LayerRecord
from cachefit.passes.quantize_weights import dequantize_array

# ---------------------------------------------------------------------------------------------
# plain Python
# ---------------------------------------------------------------------------------------------


def test_ladder_order():
    """INT8, INT4, then INT4 with 5% pruning steps up to --max-prune; rungs at or below what the
    global options already apply are skipped."""
    assert candidates(Recipe(), 0.0) == [Recipe(8), Recipe(4)]
    ladder = candidates(Recipe(), 0.2)
    assert ladder == [Recipe(8), Recipe(4), Recipe(4, 0.05), Recipe(4, 0.1), Recipe(4, 0.15), Recipe(4, 0.2)]
    assert candidates(Recipe(8), 0.1) == [Recipe(4), Recipe(4, 0.05), Recipe(4, 0.1)]
    assert candidates(Recipe(4, 0.1), 0.22) == [Recipe(4, 0.15), Recipe(4, 0.2), Recipe(4, 0.22)]
    assert candidates(Recipe(), 0.3, min_prune=0.12) == [Recipe(8), Recipe(4), Recipe(4, 0.15), Recipe(4, 0.2),
                                                         Recipe(4, 0.25), Recipe(4, 0.3)]
    assert [r.rank() for r in ladder] == sorted(r.rank() for r in ladder)
    assert Recipe(4, 0.25).steps() == ["int4", "prune 25%"]


def test_ladder_head_rungs():
    """Head rungs come after the MLP rungs reached --max-prune (INT4 + that + one more whole unit of
    heads per rung), only for layers with heads, exact fractions k/units within --max-prune-heads,
    one unit always kept; without an MLP the head rungs follow INT4 directly; rungs at or below a
    global --prune-heads (as PruneWeights rounds it) are skipped."""
    from cachefit.fit import head_fraction, removed_units

    mlp_only = candidates(Recipe(), 0.1)
    assert candidates(Recipe(), 0.1, head_units=0, max_prune_heads=0.5) == mlp_only
    assert candidates(Recipe(), 0.1, head_units=4, max_prune_heads=0.0) == mlp_only
    ladder = candidates(Recipe(), 0.1, head_units=4, max_prune_heads=0.5)
    assert ladder == mlp_only + [Recipe(4, 0.1, 0.25), Recipe(4, 0.1, 0.5)]
    assert [r.rank() for r in ladder] == sorted(r.rank() for r in ladder)
    assert candidates(Recipe(), 0.1, mlp=False, head_units=4, max_prune_heads=0.5) == [
        Recipe(8), Recipe(4), Recipe(4, 0.0, 0.25), Recipe(4, 0.0, 0.5)]
    # whole heads, rounded down under the max: 12 heads, at most 30% -> 1, 2, 3 heads
    assert [r.heads for r in candidates(Recipe(4), 0.0, head_units=12, max_prune_heads=0.3)] == [
        0.083333, 0.166667, 0.25]
    assert candidates(Recipe(4), 0.0, head_units=4, max_prune_heads=0.2) == []   # a whole head is 25%
    assert candidates(Recipe(4), 0.0, head_units=1, max_prune_heads=0.9) == []   # the last unit stays
    assert candidates(Recipe(4), 0.0, head_units=2, max_prune_heads=0.9) == [Recipe(4, 0.0, 0.5)]  # GQA groups
    # --prune-heads 0.25 of 6 heads removes round(1.5) = 2: the ladder goes on with 3 of 6
    assert removed_units(0.25, 6) == 2
    assert candidates(Recipe(4, 0.5, 0.25), 0.5, head_units=6, max_prune_heads=0.5) == [Recipe(4, 0.5, 0.5)]
    for units in range(1, 65):
        assert all(removed_units(head_fraction(k, units), units) == k for k in range(units))
    assert Recipe(4, 0.5, 0.25).steps() == ["int4", "prune 50%", "prune heads 25%"]


def _rec(w, act, batch=8, name="l"):
    return LayerRecord(name=name, weight_bytes=w, activation_bytes=act, batch=batch)


def test_micro_batch_choice():
    """The largest divisor of the batch whose (linearly scaled) working set fits every layer that
    a smaller batch can help; a layer whose weights alone are too big is ignored."""
    layers = [_rec(100, 800), _rec(300, 200), _rec(2000, 10)]
    assert scaled_bytes(layers[0], 2, "sum") == 100 + 200
    assert choose_micro_batch(layers, 1000, "sum") == 8
    assert choose_micro_batch(layers, 600, "sum") == 4      # 100 + 400
    assert choose_micro_batch(layers, 400, "sum") == 2      # 100 + 200, 300 + 50
    assert choose_micro_batch(layers, 150, "sum") == 1      # nothing helps the second enough
    assert choose_micro_batch([_rec(10, 90, batch=6)], 55, "sum") == 3  # divisors of 6: 6, 3, 2, 1


def test_report_text_and_dict():
    rep = FitReport(mode="auto", capacity_bytes=1000, footprint="exact", batch=8, micro_batch=4,
                    layers=[LayerFit(0, "layers.0", 500, 500, 400, 400, True),
                            LayerFit(1, "layers.1", 3000, 900, 2800, 700, True, ["int4", "micro-batch 4"]),
                            LayerFit(2, "layers.2", 9000, 5000, 8000, 4000, False, ["int4"], 6, ["split it"])])
    text = rep.format_table()
    assert "layer 1 (layers.1): 3.00 KB -> 900 B" in text and "int4, micro-batch 4; fits" in text
    assert "intra-layer split over 6 devices" in text and "split it" in text
    assert "layers.0" not in text
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["fits"] is False and d["layers"][1]["applied"] == ["int4", "micro-batch 4"]


# ---------------------------------------------------------------------------------------------
# a three-layer model whose middle layer (an MLP) is three times over the capacity
# ---------------------------------------------------------------------------------------------


def three_layers(batch=8, hidden=64, ffn=1536):
    from cachefit.models._graph import GraphBuilder

    g = GraphBuilder("float32", np.random.default_rng(0), False, location="three.weights.bin")
    x = g.add_input("x", [batch, hidden])
    with g.scope("layers.0"):
        x = g.activation("relu", g.linear("fc", x, hidden, hidden))
    with g.scope("layers.1"):
        with g.scope("mlp"):
            h = g.linear("fc2", g.activation("gelu", g.linear("fc1", x, hidden, ffn)), ffn, hidden)
        x = g.node("Add", [x, h])
    with g.scope("layers.2"):
        x = g.activation("relu", g.linear("fc", x, hidden, hidden))
    g.add_output(x, "y", [batch, hidden])
    return g.model("three", {})


@pytest.fixture(scope="module")
def three():
    from cachefit.analysis import analyze_onnx

    model = three_layers()
    return model, analyze_onnx(model)


def _with_weights(model, params, quantized):
    """The ONNX model with the weights the compiled model uses: pruned shapes, INT8/INT4 values
    dequantized (the MatMul weights here are [K, N], as quantized)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    q_of = {q["name"]: q for q in quantized}
    for t in out.graph.initializer:
        name = t.name.replace(".", "_")
        if name in q_of:
            q = q_of[name]
            w = dequantize_array(params[q["q_name"]], params[q["scale_name"]], q["bits"], q["k"], q["group_size"])
            t.CopyFrom(numpy_helper.from_array(w.astype(np.float32), t.name))
        elif name in params:
            t.CopyFrom(numpy_helper.from_array(np.asarray(params[name]), t.name))
    return out


def test_three_times_over_capacity_fits_after_fit_auto(three):
    """Acceptance: a layer 3x over the capacity fits after --fit auto; the report says what was
    applied (the least aggressive rung that fits: INT8 and INT4 alone do not, INT4 + some pruning
    does) with the bytes before and after; the other layers are left as they are."""
    model, a = three
    big = layer_bytes(a.layers[1])
    cap = big // 3
    assert all(layer_bytes(r) <= cap for i, r in enumerate(a.layers) if i != 1)
    steps = []
    new, rep = fit_model(a, cap, mode="auto", progress=steps.append)
    assert rep.fits
    l1 = rep.layers[1]
    assert l1.bytes_before == big and l1.bytes_after <= cap == rep.capacity_bytes
    assert l1.applied[0] == "int4" and l1.applied[1].startswith("prune ")
    ratio = float(l1.applied[1].split()[1].rstrip("%")) / 100
    assert 0 < ratio <= 0.5
    # the rung below (5% less pruning) was measured and did not fit
    tried = [s for s in steps if "layer 1" in s]
    assert tried[0].startswith("fit: layer 1 (layers.1) with int8") and "with int4:" in tried[1]
    assert len(tried) >= 3
    assert rep.layers[0].applied == [] and rep.layers[2].applied == []
    assert new.layers[1].weight_bits == 4 and layer_bytes(new.layers[1]) == l1.bytes_after
    assert new.layers[0] == a.layers[0]
    assert "layers_1_mlp_fc1_weight_int4" in new.params and "layers_0_fc_weight" in new.params
    hidden = new.params["layers_1_mlp_fc1_bias"].shape[0]
    assert hidden == 1536 - round(ratio * 1536)
    text = rep.format_table()
    assert "layer 1 (layers.1)" in text and f"int4, prune {ratio:.0%}; fits" in text


def test_fit_none_only_reports(three):
    """--fit none applies nothing: the module is the analysed one, the report lists the fixes."""
    model, a = three
    cap = layer_bytes(a.layers[1]) // 3
    new, rep = fit_model(a, cap, mode="none")
    assert new.mod.same_as(a.mod) and new.params is a.params
    assert not rep.fits and rep.layers[1].applied == [] and rep.layers[1].suggestions
    assert any("INT8" in s for s in rep.layers[1].suggestions)
    assert rep.layers[0].fits and not rep.layers[0].suggestions


def test_nothing_fits_says_split_needed(three):
    """When every rung leaves the layer over, the most aggressive one stays applied and the report
    names the intra-layer split and its device count; a smaller micro-batch is not tried when the
    weights alone exceed the capacity (it cannot help)."""
    model, a = three
    cap = layer_bytes(a.layers[1]) // 12
    new, rep = fit_model(a, cap, mode="auto", max_prune=0.1)
    l1 = rep.layers[1]
    assert not rep.fits and not l1.fits and l1.split_devices and l1.split_devices >= 2
    assert l1.applied == ["int4", "prune 10%"]
    assert new.layers[1].weight_bytes > cap and rep.micro_batch == 8
    assert rep.max_prune_heads == 0.1   # --max-prune-heads defaults to --max-prune
    assert f"split over {l1.split_devices} devices" in rep.format_table()


def test_bad_options(three):
    model, a = three
    with pytest.raises(CachefitError, match="--fit"):
        fit_model(a, 10**6, mode="maybe")
    with pytest.raises(CachefitError, match="--quantize"):
        fit_model(a, 10**6, quantize="int2")
    with pytest.raises(CachefitError, match="does not divide the batch 8"):
        fit_model(a, 10**6, micro_batch=3)


# ---------------------------------------------------------------------------------------------
# micro-batch
# ---------------------------------------------------------------------------------------------


def test_rebatch_onnx_keeps_the_computation():
    """dense-tiny at batch 1: the reshape shapes follow; onnxruntime on the rebatched model gives
    row 0 of the batch-2 output."""
    from cachefit.compiler import reference_outputs
    from cachefit.frontends.onnx import cleanup
    from cachefit.models import build

    model, _ = cleanup(build("dense-tiny"))
    small = rebatch_onnx(model, 2, 1)
    shapes = [list(numpy_helper.to_array(t)) for t in small.graph.initializer if t.name.endswith("_mb1_0")]
    assert shapes and shapes[0][0] == 1
    x = np.random.default_rng(0).standard_normal((2, 16, 160)).astype(np.float32)
    import tempfile, os

    with tempfile.TemporaryDirectory() as d:
        onnx.save(model, os.path.join(d, "a.onnx"))
        onnx.save(small, os.path.join(d, "b.onnx"))
        full = reference_outputs(os.path.join(d, "a.onnx"), {"x": x})["y"]
        one = reference_outputs(os.path.join(d, "b.onnx"), {"x": x[1:]})["y"]
    np.testing.assert_allclose(one, full[1:], rtol=1e-5, atol=1e-5)


def test_micro_batch_auto_picks_the_largest_divisor_that_fits(three):
    """The middle layer's working set scales with the batch: at a capacity between its batch-4
    and batch-8 footprints, --micro-batch auto compiles for 4 (measured again at batch 4)."""
    model, a = three
    at8 = layer_bytes(a.layers[1])
    at4 = scaled_bytes(a.layers[1], 4)
    cap = (at8 + at4) // 2
    new, rep = fit_model(a, cap, mode="none", micro_batch="auto")
    assert rep.micro_batch == 4 and rep.batch == 8 and rep.fits
    assert all(r.batch == 4 for r in new.layers)
    assert layer_bytes(new.layers[1]) <= cap
    assert rep.layers[1].applied == ["micro-batch 4"]


def test_fit_auto_micro_batch_compiles_and_runs_the_full_batch(three, tmp_path):
    """With pruning not allowed (--max-prune 0) the ladder ends in a smaller micro-batch: the
    artifact holds batch-`m` stages, records it in the manifest, and the runtime splits a full
    batch, runs the pieces and joins them: equal to onnxruntime on the INT4 weights."""
    from cachefit.compiler import compile_model, reference_outputs
    from cachefit.runtime import load

    model, a = three
    at4 = layer_bytes(a.layers[1])
    # over at batch 8 even with INT4, fits at a smaller batch
    new, rep = fit_model(a, at4 // 3, mode="auto", max_prune=0.0)
    assert rep.fits and rep.micro_batch < 8
    assert rep.layers[1].applied == ["int4", f"micro-batch {rep.micro_batch}"]
    res = compile_model(model, out_dir=tmp_path / "mb", cache=at4 // 3, threads=1, analysis=a, fit="auto",
                        max_prune=0.0)
    pipe = load(res.artifact_dir)
    plan = pipe.manifest["plan"]
    assert plan["micro_batch"] == {"batch": 8, "micro_batch": rep.micro_batch}
    assert plan["fit"]["layers"][1]["applied"] == rep.layers[1].applied
    assert pipe.inputs[0]["shape"] == [rep.micro_batch, 64]
    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    got = pipe.run({"x": x})["y"]
    assert got.shape == (8, 64)
    ref_model = _with_weights(model, res.analysis.params, res.fit.quantized)
    onnx.save(ref_model, str(tmp_path / "ref.onnx"))
    want = reference_outputs(tmp_path / "ref.onnx", {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # one micro-batch on its own still runs as compiled
    part = pipe.run({"x": x[: rep.micro_batch]})["y"]
    np.testing.assert_allclose(part, want[: rep.micro_batch], rtol=1e-4, atol=1e-4)


def test_cli_compile_fit_auto(three, tmp_path):
    """`cachefit compile --fit auto` prints what was applied per layer and records it (and the
    options) in the manifest; a capacity nothing reaches is refused with the split named."""
    from click.testing import CliRunner

    from cachefit.cli import main

    model, a = three
    path = tmp_path / "three.onnx"
    onnx.save(model, str(path))
    cap = layer_bytes(a.layers[1]) // 3
    out = tmp_path / "art"
    r = CliRunner().invoke(main, ["compile", str(path), "--cache", f"{cap}B", "--fit", "auto", "--threads", "1",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "layer 1 (layers.1)" in r.output and "int4, prune" in r.output
    manifest = json.loads((out / "manifest.json").read_text())
    fit = manifest["plan"]["fit"]
    assert fit["mode"] == "auto" and fit["fits"] and fit["layers"][1]["applied"][0] == "int4"
    assert fit["layers"][1]["bytes_before"] >= 3 * cap >= 3 * fit["layers"][1]["bytes_after"]

    r = CliRunner().invoke(main, ["compile", str(path), "--cache", f"{cap // 12}B", "--fit", "auto",
                                  "--max-prune", "0.1", "-o", str(tmp_path / "no")])
    assert r.exit_code == 2 and "intra-layer split" in r.output

    r = CliRunner().invoke(main, ["compile", str(path), "--quantize", "int8", "--micro-batch", "x", "-o",
                                  str(tmp_path / "bad")])
    assert r.exit_code == 2 and "--micro-batch 'x'" in r.output


def _output_error(model, names, params, quantized, seeds=(11, 12)):
    """Relative output error of ``model`` with its quantized weights replaced by their decoded
    values (run by onnxruntime) against the float model, over held-out random inputs."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    for q in quantized:
        w = dequantize_array(params[q["q_name"]], params[q["scale_name"]], q["bits"], q["k"], q["group_size"])
        name = names[q["name"]]
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.astype(np.float32)), name))
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    errs = []
    for s in seeds:
        x = np.random.default_rng(s).standard_normal((2, 16, 160)).astype(np.float32)
        y0, y1 = ref.run(None, {"x": x})[0], got.run(None, {"x": x})[0]
        errs.append(np.linalg.norm(y1 - y0) / np.linalg.norm(y0))
    return float(np.mean(errs))


@pytest.mark.slow
def test_calibrated_int4_lowers_the_output_error(analyzed):
    """fit_model(calibration=N) runs the float model on N random batches and rounds every matmul
    weight by GPTQ: dense-tiny's INT4 g128 output error on held-out inputs drops by more than a
    tenth against round to nearest (18.9% -> 15.6% here, 32 batches), same bytes; the
    report records the calibration. Data-free stays the default."""
    from cachefit.models import build

    model = build("dense-tiny")
    a = analyzed("dense-tiny")
    _new0, rep0 = fit_model(a, 10**9, quantize="int4", group_size=128)
    new, rep = fit_model(a, 10**9, quantize="int4", group_size=128, calibration=32)
    assert rep0.calibration == 0 and {q["method"] for q in rep0.quantized} == {"rtn"}
    assert rep.calibration == 32 and {q["method"] for q in rep.quantized} == {"gptq"}
    assert "GPTQ calibrated on 32 batch(es)" in rep.format_table() and rep.to_dict()["calibration"] == 32
    assert [r.weight_bytes for r in new.layers] == [r.weight_bytes for r in _new0.layers]
    names = a.imported.original_names
    e_rtn = _output_error(model, names, _new0.params, rep0.quantized)
    e_gptq = _output_error(model, names, new.params, rep.quantized)
    assert e_gptq < 0.9 * e_rtn


def test_calibration_follows_pruning(analyzed):
    """With pruning, fc2 loses rows of its reduction axis and its Hessian loses the same rows,
    so GPTQ still applies to every matmul weight (no fallback to round to nearest); so does
    o_proj after head pruning."""
    a = analyzed("dense-tiny")
    feeds = [{"x": np.random.default_rng(s).standard_normal((2, 16, 160)).astype(np.float32)} for s in (1, 2)]
    new, rep = fit_model(a, 10**9, quantize="int4", prune=0.25, prune_heads=0.5, calibration=feeds)
    assert rep.calibration == 2 and rep.prune_heads == 0.5
    assert {q["method"] for q in rep.quantized} == {"gptq"}
    assert new.params["layers_0_mlp_fc2_weight_int4"].shape == (240, 160)
    assert new.params["layers_0_attn_o_proj_weight_int4"].shape == (40, 160)
    assert "prune heads 50% (4 -> 2)" in rep.layers[0].applied
    assert (rep.layers[0].heads_before, rep.layers[0].heads_after) == (4, 2)
    with pytest.raises(CachefitError, match="calibrate 0"):
        fit_model(a, 10**9, quantize="int4", calibration=0)
    with pytest.raises(CachefitError, match="prune-heads 1.5"):
        fit_model(a, 10**9, prune_heads=1.5)


@pytest.mark.slow
def test_cli_compile_prune_heads_calibrate_int8_weights(tmp_path):
    """`cachefit compile --quantize int4 --calibrate 2 --int8-weights '*fc2*' --prune-heads 0.5`:
    the manifest records GPTQ on 2 batches, fc2 at INT8 and the rest INT4, and heads 2 -> 1."""
    from click.testing import CliRunner

    from cachefit.cli import main
    from cachefit.models import build

    path = tmp_path / "d.onnx"
    onnx.save(build("dense", layers=1, hidden=32, heads=2, ffn=64, seq=4, batch=2), str(path))
    out = tmp_path / "art"
    r = CliRunner().invoke(main, ["compile", str(path), "--quantize", "int4", "--calibrate", "2", "--int8-weights",
                                  "*fc2*", "--prune-heads", "0.5", "--threads", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    fit = json.loads((out / "manifest.json").read_text())["plan"]["fit"]
    assert fit["calibration"] == 2 and fit["int8_weights"] == ["*fc2*"] and fit["prune_heads"] == 0.5
    bits = {q["name"]: (q["bits"], q["method"]) for q in fit["quantized"]}
    assert bits.pop("layers_0_mlp_fc2_weight") == (8, "gptq") and set(bits.values()) == {(4, "gptq")}
    assert [(p["heads_before"], p["heads_after"]) for p in fit["pruned"]] == [(2, 1)]


# ---------------------------------------------------------------------------------------------
# attention-head rungs
# ---------------------------------------------------------------------------------------------


def _measured(analysis, prune=0.0, heads=0.0, bits=4, layers=None):
    """The per-layer records of ``analysis`` after a real PruneWeights (MLP ``prune``, then ``heads``)
    and QuantizeWeights run, measured by the footprint analysis: independent of cachefit.fit."""
    from cachefit.analysis import layer_records
    from cachefit.passes import run_pass
    from cachefit.passes.annotate_footprint import AnnotateFootprint
    from cachefit.passes.prune_weights import prune_weights
    from cachefit.passes.quantize_weights import quantize_weights

    mod, params = analysis.mod, analysis.params
    if prune:
        mod, params, _ = prune_weights(mod, params, prune, layers=layers)
    if heads:
        mod, params, _ = prune_weights(mod, params, 0.0, layers=layers, heads=heads)
    if bits:
        mod, params, _ = quantize_weights(mod, params, bits=bits, layers=layers)
    return layer_records(run_pass(AnnotateFootprint(dtype=analysis.dtype), mod)), params


@pytest.fixture(scope="module")
def small_dense():
    """Two transformer blocks (attention with 4 heads + MLP each) whose weights dominate."""
    from cachefit.analysis import analyze_onnx
    from cachefit.models import build

    return analyze_onnx(build("dense", layers=2, hidden=64, heads=4, ffn=128, seq=4, batch=1))


def test_a_layer_that_only_fits_with_head_pruning_gets_it(small_dense):
    """At a capacity that INT4 + the most MLP pruning allowed (10%) misses and one head fewer meets,
    --fit auto applies INT4, prune 10%, prune heads 25% (4 -> 3) to each block: the bytes are the
    footprint analysis' after a real PruneWeights / QuantizeWeights run, to the byte."""
    from cachefit.fit import layer_structure

    a = small_dense
    assert [layer_structure(a.mod, i) for i in range(2)] == [(True, 4, None)] * 2
    want, params = _measured(a, prune=0.1, heads=0.25)
    no_heads, _ = _measured(a, prune=0.1)
    cap = max(layer_bytes(r) for r in want)
    assert all(layer_bytes(r) > cap for r in no_heads)      # only head pruning makes them fit
    steps = []
    new, rep = fit_model(a, cap, mode="auto", max_prune=0.1, max_prune_heads=0.5, progress=steps.append)
    assert rep.fits and rep.micro_batch == 1 and rep.max_prune_heads == 0.5
    for i, lf in enumerate(rep.layers):
        assert lf.applied == ["int4", "prune 10%", "prune heads 25% (4 -> 3)"]
        assert (lf.heads_before, lf.heads_after) == (4, 3)
        assert lf.bytes_after == layer_bytes(want[i]) == layer_bytes(new.layers[i])
        assert lf.weight_bytes_after == want[i].weight_bytes == new.layers[i].weight_bytes
        assert lf.bytes_before == layer_bytes(a.layers[i]) > cap
    # the rung below (INT4 + prune 10%, no head pruned) was measured first and did not fit
    tried = [s for s in steps if "layer 0 " in s]
    assert [s.split(" with ")[1].split(":")[0] for s in tried] == [
        "int8", "int4", "int4, prune 5%", "int4, prune 10%", "int4, prune 10%, prune heads 25%"]
    assert {n: np.shape(v) for n, v in new.params.items()} == {n: np.shape(v) for n, v in params.items()}
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["layers"][0]["heads_after"] == 3 and d["max_prune_heads"] == 0.5
    assert "int4, prune 10%, prune heads 25% (4 -> 3); fits" in rep.format_table()
    # --max-prune-heads 0 (or less than a whole head) leaves every head: nothing fits then
    _new, rep0 = fit_model(a, cap, mode="auto", max_prune=0.1, max_prune_heads=0.2, micro_batch=1)
    assert not rep0.fits and all(lf.heads_after is None and lf.applied == ["int4", "prune 10%"] for lf in rep0.layers)


def test_layers_without_heads_never_get_a_head_rung(three):
    """An MLP-only model under a capacity nothing reaches: the ladder ends with MLP pruning, no
    head rung is tried or reported."""
    from cachefit.fit import layer_structure

    model, a = three
    assert [layer_structure(a.mod, i) for i in range(3)] == [(False, 0, None), (True, 0, None), (False, 0, None)]
    steps = []
    cap = layer_bytes(a.layers[1]) // 12
    _new, rep = fit_model(a, cap, mode="auto", max_prune=0.1, max_prune_heads=0.9, progress=steps.append)
    assert not rep.fits and steps and not any("heads" in s for s in steps)
    assert rep.layers[1].applied == ["int4", "prune 10%"] and rep.layers[0].applied == []
    assert all(lf.heads_before is None for lf in rep.layers)


def test_heads_that_cannot_be_followed_get_no_head_rung():
    """A layer whose attention PruneWeights cannot follow has no head rung (0 units) and the reason,
    which --fit auto puts in the report's notes, instead of failing."""
    from cachefit.fit import layer_structure

    mlp, units, why = layer_structure(HeadsLeave, 0)
    assert (mlp, units) == (False, 0) and "layer layers.0" in why and "leaves the layer" in why


def test_bad_fit_values_name_the_flag(three):
    """Each refused value names its flag and the value."""
    model, a = three
    cases = [(dict(max_prune_heads=1.0), "--max-prune-heads 1.0 is not a fraction"),
             (dict(max_prune_heads=-0.25), "--max-prune-heads -0.25"),
             (dict(prune_heads=-0.1), "--prune-heads -0.1 is not a fraction"),
             (dict(max_prune=1.5), "--max-prune 1.5"),
             (dict(quantize="int4", int8_weights=[""]), "--int8-weights '' is empty"),
             (dict(quantize="int8", int8_weights=["*fc*"]), r"--int8-weights \*fc\* keeps weights at INT8")]
    for kwargs, msg in cases:
        with pytest.raises(CachefitError, match=msg):
            fit_model(a, 10**6, mode=kwargs.pop("mode", "none"), **kwargs)
    # patterns that name nothing are noted (a list like SENSITIVE_INT8 serves many models); an ONNX
    # name instead of the IR's gets the IR name
    _new, rep = fit_model(a, 10**6, quantize="int4", int8_weights=["*nothing*", "@nolayer", "layers.1.mlp.fc2.weight"])
    assert rep.notes[0].startswith("--int8-weights '*nothing*' matches no weight of three")
    assert rep.notes[1].startswith("--int8-weights '@nolayer' matches no layer of three")
    assert "'layers.1.mlp.fc2.weight' is 'layers_1_mlp_fc2_weight'" in rep.notes[2]
    assert {q["bits"] for q in rep.quantized} == {4}


@pytest.mark.slow
def test_exported_gpt2_head_rungs(analyzed):
    """The real GPT-2 export (fused QKV split in three, 4 heads): at the capacity of its blocks with
    INT4, MLP pruned 10% and one head of 4 removed, --fit auto gives each block exactly that (bytes
    of a real PruneWeights / QuantizeWeights run); the embedding and the LM head, which have no
    attention, fit without a head rung."""
    a = analyzed("gpt2_legacy.onnx")
    blocks = [i for i, r in enumerate(a.layers) if r.name.startswith("layers.")]
    assert [a.layers[i].name for i in (0, len(a.layers) - 1)] == ["embed", "head"] and len(blocks) == 3
    want, _ = _measured(a, prune=0.1, heads=0.25, layers=blocks)
    cap = max(layer_bytes(want[i]) for i in blocks)
    assert all(layer_bytes(r) <= cap for i, r in enumerate(a.layers) if i not in blocks)
    new, rep = fit_model(a, cap, mode="auto", max_prune=0.1, max_prune_heads=0.5)
    assert rep.fits
    for i in blocks:
        assert rep.layers[i].applied == ["int4", "prune 10%", "prune heads 25% (4 -> 3)"]
        assert rep.layers[i].bytes_after == layer_bytes(want[i]) == layer_bytes(new.layers[i])
    assert rep.layers[0].applied == [] and rep.layers[-1].applied == []
    assert new.params["transformer_h_0_attn_c_attn_weight_int4"].shape[1] == 3 * 48


# ---------------------------------------------------------------------------------------------
# planning.plan_model: the library form of `cachefit plan`, through the shared fit step
# ---------------------------------------------------------------------------------------------


def test_plan_model_prune_heads_and_int8_weights_plan_the_fit_analysis_bytes(small_dense):
    """``plan_model(..., prune_heads=0.25)`` and ``plan_model(..., quantize="int4",
    quantize_int8_weights=[...])`` plan, per layer, the bytes of ``fit_analysis`` (what
    ``compile_model`` plans with), and ``fit_and_plan`` gives the same report."""
    from cachefit.fit import fit_analysis, fit_and_plan
    from cachefit.planning import plan_model

    plain = plan_model(None, cache="50MB", analysis=small_dense)
    assert plain.fit is None
    for opts in (dict(prune_heads=0.25), dict(quantize="int4", quantize_int8_weights=["*fc2*"])):
        rep = plan_model(None, cache="50MB", analysis=small_dense, **opts)
        want, want_fit = fit_analysis(small_dense, cache="50MB", **opts)
        got = [(r.weight_bytes, r.total_bytes) for r in rep.analysis.layers]
        assert got == [(r.weight_bytes, r.total_bytes) for r in want.layers]
        assert all(g[0] < p.weight_bytes for g, p in zip(got, plain.analysis.layers))
        assert rep.fit.to_dict() == want_fit.to_dict()
        other = fit_and_plan(None, cache="50MB", analysis=small_dense, **opts)
        assert [r.total_bytes for r in other.analysis.layers] == [r.total_bytes for r in rep.analysis.layers]
        assert other.plan.groups == rep.plan.groups
    rep = plan_model(None, cache="50MB", analysis=small_dense, prune_heads=0.25)
    assert rep.fit.prune_heads == 0.25
    assert [lf.applied for lf in rep.fit.layers] == [["prune heads 25% (4 -> 3)"]] * 2
    assert rep.to_dict()["fit"]["prune_heads"] == 0.25


def test_plan_model_refuses_bad_fit_options_before_reading_the_model(tmp_path):
    """Bad fit values, ``quantize_calibration`` and unknown keywords are refused before the model is
    read (the path does not exist: reading it would fail differently)."""
    from cachefit.planning import plan_model

    missing = tmp_path / "missing.onnx"
    for kwargs, msg in [(dict(prune_heads=1.0), "--prune-heads 1.0 is not a fraction"),
                        (dict(max_prune_heads=-0.5), "--max-prune-heads -0.5 is not a fraction"),
                        (dict(quantize="int8", quantize_int8_weights=["*fc*"]), "keeps weights at INT8"),
                        (dict(quantize_calibration=4), "--calibrate 4: GPTQ calibration"),
                        (dict(cache="0MB"), "--cache must be positive")]:
        with pytest.raises(CachefitError, match=msg):
            plan_model(missing, **kwargs)
    with pytest.raises(TypeError, match="prune_head"):
        plan_model(missing, prune_head=0.25)
