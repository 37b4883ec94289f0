"""Vectorisable float32 ``exp``, ``erf``, ``tanh`` and ``sigmoid`` for the CPU kernels.

LLVM lowers a vector ``llvm.exp`` / ``erff`` / ``tanhf`` to one scalar libm call per lane, which
turns a GELU epilogue or a softmax into the slowest part of its kernel. :class:`VectorMath`
rewrites these calls in every PrimFunc into polynomial / rational expressions that vectorise:

- ``exp``: range reduction ``x = n ln2 + r`` (ln2 split in two parts), a degree-7 polynomial for
  ``e^r`` on ``|r| <= ln2 / 2`` and ``2^n`` built in the exponent bits; input clamped to
  [-87.3, 88.0] (the float32 normal range); below -87.3 the result is exactly 0, as libm's after
  underflow (a tiny value would make denormals downstream, e.g. in a masked softmax);
- ``erf``: an odd/even rational approximation on [-4, 4], +-1 outside;
- ``tanh``: an odd/even rational approximation on [-9, 9], +-1 outside;
- ``sigmoid``: ``1 / (1 + exp(-x))`` with the ``exp`` above;
- ``log``: exponent and mantissa from the bits, a degree-8 polynomial for ``log(1 + m)``;
- ``pow(x, y)``: exact ``x * x``, ``x``, ``sqrt(x)``, ``1`` for ``y`` = 2, 1, 0.5, 0 (checked at run
  time: the exponent of an ONNX ``Pow`` is often a tensor), else ``exp(y log|x|)`` with the sign
  of ``x`` for odd integer ``y`` and NaN for a negative base with a fractional exponent.

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
                # below the clamp the result is 0 (as libm's, after underflow): a tiny normal
                # value here would turn into denormals downstream (softmax of masked scores),
                # which cost a microcode assist per operation
                return tirx.Select(v < _c(-87.3), _c(0.0), er * tirx.reinterpret(F32, bits))

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


# log(1 + m) - m + m^2 / 2 = m^3 P(m) on [sqrt(1/2) - 1, sqrt(2) - 1] (Cephes logf)
_LOG_POLY = (3.3333331174e-1, -2.4999993993e-1, 2.0000714765e-1, -1.6668057665e-1,
             1.4249322787e-1, -1.2420140846e-1, 1.1676998740e-1, -1.1514610310e-1,
             7.0376836292e-2)
_SQRT_HALF = 0.707106781186547524


def fast_log(x):
    """log(x) for a float32 expression (NaN below 0, -inf at 0), as a vectorisable expression."""
    i32 = "int32"

    def body(v):
        bits = tirx.reinterpret(i32, v)
        e0 = tirx.Cast(F32, ((bits >> tirx.const(23, i32)) & tirx.const(255, i32)) - tirx.const(126, i32))
        mant = tirx.reinterpret(F32, (bits & tirx.const(-2139095041, i32)) | tirx.const(1056964608, i32))
        small = mant < _c(_SQRT_HALF)
        e = tirx.Select(small, e0 - _c(1.0), e0)
        m = tirx.Select(small, mant + mant - _c(1.0), mant - _c(1.0))

        def with_m(mv):
            z = mv * mv
            y = mv * z * _horner(mv, _LOG_POLY) + e * _c(_LN2_LO) - _c(0.5) * z
            res = mv + y + e * _c(_LN2_HI)
            res = tirx.Select(v == _c(0.0), _c(float("-inf")), res)
            res = tirx.Select(v < _c(0.0), _c(float("nan")), res)
            return tirx.Select(v == _c(float("inf")), v, res)

        return _let("m", m, with_m)

    return _let("x", x, body)


def fast_pow(x, y):
    """x ** y for float32 expressions, as a vectorisable expression (see the module doc)."""

    def body(xv):
        def with_y(yv):
            ax = tirx.max(xv, _c(0.0) - xv)
            whole = tirx.floor(yv) == yv
            half = yv * _c(0.5)
            odd = tirx.all(whole, tirx.floor(half) != half)

            def with_mag(mag):
                signed = tirx.Select(
                    xv < _c(0.0),
                    tirx.Select(whole, tirx.Select(odd, _c(0.0) - mag, mag), _c(float("nan"))),
                    mag,
                )
                at_zero = tirx.Select(yv > _c(0.0), _c(0.0),
                                      tirx.Select(yv == _c(0.0), _c(1.0), _c(float("inf"))))
                general = tirx.Select(ax == _c(0.0), at_zero, signed)
                out = tirx.Select(yv == _c(0.5), tirx.sqrt(xv), general)
                out = tirx.Select(yv == _c(1.0), xv, out)
                out = tirx.Select(yv == _c(0.0), _c(1.0), out)
                return tirx.Select(yv == _c(2.0), xv * xv, out)

            return _let("mag", fast_exp(yv * fast_log(ax)), with_mag)

        return _let("y", y, with_y)

    return _let("b", x, body)


def fast_sigmoid(x):
    """1 / (1 + exp(-x)) with :func:`fast_exp`."""
    return _c(1.0) / (_c(1.0) + fast_exp(_c(0.0) - x))


_REWRITES = {"tirx.exp": fast_exp, "tirx.erf": fast_erf, "tirx.tanh": fast_tanh, "tirx.sigmoid": fast_sigmoid,
             "tirx.log": fast_log, "tirx.pow": fast_pow}


def _dtype(expr) -> str:
    ty = getattr(expr, "ty", None)
    dt = getattr(ty, "dtype", None)
    return str(dt) if dt is not None else str(getattr(expr, "dtype", ""))


def _rewrite_call(call):
    op = getattr(call, "op", None)
    name = getattr(op, "name", None)
    fn = _REWRITES.get(name)
    if fn is None or any(_dtype(a) != F32 for a in call.args):
        return call
    if len(call.args) != (2 if name == "tirx.pow" else 1):
        return call
    return fn(*call.args)


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
