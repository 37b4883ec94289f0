"""Calibration for weight quantization: input Hessians of the matmuls, and GPTQ error compensation."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

from ..errors import CachefitError
from .quantize_weights import group_scale, num_groups, pack, qmax_of, quantize_rows

log = logging.getLogger(__name__)

#: GPTQ's damping: this fraction of the mean diagonal of the Hessian is added to its diagonal
DAMP = 0.01
#: rows of W updated together before the lazy update of the rows after them
BLOCK = 128


# ---------------------------------------------------------------------------------------------
# GPTQ on one matrix
# ---------------------------------------------------------------------------------------------


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, bits: int, group_size: int | None = None,
                  damp: float = DAMP, block: int = BLOCK, act_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al., 2023) quantization of ``w`` [K, N] (K the reduction axis) for the
    input second moment ``hessian`` = X^T X [K, K] of the rows X [M, K] that multiply it.

    Rows of W are quantized in order; the error of row k, divided by the k-th diagonal entry of
    the upper Cholesky factor U of H^-1, is spread over the rows not yet quantized along row k of
    U, so that ||X W - X Wq|| (not ||W - Wq||) is what the rounding minimises. Scales are those of
    :func:`~cachefit.passes.quantize_weights.quantize_array` (symmetric, clip search), found for
    each group from the error-updated rows when the group is reached (per output channel: from W
    once). ``damp`` x mean(diag H) is added to the diagonal; rows whose input is always zero are
    quantized to 0. ``act_order``: rows are quantized in order of decreasing input energy diag(H)
    (GPTQ's "act-order"), with every group's scale fixed beforehand from W ("static groups"), so
    the stored format stays the same.

    Returns ``(q, scale)`` in quantize_array's stored format (same shapes and packing), so the
    kernels and :func:`~cachefit.passes.quantize_weights.dequantize_array` read it unchanged.
    """
    if bits not in (8, 4):
        raise CachefitError(f"unsupported weight bits {bits}: use 8 or 4")
    W = np.array(w, dtype=np.float64)
    if W.ndim != 2:
        raise CachefitError(f"gptq_quantize expects a [K, N] matrix, got shape {list(W.shape)}")
    k, n = W.shape
    H = np.array(hessian, dtype=np.float64)
    if H.shape != (k, k):
        raise CachefitError(f"the Hessian of a [{k}, {n}] weight must be [{k}, {k}], got {list(H.shape)}")
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H[np.diag_indices(k)] += damp * float(np.mean(np.diag(H)))
    g = int(group_size) if group_size else None
    static = None
    perm = np.arange(k)
    if act_order:
        static = np.stack([group_scale(W[i:i + (g or k)], bits) for i in range(0, k, g or k)])
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[perm], H[np.ix_(perm, perm)]
    try:
        U = np.linalg.cholesky(np.linalg.inv(H)).T   # upper: H^-1 = U^T U
    except np.linalg.LinAlgError:
        raise CachefitError("the calibration Hessian is not positive definite even after damping; "
                            f"use a larger damp than {damp} or more calibration inputs") from None
    scale = np.zeros((num_groups(k, g), n), np.float32)
    if static is not None:
        scale[:] = static
    elif g is None:
        scale[0] = group_scale(W, bits)
    qmax = qmax_of(bits)
    Q = np.zeros((k, n), np.float32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            orig = int(perm[row])
            if static is None and g is not None and row % g == 0:
                # the group's rows as they are now: updated ones of this block, then later blocks
                end = min(row + g, k)
                rows = np.concatenate([W1[i:min(end - i1, i2 - i1)], W[i2:end]]) if end > i2 else W1[i:end - i1]
                scale[row // g] = group_scale(rows, bits)
            s = scale[orig // g if g else 0].astype(np.float64)
            q = np.clip(np.rint(W1[i] / s), -qmax, qmax)
            Q[orig] = q
            err = (W1[i] - q * s) / U1[i, i]
            W1[i:] -= np.outer(U1[i, i:], err)
            E1[i] = err
        W[i2:] -= U[i1:i2, i2:].T @ E1
    return pack(Q, bits), scale


def output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """||X W - X W_hat||_F^2 from the Hessian alone: trace(D^T H D) with D = W - W_hat."""
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.einsum("kn,kl,ln->", d, np.asarray(hessian, np.float64), d))


# ---------------------------------------------------------------------------------------------
# Hessians from a calibration run of the float ONNX model
# ---------------------------------------------------------------------------------------------


def matmul_inputs(model) -> dict[str, list[str]]:
    """Weight initializer name -> the tensors that multiply it: the ``A`` input of every ``MatMul``
    whose ``B`` is the initializer (or a ``Transpose`` of it) and of every ``Gemm`` (without
    ``transA``) whose ``B`` is the initializer. Other uses (conv, gather) are not listed."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    transposed = {}
    for node in g.node:
        if node.op_type == "Transpose" and node.input and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if perm in (None, [1, 0]):
                transposed[node.output[0]] = node.input[0]
    out: dict[str, list[str]] = {}
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            continue
        b = node.input[1]
        w = b if b in inits else transposed.get(b)
        if w is not None and node.input[0] not in inits:
            out.setdefault(w, []).append(node.input[0])
    return out


def random_inputs(model, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` random feeds for the graph inputs of ``model`` (static shapes): floats N(0, 1);
    integer inputs uniform over the rows of the initializer table they index (``Gather``, possibly
    through a Reshape / Cast / ... view of the input), else 0."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: F401

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    rows = {}
    for node in g.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in inits:
            rows[node.input[1]] = int(inits[node.input[0]].dims[0])
    # token ids often reach their Gather through views or casts (GPT-2: Reshape)
    views = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Identity")
    changed = True
    while changed:
        changed = False
        for node in g.node:
            if node.op_type in views and node.input and node.output and node.output[0] in rows \
                    and node.input[0] not in rows:
                rows[node.input[0]] = rows[node.output[0]]
                changed = True
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(int(count)):
        feed = {}
        for vi in g.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            shape = [d.dim_value for d in tt.shape.dim]
            if any(d <= 0 for d in shape):
                raise CachefitError(f"calibration input {vi.name!r} has no static shape ({shape}): pass the "
                                    "calibration inputs yourself")
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if np.issubdtype(dtype, np.floating):
                feed[vi.name] = rng.standard_normal(shape).astype(dtype)
            elif np.issubdtype(dtype, np.integer):
                if vi.name not in rows:
                    log.warning("calibration input %s: no embedding table found behind it; feeding zeros", vi.name)
                feed[vi.name] = rng.integers(0, rows.get(vi.name, 1), size=shape).astype(dtype)
            else:
                feed[vi.name] = np.zeros(shape, dtype)
        feeds.append(feed)
    return feeds


def collect_hessians(model, inputs: Sequence[Mapping[str, np.ndarray]],
                     weights: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Weight name -> H = X^T X / M (float64 [K, K]) over every row X [M, K] that multiplies the
    weight (all its MatMul / Gemm uses, all ``inputs``), from the float model run by onnxruntime
    with those activations as extra outputs. ``weights`` limits the names (None: every matmul weight).
    """
    import onnx
    import onnxruntime as ort

    uses = matmul_inputs(model)
    if weights is not None:
        uses = {w: a for w, a in uses.items() if w in set(weights)}
    if not uses or not inputs:
        return {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if m.ir_version > 10:
        m.ir_version = 10
    present = {o.name for o in m.graph.output}
    acts = sorted({a for names in uses.values() for a in names})
    for a in acts:
        if a not in present:
            m.graph.output.append(onnx.ValueInfoProto(name=a))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for feed in inputs:
        values = dict(zip(acts, sess.run(acts, dict(feed))))
        for w, names in uses.items():
            for a in names:
                x = np.asarray(values[a], np.float64)
                x = x.reshape(-1, x.shape[-1])
                sums[w] = sums[w] + x.T @ x if w in sums else x.T @ x
                rows[w] = rows.get(w, 0) + x.shape[0]
    log.info("calibration: Hessians of %d weight(s) from %d input batch(es)", len(sums), len(inputs))
    return {w: sums[w] / rows[w] for w in sums}
