"""Structured pruning of MLP hidden units and attention heads (whole columns / rows), shrinking shapes and FLOPs."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import tvm
from tvm import relax

from ..errors import CachefitError
from . import keeps_errors, layering
from .quantize_weights import _dims, _layer_calls, _select, rebuild_layered, rewrite_layer

log = logging.getLogger(__name__)

#: element-wise operators an MLP's activation may be made of (the hidden axis passes through them)
_ELEMENTWISE = (
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.power", "relax.maximum",
    "relax.minimum", "relax.erf", "relax.tanh", "relax.sigmoid", "relax.exp", "relax.sqrt", "relax.negative",
    "relax.astype", "relax.clip", "relax.nn.relu", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.silu",
    "relax.nn.leakyrelu", "relax.abs", "relax.square",
)


@dataclass(frozen=True)
class MlpPair:
    """Hidden units of a layer: ``fc2(act(fc1(x) + b1)) + b2`` with an element-wise ``act``.

    layer:    layer index.
    hidden:   number of hidden units F (columns of every ``fc1`` weight, rows of ``fc2``).
    fc1:      (main weight name, layout) of each producing matmul: ``kn`` ([K, F], ``x @ W``) or
              ``nk`` ([F, K], ``x @ W.T``); several for gated MLPs (SwiGLU: gate and up).
    biases:   main weight names of the [F] vectors added on the way (the fc1 biases).
    fc2:      (main weight name, layout) of the consuming matmul: ``kn`` ([F, N]) or ``nk`` ([N, F]).
    reshapes: positions of the layer's bindings that reshape the hidden activation with its last
              axis kept (their target shapes shrink with it).
    """

    layer: int
    hidden: int
    fc1: tuple
    biases: tuple
    fc2: tuple
    reshapes: tuple = ()   # binding positions, in the layer function, of reshapes on the hidden path

    @property
    def weights(self) -> tuple:
        return tuple(n for n, _ in self.fc1) + self.biases + (self.fc2[0],)


@dataclass(frozen=True)
class PrunedPair:
    """What :class:`PruneWeights` did to one MLP pair (plain data, for reports)."""

    layer: int
    weights: tuple
    hidden_before: int
    hidden_after: int
    kept: tuple

    def to_dict(self) -> dict:
        return {"layer": self.layer, "weights": list(self.weights), "hidden_before": self.hidden_before,
                "hidden_after": self.hidden_after}


def kept_units(ratio: float, hidden: int) -> int:
    """Hidden units kept when pruning ``ratio`` of ``hidden`` (rounded to nearest, at least one)."""
    return max(1, hidden - int(round(float(ratio) * hidden)))


def unit_scores(fc1: list[np.ndarray], fc2: np.ndarray) -> np.ndarray:
    """Importance of each hidden unit j: the product of the L2 norms of its weights,
    ``prod_fc1 ||W1[:, j]|| * ||W2[j, :]||`` (all in [K, F] / [F, N] layout). A unit with a small
    input or output norm contributes little to the layer's output whatever the activation."""
    score = np.linalg.norm(np.asarray(fc2, np.float64), axis=1)
    for w in fc1:
        score = score * np.linalg.norm(np.asarray(w, np.float64), axis=0)
    return score


def choose_units(fc1: list[np.ndarray], fc2: np.ndarray, ratio: float) -> np.ndarray:
    """Indices (ascending) of the hidden units kept: the top ``1 - ratio`` by :func:`unit_scores`
    (ties: the lower index wins)."""
    score = unit_scores(fc1, fc2)
    keep = kept_units(ratio, score.shape[0])
    order = np.argsort(-score, kind="stable")[:keep]
    return np.sort(order)


class _Ops:
    def __init__(self):
        self.matmul = tvm.ir.Op.get("relax.matmul")
        self.permute = tvm.ir.Op.get("relax.permute_dims")
        self.reshape = tvm.ir.Op.get("relax.reshape")
        self.elementwise = [tvm.ir.Op.get(n) for n in _ELEMENTWISE if _op_exists(n)]

    def is_elementwise(self, call) -> bool:
        return isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and any(
            call.op.same_as(o) for o in self.elementwise)


def _op_exists(name: str) -> bool:
    try:
        tvm.ir.Op.get(name)
        return True
    except Exception:  # noqa: BLE001
        return False


def _numel(ty) -> int | None:
    d = _dims(ty)
    return None if d is None else math.prod(d)


