"""ONNX frontend (cachefit.frontends.onnx): bad input gives cachefit errors, external data, cleanup.

Every bad input must end as a :mod:`cachefit.errors` exception from the library and, through
``cachefit plan``, as exit code 2 with one ``cachefit: error: ...`` line on stderr and no traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from click.testing import CliRunner
from conftest import DATA_DIR, FLOAT, make_onnx_model
from onnx import helper, numpy_helper
from onnx.external_data_helper import set_external_data, write_external_data_tensors
from tvm import relax

from cachefit import errors
from cachefit.analysis import analyze_onnx
from cachefit.cli import main as cli_main
from cachefit.frontends.onnx import (
    apply_input_shapes,
    check_operators,
    cleanup,
    import_onnx,
    load_model,
    parse_input_shapes,
    sanitize_names,
)
from cachefit.planning import plan_model, resolve_capacity

REPO = Path(__file__).resolve().parents[1]
GPT2 = DATA_DIR / "gpt2_dynamo.onnx"


# ---------------------------------------------------------------------------------------------
# Small models for the bad-input cases
# ---------------------------------------------------------------------------------------------


def _chain(op: str = "Relu", domain: str = "", name: str = "act_0", opset: int = 17, extra=None,
           dims=(2, 3)) -> onnx.ModelProto:
    """x -> MatMul(w) -> <op> -> y, with a real weight."""
    w = numpy_helper.from_array(np.full((3, 3), 0.5, np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm_0"),
             helper.make_node(op, ["h"], ["y"], name=name, domain=domain)]
    return make_onnx_model(nodes, [("x", FLOAT, list(dims))], [("y", FLOAT, list(dims))], [w],
                           opset=opset, extra_opsets=extra)


def _two_layer_external(folder: Path) -> Path:
    """A two-layer MatMul model whose weights live in w1.bin and w2.bin next to it."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="/layers.0/fc/MatMul"),
             helper.make_node("Relu", ["h"], ["r"], name="/layers.0/act/Relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="/layers.1/fc/MatMul")]
    m = make_onnx_model(nodes, [("x", FLOAT, [4, 64])], [("y", FLOAT, [4, 64])], [w1, w2])
    for t in m.graph.initializer:
        set_external_data(t, location=f"{t.name}.bin")
    folder.mkdir(parents=True, exist_ok=True)
    m = write_external_data_tensors(m, str(folder))
    path = folder / "two.onnx"
    onnx.save(m, str(path))
    return path


def _pad_wrap() -> onnx.ModelProto:
    """Pad is supported, but TVM 0.27's converter refuses mode="wrap": fails inside the importer."""
    pads = numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64), "pads")
    return make_onnx_model([helper.make_node("Pad", ["x", "pads"], ["y"], name="pad_0", mode="wrap")],
                           [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 5])], [pads])


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    files = {}
    files["text"] = d / "notes.onnx"
    files["text"].write_text("this is a text file, not a protobuf\n")
    data = GPT2.read_bytes()
    files["truncated"] = d / "truncated.onnx"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"] = d / "empty.onnx"
    files["empty"].write_bytes(b"")
    files["missing"] = d / "does_not_exist.onnx"
    files["celu"] = d / "celu.onnx"
    onnx.save(_chain("Celu", name="odd_celu"), str(files["celu"]))
    files["custom"] = d / "custom.onnx"
    onnx.save(_chain("FancyRelu", domain="com.example", name="fancy_0", extra={"com.example": 1}), str(files["custom"]))
    files["dynamic"] = d / "dynamic.onnx"
    onnx.save(_chain(dims=("batch", 3)), str(files["dynamic"]))
    files["pad_wrap"] = d / "pad_wrap.onnx"
    onnx.save(_pad_wrap(), str(files["pad_wrap"]))
    files["ok"] = d / "ok.onnx"
    onnx.save(_chain(), str(files["ok"]))
    ext = _two_layer_external(d / "ext_one_missing")
    (ext.parent / "w2.bin").unlink()
    files["ext_one_missing"] = ext
    ext = _two_layer_external(d / "ext_short")
    (ext.parent / "w1.bin").write_bytes((ext.parent / "w1.bin").read_bytes()[:100])
    files["ext_short"] = ext
    return files


