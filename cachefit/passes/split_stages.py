"""SplitStages: cut a layered ``main`` into one public Relax function per stage."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..errors import ModelError, PlanError

__all__ = ["SplitStages", "stage_names", "multi_device_module", "sanitize_name"]


def sanitize_name(name: str) -> str:
    """An identifier-safe version of a tensor name (``gpu_0/data_0`` -> ``gpu_0_data_0``)."""
    text = re.sub(r"[^0-9A-Za-z_]", "_", str(name))
    if not text or text[0].isdigit():
        text = "t_" + text
    return text


def stage_names(mod: tvm.IRModule) -> list[str]:
    """The stage functions of a split module, in stage order (``["stage_0", "stage_1", ...]``)."""
    found = []
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function) and func.attrs is not None and "cachefit.stage" in func.attrs:
            found.append((int(func.attrs["cachefit.stage"]), gv.name_hint))
    return [name for _, name in sorted(found)]


@mutator
class _Rebind(PyExprMutator):
    """Replaces variables by the ones in ``mapping`` (old var -> new var), leaving the rest alone."""

    def __init__(self, mapping: dict):
        super().__init__()
        self.mapping = mapping

    def visit_var_(self, var):  # noqa: D401 - visitor hook
        return self.mapping.get(var, var)

    def visit_dataflow_var_(self, var):
        return self.mapping.get(var, var)


@dataclass
class _Binding:
    var: relax.Var
    value: relax.Expr
    stage: int = 0
    uses: list = field(default_factory=list)  # vars of main read by the value


def _free_vars(expr) -> list:
    return list(relax.analysis.free_vars(expr))


def _with_vdevice(sinfo, vdev):
    if isinstance(sinfo, relax.TensorType):
        if sinfo.shape is not None:
            return relax.TensorType(sinfo.shape, sinfo.dtype, vdev)
        return relax.TensorType(None, sinfo.dtype, vdev, ndim=sinfo.ndim)
    return sinfo


@tvm.transform.module_pass(opt_level=0, name="SplitStages")
class SplitStages:
    """Cut the layered ``main`` (docs/layered-ir.md) into one public function per stage.

    Options:
      groups:  ``[(first_layer, last_layer), ...]`` per stage, inclusive, contiguous, covering every
               layer ``0..n-1`` in order.
      target:  the target of the virtual devices of the multi-device ``main`` (``"llvm"``, ``"cuda"``,
               a dict or a ``tvm.target.Target``); one ``VDevice`` per stage, ``vdevice_id`` = stage index.

    Result: ``stage_i`` (public, attrs ``cachefit.stage``, ``cachefit.first_layer``,
    ``cachefit.last_layer``, ``cachefit.input_names``, ``cachefit.output_names``,
    ``cachefit.param_names``, ``num_input``) takes the tensors live across its incoming cut, then the
    weights its layers read (first-use order), and returns the tensors live across its outgoing cut (one
    tensor, or a tuple). Stage 0 takes the model inputs; the last stage returns the model outputs; a
    tensor crossing several cuts is passed through the stages between. The layer functions stay as
    they are. ``main`` keeps its signature and chains the stages, each on its own virtual device
    (parameters annotated with the vdevice of their first stage, ``R.to_vdevice`` before each later
    stage); see ``multi_device_module`` to compile it.
    """

    def __init__(self, groups: Sequence[tuple[int, int]], target=None):
        self.groups = [(int(a), int(b)) for a, b in groups]
        if target is None:
            target = {"kind": "llvm"}
        if isinstance(target, str):
            target = {"kind": target, "arch": "sm_90a"} if target == "cuda" else {"kind": target}
        self.target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)

    # -- step 1: read main ----------------------------------------------------------------------
    def _layer_index(self, mod, value):
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar):
            callee = mod[value.op]
            if isinstance(callee, relax.Function) and callee.attrs is not None and "cachefit.layer" in callee.attrs:
                return int(callee.attrs["cachefit.layer"]), str(callee.attrs.get("cachefit.layer_name", value.op.name_hint))
        return None

    def _check_groups(self, n_layers: int):
        groups = self.groups
        if not groups:
            raise PlanError("SplitStages needs at least one stage (groups is empty)")
        expect = 0
        for i, (a, b) in enumerate(groups):
            if a != expect or b < a:
                raise PlanError(
                    f"stage {i} covers layers {a}..{b}, but stages must be contiguous and non-empty: "
                    f"expected it to start at layer {expect} (groups: {groups})"
                )
            expect = b + 1
        if expect != n_layers:
            raise PlanError(
                f"the stages cover layers 0..{expect - 1} but the model has {n_layers} layers "
                f"(groups: {groups}); the last stage must end at layer {n_layers - 1}"
            )

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        main_gv = mod.get_global_var("main")
        main = mod[main_gv]
        num_input = int(main.attrs["num_input"]) if main.attrs is not None and "num_input" in main.attrs else len(main.params)
        inputs = list(main.params[:num_input])
        weights = list(main.params[num_input:])
        weight_set = set(weights)

        body = main.body
        if not isinstance(body, relax.SeqExpr):
            raise ModelError("SplitStages expects main's body to be a sequence of binding blocks (layered IR)")

        # Every binding of main, its stage, and the names of the tensors it defines.
        bindings: list[_Binding] = []
        producer: dict = {}  # var -> _Binding
        tensor_name: dict = {v: v.name for v in inputs}
        layer_of_var: dict = {}
        seen_layers = []
        k = len(self.groups)
        stage_of_layer = {}
        for s, (a, b) in enumerate(self.groups):
            for layer in range(a, b + 1):
                stage_of_layer[layer] = s
        for block in body.blocks:
            for binding in block.bindings:
                if not isinstance(binding, relax.VarBinding):
                    raise ModelError(f"SplitStages: main binds {binding.var.name} by pattern matching, "
                                     "which the layered IR does not allow")
                value = binding.value
                uses = [v for v in _free_vars(value)]
                rec = _Binding(binding.var, value, uses=uses)
                layer = self._layer_index(mod, value)
                if layer is not None:
                    idx, lname = layer
                    seen_layers.append(idx)
                    if idx not in stage_of_layer:
                        self._check_groups(idx + 1)  # raises with the numbers
                    rec.stage = stage_of_layer[idx]
                    layer_of_var[binding.var] = lname
                    tensor_name[binding.var] = f"{lname}:0"
                else:
                    rec.stage = max([producer[v].stage for v in uses if v in producer], default=0)
                    if isinstance(value, relax.TupleGetItem) and value.tuple_value in layer_of_var:
                        tensor_name[binding.var] = f"{layer_of_var[value.tuple_value]}:{value.index}"
                    elif isinstance(value, relax.Var) and value in tensor_name:  # an alias keeps the name
                        tensor_name[binding.var] = tensor_name[value]
                    else:
                        tensor_name.setdefault(binding.var, binding.var.name)
                producer[binding.var] = rec
                bindings.append(rec)
        if seen_layers != sorted(seen_layers) or len(set(seen_layers)) != len(seen_layers):
            raise ModelError(f"SplitStages: main calls the layers in the order {seen_layers}; the layered IR "
                             "calls each layer once, in index order")
        self._check_groups(len(seen_layers))
        if seen_layers != list(range(len(seen_layers))):
            raise ModelError(f"SplitStages: layer indices {seen_layers} are not 0..{len(seen_layers) - 1}")

        ret = body.body
        # The model outputs are read by the last stage.
        ret_uses = _free_vars(ret)

        # -- step 2: liveness across each cut -------------------------------------------------------
        last_use = {}  # var -> last stage reading it
        first_weight_stage: dict = {}
        stage_weights: list[list] = [[] for _ in range(k)]
        for rec in bindings:
            for v in rec.uses:
                if v in weight_set:
                    if v not in stage_weights[rec.stage]:
                        stage_weights[rec.stage].append(v)
                    first_weight_stage.setdefault(v, rec.stage)
                else:
                    last_use[v] = max(last_use.get(v, -1), rec.stage)
        for v in ret_uses:
            if v in weight_set:
                raise ModelError(f"SplitStages: main returns the weight {v.name} directly; a model output "
                                 "must be computed by a layer")
            last_use[v] = k - 1

        def def_stage(v):
            return producer[v].stage if v in producer else -1  # model inputs: before stage 0

        order = {v: i for i, v in enumerate(inputs)}
        for i, rec in enumerate(bindings):
            order[rec.var] = len(inputs) + i
        live = []  # live[s]: vars live across the cut after stage s (s = 0..k-2)
        for s in range(k - 1):
            cut = [v for v in order if def_stage(v) <= s and last_use.get(v, -1) > s]
            cut.sort(key=order.__getitem__)
            for v in cut:
                if not isinstance(v.ty, relax.TensorType):
                    raise ModelError(
                        f"SplitStages: {v.name} ({v.ty}) crosses the cut after stage {s} but is "
                        "not a tensor; only tensors can cross a cut (use TupleGetItem in the producer's stage)"
                    )
            live.append(cut)

        # -- step 3: the stage functions ------------------------------------------------------------
        vdevices = [relax.VDevice(self.target, s, "global") for s in range(k)]
        # a new module without the old main (the chaining main replaces it under the same name)
        base = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"}, attrs=mod.attrs)
        for key, infos in mod.global_infos.items():
            if key != "vdevice":
                base.update_global_info(key, infos)
        bb = relax.BlockBuilder(base)
        stage_gvs = []
        for s in range(k):
            acts_in = list(inputs) if s == 0 else live[s - 1]
            outs = live[s] if s < k - 1 else None
            mapping = {}
            params = []
            for v in acts_in:
                nv = relax.Var(sanitize_name(v.name), v.ty)
                mapping[v] = nv
                params.append(nv)
            for w in stage_weights[s]:
                nw = relax.Var(sanitize_name(w.name), w.ty)
                mapping[w] = nw
                params.append(nw)
            out_set = set(outs) if outs is not None else set(ret_uses)
            a, b = self.groups[s]
            attrs = {
                "cachefit.stage": s,
                "cachefit.first_layer": a,
                "cachefit.last_layer": b,
                "cachefit.input_names": [tensor_name[v] for v in acts_in],
                "cachefit.param_names": [w.name for w in stage_weights[s]],
                "num_input": len(acts_in),
            }
            name = f"stage_{s}"
            with bb.function(name, params, attrs, private=False):
                with bb.dataflow():
                    rebind = _Rebind(mapping)
                    for rec in bindings:
                        if rec.stage != s:
                            continue
                        value = rebind.visit_expr(rec.value)
                        if rec.var in out_set:
                            nv = bb.emit_output(value, name_hint=rec.var.name)
                        else:
                            nv = bb.emit(value, name_hint=rec.var.name)
                        mapping[rec.var] = nv
                if outs is None:
                    result = _Rebind(mapping).visit_expr(ret)
                    out_names = _output_names(ret, producer, tensor_name, layer_of_var)
                else:
                    fields = [mapping[v] for v in outs]
                    result = fields[0] if len(fields) == 1 else relax.Tuple(fields)
                    out_names = [tensor_name[v] for v in outs]
                gv = bb.emit_func_output(result)
            # output names are known only now; set them on the emitted function
            func = bb.get()[gv].with_attr("cachefit.output_names", out_names)
            bb.update_func(gv, func)
            stage_gvs.append(gv)

        # -- step 4: main chains the stages, one virtual device per stage ----------------------------
        main_params = []
        pmap = {}
        for v in inputs:
            nv = relax.Var(v.name, _with_vdevice(v.ty, vdevices[0]))
            pmap[v] = nv
            main_params.append(nv)
        for w in weights:
            nw = relax.Var(w.name, _with_vdevice(w.ty, vdevices[first_weight_stage.get(w, 0)]))
            pmap[w] = nw
            main_params.append(nw)
        with bb.function("main", main_params, dict(main.attrs) if main.attrs is not None else {"num_input": num_input}):
            with bb.dataflow():
                current = {v: pmap[v] for v in inputs}  # tensor -> var holding it on the previous stage's device
                result = None
                for s in range(k):
                    acts_in = list(inputs) if s == 0 else live[s - 1]
                    args = []
                    for v in acts_in:
                        x = current[v]
                        if s > 0:
                            x = bb.emit(relax.op.to_vdevice(x, vdevices[s]), name_hint=f"{sanitize_name(v.name)}_to_{s}")
                        args.append(x)
                    for w in stage_weights[s]:
                        x = pmap[w]
                        if first_weight_stage[w] != s:
                            x = bb.emit(relax.op.to_vdevice(x, vdevices[s]), name_hint=f"{sanitize_name(w.name)}_to_{s}")
                        args.append(x)
                    call = relax.Call(stage_gvs[s], args)
                    if s == k - 1:
                        result = bb.emit_output(call, name_hint="output")
                    else:
                        outs = live[s]
                        res = bb.emit(call, name_hint=f"stage_{s}_out")
                        current = {}
                        for j, v in enumerate(outs):
                            current[v] = res if len(outs) == 1 else bb.emit(relax.TupleGetItem(res, j), name_hint=v.name)
            bb.emit_func_output(result)
        out = bb.get()
        out.update_global_info("vdevice", vdevices)
        return out


def _output_names(expr, producer, tensor_name, layer_of_var) -> list[str]:
    """The names of the tensors a model output expression is made of, in order."""
    if isinstance(expr, relax.Tuple):
        return [n for f in expr.fields for n in _output_names(f, producer, tensor_name, layer_of_var)]
    if isinstance(expr, relax.Var):
        rec = producer.get(expr)
        if rec is not None and isinstance(rec.value, relax.Tuple):
            return _output_names(rec.value, producer, tensor_name, layer_of_var)
        if isinstance(expr.ty, relax.TupleType):
            base = layer_of_var.get(expr, expr.name)
            return [f"{base}:{i}" for i in range(len(expr.ty.fields))]
        return [tensor_name.get(expr, expr.name)]
    return [f"output_{0}"]


def multi_device_module(mod: tvm.IRModule) -> tvm.IRModule:
    """The split module ready to compile as one multi-device program (``main`` over all stages).

    Layer functions are inlined into the stages, each stage's parameters are hinted onto the stage's
    virtual device (``R.hint_on_device``) and ``RealizeVDevice`` propagates the devices, so every
    allocation of stage ``i`` lands on device ``i``. Run the result with
    ``relax.VirtualMachine(ex, [device_0, ..., device_k-1])``, passing each ``main`` parameter on the
    device of its ``vdevice`` annotation.
    """
    mod = relax.transform.InlinePrivateFunctions()(mod)
    vdevices = list(mod.global_infos.get("vdevice", []))
    funcs = dict(mod.functions_items())
    for gv, func in mod.functions_items():
        if not (isinstance(func, relax.Function) and func.attrs is not None and "cachefit.stage" in func.attrs):
            continue
        s = int(func.attrs["cachefit.stage"])
        vdev = vdevices[s]
        dev = tvm.runtime.Device(vdev.target.get_target_device_type(), s)
        hinted = {p: relax.Var(p.name + "_h", p.ty) for p in func.params}
        bound = func.bind_params(hinted)
        block = relax.BindingBlock([relax.VarBinding(h, relax.op.hint_on_device(p, dev)) for p, h in hinted.items()])
        body = relax.BlockBuilder().normalize(relax.SeqExpr([block, *bound.body.blocks], bound.body.body))
        funcs[gv] = relax.Function(func.params, body, None, func.is_pure, func.attrs)
    out = tvm.IRModule(funcs, attrs=mod.attrs)
    for key, infos in mod.global_infos.items():
        out.update_global_info(key, infos)
    return relax.transform.RealizeVDevice()(out)
