"""Group footprints: the bytes a contiguous group of layers needs on one device.

Two modes:

``exact`` (default): the weights of the group, a parameter shared by several of its layers
    counted once, + the *peak* (not the sum) of the layers' activation+buffer working sets
    + the group's incoming boundary tensors (``in_bytes`` of its first layer) + its outgoing
    boundary tensors (``out_bytes`` of its last layer).
``sum``: the seed's additive formula, the sum of ``LayerRecord.total_bytes`` over the group
    (shared parameters counted in every layer, boundary tensors not counted).

:func:`group_footprint` computes one group directly; :class:`FootprintCost` answers the
footprint of any group ``[a, b)`` in about O(1) after an O(n log n) set-up, which is what
the partitioners need. See docs/partitioning.md for why the partitioners stay exact although
the ``exact`` footprint is not additive (and not even monotone in the group's extent).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

from ..errors import PlanError
from .records import LayerRecord

FOOTPRINT_MODES = ("exact", "sum")


@dataclass(frozen=True)
class Footprint:
    """A group's footprint by component (bytes).

    In ``exact`` mode ``activation_bytes``/``buffer_bytes`` are those of the layer at the
    working-set peak; in ``sum`` mode they are sums over the group and the boundary tensors,
    reported for information, are not part of ``total_bytes``.
    """

    weight_bytes: int
    activation_bytes: int
    buffer_bytes: int
    in_bytes: int
    out_bytes: int
    total_bytes: int

    def to_dict(self) -> dict:
        return {
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "buffer_bytes": self.buffer_bytes,
            "in_bytes": self.in_bytes,
            "out_bytes": self.out_bytes,
            "total_bytes": self.total_bytes,
        }


def check_mode(mode: str) -> str:
    if mode not in FOOTPRINT_MODES:
        raise PlanError(f"unknown footprint mode {mode!r}: use one of {', '.join(FOOTPRINT_MODES)}")
    return mode


def _private_bytes(layer: LayerRecord) -> int:
    """Weight bytes of ``layer`` not itemised in ``params`` (all of them when ``params`` is empty)."""
    return max(0, layer.weight_bytes - sum(layer.params.values()))


def layer_weight_bytes(layer: LayerRecord) -> int:
    """The layer's own weights as the exact footprint counts them: itemised params + the rest."""
    return sum(layer.params.values()) + _private_bytes(layer)


def group_footprint(layers: Sequence[LayerRecord], mode: str = "exact") -> Footprint:
    """Footprint of ``layers`` (one contiguous group, in order) placed together on one device."""
    check_mode(mode)
    if not layers:
        raise PlanError("a group needs at least one layer")
    first, last = layers[0], layers[-1]
    if mode == "sum":
        w = sum(l.weight_bytes for l in layers)
        act = sum(l.activation_bytes for l in layers)
        buf = sum(l.buffer_bytes for l in layers)
        return Footprint(w, act, buf, first.in_bytes, last.out_bytes, w + act + buf)
    seen: dict[str, int] = {}
    private = 0
    for l in layers:
        private += _private_bytes(l)
        for name, nbytes in l.params.items():
            seen.setdefault(name, nbytes)
    w = private + sum(seen.values())
    peak = max(layers, key=lambda l: l.working_set_bytes)
    return Footprint(
        w,
        peak.activation_bytes,
        peak.buffer_bytes,
        first.in_bytes,
        last.out_bytes,
        w + peak.working_set_bytes + first.in_bytes + last.out_bytes,
    )