# ---------------------------------------------------------------------------------------------
# Library: each bad input is a cachefit error that names the problem
# ---------------------------------------------------------------------------------------------


def test_text_file_is_a_model_error(bad_files):
    with pytest.raises(errors.ModelError, match=rf"notes\.onnx is not a readable ONNX model \({bad_files['text'].stat().st_size} bytes"):
        load_model(bad_files["text"])


def test_truncated_file_is_a_model_error(bad_files):
    n = len(GPT2.read_bytes()) // 2
    with pytest.raises(errors.ModelError, match=rf"truncated\.onnx is not a readable ONNX model \({n} bytes.*truncated"):
        load_model(bad_files["truncated"])


def test_empty_file_is_a_model_error(bad_files):
    with pytest.raises(errors.ModelError, match=r"empty\.onnx is empty \(0 bytes\)"):
        load_model(bad_files["empty"])


def test_missing_file_is_a_model_error(bad_files):
    with pytest.raises(errors.ModelError, match=r"model file not found: .*does_not_exist\.onnx"):
        load_model(bad_files["missing"])


def test_directory_is_a_model_error(tmp_path):
    with pytest.raises(errors.ModelError, match="is a directory"):
        load_model(tmp_path)


def test_operator_tvm_lacks_is_named_with_its_node():
    """Celu is standard ONNX but has no TVM 0.27 converter: the error names the op and the node."""
    with pytest.raises(errors.UnsupportedOperatorError, match=r"unsupported operator 'Celu' at node 'odd_celu'"):
        check_operators(_chain("Celu", name="odd_celu"))


def test_custom_domain_operator_is_named_with_domain_and_node():
    m = _chain("FancyRelu", domain="com.example", name="fancy_0", extra={"com.example": 1})
    with pytest.raises(errors.UnsupportedOperatorError,
                       match=r"'FancyRelu' \(domain 'com.example'\) at node 'fancy_0'"):
        check_operators(m)


def test_custom_domain_op_with_a_standard_name_is_refused():
    """TVM looks converters up by op type alone: ``com.example::Relu`` would silently import as Relu."""
    m = _chain("Relu", domain="com.example", name="not_really_relu", extra={"com.example": 1})
    with pytest.raises(errors.UnsupportedOperatorError, match=r"'Relu' \(domain 'com.example'\) at node 'not_really_relu'"):
        import_onnx(m)


def test_unnamed_unsupported_node_is_named_by_its_output():
    m = _chain("Celu", name="")
    with pytest.raises(errors.UnsupportedOperatorError, match=r"the node producing \['y'\]"):
        check_operators(m)


def test_several_unsupported_operators_are_counted():
    m = _chain("Celu", name="c0")
    m.graph.node.append(helper.make_node("Swish", ["y"], ["z"], name="s0"))
    m.graph.output[0].name = "z"
    with pytest.raises(errors.UnsupportedOperatorError, match=r"'Celu' at node 'c0'.*1 more unsupported node\(s\) \(Swish\)"):
        check_operators(m)


def test_importer_failure_names_operator_and_node(capsys):
    """A converter that raises inside TVM's importer: a ModelError naming the op and node, and
    nothing of the importer's own chatter on stdout."""
    with pytest.raises(errors.ModelError, match=r"TVM's ONNX importer failed on the model at Pad \('pad_0'\): .*wrap"):
        import_onnx(_pad_wrap())
    assert capsys.readouterr().out == ""


def test_dynamic_dimension_without_input_shapes_names_input_and_dim():
    with pytest.raises(errors.ShapeError, match=r"input 'x' dimension 0 is dynamic \('batch' in \[batch, 3\]\).*--input-shapes \"x:\[...\]\" or --batch N"):
        apply_input_shapes(_chain(dims=("batch", 3)))


