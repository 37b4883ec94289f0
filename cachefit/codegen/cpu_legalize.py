"""CPU-specific lowering of Relax operators before scheduling: conv2d as im2col + GEMM, weight prologues.

- :func:`legalize_conv2d`: ``relax.nn.conv2d`` (NCHW / OIHW, one group) becomes one PrimFunc with the
  stages ``cachefit_pad`` (zero padding), ``cachefit_im2col`` (the ``[K = CI*KH*KW, P = OH*OW]``
  column matrix, written row by row so that copies are contiguous along the output width),
  ``cachefit_conv_gemm`` (``out[co, p] = sum_k W[co, k] * col[k, p]``, the GEMM that
  :class:`cachefit.codegen.cpu_schedule.GemmRule` tiles) and ``cachefit_conv_crop`` (back to
  ``[N, CO, OH, OW]``, where element-wise epilogues fuse). ``P`` is padded with zero columns to a
  multiple of the vector width so that the GEMM has no partial vector. Other convolutions keep
  TOPI's direct loop nest.
- :class:`FuseWeightPrologue`: a matmul whose operand is computed element-wise from function
  parameters only (``permute_dims`` of an ONNX ``Gemm(transB=1)`` weight, a dequantize of an INT8/INT4
  weight, a cast) is grouped with that computation, so the fused kernel reads the stored weight
  directly instead of materialising a transposed / dequantised copy on every call (weights are
  run-time parameters in cachefit's stage functions).
"""

from __future__ import annotations

import logging

import tvm
import tvm_ffi
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from .prepack import count_uses as _count_uses

log = logging.getLogger(__name__)

#: relax op patterns (tvm/relax/op_attr_types.h): element-wise, broadcast, injective, reduce, out-ewise-fusable
_INJECTIVE_MAX = 2
_OUT_EWISE_FUSABLE = 4


# ---------------------------------------------------------------------------------------------
# conv2d -> im2col + GEMM
# ---------------------------------------------------------------------------------------------


