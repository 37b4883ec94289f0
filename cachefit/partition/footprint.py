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
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate, chain
from operator import methodcaller
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
    ``superadditive``: the cores of the groups of any partition of ``[a, b)`` add up to at
    least ``core(a, b)`` (sums, unique weights and peaks have this property); the bottleneck
    search then starts from ``core / groups``.
    """

    n: int
    x: Sequence
    y: Sequence
    monotone: bool
    superadditive: bool = False
    # Gates (optional, stage times with transfers overlapped): with ``gx``/``gy`` set the cost is
    # ``max(core(a, b) + x[a] + y[b - 1], gx[a], gy[b - 1])``, which is not of the form above.
    # The searches never test a gated cost directly: :meth:`at_bound` gives, for one bound, an
    # ungated cost of the form above that is within that bound exactly when this one is.
    gx: Sequence | None = None
    gy: Sequence | None = None

    def core(self, a: int, b: int):
        raise NotImplementedError

    def cost(self, a: int, b: int):
        return self.core(a, b) + self.x[a] + self.y[b - 1]

    @property
    def gated(self) -> bool:
        return self.gx is not None or self.gy is not None

    @property
    def plain_monotone(self) -> bool:
        """Whether ``core + x + y`` (the cost without its gates) is monotone under inclusion."""
        return self.monotone

    def at_bound(self, bound) -> "GroupCost":
        """A cost of the plain form that is within ``bound`` exactly where this one is: this
        cost itself when ungated, else :class:`GatedView`."""
        return GatedView(self, bound) if self.gated else self

    def next_gate(self, bound):
        """The smallest gate value above ``bound`` (INF if none): for every bound from ``bound``
        up to (not including) it, :meth:`at_bound` refuses the same group starts and ends."""
        gates = self.__dict__.get("_sorted_gates")
        if gates is None:
            gates = self._sorted_gates = sorted({*(self.gx or ()), *(self.gy or ())})
        i = bisect_right(gates, bound)
        return gates[i] if i < len(gates) else float("inf")

    def order_source(self) -> "GroupCost":
        """The cost whose :meth:`dominance_arrays` order this cost's ``x`` (a view: its base)."""
        return self

    def dominance_arrays(self) -> list:
        """Arrays that every bound's ``x`` respects: a cut ``a2`` at most ``a`` in each of them has
        ``x[a2] <= x[a]`` (also in every :meth:`at_bound` view). Used for dominance in the searches."""
        return [self.x] if self.gx is None else [self.x, self.gx]

    def mirrored(self) -> "GroupCost":
        """The same costs on the layers in reverse order: group ``[a, b)`` of the mirror is
        group ``[n - b, n - a)`` of this one (``x`` and ``y`` swap roles)."""
        return Mirrored(self)

    def layer_cores(self) -> Sequence:
        """``core(l, l + 1)`` for every layer: a group holding ``l`` has at least that core."""
        return [self.core(l, l + 1) for l in range(self.n)]

    def previous_smaller_x(self) -> list[int]:
        """``p[i]`` = the last ``j < i`` with ``x[j] < x[i]`` (-1 if none), computed once."""
        known = self.__dict__.get("_previous_smaller_x")
        if known is None:
            known, x = [-1] * self.n, self.x
            for i, v in enumerate(x):
                j = i - 1
                while j >= 0 and x[j] >= v:  # x[j+1 .. i-1] >= x[j] >= v: jump over them
                    j = known[j]
                known[i] = j
            self._previous_smaller_x = known
        return known

    def reach(self, a: int, end: int, bound, hint: int = 1) -> int:
        """Largest ``b`` in ``(a, end]`` with ``cost(a, b) <= bound``, or ``a`` if none.

        Valid when ``cost(a, .)`` is nondecreasing in ``b`` (callers use it only when
        ``monotone``). Exponential search outwards from ``a + hint`` (the caller's guess, e.g.
        the previous group's length), then bisection: O(log |b - (a + hint)|) cost queries.
        """
        cost = self.cost
        if a >= end:
            return a
        p = min(max(a + hint, a + 1), end)
        if cost(a, p) <= bound:
            lo, step = p, 1  # lo allowed
            hi = lo + 1
            while hi <= end and cost(a, hi) <= bound:
                lo = hi
                step *= 2
                hi = lo + step
            hi = min(hi, end + 1)  # hi refused (or past the end)
        else:
            hi, step = p, 1  # hi refused
            lo = hi - 1
            while lo > a and cost(a, lo) > bound:
                hi = lo
                step *= 2
                lo = hi - step
            lo = max(lo, a)  # lo allowed, or a (no allowed end found yet)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cost(a, mid) <= bound:
                lo = mid
            else:
                hi = mid
        return lo