def test_dynamic_dimension_fixed_by_input_shapes_or_batch():
    m = _chain(dims=("batch", 3))
    for fixed in (apply_input_shapes(m, {"x": [5, 3]}), apply_input_shapes(m, batch=5)):
        assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [5, 3]
    a = analyze_onnx(m, input_shapes="x:[5,3]")
    assert [int(d) for d in a.mod["main"].params[0].ty.shape.values] == [5, 3]


def test_unknown_name_in_input_shapes_lists_the_real_inputs():
    with pytest.raises(errors.ShapeError, match=r"--input-shapes names 'ids', which the model does not have; its inputs are: 'x'"):
        apply_input_shapes(_chain(), {"ids": [2, 3]})


@pytest.mark.parametrize("shapes,kind", [({"x": [2, 3, 1]}, "rank 2"), ({"x": [4, 3]}, "fixed to 2")])
def test_input_shapes_that_contradict_the_model(shapes, kind):
    with pytest.raises(errors.ShapeError, match=kind):
        apply_input_shapes(_chain(), shapes)


@pytest.mark.parametrize("batch", [0, -2])
def test_nonpositive_batch_is_refused(batch):
    with pytest.raises(errors.ShapeError, match=rf"--batch must be a positive integer, got {batch}"):
        apply_input_shapes(_chain(dims=("batch", 3)), batch=batch)


def test_parse_input_shapes_accepts_tvmc_forms():
    assert parse_input_shapes("x:[8,256] mask:[8,1]") == {"x": [8, 256], "mask": [8, 1]}
    assert parse_input_shapes("x:[8, 256], mask:[8,1]") == {"x": [8, 256], "mask": [8, 1]}
    assert parse_input_shapes("gpu_0/data_0:[1,3,224,224]") == {"gpu_0/data_0": [1, 3, 224, 224]}
    assert parse_input_shapes("s:[]") == {"s": []}
    assert parse_input_shapes(None) == {} and parse_input_shapes("") == {}


@pytest.mark.parametrize("text,match", [
    ("x=[8,256]", r"malformed --input-shapes 'x=\[8,256\]'.*expected NAME:\[d0,d1,...\]"),
    ("x:[8,256", "malformed --input-shapes"),
    ("x:[8,a]", r"malformed dimensions \[8,a\] for input 'x'"),
    ("x:[8,2.5]", r"malformed dimensions \[8,2.5\]"),
    ("x:[8,0]", r"input 'x': dimensions must be positive"),
    ("x:[8,-1]", r"input 'x': dimensions must be positive"),
    ("x:[8] x:[9]", r"gives input 'x' twice"),
    (":[8]", "malformed --input-shapes"),
])
def test_malformed_input_shapes(text, match):
    with pytest.raises(errors.ShapeError, match=match):
        parse_input_shapes(text)


@pytest.mark.parametrize("text", ["50XB", "MB", "fifty", "-5MB", "", "5 0MB"])
def test_malformed_cache_size(text):
    with pytest.raises(errors.CachefitError, match="malformed size"):
        resolve_capacity(text, None)


@pytest.mark.parametrize("text,expected", [("50MB", 50_000_000), ("2MiB", 2 * 2**20), ("40000KB", 40_000_000),
                                           ("1.5GiB", 3 * 2**29), ("4096", 4096), ("48K", 48 * 1024)])
def test_cache_units(text, expected):
    assert resolve_capacity(text, None)[0] == expected


# ---------------------------------------------------------------------------------------------
# External data
# ---------------------------------------------------------------------------------------------


def test_external_data_present_is_loaded(tmp_path):
    path = _two_layer_external(tmp_path)
    loaded = load_model(path)
    assert not loaded.shape_only
    a = analyze_onnx(path)
    assert [r.weight_bytes for r in a.layers] == [64 * 64 * 4, 64 * 64 * 4]
    w1 = onnx.load(str(path)).graph.initializer[0]
    np.testing.assert_array_equal(a.params["w1"], numpy_helper.to_array(w1, base_dir=str(tmp_path)))


