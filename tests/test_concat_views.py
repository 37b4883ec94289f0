"""Concatenations without a copy (cachefit.codegen.concat_views): the marking legalizer, the
storage rewrite after memory planning, and whole CNN blocks against onnxruntime."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu

from cachefit.codegen.concat_views import CONCAT_ATTR, ConcatIntoStorage, legalize_concat, viewable_concat

LLVM = tvm.target.Target({"kind": "llvm"})


def _planned(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` legalized (concat by :func:`legalize_concat`), lowered to DPS and memory-planned."""
    seq = tvm.transform.Sequential(
        [relax.transform.LegalizeOps(customize_legalize_map={"relax.concat": legalize_concat}),
         relax.transform.AnnotateTIROpPattern()]
        + cpu.dataflow_lower_passes(LLVM) + [relax.transform.StaticPlanBlockMemory()])
    with LLVM:
        return seq(mod)


def _calls(func: relax.Function) -> list[str]:
    return [b.value.op.name_hint for blk in func.body.blocks for b in blk.bindings
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, relax.GlobalVar)]


def _run(mod: tvm.IRModule, *arrays):
    """Build a planned ``mod`` through the rest of the VM pipeline (after the memory plan) and call main."""
    rest = [p for p in cpu.finalize_passes(LLVM) if p.info.name != "StaticPlanBlockMemory"]
    ex = tvm.compile(mod, LLVM, relax_pipeline=tvm.transform.Sequential(rest))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
    return out.numpy()


def _two_producers(n: int = 1, reader: bool = False, param_part: bool = False, shape=(3, 4, 4)):
    """main(x, y): concat((exp(x), x * 2 or y), axis=1) [+ the first part read again]."""
    ty = relax.TensorType((n, *shape), "float32")
    x, y = relax.Var("x", ty), relax.Var("y", ty)
    bb = relax.BlockBuilder()
    with bb.function("main", [x, y]):
        with bb.dataflow():
            a = bb.emit(relax.op.exp(x))
            b = y if param_part else bb.emit(relax.op.multiply(x, relax.const(2.0, "float32")))
            c = bb.emit(relax.op.concat(relax.Tuple([a, b]), axis=1))
            d = bb.emit(relax.op.add(c, relax.const(1.0, "float32")))
            out = bb.emit_output(relax.Tuple([d, bb.emit(relax.op.sum(a))]) if reader else d)
        bb.emit_func_output(out)
    return bb.get()


def test_viewable_concat_needs_unit_leading_dims():
    """A part fills one contiguous range of the output only when every dimension before the axis is 1."""
    assert viewable_concat([[1, 4, 5, 5, 16], [1, 8, 5, 5, 16]], 1)
    assert viewable_concat([[1, 1, 3], [1, 1, 5]], -1)
    assert not viewable_concat([[2, 4, 5], [2, 8, 5]], 1)          # batch 2 interleaves the parts
    assert not viewable_concat([[1, 4, 5], [1, 4, 5]], 2)          # 4 rows of each part
    assert not viewable_concat([[1, 4], None], 1)
    assert not viewable_concat([[1, 4, 5], [1, 4]], 1)


def test_legalize_marks_only_viewable_concats():
    """The concat PrimFunc carries the axis for batch 1; batch 2 legalizes unmarked."""
    for n, marked in ((1, True), (2, False)):
        mod = _planned(_two_producers(n))
        attrs = [f.attrs for gv, f in mod.functions_items() if gv.name_hint.startswith("concatenate")]
        assert len(attrs) == 1
        assert (CONCAT_ATTR in attrs[0]) is marked
        if marked:
            assert int(attrs[0][CONCAT_ATTR]) == 1


def test_parts_become_tensors_of_one_storage_at_their_offsets():
    """The rule: both producers write into one fresh storage (the second part at byte offset
    3*4*4*4 = 192 through ensure_zero_offset), the output is that storage at offset 0, the
    concatenation call is gone, and the result is unchanged."""
    before = _planned(_two_producers())
    after = ConcatIntoStorage()(before)
    assert "concatenate" in _calls(before["main"])
    assert "concatenate" not in _calls(after["main"])
    bindings = [b for blk in after["main"].body.blocks for b in blk.bindings]
    storage_op = tvm.ir.Op.get("relax.memory.alloc_storage")
    tensor_op = tvm.ir.Op.get("relax.memory.alloc_tensor")
    zero_op = tvm.ir.Op.get("relax.memory.ensure_zero_offset")
    cat = [b.var for b in bindings if isinstance(b.value, relax.Call) and b.value.op.same_as(storage_op)
           and b.var.name.startswith("concat_storage")]
    assert len(cat) == 1
    assert [int(v) for v in next(b.value.args[0].values for b in bindings if b.var.same_as(cat[0]))] == [384]
    offsets = sorted(int(b.value.args[1].value) for b in bindings
                     if isinstance(b.value, relax.Call) and b.value.op.same_as(tensor_op)
                     and b.value.args[0].same_as(cat[0]))
    assert offsets == [0, 0, 192]   # first part, output, second part
    assert sum(isinstance(b.value, relax.Call) and b.value.op.same_as(zero_op) for b in bindings) == 1
    # the storage the plan gave the parts alone is dropped, not left allocated for nothing
    assert all(isinstance(b.value, relax.Call) for b in bindings if b.var.name.startswith("storage"))
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype("float32")
    want = np.concatenate([np.exp(x), x * 2], axis=1) + 1
    np.testing.assert_allclose(_run(after, x, x), want, rtol=1e-6)
    np.testing.assert_allclose(_run(before, x, x), want, rtol=1e-6)


