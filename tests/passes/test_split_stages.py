"""SplitStages: the layered main becomes one public function per stage plus a multi-device main."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from cachefit.errors import PlanError
from cachefit.passes.split_stages import SplitStages, multi_device_module, sanitize_name, stage_names

LLVM = tvm.target.Target({"kind": "llvm"})


@I.ir_module
class Residual:
    @R.function(private=True)
    def layer_0(x: R.Tensor((4, 8), "float32"), w0: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "layers.0"})
        with R.dataflow():
            gv = R.matmul(x, w0)
            R.output(gv)
        return gv

    @R.function(private=True)
    def layer_1(h: R.Tensor((4, 8), "float32"), w1: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "layers.1"})
        with R.dataflow():
            gv = R.nn.relu(R.matmul(h, w1))
            R.output(gv)
        return gv

    @R.function(private=True)
    def layer_2(a: R.Tensor((4, 8), "float32"), h: R.Tensor((4, 8), "float32"), w2: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"cachefit.layer": 2, "cachefit.layer_name": "layers.2"})
        with R.dataflow():
            gv = R.add(R.matmul(a, w2), h)
            R.output(gv)
        return gv

    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w0: R.Tensor((8, 8), "float32"), w1: R.Tensor((8, 8), "float32"), w2: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"num_input": 1})
        cls = Residual
        with R.dataflow():
            h = cls.layer_0(x, w0)
            a = cls.layer_1(h, w1)
            out = cls.layer_2(a, h, w2)
            R.output(out)
        return out


def test_residual_crossing_a_cut_is_two_live_tensors():
    """A residual from layer 0 to layer 2 crosses the cut after layer 1: stage 0 returns both tensors."""

    @I.ir_module
    class Expected:
        I.module_global_infos({"vdevice": [I.vdevice({"kind": "llvm"}, 0, "global"), I.vdevice({"kind": "llvm"}, 1, "global")]})

        @R.function(private=True)
        def layer_0(x: R.Tensor((4, 8), "float32"), w0: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "layers.0"})
            with R.dataflow():
                gv = R.matmul(x, w0)
                R.output(gv)
            return gv

        @R.function(private=True)
        def layer_1(h: R.Tensor((4, 8), "float32"), w1: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "layers.1"})
            with R.dataflow():
                gv = R.nn.relu(R.matmul(h, w1))
                R.output(gv)
            return gv

        @R.function(private=True)
        def layer_2(a: R.Tensor((4, 8), "float32"), h: R.Tensor((4, 8), "float32"), w2: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"cachefit.layer": 2, "cachefit.layer_name": "layers.2"})
            with R.dataflow():
                gv = R.add(R.matmul(a, w2), h)
                R.output(gv)
            return gv

        @R.function
        def stage_0(x: R.Tensor((4, 8), "float32"), w0: R.Tensor((8, 8), "float32"), w1: R.Tensor((8, 8), "float32")) -> R.Tuple(R.Tensor((4, 8), "float32"), R.Tensor((4, 8), "float32")):
            R.func_attr({"cachefit.stage": 0, "cachefit.first_layer": 0, "cachefit.last_layer": 1,
                         "cachefit.input_names": ["x"], "cachefit.param_names": ["w0", "w1"],
                         "cachefit.output_names": ["layers.0:0", "layers.1:0"], "num_input": 1})
            cls = Expected
            with R.dataflow():
                h = cls.layer_0(x, w0)
                a = cls.layer_1(h, w1)
                R.output(h, a)
            return (h, a)

        @R.function
        def stage_1(h: R.Tensor((4, 8), "float32"), a: R.Tensor((4, 8), "float32"), w2: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"cachefit.stage": 1, "cachefit.first_layer": 2, "cachefit.last_layer": 2,
                         "cachefit.input_names": ["layers.0:0", "layers.1:0"], "cachefit.param_names": ["w2"],
                         "cachefit.output_names": ["layers.2:0"], "num_input": 2})
            cls = Expected
            with R.dataflow():
                out = cls.layer_2(a, h, w2)
                R.output(out)
            return out

        @R.function
        def main(x: R.Tensor((4, 8), "float32", "llvm:0"), w0: R.Tensor((8, 8), "float32", "llvm:0"), w1: R.Tensor((8, 8), "float32", "llvm:0"), w2: R.Tensor((8, 8), "float32", "llvm:1")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                s0 = cls.stage_0(x, w0, w1)
                h = s0[0]
                a = s0[1]
                h1 = R.to_vdevice(h, "llvm:1")
                a1 = R.to_vdevice(a, "llvm:1")
                out = cls.stage_1(h1, a1, w2)
                R.output(out)
            return out

    after = SplitStages([(0, 1), (2, 2)])(Residual)
    tvm.ir.assert_structural_equal(after, Expected)
    assert stage_names(after) == ["stage_0", "stage_1"]


@I.ir_module
class Tied:
    @R.function(private=True)
    def layer_0(ids: R.Tensor((4, 8), "float32"), emb: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "embed"})
        with R.dataflow():
            gv = R.matmul(ids, emb)
            R.output(gv)
        return gv

    @R.function(private=True)
    def layer_1(h: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "layers.0"})
        with R.dataflow():
            gv = R.nn.relu(R.matmul(h, w))
            R.output(gv)
        return gv

    @R.function(private=True)
    def layer_2(h: R.Tensor((4, 8), "float32"), emb: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"cachefit.layer": 2, "cachefit.layer_name": "head"})
        with R.dataflow():
            gv = R.matmul(h, R.permute_dims(emb))
            R.output(gv)
        return gv

    @R.function
    def main(ids: R.Tensor((4, 8), "float32"), emb: R.Tensor((8, 8), "float32"), w: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"num_input": 1})
        cls = Tied
        with R.dataflow():
            h = cls.layer_0(ids, emb)
            h1 = cls.layer_1(h, w)
            out = cls.layer_2(h1, emb)
            R.output(out)
        return out


def test_tied_weight_is_a_parameter_of_both_stages():
    """A weight read by layers of two stages (tied embedding) is a parameter of each stage; main keeps it
    on the first stage's device and copies it to the later one."""

    @I.ir_module
    class Expected:
        I.module_global_infos({"vdevice": [I.vdevice({"kind": "llvm"}, 0, "global"), I.vdevice({"kind": "llvm"}, 1, "global")]})

        @R.function(private=True)
        def layer_0(ids: R.Tensor((4, 8), "float32"), emb: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "embed"})
            with R.dataflow():
                gv = R.matmul(ids, emb)
                R.output(gv)
            return gv

        @R.function(private=True)
        def layer_1(h: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "layers.0"})
            with R.dataflow():
                gv = R.nn.relu(R.matmul(h, w))
                R.output(gv)
            return gv

        @R.function(private=True)
        def layer_2(h: R.Tensor((4, 8), "float32"), emb: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"cachefit.layer": 2, "cachefit.layer_name": "head"})
            with R.dataflow():
                gv = R.matmul(h, R.permute_dims(emb))
                R.output(gv)
            return gv

        @R.function
        def stage_0(ids: R.Tensor((4, 8), "float32"), emb: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"cachefit.stage": 0, "cachefit.first_layer": 0, "cachefit.last_layer": 0,
                         "cachefit.input_names": ["ids"], "cachefit.param_names": ["emb"],
                         "cachefit.output_names": ["embed:0"], "num_input": 1})
            cls = Expected
            with R.dataflow():
                h = cls.layer_0(ids, emb)
                R.output(h)
            return h

        @R.function
        def stage_1(h: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 8), "float32"), emb: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"cachefit.stage": 1, "cachefit.first_layer": 1, "cachefit.last_layer": 2,
                         "cachefit.input_names": ["embed:0"], "cachefit.param_names": ["w", "emb"],
                         "cachefit.output_names": ["head:0"], "num_input": 1})
            cls = Expected
            with R.dataflow():
                h1 = cls.layer_1(h, w)
                out = cls.layer_2(h1, emb)
                R.output(out)
            return out

        @R.function
        def main(ids: R.Tensor((4, 8), "float32", "llvm:0"), emb: R.Tensor((8, 8), "float32", "llvm:0"), w: R.Tensor((8, 8), "float32", "llvm:1")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                h = cls.stage_0(ids, emb)
                h_1 = R.to_vdevice(h, "llvm:1")
                emb_1 = R.to_vdevice(emb, "llvm:1")
                out = cls.stage_1(h_1, w, emb_1)
                R.output(out)
            return out

    after = SplitStages([(0, 0), (1, 2)])(Tied)
    tvm.ir.assert_structural_equal(after, Expected)


@I.ir_module
class MultiIO:
    @R.function(private=True)
    def layer_0(x: R.Tensor((4, 8), "float32"), y: R.Tensor((4, 8), "float32"), w0: R.Tensor((8, 8), "float32")) -> R.Tuple(R.Tensor((4, 8), "float32"), R.Tensor((4, 8), "float32")):
        R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "embed"})
        with R.dataflow():
            h = R.add(R.matmul(x, w0), y)
            aux = R.nn.relu(h)
            gv = (h, aux)
            R.output(gv)
        return gv

    @R.function(private=True)
    def layer_1(h: R.Tensor((4, 8), "float32"), w1: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "layers.0"})
        with R.dataflow():
            gv = R.nn.relu(R.matmul(h, w1))
            R.output(gv)
        return gv

    @R.function(private=True)
    def layer_2(h: R.Tensor((4, 8), "float32"), y: R.Tensor((4, 8), "float32"), w2: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"cachefit.layer": 2, "cachefit.layer_name": "head"})
        with R.dataflow():
            gv = R.multiply(R.matmul(h, w2), y)
            R.output(gv)
        return gv

    @R.function
    def main(x: R.Tensor((4, 8), "float32"), y: R.Tensor((4, 8), "float32"), w0: R.Tensor((8, 8), "float32"), w1: R.Tensor((8, 8), "float32"), w2: R.Tensor((8, 8), "float32")) -> R.Tuple(R.Tensor((4, 8), "float32"), R.Tensor((4, 8), "float32")):
        R.func_attr({"num_input": 2})
        cls = MultiIO
        with R.dataflow():
            t = cls.layer_0(x, y, w0)
            h = t[0]
            aux = t[1]
            h1 = cls.layer_1(h, w1)
            out = cls.layer_2(h1, y, w2)
            gv = (out, aux)
            R.output(gv)
        return gv


