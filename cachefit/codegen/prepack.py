"""Compile-time weight pre-packing: marked re-layouts of weights run once, at compile time.

Weights are known when a stage is compiled, yet cachefit's stage functions take them as run-time
parameters. A kernel that wants its weight in another layout (column panels for a matmul, NCHWc
blocks for a convolution) would pay for the re-layout on every call. The contract:

- any binding ``y = R.call_tir(pack_fn, (w0, w1, ...), out_ty)`` of a Relax function, where
  ``pack_fn`` is a PrimFunc carrying the function attribute ``"cachefit.weight_pack": True`` (a
  pure function of its arguments, see :func:`mark_weight_pack`: a re-layout of one weight, or a
  fold of several, such as batch norm into a convolution's weight) and every argument is one of
  the function's weights (the parameters at positions ``>= num_input``; a constant or an
  activation argument disqualifies the pack), is evaluated once at compile time;
- :class:`LiftWeightPacks` rewrites the function to take ``y`` as a parameter in place of its
  first argument ``w0`` (each weight stays a parameter only while something other than lifted
  packs still reads it) and adds a function
  ``<name>_transform_params(w0, w1, ...)`` that computes the new weight list from the original one;
  the rewritten function carries ``cachefit.packed_params`` (see :func:`packed_params`);
- :func:`cachefit.codegen.pipeline.compile_relax` with ``prepack=True`` runs the lifting right
  after ``LegalizeOps`` (before any fusion, so a pack never fuses into its consumer) and returns a
  :class:`CompiledModule`: the executable plus ``pack(weights)``, which runs the transform.

Only marked packs are lifted: the dequantize prologue of INT8 / INT4 weights stays in its kernel
(quantized weights stay 1 / 0.5 byte in the stored files).

:class:`PackMatmulWeights` is the first user: the ``[K, N]`` weight of a matmul (or the ``[N, K]``
weight of ``x @ W.T``) becomes ``[N / P, K, P]`` column panels, so that the register-tiled kernel
of :class:`cachefit.codegen.cpu_schedule.GemmRule` reads each panel as one sequential stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..errors import ShapeError

log = logging.getLogger(__name__)

#: PrimFunc attribute that marks a pure function of weights (re-layout, fold; the contract above)
PACK_ATTR = "cachefit.weight_pack"
#: Relax function attribute set by LiftWeightPacks: ``[[source weight index, pack name or ""], ...]``,
#: with a third element ``[weight indices]`` for a pack of several weights
LAYOUT_ATTR = "cachefit.packed_params"
#: name suffix of the function that computes the packed weights from the original ones
TRANSFORM_SUFFIX = "_transform_params"


def mark_weight_pack(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` marked as a weight pack (a pure function of its weight arguments: a re-layout, a
    fold) that may run once at compile time."""
    return func.with_attr(PACK_ATTR, True)


def is_weight_pack(mod: tvm.IRModule, gv) -> bool:
    """Whether ``gv`` names a PrimFunc of ``mod`` marked with :data:`PACK_ATTR`."""
    if not isinstance(gv, tvm.ir.GlobalVar):
        return False
    try:
        func = mod[gv]
    except (KeyError, ValueError, tvm.error.TVMError):  # pragma: no cover - depends on TVM's error type
        return False
    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and bool(func.attrs.get(PACK_ATTR, False))


# ---------------------------------------------------------------------------------------------
# Lifting
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedParam:
    """One weight parameter of a lifted function.

    source:  index of the original weight (among the function's weights, 0 = first after the
             inputs); for a pack of several weights, its first argument.
    pack:    name of the pack PrimFunc that made it, or None for the original weight as given.
    shape, dtype: of the tensor the compiled function takes.
    sources: indices of every weight the pack reads, in argument order (``(source,)`` for an
             original weight or a pack of one weight).
    """

    source: int
    pack: str | None
    shape: tuple
    dtype: str
    sources: tuple = ()

    def __post_init__(self):
        if not self.sources:
            object.__setattr__(self, "sources", (self.source,))