def _find_pairs_in_layer(fn: relax.Function, ops: _Ops) -> list[dict]:
    """MLP pairs of one layer function, in terms of its parameters (see MlpPair)."""
    bindings, out = layering.main_block(fn)
    params = set(fn.params)
    value_of = {b.var: b.value for b in bindings}
    uses: dict = {}
    for k, b in enumerate(bindings):
        for u in layering._used_vars(b.value):
            uses.setdefault(u, []).append(k)
    escaping = set(layering._used_vars(out))

    def weight_operand(e):
        """(param, layout) when ``e`` is a rank-2 weight param or permute_dims of one."""
        if isinstance(e, relax.Var) and e in params and len(_dims(e.ty) or ()) == 2:
            return e, "kn"
        v = value_of.get(e) if isinstance(e, relax.Var) else None
        if (isinstance(v, relax.Call) and v.op.same_as(ops.permute) and v.args[0] in params
                and len(_dims(v.args[0].ty) or ()) == 2
                and (v.attrs.axes is None or [int(a) for a in v.attrs.axes] == [1, 0])):
            return v.args[0], "nk"
        return None

    pairs = []
    for k2, b2 in enumerate(bindings):
        v2 = b2.value
        if not (isinstance(v2, relax.Call) and v2.op.same_as(ops.matmul)):
            continue
        w2 = weight_operand(v2.args[1])
        a = v2.args[0]
        if w2 is None or not isinstance(a, relax.Var) or a in params or a not in value_of:
            continue
        w2_shape = _dims(w2[0].ty)
        hidden = w2_shape[0] if w2[1] == "kn" else w2_shape[1]
        # backward cone of element-wise values from fc2's input to the fc1 matmuls
        cone, fc1, biases, reshapes, ok = set(), [], [], [], True
        todo = [a]
        while todo and ok:
            v = todo.pop()
            if v in cone:
                continue
            cone.add(v)
            val = value_of.get(v)
            dims = _dims(v.ty)
            if val is None or dims is None or not dims or dims[-1] != hidden:
                ok = False
                break
            if isinstance(val, relax.Call) and val.op.same_as(ops.matmul) and weight_operand(val.args[1]) is not None:
                w1 = weight_operand(val.args[1])
                s1 = _dims(w1[0].ty)
                if (s1[1] if w1[1] == "kn" else s1[0]) != hidden or isinstance(val.args[0], relax.Var) and val.args[0] in cone:
                    ok = False
                    break
                fc1.append((w1[0], w1[1], v))
                continue
            if isinstance(val, relax.Call) and val.op.same_as(ops.reshape):
                # a reshape that keeps the hidden axis last ([B, S, F] <-> [B*S, F], as Gemm exports)
                src = val.args[0]
                if isinstance(src, relax.Var) and src in value_of and (_dims(src.ty) or (0,))[-1] == hidden:
                    reshapes.append(v)
                    todo.append(src)
                    continue
                ok = False
                break
            if not ops.is_elementwise(val):
                ok = False
                break
            for arg in val.args:
                if not isinstance(arg, relax.Var) and _numel(arg.ty) == 1:
                    continue
                if isinstance(arg, relax.Var) and arg in params:
                    if _dims(arg.ty) == (hidden,):
                        biases.append(arg)
                        continue
                    if _numel(arg.ty) == 1:
                        continue
                    ok = False
                    break
                if isinstance(arg, relax.Var) and arg in value_of:
                    todo.append(arg)
                    continue
                if isinstance(arg, relax.Var) and _numel(arg.ty) == 1:
                    continue
                ok = False
                break
        if not ok or not fc1:
            continue
        # nothing in the cone may be read outside it (other than by fc2 reading ``a``)
        inside = {k for k, b in enumerate(bindings) if b.var in cone}
        for v in cone:
            if v in escaping:
                ok = False
            for k in uses.get(v, []):
                if k not in inside and not (k == k2 and v.same_as(a)):
                    ok = False
        # every weight read here and nowhere else in the layer
        ws = [w for w, _, _ in fc1] + biases + [w2[0]]
        if len(set(ws)) != len(ws):
            ok = False
        perm_vars = {bindings[k].var for k in range(len(bindings))
                     if isinstance(bindings[k].value, relax.Call) and bindings[k].value.op.same_as(ops.permute)}
        allowed = inside | {k2} | {k for k, b in enumerate(bindings) if b.var in perm_vars}
        for w in ws:
            if w in escaping or any(k not in allowed for k in uses.get(w, [])):
                ok = False
        for w, layout, _ in fc1 + [(w2[0], w2[1], None)]:
            if layout == "nk":
                tv = next(b.var for b in bindings if isinstance(b.value, relax.Call) and b.value.op.same_as(ops.permute)
                          and b.value.args[0].same_as(w))
                if tv in escaping or len(uses.get(tv, [])) != 1:
                    ok = False
        if ok:
            pos = {b.var: k for k, b in enumerate(bindings)}
            fc1.sort(key=lambda t: pos[t[2]])   # in execution order
            biases = sorted(set(biases), key=lambda b: list(fn.params).index(b))
            pairs.append({"hidden": hidden, "fc1": [(w, layout) for w, layout, _ in fc1], "biases": biases,
                          "reshapes": sorted(pos[r] for r in reshapes),
                          "fc2": w2})
    return pairs


def _layer_scan(mod: tvm.IRModule, layers) -> tuple:
    """(ops, ``main``'s weight parameters, its layer calls, the chosen layer indices or None, weight
    name -> the layers that read it) of a layered module; refuses a module that is not layered."""
    if not layering.is_layered(mod):
        raise CachefitError("PruneWeights needs a layered module (run DiscoverLayers first)")
    main = mod["main"]
    weights = set(main.params[layering.num_input(main):])
    calls = _layer_calls(mod)
    readers: dict = {}
    for i, _gv, _fn, args in calls:
        for a in args:
            if isinstance(a, relax.Var) and a in weights:
                readers.setdefault(a.name, set()).add(i)
    return _Ops(), weights, calls, _select(layers, calls), readers


