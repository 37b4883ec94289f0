"""Compute bfloat16 normalisations in float32 (TVM 0.27 cannot legalize them in bfloat16)."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import keeps_errors

_NORMS = ("relax.nn.layer_norm", "relax.nn.rms_norm", "relax.nn.group_norm")


@tvm.transform.module_pass(opt_level=0, name="UpcastBf16Norms")
class UpcastBf16Norms:
    """Rewrite ``layer_norm`` / ``rms_norm`` / ``group_norm`` on bfloat16 tensors into
    ``astype(float32) -> norm -> astype(bfloat16)``.

    TVM 0.27's legalization of these operators refuses bfloat16 ("only support float32 and float16");
    computing the statistics in float32 is also what bf16 kernels do for accuracy. Other calls are
    left unchanged; a module without bfloat16 norms is returned unchanged.
    """

    @keeps_errors
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:  # noqa: ARG002
        rewriter = _Rewriter(mod)
        changed = False
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                new = rewriter.visit_expr(func)
                if not new.same_as(func):
                    rewriter.builder_.update_func(gv, new)
                    changed = True
        return rewriter.builder_.get() if changed else mod


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.norms = {tvm.ir.Op.get(n) for n in _NORMS}

    def visit_call_(self, call):  # noqa: N802
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or not any(call.op.same_as(n) for n in self.norms):
            return call
        if not any(isinstance(a.ty, relax.TensorType) and str(a.ty.dtype) == "bfloat16" for a in call.args):
            return call
        args = [relax.op.astype(a, "float32") if isinstance(a.ty, relax.TensorType) and str(a.ty.dtype) == "bfloat16" else a
                for a in call.args]
        args = [self.builder_.normalize(a) for a in args]
        wide = self.builder_.normalize(relax.Call(call.op, args, call.attrs, call.sinfo_args if hasattr(call, "sinfo_args") else None))
        return relax.op.astype(wide, "bfloat16")
