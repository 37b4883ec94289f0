"""Structured pruning of MLP hidden units (whole columns / rows), shrinking shapes and FLOPs."""

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


def find_mlp_pairs(mod: tvm.IRModule, layers: Iterable | None = None) -> list[MlpPair]:
    """The prunable MLP pairs of a layered module (each expert of an MoE layer is one pair).

    A pair qualifies when its weights are read by that one layer only, every tensor between fc1
    and fc2 is computed element-wise with the hidden axis last, and none of them is used elsewhere.
    """
    if not layering.is_layered(mod):
        raise CachefitError("PruneWeights needs a layered module (run DiscoverLayers first)")
    ops = _Ops()
    main = mod["main"]
    weights = set(main.params[layering.num_input(main):])
    calls = _layer_calls(mod)
    chosen = _select(layers, calls)
    readers: dict = {}
    for i, _gv, _fn, args in calls:
        for a in args:
            if isinstance(a, relax.Var) and a in weights:
                readers.setdefault(a.name, set()).add(i)
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

    Attention heads are not pruned (their Q/K/V/O weights stay whole).

    Options:
        params: weight name -> array (None values for shape-only models: only shapes change; the
                units kept are then the first ones). ``new_params`` holds the new dict after the run.
        ratio:  fraction of each pair's hidden units to remove, in [0, 1).
        layers: layer indices or names to prune (None: every layer).
    ``pruned`` lists what was done (PrunedPair records).
    """

    def __init__(self, params: Mapping | None = None, ratio: float = 0.0, layers: Iterable | None = None):
        ratio = float(ratio)
        if not 0.0 <= ratio < 1.0:
            raise CachefitError(f"--prune {ratio} is not a fraction in [0, 1): e.g. 0.25 removes a quarter of "
                                "each MLP's hidden units")
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
            value = self.params.get(name)
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

    def _kept(self, pr: MlpPair) -> np.ndarray:
        values = [self.params.get(n) for n in pr.weights]
        if any(v is None for v in values):
            return np.arange(kept_units(self.ratio, pr.hidden))
        fc1 = [np.asarray(self.params[n]) if lay == "kn" else np.asarray(self.params[n]).T for n, lay in pr.fc1]
        name, lay = pr.fc2
        fc2 = np.asarray(self.params[name]) if lay == "kn" else np.asarray(self.params[name]).T
        return choose_units(fc1, fc2, self.ratio)


def prune_weights(mod: tvm.IRModule, params: Mapping | None, ratio: float,
                  layers: Iterable | None = None) -> tuple[tvm.IRModule, dict, list[PrunedPair]]:
    """Run :class:`PruneWeights`; returns ``(module, new params, what was pruned)``."""
    from . import run_pass

    p = PruneWeights(params, ratio=ratio, layers=layers)
    out = run_pass(p, mod)
    return out, p.new_params, list(p.pruned)
