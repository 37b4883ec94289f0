"""FLOPs and bytes moved of a Relax function, counted op by op from static shapes.

``count_function(func, mod)`` walks the function's bindings (and, through ``mod``, the private
functions it calls, such as the ``layer_i`` functions of the layered IR) and returns an
:class:`OpCount`. (``LayerRecord.flops`` comes from the footprint analysis,
:mod:`cachefit.passes.annotate_footprint`, which counts with its own rules: direct convolutions.)

FLOPs (a multiply-add is 2):

* ``matmul`` ``[..., M, K] x [..., K, N]``: ``2 * prod(out) * K``;
* ``nn.conv1d/2d/3d``: ``2 * prod(out) * prod(weight.shape[1:])`` (``Cin/groups * kernel``);
  ``conv*_transpose``: ``2 * prod(input) * prod(weight.shape[1:])``; on a CPU target
  (``target="llvm"``), a ``conv2d`` that cachefit's CPU codegen runs as Winograd F(m x m, 3x3)
  (:func:`winograd_conv`): the multiplications of its ``alpha^2`` GEMMs,
  ``2 * alpha^2 * N * tiles * Cin * Cout`` with ``alpha = m + 2`` and ``tiles`` the output
  rounded up to whole ``m x m`` tiles (see "Winograd" below);
* ``nn.attention`` ``q[B,S,H,D], k[B,T,H,D], v[B,T,H,Dv]``: ``2*B*H*S*T*(D + Dv)`` + softmax;
* ``einsum``: ``2 * prod(every index's extent)`` for two operands;
* element-wise ops: 1 per output element, except the per-element costs in ``_PER_ELEMENT``
  (softmax 5, layer norm 8, GELU 8, ...); reductions: 1 per input element;
* pooling: ``prod(out) * prod(pool_size)``; data movement and ``call_tir``: 0.

Bytes moved: every op reads its tensor arguments and writes its output once (unfused: an upper
bound of the traffic after fusion); view-like ops (reshape, squeeze, expand_dims, flatten) move
nothing. ``weight_bytes_read`` is the part of the reads that are the function's weight
parameters (those after ``num_input``).

Kernels: ``layer_kernels(func, mod)`` lists what the compiled code runs for a function, as
:class:`~cachefit.perf.costmodel.KernelSpec` s (matmuls with their ``M, N, K`` and batch, the
other kernels by class and element count, epilogue ops fused into the kernel before them);
``module_kernels(mod)`` does it for every layer of a layered module. The per-kernel cost model
(``CostModel(kernels=...)``) times them with a calibrated kernel table.

Winograd: ``cachefit compile`` for an llvm target (with prepack, as it always builds CPU stages)
runs a 3x3 stride-1 undilated ``conv2d`` as Winograd F(4x4, 3x3) or F(2x2, 3x3) where
:func:`cachefit.codegen.cpu_conv.winograd_eligible` says so (:class:`~cachefit.codegen.cpu_conv.BlockConvLayout`
decides; the tile ``m`` is :func:`~cachefit.codegen.cpu_conv.winograd_tile`'s). :func:`winograd_conv` asks
those same functions (one source of truth) with what the layout pass would pass them. For a
CPU target, such a convolution counts its GEMMs' FLOPs (above) and, as kernels, three: the input
transform (``alpha^2 * N * tiles * Cin`` elements written: an element-wise kernel), the
``alpha^2`` GEMMs ``[N * tiles, Cin] x [Cin, Cout]`` (a batched matmul) and the output transform
(``prod(out)`` elements written, an element-wise kernel into which the epilogue fuses, with the
``alpha^2 * N * tiles * Cout`` GEMM outputs it reads as one more fused element-wise op). The
transforms are memory passes over buffers 2.25x (F(4x4)) to 4x (F(2x2)) the size of the input
and output: timed alone (``bench/winograd.py``, 10 layers, one thread) the kernels ran 1.6-2.6x
the time of their GEMMs alone at the calibrated matmul rates, 1.0-1.8x the time of the three
kernels above (the direct kernels: 1.0-1.5x the time of their implicit GEMM). Their
arithmetic (336 + 210 operations per tile and channel for F(4x4), 32 + 24 for F(2x2): under 5 %
of the GEMMs' from 64 channels up, up to 18 % at 16) is left out of the FLOPs. CUDA targets,
``target=None`` and every other convolution keep the direct count.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace

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


#: target kinds whose convolutions run as cachefit's CPU codegen compiles them (Winograd where eligible)
CPU_TARGETS = ("llvm", "cpu")
#: float32 vector lanes assumed for a CPU target when none are given (AVX-512: 16; AVX2: 8)
DEFAULT_CPU_LANES = 16


def _target_kind(target) -> str | None:
    """``"llvm"``, ``"cuda"``, ... of a target name, a ``{"kind": ...}`` dict or a ``tvm.target.Target``."""
    if target is None:
        return None
    if isinstance(target, str):
        return target
    if isinstance(target, dict):
        return str(target.get("kind"))
    kind = getattr(target, "kind", None)
    return str(getattr(kind, "name", kind)) if kind is not None else None


def winograd_conv(call, target=None, lanes: int = DEFAULT_CPU_LANES) -> int | None:
    """``m`` when cachefit's CPU codegen runs this ``relax.nn.conv2d`` call as Winograd F(m x m, 3x3)
    for ``target`` (a CPU target with ``lanes`` float32 lanes), else None (the direct kernel: a CUDA
    target, ``target=None``, any other operator or convolution).

    The layout pass (:class:`cachefit.codegen.cpu_conv.BlockConvLayout`, run when the target has 8
    lanes or more) takes a convolution with one group, NCHW / OIHW layouts, static float32 shapes and
    at least ``lanes / 2`` output channels; its input is channel-blocked by ``lanes`` when it has at
    least ``lanes`` channels (fewer: an RGB-like input read in blocks of one channel). The Winograd
    decision is then :func:`~cachefit.codegen.cpu_conv.winograd_eligible` and the tile
    :func:`~cachefit.codegen.cpu_conv.winograd_tile`, called here as the pass calls them. Not seen
    from one call: the pass converts a region of convolutions only with at least two of them (a
    CNN's chained convolutions; a lone convolution in a stage keeps the direct kernel), and an
    input of ``lanes / 2`` to ``lanes`` channels produced by a blocked convolution is blocked too
    (taken here as an NCHW input)."""
    if _target_kind(target) not in CPU_TARGETS or int(lanes) < 8:
        return None
    if getattr(call.op, "name", None) != "relax.nn.conv2d" or len(call.args) != 2:
        return None
    a = call.attrs
    data, weight = call.args
    ds, ws, os_ = _shape(data.ty), _shape(weight.ty), _shape(call.ty)
    if ds is None or ws is None or os_ is None or len(ds) != 4 or len(ws) != 4 or len(os_) != 4:
        return None
    out_dtype = str(a.out_dtype)
    if (int(a.groups) != 1 or a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW"
            or str(data.ty.dtype) != "float32" or str(weight.ty.dtype) != "float32"
            or out_dtype not in ("", "void", "float32", "None") or ws[0] < int(lanes) // 2):
        return None
    # one source of truth: the predicate and the tile cachefit's CPU codegen decides with (imported
    # from codegen until they move to a module outside it that both import: data flows one way)
    from ..codegen.cpu_conv import winograd_eligible, winograd_tile  # pylint: disable=import-outside-toplevel

    lanes = int(lanes)
    cb_in = lanes if ds[1] >= lanes else 1
    cib = -(-ds[1] // cb_in)
    strides = [int(x) for x in a.strides]
    dilation = [int(x) for x in a.dilation]
    if not winograd_eligible(ws[2], ws[3], strides, dilation, cib, cb_in, lanes, os_[2], os_[3]):
        return None
    return int(winograd_tile(os_[2], os_[3]))


def _winograd_dims(call, m: int) -> tuple[int, int, int, int]:
    """(alpha^2, N * tiles, Cin, Cout) of a conv2d run as Winograd F(m x m, 3x3)."""
    n, ci = _shape(call.args[0].ty)[:2]
    _, co, oh, ow = _shape(call.ty)
    return (m + 2) ** 2, n * (-(-oh // m)) * (-(-ow // m)), ci, co


def op_flops(call, target=None, lanes: int = DEFAULT_CPU_LANES) -> tuple[int, bool]:
    """(FLOPs of one operator call, whether the operator is known). ``target`` (``"llvm"``,
    ``"cuda"``, a ``tvm.target.Target``; None: the operator's own count) decides how a convolution
    that cachefit's CPU codegen runs as Winograd is counted (:func:`winograd_conv`)."""
    name = call.op.name
    out = call.ty
    args = list(call.args)
    m = winograd_conv(call, target, lanes) if target is not None and name == "relax.nn.conv2d" else None
    if m is not None:
        a2, tiles, ci, co = _winograd_dims(call, m)
        return 2 * a2 * tiles * ci * co, True
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


def count_function(func, mod=None, *, num_input: int | None = None, target=None,
                   lanes: int = DEFAULT_CPU_LANES) -> OpCount:
    """FLOPs and bytes moved of ``func`` (a ``relax.Function``); calls to other functions of ``mod``
    are counted through their bodies. ``num_input`` (default: the ``num_input`` attribute, else all
    parameters are activations) tells which parameters are weights. ``target`` (None: the
    operators' own counts; ``"llvm"``: convolutions that cachefit's CPU codegen runs as Winograd
    count the multiplications their kernel does, see :func:`winograd_conv`; ``"cuda"``: direct)."""
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
                    sub = count_function(callee, mod, num_input=len(callee.params), target=target, lanes=lanes)
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
            flops, known = op_flops(value, target, lanes)
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


# --- kernels: what the compiled code runs, for the per-kernel cost model ---------------------------

_NORMS = {"relax.nn.layer_norm", "relax.nn.rms_norm", "relax.nn.group_norm", "relax.nn.instance_norm"}
_SOFTMAX = {"relax.nn.softmax", "relax.nn.log_softmax"}
_TRANSCENDENTAL = {"relax.erf", "relax.exp", "relax.log", "relax.tanh", "relax.sigmoid", "relax.nn.gelu",
                   "relax.nn.gelu_tanh", "relax.nn.silu", "relax.sqrt", "relax.rsqrt", "relax.power",
                   "relax.sin", "relax.cos", "relax.atan", "relax.atan2"}
# ops that fuse into the kernel producing their input (element-wise, broadcast from smaller operands)
_FUSABLE = {"matmul", "elementwise", "transcendental"}


def kernel_class(name: str) -> str:
    """The kernel class of a Relax operator: ``matmul`` (matmul, conv, attention, einsum), ``norm``
    (layer/RMS/group norms and reductions), ``softmax``, ``transcendental`` (erf, exp, tanh, GELU,
    ...), ``move`` (transposes, concat, slices, gathers) or ``elementwise`` (the rest)."""
    if name == "relax.matmul" or _CONVS.match(name) or _CONV_T.match(name) or name in (
            "relax.nn.attention", "relax.einsum"):
        return "matmul"
    if name in _NORMS or name in _REDUCTIONS or _POOLS.match(name):
        return "norm"
    if name in _SOFTMAX:
        return "softmax"
    if name in _TRANSCENDENTAL:
        return "transcendental"
    if name in _MOVES:
        return "move"
    return "elementwise"


def _matmul_kernels(call, target=None, lanes: int = DEFAULT_CPU_LANES) -> list:
    """KernelSpecs of a matmul-like op (two for ``nn.attention``, plus its softmax; three for a
    convolution run as Winograd on ``target``: input transform, GEMMs, output transform)."""
    from .costmodel import KernelSpec

    name = call.op.name
    args = list(call.args)
    out = _shape(call.ty) or []
    m = winograd_conv(call, target, lanes) if name == "relax.nn.conv2d" else None
    if m is not None:
        a2, tiles, ci, co = _winograd_dims(call, m)
        # input transform (writes V), the alpha^2 GEMMs, output transform (reads M, writes the output;
        # the epilogue fuses into it)
        return [KernelSpec("elementwise", elements=float(a2 * tiles * ci)),
                KernelSpec("matmul", m=tiles, n=co, k=ci, batch=a2, rows_in_m=True),
                KernelSpec("elementwise", elements=float(_numel(call.ty)),
                           fused=(("elementwise", float(a2 * tiles * co)),))]
    if name == "relax.matmul":
        a, b = _shape(args[0].ty), _shape(args[1].ty)
        if not a or not b or not out:
            return []
        k = a[-1]
        if len(b) <= 2:  # a 2-D (weight-like) right operand: every leading row of a is a row of m
            m = math.prod(a[:-1]) if len(a) > 1 else 1
            return [KernelSpec("matmul", m=m, n=b[-1] if len(b) == 2 else 1, k=k, batch=1, rows_in_m=True)]
        m = a[-2] if len(a) > 1 else 1
        return [KernelSpec("matmul", m=m, n=b[-1], k=k, batch=math.prod(out[:-2]) or 1, rows_in_m=False)]
    if _CONVS.match(name):  # implicit GEMM, channels in axis 1 (NCHW / NCW / NCDHW)
        w = _shape(args[1].ty)
        if not w or not out:
            return []
        groups = int(getattr(call.attrs, "groups", 1) or 1)
        cout = out[1] if len(out) > 1 else 1
        return [KernelSpec("matmul", m=_numel(call.ty) // max(cout, 1), n=cout // groups, k=math.prod(w[1:]),
                           batch=groups, rows_in_m=True)]
    if name == "relax.nn.attention":
        q, kk, v = (_shape(x.ty) for x in args[:3])
        if not (q and kk and v):
            return []
        b, s, h, d = q
        t, dv = kk[1], v[-1]
        return [KernelSpec("matmul", m=s, n=t, k=d, batch=b * h, rows_in_m=False),
                KernelSpec("softmax", elements=b * h * s * t),
                KernelSpec("matmul", m=s, n=dv, k=t, batch=b * h, rows_in_m=False)]
    # einsum, conv transpose: a cube of the same FLOPs (shape unknown to the table)
    flops, _ = op_flops(call)
    if flops <= 0:
        return []
    side = (flops / 2) ** (1 / 3)
    return [KernelSpec("matmul", m=side, n=side, k=side, batch=1, rows_in_m=True)]


def layer_kernels(func, mod=None, *, num_weights: int | None = None, target="llvm",
                  lanes: int = DEFAULT_CPU_LANES) -> tuple:
    """The kernels of a Relax function as cachefit's CPU pipeline fuses them, as
    :class:`~cachefit.perf.costmodel.KernelSpec` s, in binding order.

    Fusion follows the pipeline's rules closely enough for timing: an element-wise op whose tensor
    operand is the full-size output of a matmul or element-wise kernel fuses into that kernel (bias,
    activation, residual epilogues; element-wise chains); a transpose/reshape chain is one ``move``
    kernel; norms, softmax and reductions are kernels of their own; views (reshape, squeeze) are
    free; ops that only transform weights (a transposed or cast weight) fuse into their consumer as
    a prologue and cost nothing. Calls to other functions of ``mod`` are expanded in place.
    ``num_weights`` (default: the ``cachefit.num_weights`` attribute, else 0) counts the trailing
    parameters that are weights. ``target`` / ``lanes``: the CPU the stages are compiled for (a
    3x3 convolution that its codegen runs as Winograd is three kernels, see :func:`winograd_conv`;
    ``target=None`` or ``"cuda"``: every convolution one implicit GEMM).
    """
    from tvm import ir, relax

    from .costmodel import KernelSpec

    params = list(func.params)
    if num_weights is None:
        attr = func.attrs.get("cachefit.num_weights") if func.attrs is not None else None
        num_weights = int(attr) if attr is not None else 0
    weight_like = set(params[len(params) - num_weights:]) if num_weights else set()
    kernels: list[KernelSpec] = []
    producer: dict = {}  # var -> index of the kernel whose output it is

    def out_elements(spec: KernelSpec) -> float:
        return spec.batch * spec.m * spec.n if spec.kind == "matmul" else spec.elements

    def is_weight(arg) -> bool:
        return isinstance(arg, ir.expr.Constant) or arg in weight_like

    body = func.body
    for block in (body.blocks if isinstance(body, relax.SeqExpr) else []):
        for binding in block.bindings:
            var, value = binding.var, getattr(binding, "value", None)
            if isinstance(value, relax.Var):
                if value in producer:
                    producer[var] = producer[value]
                if value in weight_like:
                    weight_like.add(var)
                continue
            if not isinstance(value, relax.Call):
                continue
            if isinstance(value.op, ir.GlobalVar):
                callee = mod[value.op] if mod is not None else None
                if isinstance(callee, relax.Function):
                    kernels.extend(layer_kernels(callee, mod, num_weights=0, target=target, lanes=lanes))
                elif _numel(value.ty):
                    kernels.append(KernelSpec("elementwise", elements=_numel(value.ty)))
                continue
            if not isinstance(value.op, ir.Op):
                continue
            name = value.op.name
            args = [a for a in value.args if isinstance(getattr(a, "ty", None), relax.TensorType)]
            if name in _VIEWS:
                if args and args[0] in producer:
                    producer[var] = producer[args[0]]
                if args and all(is_weight(a) for a in args):
                    weight_like.add(var)
                continue
            if name in ("relax.call_tir", "relax.call_tir_inplace", "relax.call_dps_packed"):
                n = _numel(value.ty) if isinstance(value.ty, relax.TensorType) else 0
                if n:
                    kernels.append(KernelSpec("elementwise", elements=n))
                    producer[var] = len(kernels) - 1
                continue
            kind = kernel_class(name)
            if kind != "matmul" and args and all(is_weight(a) for a in args):
                weight_like.add(var)  # weight prologue (transpose, cast, dequantize): fused into its user
                continue
            n = _numel(value.ty)
            if kind == "matmul":
                specs = _matmul_kernels(value, target, lanes)
                if specs:
                    kernels.extend(specs)
                    producer[var] = len(kernels) - 1
                continue
            if kind in ("elementwise", "transcendental"):
                # into the latest full-size kernel producing an operand (a residual add joins the
                # branch computed last, as the fusion pass groups it)
                src = max((producer[a] for a in args if a in producer
                           and kernels[producer[a]].kind in _FUSABLE
                           and out_elements(kernels[producer[a]]) == n), default=None)
                if src is not None:
                    spec = kernels[src]
                    kernels[src] = replace(spec, fused=spec.fused + ((kind, float(n)),))
                    producer[var] = src
                    continue
            elif kind == "move":
                src = max((producer[a] for a in args if a in producer and kernels[producer[a]].kind == "move"),
                          default=None)
                if src is not None:
                    producer[var] = src  # one index computation: a chain of moves is one kernel
                    continue
            elif kind == "norm" and name in _REDUCTIONS:
                n = _numel(args[0].ty) if args else n
            if n:
                kernels.append(KernelSpec(kind, elements=float(n)))
                producer[var] = len(kernels) - 1
    return tuple(kernels)


def module_kernels(mod, *, target="llvm", lanes: int = DEFAULT_CPU_LANES) -> dict:
    """Layer name -> :class:`~cachefit.perf.costmodel.KernelProfile` for every ``layer_i`` function of
    a layered module (docs/layered-ir.md), at the module's batch (``cachefit.batch``, else 1): what
    ``CostModel(kernels=...)`` takes. ``target`` / ``lanes`` as in :func:`layer_kernels` (the
    default: cachefit's CPU stages on a 16-lane AVX-512 core, what a calibrated kernel table times)."""
    from ..passes import layering
    from .costmodel import KernelProfile

    batch = 1
    if mod.attrs is not None and "cachefit.batch" in mod.attrs:
        batch = int(mod.attrs["cachefit.batch"])
    out = {}
    for gv, fn in layering.layer_functions(mod):
        attrs = fn.attrs
        name = str(attrs["cachefit.layer_name"]) if "cachefit.layer_name" in attrs else gv.name_hint
        out[name] = KernelProfile(batch=batch, kernels=layer_kernels(fn, mod, target=target, lanes=lanes))
    return out