class Mirrored(GroupCost):
    """``base`` with the layer order reversed (see :meth:`GroupCost.mirrored`)."""

    def __init__(self, base: GroupCost):
        self.base = base
        self.n = base.n
        self.x = list(reversed(base.y))
        self.y = list(reversed(base.x))
        self.gx = list(reversed(base.gy)) if base.gy is not None else None
        self.gy = list(reversed(base.gx)) if base.gx is not None else None
        self.monotone = base.monotone
        self.superadditive = base.superadditive

    @property
    def plain_monotone(self) -> bool:
        return self.base.plain_monotone

    def core(self, a: int, b: int):
        return self.base.core(self.n - b, self.n - a)

    def cost(self, a: int, b: int):
        return self.base.cost(self.n - b, self.n - a)

    def mirrored(self) -> GroupCost:
        return self.base

    def layer_cores(self) -> Sequence:
        return list(reversed(self.base.layer_cores()))

    def spill_time(self, layer: int):
        """Forwarded for stage-time oracles (:class:`~.cost.StageTime`)."""
        return self.base.spill_time(self.n - 1 - layer)


class GatedView(GroupCost):
    """A gated cost (:attr:`GroupCost.gx`, ``gy``) at one bound ``B``, in the plain form.

    ``max(core + x[a] + y[b-1], gx[a], gy[b-1]) <= B`` exactly when ``core + x'[a] + y'[b-1] <= B``
    with ``x'[a] = x[a]`` where ``gx[a] <= B`` and INF where not (a group may not start there),
    ``y'`` alike: a cost of the form the searches are exact for, the same ``core``, ``x' >= 0``,
    ``y' >= 0``. Valid for ``B`` only; ``base.next_gate(B)`` says how far above ``B`` it stays valid.
    """

    def __init__(self, base: GroupCost, bound):
        inf = float("inf")
        self.base = base
        self.bound = bound
        self.n = base.n
        self.x = base.x if base.gx is None else [v if g <= bound else inf for v, g in zip(base.x, base.gx)]
        self.y = base.y if base.gy is None else [v if g <= bound else inf for v, g in zip(base.y, base.gy)]
        # No gate refuses anything: the plain cost; else a refused start or end breaks monotonicity.
        self.monotone = base.plain_monotone and base.next_gate(bound) == inf
        self.superadditive = base.superadditive
        prefix = getattr(base, "prefix", None)
        if prefix is not None:
            self.prefix = prefix  # reach guesses only
        self.core = base.core

    def order_source(self) -> GroupCost:
        return self.base.order_source()


class AdditiveCost(GroupCost):
    """Integer sizes that add up: ``cost(a, b) = sum(values[a:b])`` (the seed's model)."""

    superadditive = True

    def __init__(self, values: Sequence[int]):
        self.values = values
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

    def mirrored(self) -> "AdditiveCost":
        return AdditiveCost(self.values[::-1])

    def layer_cores(self) -> Sequence:
        return self.values

    def reach(self, a: int, end: int, bound, hint: int = 1) -> int:
        if a >= end:
            return a
        return bisect_right(self.prefix, self.prefix[a] + bound, a + 1, end + 1) - 1


def _floor_log2_table(n: int) -> list[int]:
    """``t[m] = floor(log2(m))`` for ``1 <= m <= n`` (``t[0] = 0``)."""
    t = [0] * (n + 1)
    k = 1
    while (1 << k) <= n:
        lo, hi = 1 << k, min(1 << (k + 1), n + 1)
        t[lo:hi] = [k] * (hi - lo)
        k += 1
    return t