@pytest.mark.parametrize("case", ["reader", "param_part", "batch2", "unaligned"])
def test_concat_that_cannot_be_written_in_place_is_kept(case):
    """A part read by another op, a part that is a function parameter, a batch-2 concat, or a
    second part at byte offset 3*4*5*4 = 240 (not a multiple of 64: the VM would copy it to drop
    the offset) keeps its copy: the module is returned unchanged."""
    mod = _two_producers(n=2 if case == "batch2" else 1, reader=case == "reader", param_part=case == "param_part",
                         shape=(3, 4, 5) if case == "unaligned" else (3, 4, 4))
    before = _planned(mod)
    after = ConcatIntoStorage()(before)
    tvm.ir.assert_structural_equal(after, before)
    assert "concatenate" in _calls(after["main"])


# ---------------------------------------------------------------------------------------------
# SqueezeNet fire modules end to end, against onnxruntime
# ---------------------------------------------------------------------------------------------


def _fire_net(batch: int, seed: int = 0) -> onnx.ModelProto:
    """conv 3x3 -> relu -> fire module (squeeze 1x1, expand 1x1 || expand 3x3, concat) -> maxpool
    -> fire module; the second concat is the model output (it fuses with the conversion back
    from NCHWc, so it is a kernel of its own either way)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(name, x, ci, co, k, pad):
        w = (rng.standard_normal((co, ci, k, k)) / np.sqrt(ci * k * k)).astype("float32")
        b = (rng.standard_normal(co) * 0.1).astype("float32")
        inits.extend([numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], pads=[pad] * 4,
                                      kernel_shape=[k, k]))
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [name]))
        return name

    def fire(name, x, ci, s, e):
        sq = conv(f"{name}_sq", x, ci, s, 1, 0)
        a = conv(f"{name}_e1", sq, s, e, 1, 0)
        b = conv(f"{name}_e3", sq, s, e, 3, 1)
        nodes.append(helper.make_node("Concat", [a, b], [f"{name}_cat"], axis=1))
        return f"{name}_cat"

    x = conv("conv1", "x", 3, 32, 3, 1)
    f2 = fire("fire2", x, 32, 16, 32)
    nodes.append(helper.make_node("MaxPool", [f2], ["pool"], kernel_shape=[2, 2], strides=[2, 2]))
    f3 = fire("fire3", "pool", 64, 16, 32)
    nodes.append(helper.make_node("Identity", [f3], ["y"]))
    graph = helper.make_graph(nodes, "fire", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 64, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=9)


@pytest.mark.parametrize("batch", [1, 2])
def test_fire_modules_match_onnxruntime_without_concat_copies(batch):
    """Batch 1: the first concatenation's kernel does not run (its producers write into its
    output); batch 2: it stays. Outputs agree with onnxruntime either way."""
    import onnxruntime as ort

    import tvm.relax.frontend.onnx as rx_onnx

    from cachefit.codegen.pipeline import compile_relax

    model = _fire_net(batch)
    mod, params = relax.frontend.detach_params(rx_onnx.from_onnx(model, keep_params_in_input=True))
    x = np.random.default_rng(1).standard_normal((batch, 3, 16, 16)).astype("float32")
    compiled = compile_relax(mod, LLVM, threads=1, prepack=True)
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
    args = [tvm.runtime.tensor(x)] + compiled.pack([p.numpy() for p in params["main"]])
    calls = collections.Counter()

    def count(_func, name, before, *_rest):
        if before:
            calls[name] += 1
        return 0

    vm.set_instrument(count)
    got = vm["main"](*args)
    got = (got if hasattr(got, "numpy") else got[0]).numpy()
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    copies = sum(n for name, n in calls.items() if name.startswith("concatenate"))
    assert copies == (0 if batch == 1 else 1)
    assert sum(n for name, n in calls.items() if name.startswith("fused_concatenate")) == 1  # the output