def find_mlp_pairs(mod: tvm.IRModule, layers: Iterable | None = None) -> list[MlpPair]:
    """The prunable MLP pairs of a layered module (each expert of an MoE layer is one pair).

    A pair qualifies when its weights are read by that one layer only, every tensor between fc1
    and fc2 is computed element-wise with the hidden axis last, and none of them is used elsewhere.
    """
    ops, weights, calls, chosen, readers = _layer_scan(mod, layers)
    out = []
    for i, _gv, fn, args in calls:
        if chosen is not None and i not in chosen:
            continue
        to_main = {p: a for p, a in zip(fn.params, args)}
        for pr in _find_pairs_in_layer(fn, ops):
            names = [to_main[w] for w, _ in pr["fc1"]] + [to_main[b] for b in pr["biases"]] + [to_main[pr["fc2"][0]]]
            if not all(isinstance(n, relax.Var) and n in weights and readers[n.name] == {i} for n in names):
                continue
            out.append(MlpPair(i, pr["hidden"], tuple((to_main[w].name, lay) for w, lay in pr["fc1"]),
                               tuple(to_main[b].name for b in pr["biases"]),
                               (to_main[pr["fc2"][0]].name, pr["fc2"][1]), tuple(pr["reshapes"])))
    return out


# ---------------------------------------------------------------------------------------------
# Attention heads
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadLayout:
    """Where the heads are along one axis of a tensor: the axis holds ``G`` units (heads, or
    key/value groups under GQA) in each of ``len(inners)`` consecutive segments; in segment ``s``
    unit ``g`` owns ``inners[s]`` consecutive entries. ``[B, S, H*D]`` is ``(2, (D,))``,
    ``[B, H, S, D]`` is ``(1, (1,))``, a fused QKV projection ``[B, S, 3*H*D]`` is ``(2, (D, D, D))``,
    a GQA query ``[B, S, H*D]`` with ``G`` key/value heads is ``(2, (H/G*D,))``."""

    axis: int
    inners: tuple

    def at(self, axis: int) -> "HeadLayout":
        return HeadLayout(int(axis), self.inners)

    def size(self, units: int) -> int:
        return units * sum(self.inners)

    def indices(self, units: int, kept) -> np.ndarray:
        """Entries along the axis that the units ``kept`` own (ascending)."""
        out, off = [], 0
        for inner in self.inners:
            for g in kept:
                out.append(off + g * inner + np.arange(inner))
            off += units * inner
        return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


@dataclass(frozen=True)
class AttentionHeads:
    """The heads of one attention in a layer (see :func:`find_attention_heads`).

    layer:    layer index.
    units:    prunable units G: query heads, or key/value groups under GQA (each with H/G query heads).
    heads:    query heads H.
    head_dim: D.
    weights:  (main weight name, axis, HeadLayout) of every weight sliced with the heads: the
              Q/K/V columns (or a fused QKV projection's), their biases, the output projection's rows.
    reduced:  the names among them sliced along their reduction axis (the output projection).
    """

    layer: int
    units: int
    heads: int
    head_dim: int
    weights: tuple
    reduced: tuple = ()


@dataclass(frozen=True)
class PrunedHeads:
    """What :class:`PruneWeights` did to one attention (plain data, for reports)."""

    layer: int
    weights: tuple
    heads_before: int
    heads_after: int
    kept: tuple   # kept units (heads; key/value groups under GQA)
    reduced: tuple = ()   # (weight name, kept rows of its reduction axis): the output projection

    def to_dict(self) -> dict:
        return {"layer": self.layer, "weights": list(self.weights), "heads_before": self.heads_before,
                "heads_after": self.heads_after, "kept_units": list(self.kept)}


class HeadsNotFound(CachefitError):
    """The attention of a layer could not be followed (the message names the layer and the operator)."""


_HEAD_PASS_OPS = ("relax.nn.softmax", "relax.strided_slice", "relax.concat", "relax.permute_dims", "relax.reshape",
                  "relax.expand_dims", "relax.broadcast_to", "relax.split", "relax.matmul")


