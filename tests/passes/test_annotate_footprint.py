"""AnnotateFootprint: exact per-layer bytes, FLOPs and cut sizes on a hand-checked module."""

import math
import re

import numpy as np
import pytest
import tvm
import tvm_ffi
from conftest import FLOAT, make_onnx_model
from onnx import helper, numpy_helper
from relax_fixtures import ConvLayer
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from cachefit.analysis import analyze_onnx, layer_records
from cachefit.passes.annotate_footprint import AnnotateFootprint
from cachefit.passes.layering import layer_functions


@I.ir_module
class TwoLayers:
    @R.function(private=True)
    def layer_0(x: R.Tensor((4, 8), "float32"), w0: R.Tensor((8, 16), "float32")) -> R.Tensor((4, 16), "float32"):
        R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "layers.0"})
        with R.dataflow():
            a = R.matmul(x, w0)
            b = R.nn.relu(a)
            R.output(b)
        return b

    @R.function(private=True)
    def layer_1(h: R.Tensor((4, 16), "float32"), w1: R.Tensor((16, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "layers.1"})
        with R.dataflow():
            y = R.matmul(h, w1)
            z = R.nn.softmax(y, axis=-1)
            R.output(z)
        return z

    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w0: R.Tensor((8, 16), "float32"), w1: R.Tensor((16, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"num_input": 1})
        cls = TwoLayers
        with R.dataflow():
            h = cls.layer_0(x, w0)
            z = cls.layer_1(h, w1)
            R.output(z)
        return z


def test_exact_values():
    """layer_0 fuses matmul+relu into one kernel: live are x (128 B) and its output (256 B); the
    matmul result before the relu stays inside the kernel as a 256 B buffer. layer_1's matmul and
    softmax are two kernels: h (256) + y (128) live at the first; softmax keeps max/exp/sum
    workspaces (16 + 128 + 16 = 160 B) inside its kernel. FLOPs: 2*M*N*K per matmul plus one per
    output element of the other ops; bytes moved: kernel inputs + outputs."""
    recs = layer_records(AnnotateFootprint()(TwoLayers))
    assert [r.name for r in recs] == ["layers.0", "layers.1"]
    r0, r1 = recs
    assert (r0.weight_bytes, r0.activation_bytes, r0.buffer_bytes) == (512, 384, 256)
    assert (r0.in_bytes, r0.out_bytes) == (128, 256)
    assert r0.params == {"w0": 512}
    assert r0.flops == 2 * 4 * 16 * 8 + 4 * 16
    assert r0.bytes_moved == 128 + 512 + 256
    assert (r1.weight_bytes, r1.activation_bytes, r1.buffer_bytes) == (512, 384, 160)
    assert (r1.in_bytes, r1.out_bytes) == (256, 128)
    assert r1.flops == 2 * 4 * 8 * 16 + 4 * 8
    assert r1.bytes_moved == (256 + 512 + 128) + (128 + 128)
    assert r0.weight_bits == 32


def test_dtype_override_halves_float_bytes():
    """--dtype bf16 plans every float tensor at 2 bytes: all byte figures halve, FLOPs do not."""
    full = layer_records(AnnotateFootprint()(TwoLayers))
    half = layer_records(AnnotateFootprint(dtype="bf16")(TwoLayers))
    for f, h in zip(full, half):
        assert h.weight_bytes * 2 == f.weight_bytes
        assert h.activation_bytes * 2 == f.activation_bytes
        assert h.buffer_bytes * 2 == f.buffer_bytes
        assert h.flops == f.flops
        assert h.weight_bits == 16


def test_tied_weight_counted_in_each_layer_that_reads_it():
    """A weight read by two layers appears in both layers' params (a group counts it once)."""

    @I.ir_module
    class Tied:
        @R.function(private=True)
        def layer_0(x: R.Tensor((2, 4), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "embed"})
            with R.dataflow():
                y = R.matmul(x, w)
                R.output(y)
            return y

        @R.function(private=True)
        def layer_1(y: R.Tensor((2, 4), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "head"})
            with R.dataflow():
                z = R.matmul(y, R.permute_dims(w))
                R.output(z)
            return z

        @R.function
        def main(x: R.Tensor((2, 4), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"num_input": 1})
            cls = Tied
            with R.dataflow():
                y = cls.layer_0(x, w)
                z = cls.layer_1(y, w)
                R.output(z)
            return z

    recs = layer_records(AnnotateFootprint()(Tied))
    assert recs[0].params == {"w": 64} and recs[1].params == {"w": 64}


def test_residual_crossing_a_layer_counts_in_the_cut():
    """x is read by layer_1 too: the cut between the layers carries both x and h."""

    @I.ir_module
    class Res:
        @R.function(private=True)
        def layer_0(x: R.Tensor((2, 4), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "a"})
            with R.dataflow():
                h = R.matmul(x, w)
                R.output(h)
            return h

        @R.function(private=True)
        def layer_1(h: R.Tensor((2, 4), "float32"), x: R.Tensor((2, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "b"})
            with R.dataflow():
                y = R.add(h, x)
                R.output(y)
            return y

        @R.function
        def main(x: R.Tensor((2, 4), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"num_input": 1})
            cls = Res
            with R.dataflow():
                h = cls.layer_0(x, w)
                y = cls.layer_1(h, x)
                R.output(y)
            return y

    r0, r1 = layer_records(AnnotateFootprint()(Res))
    assert r0.in_bytes == 32 and r0.out_bytes == 64 and r1.in_bytes == 64 and r1.out_bytes == 32
    assert r1.weight_bytes == 0 and r1.params == {}


def _planned_bytes(mod) -> int:
    seq = tvm.transform.Sequential([
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
    ])
    text = relax.analysis.estimate_memory_usage(seq(mod))
    m = re.search(r"With memory planning, there are \d+ constant-size memory allocation\(s\) with total size ([0-9.e+-]+) GB", text)
    assert m, text
    return round(float(m.group(1)) * 2**30)


def test_cross_check_with_tvm_static_memory_planning():
    """TVM's StaticPlanBlockMemory on the lowered layer_1 allocates y and z (128 B each): 256 B.
    cachefit's activation peak is 384 B: it also counts the caller-owned input h (256 B) live at the
    first kernel, and it does not count z separately because by then h is dead (peak, not total).
    TIR-internal workspaces (softmax: 160 B) appear in neither TVM's figure nor cachefit's
    activations; cachefit reports them as buffer_bytes. So planned == y + z, and
    activation_bytes == h + y."""
    fp = AnnotateFootprint()
    fp._mod = TwoLayers
    lowered = fp._lower(TwoLayers["layer_1"])
    planned = _planned_bytes(lowered)
    r1 = layer_records(AnnotateFootprint()(TwoLayers))[1]
    h, y, z = 256, 128, 128
    assert planned == y + z
    assert r1.activation_bytes == h + y
    assert r1.buffer_bytes == 160


def test_needs_a_layered_module():
    @I.ir_module
    class Flat:
        @R.function
        def main(x: R.Tensor((2,), "float32")) -> R.Tensor((2,), "float32"):
            return x

    from cachefit.errors import CachefitError
    from cachefit.passes import run_pass

    with pytest.raises(CachefitError, match="layered module"):
        run_pass(AnnotateFootprint(), Flat)


@pytest.mark.parametrize("bits,weight_bytes", [(8, 27 * 4 + 4 * 4), (4, 14 * 4 + 4 * 4)])
def test_quantized_conv_counts_stored_weights_and_no_decoded_copy(bits, weight_bytes):
    """A quantized conv's weight is the stored integers plus scales: [27, 4] int8 (108 B) or
    [14, 4] packed int4 (56 B), and [1, 4] float32 scales (16 B). Its decoded float weight
    ([4, 3, 3, 3] = 432 B) is neither weight, activation nor buffer: the CPU pipeline fuses the
    decode into the convolution (checked in the next test). The activation peak (input 768 B +
    conv output 576 B), the workspace and the FLOPs of the convolution are the float layer's;
    bytes moved drop by 432 B and add the stored bytes once. FLOPs add one per decoded value."""
    from cachefit.passes.quantize_weights import quantize_weights

    mod, _params, done = quantize_weights(ConvLayer, None, bits=bits)
    assert done[0].kind == "oihw" and done[0].bytes_after == weight_bytes
    (old,) = layer_records(AnnotateFootprint()(ConvLayer))
    (new,) = layer_records(AnnotateFootprint()(mod))
    assert (old.weight_bytes, old.activation_bytes) == (432, 768 + 576)
    assert new.weight_bytes == weight_bytes
    assert new.params == {f"w_int{bits}": weight_bytes - 16, "w_scale": 16}
    assert new.activation_bytes == old.activation_bytes
    assert new.buffer_bytes == old.buffer_bytes
    assert new.bytes_moved == old.bytes_moved - 432 + weight_bytes
    assert new.flops == old.flops + 4 * 27


def test_compiled_cpu_conv_reads_the_quantized_weight_without_a_float_copy():
    """The fact the footprint rule above relies on: after cachefit's CPU pipeline, the
    convolution kernel takes the int8 weight and the scales as inputs and allocates no
    float32 buffer of the weight's 108 values (stride 1: implicit GEMM; the decode is inlined)."""
    from cachefit.codegen.cpu_schedule import CPUSpec
    from cachefit.codegen.pipeline import cpu_passes, host_llvm_target
    from cachefit.passes.quantize_weights import quantize_weights

    mod, _params, _done = quantize_weights(ConvLayer, None, bits=8)
    target = host_llvm_target(tvm.target.Target({"kind": "llvm"}))
    with target:
        out = tvm.transform.Sequential(cpu_passes(target, CPUSpec.for_target(target, 1)))(mod)
    convs = [f for gv, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint]
    assert len(convs) == 1
    signature = convs[0].script().split("):\n")[0]
    assert 'T.Buffer((T.int64(27), T.int64(4)), "int8")' in signature
    assert 'T.Buffer((T.int64(1), T.int64(4)), "float32")' in signature
    allocs = []
    tvm_ffi.structural_walk(convs[0].body, [(tvm.s_tir.SBlock, lambda blk: allocs.extend(blk.alloc_buffers))])
    sizes = [math.prod(int(d) for d in b.shape) for b in allocs]
    assert sizes and 4 * 27 not in sizes


def _gemm_trans_b_model():
    """x [2, 8] -> Gemm(w1 [16, 8], b1 [16], transB=1) -> Relu -> Gemm(w2 [4, 16], transB=1) -> y
    [2, 4]: the importer reads each weight through ``permute_dims`` before its matmul."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
            for n, s in (("w1", (16, 8)), ("b1", (16,)), ("w2", (4, 16)))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    return make_onnx_model(nodes, [("x", FLOAT, [2, 8])], [("y", FLOAT, [2, 4])], init)


def _permuted_weights(fn) -> list:
    found = []
    permute = tvm.ir.Op.get("relax.permute_dims")
    relax.analysis.post_order_visit(
        fn.body, lambda e: found.append(e.args[0].name) if isinstance(e, relax.Call) and e.op.same_as(permute) else None)
    return found


def test_gemm_trans_b_weight_counted_once_and_its_transpose_not_an_activation():
    """Gemm(transB=1) imports as ``matmul(x, permute_dims(w))``; the transposed copy is not an
    activation (the CPU pipeline fuses it into the matmul, prepack runs it at compile time), takes
    no FLOPs, and the matmul's traffic reads the weight's bytes once.
    layer 0 (matmul + bias + relu, one kernel): weights w1 16*8*4 = 512 B + b1 64 B; activations
    x (2*8*4 = 64 B) + output (2*16*4 = 128 B) = 192 B; FLOPs 2*2*16*8 + 32 (add) + 32 (relu) = 576;
    bytes moved 64 + 512 + 64 + 128 = 768; workspace: the matmul and add results inside the
    kernel, 128 B each. layer 1: w2 256 B; activations 128 + 32 = 160 B; FLOPs 2*2*4*16 = 256;
    bytes moved 128 + 256 + 32 = 416. (Counting the transposes as tensors gave 704 / 416 B of
    activations, 704 / 320 FLOPs, 1792 / 928 B moved.)"""
    a = analyze_onnx(_gemm_trans_b_model())
    layers = dict(layer_functions(a.mod))
    assert [_permuted_weights(fn) for fn in layers.values()] == [["w1"], ["w2"]]  # the rule applies
    r0, r1 = a.layers
    assert r0.params == {"w1": 512, "b1": 64} and r0.weight_bytes == 576
    assert (r0.activation_bytes, r0.buffer_bytes, r0.flops, r0.bytes_moved) == (192, 256, 576, 768)
    assert (r0.in_bytes, r0.out_bytes) == (64, 128)
    assert r1.params == {"w2": 256} and r1.weight_bytes == 256
    assert (r1.activation_bytes, r1.buffer_bytes, r1.flops, r1.bytes_moved) == (160, 0, 256, 416)
    assert (r1.in_bytes, r1.out_bytes) == (128, 32)


def test_gemm_trans_b_cross_check_with_tvm_static_memory_planning():
    """TVM's own lowering of layer 0 (LegalizeOps + FuseOps, no weight prologue fusion) runs the
    transpose as a kernel: StaticPlanBlockMemory allocates the transposed w1 (512 B) and the output
    (128 B). With the re-layout read in place (what AnnotateFootprint analyses, and what
    cachefit's CPU pipeline compiles) it allocates the output only: 128 B. activation_bytes is
    that plus the caller-owned input x (64 B): the difference from TVM's generic figure is exactly
    the transposed copy."""
    a = analyze_onnx(_gemm_trans_b_model())
    (_gv0, fn0), _ = layer_functions(a.mod)
    fp = AnnotateFootprint()
    fp._mod = a.mod
    n_act = len(fn0.params) - int(fn0.attrs["cachefit.num_weights"])
    is_weight = [k >= n_act for k in range(len(fn0.params))]
    in_place, flags = fp.read_weights_in_place(fn0, is_weight)
    assert flags == is_weight + [True] and _permuted_weights(in_place) == []
    generic = _planned_bytes(fp._lower(fn0))
    planned = _planned_bytes(fp._lower(in_place))
    assert generic == 512 + 128
    assert planned == 128
    assert a.layers[0].activation_bytes == 64 + planned


def test_transposed_weight_read_twice_stays_an_activation():
    """The rule is narrow: a transposed weight read by two matmuls is a real tensor (the CPU
    pipeline's FuseWeightPrologue fuses single-use prologues only), counted. All tensors are
    [4, 4] float32 (64 B): x and w^T live at the transpose, x, w^T and y1 at the first matmul,
    w^T, y1 and y2 at the second: peak 192 B (128 B if w^T were read in place)."""

    @I.ir_module
    class TwoReads:
        @R.function(private=True)
        def layer_0(x: R.Tensor((4, 4), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor((4, 4), "float32"):
            R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "a"})
            with R.dataflow():
                wt = R.permute_dims(w)
                y1 = R.matmul(x, wt)
                y2 = R.matmul(y1, wt)
                R.output(y2)
            return y2

        @R.function
        def main(x: R.Tensor((4, 4), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor((4, 4), "float32"):
            R.func_attr({"num_input": 1})
            cls = TwoReads
            with R.dataflow():
                y = cls.layer_0(x, w)
                R.output(y)
            return y

    (r,) = layer_records(AnnotateFootprint()(TwoReads))
    assert r.weight_bytes == 64
    assert r.activation_bytes == 3 * 64
    assert r.flops == 2 * (2 * 4 * 4 * 4) + 16   # the transpose counts as work here


def test_compiled_cpu_gemm_reads_the_weight_in_place():
    """The fact the Gemm(transB=1) rule relies on: after cachefit's CPU pipeline each transpose is
    inside its matmul's kernel, which takes the [N, K] weight as it is stored and allocates no
    buffer of the transposed weight's N*K values (w1: 128, w2: 64)."""
    from cachefit.codegen.cpu_schedule import CPUSpec
    from cachefit.codegen.pipeline import cpu_passes, host_llvm_target

    a = analyze_onnx(_gemm_trans_b_model())
    target = host_llvm_target(tvm.target.Target({"kind": "llvm"}))
    with target:
        out = tvm.transform.Sequential(cpu_passes(target, CPUSpec.for_target(target, 1)))(a.mod)
    kernels = {gv.name_hint: f for gv, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert len(kernels) == 2 and all("transpose" in n and "matmul" in n for n in kernels)
    for f, (n, k) in zip(sorted(kernels.values(), key=lambda f: -len(f.params)), [(16, 8), (4, 16)]):
        signature = f.script().split("):\n")[0]
        assert f'T.Buffer((T.int64({n}), T.int64({k})), "float32")' in signature
        allocs = []
        tvm_ffi.structural_walk(f.body, [(tvm.s_tir.SBlock, lambda blk: allocs.extend(blk.alloc_buffers))])
        assert n * k not in [math.prod(int(d) for d in b.shape) for b in allocs]
