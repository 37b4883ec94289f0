"""Channel-blocked (NCHWc) convolutions for llvm targets: layout pass, kernels, schedule rule.

- :class:`BlockConvLayout` (a Relax pass, before ``LegalizeOps``): chains of ``relax.nn.conv2d``
  (NCHW / OIHW, one group, static float32 shapes) run on activations stored
  ``[N, C / cb, H, W, cb]`` (``cb`` = the target's float32 lanes: 16 with AVX-512; a channel count
  that is not a multiple of ``cb`` is zero-padded). Element-wise operators (batch-norm multiply-add, bias, residual add, relu), pooling,
  spatial means and channel concatenation between the convolutions work on the blocked tensors;
  every other consumer gets an NCHW copy (one transform per tensor, made where first needed). Each
  convolution becomes ``R.call_tir(cachefit_conv2d_nchwc, (x_blocked, w_packed))`` with the
  weight re-laid out ``[CO / ob, CI / cb, KH, KW, cb, ob]`` by a separate
  ``R.call_tir(cachefit_pack_conv_weight, (w,))`` whose PrimFunc carries
  ``"cachefit.weight_pack": True`` (a pure re-layout of one weight parameter, which the compile
  may evaluate once instead of per call).
- :class:`NCHWcConvRule` (a schedule rule): the kernel as a register tile of ``owt`` output pixels
  along W x ``ocr`` output-channel vectors, accumulated over input-channel blocks, taps and the
  channels of a block (one broadcast input element and ``ocr`` weight vectors per step); the fused
  epilogue (bias, batch norm, residual add, relu) runs on the tile, or per row / channel slab when
  the input channels are split in chunks whose weights stay in L1; parallel over output-channel
  blocks x rows when the stage owns several threads.

The pass runs in :func:`cachefit.codegen.pipeline.cpu_front_passes`, after batch norm is folded
(:class:`cachefit.codegen.cpu_legalize.FoldBatchNormScale`: a convolution's weight may arrive as a
marked batch-norm fold of weights, which the weight pack then composes with its re-layout into one
multi-weight pack); the rule is the first of
:func:`cachefit.codegen.cpu_schedule.default_rules`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.s_tir import dlight

log = logging.getLogger(__name__)

#: attribute of a PrimFunc that computes from weight parameters only (a re-layout, a batch-norm
#: fold; evaluated at compile time with ``prepack``: cachefit.codegen.prepack)
WEIGHT_PACK_ATTR = "cachefit.weight_pack"
#: the batch-norm fold of cachefit.codegen.cpu_legalize (bn_fold_weight_func) carries its epsilon here
BN_FOLD_ATTR = "cachefit.bn_fold_eps"
CONV_BLOCK = "cachefit_nchwc_conv"
PAD_BLOCK = "cachefit_nchwc_pad"
#: the crop of a 1x1 convolution computed over flattened pixels (conv2d_nchwc_func(flat=True))
FLAT_CROP_BLOCK = "cachefit_nchwc_flat_crop"

# relax op patterns (tvm/relax/op_attr_types.h)
_INJECTIVE = 2
_OUT_EWISE_FUSABLE = 4
_OPAQUE = 8


# ---------------------------------------------------------------------------------------------
# Kernels (TE -> PrimFunc)
# ---------------------------------------------------------------------------------------------


def _blocks(c: int, cb: int) -> int:
    """Channel blocks of ``c`` channels (the last block zero-padded)."""
    return -(-int(c) // int(cb))


def _i64(*dims):
    return tuple(tirx.IntImm("int64", int(d)) for d in dims)


def conv_out_size(size: int, k: int, stride: int, pad_lo: int, pad_hi: int, dil: int) -> int:
    return (size + pad_lo + pad_hi - dil * (k - 1) - 1) // stride + 1


#: accumulator vectors of a tile: TVM puts a local buffer of more than 1 KiB (16 float32 vectors of
#: 16 lanes) into a heap workspace, where the accumulators stay in memory instead of registers
MAX_TILE_BYTES = 1024


def choose_tile(ow: int, cob: int, max_acc: int = 16) -> tuple[int, int, int]:
    """(owt, ocr, owp): ``owt`` output pixels x ``ocr`` channel vectors per register tile,
    ``owp`` the output width computed (``ow`` rounded up to a multiple of ``owt``).

    Each step of the reduction loads ``owt`` broadcast inputs and ``ocr`` weight vectors for
    ``owt * ocr`` FMAs: the kernel is load-bound unless the tile is close to square (4 x 4 here:
    8 loads per 16 FMAs against 10 for 8 x 2, measured 107 against 75 GFLOP/s on a 3x3 conv at
    14x14). At most ``max_acc`` accumulators (TVM keeps a local buffer of up to 1 KiB on the
    stack, in registers; a larger one goes to a heap workspace and the accumulators to memory);
    widths without a good divisor are padded to a multiple of the tile (the extra columns are
    computed and dropped).
    """
    best, best_score = (1, 1, ow), -1.0
    for ocr in (4, 2, 3, 1):
        if cob % ocr or ocr > max_acc:
            continue
        for owt in range(min(max_acc // ocr, ow), 0, -1):
            owp = -(-ow // owt) * owt
            acc = owt * ocr
            waste = (owp - ow) / owp
            score = acc / (owt + ocr) * min(1.0, acc / 8.0) * (1.0 - 2.0 * waste)
            if score > best_score + 1e-9:
                best, best_score = (owt, ocr, owp), score
    return best


def _pad_input(data, shape, pt: int, pl: int, hp: int, wp: int, dtype):
    """``data`` (``[n, c, h, w, cb]``) zero-padded to ``hp x wp`` rows / columns with ``pt`` / ``pl``
    before (the kernel's ``PAD_BLOCK``), or ``data`` itself when nothing is added."""
    n, cib, h, w, cb = shape
    if not (pt or pl or hp != h or wp != w):
        return data

    def pad_fn(b, c, y, x, i):
        inside = tvm.tirx.all(y >= pt, y < pt + h, x >= pl, x < pl + w)
        return tirx.if_then_else(
            inside,
            data[b, c, tvm.te.max(tvm.te.min(y - pt, h - 1), 0), tvm.te.max(tvm.te.min(x - pl, w - 1), 0), i],
            tirx.const(0, dtype))

    return te.compute(_i64(n, cib, hp, wp, cb), pad_fn, name=PAD_BLOCK)


def conv2d_nchwc_func(n, cib, cb, h, w, cob, ob, kh, kw, strides, padding, dilation, owp, dtype="float32",
                      flat=False):
    """``out[b, o, y, x, v] = sum_{c, ry, rx, i} xpad[b, c, y*sh + ry*dh, x*sw + rx*dw, i] *
    wp[o, c, ry, rx, i, v]`` with ``x`` up to ``owp`` (>= the real width; the extra columns are
    computed into a scratch row and dropped).

    flat: a 1x1, stride-1, unpadded convolution computed over the ``h * w`` pixels as one row of
    ``owp`` (>= ``h * w``) columns: a register tile then never straddles a row end, so a 13x13
    output is 170 columns of 5 rather than 13 rows of 15 (the padded columns read the last pixel
    and are dropped by :data:`FLAT_CROP_BLOCK`)."""
    if flat:
        return _conv2d_flat_func(n, cib, cb, h, w, cob, ob, owp, dtype)
    sh, sw = strides
    pt, pl, pb, pr = padding
    dh, dw = dilation
    oh = conv_out_size(h, kh, sh, pt, pb, dh)
    ow = conv_out_size(w, kw, sw, pl, pr, dw)
    hp = h + pt + pb
    wp_need = (owp - 1) * sw + (kw - 1) * dw + 1
    wpad = max(w + pl + pr, wp_need)
    data = te.placeholder(_i64(n, cib, h, w, cb), dtype, name="data")
    weight = te.placeholder(_i64(cob, cib, kh, kw, cb, ob), dtype, name="weight")
    src = _pad_input(data, (n, cib, h, w, cb), pt, pl, hp, wpad, dtype)
    rc = te.reduce_axis(_i64(0, cib), name="rc")
    ry = te.reduce_axis(_i64(0, kh), name="ry")
    rx = te.reduce_axis(_i64(0, kw), name="rx")
    ri = te.reduce_axis(_i64(0, cb), name="ri")
    conv = te.compute(
        _i64(n, cob, oh, owp, ob),
        lambda b, o, y, x, v: te.sum(
            src[b, rc, y * sh + ry * dh, x * sw + rx * dw, ri] * weight[o, rc, ry, rx, ri, v],
            axis=[rc, ry, rx, ri]),
        name=CONV_BLOCK,
    )
    if owp != ow:
        out = te.compute(_i64(n, cob, oh, ow, ob), lambda b, o, y, x, v: conv[b, o, y, x, v], name="cachefit_nchwc_crop")
    else:
        out = conv
    func = te.create_prim_func([data, weight, out])
    return func.with_attr({"op_pattern": _OUT_EWISE_FUSABLE, "tirx.noalias": True})


def flat_conv_ok(kh: int, kw: int, strides, padding, dilation, oh: int, ow: int, cob: int) -> bool:
    """Whether a blocked convolution runs over flattened pixels (``conv2d_nchwc_func(flat=True)``):
    1x1, stride 1, no padding, several rows, and a row width the register tile does not divide
    (:func:`choose_tile` pads it) while the flattened pixels waste less."""
    if (kh, kw) != (1, 1) or list(strides) != [1, 1] or any(padding) or list(dilation) != [1, 1] or oh < 2:
        return False
    _, _, owp = choose_tile(ow, cob)
    _, _, pp = choose_tile(oh * ow, cob)
    return owp > ow and pp < oh * owp


def _conv2d_flat_func(n, cib, cb, h, w, cob, ob, pp, dtype):
    # the loop nest of the row kernel (b, o, y, x, v | c, ry, rx, i) with one row of pp pixels and
    # unit taps, so that NCHWcConvRule schedules both alike
    hw = h * w
    data = te.placeholder(_i64(n, cib, h, w, cb), dtype, name="data")
    weight = te.placeholder(_i64(cob, cib, 1, 1, cb, ob), dtype, name="weight")
    rc = te.reduce_axis(_i64(0, cib), name="rc")
    ry = te.reduce_axis(_i64(0, 1), name="ry")
    rx = te.reduce_axis(_i64(0, 1), name="rx")
    ri = te.reduce_axis(_i64(0, cb), name="ri")
    last = tirx.const(hw - 1, "int64")

    def pixel(x):
        return te.min(x, last) if pp > hw else x

    conv = te.compute(
        _i64(n, cob, 1, pp, ob),
        lambda b, o, y, x, v: te.sum(
            data[b, rc, pixel(x) // w + ry, pixel(x) % w + rx, ri] * weight[o, rc, ry, rx, ri, v],
            axis=[rc, ry, rx, ri]),
        name=CONV_BLOCK,
    )
    out = te.compute(_i64(n, cob, h, w, ob), lambda b, o, y, x, v: conv[b, o, 0, y * w + x, v], name=FLAT_CROP_BLOCK)
    func = te.create_prim_func([data, weight, out])
    return func.with_attr({"op_pattern": _OUT_EWISE_FUSABLE, "tirx.noalias": True})


def _weight_inputs(co, ci, kh, kw, dtype, fold_eps, fold_scaled):
    """The placeholders of a weight pack (``w``, and ``gamma`` / ``var`` with a batch-norm fold)
    and ``value(oc, ic, y, x)``: the weight with the fold's scale applied."""
    w = te.placeholder(_i64(co, ci, kh, kw), dtype, name="w")
    extra = []
    if fold_eps is not None:
        gamma = te.placeholder(_i64(co), dtype, name="gamma") if fold_scaled else None
        var = te.placeholder(_i64(co), dtype, name="var")
        extra = ([gamma] if fold_scaled else []) + [var]

    def value(oc, ic, y, x):
        v = w[oc, ic, y, x]
        if fold_eps is not None:
            s = 1.0 / te.sqrt(var[oc] + tirx.const(fold_eps, dtype))
            v = v * (gamma[oc] * s if fold_scaled else s)
        return v

    return [w, *extra], value


def pack_weight_func(co, ci, kh, kw, cb, ob, dtype="float32", fold_eps=None, fold_scaled=True):
    """``OIHW`` -> ``[CO / ob, CI / cb, KH, KW, cb, ob]`` (a pure re-layout, marked as a weight pack;
    channel counts that are not a multiple of the block are padded with zero weights).

    fold_eps: with an epsilon, the pack also folds a following inference batch norm's scale into
              the weight (``w[o] * gamma[o] / sqrt(var[o] + eps)``, as
              :func:`cachefit.codegen.cpu_legalize.bn_fold_weight_func`): arguments
              ``(w, gamma, var)``, or ``(w, var)`` when ``fold_scaled`` is False.
    """
    inputs, value = _weight_inputs(co, ci, kh, kw, dtype, fold_eps, fold_scaled)

    def body(o, c, y, x, i, v):
        oc, ic = o * ob + v, c * cb + i
        if co % ob == 0 and ci % cb == 0:
            return value(oc, ic, y, x)
        return tirx.if_then_else(tvm.tirx.all(oc < co, ic < ci),
                                 value(tvm.te.min(oc, co - 1), tvm.te.min(ic, ci - 1), y, x), tirx.const(0, dtype))

    packed = te.compute(_i64(_blocks(co, ob), _blocks(ci, cb), kh, kw, cb, ob), body,
                        name="cachefit_pack_conv_weight")
    func = te.create_prim_func([*inputs, packed])
    return func.with_attr({"op_pattern": _OPAQUE, "tirx.noalias": True, WEIGHT_PACK_ATTR: True})


# ---------------------------------------------------------------------------------------------
# Winograd F(m x m, 3x3) (3x3 stride-1 convolutions): m = 2 (16 / 36 of the multiplications) or
# m = 4 (36 / 144)
# ---------------------------------------------------------------------------------------------

WINO_V_BLOCK = "cachefit_wino_v"
WINO_M_BLOCK = "cachefit_wino_m"
WINO_Y_BLOCK = "cachefit_wino_y"
#: (B^T, G, A^T) of F(m x m, 3x3) (Lavin & Gray 2016): Y = A^T [(G g G^T) * (B^T d B)] A on
#: (m + 2) x (m + 2) input tiles; m = 4 with the points 0, +-1, +-2 (and infinity)
_WINO = {
    2: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
         (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
         (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
}


def winograd_eligible(kh: int, kw: int, strides, dilation, cib: int, cb_in: int, lanes: int, oh: int, ow: int,
                      min_size: int = 8) -> bool:
    """Whether a convolution runs as Winograd: 3x3, stride 1, no dilation, a blocked input, an
    output of at least ``min_size`` x ``min_size`` (7x7 computes 8x8: 0.96x of the direct kernel),
    and two input channel blocks or more unless F(4x4) applies (with one block and F(2x2) the
    GEMMs are too short to pay for the transforms: squeezenet's 16 -> 64 at 55x55 ran 0.78x with
    F(2x2), 1.20x with F(4x4); ``python bench/winograd.py``)."""
    return (kh == 3 and kw == 3 and tuple(strides) == (1, 1) and tuple(dilation) == (1, 1) and cb_in == lanes
            and min(oh, ow) >= min_size and (cib >= 2 or winograd_tile(oh, ow) == 4))


def winograd_tile(oh: int, ow: int) -> int:
    """``m`` of F(m x m, 3x3) for an output: 4 (2.25x fewer multiplications than m = 2, larger
    transforms) when both sides are at least 16 and rounding them up to multiples of 4 adds at
    most 8 % of outputs (56, 28, 27, 55, 224: 2.0-3.0x the direct kernel against 1.3-1.8x with
    m = 2); else 2 (14x14 computed as 16x16 ran 1.71x against 1.82x with m = 2, 512 channels
    1.22x against 1.51x)."""
    padded = (-(-oh // 4) * 4) * (-(-ow // 4) * 4)
    return 4 if min(oh, ow) >= 16 and padded <= 1.08 * oh * ow else 2


def _lin(terms):
    """``sum(c * x)`` over ``(c, x)``, c != 0: adds / subtracts for c = +-1, a multiply otherwise."""
    out = None
    for c, x in terms:
        if c == 0:
            continue
        neg = c < 0
        mag = -c if neg else c
        t = x if mag == 1 else x * tirx.const(float(mag), "float32")
        if out is None:
            out = -t if neg else t
        else:
            out = out - t if neg else out + t
    return out


def _select(index, exprs, lazy: bool = False):
    """``exprs[index]``: selects that fold to one expression where the schedule unrolls ``index``;
    ``lazy``: ``if_then_else`` (only the chosen expression is evaluated: loops not unrolled)."""
    out = exprs[-1]
    for k in range(len(exprs) - 2, -1, -1):
        cond = index == tirx.const(k, str(index.ty))
        out = tirx.if_then_else(cond, exprs[k], out) if lazy else tirx.Select(cond, exprs[k], out)
    return out


def _sandwich(left, get, cols: int):
    """``left @ X @ left^T`` for ``X[a][b] = get(a, b)`` (``cols`` columns), as a list of rows of
    expressions; the row products are shared by every element of a row (CSE keeps them once)."""
    rows = len(left)
    half = [[_lin([(left[r][a], get(a, b)) for a in range(len(left[r]))]) for b in range(cols)] for r in range(rows)]
    return [[_lin([(left[s][b], half[r][b]) for b in range(cols)]) for s in range(rows)] for r in range(rows)]


def winograd_weight_func(co, ci, cb, ob, ocr=1, m=2, dtype="float32", fold_eps=None, fold_scaled=True):
    """``OIHW`` 3x3 -> ``U = G g G^T`` as ``[a * a, CO / (ocr * ob), CI / cb, cb, ocr * ob]``
    (``a = m + 2``; a weight pack: one GEMM's weights per element of the transformed tile, in
    panels of the ``ocr`` output-channel vectors one register tile reads, so that the GEMMs read
    their weights as one sequential stream); ``fold_eps`` folds a batch norm's scale as
    :func:`pack_weight_func` does."""
    g_mat = _WINO[m][1]
    alpha = m + 2
    inputs, value = _weight_inputs(co, ci, 3, 3, dtype, fold_eps, fold_scaled)

    def transformed(oc, ic):
        # the alpha x alpha elements of G g G^T for one (oc, ic), as expressions
        out = []
        for r in range(alpha):
            for s_ in range(alpha):
                acc = None
                for a in range(3):
                    for b in range(3):
                        coef = g_mat[r][a] * g_mat[s_][b]
                        if coef == 0.0:
                            continue
                        term = value(oc, ic, a, b) * tirx.const(coef, dtype)
                        acc = term if acc is None else acc + term
                out.append(acc)
        return out

    def body(e, p, c, i, w_):
        oc, ic = (p * ocr + w_ // ob) * ob + w_ % ob, c * cb + i
        if co % ob == 0 and ci % cb == 0:
            return _select(e, transformed(oc, ic), lazy=True)
        inside = tvm.tirx.all(oc < co, ic < ci)
        return tirx.if_then_else(inside, _select(e, transformed(tvm.te.min(oc, co - 1), tvm.te.min(ic, ci - 1)),
                                                 lazy=True),
                                 tirx.const(0, dtype))

    packed = te.compute(_i64(alpha * alpha, _blocks(co, ob) // ocr, _blocks(ci, cb), cb, ocr * ob), body,
                        name="cachefit_pack_wino_weight")
    func = te.create_prim_func([*inputs, packed])
    return func.with_attr({"op_pattern": _OPAQUE, "tirx.noalias": True, WEIGHT_PACK_ATTR: True})


def conv2d_winograd_func(n, cib, cb, h, w, cob, ob, padding, ocr=1, m=2, dtype="float32"):
    """A 3x3 stride-1 convolution on NCHWc activations as Winograd F(m x m, 3x3) (``a = m + 2``):

    - ``V[b, e, c, ty, tx, i]``: ``B^T d B`` of every a x a input tile (stride m),
    - ``M[b, e, o, ty, tx, v] = sum_{c, i} V[b, e, c, ty, tx, i] * U[e, o, c, i, v]``: a * a GEMMs,
    - ``out[b, o, y, x, v]``: ``A^T M A``, m x m outputs per tile.

    ``U`` is :func:`winograd_weight_func`'s pack (panels of ``ocr`` output-channel blocks, the
    register tile of the schedule). An output size that is not a multiple of ``m`` computes the
    rest of its last tiles (into a scratch buffer) and drops it."""
    bt, _, at = _WINO[m]
    alpha = m + 2
    pt, pl, pb, pr = padding
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    th, tw = -(-oh // m), -(-ow // m)
    data = te.placeholder(_i64(n, cib, h, w, cb), dtype, name="data")
    weight = te.placeholder(_i64(alpha * alpha, cob // ocr, cib, cb, ocr * ob), dtype, name="weight")
    hp, wp = m * th + 2, m * tw + 2
    src = _pad_input(data, (n, cib, h, w, cb), pt, pl, hp, wp, dtype)

    def v_fn(b, e, c, ty, tx, i):
        vv = _sandwich(bt, lambda a, bb: src[b, c, ty * m + a, tx * m + bb, i], alpha)
        return _select(e, [vv[r][s_] for r in range(alpha) for s_ in range(alpha)])

    vt = te.compute(_i64(n, alpha * alpha, cib, th, tw, cb), v_fn, name=WINO_V_BLOCK)
    rc = te.reduce_axis(_i64(0, cib), name="rc")
    ri = te.reduce_axis(_i64(0, cb), name="ri")
    mt = te.compute(
        _i64(n, alpha * alpha, cob, th, tw, ob),
        lambda b, e, o, ty, tx, v: te.sum(vt[b, e, rc, ty, tx, ri] * weight[e, o // ocr, rc, ri, (o % ocr) * ob + v],
                                          axis=[rc, ri]),
        name=WINO_M_BLOCK)

    def y_fn(b, o, y, x, v):
        ty, tx = y // m, x // m
        yy = _sandwich(at, lambda r, s_: mt[b, r * alpha + s_, o, ty, tx, v], alpha)
        return _select((y % m) * m + x % m, [yy[u][q] for u in range(m) for q in range(m)])

    out = te.compute(_i64(n, cob, m * th, m * tw, ob), y_fn, name=WINO_Y_BLOCK)
    if (m * th, m * tw) != (oh, ow):
        full = out
        out = te.compute(_i64(n, cob, oh, ow, ob), lambda b, o, y, x, v: full[b, o, y, x, v], name="cachefit_nchwc_crop")
    func = te.create_prim_func([data, weight, out])
    return func.with_attr({"op_pattern": _OUT_EWISE_FUSABLE, "tirx.noalias": True})


def to_blocked_func(n, c, h, w, cb, dtype="float32"):
    """NCHW -> ``[N, C / cb, H, W, cb]`` (the last block zero-padded)."""
    x = te.placeholder(_i64(n, c, h, w), dtype, name="x")

    def body(b, o, i, j, v):
        ch = o * cb + v
        if c % cb == 0:
            return x[b, ch, i, j]
        return tirx.if_then_else(ch < c, x[b, tvm.te.min(ch, c - 1), i, j], tirx.const(0, dtype))

    y = te.compute(_i64(n, _blocks(c, cb), h, w, cb), body, name="cachefit_to_nchwc")
    return te.create_prim_func([x, y]).with_attr({"op_pattern": _INJECTIVE, "tirx.noalias": True})


def to_nchw_func(n, c, h, w, cb, dtype="float32"):
    """``[N, C / cb, H, W, cb]`` -> NCHW (padding channels dropped)."""
    x = te.placeholder(_i64(n, _blocks(c, cb), h, w, cb), dtype, name="x")
    y = te.compute(_i64(n, c, h, w), lambda b, o, i, j: x[b, o // cb, i, j, o % cb], name="cachefit_from_nchwc")
    return te.create_prim_func([x, y]).with_attr({"op_pattern": _INJECTIVE, "tirx.noalias": True})


# ---------------------------------------------------------------------------------------------
# The layout pass
# ---------------------------------------------------------------------------------------------


def _static_shape(expr) -> list | None:
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    if shape is None or not isinstance(shape, relax.ShapeExpr):
        return None
    out = []
    for d in shape.values:
        if not isinstance(d, (int, tirx.IntImm)):
            return None
        out.append(int(d))
    return out


def _dtype(expr) -> str:
    return str(getattr(expr.ty, "dtype", ""))


@dataclass
class _Blocked:
    """A 4-D NCHW activation held as ``var`` of shape ``[N, C / cb, H, W, cb]``."""

    var: relax.Var
    shape: list  # the logical NCHW shape
    cb: int


_ELEMWISE = ("relax.add", "relax.multiply", "relax.subtract", "relax.divide", "relax.maximum", "relax.minimum")
_UNARY = ("relax.nn.relu", "relax.sigmoid", "relax.tanh", "relax.negative", "relax.clip", "relax.nn.silu")
_POOL = ("relax.nn.max_pool2d", "relax.nn.avg_pool2d")


@tvm.transform.module_pass(opt_level=0, name="BlockConvLayout")
class BlockConvLayout:
    """Run chains of convolutions on channel-blocked activations (see the module doc).

    lanes: the channel block ``cb`` (float32 vector lanes of the target).
    min_chain: the fewest eligible convolutions a connected region needs to be converted (a lone
               convolution pays two layout transforms; the NCHW path keeps it).
    Convolutions whose input channels are not a multiple of ``lanes`` (an RGB stem) read their
    NCHW input as ``cb = 1`` blocks (a reshape, no copy); other shapes keep the NCHW path.
    """

    def __init__(self, lanes: int = 16, min_chain: int = 2, winograd: bool = False, winograd_min: int = 8):
        self.lanes = int(lanes)
        self.min_chain = int(min_chain)
        self.winograd = bool(winograd)
        self.winograd_min = int(winograd_min)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if self.lanes < 4:
            return mod
        # ``y = x`` aliases (TVM's import of ONNX Sum leaves them) and inference dropouts would
        # hide a chain's links
        clean = relax.transform.CanonicalizeBindings()(_DropoutToIdentity(mod.clone()).run())
        m = _LayoutMutator(clean, self.lanes, self.min_chain,
                           winograd_min=self.winograd_min if self.winograd else None)
        changed = False
        for gv, func in m.mod_.functions_items():
            if not isinstance(func, relax.Function) or (func.attrs and "Primitive" in func.attrs):
                continue
            regions = m.analyse(func)
            if not regions:
                continue
            changed = True
            m.builder_.update_func(gv, m.visit_expr(func))
        if not changed:
            return mod
        return relax.transform.DeadCodeElimination()(m.builder_.get())


@mutator
class _DropoutToIdentity(PyExprMutator):
    """``dropout(x)[0]`` as ``x`` (inference: the compile pipeline is inference-only)."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self._dropout = tvm.ir.Op.get("relax.nn.dropout")

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function) and not (func.attrs and "Primitive" in func.attrs):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()

    def visit_tuple_getitem_(self, op):  # pylint: disable=arguments-renamed
        op = super().visit_tuple_getitem_(op)
        tup = op.tuple_value
        value = self.lookup_binding(tup) if isinstance(tup, relax.Var) else tup
        if int(op.index) == 0 and isinstance(value, relax.Call) and value.op.same_as(self._dropout):
            return value.args[0]
        return op


@mutator
class _LayoutMutator(PyExprMutator):  # pylint: disable=too-many-instance-attributes
    def __init__(self, mod: tvm.IRModule, lanes: int, min_chain: int, winograd_min: int | None = None):
        super().__init__(mod)
        self.mod_ = mod
        self.lanes = lanes
        self.min_chain = min_chain
        self.winograd_min = winograd_min  # None: no Winograd convolutions
        self._ops = {name: tvm.ir.Op.get(name) for name in
                     ("relax.nn.conv2d", "relax.concat", "relax.mean", *_ELEMWISE, *_UNARY, *_POOL)}
        self.blocked: dict = {}     # original var -> _Blocked
        self.nchw: dict = {}        # original var -> NCHW var (made from the blocked one)
        self.convert: set = set()   # bindings (vars) to convert
        self._funcs: dict = {}      # cache of added PrimFuncs by key

    # -- analysis: which bindings run blocked ---------------------------------------------

    def _op_name(self, value) -> str | None:
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            name = value.op.name
            return name if name in self._ops else None
        return None

    def _conv_ok(self, call) -> bool:
        a = call.attrs
        data, weight = call.args
        ds, ws = _static_shape(data), _static_shape(weight)
        return (
            int(a.groups) == 1 and a.data_layout == "NCHW" and a.kernel_layout == "OIHW"
            and a.out_layout == "NCHW" and ds is not None and ws is not None and len(ds) == 4
            and len(ws) == 4 and _dtype(data) == "float32" and _dtype(weight) == "float32"
            and str(a.out_dtype) in ("", "void", "float32", "None")
            and ws[0] >= self.lanes // 2
        )

    def _activation_like(self, expr, shape) -> bool:
        return isinstance(expr, relax.Var) and _static_shape(expr) == shape

    def _per_channel(self, expr, channels) -> bool:
        s = _static_shape(expr)
        if s is None:
            return False
        if all(d == 1 for d in s):
            return True
        return s in ([1, channels, 1, 1], [channels, 1, 1])

    def analyse(self, func: relax.Function) -> set:
        """Mark the bindings of regions with at least ``min_chain`` eligible convolutions."""
        parent: dict = {}

        def find(v):
            while parent[v] is not v:
                parent[v] = parent[parent[v]]
                v = parent[v]
            return v

        def union(a, b):
            ra, rb = find(a), find(b)
            if ra is not rb:
                parent[ra] = rb

        convs, members = [], []
        bindings = []
        for block in getattr(func.body, "blocks", []):
            bindings.extend(b for b in block.bindings if isinstance(b, relax.VarBinding))
        for b in bindings:
            name = self._op_name(b.value)
            if name is None:
                continue
            shape = _static_shape(b.var)
            if shape is None or len(shape) != 4 or _dtype(b.var) != "float32":
                continue
            call = b.value
            links = []
            if name == "relax.nn.conv2d":
                if not self._conv_ok(call):
                    continue
                convs.append(b.var)
                links = [call.args[0]] if call.args[0] in parent else []
            elif name in _ELEMWISE:
                ops = list(call.args)
                acts = [x for x in ops if x in parent and self._activation_like(x, shape)]
                if not acts or not all(x in acts or self._per_channel(x, shape[1]) for x in ops):
                    continue
                links = acts
            elif name in _UNARY or name in _POOL:
                x = call.args[0]
                if x not in parent:
                    continue
                if name in _POOL and (call.attrs.layout != "NCHW" or call.attrs.out_layout != "NCHW"):
                    continue
                links = [x]
            elif name == "relax.mean":
                x = call.args[0]
                axes = sorted(int(a) % 4 for a in call.attrs.axis) if call.attrs.axis is not None else None
                if x not in parent or axes != [2, 3] or not bool(call.attrs.keepdims):
                    continue
                links = [x]
            elif name == "relax.concat":
                fields = call.args[0]
                fields = list(fields.fields) if isinstance(fields, relax.Tuple) else None
                if (int(call.attrs.axis) % 4 != 1 or not fields
                        or not all(f in parent and (_static_shape(f) or [0, 1])[1] % self.lanes == 0 for f in fields)):
                    continue
                links = fields
            parent[b.var] = b.var
            members.append(b.var)
            for x in links:
                union(b.var, x)
        count: dict = {}
        for c in convs:
            count[find(c)] = count.get(find(c), 0) + 1
        self.convert = {v for v in members if count.get(find(v), 0) >= self.min_chain}
        return self.convert

    # -- helpers ----------------------------------------------------------------------------

    def _add_func(self, key, make, name):
        if key not in self._funcs:
            func = make()
            if func.attrs is not None and "global_symbol" in func.attrs:
                func = func.without_attr("global_symbol")
            self._funcs[key] = self.builder_.add_func(func, name)
        return self._funcs[key]

    def _as_blocked(self, expr, cb=None) -> _Blocked:
        """The blocked form of an NCHW activation (emitting the transform when needed)."""
        if isinstance(expr, relax.Var) and expr in self.blocked:
            return self.blocked[expr]
        new = self.visit_expr(expr)
        shape = _static_shape(new)
        n, c, h, w = shape
        cb = cb or self.lanes
        gv = self._add_func(("to", n, c, h, w, cb), lambda: to_blocked_func(n, c, h, w, cb), "cachefit_to_nchwc")
        var = self.builder_.emit(relax.call_tir(gv, [new], relax.TensorType([n, _blocks(c, cb), h, w, cb], "float32")))
        info = _Blocked(var, shape, cb)
        if isinstance(expr, relax.Var) and cb == self.lanes:
            self.blocked[expr] = info
        return info

    def _as_nchw(self, var):
        if var in self.nchw:
            return self.nchw[var]
        info = self.blocked[var]
        n, c, h, w = info.shape
        gv = self._add_func(("from", n, c, h, w, info.cb), lambda: to_nchw_func(n, c, h, w, info.cb),
                            "cachefit_from_nchwc")
        out = self.builder_.emit(relax.call_tir(gv, [info.var], relax.TensorType([n, c, h, w], "float32")))
        self.nchw[var] = out
        return out

    def _operand(self, expr, channels, pad_value: float = 0.0):
        """An element-wise operand in the blocked layout (a per-channel vector reshaped, padded
        with ``pad_value`` up to whole blocks: padding channels must stay finite, since the next
        convolution multiplies them by zero weights)."""
        if isinstance(expr, relax.Var) and expr in self.blocked:
            return self.blocked[expr].var
        s = _static_shape(expr)
        new = self.visit_expr(expr)
        if all(d == 1 for d in s):
            return new if len(s) <= 1 else self.builder_.emit(relax.op.reshape(new, [1] * 5))
        if s in ([1, channels, 1, 1], [channels, 1, 1]):
            cb = self.lanes
            blocks = _blocks(channels, cb)
            if blocks * cb != channels:
                flat = self.builder_.emit(relax.op.reshape(new, [channels]))
                new = self.builder_.emit(relax.op.nn.pad(flat, [0, blocks * cb - channels], pad_value=pad_value))
            return self.builder_.emit(relax.op.reshape(new, [1, blocks, 1, 1, cb]))
        return self._as_blocked(expr).var

    # -- rewriting --------------------------------------------------------------------------

    def visit_var_(self, var):  # pylint: disable=arguments-renamed
        if var in self.blocked and var not in self.nchw:
            return self._as_nchw(var)
        if var in self.nchw:
            return self.nchw[var]
        return super().visit_var_(var)

    def visit_dataflow_var_(self, var):  # pylint: disable=arguments-renamed
        return self.visit_var_(var)

    def visit_var_binding_(self, binding):  # pylint: disable=arguments-renamed
        var = binding.var
        if var not in self.convert:
            super().visit_var_binding_(binding)
            return
        call = binding.value
        name = self._op_name(call)
        shape = _static_shape(var)
        n, c, h, w = shape
        cb = self.lanes
        if name == "relax.nn.conv2d":
            result = self._conv(call, shape)
        elif name in _ELEMWISE:
            args = [self._operand(x, c, 1.0 if name == "relax.divide" else 0.0) for x in call.args]
            result = self.builder_.emit(relax.Call(call.op, args, call.attrs))
        elif name in _UNARY:
            result = self.builder_.emit(relax.Call(call.op, [self._as_blocked(call.args[0]).var], call.attrs))
        elif name in _POOL:
            a = call.attrs
            x = self._as_blocked(call.args[0]).var
            layout = f"NCHW{cb}c"
            fn = relax.op.nn.max_pool2d if name == "relax.nn.max_pool2d" else relax.op.nn.avg_pool2d
            result = self.builder_.emit(fn(
                x, [int(p) for p in a.pool_size], [int(s) for s in a.strides], [int(p) for p in a.padding],
                [int(d) for d in a.dilation], bool(a.ceil_mode), bool(a.count_include_pad),
                layout=layout, out_layout=layout))
        elif name == "relax.mean":
            x = self._as_blocked(call.args[0]).var
            result = self.builder_.emit(relax.op.mean(x, axis=[2, 3], keepdims=True))
        else:  # concat
            fields = [self._as_blocked(f).var for f in call.args[0].fields]
            result = self.builder_.emit(relax.op.concat(fields, axis=1))
        self.blocked[var] = _Blocked(result, shape, cb)
        if not isinstance(var, relax.DataflowVar):
            # an output of the dataflow block: it must exist in NCHW under its own name
            out = self._as_nchw(var)
            self.builder_.emit_normalized(relax.VarBinding(var, out))
            self.nchw[var] = var

    def _conv(self, call, oshape):
        a = call.attrs
        data, weight = call.args
        n, ci, h, w = _static_shape(data)
        co, _, kh, kw = _static_shape(weight)
        # an input already blocked keeps its blocks; an NCHW one with few channels (an RGB stem)
        # is read as blocks of one channel (no padding)
        blocked_in = isinstance(data, relax.Var) and data in self.blocked
        cb_in = self.lanes if (blocked_in or ci >= self.lanes) else 1
        cib = _blocks(ci, cb_in)
        ob = self.lanes
        cob = _blocks(co, ob)
        x = self._as_blocked(data, cb_in)
        wv = self.visit_expr(weight)
        # a weight with a batch norm folded in (FoldBatchNormScale): one pack folds and re-lays
        # out, from the original weights
        eps, wargs = None, [wv]
        fold = self.lookup_binding(wv) if isinstance(wv, relax.Var) else None
        if isinstance(fold, relax.Call) and isinstance(fold.args[0], tvm.ir.GlobalVar):
            try:
                func = self.mod_[fold.args[0]]
            except (KeyError, ValueError, tvm.error.TVMError):  # pragma: no cover - TVM's error type
                func = None
            if isinstance(func, tirx.PrimFunc) and func.attrs is not None and BN_FOLD_ATTR in func.attrs:
                eps, wargs = float(func.attrs[BN_FOLD_ATTR]), list(fold.args[1].fields)
        scaled = len(wargs) == 3
        strides = [int(s) for s in a.strides]
        padding = [int(p) for p in a.padding]
        dilation = [int(d) for d in a.dilation]
        if self.winograd_min is not None and winograd_eligible(kh, kw, strides, dilation, cib, cb_in, self.lanes,
                                                               oshape[2], oshape[3], self.winograd_min):
            return self._winograd_conv(x, wargs, eps, scaled, (n, ci, cib, cb_in, h, w, co, cob, ob), padding, oshape)
        pack = self._add_func(("pack", co, ci, kh, kw, cb_in, ob, eps, scaled),
                              lambda: pack_weight_func(co, ci, kh, kw, cb_in, ob, fold_eps=eps, fold_scaled=scaled),
                              "cachefit_pack_conv_weight")
        wp = self.builder_.emit(relax.call_tir(
            pack, wargs, relax.TensorType([cob, cib, kh, kw, cb_in, ob], "float32")))
        ow = oshape[3]
        flat = flat_conv_ok(kh, kw, strides, padding, dilation, oshape[2], ow, cob)
        _, _, owp = choose_tile(oshape[2] * ow if flat else ow, cob)
        key = ("conv", n, cib, cb_in, h, w, cob, ob, kh, kw, *strides, *padding, *dilation, owp, flat)
        gv = self._add_func(key, lambda: conv2d_nchwc_func(n, cib, cb_in, h, w, cob, ob, kh, kw,
                                                           strides, padding, dilation, owp, flat=flat),
                            "cachefit_conv2d_nchwc")
        return self.builder_.emit(relax.call_tir(
            gv, [x.var, wp], relax.TensorType([n, cob, oshape[2], oshape[3], ob], "float32")))


    def _winograd_conv(self, x, wargs, eps, scaled, dims, padding, oshape):
        """A 3x3 stride-1 convolution as Winograd F(2x2, 3x3) (:func:`conv2d_winograd_func`), its
        weight transformed (and a batch norm folded) by one weight pack."""
        n, ci, cib, cb_in, h, w, co, cob, ob = dims
        m = winograd_tile(oshape[2], oshape[3])
        _, ocr, _ = choose_tile(-(-oshape[3] // m), cob)  # the GEMMs' register tile (NCHWcConvRule)
        pack = self._add_func(("wino_pack", co, ci, cb_in, ob, ocr, m, eps, scaled),
                              lambda: winograd_weight_func(co, ci, cb_in, ob, ocr, m, fold_eps=eps, fold_scaled=scaled),
                              "cachefit_pack_wino_weight")
        wp = self.builder_.emit(relax.call_tir(
            pack, wargs, relax.TensorType([(m + 2) ** 2, cob // ocr, cib, cb_in, ocr * ob], "float32")))
        key = ("wino", n, cib, cb_in, h, w, cob, ob, ocr, m, *padding)
        gv = self._add_func(key, lambda: conv2d_winograd_func(n, cib, cb_in, h, w, cob, ob, padding, ocr, m),
                            "cachefit_conv2d_winograd")
        return self.builder_.emit(relax.call_tir(
            gv, [x.var, wp], relax.TensorType([n, cob, oshape[2], oshape[3], ob], "float32")))


# ---------------------------------------------------------------------------------------------
# The schedule rule
# ---------------------------------------------------------------------------------------------


def _inline_around(sch, first: str, last: str):
    """Inline the element-wise blocks before block ``first`` (the input's prologue, into the
    padding or the kernel) and the chain after block ``last`` into its final block. Returns
    ``(ok, epilogue)``: ``ok`` False when what follows ``last`` is not one spatial block;
    ``epilogue`` that block (or None)."""
    blocks = _root_blocks(sch)
    at = [sch.get(b).name_hint for b in blocks].index(first)
    for blk in reversed(blocks[:at]):
        if sch.get(blk).name_hint == PAD_BLOCK:
            continue
        try:
            sch.compute_inline(blk)
        except Exception:  # pylint: disable=broad-except
            pass

    def tail():
        now = _root_blocks(sch)
        return now[[sch.get(b).name_hint for b in now].index(last) + 1:]

    for blk in tail()[:-1]:
        try:
            sch.compute_inline(blk)
        except Exception:  # pylint: disable=broad-except
            pass
    after = tail()
    if len(after) > 1 or any(_is_reduction(sch, b) for b in after):
        return False, None
    return True, (after[0] if after else None)


def _root_blocks(sch):
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _is_reduction(sch, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


class NCHWcConvRule(dlight.ScheduleRule):
    """Register-tiled NCHWc convolution with the fused epilogue on the tile (see the module doc).

    spec: a :class:`cachefit.codegen.cpu_schedule.CPUSpec` (lanes, registers, L2, threads).
    Takes functions holding a block named ``cachefit_nchwc_conv``; returns None for others.
    """

    def __init__(self, spec, chunk: bool = True):
        self.spec = spec
        self.chunk = chunk

    @staticmethod
    def _parallel(sch, outer, threads: int, work: int) -> None:
        """The shortest prefix of ``outer`` with at least 4 iterations per thread, parallel."""
        if threads <= 1 or work < (1 << 17):
            return
        prefix, n_par = [], 1
        for lp in outer:
            prefix.append(lp)
            n_par *= int(sch.get(lp).extent)
            if n_par >= 4 * threads:
                break
        if n_par >= threads:
            sch.parallel(sch.fuse(*prefix) if len(prefix) > 1 else prefix[0])

    def apply(self, func, target, _tunable):  # pylint: disable=too-many-locals,too-many-branches,too-many-statements
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        try:
            conv = sch.get_sblock(CONV_BLOCK)
        except Exception:  # pylint: disable=broad-except
            try:
                sch.get_sblock(WINO_M_BLOCK)
            except Exception:  # pylint: disable=broad-except
                return None
            return self._winograd(sch)
        flat = any(sch.get(blk).name_hint == FLAT_CROP_BLOCK for blk in _root_blocks(sch))
        ok, epi = _inline_around(sch, CONV_BLOCK, CONV_BLOCK)
        if not ok:
            return None
        loops = sch.get_loops(conv)
        if len(loops) != 9:
            return None
        b, o, y, x, v, rc, ry, rx, ri = loops
        ext = [int(sch.get(lp).extent) for lp in loops]
        cob, oh, owp, ob = ext[1], ext[2], ext[3], ext[4]
        lanes = self.spec.lanes("float32")
        if ob % lanes and ob > lanes:
            return None
        owt, ocr, _ = choose_tile(owp, cob, min(self.spec.max_acc, MAX_TILE_BYTES // (4 * ob)))
        if owp % owt:
            owt = max(d for d in range(1, owt + 1) if owp % d == 0)
        oo, oi = sch.split(o, [None, ocr])
        xo, xi = sch.split(x, [None, owt])
        # big activations (VGG's 224x224 layers): rows outside the channel blocks, so that a few
        # input rows stay in L2 while every weight block passes over them; otherwise one weight
        # block stays in L2 while the rows pass
        cib, kh, kw, cb = ext[5], ext[6], ext[7], ext[8]
        in_bytes = cib * cb * (oh * 1) * owp * 4 * max(1, kh)  # about the input read per channel block
        w_bytes = cob * ob * cib * cb * kh * kw * 4
        # a convolution over flattened pixels (one row: conv2d_nchwc_func(flat=True)) never puts
        # its rows outside the channel blocks (it has one)
        rows_outer = not flat and in_bytes > self.spec.l2_bytes // 2 and w_bytes <= self.spec.l2_bytes // 2
        # the weights one tile reads (ocr vectors x all input channels x taps) pass through L1
        # once per tile: with many input channels they come from L2 for every few pixels. Then
        # the input channels are split in chunks whose weights stay in L1 while every tile of
        # the row uses them; the accumulators are loaded and stored once per chunk
        w_chunk = ocr * ob * cb * kh * kw * 4
        # small outputs (7x7, 14x14): the chunk loop goes outside the rows too, so that a chunk
        # of weights serves every tile of the channel slab (whose partial sums stay in L2)
        slab_outer = not rows_outer and ocr * ob * oh * owp * 4 <= self.spec.l2_bytes // 4
        tiles = (oh if slab_outer else 1) * (owp // owt)
        rcc = cib
        threads = self.spec.threads
        # with several threads and too few channel slabs to share, the chunked order's parallel
        # loop (rows) would sit inside the chunk loop: a fork-join per chunk (squeezenet's squeeze
        # layers at 13x13 ran 0.58-0.65x of onnxruntime's); no chunks then, rows in parallel once
        few_slabs = threads > 1 and slab_outer and int(sch.get(b).extent) * (cob // ocr) < 2 * threads
        if self.chunk and not few_slabs and cib * w_chunk > self.spec.l1_bytes // 2 and tiles >= 2:
            fits = [d for d in range(1, cib) if cib % d == 0 and d * w_chunk <= self.spec.l1_bytes // 2]
            rcc = max(fits) if fits else 1
        work = ext[0] * cob * oh * owp * ob * cib * kh * kw * cb
        if flat and epi is not None:
            # the epilogue iterates over the flattened pixels too: it then reads the kernel's
            # result at its own index, a region reverse_compute_at can place at a tile or a slab
            # (at rows and columns, the region of a flat tile is not a rectangle)
            width = int(sch.get(sch.get_loops(epi)[3]).extent)
            sch.transform_block_layout(epi, lambda b_, o_, y_, x_, v_: (b_, o_, y_ * width + x_, v_))
        if rcc < cib:
            rco, rci = sch.split(rc, [None, rcc])
            if rows_outer:
                sch.reorder(b, y, oo, rco, xo, rci, ry, rx, ri, oi, xi, v)
                outer, row_loop = [b, y, oo], oo
            elif slab_outer:
                sch.reorder(b, oo, rco, y, xo, rci, ry, rx, ri, oi, xi, v)
                n_outer = int(sch.get(b).extent) * int(sch.get(oo).extent)
                outer, row_loop = ([b, oo] if n_outer >= 2 * threads else [y]), oo
            else:
                sch.reorder(b, oo, y, rco, xo, rci, ry, rx, ri, oi, xi, v)
                outer, row_loop = [b, oo, y], y
            if epi is not None:
                sch.reverse_compute_at(epi, row_loop, preserve_unit_loops=True)
                _vec_inner(sch, sch.get_loops(epi)[-1], lanes)
            _register_tile(sch, oi, xi, v, ri, cb)
            self._parallel(sch, outer, threads, work)
            # the partial sums stay in the output buffer: with the tile's addresses invariant in
            # the innermost reduction loop and noalias inputs, LLVM keeps them in registers there
            init = sch.decompose_reduction(conv, rco)
            _vec_inner(sch, sch.get_loops(init)[-1], lanes)
        else:
            if rows_outer:
                sch.reorder(b, y, oo, xo, rc, ry, rx, ri, oi, xi, v)
                outer = [b, y, oo]
            else:
                sch.reorder(b, oo, y, xo, rc, ry, rx, ri, oi, xi, v)
                # a flattened row: its tiles are the parallel work too
                outer = [b, oo, y, xo] if flat else [b, oo, y]
            if epi is not None:
                sch.set_scope(conv, 0, "local")
                sch.reverse_compute_at(epi, xo, preserve_unit_loops=True)
                eloops = sch.get_loops(epi)
                _vec_inner(sch, eloops[-1], lanes)
            else:
                _local_accumulators(sch, conv, xo, lanes)
            _register_tile(sch, oi, xi, v, ri, cb)
            self._parallel(sch, outer, threads, work)
            sch.decompose_reduction(conv, rc)
        # padding: its own pass, vectorised along the channel block, parallel over channel blocks
        try:
            pad = sch.get_sblock(PAD_BLOCK)
            pl = sch.get_loops(pad)
            _vec_inner(sch, pl[-1], lanes)
            pad_size = 1
            for lp in pl:
                pad_size *= int(sch.get(lp).extent)
            if threads > 1 and pad_size >= (1 << 16):
                # rows too: a squeeze layer has one channel block
                sch.parallel(sch.fuse(pl[0], pl[1], pl[2]))
        except Exception:  # pylint: disable=broad-except
            pass
        return sch


    def _winograd(self, sch):  # pylint: disable=too-many-locals
        """Schedule :func:`conv2d_winograd_func` (+ its fused epilogue): the input transform
        vectorised over the channel block with the 16 tile elements unrolled (their selects fold,
        the 16 loads are shared); the 16 GEMMs register-tiled as the direct kernel is (tiles along
        x as pixels, output-channel vectors); the output transform with the epilogue inlined."""
        lanes = self.spec.lanes("float32")
        threads = self.spec.threads
        ok, epi = _inline_around(sch, WINO_V_BLOCK, WINO_Y_BLOCK)
        if not ok:
            return None
        if epi is not None:
            try:
                sch.reverse_compute_inline(epi)
                epi = None
            except Exception:  # pylint: disable=broad-except
                pass  # an output size's crop (+ epilogue): its own vectorised pass
        # output transform (+ epilogue): 2x2 outputs of a tile unrolled
        yb = sch.get_sblock(WINO_Y_BLOCK)
        b, o, yy, xx, v = sch.get_loops(yb)
        alpha = int(round(int(sch.get(sch.get_loops(sch.get_sblock(WINO_M_BLOCK))[1]).extent) ** 0.5))
        m = alpha - 2
        yo, yi = sch.split(yy, [None, m])
        xo, xi = sch.split(xx, [None, m])
        sch.reorder(b, o, yo, xo, yi, xi, v)
        sch.unroll(yi)
        sch.unroll(xi)
        _vec_inner(sch, v, lanes)
        # the 16 GEMMs
        mb = sch.get_sblock(WINO_M_BLOCK)
        b, e, o, ty, tx, v, rc, ri = sch.get_loops(mb)
        ext = [int(sch.get(lp).extent) for lp in (b, e, o, ty, tx, v, rc, ri)]
        cob, tw, ob, cb = ext[2], ext[4], ext[5], ext[7]
        # the output-channel vectors of a tile: the weight's panels (winograd_weight_func)
        wbuf = [r.source for r in sch.get(mb).reads if len(r.region) == 5][0]
        ocr = int(wbuf.shape[4]) // ob
        max_acc = min(self.spec.max_acc, MAX_TILE_BYTES // (4 * ob))
        owt, ocr_default, _ = choose_tile(tw, cob, max_acc)
        if ocr_default != ocr:
            owt = min(max(1, max_acc // ocr), tw)
        if tw % owt:
            owt = max(d for d in range(1, owt + 1) if tw % d == 0)
        oo, oi = sch.split(o, [None, ocr])
        xo, xi = sch.split(tx, [None, owt])
        sch.reorder(b, e, oo, ty, xo, rc, ri, oi, xi, v)
        _local_accumulators(sch, mb, xo, lanes)
        _register_tile(sch, oi, xi, v, ri, cb)
        work = ext[1] * ext[0] * cob * ext[3] * tw * ob * ext[6] * cb
        self._parallel(sch, [b, e, oo, ty], threads, work)
        sch.decompose_reduction(mb, rc)
        # input transform: the 16 elements of a tile unrolled over shared loads
        vb = sch.get_sblock(WINO_V_BLOCK)
        b, e, c, ty, tx, i = sch.get_loops(vb)
        sch.reorder(b, c, ty, tx, e, i)
        sch.unroll(e)
        _vec_inner(sch, i, lanes)
        if threads > 1:
            sch.parallel(sch.fuse(b, c, ty))
        if threads > 1:
            b, o, yo = sch.get_loops(sch.get_sblock(WINO_Y_BLOCK))[:3]
            sch.parallel(sch.fuse(b, o, yo))
        if epi is not None:
            el = sch.get_loops(epi)
            _vec_inner(sch, el[-1], lanes)
            if threads > 1:
                sch.parallel(sch.fuse(*el[:3]))
        try:
            pad = sch.get_sblock(PAD_BLOCK)
            pl = sch.get_loops(pad)
            _vec_inner(sch, pl[-1], lanes)
            if threads > 1:
                sch.parallel(sch.fuse(pl[0], pl[1], pl[2]))
        except Exception:  # pylint: disable=broad-except
            pass
        return sch


def _register_tile(sch, oi, xi, v, ri, cb: int) -> None:
    """The register tile: ``ocr`` output-channel vectors x ``owt`` pixels unrolled, the channel
    vector vectorised, the reduction over a channel block unrolled."""
    sch.unroll(oi)
    sch.unroll(xi)
    sch.vectorize(v)
    if cb <= 16:
        sch.unroll(ri)


def _local_accumulators(sch, block, at, lanes: int) -> None:
    """Accumulate ``block`` in a local tile written back (vectorised) under loop ``at``."""
    cw = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(cw, at, preserve_unit_loops=True)
    _vec_inner(sch, sch.get_loops(cw)[-1], lanes)


def _vec_inner(sch, loop, lanes: int) -> None:
    ext = int(sch.get(loop).extent)
    if ext <= lanes:
        sch.vectorize(loop)
    elif ext % lanes == 0:
        _, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)