class _HeadTracer:
    """Follows the head axis through one layer function (a fixpoint over the bindings)."""

    def __init__(self, fn: relax.Function, ops: _Ops, name: str):
        self.fn, self.ops, self.name = fn, ops, name
        self.bindings, self.out = layering.main_block(fn)
        self.params = set(fn.params)
        self.value_of = {b.var: b.value for b in self.bindings}
        self.lay: dict = {}        # var -> HeadLayout
        self.weights: dict = {}    # param -> (axis, HeadLayout)
        self.handled: set = set()  # binding positions a rule accepted
        self.reduction: set = set()  # weights sliced along their reduction axis (output projections)
        self.pos = {b.var: k for k, b in enumerate(self.bindings)}
        self.op = {n: tvm.ir.Op.get(n) for n in _HEAD_PASS_OPS}
        self.changed = False

    # -- helpers -----------------------------------------------------------------------------
    def fail(self, why: str):
        raise HeadsNotFound(f"--prune-heads: layer {self.name}: {why}; its heads cannot be pruned "
                            "(leave --prune-heads out, or restrict it with layers=...)")

    def dims(self, e):
        return _dims(e.ty) if isinstance(e, relax.Expr) else None

    def is_op(self, v, name):
        return isinstance(v, relax.Call) and v.op.same_as(self.op[name])

    def set(self, var, lay: HeadLayout):
        if var in self.params:
            self.fail(f"the head axis reaches parameter {var.name} through an unsupported use")
        old = self.lay.get(var)
        if old is None:
            self.lay[var] = lay
            self.changed = True
        elif old != lay:
            self.fail(f"{var.name} carries the heads as {old} and as {lay}")

    def set_weight(self, p, axis, lay: HeadLayout):
        old = self.weights.get(p)
        if old is None:
            self.weights[p] = (int(axis), lay.at(axis))
            self.changed = True
        elif old != (int(axis), lay.at(axis)):
            self.fail(f"weight {p.name} is sliced two ways")

    def weight_of(self, e):
        """(param, layout "kn"/"nk") when ``e`` is a rank-2 param or permute_dims of one."""
        if isinstance(e, relax.Var) and e in self.params and len(self.dims(e) or ()) == 2:
            return e, "kn"
        v = self.value_of.get(e) if isinstance(e, relax.Var) else None
        if (self.is_op(v, "relax.permute_dims") and v.args[0] in self.params and len(self.dims(v.args[0]) or ()) == 2
                and (v.attrs.axes is None or [int(a) for a in v.attrs.axes] == [1, 0])):
            return v.args[0], "nk"
        return None

    # -- seeds -----------------------------------------------------------------------------------
    def seeds(self):
        """(position, H, D) of every reshape [..., H*D] -> [..., H, D] to rank 4 (a head split)."""
        out = []
        for k, b in enumerate(self.bindings):
            v = b.value
            if not self.is_op(v, "relax.reshape") or not isinstance(v.args[0], relax.Var):
                continue
            a, o = self.dims(v.args[0]), self.dims(b.var)
            if a is None or o is None or len(o) != 4 or len(o) != len(a) + 1:
                continue
            if list(o[:-2]) == list(a[:-1]) and o[-2] * o[-1] == a[-1] and o[-2] > 1 and o[-1] > 1:
                out.append((k, int(o[-2]), int(o[-1])))
        return out

    # -- rules -----------------------------------------------------------------------------------
    def pairs(self, k, b):
        """Apply the rule of binding ``k`` in both directions."""
        v, y = b.value, b.var
        if isinstance(v, relax.TupleGetItem):
            return  # with its split
        if not isinstance(v, relax.Call) or not isinstance(v.op, tvm.ir.Op):
            return
        if self.is_op(v, "relax.split"):
            self.split_rule(k, b)
            return
        involved = [y] + [a for a in _flat_args(v) if isinstance(a, relax.Var) and a in self.value_of]
        if not any(x in self.lay for x in involved) and not any(
                isinstance(a, relax.Var) and a in self.weights for a in _flat_args(v)):
            return
        if self.is_op(v, "relax.permute_dims"):
            x = v.args[0]
            if x in self.params:
                return  # a weight transposed for a matmul: that matmul's rule
            perm = [int(a) for a in v.attrs.axes] if v.attrs.axes is not None else list(range(len(self.dims(y))))[::-1]
            if x in self.lay:
                self.set(y, self.lay[x].at(perm.index(self.lay[x].axis)))
            if y in self.lay:
                self.set(x, self.lay[y].at(perm[self.lay[y].axis]))
            self.handled.add(k)
        elif any(self.is_op(v, n) for n in ("relax.reshape", "relax.broadcast_to", "relax.expand_dims")):
            x = v.args[0]
            xd, yd = self.dims(x), self.dims(y)
            if self.is_op(v, "relax.expand_dims"):
                new_axis = _expand_map(len(xd), [int(a) for a in v.attrs.axis])   # old axis -> new axis

                def fwd(l):
                    return l.at(new_axis[l.axis])

                def bwd(l):
                    return l.at(new_axis.index(l.axis)) if l.axis in new_axis else None
            elif self.is_op(v, "relax.broadcast_to"):
                shift = len(yd) - len(xd)

                def fwd(l):
                    return l.at(l.axis + shift) if yd[l.axis + shift] == xd[l.axis] else None

                def bwd(l):
                    return l.at(l.axis - shift) if l.axis >= shift and xd[l.axis - shift] == yd[l.axis] else None
            else:
                def fwd(l):
                    return _reshape_layout(xd, yd, l)

                def bwd(l):
                    return _reshape_layout(yd, xd, l)
            for src, dst, f in ((x, y, fwd), (y, x, bwd)):
                if src in self.lay:
                    new = f(self.lay[src])
                    if new is None:
                        self.fail(f"{_opname(v)} {list(xd)} -> {list(yd)} moves the head axis in a way that is not "
                                  "followed (only splits, merges and moves of whole heads are)")
                    self.set(dst, new)
            self.handled.add(k)
        elif self.is_op(v, "relax.split"):
            self.split_rule(k, b)
        elif self.is_op(v, "relax.matmul"):
            self.matmul_rule(k, b)
        elif self.is_op(v, "relax.nn.softmax") or self.is_op(v, "relax.strided_slice") or self.is_op(v, "relax.concat"):
            rank = len(self.dims(y))
            if self.is_op(v, "relax.nn.softmax"):
                busy = {int(v.attrs.axis) % rank}
            elif self.is_op(v, "relax.concat"):
                busy = {int(v.attrs.axis) % rank}
            else:
                busy = {int(a) % rank for a in v.args[1].values} if isinstance(v.args[1], relax.ShapeExpr) else \
                    {int(a) % rank for a in v.args[1]}
            srcs = [a for a in _flat_args(v) if isinstance(a, relax.Var) and a in self.value_of]
            for l in [self.lay[s] for s in [y] + srcs if s in self.lay]:
                if l.axis in busy:
                    self.fail(f"{_opname(v)} works along the head axis")
                for s in [y] + srcs:
                    self.set(s, l)
            self.handled.add(k)
        elif self.ops.is_elementwise(v):
            self.elementwise_rule(k, b)
        # anything else: left unhandled; check() names it

    def elementwise_rule(self, k, b):
        v, y = b.value, b.var
        yd = self.dims(y)
        known = None
        if y in self.lay:
            known = self.lay[y]
        for a in v.args:
            if isinstance(a, relax.Var) and a in self.lay:
                shift = len(yd) - len(self.dims(a))
                la = self.lay[a].at(self.lay[a].axis + shift)
                if known is not None and known != la:
                    self.fail(f"{_opname(v)} combines tensors whose heads differ")
                known = la
        if known is None:
            return
        self.set(y, known)
        n = yd[known.axis]
        for a in v.args:
            ad = self.dims(a) if isinstance(a, relax.Expr) else None
            if ad is None:
                continue
            ax = known.axis - (len(yd) - len(ad))
            if ax < 0 or ad[ax] == 1:
                continue
            if ad[ax] != n:
                self.fail(f"{_opname(v)} broadcasts along the head axis")
            if isinstance(a, relax.Var) and a in self.params:
                self.set_weight(a, ax, known)
            elif isinstance(a, relax.Var) and a in self.value_of:
                self.set(a, known.at(ax))
            else:
                self.fail(f"{_opname(v)} reads a constant along the head axis")
        self.handled.add(k)

    def matmul_rule(self, k, b):
        v, y = b.value, b.var
        a, w = v.args[0], v.args[1]
        yd, ad = self.dims(y), self.dims(a)
        ry, ra = len(yd), len(ad)
        weight = self.weight_of(w)
        if weight is not None:
            p, layout = weight
            if layout == "nk":
                self.handled.add(self.pos[w])
            if y in self.lay:
                ly = self.lay[y]
                if ly.axis == ry - 1:       # the projection's output columns
                    self.set_weight(p, 1 if layout == "kn" else 0, ly)
                else:
                    self.set(a, ly.at(ly.axis - (ry - ra)))
            if a in self.lay:
                la = self.lay[a]
                if la.axis == ra - 1:       # the output projection's input rows
                    self.set_weight(p, 0 if layout == "kn" else 1, la)
                    self.reduction.add(p)
                else:
                    self.set(y, la.at(la.axis + (ry - ra)))
            if p in self.weights and not (y in self.lay or a in self.lay):
                ax, lw = self.weights[p]
                if (ax == 1) == (layout == "kn"):
                    self.set(y, lw.at(ry - 1))
                else:
                    self.set(a, lw.at(ra - 1))
                    self.reduction.add(p)
            self.handled.add(k)
            return
        bd = self.dims(w)
        rb = len(bd)
        # batched matmul of two activations: batch axes and the row / column axes carry heads
        for src, rs, dims in ((a, ra, ad), (w, rb, bd)):
            if src in self.lay and self.lay[src].axis == rs - (1 if src is a else 2):
                self.fail("a matmul contracts over the head axis")
        def to_y(src, rs, l):
            if l.axis < rs - 2:
                return l.at(l.axis + (ry - rs))
            if src is a and l.axis == rs - 2:
                return l.at(ry - 2)
            if src is w and l.axis == rs - 1:
                return l.at(ry - 1)
            return None
        for src, rs in ((a, ra), (w, rb)):
            if isinstance(src, relax.Var) and src in self.lay:
                self.set(y, to_y(src, rs, self.lay[src]))
        if y in self.lay:
            ly = self.lay[y]
            for src, rs, dims in ((a, ra, ad), (w, rb, bd)):
                if ly.axis < ry - 2:
                    ax = ly.axis - (ry - rs)
                    if ax >= 0 and dims[ax] != 1:
                        self.set(src, ly.at(ax))
                elif ly.axis == ry - 2 and src is a:
                    self.set(a, ly.at(ra - 2))
                elif ly.axis == ry - 1 and src is w:
                    self.set(w, ly.at(rb - 1))
        self.handled.add(k)

    def split_rule(self, k, b):
        v, s = b.value, b.var
        x = v.args[0]
        xd = self.dims(x)
        axis = int(v.attrs.axis) % len(xd)
        items = {}
        for k2, b2 in enumerate(self.bindings):
            if isinstance(b2.value, relax.TupleGetItem) and b2.value.tuple_value.same_as(s):
                items[int(b2.value.index)] = (k2, b2.var)
        n = len(s.ty.fields)
        if x not in self.lay and not any(var in self.lay for _, var in items.values()):
            return
        if x in self.lay:
            lx = self.lay[x]
            if lx.axis != axis:
                for _, (k2, var) in items.items():
                    self.set(var, lx)
            else:
                if len(lx.inners) != n:
                    self.fail(f"split into {n} parts does not follow the {len(lx.inners)} head segments")
                for i, (k2, var) in items.items():
                    self.set(var, HeadLayout(axis, (lx.inners[i],)))
        known = [self.lay.get(var) for i, (_, var) in sorted(items.items())]
        if any(l is not None for l in known):
            if all(l is not None and l.axis == axis and len(l.inners) == 1 for l in known) and len(known) == n:
                self.set(x, HeadLayout(axis, tuple(l.inners[0] for l in known)))
            elif all(l is not None and l.axis != axis for l in known) and len(known) == n:
                self.set(x, known[0])
            elif all(l is not None for l in known) or len(known) < n:
                self.fail("a split of the heads has parts without heads")
            else:
                return  # the other parts are not reached yet
        self.handled.add(k)
        self.handled.update(k2 for k2, _ in items.values())

    # -- the fixpoint ----------------------------------------------------------------------------
    def run(self) -> tuple[int, int, int] | None:
        """(units G, query heads H, head dim D), or None when the layer has no head split."""
        seeds = self.seeds()
        if not seeds:
            return None
        ds = {d for _, _, d in seeds}
        if len(ds) != 1:
            self.fail(f"head splits of different head sizes {sorted(ds)}")
        d = ds.pop()
        g = min(h for _, h, _ in seeds)
        if any(h % g for _, h, _ in seeds):
            self.fail(f"heads {sorted({h for _, h, _ in seeds})} are not multiples of the {g} key/value heads")
        for k, h, _ in seeds:
            b = self.bindings[k]
            self.set(b.value.args[0], HeadLayout(len(self.dims(b.var)) - 2, (h // g * d,)))
            self.set(b.var, HeadLayout(len(self.dims(b.var)) - 2, (h // g,)))
        self.changed = True
        while self.changed:
            self.changed = False
            for k, b in enumerate(self.bindings):
                self.pairs(k, b)
        self.check()
        return g, max(h for _, h, _ in seeds), d

    def check(self):
        for k, b in enumerate(self.bindings):
            if k in self.handled:
                continue
            used = [a for a in layering._used_vars(b.value) if a in self.lay or a in self.weights]
            if b.var in self.lay or used:
                what = _opname(b.value)
                self.fail(f"the head axis of {(used or [b.var])[0].name} goes through {what}, which is not followed")
        for v in layering._used_vars(self.out):
            if v in self.lay:
                self.fail(f"{v.name}, which carries the heads, leaves the layer")
        perm_of = {b.var: b.value.args[0] for b in self.bindings if self.is_op(b.value, "relax.permute_dims")}
        for k, b in enumerate(self.bindings):
            for u in layering._used_vars(b.value):
                p = perm_of.get(u, u)
                if p in self.weights and k not in self.handled:
                    self.fail(f"weight {p.name} is also read by {_opname(b.value)}")
                if u in self.weights and self.is_op(b.value, "relax.permute_dims") and b.var in self.lay:
                    self.fail(f"weight {u.name} is read as an activation")
        if not self.weights:
            self.fail("no weight is sliced with the heads")


def _flat_args(call):
    out = []
    for a in call.args:
        if isinstance(a, relax.Tuple):
            out += list(a.fields)
        else:
            out.append(a)
    return out


def _opname(v) -> str:
    return str(v.op.name) if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) else type(v).__name__


def _expand_map(rank: int, axes: list) -> list:
    """Old axis -> new axis of expand_dims(rank, axes)."""
    new_rank = rank + len(axes)
    inserted = {a % new_rank for a in axes}
    return [i for i in range(new_rank) if i not in inserted]


def _reshape_layout(src, dst, lay: HeadLayout) -> HeadLayout | None:
    """The head layout of ``reshape(src -> dst)``'s result: the head axis kept, split into
    (heads, head dim) or merged with the axis after it; None otherwise."""
    axis = lay.axis
    pre, n = math.prod(src[:axis]), src[axis]
    post = math.prod(src[axis + 1:])
    for j in range(len(dst)):
        if math.prod(dst[:j]) != pre:
            continue
        if dst[j] == n and math.prod(dst[j + 1:]) == post:
            return lay.at(j)
        if (len(lay.inners) == 1 and j + 1 < len(dst) and dst[j] * dst[j + 1] == n
                and lay.inners[0] % dst[j + 1] == 0 and math.prod(dst[j + 2:]) == post):
            return HeadLayout(j, (lay.inners[0] // dst[j + 1],))
        if (len(lay.inners) == 1 and axis + 1 < len(src) and dst[j] == n * src[axis + 1]
                and math.prod(dst[j + 1:]) == math.prod(src[axis + 2:])):
            return HeadLayout(j, (lay.inners[0] * src[axis + 1],))
    return None


def find_attention_heads(mod: tvm.IRModule, layers: Iterable | None = None) -> list[AttentionHeads]:
    """The attentions of a layered module whose heads can be pruned, one per layer that has one.

    A layer's attention is found from its head splits (``reshape [..., H*D] -> [..., H, D]``); the
    head axis is then followed in both directions through bias adds, element-wise operators,
    reshapes, transposes, slices and concatenations on other axes (rotary embeddings), softmax,
    the batched matmuls of scores and context, a split of a fused QKV projection, and GQA's
    expand / broadcast / reshape of the key and value heads, up to the projections whose weight
    columns (Q, K, V) or rows (O) it slices. With GQA (key/value heads G < query heads H) the
    units are the G key/value groups, each with its H/G query heads. A layer whose head axis
    reaches anything else raises :class:`HeadsNotFound` naming the layer and the operator.
    """
    ops, weights, calls, chosen, readers = _layer_scan(mod, layers)
    out = []
    for i, _gv, fn, args in calls:
        if chosen is not None and i not in chosen:
            continue
        name = str(fn.attrs["cachefit.layer_name"])
        tracer = _HeadTracer(fn, ops, name)
        found = tracer.run()
        if found is None:
            continue
        g, h, d = found
        to_main = dict(zip(fn.params, args))
        ws = []
        for p, (axis, lay) in tracer.weights.items():
            a = to_main[p]
            if not (isinstance(a, relax.Var) and a in weights):
                tracer.fail(f"{p.name} is not a weight of the model")
            if readers[a.name] != {i}:
                tracer.fail(f"weight {a.name} is also read by layers {sorted(readers[a.name] - {i})}")
            ws.append((a.name, axis, lay))
        order = {to_main[p].name: k for k, p in enumerate(fn.params) if isinstance(to_main[p], relax.Var)}
        out.append(AttentionHeads(i, g, h, d, tuple(sorted(ws, key=lambda t: order[t[0]])),
                                  tuple(sorted((to_main[p].name for p in tracer.reduction), key=order.get))))
    return out


def head_scores(weights: list[tuple[np.ndarray, int, HeadLayout]], units: int) -> np.ndarray:
    """Importance of each unit g: the product, over the matrices sliced with the heads (Q, K, V,
    O; biases left out), of the L2 (Frobenius) norm of the unit's slice."""
    score = np.ones(units, np.float64)
    for w, axis, lay in weights:
        w = np.asarray(w, np.float64)
        if w.ndim != 2:
            continue
        for g in range(units):
            score[g] *= np.linalg.norm(np.take(w, lay.indices(units, [g]), axis=axis))
    return score


def choose_heads(weights, units: int, ratio: float) -> np.ndarray:
    """Units kept (ascending): the top ``1 - ratio`` by :func:`head_scores` (ties: lower index)."""
    score = head_scores(weights, units)
    order = np.argsort(-score, kind="stable")[:kept_units(ratio, units)]
    return np.sort(order)


@tvm.transform.module_pass(opt_level=0, name="PruneWeights")
class PruneWeights:
    """Remove a fraction of the hidden units of every MLP pair: columns of ``fc1`` (and of each
    gate of a gated MLP), the matching ``fc1`` bias entries, and rows of ``fc2``.

    The pair is found structurally inside each layer (see :func:`find_mlp_pairs`): ``fc1 = x @ W1``
    (``W1`` [K, F], or ``x @ W1.T``), an element-wise chain (bias add, GELU written out as ``erf``,
    ReLU, SiLU, a gate product), then ``fc2 = h @ W2``. Each expert of an MoE layer is its own pair
    and is pruned on its own. The units kept are the top ``1 - ratio`` by the product of the L2 norms
    of their fc1 columns and fc2 row (:func:`unit_scores`). Shapes shrink, so the layer's weight
    bytes and the MLP's FLOPs drop by the ratio.

    With ``heads``, whole attention heads are removed too (:func:`find_attention_heads`): their
    columns of Q, K and V (or of a fused QKV projection), the bias entries, the rows of the output
    projection, and the head count in the reshape / broadcast / split shapes, so the attention runs
    with fewer heads. Under GQA whole key/value groups go (a key/value head with its query heads).
    The heads kept are the top ``1 - heads`` by the product of the L2 norms of their Q/K/V/O
    slices (:func:`head_scores`).

    Options:
        params: weight name -> array (None values for shape-only models: only shapes change; the
                units kept are then the first ones). ``new_params`` holds the new dict after the run.
        ratio:  fraction of each pair's hidden units to remove, in [0, 1).
        layers: layer indices or names to prune (None: every layer).
        heads:  fraction of each attention's heads (key/value groups under GQA) to remove, in [0, 1).
    ``pruned`` lists what was done (PrunedPair and PrunedHeads records).
    """

    def __init__(self, params: Mapping | None = None, ratio: float = 0.0, layers: Iterable | None = None,
                 heads: float = 0.0):
        ratio = float(ratio)
        if not 0.0 <= ratio < 1.0:
            raise CachefitError(f"--prune {ratio} is not a fraction in [0, 1): e.g. 0.25 removes a quarter of "
                                "each MLP's hidden units")
        if not 0.0 <= float(heads) < 1.0:
            raise CachefitError(f"--prune-heads {heads} is not a fraction in [0, 1): e.g. 0.25 removes a quarter "
                                "of each attention's heads")
        self.heads = float(heads)
        self.params = dict(params or {})
        self.ratio = ratio
        self.layers = list(layers) if layers is not None else None
        self.new_params: dict | None = None
        self.pruned: list[PrunedPair] = []
        self._ops = _Ops()

    @keeps_errors
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:  # noqa: ARG002
        self.new_params = dict(self.params)
        self.pruned = []
        mod = self._prune_mlps(mod)
        if self.heads > 0.0:
            mod = self._prune_heads(mod)
        return mod

    def _prune_mlps(self, mod):
        if self.ratio == 0.0:
            return mod
        pairs = [p for p in find_mlp_pairs(mod, self.layers) if kept_units(self.ratio, p.hidden) < p.hidden]
        if not pairs:
            log.info("PruneWeights: no MLP pair to prune")
            return mod
        main = mod["main"]
        types = {p.name: p.ty for p in main.params}
        expansion: dict = {}
        keep_of: dict = {}   # main weight name -> (axis, kept indices)
        for pr in pairs:
            keep = self._kept(pr)
            f2 = len(keep)
            for name, layout in pr.fc1:
                keep_of[name] = (1 if layout == "kn" else 0, keep)
            for name in pr.biases:
                keep_of[name] = (0, keep)
            name, layout = pr.fc2
            keep_of[name] = (0 if layout == "kn" else 1, keep)
            self.pruned.append(PrunedPair(pr.layer, pr.weights, pr.hidden, f2, tuple(int(i) for i in keep)))
        for name, (axis, keep) in keep_of.items():
            ty = types[name]
            shape = list(_dims(ty))
            shape[axis] = len(keep)
            expansion[name] = [(name, relax.TensorType(shape, str(ty.dtype)))]
            value = self.new_params.get(name)
            self.new_params[name] = None if value is None else np.ascontiguousarray(np.take(np.asarray(value), keep, axis=axis))

        new_layers = {}
        for i, gv, fn, args in _layer_calls(mod):
            which = {p: a.name for p, a in zip(fn.params, args) if isinstance(a, relax.Var) and a.name in expansion}
            if not which:
                continue
            bindings, _ = layering.main_block(fn)
            hidden_of = {bindings[k].var: kept_units(self.ratio, pr.hidden)
                         for pr in pairs if pr.layer == i for k in pr.reshapes}

            def param_types(p, which=which):
                return expansion[which[p]] if p in which else None

            def rewrite(bb, b, replaced, remap, hidden_of=hidden_of):
                if b.var not in hidden_of:
                    return None
                shape = [int(d) for d in _dims(b.var.ty)]
                shape[-1] = hidden_of[b.var]
                return relax.op.reshape(remap(b.value.args[0]), shape)

            new_layers[gv] = rewrite_layer(fn, gv, param_types, rewrite)
        out = rebuild_layered(mod, new_layers, expansion)
        log.info("PruneWeights: %d MLP pair(s) pruned by %.0f%%", len(pairs), 100 * self.ratio)
        return out

    def _prune_heads(self, mod):
        atts = [a for a in find_attention_heads(mod, self.layers) if kept_units(self.heads, a.units) < a.units]
        if not atts:
            log.info("PruneWeights: no attention heads to prune")
            return mod
        types = {p.name: p.ty for p in mod["main"].params}
        expansion, kept_of = {}, {}
        for att in atts:
            values = [self.new_params.get(n) for n, _, _ in att.weights]
            if any(v is None for v in values):
                keep = np.arange(kept_units(self.heads, att.units))
            else:
                keep = choose_heads([(np.asarray(v), ax, lay) for v, (_, ax, lay) in zip(values, att.weights)],
                                    att.units, self.heads)
            kept_of[att.layer] = keep
            reduced = []
            for name, axis, lay in att.weights:
                idx = lay.indices(att.units, keep)
                shape = list(_dims(types[name]))
                shape[axis] = len(idx)
                expansion[name] = [(name, relax.TensorType(shape, str(types[name].dtype)))]
                value = self.new_params.get(name)
                self.new_params[name] = (None if value is None
                                         else np.ascontiguousarray(np.take(np.asarray(value), idx, axis=axis)))
                if name in att.reduced:
                    reduced.append((name, tuple(int(i) for i in idx)))
            per_unit = att.heads // att.units
            self.pruned.append(PrunedHeads(att.layer, tuple(n for n, _, _ in att.weights), att.heads,
                                           len(keep) * per_unit, tuple(int(i) for i in keep), tuple(reduced)))
        new_layers = {}
        for i, gv, fn, args in _layer_calls(mod):
            if i not in kept_of:
                continue
            tracer = _HeadTracer(fn, self._ops, str(fn.attrs["cachefit.layer_name"]))
            tracer.run()
            units = len(kept_of[i])
            which = {p: a.name for p, a in zip(fn.params, args) if isinstance(a, relax.Var) and a.name in expansion}
            reshape, bcast, split = (tvm.ir.Op.get(n) for n in ("relax.reshape", "relax.broadcast_to", "relax.split"))

            def param_types(p, which=which):
                return expansion[which[p]] if p in which else None

            def rewrite(bb, b, replaced, remap, tracer=tracer, units=units):
                v = b.value
                if not isinstance(v, relax.Call):
                    return None
                if (v.op.same_as(reshape) or v.op.same_as(bcast)) and b.var in tracer.lay:
                    lay = tracer.lay[b.var]
                    shape = [int(d) for d in _dims(b.var.ty)]
                    shape[lay.axis] = lay.size(units)
                    x = remap(v.args[0])
                    return relax.op.reshape(x, shape) if v.op.same_as(reshape) else relax.op.broadcast_to(x, shape)
                if v.op.same_as(split) and v.args[0] in tracer.lay:
                    lay = tracer.lay[v.args[0]]
                    axis = int(v.attrs.axis) % len(_dims(v.args[0].ty))
                    if axis == lay.axis:
                        bounds = np.cumsum([units * inner for inner in lay.inners])[:-1]
                        return relax.op.split(remap(v.args[0]), [int(c) for c in bounds], axis)
                return None

            new_layers[gv] = rewrite_layer(fn, gv, param_types, rewrite)
        out = rebuild_layered(mod, new_layers, expansion)
        log.info("PruneWeights: heads of %d attention(s) pruned by %.0f%%", len(atts), 100 * self.heads)
        return out

    def _kept(self, pr: MlpPair) -> np.ndarray:
        values = [self.params.get(n) for n in pr.weights]
        if any(v is None for v in values):
            return np.arange(kept_units(self.ratio, pr.hidden))
        fc1 = [np.asarray(self.params[n]) if lay == "kn" else np.asarray(self.params[n]).T for n, lay in pr.fc1]
        name, lay = pr.fc2
        fc2 = np.asarray(self.params[name]) if lay == "kn" else np.asarray(self.params[name]).T
        return choose_units(fc1, fc2, self.ratio)


def prune_weights(mod: tvm.IRModule, params: Mapping | None, ratio: float,
                  layers: Iterable | None = None, heads: float = 0.0) -> tuple[tvm.IRModule, dict, list]:
    """Run :class:`PruneWeights`; returns ``(module, new params, what was pruned)``."""
    from . import run_pass

    p = PruneWeights(params, ratio=ratio, layers=layers, heads=heads)
    out = run_pass(p, mod)
    return out, p.new_params, list(p.pruned)