def test_external_data_one_of_two_files_missing_names_it(bad_files):
    with pytest.raises(errors.ModelError, match=r"external weight files missing: w2\.bin .*not a shape-only model"):
        load_model(bad_files["ext_one_missing"])


def test_external_data_file_too_short_names_the_files(bad_files):
    with pytest.raises(errors.ModelError, match=r"cannot read the external weights \(w1\.bin, w2\.bin .*exceeds available data"):
        load_model(bad_files["ext_short"])


def test_external_data_all_missing_is_shape_only_and_plans(tmp_path):
    """Without any data file the model is shape-only: weights are declarations, planning works."""
    path = _two_layer_external(tmp_path)
    for f in ("w1.bin", "w2.bin"):
        (tmp_path / f).unlink()
    loaded = load_model(path)
    assert loaded.shape_only
    report = plan_model(path, cache="1MB")
    assert report.analysis.shape_only
    assert report.analysis.params == {"w1": None, "w2": None}
    assert [r.weight_bytes for r in report.analysis.layers] == [16384, 16384]
    assert report.to_dict()["shape_only"] is True
    assert report.plan.devices_used == 1


# ---------------------------------------------------------------------------------------------
# Through the CLI: exit code 2, one "cachefit: error:" line, no traceback
# ---------------------------------------------------------------------------------------------

CLI_CASES = {
    # id: (file key, extra args, text the message must contain)
    "text": ("text", [], "is not a readable ONNX model"),
    "truncated": ("truncated", [], "is not a readable ONNX model"),
    "empty": ("empty", [], "is empty (0 bytes)"),
    "missing": ("missing", [], "model file not found"),
    "unsupported-op": ("celu", [], "unsupported operator 'Celu' at node 'odd_celu'"),
    "custom-domain": ("custom", [], "'FancyRelu' (domain 'com.example') at node 'fancy_0'"),
    "dynamic-dim": ("dynamic", [], "input 'x' dimension 0 is dynamic ('batch'"),
    "unknown-input": ("ok", ["--input-shapes", "ids:[2,3]"], "--input-shapes names 'ids'"),
    "malformed-shapes": ("ok", ["--input-shapes", "x=[2,3]"], "malformed --input-shapes"),
    "malformed-dims": ("ok", ["--input-shapes", "x:[2,three]"], "malformed dimensions [2,three]"),
    "malformed-cache": ("ok", ["--cache", "50XB"], "malformed size '50XB': unknown unit 'XB'"),
    "zero-cache": ("ok", ["--cache", "0"], "--cache must be positive"),
    "bad-dtype": ("ok", ["--dtype", "fp7"], "unknown dtype 'fp7'"),
    "bad-hardware": ("ok", ["--hardware", "tpu9"], "unknown hardware preset 'tpu9'"),
    "layers-zero": ("ok", ["--layers", "0"], "--layers must be at least 1, got 0"),
    "layers-too-many": ("dynamic", ["--batch", "2", "--layers", "9"], "--layers 9 asks for more layers than the model has"),
    "bad-boundary": ("ok", ["--layer-boundaries", "no_such_node"], "layer boundary 'no_such_node' names no node"),
    "importer-failure": ("pad_wrap", [], "TVM's ONNX importer failed on the model at Pad ('pad_0')"),
    "ext-one-missing": ("ext_one_missing", [], "external weight files missing: w2.bin"),
    "ext-short": ("ext_short", [], "cannot read the external weights"),
}


def _assert_one_error_line(code: int, stderr: str, stdout: str, expected: str):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (code, stderr, stdout)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("cachefit: error: "), lines[0]
    assert expected in lines[0]
    assert "Traceback" not in stderr + stdout
    assert stdout.strip() == ""


