"""Merge adjacent layers of a layered module into a given number of layers."""

from __future__ import annotations

import tvm
from tvm import relax

from ..errors import CachefitError
from ..partition import partition
from . import keeps_errors, layering


@tvm.transform.module_pass(opt_level=0, name="MergeLayers")
class MergeLayers:
    """Merge the layers of a layered module into ``count`` contiguous groups (``--layers N``).

    The groups balance the weight elements: the smallest possible largest group, computed by the
    partitioner (:func:`cachefit.partition.partition`, ``balanced`` with ``count`` devices, exact).
    Among the groupings with that optimum it takes ``tie_break="late"``: later groups hold as many
    layers as the optimum allows, every cut as early as any optimal grouping's (six equal layers
    into four: 1, 1, 2, 2 layers, as ``--layers N`` merged them before; see docs/partitioning.md,
    "Ties", for where it differs from the DP used before). A merged layer is named
    ``first..last`` after the layers it holds. ``groups`` (a list of (first, last) layer indices)
    fixes the grouping instead. Asking for more layers than there are is an error; asking for as
    many leaves the module unchanged.
    """

    def __init__(self, count: int | None = None, groups: list[tuple[int, int]] | None = None):
        if count is None and groups is None:
            raise CachefitError("MergeLayers needs a layer count or explicit groups")
        self.count = count
        self.groups = groups

    @keeps_errors
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:  # noqa: ARG002
        layers = layering.layer_functions(mod)
        n = len(layers)
        if self.groups is not None:
            groups = list(self.groups)
        else:
            if self.count < 1:
                raise CachefitError(f"--layers must be at least 1, got {self.count}")
            if self.count > n:
                raise CachefitError(f"--layers {self.count} asks for more layers than the model has ({n} found)")
            if self.count == n:
                return mod
            sizes = _weight_elems(mod, layers)
            groups = partition(sizes, sum(sizes), "balanced", devices=self.count, tie_break="late")
        flat = layering.flatten(mod)
        names = flat.layer_names
        # binding ranges per group
        segs = []
        for a, b in groups:
            ks = [k for k, l in enumerate(flat.layer_of) if a <= l <= b]
            if not ks:
                raise CachefitError(f"layers {a}..{b} hold no operations")
            segs.append((min(ks), max(ks)))
        seg_names = [names[a] if a == b else f"{names[a]}..{names[b]}" for a, b in groups]
        out = layering.outline(flat, segs, seg_names)
        return layering.copy_module_attrs(mod, out)


def _weight_elems(mod, layers) -> list[int]:
    """Weight elements each layer reads (its call's arguments that are main's weight parameters)."""
    main = mod["main"]
    weights = set(main.params[layering.num_input(main):])
    bindings, _ = layering.main_block(main)
    args = {}
    for b in bindings:
        if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.GlobalVar):
            args[b.value.op] = [a for a in b.value.args if isinstance(a, relax.Var) and a in weights]
    return [sum(_bytes(a.ty) for a in args.get(gv, [])) for gv, _ in layers]


def _bytes(ty) -> int:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return 0
    n = 1
    for d in ty.shape.values:
        n *= int(d)
    return n