def count_uses(func: relax.Function) -> dict:
    """Relax var -> how many times ``func``'s body reads it."""
    counts: dict = {}

    def visit(expr):
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


@mutator
class _Rewire(PyExprMutator):
    """Drops the lifted bindings and reads their new parameters instead."""

    def __init__(self, drop: set, mapping: dict):
        super().__init__()
        self.drop = drop
        self.mapping = mapping

    def visit_var_binding_(self, binding):  # pylint: disable=arguments-renamed
        if binding.var in self.drop:
            return
        super().visit_var_binding_(binding)

    def visit_var_(self, var):  # pylint: disable=arguments-renamed
        return self.mapping.get(var, var)

    def visit_dataflow_var_(self, var):  # pylint: disable=arguments-renamed
        return self.mapping.get(var, var)


@tvm.transform.module_pass(opt_level=0, name="LiftWeightPacks")
class LiftWeightPacks:
    """Lift every marked weight pack of every Relax function with a ``num_input`` attribute.

    For a function ``f`` with packs, the module gets ``f`` taking the packed weights (in the order
    of the original weights, each weight replaced by the packs whose first argument it is; kept in
    front of them when bindings other than lifted packs still read it) with the attribute
    :data:`LAYOUT_ATTR`, and a public function
    ``f_transform_params`` (original weights -> tuple of ``f``'s new weights). Functions without
    packs are left alone.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        call_tir = tvm.ir.Op.get("relax.call_tir")
        plans = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or func.attrs is None or "num_input" not in func.attrs:
                continue
            if "Primitive" in func.attrs:
                continue
            plan = self._plan(mod, func, call_tir)
            if plan is not None:
                plans[gv] = plan
        if not plans:
            return mod
        bb = relax.BlockBuilder(mod.clone())
        for gv, (packs, keep) in plans.items():
            func = mod[gv]
            name = gv.name_hint
            n_in = int(func.attrs["num_input"])
            weights = list(func.params[n_in:])
            new_params, layout, mapping = [], [], {}
            counter: dict = {}
            for i, w in enumerate(weights):
                if keep[i]:
                    new_params.append(w)
                    layout.append([i, ""])
                for binding, srcs in [(b, srcs) for b, srcs in packs if srcs[0] == i]:
                    k = counter[i] = counter.get(i, -1) + 1
                    var = relax.Var(f"{w.name}_packed" + (str(k) if k else ""), binding.var.ty)
                    mapping[binding.var] = var
                    new_params.append(var)
                    entry = [i, binding.value.args[0].name_hint]
                    if len(srcs) > 1:
                        entry.append(list(srcs))
                    layout.append(entry)
            body = _Rewire({b.var for b, _ in packs}, mapping).visit_expr(func.body)
            new = relax.Function(list(func.params[:n_in]) + new_params, body, func.ret_ty, func.is_pure, func.attrs)
            new = new.with_attr(LAYOUT_ATTR, layout)
            bb.update_func(gv, new)

            # the transform: original weights -> the new weight list
            t_params = [relax.Var(w.name, w.ty) for w in weights]
            by_var = dict(zip(weights, t_params))
            attrs = {"global_symbol": name + TRANSFORM_SUFFIX, "num_input": 0}
            with bb.function(name + TRANSFORM_SUFFIX, t_params, attrs=attrs, private=False):
                with bb.dataflow():
                    outs = []
                    made = {}
                    for binding, srcs in packs:
                        call = binding.value
                        made[binding.var] = bb.emit(
                            relax.call_tir(call.args[0], [by_var[weights[s]] for s in srcs], binding.var.ty))
                    for i, w in enumerate(weights):
                        if keep[i]:
                            outs.append(by_var[w])
                        outs += [made[b.var] for b, srcs in packs if srcs[0] == i]
                    result = bb.emit_output(relax.Tuple(outs))
                bb.emit_func_output(result)
            log.debug("%s: %d weight pack(s) lifted to %s%s", name, len(packs), name, TRANSFORM_SUFFIX)
        return bb.get()

    @staticmethod
    def _plan(mod, func: relax.Function, call_tir):
        """(pack bindings with the weight indices of their arguments, keep flag per weight) or
        None without packs."""
        n_in = int(func.attrs["num_input"])
        weights = list(func.params[n_in:])
        wpos = {w: i for i, w in enumerate(weights)}
        packs = []
        body = func.body
        if not isinstance(body, relax.SeqExpr):
            return None
        for block in body.blocks:
            for b in block.bindings:
                v = b.value if isinstance(b, relax.VarBinding) else None
                if not (isinstance(v, relax.Call) and v.op.same_as(call_tir) and len(v.args) == 2):
                    continue
                args = v.args[1]
                if not (is_weight_pack(mod, v.args[0]) and isinstance(args, relax.Tuple) and len(args.fields) >= 1):
                    continue
                # every argument must be a weight: a pack that reads an activation or a constant
                # is not a function of the stored weights alone
                if all(isinstance(a, relax.Var) and a in wpos for a in args.fields):
                    packs.append((b, tuple(wpos[a] for a in args.fields)))
        if not packs:
            return None
        uses = count_uses(func)
        n_packs: dict = {}
        for _, srcs in packs:
            for i in srcs:
                n_packs[i] = n_packs.get(i, 0) + 1
        keep = [uses.get(w, 0) > n_packs.get(i, 0) or i not in n_packs for i, w in enumerate(weights)]
        return packs, keep


def packed_params(mod: tvm.IRModule, func_name: str = "main") -> list[PackedParam] | None:
    """The weight parameters of a lifted function (:class:`LiftWeightPacks`), or None without packs."""
    try:
        func = mod[func_name]
    except (KeyError, ValueError, tvm.error.TVMError):
        return None
    if not isinstance(func, relax.Function) or func.attrs is None or LAYOUT_ATTR not in func.attrs:
        return None
    n_in = int(func.attrs["num_input"])
    out = []
    for entry, p in zip(func.attrs[LAYOUT_ATTR], func.params[n_in:]):
        src, pack = int(entry[0]), str(entry[1]) or None
        sources = tuple(int(i) for i in entry[2]) if len(entry) > 2 else (src,)
        out.append(PackedParam(src, pack, tuple(int(d) for d in p.ty.shape), str(p.ty.dtype), sources))
    return out


def packed_layouts(mod: tvm.IRModule) -> dict:
    """Function name -> :func:`packed_params` for every lifted function of ``mod``."""
    out = {}
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function) and func.attrs is not None and LAYOUT_ATTR in func.attrs:
            out[gv.name_hint] = packed_params(mod, gv.name_hint)
    return out


# ---------------------------------------------------------------------------------------------
# The compiled result
# ---------------------------------------------------------------------------------------------


@dataclass
class CompiledModule:
    """A VM executable whose functions may take pre-packed weights (``compile_relax(prepack=True)``).

    executable: the ``relax.Executable`` (export it as usual; its ``<f>_transform_params``
                functions are what :meth:`pack` runs).
    layouts:    function name -> its weight parameters (:class:`PackedParam`), for the functions
                that take packed weights; a function not listed takes its weights as they are.
    """

    executable: object
    layouts: dict = field(default_factory=dict)
    _vm: object = field(default=None, repr=False)

    def params(self, func: str = "main") -> list[PackedParam] | None:
        """The weight parameters ``func`` takes, or None when it takes the original weights."""
        return self.layouts.get(func)

    def pack(self, weights: Sequence, func: str = "main") -> list:
        """The weights ``func`` takes, computed from its original weights (numpy arrays or tensors),
        as ``tvm.runtime.Tensor`` on the CPU, in parameter order. Each weight keeps its rank (a
        scalar weight stays 0-d). Raises :class:`~cachefit.errors.ShapeError` when the weights do
        not match what ``func`` was compiled for (count, or shape of a weight it takes as given)."""
        tensors = [_as_tensor(w) for w in weights]
        layout = self.layouts.get(func)
        if layout is None:
            return tensors
        n_weights = 1 + max((i for p in layout for i in p.sources), default=-1)
        if len(tensors) != n_weights:
            raise ShapeError(f"{func}: {len(tensors)} weights given, the module was compiled for {n_weights} "
                             "(pass the function's original weights, in parameter order)")
        for k, p in enumerate(layout):
            if p.pack is None:
                _check_shape(func, k, p, tensors[p.source], "weight")
        if self._vm is None:
            self._vm = relax.VirtualMachine(self.executable, tvm.cpu())
        out = list(self._vm[func + TRANSFORM_SUFFIX](*tensors))
        for k, (p, t) in enumerate(zip(layout, out)):
            _check_shape(func, k, p, t, "packed weight")
        return out

    def export_library(self, path, *args, **kwargs):
        """``executable.export_library`` (the stage library)."""
        return self.executable.export_library(path, *args, **kwargs)


def _as_tensor(w) -> tvm.runtime.Tensor:
    """``w`` as a CPU tensor of the same shape (``np.ascontiguousarray`` alone would turn a 0-d
    array into shape ``(1,)``, which a function taking a scalar weight rejects)."""
    if isinstance(w, tvm.runtime.Tensor):
        return w
    arr = np.asarray(w)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return tvm.runtime.tensor(arr)


def _check_shape(func: str, k: int, p: PackedParam, tensor, what: str) -> None:
    shape = tuple(int(d) for d in tensor.shape)
    if shape != tuple(p.shape) or str(tensor.dtype) != p.dtype:
        raise ShapeError(f"{func}: {what} #{k} (from original weight #{p.source}) is {shape} {tensor.dtype}, "
                         f"the compiled function takes {tuple(p.shape)} {p.dtype}; pass the original weights "
                         "with their shapes as the module was compiled for")


# ---------------------------------------------------------------------------------------------
# Matmul weights as column panels
# ---------------------------------------------------------------------------------------------


def panel_width(n: int, lanes: int) -> int | None:
    """Columns per packed panel for a weight of ``n`` columns: 4, 3, 2 or 1 vectors, whichever
    divides ``n`` first (None when ``n`` is not a multiple of the vector width)."""
    if lanes < 4 or n % lanes:
        return None
    for nr in (4, 3, 2, 1):
        if (n // lanes) % nr == 0:
            return nr * lanes
    return None


def matmul_pack_func(k: int, n: int, panel: int, dtype: str, transposed: bool) -> tirx.PrimFunc:
    """``W[K, N]`` (``W[N, K]`` when ``transposed``) -> ``Wp[N / panel, K, panel]``, marked as a pack."""
    w = te.placeholder((n, k) if transposed else (k, n), dtype, "w")
    if transposed:
        wp = te.compute((n // panel, k, panel), lambda jo, kk, jj: w[jo * panel + jj, kk], name="weight_panels")
    else:
        wp = te.compute((n // panel, k, panel), lambda jo, kk, jj: w[kk, jo * panel + jj], name="weight_panels")
    return mark_weight_pack(te.create_prim_func([w, wp], index_dtype_override="int64").without_attr("global_symbol"))


def packed_matmul_func(a_shape: Sequence[int], n: int, panel: int, dtype: str, out_dtype: str) -> tirx.PrimFunc:
    """``C[.., i, j] = sum_k A[.., i, k] * Wp[j / panel, k, j % panel]``: a matmul on packed panels."""
    k = int(a_shape[-1])
    a = te.placeholder(tuple(a_shape), dtype, "A")
    wp = te.placeholder((n // panel, k, panel), dtype, "B")
    r = te.reduce_axis((0, k), "k")

    def body(*idx):
        x = a[tuple(idx[:-1]) + (r,)]
        y = wp[idx[-1] // panel, r, idx[-1] % panel]
        if out_dtype != dtype:
            x, y = x.astype(out_dtype), y.astype(out_dtype)
        return te.sum(x * y, axis=r)

    c = te.compute(tuple(a_shape[:-1]) + (n,), body, name="matmul_packed")
    return te.create_prim_func([a, wp, c], index_dtype_override="int64").without_attr("global_symbol")


def _static_shape(ty) -> list | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return [int(d) for d in ty.shape]
    except (TypeError, ValueError):
        return None


@tvm.transform.module_pass(opt_level=0, name="PackMatmulWeights")
class PackMatmulWeights:
    """``R.matmul(x, w)`` with ``w`` a 2-D weight parameter (or ``permute_dims`` of one) becomes a
    marked pack of ``w`` into column panels and a matmul that reads the panels.

    lanes: float32 vector width of the target (the panel is 1-4 vectors wide, :func:`panel_width`).
    Runs before ``LegalizeOps``; :class:`LiftWeightPacks` then moves the packs to compile time.
    Only static float shapes whose columns are a multiple of the vector width are packed.
    """

    def __init__(self, lanes: int):
        self.lanes = int(lanes)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _MatmulPacker(mod.clone(), self.lanes).run()


@mutator
class _MatmulPacker(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int):
        super().__init__(mod)
        self.mod_ = mod
        self.lanes = lanes
        self._matmul = tvm.ir.Op.get("relax.matmul")
        self._permute = tvm.ir.Op.get("relax.permute_dims")
        self._weights: set = set()
        self._funcs: dict = {}

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if not isinstance(func, relax.Function) or func.attrs is None or "num_input" not in func.attrs:
                continue
            self._weights = set(func.params[int(func.attrs["num_input"]):])
            self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()

    def _weight_of(self, expr):
        """(weight param, transposed) when ``expr`` is a 2-D weight or its 2-D transpose."""
        if isinstance(expr, relax.Var) and expr in self._weights:
            return expr, False
        if isinstance(expr, relax.Var):
            value = self.lookup_binding(expr)
            if (isinstance(value, relax.Call) and value.op.same_as(self._permute)
                    and isinstance(value.args[0], relax.Var) and value.args[0] in self._weights):
                axes = value.attrs.axes
                if axes is None or [int(a) for a in axes] == [1, 0]:
                    return value.args[0], True
        return None

    def visit_call_(self, call: relax.Call):  # pylint: disable=arguments-renamed
        call = super().visit_call_(call)
        if not call.op.same_as(self._matmul):
            return call
        found = self._weight_of(call.args[1])
        if found is None:
            return call
        w, transposed = found
        a_shape, w_shape = _static_shape(call.args[0].ty), _static_shape(w.ty)
        out = call.ty
        if a_shape is None or w_shape is None or len(w_shape) != 2 or len(a_shape) < 2:
            return call
        dtype = str(w.ty.dtype)
        if dtype != str(call.args[0].ty.dtype) or not dtype.startswith("float"):
            return call
        k, n = (w_shape[1], w_shape[0]) if transposed else (w_shape[0], w_shape[1])
        if a_shape[-1] != k or _static_shape(out) != a_shape[:-1] + [n]:
            return call
        lanes = max(1, self.lanes * 32 // tvm.runtime.DataType(dtype).bits)
        panel = panel_width(n, lanes)
        if panel is None:
            return call
        key = ("pack", k, n, panel, dtype, transposed)
        if key not in self._funcs:
            self._funcs[key] = self.builder_.add_func(matmul_pack_func(k, n, panel, dtype, transposed),
                                                      "weight_panels")
        packed_ty = relax.TensorType([n // panel, k, panel], dtype)
        wp = self.builder_.emit(relax.call_tir(self._funcs[key], [w], packed_ty))
        out_dtype = str(out.dtype)
        key = ("mm", tuple(a_shape), n, panel, dtype, out_dtype)
        if key not in self._funcs:
            self._funcs[key] = self.builder_.add_func(packed_matmul_func(a_shape, n, panel, dtype, out_dtype),
                                                      "matmul_packed")
        return relax.call_tir(self._funcs[key], [call.args[0], wp], out)