@pytest.mark.parametrize("case", list(CLI_CASES), ids=list(CLI_CASES))
def test_cli_plan_bad_input(case, bad_files):
    key, args, expected = CLI_CASES[case]
    res = CliRunner().invoke(cli_main, ["plan", str(bad_files[key]), *args])
    assert isinstance(res.exception, SystemExit), res.exception  # not an unhandled exception
    _assert_one_error_line(res.exit_code, res.stderr, res.stdout, expected)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unsupported-op"])
def test_cli_plan_bad_input_in_a_real_process(case, bad_files):
    """The same through ``python -m cachefit``: the process's own exit code and stderr (one case:
    a process start imports TVM, 5-20 s here)."""
    key, args, expected = CLI_CASES[case]
    proc = subprocess.run([sys.executable, "-m", "cachefit", "plan", str(bad_files[key]), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    _assert_one_error_line(proc.returncode, proc.stderr, proc.stdout, expected)


# ---------------------------------------------------------------------------------------------
# Cleanup
# ---------------------------------------------------------------------------------------------


def _run_relax(mod, params: dict, inputs: list[np.ndarray]) -> np.ndarray:
    ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    main = mod["main"]
    n_in = int(main.attrs["num_input"])
    ws = [tvm.runtime.tensor(np.asarray(params[p.name])) for p in main.params[n_in:]]
    return vm["main"](*[tvm.runtime.tensor(a) for a in inputs], *ws).numpy()


def _ort(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def _empty_constant_of_shape_model() -> onnx.ModelProto:
    """What transformers 5's legacy export writes: ConstantOfShape of the (empty) shape of a scalar."""
    nodes = [
        helper.make_node("Constant", [], ["s"], name="/model/Constant",
                         value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Shape", ["s"], ["shp"], name="/model/Shape"),
        helper.make_node("ConstantOfShape", ["shp"], ["c"], name="/model/ConstantOfShape",
                         value=numpy_helper.from_array(np.array([1.5], np.float32))),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="/model/MatMul"),
        helper.make_node("Add", ["h", "c"], ["y"], name="/model/Add"),
    ]
    w = numpy_helper.from_array(np.arange(9, dtype=np.float32).reshape(3, 3) / 9, "w")
    return make_onnx_model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])], [w])


def test_empty_shape_constant_of_shape_imports_after_cleanup():
    import tvm.relax.frontend.onnx as rx_onnx

    m = _empty_constant_of_shape_model()
    with pytest.raises(Exception, match="broadcast_to expects the input shape"):
        rx_onnx.from_onnx(m)  # the failure cleanup exists for
    cleaned, _ = cleanup(m)
    assert not [n for n in cleaned.graph.node if n.op_type in ("ConstantOfShape", "Shape")]
    imported = import_onnx(m)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    got = _run_relax(imported.mod, imported.params, [x])
    np.testing.assert_allclose(got, x @ (np.arange(9, dtype=np.float32).reshape(3, 3) / 9) + 1.5, rtol=1e-6)


def _reshape_chain_model(dims=(2, 3, 4)) -> onnx.ModelProto:
    """x [2,3,4] -> Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])) -> [2,12] -> MatMul."""
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="/blk/Shape"),
        helper.make_node("Gather", ["shape", "zero"], ["b"], name="/blk/Gather", axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"], name="/blk/Unsqueeze"),
        helper.make_node("Concat", ["b1", "minus1"], ["newshape"], name="/blk/Concat", axis=0),
        helper.make_node("Reshape", ["x", "newshape"], ["flat"], name="/blk/Reshape"),
        helper.make_node("MatMul", ["flat", "w"], ["y"], name="/blk/MatMul"),
    ]
    w = numpy_helper.from_array(np.linspace(-1, 1, 12 * 5, dtype=np.float32).reshape(12, 5), "w")
    inits = [i64("zero", 0), i64("axes", [0]), i64("minus1", [-1]), w]
    return make_onnx_model(nodes, [("x", FLOAT, list(dims))], [("y", FLOAT, [dims[0], 5])], inits)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-batch"])
