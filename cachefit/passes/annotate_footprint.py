"""Attach per-layer footprints (weights, activations, buffers, cut bytes, FLOPs) to a layered module."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm
import tvm.s_tir
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..errors import CachefitError
from . import keeps_errors, layering
from .upcast_bf16_norms import UpcastBf16Norms

log = logging.getLogger(__name__)

_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "float64": 64, "int64": 64, "int32": 32, "int16": 16,
         "int8": 8, "uint8": 8, "bool": 8, "uint16": 16, "uint32": 32, "uint64": 64, "int4": 4, "uint4": 4,
         "float8_e4m3fn": 8, "float8_e5m2": 8}
_FLOAT = {"float32", "float16", "bfloat16", "float64"}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                  "f32": "float32", "f16": "float16", "fp8": "float8_e4m3fn", "int8": "int8"}

# operators whose result is a view of their input after lowering (no new allocation)
_ALIAS_OPS = ("relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten",
              "relax.memory.view", "relax.builtin.stop_lift_params")
# pure re-layouts: applied to a weight read only by a matmul, the matmul reads the weight in place
_RELAYOUT_OPS = ("relax.permute_dims", "relax.layout_transform")


def normalize_dtype(name: str | None) -> str | None:
    if name is None:
        return None
    n = str(name).strip().lower()
    n = _DTYPE_ALIASES.get(n, n)
    if n not in _BITS:
        raise CachefitError(f"unknown dtype {name!r} for planning; use one of float32, float16, bfloat16, int8")
    return n


def tensor_bytes(ty, dtype_override: str | None = None) -> int:
    """Bytes of a Relax tensor (or tuple) type with a static shape; float dtypes may be overridden."""
    if isinstance(ty, relax.TupleType):
        return sum(tensor_bytes(f, dtype_override) for f in ty.fields)
    if not isinstance(ty, relax.TensorType):
        return 0
    shape = ty.shape
    if shape is None or not isinstance(shape, relax.ShapeExpr):
        raise CachefitError(f"a tensor of type {ty} has no static shape; give static input shapes")
    n = 1
    for d in shape.values:
        if not isinstance(d, tvm.tirx.IntImm):
            raise CachefitError(f"a tensor of shape {list(shape.values)} has a symbolic dimension {d}; give static input shapes")
        n *= int(d)
    dtype = str(ty.dtype)
    if dtype_override and dtype in _FLOAT:
        dtype = dtype_override
    return (n * _BITS.get(dtype, 32) + 7) // 8


def _numel(ty) -> int:
    n = 1
    for d in ty.shape.values:
        n *= int(d)
    return n


@dataclass
class LayerFootprint:
    weight_bytes: int
    activation_bytes: int
    buffer_bytes: int
    flops: int
    bytes_moved: int
    params: dict


@tvm.transform.module_pass(opt_level=0, name="AnnotateFootprint")
class AnnotateFootprint:
    """Compute each layer's footprint and store it as ``layer_i`` function attributes.

    Per layer (bytes, for the static shapes in the IR):
      * ``cachefit.weight_bytes`` - the parameters the layer reads (``cachefit.params``: name -> bytes);
      * ``cachefit.activation_bytes`` - the peak of live tensors over the binding order of the
        *lowered* layer (after operator fusion, so tensors fused away inside a kernel are not
        counted here), the layer's inputs and outputs included; views (reshape) take no bytes;
        a weight re-laid out for a matmul (the ``permute_dims`` the ONNX importer emits for
        ``Gemm(transB=1)``, or an ONNX ``Transpose`` of a weight before ``MatMul``: a
        ``permute_dims`` or ``layout_transform`` of one weight parameter, read by nothing but one
        ``relax.matmul``)
        takes none either, nor FLOPs, and the matmul's traffic counts the weight's bytes: the CPU
        pipeline fuses the re-layout into the matmul (``cpu_legalize.FuseWeightPrologue``: the
        kernel reads the weight in place) or runs it once at compile time (prepack), and a GPU
        pipeline would do the same; the weight is counted once, in ``cachefit.weight_bytes``;
        the float weight that QuantizeWeights decodes for a convolution takes none either: the
        CPU pipeline fuses the decode into the convolution's GEMM, which reads the stored
        integers and scales (no copy, no workspace); TVM's CUDA pipeline would run it as its own
        kernel and materialise it (O*I*H*W floats per conv), which is not counted here;
      * ``cachefit.buffer_bytes`` - the largest workspace of one kernel: intermediate buffers that
        stay inside a fused TIR function;
      * ``cachefit.in_bytes`` / ``cachefit.out_bytes`` - activations live across the cut before /
        after the layer (computed on ``main``);
      * ``cachefit.flops`` and ``cachefit.bytes_moved`` (kernel inputs + outputs, weights included).

    Options:
        dtype: plan as if every floating-point tensor had this dtype (``bfloat16`` for an fp32 file).
    """

    def __init__(self, dtype: str | None = None):
        self.dtype = normalize_dtype(dtype)
        self._alias = [tvm.ir.Op.get(n) for n in _ALIAS_OPS if layering.op_exists(n)]
        self._call_tir = tvm.ir.Op.get("relax.call_tir")
        self._matmul = tvm.ir.Op.get("relax.matmul")
        self._conv2d = tvm.ir.Op.get("relax.nn.conv2d")
        self._relayout = [tvm.ir.Op.get(n) for n in _RELAYOUT_OPS if layering.op_exists(n)]
        self._cache: dict = {}
        self._mod = None

    @keeps_errors
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:  # noqa: ARG002
        self._mod = mod
        layers = layering.layer_functions(mod)
        if not layers:
            raise CachefitError("AnnotateFootprint needs a layered module (run DiscoverLayers first)")
        main = mod["main"]
        n_in = layering.num_input(main)
        weights = set(main.params[n_in:])
        cuts = self.cut_bytes(mod)
        out = mod.shallow_copy() if hasattr(mod, "shallow_copy") else tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
        calls = self._call_sites(mod)
        for i, (gv, fn) in enumerate(layers):
            args = calls.get(gv)
            if args is None:
                raise CachefitError(f"layer {fn.attrs['cachefit.layer_name']} is never called from main")
            is_weight = [isinstance(a, relax.Var) and a in weights for a in args]
            fp = self.layer_footprint(fn, is_weight, [a.name if w else None for a, w in zip(args, is_weight)])
            new = fn.with_attrs({
                "cachefit.weight_bytes": tvm.tirx.IntImm("int64", fp.weight_bytes),
                "cachefit.activation_bytes": tvm.tirx.IntImm("int64", fp.activation_bytes),
                "cachefit.buffer_bytes": tvm.tirx.IntImm("int64", fp.buffer_bytes),
                "cachefit.in_bytes": tvm.tirx.IntImm("int64", cuts[i]),
                "cachefit.out_bytes": tvm.tirx.IntImm("int64", cuts[i + 1]),
                "cachefit.flops": tvm.tirx.IntImm("int64", fp.flops),
                "cachefit.bytes_moved": tvm.tirx.IntImm("int64", fp.bytes_moved),
                "cachefit.params": {k: tvm.tirx.IntImm("int64", v) for k, v in fp.params.items()},
                "cachefit.num_weights": sum(is_weight),
            })
            out[gv] = new
        if self.dtype:
            out = out.with_attr("cachefit.plan_dtype", self.dtype)
        return out

    # -- pieces ----------------------------------------------------------------------------------
    def _call_sites(self, mod):
        bindings, _ = layering.main_block(mod["main"])
        calls = {}
        for b in bindings:
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.GlobalVar):
                calls[b.value.op] = list(b.value.args)
        return calls

    def cut_bytes(self, mod) -> list[int]:
        """cut[i] = bytes of activations live into layer i; cut[n] = the model outputs."""
        main = mod["main"]
        bindings, out = layering.main_block(main)
        layers = [gv for gv, _ in layering.layer_functions(mod)]
        idx = {gv: i for i, gv in enumerate(layers)}
        n = len(layers)
        n_in = layering.num_input(main)
        weights = set(main.params[n_in:])
        # the layer that defines each value (-1: model input) and the last layer that reads it
        born: dict = {p: -1 for p in main.params[:n_in]}
        last: dict = {}
        cur = -1
        alias: dict = {}
        for b in bindings:
            v = b.value
            if isinstance(v, relax.Call) and v.op in idx:
                cur = idx[v.op]
                born[b.var] = cur
                for a in v.args:
                    if a in born and a not in weights:
                        last[a] = max(last.get(a, -1), cur)
            elif isinstance(v, relax.TupleGetItem):
                born[b.var] = born.get(v.tuple_value, cur)
                alias[b.var] = (v.tuple_value, v.index)
            else:
                born[b.var] = cur
        for v in layering._used_vars(out):
            last[v] = n
        cuts = [0] * (n + 1)
        for v, d in born.items():
            if v in weights or v not in last:
                continue
            size = tensor_bytes(v.ty, self.dtype)
            for c in range(d + 1, last[v] + 1):
                cuts[c] += size
        # a tuple-valued layer result is counted through its TupleGetItems (the tuple itself is
        # never read by a layer directly, so it has no entry in ``last``)
        return cuts

    def layer_footprint(self, fn: relax.Function, is_weight: list[bool], names: list) -> LayerFootprint:
        params = {}
        for p, w, nm in zip(fn.params, is_weight, names):
            if w:
                params[nm] = tensor_bytes(p.ty, self.dtype)
        key = (tvm_ffi.structural_hash(fn.without_attr("cachefit.layer").without_attr("cachefit.layer_name"), map_free_vars=True),
               tuple(is_weight))
        if key not in self._cache:
            self._cache[key] = self._analyse(fn, is_weight)
        act, buf, flops, moved = self._cache[key]
        return LayerFootprint(sum(params.values()), act, buf, flops, moved, params)

    def _analyse(self, fn: relax.Function, is_weight: list[bool]):
        fn, is_weight = self.read_weights_in_place(fn, is_weight)
        flops = self._flops(fn)
        lowered = self._lower(fn)
        act, moved = self._liveness(lowered, is_weight)
        buf = self._max_workspace(lowered)
        return act, buf, flops, moved

    def read_weights_in_place(self, fn: relax.Function, is_weight: list[bool]) -> tuple[relax.Function, list[bool]]:
        """``fn`` with each weight re-layout that only feeds a matmul replaced by a new weight
        parameter of the re-laid-out type (appended after ``fn``'s parameters), and the matching
        ``is_weight`` list. The re-layout is ``permute_dims`` / ``layout_transform`` of one weight
        parameter whose result is read once, by ``relax.matmul``; the weight itself stays a
        parameter (its bytes are counted from the call site, once)."""
        weights = {p for p, w in zip(fn.params, is_weight) if w}
        if not weights:
            return fn, is_weight
        uses: dict = {}
        consumers: dict = {}

        def visit(e):
            if isinstance(e, relax.Call):
                for a in e.args:
                    if isinstance(a, relax.Var):
                        consumers.setdefault(a, []).append(e)
            elif isinstance(e, relax.Var):
                uses[e] = uses.get(e, 0) + 1

        relax.analysis.post_order_visit(fn.body, visit)
        remap = {}
        for block in fn.body.blocks:
            for b in block.bindings:
                v = b.value
                if not (isinstance(b, relax.VarBinding) and isinstance(v, relax.Call)
                        and any(v.op.same_as(op) for op in self._relayout)
                        and isinstance(v.args[0], relax.Var) and v.args[0] in weights):
                    continue
                # a Var is visited once per occurrence, so ``uses`` == 1 means one reader
                readers = consumers.get(b.var, [])
                if uses.get(b.var, 0) == 1 and len(readers) == 1 and readers[0].op.same_as(self._matmul):
                    remap[b.var] = relax.Var(f"{b.var.name}_in_place", b.var.ty)
        if not remap:
            return fn, is_weight
        body = _DropBindings(remap).visit_expr(fn.body)
        new = relax.Function(list(fn.params) + list(remap.values()), body, fn.ret_ty, fn.is_pure, fn.attrs)
        return new, list(is_weight) + [True] * len(remap)

    def _lower(self, fn: relax.Function) -> tvm.IRModule:
        f = fn.without_attr("cachefit.layer").with_attr("global_symbol", "main")
        funcs = {tvm.ir.GlobalVar("main"): f}
        # TIR helpers the layer calls (the importer emits some, e.g. ``tile``)
        for gv, g in (self._mod.functions.items() if self._mod is not None else []):
            if isinstance(g, tvm.tirx.PrimFunc):
                funcs[gv] = g
        mod = tvm.IRModule(funcs)
        seq = tvm.transform.Sequential([
            UpcastBf16Norms(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.RewriteDataflowReshape(),
            relax.transform.DeadCodeElimination(),
        ])
        try:
            return seq(mod)
        except Exception as exc:
            raise CachefitError(
                f"lowering layer {fn.attrs['cachefit.layer_name']} for footprint analysis failed: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
            ) from None

    def _liveness(self, mod: tvm.IRModule, is_weight: list[bool]) -> tuple[int, int]:
        """Peak bytes of live activations over the lowered binding order, and kernel traffic."""
        fn = mod["main"]
        bindings, out = layering.main_block(fn)
        size: dict = {}
        root: dict = {}  # alias -> the value owning the storage
        for p, w in zip(fn.params, is_weight):
            if not w:
                size[p] = tensor_bytes(p.ty, self.dtype)
                root[p] = p
        weight_params = {p for p, w in zip(fn.params, is_weight) if w}
        decoded: set = set()   # decoded weights: read through by their consumer, never stored
        last: dict = {}
        for k, b in enumerate(bindings):
            for v in layering._used_vars(b.value):
                r = root.get(v)
                if r is not None:
                    last[r] = k
            v = b.value
            if (isinstance(v, relax.Call) and any(v.op.same_as(a) for a in self._alias)) or isinstance(v, (relax.TupleGetItem, relax.Var)):
                src = v.args[0] if isinstance(v, relax.Call) else (v.tuple_value if isinstance(v, relax.TupleGetItem) else v)
                root[b.var] = root.get(src, b.var)
                if root[b.var].same_as(b.var):
                    size[b.var] = tensor_bytes(b.var.ty, self.dtype)
            elif self._is_weight_decode(mod, v, weight_params):
                # a quantized conv weight decoded from weights alone: cachefit's CPU pipeline
                # (cpu_legalize.FuseWeightPrologue, then the GEMM schedule's compute_inline) folds
                # the decode into the convolution's inner loop, so no float copy exists
                root[b.var] = b.var
                size[b.var] = 0
                decoded.add(b.var)
            else:
                root[b.var] = b.var
                size[b.var] = tensor_bytes(b.var.ty, self.dtype)
        end = len(bindings)
        for v in layering._used_vars(out):
            r = root.get(v)
            if r is not None:
                last[r] = end
        born = {p: -1 for p in size if isinstance(p, relax.Var) and p in fn.params}
        for k, b in enumerate(bindings):
            if root.get(b.var) is not None and root[b.var].same_as(b.var):
                born[b.var] = k
        peak = 0
        for k in range(len(bindings)):
            live = sum(size[r] for r, d in born.items() if d <= k and last.get(r, d) >= k)
            peak = max(peak, live)
        if not bindings:
            peak = sum(size.values())
        moved = 0
        for b in bindings:
            v = b.value
            if isinstance(v, relax.Call) and v.op.same_as(self._call_tir):
                args = v.args[1].fields if isinstance(v.args[1], relax.Tuple) else [v.args[1]]
                moved += sum(tensor_bytes(a.ty, self.dtype) for a in args if a not in decoded)
                moved += 0 if b.var in decoded else tensor_bytes(b.var.ty, self.dtype)
        return peak, moved

    def _is_weight_decode(self, mod, value, weight_params) -> bool:
        """``value`` calls a kernel that only decodes a quantized weight (its one block is
        QuantizeWeights' ``weight_decode``) and reads weight parameters only."""
        from .quantize_weights import WEIGHT_DECODE

        if not (isinstance(value, relax.Call) and value.op.same_as(self._call_tir)
                and isinstance(value.args[0], tvm.ir.GlobalVar)):
            return False
        args = value.args[1].fields if isinstance(value.args[1], relax.Tuple) else [value.args[1]]
        if not args or not all(isinstance(a, relax.Var) and a in weight_params for a in args):
            return False
        f = _lookup(mod, value.args[0])
        if not isinstance(f, tvm.tirx.PrimFunc):
            return False
        names = []
        tvm_ffi.structural_walk(f.body, [(tvm.s_tir.SBlock, lambda blk: names.append(str(blk.name_hint)))])
        inner = [n for n in names if n != "root"]
        return bool(inner) and all(n == WEIGHT_DECODE for n in inner)

    def _max_workspace(self, mod: tvm.IRModule) -> int:
        best = 0
        for gv, f in mod.functions.items():
            if not isinstance(f, tvm.tirx.PrimFunc):
                continue
            total = [0]

            def visit(node):
                if isinstance(node, tvm.s_tir.SBlock):
                    for buf in node.alloc_buffers:
                        n = 1
                        for d in buf.shape:
                            n *= int(d)
                        dt = str(buf.dtype)
                        if self.dtype and dt in _FLOAT:
                            dt = self.dtype
                        total[0] += (n * _BITS.get(dt, 32) + 7) // 8

            tvm_ffi.structural_walk(f.body, [(tvm.s_tir.SBlock, visit)])
            best = max(best, total[0])
        return best

    def _flops(self, fn: relax.Function) -> int:
        total = [0]

        def visit(e):
            if not isinstance(e, relax.Call) or not isinstance(e.op, tvm.ir.Op):
                return
            ty = e.ty if hasattr(e, "ty") else None
            try:
                if e.op.same_as(self._call_tir) and isinstance(e.args[0], tvm.ir.GlobalVar):
                    # an opaque kernel (e.g. QuantizeWeights' fused dequantize-matmul) may carry its
                    # true FLOPs; else count it as element-wise work on its output
                    f = _lookup(self._mod, e.args[0])
                    if f is not None and f.attrs is not None and "cachefit.flops" in f.attrs:
                        total[0] += int(f.attrs["cachefit.flops"])
                    elif isinstance(ty, relax.TensorType):
                        total[0] += _numel(ty)
                elif e.op.same_as(self._matmul):
                    a = e.args[0].ty
                    k = int(a.shape.values[-1])
                    total[0] += 2 * _numel(ty) * k
                elif e.op.same_as(self._conv2d):
                    w = e.args[1].ty
                    ws = [int(d) for d in w.shape.values]  # OIHW
                    total[0] += 2 * _numel(ty) * ws[1] * ws[2] * ws[3]
                elif isinstance(ty, relax.TensorType):
                    total[0] += _numel(ty)
            except Exception:  # symbolic shapes: no count
                pass

        relax.analysis.post_order_visit(fn.body, visit)
        return total[0]


@mutator
class _DropBindings(PyExprMutator):
    """Drops the bindings of the vars in ``remap`` and reads ``remap[var]`` in their place."""

    def __init__(self, remap: dict):
        super().__init__()
        self._remap = remap

    def visit_var_binding_(self, binding):  # pylint: disable=arguments-renamed
        if binding.var in self._remap:
            self.set_var_remap(binding.var, self._remap[binding.var])
            return
        super().visit_var_binding_(binding)


def _lookup(mod, gv):
    if mod is None:
        return None
    try:
        return mod[gv]
    except Exception:  # not in this module
        return None
