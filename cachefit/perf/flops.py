"""FLOPs and bytes moved of a Relax function, counted op by op from static shapes.

``count_function(func, mod)`` walks the function's bindings (and, through ``mod``, the private
functions it calls, such as the ``layer_i`` functions of the layered IR) and returns an
:class:`OpCount`. The footprint analysis fills ``LayerRecord.flops`` and ``bytes_moved`` from it.

FLOPs (a multiply-add is 2):

* ``matmul`` ``[..., M, K] x [..., K, N]``: ``2 * prod(out) * K``;
* ``nn.conv1d/2d/3d``: ``2 * prod(out) * prod(weight.shape[1:])`` (``Cin/groups * kernel``);
  ``conv*_transpose``: ``2 * prod(input) * prod(weight.shape[1:])``;
* ``nn.attention`` ``q[B,S,H,D], k[B,T,H,D], v[B,T,H,Dv]``: ``2*B*H*S*T*(D + Dv)`` + softmax;
* ``einsum``: ``2 * prod(every index's extent)`` for two operands;
* element-wise ops: 1 per output element, except the per-element costs in ``_PER_ELEMENT``
  (softmax 5, layer norm 8, GELU 8, ...); reductions: 1 per input element;
* pooling: ``prod(out) * prod(pool_size)``; data movement and ``call_tir``: 0.

Bytes moved: every op reads its tensor arguments and writes its output once (unfused: an upper
bound of the traffic after fusion); view-like ops (reshape, squeeze, expand_dims, flatten) move
nothing. ``weight_bytes_read`` is the part of the reads that are the function's weight
parameters (those after ``num_input``).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# per-element FLOPs of compound element-wise ops
_PER_ELEMENT = {
    "relax.nn.softmax": 5, "relax.nn.log_softmax": 6, "relax.nn.layer_norm": 8, "relax.nn.rms_norm": 6,
    "relax.nn.group_norm": 8, "relax.nn.batch_norm": 4, "relax.nn.instance_norm": 8,
    "relax.nn.gelu": 8, "relax.nn.gelu_tanh": 10, "relax.nn.silu": 4, "relax.sigmoid": 4, "relax.tanh": 6,
    "relax.erf": 6, "relax.exp": 4, "relax.log": 4, "relax.sqrt": 2, "relax.rsqrt": 2, "relax.power": 4,
    "relax.nn.leakyrelu": 2, "relax.nn.relu": 1, "relax.clip": 2, "relax.nn.dropout": 0,
}
_REDUCTIONS = {"relax.sum", "relax.mean", "relax.max", "relax.min", "relax.prod", "relax.variance",
               "relax.std", "relax.argmax", "relax.argmin", "relax.cumsum", "relax.cumprod"}
_VIEWS = {"relax.reshape", "relax.squeeze", "relax.expand_dims", "relax.flatten", "relax.shape_of",
          "relax.tensor_to_shape", "relax.shape_to_tensor", "relax.hint_on_device", "relax.to_vdevice",
          "relax.null_value", "relax.wrap_param"}
_MOVES = {"relax.permute_dims", "relax.concat", "relax.split", "relax.strided_slice", "relax.take",
          "relax.broadcast_to", "relax.repeat", "relax.tile", "relax.astype", "relax.layout_transform",
          "relax.gather_elements", "relax.gather_nd", "relax.flip", "relax.zeros", "relax.ones",
          "relax.full", "relax.zeros_like", "relax.ones_like", "relax.full_like", "relax.arange",
          "relax.dynamic_strided_slice", "relax.scatter_elements", "relax.scatter_nd", "relax.one_hot",
          "relax.tril", "relax.triu", "relax.topk", "relax.sort", "relax.argsort", "relax.where",
          "relax.index_tensor", "relax.index_put", "relax.stack", "relax.collapse_sum_like",
          "relax.collapse_sum_to"}
_POOLS = re.compile(r"relax\.nn\.(avg|max|adaptive_avg|adaptive_max)_pool\dd")
_CONVS = re.compile(r"relax\.nn\.conv\dd$")
_CONV_T = re.compile(r"relax\.nn\.conv\dd_transpose$")


@dataclass(frozen=True)
class OpCount:
    """What a function computes and moves (for its static shapes)."""

    flops: int = 0
    bytes_moved: int = 0
    weight_bytes_read: int = 0
    unknown_ops: tuple[str, ...] = ()

    def __add__(self, other: "OpCount") -> "OpCount":
        return OpCount(self.flops + other.flops, self.bytes_moved + other.bytes_moved,
                       self.weight_bytes_read + other.weight_bytes_read,
                       tuple(sorted(set(self.unknown_ops) | set(other.unknown_ops))))


def _dtype_bytes(dtype: str) -> float:
    dtype = str(dtype)
    if dtype == "bool":
        return 1
    m = re.search(r"(\d+)", dtype)
    if not m:
        return 4
    bits = int(m.group(1))
    lanes = re.search(r"x(\d+)$", dtype)
    return bits * (int(lanes.group(1)) if lanes else 1) / 8


def _shape(ty) -> list[int] | None:
    """Static shape of a TensorType, or None (not a tensor, or a symbolic dimension)."""
    from tvm import relax

    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    shape = ty.shape
    values = getattr(shape, "values", None)
    if values is None:
        return None
    out = []
    for v in values:
        try:
            out.append(int(v))
        except (TypeError, ValueError):
            return None
    return out


def _tensor_bytes(ty) -> int:
    """Bytes of a tensor (or of every tensor in a tuple) type; 0 when unknown."""
    from tvm import relax

    if isinstance(ty, relax.TupleType):
        return sum(_tensor_bytes(f) for f in ty.fields)
    shape = _shape(ty)
    if shape is None:
        return 0
    return int(math.prod(shape) * _dtype_bytes(ty.dtype))


def _numel(ty) -> int:
    shape = _shape(ty)
    return int(math.prod(shape)) if shape is not None else 0


def _einsum_flops(subscripts: str, operands) -> int:
    lhs = subscripts.replace(" ", "").split("->")[0].split(",")
    extent: dict[str, int] = {}
    for sub, op in zip(lhs, operands):
        shape = _shape(op.ty)
        if shape is None or len(sub) != len(shape):
            return 0
        extent.update(zip(sub, shape))
    return 2 * int(math.prod(extent.values())) if len(lhs) > 1 else int(math.prod(extent.values()))


def op_flops(call) -> tuple[int, bool]:
    """(FLOPs of one operator call, whether the operator is known)."""
    name = call.op.name
    out = call.ty
    args = list(call.args)
    if name == "relax.matmul":
        a = _shape(args[0].ty)
        if a is None:
            return 0, True
        return 2 * _numel(out) * a[-1], True
    if _CONVS.match(name):
        w = _shape(args[1].ty)
        return (2 * _numel(out) * int(math.prod(w[1:])) if w else 0), True
    if _CONV_T.match(name):
        w = _shape(args[1].ty)
        return (2 * _numel(args[0].ty) * int(math.prod(w[1:])) if w else 0), True
    if name == "relax.nn.attention":
        q, k, v = (_shape(a.ty) for a in args[:3])
        if not (q and k and v):
            return 0, True
        b, s, h, d = q
        t, dv = k[1], v[-1]
        return 2 * b * h * s * t * (d + dv) + 5 * b * h * s * t, True
    if name == "relax.einsum":
        return _einsum_flops(str(call.attrs.subscripts), args[0].fields if hasattr(args[0], "fields") else args), True
    if _POOLS.match(name):
        size = getattr(call.attrs, "pool_size", None)
        k = int(math.prod(int(x) for x in size)) if size is not None else 1
        return _numel(out) * k, True
    if name in _REDUCTIONS:
        return _numel(args[0].ty), True
    if name in _VIEWS or name in _MOVES:
        return 0, True
    if name in _PER_ELEMENT:
        return _PER_ELEMENT[name] * _numel(out), True
    if name.startswith("relax.") and name.count(".") == 1 and len(args) <= 3 and _shape(out) is not None:
        # plain element-wise arithmetic / comparison (add, multiply, maximum, equal, ...)
        return _numel(out), name in _ELEMENTWISE
    return 0, False


_ELEMENTWISE = {f"relax.{n}" for n in (
    "add", "subtract", "multiply", "divide", "floor_divide", "mod", "floor_mod", "maximum", "minimum",
    "negative", "abs", "equal", "not_equal", "less", "less_equal", "greater", "greater_equal",
    "logical_and", "logical_or", "logical_not", "bitwise_and", "bitwise_or", "bitwise_xor", "square",
    "sign", "round", "floor", "ceil", "trunc", "cos", "sin", "isnan", "isinf", "isfinite", "ewise_fma",
    "clip", "masked_fill", "atan", "atan2")}


def count_function(func, mod=None, *, num_input: int | None = None) -> OpCount:
    """FLOPs and bytes moved of ``func`` (a ``relax.Function``); calls to other functions of ``mod``
    are counted through their bodies. ``num_input`` (default: the ``num_input`` attribute, else all
    parameters are activations) tells which parameters are weights."""
    from tvm import ir, relax

    if num_input is None:
        attr = func.attrs.get("num_input") if func.attrs is not None else None
        num_input = int(attr) if attr is not None else len(func.params)
    weights = {p for p in list(func.params)[num_input:]}
    total = OpCount()
    unknown: set[str] = set()
    body = func.body
    blocks = body.blocks if isinstance(body, relax.SeqExpr) else []
    for block in blocks:
        for binding in block.bindings:
            value = getattr(binding, "value", None)
            if not isinstance(value, relax.Call):
                continue
            if isinstance(value.op, ir.GlobalVar):
                if mod is None:
                    unknown.add(value.op.name_hint)
                    continue
                callee = mod[value.op]
                if isinstance(callee, relax.Function):
                    # the callee's weight parameters are the arguments that are our weights
                    sub = count_function(callee, mod, num_input=len(callee.params))
                    wread = sum(_tensor_bytes(a.ty) for a in value.args if a in weights)
                    total = total + OpCount(sub.flops, sub.bytes_moved, wread, sub.unknown_ops)
                else:  # a PrimFunc called directly
                    total = total + _count_io(value, weights)
                continue
            if not isinstance(value.op, ir.Op):
                continue
            name = value.op.name
            if name in _VIEWS:
                continue
            if name in ("relax.call_tir", "relax.call_tir_inplace", "relax.call_dps_packed"):
                args = value.args[1].fields if len(value.args) > 1 and hasattr(value.args[1], "fields") else []
                read = sum(_tensor_bytes(a.ty) for a in args)
                wread = sum(_tensor_bytes(a.ty) for a in args if a in weights)
                total = total + OpCount(0, read + _tensor_bytes(value.ty), wread)
                unknown.add(name)
                continue
            flops, known = op_flops(value)
            if not known:
                unknown.add(name)
            total = total + _count_io(value, weights, flops)
    if unknown:
        logger.debug("FLOPs not counted for: %s", ", ".join(sorted(unknown)))
    return OpCount(total.flops, total.bytes_moved, total.weight_bytes_read,
                   tuple(sorted(set(total.unknown_ops) | unknown)))


def _count_io(call, weights, flops: int = 0) -> OpCount:
    from tvm import relax

    read = wread = 0
    for a in call.args:
        items = a.fields if isinstance(a, relax.Tuple) else [a]
        for item in items:
            if isinstance(item.ty, (relax.TensorType, relax.TupleType)):
                nbytes = _tensor_bytes(item.ty)
                read += nbytes
                if item in weights:
                    wread += nbytes
    return OpCount(int(flops), int(read + _tensor_bytes(call.ty)), int(wread))