class _RangeMaxTable:
    """Sparse table for range maxima: ``rows[k][i] = max(values[i : i + 2**k])``, so the maximum
    over ``[i, j]`` is ``max(rows[k][i], rows[k][j - 2**k + 1])`` with ``k = floor(log2(j - i + 1))``.

    Rows are built on first use (``grow``): searches that only ask about short groups never pay
    for the long ones. Rows stop at ``2**LIMIT`` layers; :meth:`range_max` covers a longer range
    by blocks of the longest row built so far (a few such queries per search, each a slice).
    """

    LIMIT = 10

    def __init__(self, values: Sequence[int]):
        import numpy as np

        self._np = np
        self.rows = [list(values)]
        big = bool(values) and max(values) > 2**62
        self._arr = np.asarray(values, dtype=object if big else np.int64)

    def grow(self, k: int) -> None:
        np = self._np
        while len(self.rows) <= k:
            width = 1 << (len(self.rows) - 1)
            self._arr = np.maximum(self._arr[:-width], self._arr[width:])
            self.rows.append(self._arr.tolist())

    def range_max(self, a: int, b: int):
        """``max(values[a:b])`` (``a < b``)."""
        k = (b - a).bit_length() - 1
        if k <= self.LIMIT:
            self.grow(k)
            row = self.rows[k]
            return max(row[a], row[b - (1 << k)])
        row, w = self.rows[-1], 1 << (len(self.rows) - 1)  # the longest row built so far
        return max(max(row[a:b - w + 1:w]), row[b - w])


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
        if self.count > self.LINEAR:  # the tree: queries leaving more than LINEAR repeats use it
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
        k = bisect_right(self.prevs, i - 1)  # first repeat with prev >= i
        if self.count - k <= self.LINEAR:
            total = 0
            for _, at, nbytes in self.repeats[k:]:
                if at <= j:
                    total += nbytes
            return total
        lo = k + self.size
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
    ``core`` is superadditive: a partition's groups hold every unique weight at least once
    and each has a peak of its own.
    """

    superadditive = True

    def __init__(self, layers: Sequence[LayerRecord]):
        n = self.n = len(layers)
        self.layers = layers
        x = [l.in_bytes for l in layers]
        y = [l.out_bytes for l in layers]
        ws = [l.activation_bytes + l.buffer_bytes for l in layers]
        weights = [l.weight_bytes for l in layers]
        plist = [l.params for l in layers]
        # params + the unitemised rest of weight_bytes (none when the params add up to more)
        own = list(map(max, weights, map(sum, map(methodcaller("values"), plist))))
        repeats: list[tuple[int, int, int]] = []
        names = list(chain.from_iterable(plist))
        if len(names) != len(set(names)):  # some parameters are read by several layers
            shared = {name for name, count in Counter(names).items() if count > 1}
            seen: dict[str, tuple[int, int]] = {}  # parameter -> (bytes, last layer reading it)
            for i, params in enumerate(plist):
                if not params or shared.isdisjoint(params):
                    continue
                for name in shared.intersection(params):
                    nbytes = params[name]
                    known = seen.get(name)
                    if known is not None:
                        if known[0] != nbytes:
                            first = layers[known[1]]
                            raise PlanError(
                                f"parameter {name!r} is recorded as {known[0]} bytes in layer "
                                f"{first.name!r} and {nbytes} bytes in layer {layers[i].name!r}: a shared "
                                "parameter must have one size (regenerate the layer records)"
                            )
                        repeats.append((known[1], i, nbytes))
                    seen[name] = (nbytes, i)
        if n and min(min(x), min(y), min(ws), min(weights), min(own)) < 0:
            bad = next(l for l in layers if min(l.in_bytes, l.out_bytes, l.activation_bytes, l.buffer_bytes,
                                                 l.weight_bytes, *l.params.values()) < 0)
            raise PlanError(f"layer {bad.name!r} has a negative byte count: every size must be >= 0")
        self.x, self.y = x, y
        self._layer_cores = [o + w for o, w in zip(own, ws)]  # a layer alone holds no repeat
        self.prefix = list(accumulate(own, initial=0))
        self.monotone = self._check_monotone(ws, own, repeats)
        self._dup = _RepeatSums(repeats)
        self._has_dup = bool(repeats)
        # A group [a, b) holds a repeat only if a <= its previous reader and b-1 >= its reader.
        self._dup_prev = max((r[0] for r in repeats), default=-1)
        self._dup_at = min((r[1] for r in repeats), default=n)
        self._table = _RangeMaxTable(ws)
        self._rows = self._table.rows
        self._log = _floor_log2_table(n)

    def layer_cores(self) -> Sequence:
        return self._layer_cores

    def _core_long(self, a: int, b: int) -> int:
        """``core`` through :meth:`_RangeMaxTable.range_max` (rows not built yet, long groups)."""
        c = self.prefix[b] - self.prefix[a] + self._table.range_max(a, b)
        if self._has_dup and a <= self._dup_prev and b > self._dup_at:
            c -= self._dup.query(a, b - 1)
        return c

    # core() and cost() are the partitioners' inner loop: the range maximum is inlined.
    def core(self, a: int, b: int) -> int:
        k = self._log[b - a]
        if k >= len(self._rows):
            return self._core_long(a, b)
        row = self._rows[k]
        m, m2 = row[a], row[b - (1 << k)]
        c = self.prefix[b] - self.prefix[a] + (m if m >= m2 else m2)
        if self._has_dup and a <= self._dup_prev and b > self._dup_at:
            c -= self._dup.query(a, b - 1)
        return c

    def cost(self, a: int, b: int) -> int:
        k = self._log[b - a]
        if k >= len(self._rows):
            return self._core_long(a, b) + self.x[a] + self.y[b - 1]
        row = self._rows[k]
        m, m2 = row[a], row[b - (1 << k)]
        c = self.prefix[b] - self.prefix[a] + (m if m >= m2 else m2) + self.x[a] + self.y[b - 1]
        if self._has_dup and a <= self._dup_prev and b > self._dup_at:
            c -= self._dup.query(a, b - 1)
        return c

    def _check_monotone(self, ws, own, repeats) -> bool:
        """A sufficient O(n) condition for ``cost`` to be monotone under inclusion.

        Extending ``[i, j]`` by layer ``j+1`` adds at least the weights of ``j+1`` that no
        earlier layer reads (``fresh``), at least ``max(0, ws[j+1] - max(ws[0..j]))`` to the
        peak, and changes the outgoing boundary from ``out[j]`` to ``out[j+1]``: the cost cannot
        fall if ``fresh + that + out[j+1] >= out[j]`` for every ``j``. Symmetrically on the left
        with the weights no later layer reads and ``in``.
        """
        if len(ws) <= 1:
            return True
        return self._check_monotone_np(ws, own, repeats)

    def _check_monotone_py(self, ws, own, repeats) -> bool:
        """:meth:`_check_monotone` on Python integers (any size)."""
        n = len(ws)
        fresh = list(own)
        fresh_left = list(own)
        for prev, at, nbytes in repeats:
            fresh[at] -= nbytes  # read earlier: not new when extending to the right
            fresh_left[prev] -= nbytes  # read later: not new when extending to the left
        prefmax = list(accumulate(ws, max))
        sufmax = list(accumulate(reversed(ws), max))[::-1]
        x, y = self.x, self.y
        for j in range(n - 1):  # right extension by layer j + 1
            rise = ws[j + 1] - prefmax[j]
            if fresh[j + 1] + (rise if rise > 0 else 0) + y[j + 1] < y[j]:
                return False
        for i in range(1, n):  # left extension by layer i - 1
            rise = ws[i - 1] - sufmax[i]
            if fresh_left[i - 1] + (rise if rise > 0 else 0) + x[i - 1] < x[i]:
                return False
        return True

    def _check_monotone_np(self, ws, own, repeats) -> bool:
        """:meth:`_check_monotone` on int64 arrays; on Python integers (:meth:`_check_monotone_py`)
        when a size reaches 2**60 (sums of four terms must stay exact)."""
        import numpy as np

        try:
            ws, fresh, x, y = (np.array(v, dtype=np.int64) for v in (ws, own, self.x, self.y))
        except OverflowError:
            return self._check_monotone_py(ws, own, repeats)
        if max(ws.max(), fresh.max(), x.max(), y.max()) >= 2**60:
            return self._check_monotone_py(ws.tolist(), own, repeats)
        fresh_left = fresh.copy()
        if repeats:
            prev, at, nbytes = (np.asarray(v, dtype=np.int64) for v in zip(*repeats))
            np.subtract.at(fresh, at, nbytes)
            np.subtract.at(fresh_left, prev, nbytes)
        prefmax = np.maximum.accumulate(ws)
        sufmax = np.maximum.accumulate(ws[::-1])[::-1]
        right = fresh[1:] + np.maximum(ws[1:] - prefmax[:-1], 0) + y[1:] >= y[:-1]
        left = fresh_left[:-1] + np.maximum(ws[:-1] - sufmax[1:], 0) + x[:-1] >= x[1:]
        return bool(right.all() and left.all())


def make_footprint_cost(layers: Sequence[LayerRecord], mode: str = "exact") -> GroupCost:
    """The group-cost oracle of ``layers`` in footprint ``mode`` (``exact`` or ``sum``)."""
    check_mode(mode)
    if mode == "sum":
        return AdditiveCost([l.total_bytes for l in layers])
    return FootprintCost(layers)
