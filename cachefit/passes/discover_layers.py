"""Split a flat ``main`` into layers at dataflow cut points, where few activations are live."""

from __future__ import annotations

import tvm
from tvm import relax

from . import keeps_errors, layering

_HEAVY_OPS = ("relax.matmul", "relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d", "relax.nn.conv2d_transpose",
              "relax.linear", "relax.nn.dense", "relax.take", "relax.einsum")


@tvm.transform.module_pass(opt_level=0, name="DiscoverLayers")
class DiscoverLayers:
    """Group the bindings of a flat ``main`` into an ordered list of layers (docs/layered-ir.md).

    A cut is a position in the binding order; the activations live across it are the values defined
    before it (model inputs included, weights excluded) and used after it. Cut points are the
    positions whose live-activation count is the smallest found anywhere inside the function (1 for a
    chain; a residual block keeps its input live until the add, so it never gets cut inside).
    Segments without a heavy operator (matmul, convolution, embedding lookup) are merged into the
    segment before them (the first into the one after), so a layer is a compute unit with its
    normalisation and activation rather than a lone ReLU.

    A module that is already layered is returned unchanged.

    Options:
        min_layers: below this many cut points found, the module is left flat in one layer.
    """

    def __init__(self, min_layers: int = 1):
        self.min_layers = min_layers
        self._heavy = [tvm.ir.Op.get(n) for n in _HEAVY_OPS if layering.op_exists(n)]

    @keeps_errors
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:  # noqa: ARG002
        if layering.is_layered(mod):
            return mod
        flat = layering.flatten(mod)
        segments = self.segments(flat)
        names = [f"cut.{i}" for i in range(len(segments))]
        out = layering.outline(flat, segments, names)
        return layering.copy_module_attrs(mod, out)

    # -- analysis, usable on its own -------------------------------------------------------------
    def live_counts(self, flat: layering.FlatMain) -> list[int]:
        """live[p] = number of activations defined at or before binding p and used after it."""
        weights = set(flat.params[flat.num_input:])
        n = len(flat.bindings)
        pos = {p: -1 for p in flat.params[: flat.num_input]}
        for k, b in enumerate(flat.bindings):
            pos[b.var] = k
        last = {}
        for k, b in enumerate(flat.bindings):
            for v in layering._used_vars(b.value):
                if v not in weights:
                    last[v] = k
        for v in layering._used_vars(flat.output):
            last[v] = n  # live to the end
        live = [0] * n
        for v, d in pos.items():
            e = last.get(v, d)
            for p in range(max(d, 0), min(e, n)):
                if p >= d:
                    live[p] += 1
        return live

    def is_heavy(self, value) -> bool:
        found = []

        def visit(e):
            if isinstance(e, relax.Call) and any(e.op.same_as(h) for h in self._heavy):
                found.append(e)

        relax.analysis.post_order_visit(value, visit)
        return bool(found)

    def segments(self, flat: layering.FlatMain) -> list[tuple[int, int]]:
        n = len(flat.bindings)
        if n == 0:
            return []
        live = self.live_counts(flat)
        inner = live[:-1]
        if not inner:
            return [(0, n - 1)]
        floor = min(inner)
        cuts = [p for p in range(n - 1) if live[p] == floor]
        bounds = [-1] + cuts + [n - 1]
        segs = [(bounds[i] + 1, bounds[i + 1]) for i in range(len(bounds) - 1)]
        heavy = [any(self.is_heavy(flat.bindings[k].value) for k in range(a, b + 1)) for a, b in segs]
        merged: list[tuple[int, int]] = []
        pending_start = None  # leading light segments wait for the first heavy one
        for (a, b), h in zip(segs, heavy):
            if h:
                start = pending_start if pending_start is not None else a
                pending_start = None
                merged.append((start, b))
            elif merged:
                merged[-1] = (merged[-1][0], b)
            else:
                pending_start = a if pending_start is None else pending_start
        if pending_start is not None:
            merged.append((pending_start, n - 1)) if not merged else None
        if len(merged) < self.min_layers:
            return [(0, n - 1)]
        return merged