def test_several_inputs_and_outputs_pass_through_stages():
    """Two model inputs, two outputs: the second input (read by the last layer) and the early output
    (made by layer 0) are passed through the middle stage; the last stage returns the model outputs."""

    @I.ir_module
    class Expected:
        I.module_global_infos({"vdevice": [I.vdevice({"kind": "llvm"}, 0, "global"), I.vdevice({"kind": "llvm"}, 1, "global"), I.vdevice({"kind": "llvm"}, 2, "global")]})

        @R.function(private=True)
        def layer_0(x: R.Tensor((4, 8), "float32"), y: R.Tensor((4, 8), "float32"), w0: R.Tensor((8, 8), "float32")) -> R.Tuple(R.Tensor((4, 8), "float32"), R.Tensor((4, 8), "float32")):
            R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "embed"})
            with R.dataflow():
                h = R.add(R.matmul(x, w0), y)
                aux = R.nn.relu(h)
                gv = (h, aux)
                R.output(gv)
            return gv

        @R.function(private=True)
        def layer_1(h: R.Tensor((4, 8), "float32"), w1: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "layers.0"})
            with R.dataflow():
                gv = R.nn.relu(R.matmul(h, w1))
                R.output(gv)
            return gv

        @R.function(private=True)
        def layer_2(h: R.Tensor((4, 8), "float32"), y: R.Tensor((4, 8), "float32"), w2: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"cachefit.layer": 2, "cachefit.layer_name": "head"})
            with R.dataflow():
                gv = R.multiply(R.matmul(h, w2), y)
                R.output(gv)
            return gv

        @R.function
        def stage_0(x: R.Tensor((4, 8), "float32"), y: R.Tensor((4, 8), "float32"), w0: R.Tensor((8, 8), "float32")) -> R.Tuple(R.Tensor((4, 8), "float32"), R.Tensor((4, 8), "float32"), R.Tensor((4, 8), "float32")):
            R.func_attr({"cachefit.stage": 0, "cachefit.first_layer": 0, "cachefit.last_layer": 0,
                         "cachefit.input_names": ["x", "y"], "cachefit.param_names": ["w0"],
                         "cachefit.output_names": ["y", "embed:0", "embed:1"], "num_input": 2})
            cls = Expected
            with R.dataflow():
                t = cls.layer_0(x, y, w0)
                h = t[0]
                aux = t[1]
                R.output(h, aux)
            return (y, h, aux)

        @R.function
        def stage_1(y: R.Tensor((4, 8), "float32"), h: R.Tensor((4, 8), "float32"), aux: R.Tensor((4, 8), "float32"), w1: R.Tensor((8, 8), "float32")) -> R.Tuple(R.Tensor((4, 8), "float32"), R.Tensor((4, 8), "float32"), R.Tensor((4, 8), "float32")):
            R.func_attr({"cachefit.stage": 1, "cachefit.first_layer": 1, "cachefit.last_layer": 1,
                         "cachefit.input_names": ["y", "embed:0", "embed:1"], "cachefit.param_names": ["w1"],
                         "cachefit.output_names": ["y", "embed:1", "layers.0:0"], "num_input": 3})
            cls = Expected
            with R.dataflow():
                h1 = cls.layer_1(h, w1)
                R.output(h1)
            return (y, aux, h1)

        @R.function
        def stage_2(y: R.Tensor((4, 8), "float32"), aux: R.Tensor((4, 8), "float32"), h1: R.Tensor((4, 8), "float32"), w2: R.Tensor((8, 8), "float32")) -> R.Tuple(R.Tensor((4, 8), "float32"), R.Tensor((4, 8), "float32")):
            R.func_attr({"cachefit.stage": 2, "cachefit.first_layer": 2, "cachefit.last_layer": 2,
                         "cachefit.input_names": ["y", "embed:1", "layers.0:0"], "cachefit.param_names": ["w2"],
                         "cachefit.output_names": ["head:0", "embed:1"], "num_input": 3})
            cls = Expected
            with R.dataflow():
                out = cls.layer_2(h1, y, w2)
                gv = (out, aux)
                R.output(gv)
            return gv

        @R.function
        def main(x: R.Tensor((4, 8), "float32", "llvm:0"), y: R.Tensor((4, 8), "float32", "llvm:0"), w0: R.Tensor((8, 8), "float32", "llvm:0"), w1: R.Tensor((8, 8), "float32", "llvm:1"), w2: R.Tensor((8, 8), "float32", "llvm:2")) -> R.Tuple(R.Tensor((4, 8), "float32"), R.Tensor((4, 8), "float32")):
            R.func_attr({"num_input": 2})
            cls = Expected
            with R.dataflow():
                s0 = cls.stage_0(x, y, w0)
                y0 = s0[0]
                h0 = s0[1]
                aux0 = s0[2]
                y_1 = R.to_vdevice(y0, "llvm:1")
                h_1 = R.to_vdevice(h0, "llvm:1")
                aux_1 = R.to_vdevice(aux0, "llvm:1")
                s1 = cls.stage_1(y_1, h_1, aux_1, w1)
                y1 = s1[0]
                aux1 = s1[1]
                h11 = s1[2]
                y_2 = R.to_vdevice(y1, "llvm:2")
                aux_2 = R.to_vdevice(aux1, "llvm:2")
                h1_2 = R.to_vdevice(h11, "llvm:2")
                gv = cls.stage_2(y_2, aux_2, h1_2, w2)
                R.output(gv)
            return gv

    after = SplitStages([(0, 0), (1, 1), (2, 2)])(MultiIO)
    tvm.ir.assert_structural_equal(after, Expected)