def padded_columns(p: int, lanes: int) -> int:
    """Columns of the conv GEMM: ``p`` rounded up so that the outer-product kernel tiles it well.

    Candidates are multiples of ``lanes * r`` (``r`` vectors per register tile row); a candidate's
    cost is its size divided by the relative efficiency of an ``r``-vector tile.
    """
    eff = {4: 1.0, 3: 0.98, 2: 0.92, 1: 0.8}
    best, best_cost = p, None
    for r, e in eff.items():
        step = lanes * r
        cand = -(-p // step) * step
        cost = cand / e
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = cand, cost
    return best


def conv2d_im2col_func(
    n: int, ci: int, h: int, w: int, co: int, kh: int, kw: int,
    strides, padding, dilation, dtype: str, out_dtype: str, lanes: int,
) -> tirx.PrimFunc:
    """The im2col + GEMM PrimFunc of one conv2d shape (see the module doc)."""
    sh, sw = strides
    pt, pl, pb, pr = padding
    dh, dw = dilation
    hp, wp = h + pt + pb, w + pl + pr
    oh = (hp - dh * (kh - 1) - 1) // sh + 1
    ow = (wp - dw * (kw - 1) - 1) // sw + 1
    k = ci * kh * kw
    p = oh * ow
    pp = padded_columns(p, lanes)
    # the column matrix holds whole output rows (zeros past OH) up to the padded width, so that one
    # block writes all of it (the GEMM may then pack panels of it); a row length that is a multiple
    # of 4 KiB would map every row of a panel to the same L1 sets: add one vector
    oh_rows = -(-pp // ow)
    ld = oh_rows * ow
    if (ld * tvm.runtime.DataType(dtype).bits // 8) % 4096 == 0:
        ld += lanes

    def i64(x: int) -> str:
        return f"T.int64({int(x)})"

    needs_pad = any((pt, pl, pb, pr))
    src_buf = "pad" if needs_pad else "data"
    acc = "T.Cast(\"{0}\", {1})" if dtype != out_dtype else "{1}"
    lines = [
        "# from tvm.script import tirx as T",
        "@T.prim_func(private=True, s_tir=True)",
        f"def conv2d_im2col(data: T.Buffer(({i64(n)}, {i64(ci)}, {i64(h)}, {i64(w)}), \"{dtype}\"), "
        f"weight: T.Buffer(({i64(co)}, {i64(ci)}, {i64(kh)}, {i64(kw)}), \"{dtype}\"), "
        f"out: T.Buffer(({i64(n)}, {i64(co)}, {i64(oh)}, {i64(ow)}), \"{out_dtype}\")):",
        "    T.func_attr({\"op_pattern\": 4, \"tirx.noalias\": True})",
    ]
    if needs_pad:
        lines.append(f"    pad = T.sblock_alloc_buffer(({i64(n)}, {i64(ci)}, {i64(hp)}, {i64(wp)}), \"{dtype}\")")
    lines += [
        f"    col = T.sblock_alloc_buffer(({i64(n)}, {i64(k)}, {i64(ld)}), \"{dtype}\")",
        f"    gemm = T.sblock_alloc_buffer(({i64(n)}, {i64(co)}, {i64(pp)}), \"{out_dtype}\")",
    ]
    if needs_pad:
        lines += [
            f"    for b, c, y, x in T.grid({i64(n)}, {i64(ci)}, {i64(hp)}, {i64(wp)}):",
            "        with T.sblock(\"cachefit_pad\"):",
            "            vb, vc, vy, vx = T.axis.remap(\"SSSS\", [b, c, y, x])",
            f"            pad[vb, vc, vy, vx] = T.if_then_else({i64(pt)} <= vy and vy < {i64(pt + h)} and "
            f"{i64(pl)} <= vx and vx < {i64(pl + w)}, data[vb, vc, vy - {i64(pt)}, vx - {i64(pl)}], "
            f"T.{dtype}(0))",
        ]
    lines += [
        f"    for b, c, ry, rx, y, x in T.grid({i64(n)}, {i64(ci)}, {i64(kh)}, {i64(kw)}, {i64(oh_rows)}, {i64(ow)}):",
        "        with T.sblock(\"cachefit_im2col\"):",
        "            vb, vc, vry, vrx, vy, vx = T.axis.remap(\"SSSSSS\", [b, c, ry, rx, y, x])",
        f"            col[vb, vc * {i64(kh * kw)} + vry * {i64(kw)} + vrx, vy * {i64(ow)} + vx] = "
        + (f"T.if_then_else(vy < {i64(oh)}, " if oh_rows > oh else "")
        + f"{src_buf}[vb, vc, T.min(vy, {i64(oh - 1)}) * {i64(sh)} + vry * {i64(dh)}, vx * {i64(sw)} + vrx * {i64(dw)}]"
        + (f", T.{dtype}(0))" if oh_rows > oh else ""),
    ]
    lines += [
        f"    for b, o, q, r in T.grid({i64(n)}, {i64(co)}, {i64(pp)}, {i64(k)}):",
        "        with T.sblock(\"cachefit_conv_gemm\"):",
        "            vb, vo, vq, vr = T.axis.remap(\"SSSR\", [b, o, q, r])",
        "            with T.init():",
        f"                gemm[vb, vo, vq] = T.{out_dtype}(0)",
        "            gemm[vb, vo, vq] = gemm[vb, vo, vq] + "
        + acc.format(out_dtype, f"weight[vo, vr // {i64(kh * kw)}, vr % {i64(kh * kw)} // {i64(kw)}, vr % {i64(kw)}]")
        + " * "
        + acc.format(out_dtype, "col[vb, vr, vq]"),
        f"    for b, o, y, x in T.grid({i64(n)}, {i64(co)}, {i64(oh)}, {i64(ow)}):",
        "        with T.sblock(\"cachefit_conv_crop\"):",
        "            vb, vo, vy, vx = T.axis.remap(\"SSSS\", [b, o, y, x])",
        f"            out[vb, vo, vy, vx] = gemm[vb, vo, vy * {i64(ow)} + vx]",
    ]
    return tvm.script.from_source("\n".join(lines) + "\n")


def conv2d_direct_func(
    n: int, ci: int, h: int, w: int, co: int, kh: int, kw: int,
    padding, dilation, dtype: str, out_dtype: str, lanes: int,
) -> tirx.PrimFunc:
    """A stride-1 conv2d as an implicit GEMM over the zero-padded input, no column matrix.

    The padded input of each channel is stored flat (rows of ``Wp = W + pl + pr``); output pixel
    ``(y, x)`` becomes column ``q = y * Wp + x`` and filter tap ``(ry, rx)`` reads
    ``flat[c, q + ry * dh * Wp + rx * dw]``: a contiguous vector for consecutive columns. The
    ``Wp - OW`` columns past each output row are computed and dropped (``cachefit_dconv_crop``),
    a few percent of the work, against the ``KH * KW``-fold copy an im2col matrix costs.
    """
    pt, pl, pb, pr = padding
    dh, dw = dilation
    hp, wp = h + pt + pb, w + pl + pr
    oh = hp - dh * (kh - 1)
    ow = wp - dw * (kw - 1)
    q = oh * wp
    qq = padded_columns(q, lanes)
    reach = qq + (kh - 1) * dh * wp + (kw - 1) * dw     # one past the last element a column reads
    rows = -(-reach // wp)

    def i64(x: int) -> str:
        return f"T.int64({int(x)})"

    acc = "T.Cast(\"{0}\", {1})" if dtype != out_dtype else "{1}"
    lines = [
        "# from tvm.script import tirx as T",
        "@T.prim_func(private=True, s_tir=True)",
        f"def conv2d_direct(data: T.Buffer(({i64(n)}, {i64(ci)}, {i64(h)}, {i64(w)}), \"{dtype}\"), "
        f"weight: T.Buffer(({i64(co)}, {i64(ci)}, {i64(kh)}, {i64(kw)}), \"{dtype}\"), "
        f"out: T.Buffer(({i64(n)}, {i64(co)}, {i64(oh)}, {i64(ow)}), \"{out_dtype}\")):",
        "    T.func_attr({\"op_pattern\": 4, \"tirx.noalias\": True})",
        f"    flat = T.sblock_alloc_buffer(({i64(n)}, {i64(ci)}, {i64(rows * wp)}), \"{dtype}\")",
        f"    gemm = T.sblock_alloc_buffer(({i64(n)}, {i64(co)}, {i64(qq)}), \"{out_dtype}\")",
        # one block writes every element (TVM's stage-pipeline analysis wants one producer per
        # consumed region); the clamped indices keep the loads in bounds where the select
        # discards them
        f"    for b, c, y, x in T.grid({i64(n)}, {i64(ci)}, {i64(rows)}, {i64(wp)}):",
        "        with T.sblock(\"cachefit_dconv_pad\"):",
        "            vb, vc, vy, vx = T.axis.remap(\"SSSS\", [b, c, y, x])",
        f"            flat[vb, vc, vy * {i64(wp)} + vx] = T.if_then_else("
        f"{i64(pt)} <= vy and vy < {i64(pt + h)} and {i64(pl)} <= vx and vx < {i64(pl + w)}, "
        f"data[vb, vc, T.max(T.min(vy - {i64(pt)}, {i64(h - 1)}), {i64(0)}), "
        f"T.max(T.min(vx - {i64(pl)}, {i64(w - 1)}), {i64(0)})], T.{dtype}(0))",
        f"    for b, o, j, c, ry, rx in T.grid({i64(n)}, {i64(co)}, {i64(qq)}, {i64(ci)}, {i64(kh)}, {i64(kw)}):",
        "        with T.sblock(\"cachefit_dconv_gemm\"):",
        "            vb, vo, vj, vc, vry, vrx = T.axis.remap(\"SSSRRR\", [b, o, j, c, ry, rx])",
        "            with T.init():",
        f"                gemm[vb, vo, vj] = T.{out_dtype}(0)",
        "            gemm[vb, vo, vj] = gemm[vb, vo, vj] + "
        + acc.format(out_dtype, "weight[vo, vc, vry, vrx]")
        + " * "
        + acc.format(out_dtype, f"flat[vb, vc, vj + vry * {i64(dh * wp)} + vrx * {i64(dw)}]"),
        f"    for b, o, y, x in T.grid({i64(n)}, {i64(co)}, {i64(oh)}, {i64(ow)}):",
        "        with T.sblock(\"cachefit_dconv_crop\"):",
        "            vb, vo, vy, vx = T.axis.remap(\"SSSS\", [b, o, y, x])",
        f"            out[vb, vo, vy, vx] = gemm[vb, vo, vy * {i64(wp)} + vx]",
    ]
    return tvm.script.from_source("\n".join(lines) + "\n")


def make_conv2d_legalizer(lanes: int):
    """A ``LegalizeOps`` entry for ``relax.nn.conv2d``: :func:`conv2d_direct_func` for stride 1,
    :func:`conv2d_im2col_func` otherwise, TOPI's loop nest for grouped or non-NCHW convolutions."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        attrs = call.attrs
        data, weight = call.args
        dshape = [_static(d) for d in data.ty.shape] if data.ty.shape is not None else []
        wshape = [_static(d) for d in weight.ty.shape] if weight.ty.shape is not None else []
        out_dtype = str(attrs.out_dtype) if str(attrs.out_dtype) not in ("", "None", "void") else str(data.ty.dtype)
        ok = (
            int(attrs.groups) == 1
            and attrs.data_layout == "NCHW" and attrs.kernel_layout == "OIHW"
            and attrs.out_layout == "NCHW"
            and len(dshape) == 4 and len(wshape) == 4 and None not in dshape + wshape
            and str(data.ty.dtype) == str(weight.ty.dtype)
            and str(data.ty.dtype) in ("float32", "float16", "float64")
        )
        if not ok:
            return _default_legalize(bb, call)
        n, ci, h, w = dshape
        co, _, kh, kw = wshape
        strides = [int(s) for s in attrs.strides]
        padding = [int(p) for p in attrs.padding]
        dilation = [int(d) for d in attrs.dilation]
        if strides == [1, 1]:
            func = conv2d_direct_func(n, ci, h, w, co, kh, kw, padding, dilation,
                                      str(data.ty.dtype), out_dtype, lanes)
            gv = bb.add_func(func, "conv2d_direct")
        else:
            func = conv2d_im2col_func(n, ci, h, w, co, kh, kw, strides, padding, dilation,
                                      str(data.ty.dtype), out_dtype, lanes)
            gv = bb.add_func(func, "conv2d_im2col")
        return relax.call_tir(gv, [data, weight], call.ty)

    return legalize


def _static(dim) -> int | None:
    return int(dim) if isinstance(dim, (int, tirx.IntImm)) else None


def _default_legalize(bb, call):
    """TOPI's conv2d legalization (registered as the op's ``FLegalize``)."""
    return tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")(bb, call)


# ---------------------------------------------------------------------------------------------
# Weight prologues
# ---------------------------------------------------------------------------------------------


@tvm.transform.module_pass(opt_level=0, name="FuseWeightPrologue")
class FuseWeightPrologue:
    """Group ``matmul(x, f(w))`` with ``f`` when ``f`` is injective and reads parameters only.

    Runs after ``LegalizeOps`` and ``AnnotateTIROpPattern``, before ``FuseOps``; ``FuseTIR`` then
    makes each group one PrimFunc (``op_pattern`` out-ewise-fusable, so epilogues still fuse).
    """

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = _PrologueMutator(mod.clone()).run()
        return out


def _op_pattern(mod: tvm.IRModule, gv) -> int | None:
    func = mod[gv]
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None or "op_pattern" not in func.attrs:
        return None
    return int(func.attrs["op_pattern"])


@mutator
class _PrologueMutator(PyExprMutator):
    """Rewrites call_tir bindings of relax functions; see :class:`FuseWeightPrologue`."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self._call_tir = tvm.ir.Op.get("relax.call_tir")
        self._counter = 0
        self._use_count: dict = {}
        self._params: set = set()

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if not isinstance(func, relax.Function) or (func.attrs and "Primitive" in func.attrs):
                continue
            self._use_count = _count_uses(func)
            self._params = {p for p in func.params}
            new = self.visit_expr(func)
            self.builder_.update_func(gv, new)
        return self.builder_.get()

    def _prologue_of(self, var):
        """The call_tir bound to ``var`` if it is an injective function of params/constants only."""
        if not isinstance(var, relax.Var) or var in self._params:
            return None
        if self._use_count.get(var, 0) != 1:
            return None
        value = self.lookup_binding(var)
        if not isinstance(value, relax.Call) or not value.op.same_as(self._call_tir):
            return None
        pat = _op_pattern(self.mod_, value.args[0])
        if pat is None or pat > _INJECTIVE_MAX:
            return None
        for arg in value.args[1].fields:
            if isinstance(arg, tvm.ir.Constant) or arg in self._params:
                continue
            return None
        return value

    def visit_call_(self, call: relax.Call):  # pylint: disable=arguments-renamed
        call = super().visit_call_(call)
        if not call.op.same_as(self._call_tir) or len(call.args) != 2:
            return call
        if _op_pattern(self.mod_, call.args[0]) != _OUT_EWISE_FUSABLE:
            return call
        args = list(call.args[1].fields)
        prologues = {n: self._prologue_of(a) for n, a in enumerate(args)}
        prologues = {n: v for n, v in prologues.items() if v is not None}
        if not prologues:
            return call
        # a private Primitive function: the prologue call_tirs then the matmul call_tir
        outer_args, params, inner_args = [], [], []
        bb = relax.BlockBuilder()
        seen = {}

        def param_for(expr):
            if isinstance(expr, tvm.ir.Constant):
                return expr
            if expr in seen:
                return seen[expr]
            pv = relax.Var(f"p{len(params)}", expr.ty)
            seen[expr] = pv
            params.append(pv)
            outer_args.append(expr)
            return pv

        for n, a in enumerate(args):
            if n not in prologues:
                param_for(a)
        for n in prologues:
            for a in prologues[n].args[1].fields:
                param_for(a)
        with bb.function("fused_prologue", params, {"Primitive": True}, private=True):
            with bb.dataflow():
                for n, a in enumerate(args):
                    if n in prologues:
                        pro = prologues[n]
                        lv = bb.emit(relax.call_tir(pro.args[0], [param_for(x) for x in pro.args[1].fields],
                                                    pro.ty))
                        inner_args.append(lv)
                    else:
                        inner_args.append(seen[a])
                res = bb.emit_output(relax.call_tir(call.args[0], inner_args, call.ty))
            bb.emit_func_output(res)
        fused = bb.get()["fused_prologue"]
        self._counter += 1
        name = "_".join([prologues[n].args[0].name_hint for n in sorted(prologues)] + [call.args[0].name_hint])
        gv = self.builder_.add_func(fused, name)
        return relax.Call(gv, outer_args)


# ---------------------------------------------------------------------------------------------
# Batch norm as one multiply-add, and parameter math kept out of the kernels
# ---------------------------------------------------------------------------------------------


#: PrimFunc attribute of :func:`bn_fold_weight_func`: the batch norm's epsilon (lets the NCHWc
#: path compose the fold with its own weight re-layout into one pack)
BN_FOLD_ATTR = "cachefit.bn_fold_eps"


def bn_fold_weight_func(shape, eps: float, scaled: bool, dtype: str = "float32") -> tirx.PrimFunc:
    """``wf[o, ...] = w[o, ...] * gamma[o] / sqrt(var[o] + eps)``: a convolution weight (output
    channels first) with the following inference batch norm's scale folded in. Arguments
    ``(w, gamma, var)``, or ``(w, var)`` when the batch norm has no scale; marked as a weight pack
    (``cachefit.weight_pack``), so that a compile with ``prepack`` runs it once."""
    from .prepack import PACK_ATTR  # pylint: disable=import-outside-toplevel

    shape = [int(d) for d in shape]
    co = shape[0]
    w = te.placeholder(shape, dtype, name="w")
    gamma = te.placeholder((co,), dtype, name="gamma") if scaled else None
    var = te.placeholder((co,), dtype, name="var")

    def body(o, *rest):
        s = 1.0 / te.sqrt(var[o] + tirx.const(eps, dtype))
        if scaled:
            s = gamma[o] * s
        return w[(o, *rest)] * s

    wf = te.compute(shape, body, name="cachefit_bn_fold_weight")
    args = [w] + ([gamma] if scaled else []) + [var, wf]
    func = te.create_prim_func(args, index_dtype_override="int64").without_attr("global_symbol")
    return func.with_attr({"op_pattern": 8, "tirx.noalias": True, PACK_ATTR: True, BN_FOLD_ATTR: float(eps)})


def bn_fold_bias_func(channels: int, eps: float, scaled: bool, centered: bool, biased: bool,
                      dtype: str = "float32") -> tirx.PrimFunc:
    """``[1, C, 1, 1]`` shift of a convolution followed by inference batch norm:
    ``beta - mean * s`` (``+ b * s`` with a convolution bias ``b``), ``s = gamma / sqrt(var + eps)``.
    Arguments in the order ``b, beta, gamma, mean, var`` (those the convolution / batch norm has);
    marked as a weight pack."""
    from .prepack import PACK_ATTR  # pylint: disable=import-outside-toplevel

    c = int(channels)
    b = te.placeholder((c,), dtype, name="b") if biased else None
    beta = te.placeholder((c,), dtype, name="beta") if centered else None
    gamma = te.placeholder((c,), dtype, name="gamma") if scaled else None
    mean = te.placeholder((c,), dtype, name="mean")
    var = te.placeholder((c,), dtype, name="var")

    def body(_n, o, _y, _x):
        s = 1.0 / te.sqrt(var[o] + tirx.const(eps, dtype))
        if scaled:
            s = gamma[o] * s
        t = (b[o] - mean[o]) * s if biased else -(mean[o] * s)
        return beta[o] + t if centered else t

    out = te.compute((1, c, 1, 1), body, name="cachefit_bn_fold_bias")
    args = [x for x in (b, beta, gamma, mean, var) if x is not None] + [out]
    func = te.create_prim_func(args, index_dtype_override="int64").without_attr("global_symbol")
    return func.with_attr({"op_pattern": 8, "tirx.noalias": True, PACK_ATTR: True})


@tvm.transform.module_pass(opt_level=0, name="FoldBatchNormScale")
class FoldBatchNormScale:
    """Inference batch norm as ``x * scale + shift``, ``scale = gamma / sqrt(var + eps)``,
    ``shift = beta - mean * scale`` (per channel, from the parameters).

    TVM's ``DecomposeOpsForInference`` writes ``(x - mean) / sqrt(var + eps) * gamma + beta``,
    which fusion turns into a square root and a division per output element of the convolution
    epilogue; here each element costs one multiply-add and the per-channel terms are computed once
    per call (see :class:`IsolateParamMath`). Runs before ``LegalizeOps``.

    A batch norm that is the only reader of ``conv2d(x, w)`` (NCHW / OIHW, optionally ``+ b``)
    whose weight, bias and batch-norm parameters are all weights of the function (parameters at
    positions ``>= num_input``) is folded into the convolution: ``conv2d(x, w * scale) + shift'``,
    the folded weight and shift computed by marked weight packs (:func:`bn_fold_weight_func`,
    :func:`bn_fold_bias_func`) that a compile with ``prepack`` evaluates once, so no batch-norm
    math runs per call (onnxruntime does the same at session creation). Only with ``prepack``:
    without it the packs would run on every call (a square root per weight element), so the batch
    norm stays the per-channel ``x * scale + shift`` above, an epilogue the convolution's kernel
    fuses (C square roots per call, in their own small kernel).

    Options:
        prepack: weight packs run once at compile time (``compile_relax(prepack=True)``); fold
                 batch norms into the convolution weights.
    """

    def __init__(self, prepack: bool = False):
        self.prepack = bool(prepack)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mutator_ = _BatchNormMutator(mod.clone(), self.prepack)
        for gv, func in mutator_.mod_.functions_items():
            if isinstance(func, relax.Function):
                mutator_.start(func)
                mutator_.builder_.update_func(gv, mutator_.visit_expr(func))
        out = mutator_.builder_.get()
        if mutator_.folded:
            out = relax.transform.DeadCodeElimination()(out)
        return relax.transform.CanonicalizeBindings()(out)


@mutator
class _BatchNormMutator(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, fold_into_conv: bool):
        super().__init__(mod)
        self.mod_ = mod
        self._fold_into_conv_on = fold_into_conv
        self._bn = tvm.ir.Op.get("relax.nn.batch_norm")
        self._conv = tvm.ir.Op.get("relax.nn.conv2d")
        self._add = tvm.ir.Op.get("relax.add")
        self._reshape = tvm.ir.Op.get("relax.reshape")
        self._weights: set = set()
        self._uses: dict = {}
        self._funcs: dict = {}
        self.folded = 0

    def start(self, func: relax.Function) -> None:
        """Facts of the function about to be visited: its weights and the uses of each var."""
        n_in = func.attrs.get("num_input") if func.attrs is not None else None
        self._weights = set(func.params[int(n_in):]) if n_in is not None else set()
        self._uses = _count_uses(func)

    def _func(self, key, make, name):
        if key not in self._funcs:
            self._funcs[key] = self.builder_.add_func(make(), name)
        return self._funcs[key]

    def _bound(self, var, op):
        """The call of ``op`` bound to ``var`` when ``var`` is read once, else None."""
        if not isinstance(var, relax.Var) or self._uses.get(var, 0) != 1:
            return None
        value = self.lookup_binding(var)
        return value if isinstance(value, relax.Call) and value.op.same_as(op) else None

    def _fold_into_conv(self, call: relax.Call):
        """``conv2d(x, w * s) + shift`` for ``batch_norm(conv2d(x, w) [+ b])``, or None."""
        x, gamma, beta, mean, var = call.args
        a = call.attrs
        if int(a.axis) != 1 or not self._weights:
            return None
        bias = None
        conv = self._bound(x, self._conv)
        if conv is None:
            add = self._bound(x, self._add)
            if add is None:
                return None
            conv = self._bound(add.args[0], self._conv)
            bterm = add.args[1]
            reshape = self._bound(bterm, self._reshape)
            bias = reshape.args[0] if reshape is not None else bterm
            if conv is None or bias not in self._weights or _shape(bias) != [(_shape(x) or [0, 0])[1]]:
                return None
        ca = conv.attrs
        data, w = conv.args
        wshape, oshape = _shape(w), _shape(x)
        if (w not in self._weights or wshape is None or oshape is None or len(wshape) != 4
                or ca.data_layout != "NCHW" or ca.kernel_layout != "OIHW" or ca.out_layout != "NCHW"
                or str(w.ty.dtype) != "float32" or str(x.ty.dtype) != "float32"):
            return None
        scaled, centered = bool(a.scale), bool(a.center)
        bn_args = ([beta] if centered else []) + ([gamma] if scaled else []) + [mean, var]
        if not all(p in self._weights for p in bn_args):
            return None
        eps = float(a.epsilon)
        co = wshape[0]
        fw = self._func(("w", tuple(wshape), eps, scaled), lambda: bn_fold_weight_func(wshape, eps, scaled),
                        "cachefit_bn_fold_weight")
        wf = self.builder_.emit(relax.call_tir(fw, [w] + ([gamma] if scaled else []) + [var], w.ty))
        fb = self._func(("b", co, eps, scaled, centered, bias is not None),
                        lambda: bn_fold_bias_func(co, eps, scaled, centered, bias is not None),
                        "cachefit_bn_fold_bias")
        shift = self.builder_.emit(relax.call_tir(
            fb, ([bias] if bias is not None else []) + bn_args, relax.TensorType([1, co, 1, 1], "float32")))
        y = self.builder_.emit(relax.op.add(
            self.builder_.emit(relax.Call(conv.op, [data, wf], ca)), shift))
        self.folded += 1
        return relax.Tuple([y, mean, var])

    def visit_call_(self, call: relax.Call):  # pylint: disable=arguments-renamed
        call = super().visit_call_(call)
        if not call.op.same_as(self._bn) or bool(call.attrs.training):
            return call
        folded = self._fold_into_conv(call) if self._fold_into_conv_on else None
        if folded is not None:
            return folded
        x, gamma, beta, mean, var = call.args
        xt = x.ty
        if xt.shape is None or xt.ndim is None or int(xt.ndim) < 1 or str(xt.dtype) not in ("float32", "float64", "float16"):
            return call
        ndim = int(xt.ndim)
        axis = int(call.attrs.axis) % ndim
        dtype = str(xt.dtype)
        channels = xt.shape[axis]
        bshape = [1] * ndim
        bshape[axis] = channels
        eps = relax.const(float(call.attrs.epsilon), dtype)
        scale = self.builder_.emit(relax.op.rsqrt(relax.op.add(var, eps)))
        if bool(call.attrs.scale):
            scale = self.builder_.emit(relax.op.multiply(gamma, scale))
        shift = self.builder_.emit(relax.op.negative(relax.op.multiply(mean, scale)))
        if bool(call.attrs.center):
            shift = self.builder_.emit(relax.op.add(beta, shift))
        y = relax.op.add(
            relax.op.multiply(x, relax.op.reshape(scale, bshape)),
            relax.op.reshape(shift, bshape),
        )
        return relax.Tuple([self.builder_.emit(y), mean, var])


def _shape(expr) -> list | None:
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    if shape is None:
        return None
    try:
        return [int(d) for d in shape]
    except (TypeError, ValueError):
        return None


@tvm.transform.module_pass(opt_level=0, name="IsolateParamMath")
class IsolateParamMath:
    """Mark kernels that compute from parameters only (per-channel batch-norm terms, bias
    reshapes) opaque, so that ``FuseOps`` keeps them out of the element-wise epilogues.

    Fused into an epilogue they would be recomputed for every output element (a square root per
    pixel); as kernels of their own they run once per call on a few thousand elements. Weight
    transforms feeding a matmul were already grouped with it by :class:`FuseWeightPrologue`.
    Runs after ``AnnotateTIROpPattern``, before ``FuseOps``; PrimFuncs shared with other calls
    are copied, not changed.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        call_tir = tvm.ir.Op.get("relax.call_tir")
        bb = relax.BlockBuilder(mod.clone())
        opaque_of: dict = {}
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or (func.attrs and "Primitive" in func.attrs):
                continue
            params = set(func.params)
            param_only: set = set()
            bindings = []
            for block in getattr(func.body, "blocks", []):
                bindings.extend(b for b in block.bindings if isinstance(b, relax.VarBinding))
            remap = {}
            for b in bindings:
                v = b.value
                if not (isinstance(v, relax.Call) and v.op.same_as(call_tir)):
                    continue
                args = list(v.args[1].fields) if isinstance(v.args[1], relax.Tuple) else []
                if not args or not all(isinstance(a, tvm.ir.Constant) or a in params or a in param_only
                                       for a in args):
                    continue
                pat = _op_pattern(mod, v.args[0])
                if pat is None or pat > _INJECTIVE_MAX:
                    continue
                param_only.add(b.var)
                g = v.args[0]
                if g not in opaque_of:
                    opaque_of[g] = bb.add_func(mod[g].with_attr("op_pattern", 8), g.name_hint + "_param")
                remap[b.var] = opaque_of[g]
            if remap:
                updates[gv] = _retarget_calls(func, remap, call_tir)
        for gv, func in updates.items():
            bb.update_func(gv, func)
        return bb.get()


def _retarget_calls(func: relax.Function, remap: dict, call_tir) -> relax.Function:
    """``func`` with the call_tir bound to each var of ``remap`` calling ``remap[var]`` instead."""

    @mutator
    class _Retarget(PyExprMutator):
        def visit_var_binding_(self, binding):  # pylint: disable=arguments-renamed
            if binding.var in remap and isinstance(binding.value, relax.Call):
                v = binding.value
                new = self.builder_.normalize(relax.call_tir(remap[binding.var], list(v.args[1].fields), v.ty))
                self.builder_.emit_normalized(relax.VarBinding(binding.var, new))
                return
            super().visit_var_binding_(binding)

    return _Retarget().visit_expr(func)


# ---------------------------------------------------------------------------------------------
# ONNX Sum: stack + reduce -> adds
# ---------------------------------------------------------------------------------------------


@tvm.transform.module_pass(opt_level=0, name="SumOfStackToAdd")
class SumOfStackToAdd:
    """``sum(stack([a, b, ...], axis=k), axis=[k])`` (TVM's import of ONNX ``Sum``) as ``a + b + ...``.

    The stacked form is a reduction, which ``FuseOps`` does not fuse into the producing
    convolution's epilogue: a ResNet's residual additions would each cost two extra passes over
    memory (the stacked copy, then the sum). ``broadcast_to`` operands whose shape is already the
    target shape are dropped. Runs before ``LegalizeOps``.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        m = _SumStackMutator(mod.clone())
        for gv, func in m.mod_.functions_items():
            if isinstance(func, relax.Function):
                m.builder_.update_func(gv, m.visit_expr(func))
        return relax.transform.DeadCodeElimination()(m.builder_.get())


@mutator
class _SumStackMutator(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self._sum = tvm.ir.Op.get("relax.sum")
        self._stack = tvm.ir.Op.get("relax.stack")
        self._bcast = tvm.ir.Op.get("relax.broadcast_to")

    def _value(self, expr):
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            return bound if bound is not None else expr
        return expr

    def visit_call_(self, call: relax.Call):  # pylint: disable=arguments-renamed
        call = super().visit_call_(call)
        if not call.op.same_as(self._sum) or call.attrs.axis is None or bool(call.attrs.keepdims):
            return call
        axes = [int(a) for a in call.attrs.axis]
        stacked = self._value(call.args[0])
        if not (isinstance(stacked, relax.Call) and stacked.op.same_as(self._stack)):
            return call
        ndim = int(call.args[0].ty.ndim)
        if len(axes) != 1 or axes[0] % ndim != int(stacked.attrs.axis) % ndim:
            return call
        fields = self._value(stacked.args[0])
        fields = list(fields.fields) if isinstance(fields, relax.Tuple) else None
        if not fields:
            return call
        target = call.ty
        ops = []
        for f in fields:
            v = self._value(f)
            if (isinstance(v, relax.Call) and v.op.same_as(self._bcast)
                    and tvm_ffi.structural_equal(v.args[0].ty, target)):
                ops.append(v.args[0])
            else:
                ops.append(f)
        out = ops[0]
        for o in ops[1:]:
            out = self.builder_.emit(relax.op.add(out, o))
        out = self.builder_.normalize(out)
        if not tvm_ffi.structural_equal(out.ty, target):
            out = relax.op.broadcast_to(out, target.shape)
        return out
