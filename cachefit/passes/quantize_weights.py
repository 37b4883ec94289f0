"""Weight-only INT8 / INT4 quantization of the matmul and conv2d weights of a layered module."""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import tvm
from tvm import relax, te

from ..errors import CachefitError
from . import keeps_errors, layering

log = logging.getLogger(__name__)

#: function attributes of a layer that describe its old contents (AnnotateFootprint's); a rewritten
#: layer drops them so that nobody reads stale figures before the footprints are computed again
FOOTPRINT_ATTRS = (
    "cachefit.weight_bytes", "cachefit.activation_bytes", "cachefit.buffer_bytes", "cachefit.in_bytes",
    "cachefit.out_bytes", "cachefit.flops", "cachefit.bytes_moved", "cachefit.params", "cachefit.num_weights",
)
#: block name (and PrimFunc attribute ``cachefit.weight_decode``) of the kernel that decodes a quantized
#: conv weight: the footprint analysis counts no bytes for its result, which the compiled CPU
#: convolution reads through (see cachefit.passes.annotate_footprint)
WEIGHT_DECODE = "weight_decode"   # no "cachefit_" prefix: CPU schedules keep such blocks at the root
WEIGHT_DECODE_ATTR = "cachefit.weight_decode"
#: PrimFunc attribute: the multiply-adds x 2 of a fused dequantize-matmul kernel (FLOPs of the
#: matmul it replaces); see :func:`call_tir_flops`
FLOPS_ATTR = "cachefit.flops"
_FLOAT = ("float32", "float16", "bfloat16", "float64")
#: clipping ratios searched per group by :func:`quantize_array` (1 = absmax)
CLIP_RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(17))   # 1.0 .. 0.6
#: weight-name patterns that ``--quantize int4`` mixed precision keeps at INT8: MoE routers (a
#: rounding error there flips which experts run; they are [hidden, experts], a negligible size)
SENSITIVE_INT8 = ("*router*", "*gate.weight", "*.gate")


# ---------------------------------------------------------------------------------------------
# Numbers: the quantization scheme on numpy arrays
# ---------------------------------------------------------------------------------------------


