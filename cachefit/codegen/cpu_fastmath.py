"""Vectorisable float32 ``exp``, ``erf``, ``tanh`` and ``sigmoid`` for the CPU kernels.

LLVM lowers a vector ``llvm.exp`` / ``erff`` / ``tanhf`` to one scalar libm call per lane, which
turns a GELU epilogue or a softmax into the slowest part of its kernel. :class:`VectorMath`
rewrites these calls in every PrimFunc into polynomial / rational expressions that vectorise:

- ``exp``: range reduction ``x = n ln2 + r`` (ln2 split in two parts), a degree-7 polynomial for
  ``e^r`` on ``|r| <= ln2 / 2`` and ``2^n`` built in the exponent bits; input clamped to
  [-87.3, 88.0] (the float32 range, so ``exp(-inf) = 1.2e-38``, i.e. zero for every use here);
- ``erf``: an odd/even rational approximation on [-4, 4], +-1 outside;
- ``tanh``: an odd/even rational approximation on [-9, 9], +-1 outside;
- ``sigmoid``: ``1 / (1 + exp(-x))`` with the ``exp`` above.

Each is within a few float32 ulps of libm over its range (``tests/test_cpu_schedule.py`` checks
the relative error against numpy / math on a dense sweep); other dtypes keep libm.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

F32 = "float32"

# e^r on |r| <= ln2/2: 1 + r + r^2 (c0 + c1 r + ...); float32 minimax coefficients (Cephes expf)
_EXP_POLY = (5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2, 8.3334519073e-3,
             1.3981999507e-3, 1.9875691500e-4)
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_LOG2E = 1.44269504088896341

# erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4]
_ERF_P = (-1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04,
          -5.69250639462346e-05, -2.10102402082508e-06, 2.77068142495902e-08,
          -2.72614225801306e-10)
_ERF_Q = (-1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03,
          -2.13374055278905e-04, -1.45660718464996e-05)

# tanh(x) ~ x P(x^2) / Q(x^2) on [-9, 9]
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05,
           5.12229709037114e-08, -8.60467152213735e-11, 2.00018790482477e-13,
           -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04,
           1.19825839466702e-06)


def _c(value: float):
    return tirx.const(value, F32)


def _horner(z, coeffs):
    """coeffs[0] + coeffs[1] z + coeffs[2] z^2 + ..."""
    acc = _c(coeffs[-1])
    for coef in reversed(coeffs[:-1]):
        acc = acc * z + _c(coef)
    return acc


def _let(name: str, value, body_fn):
    var = tirx.Var(name, F32)
    return tirx.Let(var, value, body_fn(var))


def fast_exp(x):
    """exp(x) for a float32 expression, as a vectorisable expression."""

    def body(v):
        xc = tirx.max(tirx.min(v, _c(88.0)), _c(-87.3))

        def with_n(n):
            def with_r(r):
                poly = _horner(r, _EXP_POLY)
                er = poly * r * r + r + _c(1.0)
                bits = (tirx.Cast("int32", n) + tirx.const(127, "int32")) << tirx.const(23, "int32")
                return er * tirx.reinterpret(F32, bits)

            return _let("r", xc - n * _c(_LN2_HI) - n * _c(_LN2_LO), with_r)

        return _let("n", tirx.floor(xc * _c(_LOG2E) + _c(0.5)), with_n)

    return _let("x", x, body)


def _odd_rational(x, lo_hi: float, p, q):
    def body(v):
        xc = tirx.max(tirx.min(v, _c(lo_hi)), _c(-lo_hi))

        def with_x2(x2):
            return xc * _horner(x2, p) / _horner(x2, q)

        return _let("x2", xc * xc, with_x2)

    return _let("x", x, body)


def fast_erf(x):
    """erf(x) for a float32 expression, as a vectorisable expression."""
    return _odd_rational(x, 4.0, _ERF_P, _ERF_Q)


def fast_tanh(x):
    """tanh(x) for a float32 expression, as a vectorisable expression."""
    return _odd_rational(x, 9.0, _TANH_P, _TANH_Q)


def fast_sigmoid(x):
    """1 / (1 + exp(-x)) with :func:`fast_exp`."""
    return _c(1.0) / (_c(1.0) + fast_exp(_c(0.0) - x))


_REWRITES = {"tirx.exp": fast_exp, "tirx.erf": fast_erf, "tirx.tanh": fast_tanh, "tirx.sigmoid": fast_sigmoid}


def _dtype(expr) -> str:
    ty = getattr(expr, "ty", None)
    dt = getattr(ty, "dtype", None)
    return str(dt) if dt is not None else str(getattr(expr, "dtype", ""))


def _rewrite_call(call):
    op = getattr(call, "op", None)
    name = getattr(op, "name", None)
    fn = _REWRITES.get(name)
    if fn is None or len(call.args) != 1 or _dtype(call.args[0]) != F32:
        return call
    return fn(call.args[0])


def rewrite_func(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with its float32 exp/erf/tanh/sigmoid calls replaced (the input is not modified)."""
    return tvm_ffi.structural_map(func, (tvm.ir.Call, _rewrite_call), order="post")


@tvm.transform.module_pass(opt_level=0, name="VectorMath")
class VectorMath:
    """Replace float32 exp/erf/tanh/sigmoid in every PrimFunc by vectorisable approximations."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = mod.clone()
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc):
                new = rewrite_func(func)
                if not new.same_as(func):
                    out[gv] = new
        return out