class GroupCost:
    """A group cost ``cost(a, b) = core(a, b) + x[a] + y[b - 1]`` over layers ``a .. b-1``.

    ``core`` must be monotone under inclusion (a group's core is at least that of any group
    inside it) and ``x``, ``y`` non-negative: the exact partition search relies on both.
    ``monotone`` says whether the whole cost is monotone under inclusion as well (established
    by a sufficient O(n) check); when it is, the fast greedy feasibility test is exact.
    """

    n: int
    x: Sequence
    y: Sequence
    monotone: bool

    def core(self, a: int, b: int):
        raise NotImplementedError

    def cost(self, a: int, b: int):
        return self.core(a, b) + self.x[a] + self.y[b - 1]

    def reach(self, a: int, end: int, bound) -> int:
        """Largest ``b`` in ``(a, end]`` with ``cost(a, b) <= bound``, or ``a`` if none.

        Valid when ``cost(a, .)`` is nondecreasing in ``b``, which holds whenever ``y`` does
        not decrease faster than the core grows; callers use it only when ``monotone``.
        Galloping search: O(log(b - a)) cost evaluations.
        """
        cost = self.cost
        if a >= end or cost(a, a + 1) > bound:
            return a
        lo, step = a + 1, 1
        hi = lo + step
        while hi <= end and cost(a, hi) <= bound:
            lo = hi
            step *= 2
            hi = lo + step
        hi = min(hi, end + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cost(a, mid) <= bound:
                lo = mid
            else:
                hi = mid
        return lo


class AdditiveCost(GroupCost):
    """Integer sizes that add up: ``cost(a, b) = sum(values[a:b])`` (the seed's model)."""

    def __init__(self, values: Sequence[int]):
        self.n = len(values)
        self.prefix = list(accumulate(values, initial=0))
        zeros = [0] * self.n
        self.x = zeros
        self.y = zeros
        self.monotone = True

    def core(self, a: int, b: int) -> int:
        return self.prefix[b] - self.prefix[a]

    def cost(self, a: int, b: int) -> int:
        return self.prefix[b] - self.prefix[a]

    def reach(self, a: int, end: int, bound) -> int:
        if a >= end:
            return a
        return bisect_right(self.prefix, self.prefix[a] + bound, a + 1, end + 1) - 1


class _RangeMax:
    """Static range maximum (sparse table): O(n log n) set-up, O(1) query on ``[i, j]``."""

    def __init__(self, values: Sequence[int]):
        n = len(values)
        try:
            import numpy as np

            arr = np.asarray(values, dtype=np.int64) if n else None
        except (ImportError, OverflowError):  # pragma: no cover - numpy is a dependency
            arr = None
        rows = [list(values)]
        width = 1
        while 2 * width <= n:
            if arr is not None:
                arr = np.maximum(arr[:-width], arr[width:])
                rows.append(arr.tolist())
            else:
                prev = rows[-1]
                rows.append([max(prev[i], prev[i + width]) for i in range(len(prev) - width)])
            width *= 2
        self.rows = rows

    def query(self, i: int, j: int) -> int:
        k = (j - i + 1).bit_length() - 1
        row = self.rows[k]
        return max(row[i], row[j - (1 << k) + 1])


class _RepeatSums:
    """Sum of ``bytes`` over repeat occurrences ``(prev, at, bytes)`` with ``prev >= i and at <= j``.

    A repeat occurrence is a layer ``at`` reading a parameter that layer ``prev < at`` (its
    previous reader) read too; a group ``[i, j]`` counts the parameter once, so those bytes are
    subtracted. Few repeats (tied embeddings): a linear scan; many: a merge-sort tree over
    ``prev`` order, O(log^2 R) per query.
    """

    LINEAR = 32

    def __init__(self, repeats: list[tuple[int, int, int]]):
        repeats.sort()
        self.count = len(repeats)
        self.prevs = [r[0] for r in repeats]
        self.repeats = repeats
        if self.count > self.LINEAR:
            size = 1
            while size < self.count:
                size *= 2
            self.size = size
            nodes: list[list[tuple[int, int]]] = [[] for _ in range(2 * size)]
            for k, (_, at, nbytes) in enumerate(repeats):
                nodes[size + k] = [(at, nbytes)]
            for k in range(size - 1, 0, -1):
                nodes[k] = sorted(nodes[2 * k] + nodes[2 * k + 1])
            self.keys = [[at for at, _ in node] for node in nodes]
            self.sums = [list(accumulate((nb for _, nb in node), initial=0)) for node in nodes]

    def query(self, i: int, j: int) -> int:
        if self.count == 0:
            return 0
        if self.count <= self.LINEAR:
            return sum(nb for prev, at, nb in self.repeats if prev >= i and at <= j)
        lo = bisect_right(self.prevs, i - 1) + self.size
        hi = self.count + self.size
        total = 0
        keys, sums = self.keys, self.sums
        while lo < hi:
            if lo & 1:
                total += sums[lo][bisect_right(keys[lo], j)]
                lo += 1
            if hi & 1:
                hi -= 1
                total += sums[hi][bisect_right(keys[hi], j)]
            lo //= 2
            hi //= 2
        return total


class FootprintCost(GroupCost):
    """Exact footprint of every group ``[a, b)`` of ``layers``, queried in O(1) (a few lookups).

    ``core(a, b)`` = unique weights + peak working set (monotone under inclusion),
    ``x[a]`` = ``in_bytes`` of layer ``a``, ``y[b-1]`` = ``out_bytes`` of layer ``b-1``.
    A parameter name recorded with different sizes in different layers is refused.
    """

    def __init__(self, layers: Sequence[LayerRecord]):
        n = self.n = len(layers)
        self.layers = layers
        self.x = [l.in_bytes for l in layers]
        self.y = [l.out_bytes for l in layers]
        ws = [l.working_set_bytes for l in layers]
        own = [layer_weight_bytes(l) for l in layers]
        self.prefix = list(accumulate(own, initial=0))
        sizes: dict[str, tuple[int, int]] = {}
        last_reader: dict[str, int] = {}
        repeats: list[tuple[int, int, int]] = []
        for i, l in enumerate(layers):
            for name, nbytes in l.params.items():
                if name in sizes and sizes[name][0] != nbytes:
                    other = layers[sizes[name][1]]
                    raise PlanError(
                        f"parameter {name!r} is recorded as {sizes[name][0]} bytes in layer {other.name!r} "
                        f"and {nbytes} bytes in layer {l.name!r}: a shared parameter must have one size "
                        "(regenerate the layer records)"
                    )
                sizes.setdefault(name, (nbytes, i))
                if name in last_reader:
                    repeats.append((last_reader[name], i, nbytes))
                last_reader[name] = i
        self._dup = _RepeatSums(repeats)
        self._max = _RangeMax(ws) if n else None
        self.monotone = self._check_monotone(layers, ws, own, sizes, repeats)

    def core(self, a: int, b: int) -> int:
        return self.prefix[b] - self.prefix[a] - self._dup.query(a, b - 1) + self._max.query(a, b - 1)

    def cost(self, a: int, b: int) -> int:
        return (
            self.prefix[b] - self.prefix[a] - self._dup.query(a, b - 1) + self._max.query(a, b - 1)
            + self.x[a] + self.y[b - 1]
        )

    def footprint(self, a: int, b: int) -> Footprint:
        return group_footprint(self.layers[a:b], "exact")

    def _check_monotone(self, layers, ws, own, sizes, repeats) -> bool:
        """A sufficient O(n) condition for ``cost`` to be monotone under inclusion.

        Extending ``[i, j]`` by layer ``j+1`` adds at least the weights of ``j+1`` that no
        earlier layer reads (``fresh``), at least ``max(0, ws[j+1] - max(ws[0..j]))`` to the
        peak, and changes the outgoing boundary from ``out[j]`` to ``out[j+1]``: the cost cannot
        fall if ``fresh + that + out[j+1] >= out[j]`` for every ``j``. Symmetrically on the left
        with the weights no later layer reads and ``in``.
        """
        n = len(layers)
        if n <= 1:
            return True
        fresh = list(own)
        fresh_left = list(own)
        for prev, at, nbytes in repeats:
            fresh[at] -= nbytes  # read earlier: not new when extending to the right
            fresh_left[prev] -= nbytes  # read later: not new when extending to the left
        prefmax = list(accumulate(ws, max))
        sufmax = list(accumulate(reversed(ws), max))[::-1]
        x, y = self.x, self.y
        for j in range(n - 1):
            gain = fresh[j + 1] + max(0, ws[j + 1] - prefmax[j])
            if gain + y[j + 1] < y[j]:
                return False
        for i in range(1, n):
            gain = fresh_left[i - 1] + max(0, ws[i - 1] - sufmax[i])
            if gain + x[i - 1] < x[i]:
                return False
        return True


def make_footprint_cost(layers: Sequence[LayerRecord], mode: str = "exact") -> GroupCost:
    """The group-cost oracle of ``layers`` in footprint ``mode`` (``exact`` or ``sum``)."""
    check_mode(mode)
    if mode == "sum":
        return AdditiveCost([l.total_bytes for l in layers])
    return FootprintCost(layers)