def num_groups(k: int, group_size: int | None) -> int:
    """Groups along the reduction axis of length ``k`` (one group per output channel without a size)."""
    return 1 if not group_size else -(-k // int(group_size))


def packed_rows(k: int, bits: int) -> int:
    """Rows of the stored integer matrix: ``k`` for INT8, ``ceil(k / 2)`` for INT4 (two per byte)."""
    return k if bits == 8 else -(-k // 2)


def quantize_array(w: np.ndarray, bits: int, group_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weight-only quantization of ``w`` [K, N] along K (K is the reduction axis).

    Per output channel (``group_size`` None: one scale per column) or group-wise (one scale per
    ``group_size`` consecutive rows of a column; the last group may be shorter).
    q = round(w / scale) clipped to [-qmax, qmax] (qmax 127 for INT8, 7 for INT4), with
    scale = c * max|w| / qmax over the group, c the clipping ratio among ``CLIP_RATIOS`` with the
    smallest squared error of the group (c = 1 is plain absmax scaling; clipping the few largest
    values buys a finer step for all the others); an all-zero group gets scale 1.

    Returns ``(q, scale)``: INT8 ``q`` is int8 [K, N]; INT4 ``q`` is uint8 [ceil(K/2), N] holding
    ``q + 8`` of row ``2i`` in the low nibble and of row ``2i + 1`` in the high nibble (an odd K
    is padded with a zero row). ``scale`` is float32 [G, N].
    """
    if bits not in (8, 4):
        raise CachefitError(f"unsupported weight bits {bits}: use 8 or 4")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise CachefitError(f"quantize_array expects a [K, N] matrix, got shape {list(w.shape)}")
    k, n = w.shape
    g = int(group_size) if group_size else k
    groups = num_groups(k, group_size)
    padded = np.zeros((groups * g, n), np.float32)
    padded[:k] = w
    wg = padded.reshape(groups, g, n)
    scale = np.stack([group_scale(wg[i], bits) for i in range(groups)])
    q = quantize_rows(padded, np.repeat(scale, g, axis=0), bits)[:k]
    return pack(q, bits), scale


def qmax_of(bits: int) -> int:
    """The largest stored magnitude: 127 (INT8) or 7 (INT4)."""
    return 127 if bits == 8 else 7


def group_scale(block: np.ndarray, bits: int) -> np.ndarray:
    """The float32 scale [N] of each column of one group ``block`` [g, N]: c * max|w| / qmax with
    the clipping ratio c among ``CLIP_RATIOS`` of least squared error (1 for an all-zero column)."""
    block = np.asarray(block, np.float32)
    qmax = qmax_of(bits)
    amax = np.abs(block).max(axis=0)
    scale = best_err = None
    for c in CLIP_RATIOS:
        s = (amax * np.float32(c) / np.float32(qmax)).astype(np.float32)
        s[s == 0] = 1.0
        err = np.square(np.clip(np.rint(block / s), -qmax, qmax) * s - block).sum(axis=0)
        if scale is None:
            scale, best_err = s, err
        else:
            better = err < best_err
            scale = np.where(better, s, scale)
            best_err = np.where(better, err, best_err)
    return scale.astype(np.float32)


def quantize_rows(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """round(w / scale) clipped to [-qmax, qmax] (``scale`` broadcast against ``w``), as float32."""
    qmax = qmax_of(bits)
    return np.clip(np.rint(np.asarray(w, np.float32) / scale), -qmax, qmax).astype(np.float32)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """The stored integers of the quantized values ``q`` [K, N]: int8 [K, N] for INT8; for INT4
    uint8 [ceil(K/2), N] with ``q + 8`` of row 2i in the low nibble and of row 2i+1 in the high one."""
    if bits == 8:
        return q.astype(np.int8)
    k, n = q.shape
    u = (q + 8).astype(np.uint8)
    if k % 2:
        u = np.concatenate([u, np.full((1, n), 8, np.uint8)])
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


def dequantize_array(q: np.ndarray, scale: np.ndarray, bits: int, k: int, group_size: int | None = None) -> np.ndarray:
    """The float32 [K, N] matrix that :func:`quantize_array`'s ``(q, scale)`` stand for."""
    if bits == 8:
        v = q.astype(np.float32)
    else:
        lo = (q & 15).astype(np.float32) - 8
        hi = (q >> 4).astype(np.float32) - 8
        v = np.empty((2 * q.shape[0], q.shape[1]), np.float32)
        v[0::2], v[1::2] = lo, hi
        v = v[:k]
    g = int(group_size) if group_size else k
    rows = np.arange(k) // g
    return v * scale[rows]


def quantized_bytes(k: int, n: int, bits: int, group_size: int | None) -> int:
    """Stored bytes of one quantized [K, N] weight: the integers plus the float32 scales."""
    return packed_rows(k, bits) * n + num_groups(k, group_size) * n * 4


# ---------------------------------------------------------------------------------------------
# Kernels: dequantize inside the consumer
# ---------------------------------------------------------------------------------------------


def _i64(v) -> tvm.tirx.IntImm:
    return tvm.tirx.IntImm("int64", int(v))


def _dequant_expr(q, s, kk, j, bits: int, group_size: int):
    """float32 value of element (kk, j) of the logical [K, N] weight stored as (q, s)."""
    if bits == 8:
        v = q[kk, j].astype("float32")
    else:
        byte = q[kk // _i64(2), j]
        shift = ((kk % _i64(2)) * _i64(4)).astype("uint8")
        v = ((byte >> shift) & tvm.tirx.const(15, "uint8")).astype("float32") - tvm.tirx.const(8.0, "float32")
    return v * s[kk // _i64(group_size), j]


def dequant_matmul_func(x_shape, k: int, n: int, bits: int, group_size: int | None, dtype: str,
                        out_dtype: str) -> tvm.tirx.PrimFunc:
    """``out[..., j] = sum_k x[..., k] * dequant(q, scale)[k, j]``: one reduction block whose weight
    operand is decoded on the fly, so no float copy of the weight exists (op pattern
    out-element-wise-fusable: bias and activation epilogues still fuse into it)."""
    g = int(group_size) if group_size else k
    x = te.placeholder([_i64(d) for d in x_shape], dtype, name="x")
    q = te.placeholder((_i64(packed_rows(k, bits)), _i64(n)), "int8" if bits == 8 else "uint8", name="q")
    s = te.placeholder((_i64(num_groups(k, group_size)), _i64(n)), "float32", name="scale")
    r = te.reduce_axis((_i64(0), _i64(k)), name="k")

    def body(*idx):
        w = _dequant_expr(q, s, r, idx[-1], bits, g)
        xv = x[tuple(idx[:-1]) + (r,)]
        if out_dtype != dtype:
            xv = xv.astype(out_dtype)
        return te.sum(xv * w.astype(out_dtype), axis=r)

    out = te.compute(tuple(_i64(d) for d in x_shape[:-1]) + (_i64(n),), body, name="matmul")
    func = te.create_prim_func([x, q, s, out]).without_attr("global_symbol")
    rows = math.prod(int(d) for d in x_shape[:-1])
    return func.with_attrs({"op_pattern": 4, FLOPS_ATTR: tvm.tirx.IntImm("int64", 2 * rows * n * k)})


def dequant_conv_weight_func(shape, bits: int, group_size: int | None, dtype: str) -> tvm.tirx.PrimFunc:
    """The float OIHW conv2d weight from its quantized [I*H*W, O] form (an injective kernel that the
    CPU pipeline fuses into the convolution's GEMM, cachefit.codegen.cpu_legalize.FuseWeightPrologue)."""
    o, i, h, w = (int(d) for d in shape)
    k = i * h * w
    g = int(group_size) if group_size else k
    q = te.placeholder((_i64(packed_rows(k, bits)), _i64(o)), "int8" if bits == 8 else "uint8", name="q")
    s = te.placeholder((_i64(num_groups(k, group_size)), _i64(o)), "float32", name="scale")

    def body(oo, ii, hh, ww):
        kk = ii * _i64(h * w) + hh * _i64(w) + ww
        return _dequant_expr(q, s, kk, oo, bits, g).astype(dtype)

    out = te.compute(tuple(_i64(d) for d in (o, i, h, w)), body, name=WEIGHT_DECODE)
    return (te.create_prim_func([q, s, out]).without_attr("global_symbol")
            .with_attrs({"op_pattern": 2, WEIGHT_DECODE_ATTR: tvm.tirx.IntImm("int32", 1)}))


def dequant_flops(mod: tvm.IRModule, fn: relax.Function) -> tuple[int, int]:
    """FLOPs of the fused dequantize-matmul kernels ``fn`` calls, from their PrimFuncs'
    ``cachefit.flops``, and the elements of their outputs (what a FLOP count that sees an opaque
    ``call_tir`` as element-wise counts instead)."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    total = [0, 0]

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir) and isinstance(e.args[0], tvm.ir.GlobalVar):
            try:
                f = mod[e.args[0]]
            except Exception:  # noqa: BLE001 - not in this module
                return
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and FLOPS_ATTR in f.attrs:
                total[0] += int(f.attrs[FLOPS_ATTR])
                dims = _dims(e.ty)
                total[1] += math.prod(dims) if dims is not None else 0

    relax.analysis.post_order_visit(fn.body, visit)
    return total[0], total[1]


# ---------------------------------------------------------------------------------------------
# Facts: which weights can be quantized, and how
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightUse:
    """A weight of ``main`` that every consumer reads as a matmul / conv2d weight.

    kind:   ``kn`` (``matmul(x, W)``, W [K, N]), ``nk`` (``matmul(x, permute_dims(W))``, W [N, K]),
            ``oihw`` (``conv2d(x, W)``, per output channel O, reduction over I*H*W).
    k, n:   reduction length and output channels of the logical [K, N] matrix that is quantized.
    layers: indices of the layers that read it that way (and get the quantized weight).
    shared: other layers read it too, in other ways: they keep the float weight.
    """

    name: str
    shape: tuple
    dtype: str
    kind: str
    k: int
    n: int
    layers: tuple
    shared: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class QuantizedWeight:
    """What :class:`QuantizeWeights` did to one weight (plain data, for reports)."""

    name: str
    kind: str
    bits: int
    group_size: int | None
    q_name: str
    scale_name: str
    q_shape: tuple
    scale_shape: tuple
    bytes_before: int
    bytes_after: int
    k: int = 0   # rows of the logical [K, N] matrix (dequantize_array's ``k``)
    method: str = "rtn"   # "rtn" (round to nearest) or "gptq" (calibrated error compensation)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "bits": self.bits, "group_size": self.group_size, "k": self.k,
                "method": self.method,
                "q_name": self.q_name, "scale_name": self.scale_name, "q_shape": list(self.q_shape),
                "scale_shape": list(self.scale_shape), "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after}


def _dims(ty) -> tuple | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    try:
        return tuple(int(d) for d in ty.shape.values)
    except TypeError:
        return None


class _Ops:
    def __init__(self):
        self.matmul = tvm.ir.Op.get("relax.matmul")
        self.permute = tvm.ir.Op.get("relax.permute_dims")
        self.conv2d = tvm.ir.Op.get("relax.nn.conv2d")


def _param_roles(fn: relax.Function, ops: _Ops) -> dict:
    """Layer param -> set of roles: ``kn``, ``nk``, ``oihw`` or ``other`` (any other use)."""
    bindings, out = layering.main_block(fn)
    params = set(fn.params)
    roles: dict = {p: set() for p in fn.params}
    transposed: dict = {}  # var bound to permute_dims(P) -> P
    for b in bindings:
        v = b.value
        if (isinstance(v, relax.Call) and v.op.same_as(ops.permute) and v.args[0] in params
                and len(_dims(v.args[0].ty) or ()) == 2
                and (v.attrs.axes is None or [int(a) for a in v.attrs.axes] == [1, 0])):
            transposed[b.var] = v.args[0]
            continue
        for u in layering._used_vars(v):
            if u in transposed:
                ok = (isinstance(v, relax.Call) and v.op.same_as(ops.matmul) and v.args[1].same_as(u)
                      and not v.args[0].same_as(u))
                roles[transposed[u]].add("nk" if ok else "other")
            if u not in params:
                continue
            role = "other"
            if isinstance(v, relax.Call) and v.op.same_as(ops.matmul) and v.args[1].same_as(u) and not v.args[0].same_as(u):
                if len(_dims(u.ty) or ()) == 2 and str(v.args[0].ty.dtype) == str(u.ty.dtype):
                    role = "kn"
            elif (isinstance(v, relax.Call) and v.op.same_as(ops.conv2d) and v.args[1].same_as(u)
                  and not v.args[0].same_as(u) and str(v.attrs.kernel_layout) == "OIHW"
                  and len(_dims(u.ty) or ()) == 4 and str(v.args[0].ty.dtype) == str(u.ty.dtype)):
                role = "oihw"
            roles[u].add(role)
    for u in layering._used_vars(out):
        if u in roles:
            roles[u].add("other")
        if u in transposed:
            roles[transposed[u]].add("other")
    return roles


def _layer_calls(mod: tvm.IRModule) -> list[tuple[int, tvm.ir.GlobalVar, relax.Function, list]]:
    """(index, gv, function, call arguments in main) for every layer."""
    bindings, _ = layering.main_block(mod["main"])
    args = {}
    for b in bindings:
        if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.GlobalVar):
            args[b.value.op] = list(b.value.args)
    out = []
    for i, (gv, fn) in enumerate(layering.layer_functions(mod)):
        if gv not in args:
            raise CachefitError(f"layer {fn.attrs['cachefit.layer_name']} is never called from main")
        out.append((i, gv, fn, args[gv]))
    return out


def _select(layers, calls) -> set | None:
    """Layer indices selected by ``layers`` (indices or names); None: every layer."""
    if layers is None:
        return None
    names = {str(fn.attrs["cachefit.layer_name"]): i for i, _, fn, _ in calls}
    chosen = set()
    for item in layers:
        if isinstance(item, (int, np.integer)):
            if not 0 <= int(item) < len(calls):
                raise CachefitError(f"layer index {item} out of range: the model has {len(calls)} layers (0..{len(calls) - 1})")
            chosen.add(int(item))
        elif str(item) in names:
            chosen.add(names[str(item)])
        else:
            raise CachefitError(f"no layer named {item!r}; the layers are {', '.join(names)}")
    return chosen


def quantizable_weights(mod: tvm.IRModule, layers: Iterable | None = None) -> dict[str, WeightUse]:
    """The weights of ``main`` that some layer reads only as a matmul / dense / conv2d weight.

    ``WeightUse.layers`` are the layers (among ``layers``, indices or names; None: all) where every
    use of the weight is such an operand, all of one kind. When other layers read the weight too
    (an embedding table that a tied LM head multiplies), ``shared`` is True: those layers keep the
    float weight and the listed ones get a quantized copy.
    """
    if not layering.is_layered(mod):
        raise CachefitError("QuantizeWeights needs a layered module (run DiscoverLayers first)")
    ops = _Ops()
    main = mod["main"]
    weights = {p: p for p in main.params[layering.num_input(main):]}
    calls = _layer_calls(mod)
    chosen = _select(layers, calls)
    roles: dict = {}   # weight -> {layer: roles in that layer}
    for i, _gv, fn, args in calls:
        r = _param_roles(fn, ops)
        for p, a in zip(fn.params, args):
            if isinstance(a, relax.Var) and a in weights:
                roles.setdefault(a, {}).setdefault(i, set()).update(r[p] or {"unused"})
    out = {}
    for w, per_layer in roles.items():
        shape = _dims(w.ty)
        if shape is None or str(w.ty.dtype) not in _FLOAT:
            continue
        ok = {i: next(iter(rs)) for i, rs in per_layer.items()
              if len(rs) == 1 and next(iter(rs)) in ("kn", "nk", "oihw") and (chosen is None or i in chosen)}
        if not ok or len(set(ok.values())) != 1:
            continue
        kind = next(iter(ok.values()))
        if kind == "kn":
            k, n = shape
        elif kind == "nk":
            n, k = shape
        else:
            n, k = shape[0], shape[1] * shape[2] * shape[3]
        out[w.name] = WeightUse(w.name, shape, str(w.ty.dtype), kind, k, n, tuple(sorted(ok)),
                                shared=set(ok) != set(per_layer))
    return out


# ---------------------------------------------------------------------------------------------
# Rewriting a layered module (shared with PruneWeights)
# ---------------------------------------------------------------------------------------------


def unique_name(taken: set, base: str) -> str:
    name, k = base, 1
    while name in taken:
        name = f"{base}_{k}"
        k += 1
    taken.add(name)
    return name


def rebuild_layered(
    mod: tvm.IRModule,
    new_layers: Mapping[tvm.ir.GlobalVar, relax.Function],
    expansion: Mapping[str, list[tuple[str, relax.TensorType]]],
    new_funcs: Mapping[tvm.ir.GlobalVar, tvm.tirx.PrimFunc] | None = None,
    expanded: Mapping[tvm.ir.GlobalVar, set] | None = None,
) -> tvm.IRModule:
    """A new module where some layer functions and some of ``main``'s weights are replaced.

    new_layers: layer GlobalVar -> its new function. Where the old layer's parameter ``i`` received
                a main weight it expands (see ``expanded``), the new function has
                ``len(expansion[name])`` parameters in its place (in that order); every other
                parameter is kept as is.
    expansion:  main weight name -> the (name, type) list of the weights that replace it. A weight
                that some layer still reads as it is stays a parameter of ``main``, the new ones
                right after it; otherwise they take its place.
    new_funcs:  extra functions (kernels the new layers call) to add to the module.
    expanded:   rewritten layer -> the names in ``expansion`` it takes expanded (default: every
                name in ``expansion`` it reads).
    The input module is not modified.
    """
    main_gv = mod.get_global_var("main")
    main = mod["main"]
    n_in = layering.num_input(main)
    bindings, out = layering.main_block(main)
    calls = [b.value for b in bindings if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.GlobalVar)]

    def expands(gv, name) -> bool:
        if gv not in new_layers:
            return False
        return name in expanded[gv] if expanded is not None and gv in expanded else True

    still_read = {a.name for c in calls for a in c.args
                  if isinstance(a, relax.Var) and a.name in expansion and not expands(c.op, a.name)}
    env: dict = {}      # main param -> the new params a call that expands it passes
    var_map: dict = {}  # main param -> its new var, where it stays
    params = []
    for k, p in enumerate(main.params):
        if k >= n_in and p.name in expansion:
            vs = [relax.Var(nm, ty) for nm, ty in expansion[p.name]]
            env[p] = vs
            if p.name in still_read:
                var_map[p] = relax.Var(p.name, p.ty)
                params.append(var_map[p])
            params += vs
        else:
            var_map[p] = relax.Var(p.name, p.ty)
            params.append(var_map[p])
    gv_map = {}
    for gv, fn in new_layers.items():
        ngv = tvm.ir.GlobalVar(gv.name_hint)
        relax.expr._update_type(ngv, fn.ty)
        gv_map[gv] = ngv

    bb = relax.BlockBuilder()
    attrs = {k: v for k, v in main.attrs.items() if k != "global_symbol"} if main.attrs is not None else {}
    with bb.function("main", params, attrs=attrs):
        with bb.dataflow():
            for b in bindings:
                v = b.value
                if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.GlobalVar):
                    args = []
                    for a in v.args:
                        if isinstance(a, relax.Var) and a in env and expands(v.op, a.name):
                            args += env[a]
                        else:
                            args.append(layering.remap(a, var_map))
                    value = relax.Call(gv_map.get(v.op, v.op), args)
                else:
                    value = layering.remap(v, var_map)
                emit = bb.emit if isinstance(b.var, relax.DataflowVar) else bb.emit_output
                var_map[b.var] = emit(value, name_hint=b.var.name)
            ret = layering.remap(out, var_map)
        bb.emit_func_output(ret)
    new_main = bb.get()["main"]
    new_main_gv = tvm.ir.GlobalVar("main")
    relax.expr._update_type(new_main_gv, new_main.ty)

    funcs = {}
    for gv, fn in mod.functions_items():
        if gv.same_as(main_gv):
            funcs[new_main_gv] = new_main
        elif gv in gv_map:
            funcs[gv_map[gv]] = new_layers[gv]
        else:
            funcs[gv] = fn
    for gv, fn in (new_funcs or {}).items():
        funcs[gv] = fn
    result = tvm.IRModule(funcs, attrs=mod.attrs)
    for key, infos in mod.global_infos.items():
        result.update_global_info(key, infos)
    return result


def rewrite_layer(
    fn: relax.Function,
    gv: tvm.ir.GlobalVar,
    param_types: Callable[[relax.Var], list[tuple[str, relax.TensorType]] | None],
    rewrite: Callable[[relax.BlockBuilder, relax.VarBinding, dict, Callable], relax.Expr | None],
) -> relax.Function:
    """Re-emit a layer function with some parameters replaced.

    param_types(p): the (name, type) list replacing parameter ``p`` (None: keep it).
    rewrite(bb, binding, new_params_of, remap): the new value of a binding (emitted under the
        binding's name), ``SKIP`` to drop it, or None to re-emit it with its variables remapped.
        ``new_params_of[p]`` is the list of new parameters replacing ``p``.
    The footprint attributes are dropped (see FOOTPRINT_ATTRS); the types of the re-emitted
    bindings are inferred again (shapes may change).
    """
    params, replaced, var_map = [], {}, {}
    for p in fn.params:
        types = param_types(p)
        if types is None:
            np_ = relax.Var(p.name, p.ty)
            var_map[p] = np_
            params.append(np_)
        else:
            vs = [relax.Var(nm, ty) for nm, ty in types]
            replaced[p] = vs
            if len(vs) == 1:
                var_map[p] = vs[0]
            params += vs
    bindings, out = layering.main_block(fn)
    attrs = {k: v for k, v in fn.attrs.items() if k not in FOOTPRINT_ATTRS and k != "global_symbol"}
    bb = relax.BlockBuilder()
    with bb.function(gv.name_hint, params, attrs=attrs, private=True):
        with bb.dataflow():
            for b in bindings:
                value = rewrite(bb, b, replaced, lambda e: layering.remap(e, var_map))
                if value is SKIP:
                    continue
                if value is None:
                    value = layering.remap(b.value, var_map)
                emit = bb.emit if isinstance(b.var, relax.DataflowVar) else bb.emit_output
                var_map[b.var] = emit(value, name_hint=b.var.name)
            ret = layering.remap(out, var_map)
        bb.emit_func_output(ret)
    return bb.get()[gv.name_hint]


SKIP = object()


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


@tvm.transform.module_pass(opt_level=0, name="QuantizeWeights")
class QuantizeWeights:
    """Weight-only symmetric INT8 / INT4 quantization of matmul, dense and conv2d weights.

    Every weight of ``main`` that a layer reads only as the weight operand of ``R.matmul(x, W)``,
    ``R.matmul(x, R.permute_dims(W))`` (ONNX ``Gemm`` with ``transB``) or ``R.nn.conv2d(x, W)``
    (OIHW) is replaced, in that layer, by two weights: the integers ``<name>_int8`` /
    ``<name>_int4`` and the float32 scales ``<name>_scale``. A weight that other layers read
    otherwise (a tied embedding table: ``take`` in ``embed``, a matmul in ``head``) stays float for
    them; the others read the quantized copy. The logical matrix is [K, N] with K the reduction axis
    (a ``permute_dims`` weight is stored transposed, a conv weight as [I*H*W, O]); scales are per
    output channel or per ``group_size`` rows of K (see :func:`quantize_array`).

    Inside the layer, a matmul becomes one ``call_tir`` of a kernel that decodes the weight while it
    accumulates (:func:`dequant_matmul_func`), so after fusion the stored weight is the only copy and
    the footprint analysis counts 1 (INT8) or 0.5 (INT4) bytes per value plus the scales. A conv2d
    reads its weight from a dequantize kernel (:func:`dequant_conv_weight_func`) that cachefit's CPU
    pipeline fuses into the convolution.

    Options:
        params:     weight name -> array (values None for a shape-only model: only the shapes and
                    dtypes change). After the pass runs, ``new_params`` holds the new dict.
        bits:       8 or 4.
        group_size: rows of K per scale; None for one scale per output channel.
        layers:     layer indices or names to quantize (None: every layer); a weight is quantized
                    only when every layer reading it is selected.
        hessians:   weight name -> X^T X [K, K] of the inputs that multiply it (a calibration run,
                    :func:`cachefit.passes.calibrate_weights.collect_hessians`): the matmul weights
                    that have one are quantized by GPTQ error compensation
                    (:func:`~cachefit.passes.calibrate_weights.gptq_quantize`) instead of round to
                    nearest; same stored format. None: data-free (round to nearest).
        int8_weights: fnmatch patterns of weight names kept at INT8 when ``bits`` is 4 (mixed
                    precision, e.g. ``["*router*"]``); see :data:`SENSITIVE_INT8`. The names are
                    the IR's (ONNX initializer names sanitised: ``layers.0.attn`` -> ``layers_0_attn``).
                    A pattern ``@<layer>`` matches the weights read by that layer (``@head``: the
                    LM head, whatever the export called its weight).
    ``quantized`` lists what was done (QuantizedWeight records, with their own ``bits``).
    """

    def __init__(self, params: Mapping | None = None, bits: int = 8, group_size: int | None = None,
                 layers: Iterable | None = None, hessians: Mapping | None = None,
                 int8_weights: Iterable[str] | None = None):
        if bits not in (8, 4):
            raise CachefitError(f"weight quantization to {bits} bits is not supported: use 8 (int8) or 4 (int4)")
        if group_size is not None and int(group_size) < 1:
            raise CachefitError(f"--group-size must be a positive number of rows, got {group_size}")
        self.params = dict(params or {})
        self.bits = int(bits)
        self.group_size = int(group_size) if group_size else None
        self.layers = list(layers) if layers is not None else None
        self.hessians = dict(hessians or {})
        self.int8_weights = [str(p) for p in (int8_weights or ())]
        self.new_params: dict | None = None
        self.quantized: list[QuantizedWeight] = []
        self._ops = _Ops()
        self._call_tir = tvm.ir.Op.get("relax.call_tir")

    @keeps_errors
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:  # noqa: ARG002
        uses = quantizable_weights(mod, self.layers)
        self.quantized = []
        self.new_params = dict(self.params)
        if not uses:
            log.info("QuantizeWeights: no weight to quantize")
            return mod
        taken = {gv.name_hint for gv in mod.get_global_vars()}
        names = {p.name for p in mod["main"].params}
        expansion: dict = {}
        layer_names = {i: str(fn.attrs["cachefit.layer_name"]) for i, _gv, fn, _args in _layer_calls(mod)}
        for name, u in uses.items():
            bits = 8 if self.bits == 4 and self._keeps_int8(name, u, layer_names) else self.bits
            g = self.group_size if self.group_size and self.group_size < u.k else None
            q_shape = (packed_rows(u.k, bits), u.n)
            s_shape = (num_groups(u.k, g), u.n)
            q_name = unique_name(names, f"{name}_int{bits}")
            s_name = unique_name(names, f"{name}_scale")
            expansion[name] = [(q_name, relax.TensorType(q_shape, "int8" if bits == 8 else "uint8")),
                               (s_name, relax.TensorType(s_shape, "float32"))]
            value = self.params.get(name)
            hess = self.hessians.get(name)
            method = "rtn"
            if value is not None:
                w = np.asarray(value).astype(np.float32)
                if u.kind == "nk":
                    w = w.T
                elif u.kind == "oihw":
                    w = w.reshape(u.n, u.k).T
                if hess is not None and u.kind in ("kn", "nk") and np.shape(hess) == (u.k, u.k):
                    from .calibrate_weights import gptq_quantize

                    q, s = gptq_quantize(np.ascontiguousarray(w), hess, bits, g)
                    method = "gptq"
                else:
                    if hess is not None:
                        log.warning("QuantizeWeights: the Hessian of %s is %s, not [%d, %d]: round to nearest",
                                    name, list(np.shape(hess)), u.k, u.k)
                    q, s = quantize_array(np.ascontiguousarray(w), bits, g)
                self.new_params[q_name], self.new_params[s_name] = q, s
            else:
                self.new_params[q_name] = self.new_params[s_name] = None
            if not u.shared:
                self.new_params.pop(name, None)
            before = (u.numel * _bits(u.dtype) + 7) // 8
            self.quantized.append(QuantizedWeight(name, u.kind, bits, g, q_name, s_name, q_shape, s_shape,
                                                  before, quantized_bytes(u.k, u.n, bits, g), u.k, method))
        info = {q.name: q for q in self.quantized}

        kernels: dict = {}   # key -> (gv, func)

        existing = {gv.name_hint: gv for gv in mod.get_global_vars()}

        def kernel(key, make):
            """The GlobalVar of the kernel for ``key``: its name says what it computes, so the same
            kernel in another module (or already in this one) has the same name."""
            if key not in kernels:
                func = make()
                base = "_".join(str(k).replace(", ", "x").strip("()").replace(",", "") for k in key)
                old = existing.get(base)
                if old is not None and tvm.ir.structural_equal(mod[old], func):
                    kernels[key] = (old, None)
                    return old
                gv = tvm.ir.GlobalVar(unique_name(taken, base))
                relax.expr._update_type(gv, func.ty)
                kernels[key] = (gv, func)
            return kernels[key][0]

        new_layers, expanded = {}, {}
        for i, gv, fn, args in _layer_calls(mod):
            which = {p: a.name for p, a in zip(fn.params, args)
                     if isinstance(a, relax.Var) and a.name in info and i in uses[a.name].layers}
            if not which:
                continue
            new_layers[gv] = self._rewrite(fn, gv, which, info, uses, expansion, kernel)
            expanded[gv] = set(which.values())
        out = rebuild_layered(mod, new_layers, expansion, {gv: f for gv, f in kernels.values() if f is not None},
                              expanded)
        log.info("QuantizeWeights: %d weight(s) to INT%d in %d layer(s)", len(self.quantized), self.bits, len(new_layers))
        return out

    def _keeps_int8(self, name: str, use: WeightUse, layer_names: dict) -> bool:
        """``name`` matches an ``int8_weights`` pattern, or every layer that reads it quantized
        matches an ``@layer`` pattern."""
        for pat in self.int8_weights:
            if pat.startswith("@"):
                if use.layers and all(fnmatch.fnmatchcase(layer_names[i], pat[1:]) for i in use.layers):
                    return True
            elif fnmatch.fnmatchcase(name, pat):
                return True
        return False

    def _rewrite(self, fn, gv, which, info, uses, expansion, kernel):
        ops = self._ops
        transposed: dict = {}

        def param_types(p):
            return expansion[which[p]] if p in which else None

        def rewrite(bb, b, replaced, remap):
            v = b.value
            if not isinstance(v, relax.Call):
                return None
            if v.op.same_as(ops.permute) and v.args[0] in replaced:
                transposed[b.var] = v.args[0]
                return SKIP
            if v.op.same_as(ops.matmul) and (v.args[1] in replaced or v.args[1] in transposed):
                p = v.args[1] if v.args[1] in replaced else transposed[v.args[1]]
                q, s = replaced[p]
                qi, u = info[which[p]], uses[which[p]]
                bits = qi.bits
                x = remap(v.args[0])
                x_shape = _dims(x.ty)
                out_ty = b.var.ty
                dtype, out_dtype = str(x.ty.dtype), str(out_ty.dtype)
                key = (f"cachefit_dequant_matmul_int{bits}", f"g{qi.group_size or 0}", tuple(x_shape), u.k, u.n, dtype, out_dtype)
                kgv = kernel(key, lambda: dequant_matmul_func(x_shape, u.k, u.n, bits, qi.group_size, dtype, out_dtype))
                return relax.call_tir(kgv, [x, q, s], relax.TensorType(_dims(out_ty), out_dtype))
            if v.op.same_as(ops.conv2d) and v.args[1] in replaced:
                p = v.args[1]
                q, s = replaced[p]
                qi, u = info[which[p]], uses[which[p]]
                bits = qi.bits
                key = (f"cachefit_dequantize_int{bits}", f"g{qi.group_size or 0}", u.shape, u.dtype)
                kgv = kernel(key, lambda: dequant_conv_weight_func(u.shape, bits, qi.group_size, u.dtype))
                w = bb.emit(relax.call_tir(kgv, [q, s], relax.TensorType(u.shape, u.dtype)), name_hint=f"{p.name}_dq")
                return relax.Call(v.op, [remap(v.args[0]), w], v.attrs, getattr(v, "sinfo_args", None))
            return None

        new = rewrite_layer(fn, gv, param_types, rewrite)
        return new.with_attr("cachefit.weight_bits", self.bits)


def _bits(dtype: str) -> int:
    from .annotate_footprint import _BITS

    return _BITS.get(str(dtype), 32)


def quantize_weights(mod: tvm.IRModule, params: Mapping | None, bits: int = 8, group_size: int | None = None,
                     layers: Iterable | None = None, hessians: Mapping | None = None,
                     int8_weights: Iterable[str] | None = None) -> tuple[tvm.IRModule, dict, list[QuantizedWeight]]:
    """Run :class:`QuantizeWeights`; returns ``(module, new params, what was quantized)``."""
    from . import run_pass

    p = QuantizeWeights(params, bits=bits, group_size=group_size, layers=layers, hessians=hessians,
                        int8_weights=int8_weights)
    out = run_pass(p, mod)
    return out, p.new_params, list(p.quantized)
