"""Shared machinery of the layering passes: flatten a layered ``main`` and outline binding ranges.

Not a pass itself: :mod:`discover_layers` and :mod:`merge_layers` use it. A *flat* main is one
dataflow block of operator bindings; a *layered* main (docs/layered-ir.md) is a chain of calls to
private ``layer_i`` functions. ``flatten`` goes from layered to flat and remembers, per binding, the
layer it came from; ``outline`` goes back for any contiguous grouping of the bindings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..errors import CachefitError


@mutator
class _Remap(PyExprMutator):
    """Replace variables by expressions (no other change)."""

    def __init__(self, mapping: dict):
        super().__init__()
        self.mapping = mapping

    def visit_var_(self, op):  # noqa: N802 (TVM's naming)
        return self.mapping.get(op, op)

    def visit_dataflow_var_(self, op):  # noqa: N802
        return self.mapping.get(op, op)


def remap(expr: relax.Expr, mapping: dict) -> relax.Expr:
    if not mapping:
        return expr
    return _Remap(mapping).visit_expr(expr)


@dataclass
class FlatMain:
    """main as one list of bindings. ``layer_of[k]`` is the layer binding k came from (or -1)."""

    params: list[relax.Var]
    num_input: int
    bindings: list[relax.VarBinding]
    layer_of: list[int]
    output: relax.Expr
    layer_names: list[str]
    attrs: dict


def main_block(func: relax.Function) -> tuple[list[relax.VarBinding], relax.Expr]:
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        raise CachefitError("main's body is not a sequence of binding blocks")
    bindings = []
    for block in body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                raise CachefitError("main holds a match_cast binding; cachefit expects static shapes")
            bindings.append(b)
    return bindings, body.body


def num_input(func: relax.Function) -> int:
    attrs = func.attrs
    if attrs is not None and "num_input" in attrs:
        return int(attrs["num_input"])
    return len(func.params)


def layer_functions(mod: tvm.IRModule) -> list[tuple[tvm.ir.GlobalVar, relax.Function]]:
    """The ``layer_i`` functions of a layered module, ordered by their ``cachefit.layer`` index."""
    out = []
    for gv, f in mod.functions.items():
        if isinstance(f, relax.Function) and f.attrs is not None and "cachefit.layer" in f.attrs:
            out.append((int(f.attrs["cachefit.layer"]), gv, f))
    out.sort(key=lambda t: t[0])
    return [(gv, f) for _, gv, f in out]


def is_layered(mod: tvm.IRModule) -> bool:
    return bool(layer_functions(mod))


def flatten(mod: tvm.IRModule) -> FlatMain:
    """Inline every layer call of main (a flat main stays as it is, all bindings in layer 0)."""
    main = mod["main"]
    bindings, out = main_block(main)
    layers = {gv: f for gv, f in layer_functions(mod)}
    names_by_gv = {gv: str(f.attrs["cachefit.layer_name"]) for gv, f in layers.items()}
    order = [gv for gv, _ in layer_functions(mod)]
    idx = {gv: i for i, gv in enumerate(order)}
    new_bindings: list[relax.VarBinding] = []
    layer_of: list[int] = []
    mapping: dict = {}
    for b in bindings:
        value = b.value
        if isinstance(value, relax.Call) and value.op in layers:
            fn = layers[value.op]
            args = [remap(a, mapping) for a in value.args]
            inner = dict(zip(fn.params, args))
            inner_bindings, inner_out = main_block(fn)
            for ib in inner_bindings:
                nv = relax.DataflowVar(ib.var.name, ib.var.ty)
                new_bindings.append(relax.VarBinding(nv, remap(ib.value, inner)))
                layer_of.append(idx[value.op])
                inner[ib.var] = nv
            mapping[b.var] = remap(inner_out, inner)
        elif isinstance(value, relax.TupleGetItem):
            tup = remap(value.tuple_value, mapping)
            if isinstance(tup, relax.Tuple):
                mapping[b.var] = tup.fields[value.index]
            else:
                nv = relax.DataflowVar(b.var.name, b.var.ty)
                new_bindings.append(relax.VarBinding(nv, relax.TupleGetItem(tup, value.index)))
                layer_of.append(layer_of[-1] if layer_of else 0)
                mapping[b.var] = nv
        else:
            nv = relax.DataflowVar(b.var.name, b.var.ty)
            new_bindings.append(relax.VarBinding(nv, remap(value, mapping)))
            layer_of.append(layer_of[-1] if layer_of else 0)
            mapping[b.var] = nv
    attrs = dict(main.attrs.items()) if main.attrs is not None else {}
    return FlatMain(
        params=list(main.params),
        num_input=num_input(main),
        bindings=new_bindings,
        layer_of=layer_of,
        output=remap(out, mapping),
        layer_names=[names_by_gv[gv] for gv in order] if order else ["model"],
        attrs=attrs,
    )


def _used_vars(expr) -> list:
    seen = []
    ids = set()

    def visit(e):
        if isinstance(e, (relax.Var, relax.DataflowVar)) and e not in ids:
            ids.add(e)
            seen.append(e)

    relax.analysis.post_order_visit(expr, visit)
    return seen


def outline(flat: FlatMain, segments: Sequence[tuple[int, int]], names: Sequence[str]) -> tvm.IRModule:
    """Build a layered module: segment i (first and last binding index, inclusive) becomes
    ``layer_i``; main chains them. The segments must cover the bindings in order."""
    if not segments or segments[0][0] != 0 or segments[-1][1] != len(flat.bindings) - 1 or any(
        segments[i][1] + 1 != segments[i + 1][0] for i in range(len(segments) - 1)
    ):
        raise CachefitError(f"layer segments {list(segments)} do not cover bindings 0..{len(flat.bindings) - 1} in order")
    weights = set(flat.params[flat.num_input:])
    seg_of: dict = {}
    for s, (a, b) in enumerate(segments):
        for k in range(a, b + 1):
            seg_of[flat.bindings[k].var] = s
    # last segment that uses each var (len(segments) for the model output)
    last_use: dict = {}
    for k, bnd in enumerate(flat.bindings):
        s = next(i for i, (a, b) in enumerate(segments) if a <= k <= b)
        for v in _used_vars(bnd.value):
            last_use[v] = max(last_use.get(v, -1), s)
    for v in _used_vars(flat.output):
        last_use[v] = len(segments)

    bb = relax.BlockBuilder()
    sigs = []
    for s, (a, b) in enumerate(segments):
        own = [flat.bindings[k] for k in range(a, b + 1)]
        defined = {bd.var for bd in own}
        acts, wts = [], []
        for bd in own:
            for v in _used_vars(bd.value):
                if v in defined or v in acts or v in wts:
                    continue
                (wts if v in weights else acts).append(v)
        outs = [bd.var for bd in own if last_use.get(bd.var, -1) > s]
        if not outs:
            raise CachefitError(f"layer {names[s]!r} (bindings {a}..{b}) produces nothing used later")
        params = [relax.Var(v.name, v.ty) for v in acts + wts]
        mapping = dict(zip(acts + wts, params))
        with bb.function(f"layer_{s}", params, attrs={"cachefit.layer": s, "cachefit.layer_name": names[s]}, private=True):
            with bb.dataflow():
                for bd in own:
                    nv = bb.emit(remap(bd.value, mapping), name_hint=bd.var.name)
                    mapping[bd.var] = nv
                res = [mapping[o] for o in outs]
                ret = bb.emit_output(res[0] if len(res) == 1 else relax.Tuple(res))
            gv = bb.emit_func_output(ret)
        sigs.append((gv, acts, wts, outs))

    params = [relax.Var(p.name, p.ty) for p in flat.params]
    env = dict(zip(flat.params, params))
    attrs = dict(flat.attrs)
    attrs["num_input"] = flat.num_input
    with bb.function("main", params, attrs=attrs):
        with bb.dataflow():
            for gv, acts, wts, outs in sigs:
                call = bb.emit(relax.Call(gv, [env[v] for v in acts + wts]))
                if len(outs) == 1:
                    env[outs[0]] = call
                else:
                    for j, o in enumerate(outs):
                        env[o] = bb.emit(relax.TupleGetItem(call, j))
            ret = bb.emit_output(remap(flat.output, env))
        bb.emit_func_output(ret)
    return relax.transform.CanonicalizeBindings()(bb.get())


def copy_module_attrs(src: tvm.IRModule, dst: tvm.IRModule) -> tvm.IRModule:
    if src.attrs is not None:
        for k, v in src.attrs.items():
            dst = dst.with_attr(k, v)
    return dst


def op_exists(name: str) -> bool:
    """Whether this TVM build registers the Relax operator ``name``."""
    try:
        tvm.ir.Op.get(name)
        return True
    except Exception:
        return False