def test_pass_leaves_its_input_alone():
    """The pass builds a new module; the caller's module keeps its main."""
    main_before = Residual["main"]
    names_before = sorted(gv.name_hint for gv in Residual.get_global_vars())
    SplitStages([(0, 0), (1, 2)])(Residual)
    assert Residual["main"].same_as(main_before)
    assert sorted(gv.name_hint for gv in Residual.get_global_vars()) == names_before
    assert "vdevice" not in Residual.global_infos


THREE = [(0, 0), (1, 1), (2, 2)]


@pytest.mark.parametrize(
    "model, groups",
    [("Residual", [(0, 1), (2, 2)]), ("Residual", THREE), ("Tied", [(0, 0), (1, 2)]), ("Tied", THREE),
     ("MultiIO", THREE), ("MultiIO", [(0, 2)])],
)
def test_multi_device_main_matches_unpartitioned(model, groups):
    """The chaining main, run on one CPU device per stage, computes what the layered module computes."""
    mod = {"MultiIO": MultiIO, "Tied": Tied, "Residual": Residual}[model]
    rng = np.random.default_rng(0)
    args = [rng.standard_normal([int(d) for d in p.ty.shape]).astype("float32") for p in mod["main"].params]
    ref = relax.VirtualMachine(tvm.compile(mod, LLVM), tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args])

    split = multi_device_module(SplitStages(groups)(mod))
    devs = [tvm.cpu(i) for i in range(len(groups))]
    vm = relax.VirtualMachine(tvm.compile(split, LLVM), devs)
    placed = [tvm.runtime.tensor(a, devs[p.ty.vdevice.vdevice_id]) for a, p in zip(args, split["main"].params)]
    got = vm["main"](*placed)
    refs = [ref] if isinstance(ref, tvm.runtime.Tensor) else list(ref)
    gots = [got] if isinstance(got, tvm.runtime.Tensor) else list(got)
    assert len(gots) == len(refs)
    for g, r in zip(gots, refs):
        np.testing.assert_array_equal(g.numpy(), r.numpy())


@pytest.mark.parametrize(
    "groups, message",
    [
        ([(0, 0), (2, 2)], "expected it to start at layer 1"),
        ([(0, 1)], "model has 3 layers"),
        ([(0, 3)], "model has 3 layers"),
        ([(1, 2)], "expected it to start at layer 0"),
        ([], "at least one stage"),
    ],
)
def test_bad_groups_are_plan_errors(groups, message):
    with pytest.raises(PlanError, match=message):
        SplitStages(groups)(Residual)


def test_sanitize_name():
    assert sanitize_name("gpu_0/data_0") == "gpu_0_data_0"
    assert sanitize_name("layers.1:0") == "layers_1_0"
    assert sanitize_name("0x") == "t_0x"