def test_shape_gather_concat_reshape_chain_is_folded(dynamic):
    """The exporters' shape arithmetic becomes constants; with a dynamic batch it does once
    --input-shapes fixes it (stale inferred shapes are dropped first)."""
    m = _reshape_chain_model(("batch", 3, 4) if dynamic else (2, 3, 4))
    shapes = {"x": [2, 3, 4]} if dynamic else None
    cleaned, _ = cleanup(apply_input_shapes(m, shapes))
    ops = [n.op_type for n in cleaned.graph.node]
    assert "Shape" not in ops and "Gather" not in ops and "Concat" not in ops
    assert ops.count("Reshape") == 1 and ops.count("MatMul") == 1
    reshape = next(n for n in cleaned.graph.node if n.op_type == "Reshape")
    inits = {t.name: numpy_helper.to_array(t) for t in cleaned.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in cleaned.graph.node if n.op_type == "Constant"}
    np.testing.assert_array_equal({**inits, **consts}[reshape.input[1]], [2, -1])
    # the integer shape stays a constant: the only parameter is the weight, and shapes are static
    imported = import_onnx(m, input_shapes=shapes)
    assert list(imported.params) == ["w"]
    text = imported.mod.script()
    assert "R.shape_of" not in text and "dynamic" not in text
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    want = _ort(_reshape_chain_model(), {"x": x})[0]
    np.testing.assert_allclose(_run_relax(imported.mod, imported.params, [x]), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_real_export_keeps_no_shape_node_after_cleanup():
    """The legacy Mixtral export computes shapes from Shape nodes and ConstantOfShape; cleanup
    resolves all of them."""
    m = onnx.load(str(DATA_DIR / "mixtral_legacy.onnx"))
    assert sum(n.op_type == "Shape" for n in m.graph.node) == 2
    cleaned, _ = cleanup(m)
    assert not [n.name for n in cleaned.graph.node if n.op_type in ("Shape", "ConstantOfShape")]


def test_names_with_slashes_are_sanitised():
    w = numpy_helper.from_array(np.eye(3, dtype=np.float32), "gpu_0/fc_w_0")
    w2 = numpy_helper.from_array(2 * np.eye(3, dtype=np.float32), "gpu_0_fc_w_0")  # collides once sanitised
    nodes = [helper.make_node("MatMul", ["gpu_0/data_0", "gpu_0/fc_w_0"], ["gpu_0/h:0"], name="fc/1"),
             helper.make_node("MatMul", ["gpu_0/h:0", "gpu_0_fc_w_0"], ["0out"], name="fc/2")]
    m = make_onnx_model(nodes, [("gpu_0/data_0", FLOAT, [2, 3])], [("0out", FLOAT, [2, 3])], [w, w2])
    renamed, names = sanitize_names(m)
    tensors = {x for n in renamed.graph.node for x in [*n.input, *n.output]}
    assert all(t.isidentifier() for t in tensors), tensors
    assert set(names.values()) == {"gpu_0/data_0", "gpu_0/fc_w_0", "gpu_0_fc_w_0", "gpu_0/h:0", "0out"}
    assert len(set(names)) == 5  # distinct after sanitising
    assert [n.name for n in renamed.graph.node] == ["fc/1", "fc/2"]  # node names are kept
    imported = import_onnx(m)
    assert imported.input_names == ["gpu_0_data_0"]
    assert imported.original_names["gpu_0_data_0"] == "gpu_0/data_0"
    main = imported.mod["main"]
    assert all(p.name.isidentifier() for p in main.params)
    x = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(_run_relax(imported.mod, imported.params, [x]), 2 * x, rtol=1e-6)


def test_old_ir_initializers_listed_as_inputs_are_dropped():
    """IR 3 zoo files list every initializer in graph.input too; cleanup keeps only the real input."""
    m = onnx.load(str(Path(onnx.__file__).parent / "backend/test/data/light/light_squeezenet.onnx"))
    assert len(m.graph.input) > 1
    cleaned, names = cleanup(m)
    assert [names[i.name] for i in cleaned.graph.input] == ["data_0"]
