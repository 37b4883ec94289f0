"""The exact partition searches, on group-cost oracles (:class:`~.footprint.GroupCost`).

Layers ``0 .. n-1`` are cut into contiguous groups ``[a, b)`` (half-open, cut positions).
Some layers may be *forced singletons* (an oversized layer placed alone on a spilling
device); they split the sequence into independent *segments* of ordinary layers.

A *bound* is a pair ``(cost, limit)``: a group is allowed when ``cost.cost(a, b) <= limit``
for every bound. Everything here is exact for costs of the form ``core(a, b) + x[a] + y[b-1]``
with ``core`` monotone under inclusion and ``x, y >= 0`` (see docs/partitioning.md):

- when every cost is monotone under inclusion, the farthest-reach greedy is optimal for the
  fewest groups and runs in O(groups * log(group length)) cost queries;
- otherwise, with one bound, the level-by-level frontier search (``_frontier_fewest``):
  O(groups * (frontier size * log(group length))) cost queries in the usual case; it hands
  a case to the dynamic programme only when a work budget is spent;
- with several bounds (``min-time`` on a non-monotone footprint: stage time and capacity), the
  same search over every bound at once (``_frontier_fewest_multi``), when one order of the cuts
  serves every bound's ``x`` for dominance (``_shared_order``);
- otherwise (or with ``force_dp``), an exact dynamic programme over cut positions with
  dominance pruning (``_dp_fewest``): O(n * window) in the worst case, about O(n) in practice.

A *gated* cost (stage times with transfers overlapped, ``max(core, transfer)``) is outside that
form; :func:`min_bottleneck` tests it at each bound through a plain view
(:class:`~.footprint.GatedView`) that refuses the groups starting where the gate exceeds the bound.

The bottleneck search (``min_bottleneck``) bisects over the bound of one cost with the
fewest-groups test, after a count-guided first bracket, tightening the upper end to the
bottleneck actually reached and leaping the lower end, after a failure, to the smallest cost
that would change one of the test's decisions. ``spread`` then uses as many of the given
devices as the optimum allows. ``reference_balanced`` is the O(n^2 k) dynamic programme kept
as the reference (and for costs outside the form above).
"""

from __future__ import annotations

import heapq
import struct
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from .footprint import GroupCost

INF = float("inf")

Bound = tuple  # (GroupCost, limit)


@dataclass
class Segment:
    """Ordinary layers ``start .. end-1`` between forced singletons."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def segments_between(n: int, singletons: Sequence[int]) -> list[Segment]:
    """The non-empty runs of layers of ``0..n-1`` that are not in ``singletons``."""
    out, start = [], 0
    for s in sorted(singletons):
        if s > start:
            out.append(Segment(start, s))
        start = s + 1
    if start < n:
        out.append(Segment(start, n))
    return out


@dataclass
class Fewest:
    """Result of a fewest-groups test: ``groups`` (None when impossible or over ``limit``).

    ``leap`` (when a ``varied`` cost was named and the test failed): no bound of the varied
    cost below ``leap`` can succeed either, because every allowed/refused decision the test
    made stays the same for such bounds (INF: no larger bound changes any of them).
    """

    groups: list | None
    count: int
    leap: object = None


def _all_monotone(bounds: Sequence[Bound]) -> bool:
    return all(c.monotone for c, _ in bounds)


def fewest_groups(
    bounds: Sequence[Bound],
    segments: Sequence[Segment],
    limit: int | None = None,
    varied: GroupCost | None = None,
    force_dp: bool = False,
) -> Fewest:
    """Fewest groups covering every segment, each group within every bound.

    ``limit``: stop early (``groups=None``) once more than ``limit`` groups are needed.
    ``varied``: the cost whose bound a caller is searching over (for ``leap``).
    """
    if not force_dp and _all_monotone(bounds):
        return _greedy_fewest(bounds, segments, limit, varied)
    groups: list = []
    leap = INF
    order = None
    if len(bounds) > 1 and not force_dp:
        order = _shared_order(bounds)
    for seg in segments:
        part = None
        if not force_dp and (len(bounds) == 1 or order is not None):
            try:
                left = None if limit is None else limit - len(groups)
                if len(bounds) == 1:
                    part, _, seg_leap = _frontier_fewest(bounds[0], seg.start, seg.end, left, varied)
                else:
                    part, _, seg_leap = _frontier_fewest_multi(bounds, seg.start, seg.end, left, varied, order)
            except _GiveUp:
                part = None
            else:
                leap = min(leap, seg_leap)
                if part is None:
                    return Fewest(None, len(groups), leap)
        if part is None:
            part, seg_leap = _dp_fewest(bounds, seg.start, seg.end, varied)
        leap = min(leap, seg_leap)
        if part is None:
            return Fewest(None, len(groups), leap)
        groups.extend(part)
        if limit is not None and len(groups) > limit:
            return Fewest(None, len(groups), leap)
    return Fewest(groups, len(groups))


def _greedy_fewest(bounds, segments, limit, varied) -> Fewest:
    """Farthest-reach greedy: optimal when every cost is monotone under inclusion.

    The leap: with the same groups before it, a larger bound of the varied cost changes a group
    only if it lets it take one more layer, so the whole trace is identical for every bound
    below the smallest ``varied.cost(pos, r + 1)`` over the groups whose growth the varied bound
    (and not a fixed one) stopped.
    """
    groups: list = []
    leap = INF
    single = len(bounds) == 1
    fixed = [(c, lim) for c, lim in bounds if c is not varied]
    hint = 1
    for seg in segments:
        pos, end = seg.start, seg.end
        while pos < end:
            if single:
                c, lim = bounds[0]
                r = c.reach(pos, end, lim, hint)
            else:
                r = min(c.reach(pos, end, lim, hint) for c, lim in bounds)
            if varied is not None and r < end:
                if all(c.cost(pos, r + 1) <= lim for c, lim in fixed):
                    v = varied.cost(pos, r + 1)
                    if v < leap:
                        leap = v
            if r == pos:
                return Fewest(None, len(groups), leap)
            groups.append((pos, r))
            hint = r - pos
            pos = r
            if limit is not None and len(groups) > limit:
                return Fewest(None, len(groups), leap)
    return Fewest(groups, len(groups))


def _dp_fewest(bounds: Sequence[Bound], start: int, end: int, varied: GroupCost | None = None):
    """Exact fewest groups covering layers ``start .. end-1`` (any costs of the GroupCost form).

    Returns ``(groups or None, leap)``. ``f[b]`` = fewest groups covering ``start .. b-1``;
    ``f[b] = 1 + min f[a]`` over cuts ``a`` with ``[a, b)`` allowed. Two facts keep the
    candidate set small:
    - a cut ``a`` whose core already exceeds a bound for ``[a, b)`` exceeds it for every later
      ``b`` (core monotone, x, y >= 0): a pointer ``lo`` drops such cuts for good;
    - a later cut ``a2 > a`` with ``f[a2] <= f[a]`` and ``x[a2] <= x[a]`` for every cost is at
      least as good as ``a`` for every future group end (its core is smaller): ``a`` is dropped.
    ``leap`` is the smallest value of the varied cost among the comparisons it failed (pointer
    moves and refused groups) whose fixed bounds held: below it, every comparison comes out
    the same, and so does the result.
    """
    if len(bounds) == 1:
        return _dp_fewest_single(bounds[0], start, end, varied)
    n = end - start
    f = [INF] * (n + 1)
    parent = [-1] * (n + 1)
    f[0] = 0
    cand: deque[int] = deque()
    xs = [c.x for c, _ in bounds]
    cores = [c.core for c, _ in bounds]
    costs = [c.cost for c, _ in bounds]
    lims = [lim for _, lim in bounds]
    vi = next((i for i, (c, _) in enumerate(bounds) if c is varied), -1)
    nb = len(bounds)

    def failed(values):
        """Value of the varied cost in a failed comparison; INF if a fixed bound failed too."""
        for i in range(nb):
            if i != vi and values[i] > lims[i]:
                return INF
        return values[vi] if vi >= 0 else INF

    leap = INF
    lo = start
    for b in range(start + 1, end + 1):
        a_new = b - 1
        fa = f[a_new - start]
        if fa < INF:
            while cand:
                back = cand[-1]
                if f[back - start] >= fa and all(x[a_new] <= x[back] for x in xs):
                    cand.pop()
                else:
                    break
            cand.append(a_new)
        while lo < b:
            values = [core(lo, b) for core in cores]
            if all(values[i] <= lims[i] for i in range(nb)):
                break
            leap = min(leap, failed(values))
            lo += 1
        while cand and cand[0] < lo:
            cand.popleft()
        best, arg = INF, -1
        for a in cand:
            fa = f[a - start]
            if fa + 1 < best:
                values = [cost(a, b) for cost in costs]
                if all(values[i] <= lims[i] for i in range(nb)):
                    best, arg = fa + 1, a
                else:
                    leap = min(leap, failed(values))
        f[b - start] = best
        parent[b - start] = arg
    if f[n] == INF:
        return None, leap
    return _backtrack(parent, start, end), leap


def _dp_fewest_single(bound: Bound, start: int, end: int, varied: GroupCost | None):
    """``_dp_fewest`` for one bound (the common case), with the comparisons written out."""
    c, lim = bound
    core, cost, x = c.core, c.cost, c.x
    track = varied is c
    n = end - start
    f = [INF] * (n + 1)
    parent = [-1] * (n + 1)
    f[0] = 0
    cand: deque[int] = deque()
    leap = INF
    lo = start
    for b in range(start + 1, end + 1):
        a_new = b - 1
        fa = f[a_new - start]
        if fa < INF:
            xa = x[a_new]
            while cand and f[cand[-1] - start] >= fa and xa <= x[cand[-1]]:
                cand.pop()
            cand.append(a_new)
        while lo < b:
            v = core(lo, b)
            if v <= lim:
                break
            if track and v < leap:
                leap = v
            lo += 1
        while cand and cand[0] < lo:
            cand.popleft()
        best, arg = INF, -1
        for a in cand:
            fa = f[a - start] + 1
            if fa < best:
                v = cost(a, b)
                if v <= lim:
                    best, arg = fa, a
                elif track and v < leap:
                    leap = v
        f[b - start] = best
        parent[b - start] = arg
    if f[n] == INF:
        return None, leap
    return _backtrack(parent, start, end), leap


class _GiveUp(Exception):
    """The frontier search met a case it leaves to the dynamic programme (see ``_frontier_fewest``)."""


def _hole(p: int, t: int, depth: int, lam: int, a: int, key, smaller, member, fits, yes, no, parent) -> bool:
    """Whether ``f[p] <= t`` for a *hole* ``p`` of a frontier search (:func:`_frontier_fewest`,
    :func:`_frontier_fewest_multi`): some undominated cut of ``S_{t-1}`` in ``[lam, a]`` that
    ``member(cut, t - 1, depth + 1)`` admits has ``fits(cut, p)``; records the answer in
    ``yes`` / ``parent`` or ``no``.

    Scans down from ``a`` over the suffix minima of ``key`` (the dominance order; ``smaller`` its
    previous-smaller table) among the members: a later member no larger in ``key`` dominates.
    """
    m = INF
    while a >= lam:
        ka = key[a]
        if ka >= m:
            a = smaller[a]  # every cut after smaller[a] and before a has key >= key[a] >= m
            continue
        if member(a, t - 1, depth + 1):
            if fits(a, p):
                yes[p], parent[p] = yes[a] + 1, a
                return True
            m = ka
        a -= 1
    no[p] = t
    return False


def _frontier_fewest(bound: Bound, start: int, end: int, limit: int | None, varied: GroupCost | None):
    """Exact fewest groups covering layers ``start .. end-1`` for one bound, level by level.

    Returns ``(groups or None, count, leap)``; ``groups`` is None when more than ``limit``
    groups are needed or none exist. Raises :class:`_GiveUp` where it would stop being cheap
    (no progress from one level to the next, or a work budget spent): the caller then runs
    the dynamic programme, which is exact everywhere.

    ``f[p]`` = fewest groups covering ``start .. p-1``; ``S_t`` = the cuts with ``f <= t``;
    ``g[t] = max S_t``. A cut ``a`` is *dominated* in ``S_t`` by a later ``a2`` in ``S_t``
    with ``x[a2] <= x[a]``: for every group end ``b > a2``, ``cost(a2, b) <= cost(a, b)``
    (its core is inside ``a``'s, the same ``y``). Hence:

    - the cuts beyond ``g[t]`` with ``f = t + 1`` are exactly those within the bound from
      some cut of the *frontier* ``F[t]``: the undominated cuts of ``S_t`` (the suffix minima
      of ``x``, scanning down from ``g[t]``) whose core to ``g[t] + 1`` is within the bound;
      ``g[t + 1]`` is the farthest of them, found from each frontier cut by the core's reach
      and a short scan down;
    - membership ``f[p] <= t`` of a cut is decided from ``F[s - 1]`` where ``s`` is the level
      with ``g[s - 1] < p <= g[s]`` (``f[p] >= s``); a cut that ``F[s - 1]`` does not reach (a
      *hole*: its own group would be over the bound) is decided by scanning the undominated
      cuts of ``S_{t-1}`` below it, recursively, with memoised answers.

    The frontier holds few cuts (the suffix minima of ``x``), so a level costs O(|F| log L)
    cost queries plus a scan of ``x`` over one group length ``L`` in plain comparisons, instead
    of the programme's few cost queries per layer. ``leap`` is the smallest value compared
    above the bound (the same argument as for the programme: below it every comparison, hence
    the whole run, comes out the same).
    """
    c, bnd = bound
    core, cost, x, y = c.core, c.cost, c.x, c.y
    pre = getattr(c, "prefix", None)  # prefix sums close to the core: reach guesses only
    smaller = c.previous_smaller_x()
    track = varied is c
    leap = INF
    g = [start]
    frontier = [[start]]
    yes = {start: 0}  # cut -> a number of groups reaching it (f[p] <= yes[p])
    no: dict[int, int] = {}  # cut -> the largest t with f[p] > t proven
    parent: dict[int, int] = {}
    budget = 16 * (end - start) + 4096

    def farthest(o: int, right: bool, add, length: int, guess: int) -> int:
        """Largest ``i`` in ``[0, length]`` with ``core(o, o + i) + add`` (``right``) or
        ``core(o - i, o) + add`` within the bound (``i = 0``: none). Both grow with ``i``:
        exponential search from ``guess``, then bisection; refused values feed the leap."""
        nonlocal leap
        i = min(max(guess, 1), length)
        v = (core(o, o + i) if right else core(o - i, o)) + add
        if v <= bnd:  # search outwards
            ok, step = i, 1
            while ok < length:
                i = min(ok + step, length)
                v = (core(o, o + i) if right else core(o - i, o)) + add
                if v > bnd:
                    break
                ok, step = i, step * 2
            else:
                return ok
            bad = i
        else:  # search inwards
            bad, ok, step = i, 0, 1
            while bad > 1:
                i = max(bad - step, 1)
                v2 = (core(o, o + i) if right else core(o - i, o)) + add
                if v2 <= bnd:
                    ok = i
                    break
                if track and v2 < leap:
                    leap = v2
                bad, step = i, step * 2
        if track and v < leap:
            leap = v
        while bad - ok > 1:  # ok allowed (or 0), bad refused
            mid = (ok + bad) // 2
            v = (core(o, o + mid) if right else core(o - mid, o)) + add
            if v <= bnd:
                ok = mid
            else:
                if track and v < leap:
                    leap = v
                bad = mid
        return ok

    def left_reach(p: int, hint: int) -> int:
        """Smallest ``a >= start`` with ``core(a, p)`` within the bound (``p`` if none)."""
        return p - farthest(p, False, 0, p - start, hint)

    def right_reach(a: int, hint: int) -> int:
        """Largest ``b <= end`` with ``core(a, b) + x[a]`` within the bound (``a`` if none)."""
        return a + farthest(a, True, x[a], end - a, hint)

    def member(p: int, t: int, depth: int) -> bool:
        """Whether ``f[p] <= t`` (``t`` at most the current level)."""
        nonlocal leap, budget
        known = yes.get(p)
        if known is not None and known <= t:
            return True
        refused = no.get(p, -1)
        if refused >= t:
            return False
        s = bisect_left(g, p)  # g[s-1] < p <= g[s]: f[p] >= s
        if s > t:
            return False
        if refused < s:
            for a in frontier[s - 1]:  # the cut that reached g[s] comes first
                v = cost(a, p)
                if v <= bnd:
                    yes[p], parent[p] = s, a
                    return True
                if track and v < leap:
                    leap = v
            no[p] = refused = s
        if s == t:
            return False
        # A hole of level s: any undominated cut of S_{t-1} below p may start its group.
        if depth > 64 or budget <= 0:
            raise _GiveUp
        lam = left_reach(p, win)
        a = min(p - 1, g[t - 1])
        budget -= a - lam + 1
        return _hole(p, t, depth, lam, a, x, smaller, member, fits, yes, no, parent)

    def fits(a: int, p: int) -> bool:
        """Whether group ``[a, p)`` is within the bound (a refusal feeds the leap)."""
        nonlocal leap
        v = cost(a, p)
        if v <= bnd:
            return True
        if track and v < leap:
            leap = v
        return False

    t = 0
    hint = win = 1  # the last group's length and the last frontier scan's window: search hints
    while True:
        if limit is not None and t >= limit:
            return None, t + 1, leap
        gp = g[t]
        best, arg = gp, -1
        for a in frontier[t]:
            if best > gp and best < end:  # can a's group end after the best end so far?
                v = core(a, best + 1) + x[a]
                if v > bnd:
                    if track and v < leap:
                        leap = v
                    continue
            if pre is not None:  # the additive part's reach: a close guess
                p = right_reach(a, bisect_right(pre, pre[a] + bnd - x[a], a + 1, end + 1) - 1 - a)
            else:
                p = right_reach(a, gp - a + hint)
            while p > best:
                v = cost(a, p)
                if v <= bnd:
                    best, arg, reached = p, a, v
                    break
                if track and v < leap:
                    leap = v
                p -= 1
                budget -= 1
        if budget <= 0:
            raise _GiveUp
        t += 1
        g.append(best)
        if best > gp:
            prev = frontier[t - 1]
            if prev[0] != arg:  # membership tests (below) try the cut that reached farthest first
                prev.remove(arg)
                prev.insert(0, arg)
            hint = best - gp
            yes[best], parent[best] = t, arg
            if best == end:
                break
        # else: no cut beyond g[t-1] has f = t; holes below it may still join S_t (the scan
        # below finds them) and move the next level on; the limit or the budget ends it if not.
        if pre is not None:
            lam = left_reach(best + 1, best + 1 - bisect_left(pre, pre[best + 1] - bnd, start, best + 1))
        else:
            lam = left_reach(best + 1, win)
        win = best + 1 - lam
        budget -= win
        level, m = [], INF
        sources = frontier[t - 1]
        # cost(arg, p) <= core(arg, best) + x[arg] + y[p-1] for p <= best: a test without a query
        base = reached - y[best - 1] if best > gp else 0
        p = best
        while p >= lam:  # the suffix minima of x among the members, down to lam
            xp = x[p]
            if xp >= m:
                p = smaller[p]  # every cut after smaller[p] and before p has x >= x[p] >= m
                continue
            if p > gp:  # f[p] >= t: member() for this level, inlined (the common case)
                # (Not a leap candidate: when it fails, the query of arg below fails lower.)
                if base + y[p - 1] <= bnd:
                    yes[p], parent[p] = t, arg
                    level.append(p)
                    m = xp
                    p -= 1
                    continue
                for a in sources:
                    v = cost(a, p)
                    if v <= bnd:
                        yes[p], parent[p] = t, a
                        level.append(p)
                        m = xp
                        break
                    if track and v < leap:
                        leap = v
                else:
                    no[p] = t
            elif member(p, t, 0):
                level.append(p)
                m = xp
            p -= 1
        if not level:  # no group can start at or before g[t] and end after it
            return None, t, leap
        frontier.append(level)
    out, b = [], end
    while b != start:
        a = parent[b]
        out.append((a, b))
        b = a
    out.reverse()
    return out, t, leap


def _shared_order(bounds: Sequence[Bound]):
    """``(key, smaller)``: one order of the cuts that every bound's ``x`` respects, or None.

    ``key[a2] <= key[a]`` implies ``x[a2] <= x[a]`` for every bound (and every :meth:`at_bound`
    view of it), so a later cut with a key no larger dominates for all bounds at once; ``smaller``
    is the previous-smaller table of ``key`` (see :meth:`GroupCost.previous_smaller_x`). The key is
    the rank of each cut in the lexicographic order of the bounds' :meth:`dominance_arrays`; it
    exists when every array is nondecreasing along that order (``min-time``: the footprint's
    ``in_bytes`` and the stage time's ``transfer_time(in_bytes)``, when that time grows with the
    bytes). Computed once per set of bound sources and kept on the first.
    """
    sources = [c.order_source() for c, _ in bounds]
    cache = sources[0].__dict__.setdefault("_shared_orders", {})
    ident = tuple(id(s) for s in sources)
    hit = cache.get(ident)
    if hit is not None and all(a is b for a, b in zip(hit[0], sources)):
        return hit[1]
    n = sources[0].n
    arrays = []
    for src in sources:
        for arr in src.dominance_arrays():
            if arr is not None and any(v != arr[0] for v in arr):  # constant arrays order nothing
                arrays.append(arr)
    if not arrays:
        key = [0] * n
    elif len(arrays) == 1:
        key = list(arrays[0])
    else:
        key = _lex_rank(arrays, n)
    result = None
    if key is not None:
        smaller = [-1] * n
        for i, v in enumerate(key):
            j = i - 1
            while j >= 0 and key[j] >= v:
                j = smaller[j]
            smaller[i] = j
        result = (key, smaller)
    cache[ident] = (sources, result)
    return result


def _lex_rank(arrays: list, n: int):
    """Dense rank of each index in the lexicographic order of ``arrays``, or None if some array
    is not nondecreasing along that order (then no single order serves them all)."""
    import numpy as np

    try:
        cols = [np.asarray(arr) for arr in arrays]
    except OverflowError:
        cols = []
    if any(c.dtype.kind not in "iuf" for c in cols) or not cols:  # huge integers: plain Python
        order = sorted(range(n), key=lambda i: tuple(arr[i] for arr in arrays))
        for arr in arrays:
            if any(arr[i] > arr[j] for i, j in zip(order, order[1:])):
                return None
        key, rank, last = [0] * n, 0, None
        for i in order:
            t = tuple(arr[i] for arr in arrays)
            if last is not None and t != last:
                rank += 1
            key[i], last = rank, t
        return key
    order = np.lexsort(cols[::-1])  # the last key given is the primary one
    changed = np.zeros(n - 1, dtype=bool)
    for c in cols:
        s = c[order]
        if (s[1:] < s[:-1]).any():
            return None
        changed |= s[1:] != s[:-1]
    key = np.empty(n, dtype=np.int64)
    key[order] = np.concatenate(([0], np.cumsum(changed)))
    return key.tolist()


def _frontier_fewest_multi(bounds: Sequence[Bound], start: int, end: int, limit: int | None,
                           varied: GroupCost | None, order):
    """:func:`_frontier_fewest` with several bounds (``min-time``: stage time and capacity).

    A group is allowed when it is within every bound. The argument of the one-bound search
    carries over bound by bound: each pruning test there (a core's reach from a cut, a core plus
    ``x`` over the bound, the cheap test ``core + x + y[p-1]`` of a cut below the farthest end) is
    a necessary (or sufficient) condition per bound, so it is applied to every bound; dominance
    needs a later cut no larger in every bound's ``x``: ``order`` = ``(key, smaller)`` from
    :func:`_shared_order` replaces ``x`` and its previous-smaller table in the scans.

    Only comparisons with the ``varied`` bound feed the leap: a fixed bound refuses the same
    groups whatever the varied bound is. The varied bound is tested first (stage times are the
    cheap queries) and the fixed bounds' reaches are searched within the varied one's; a refusal
    by the varied bound lowers the leap only where every fixed bound allows the group, so that
    refusals which decided nothing do not lower it. Raises :class:`_GiveUp` on the same work
    budget as the one-bound search.
    """
    key, smaller = order
    fixed = [(c, lim) for c, lim in bounds if c is not varied]
    moving = [(c, lim) for c, lim in bounds if c is varied]
    ordered = moving + fixed  # the varied bound first: stage times are the cheap queries
    nb = len(ordered)
    vi = 0 if moving else -1  # index of the varied bound
    cores = [c.core for c, _ in ordered]
    costs = [c.cost for c, _ in ordered]
    xs = [c.x for c, _ in ordered]
    ys = [c.y for c, _ in ordered]
    lims = [lim for _, lim in ordered]
    pres = [getattr(c, "prefix", None) for c, _ in ordered]
    idx = range(nb)
    leap = INF
    g = [start]
    frontier = [[start]]
    yes = {start: 0}
    no: dict[int, int] = {}
    parent: dict[int, int] = {}
    budget = 16 * (end - start) + 4096

    def allowed(a: int, p: int) -> bool:
        """Whether group ``[a, p)`` is within every bound (the varied one first; its refusal
        feeds the leap only where the fixed bounds allow the group)."""
        nonlocal leap
        for i in idx:
            v = costs[i](a, p)
            if v > lims[i]:
                if i == vi and v < leap and all(costs[j](a, p) <= lims[j] for j in idx if j != vi):
                    leap = v
                return False
        return True

    def farthest(i: int, o: int, right: bool, add, length: int, guess: int) -> int:
        """:func:`_frontier_fewest`'s ``farthest`` for bound ``i`` (no leap: the reaches below
        record the one refusal that decides their result)."""
        core, bnd = cores[i], lims[i]
        if length <= 0:
            return 0
        k = min(max(guess, 1), length)
        if (core(o, o + k) if right else core(o - k, o)) + add <= bnd:  # search outwards
            ok, step = k, 1
            while ok < length:
                k = min(ok + step, length)
                if (core(o, o + k) if right else core(o - k, o)) + add > bnd:
                    break
                ok, step = k, step * 2
            else:
                return ok
            bad = k
        else:  # search inwards
            bad, ok, step = k, 0, 1
            while bad > 1:
                k = max(bad - step, 1)
                if (core(o, o + k) if right else core(o - k, o)) + add <= bnd:
                    ok = k
                    break
                bad, step = k, step * 2
        while bad - ok > 1:  # ok allowed (or 0), bad refused
            mid = (ok + bad) // 2
            if (core(o, o + mid) if right else core(o - mid, o)) + add <= bnd:
                ok = mid
            else:
                bad = mid
        return ok

    def right_reach(a: int, hint: int) -> int:
        """Largest ``b <= end`` with ``core + x[a]`` within every bound (``a`` if none).

        Each bound's reach is searched within the previous ones' (the varied bound first). The
        result is the varied reach ``rv`` cut by the fixed ones; it changes with the varied bound
        only when the varied core at ``rv + 1`` fits, and only if no fixed bound cut it shorter:
        that one value is the leap candidate."""
        nonlocal leap
        r = end - a
        for i in idx:
            pre, add = pres[i], xs[i][a]
            guess = hint
            if add > lims[i]:
                guess = 1
            elif pre is not None:
                guess = bisect_right(pre, pre[a] + lims[i] - add, a + 1, end + 1) - 1 - a
            r2 = farthest(i, a, True, add, r, guess)
            if i == vi:
                rv, vlen = r2, r
            r = r2
            if r == 0:
                break
        if vi >= 0 and r == rv < vlen:
            v = cores[vi](a, a + rv + 1) + xs[vi][a]
            if v < leap:
                leap = v
        return a + r

    def left_reach(p: int, hint: int) -> int:
        """Smallest ``a >= start`` with ``core(a, p)`` within every bound (``p`` if none); the
        leap candidate as in ``right_reach``."""
        nonlocal leap
        r = p - start
        for i in idx:
            pre = pres[i]
            guess = hint if pre is None else p - bisect_left(pre, pre[p] - lims[i], start, p)
            r2 = farthest(i, p, False, 0, r, guess)
            if i == vi:
                rv, vlen = r2, r
            r = r2
            if r == 0:
                break
        if vi >= 0 and r == rv < vlen:
            v = cores[vi](p - rv - 1, p)
            if v < leap:
                leap = v
        return p - r

    def member(p: int, t: int, depth: int) -> bool:
        """Whether ``f[p] <= t`` (``t`` at most the current level)."""
        nonlocal budget
        known = yes.get(p)
        if known is not None and known <= t:
            return True
        refused = no.get(p, -1)
        if refused >= t:
            return False
        s = bisect_left(g, p)
        if s > t:
            return False
        if refused < s:
            for a in frontier[s - 1]:
                if allowed(a, p):
                    yes[p], parent[p] = s, a
                    return True
            no[p] = refused = s
        if s == t:
            return False
        if depth > 64 or budget <= 0:
            raise _GiveUp
        lam = left_reach(p, win)
        a = min(p - 1, g[t - 1])
        budget -= a - lam + 1
        return _hole(p, t, depth, lam, a, key, smaller, member, allowed, yes, no, parent)

    t = 0
    hint = win = 1
    while True:
        if limit is not None and t >= limit:
            return None, t + 1, leap
        gp = g[t]
        best, arg = gp, -1
        for a in frontier[t]:
            if best > gp and best < end:  # can a's group end after the best end so far?
                refused = False
                for i in idx:
                    v = cores[i](a, best + 1) + xs[i][a]
                    if v > lims[i]:
                        if i == vi and v < leap and all(cores[j](a, best + 1) + xs[j][a] <= lims[j]
                                                        for j in idx if j != vi):
                            leap = v
                        refused = True
                        break
                if refused:
                    continue
            p = right_reach(a, gp - a + hint)
            while p > best:
                if allowed(a, p):
                    best, arg = p, a
                    break
                p -= 1
                budget -= 1
        if budget <= 0:
            raise _GiveUp
        t += 1
        g.append(best)
        bases = None
        if best > gp:
            prev = frontier[t - 1]
            if prev[0] != arg:
                prev.remove(arg)
                prev.insert(0, arg)
            hint = best - gp
            yes[best], parent[best] = t, arg
            if best == end:
                break
            # cost_i(arg, p) <= core_i(arg, best) + x_i[arg] + y_i[p-1] for p <= best
            bases = [cores[i](arg, best) + xs[i][arg] for i in idx]
        lam = left_reach(best + 1, win)
        win = best + 1 - lam
        budget -= win
        level, m = [], INF
        sources = frontier[t - 1]
        if bases is not None and nb == 2:  # the common case (time and capacity), written out
            b0, b1 = bases
            y0, y1 = ys
            l0, l1 = lims
        p = best
        while p >= lam:  # the undominated members (suffix minima of key), down to lam
            kp = key[p]
            if kp >= m:
                p = smaller[p]
                continue
            if p > gp:  # f[p] >= t: member() for this level, inlined
                if bases is not None and (
                    (b0 + y0[p - 1] <= l0 and b1 + y1[p - 1] <= l1) if nb == 2
                    else all(bases[i] + ys[i][p - 1] <= lims[i] for i in idx)
                ):
                    yes[p], parent[p] = t, arg
                    level.append(p)
                    m = kp
                    p -= 1
                    continue
                for a in sources:
                    if allowed(a, p):
                        yes[p], parent[p] = t, a
                        level.append(p)
                        m = kp
                        break
                else:
                    no[p] = t
            elif member(p, t, 0):
                level.append(p)
                m = kp
            p -= 1
        if not level:
            return None, t, leap
        frontier.append(level)
    out, b = [], end
    while b != start:
        a = parent[b]
        out.append((a, b))
        b = a
    out.reverse()
    return out, t, leap


def _backtrack(parent: list, start: int, end: int) -> list:
    out = []
    b = end
    while b > start:
        a = parent[b - start]
        out.append((a, b))
        b = a
    out.reverse()
    return out


def _allowed_edges(bounds: Sequence[Bound], b: int, start: int):
    """Cuts ``a`` in ``[start, b)`` with ``[a, b)`` within every bound, nearest first."""
    a = b - 1
    while a >= start and all(c.core(a, b) <= lim for c, lim in bounds):
        if all(c.cost(a, b) <= lim for c, lim in bounds):
            yield a
        a -= 1


def _counts_bitsets(bounds: Sequence[Bound], seg: Segment, cap: int) -> list[int]:
    """``bits[b]``: bit ``t`` set when layers ``start .. b-1`` split into exactly ``t`` allowed groups."""
    mask = (1 << (cap + 1)) - 1
    bits = [0] * (seg.length + 1)
    bits[0] = 1
    for b in range(seg.start + 1, seg.end + 1):
        acc = 0
        for a in _allowed_edges(bounds, b, seg.start):
            acc |= bits[a - seg.start]
        bits[b - seg.start] = (acc << 1) & mask
    return bits


def _dp_exact_count(bounds: Sequence[Bound], seg: Segment, count: int, bits: list[int]) -> list:
    """Groups of ``seg`` into exactly ``count`` allowed groups (``bits`` says it is possible)."""
    out, b, t = [], seg.end, count
    while b > seg.start:
        for a in _allowed_edges(bounds, b, seg.start):
            if bits[a - seg.start] >> (t - 1) & 1:
                out.append((a, b))
                b, t = a, t - 1
                break
        else:  # pragma: no cover - bits guarantees an edge
            raise AssertionError("inconsistent count table")
    out.reverse()
    return out


def _greedy_exact_count(bounds: Sequence[Bound], seg: Segment, count: int) -> list:
    """Farthest-reach greedy that leaves at least one layer for each group still to come.

    With costs monotone under inclusion and some allowed partition into at most ``count``
    groups, this yields exactly ``count`` allowed groups (``count <= seg.length``): the greedy
    position after ``t`` groups never falls behind that of an exactly-``count`` partition.
    """
    out, pos = [], seg.start
    for t in range(count):
        cap = seg.end - (count - t - 1)
        r = min(min(c.reach(pos, seg.end, lim) for c, lim in bounds), cap)
        if r <= pos:  # pragma: no cover - excluded by the argument above
            raise AssertionError("greedy spread failed")
        out.append((pos, r))
        pos = r
    if pos != seg.end:  # pragma: no cover
        raise AssertionError("greedy spread did not cover the segment")
    return out


def spread(
    bounds: Sequence[Bound], segments: Sequence[Segment], groups: int, force_dp: bool = False
) -> list:
    """As many allowed groups as possible, but at most ``groups``, over all segments.

    Used by ``balanced`` to occupy every device it is given when that does not raise the
    bottleneck (it never does when the costs are monotone under inclusion).
    """
    if not segments:
        return []
    if not force_dp and _all_monotone(bounds):
        base = fewest_groups(bounds, segments).groups
        assert base is not None
        counts = []
        for seg in segments:
            counts.append(sum(1 for a, _ in base if seg.start <= a < seg.end))
        extra = min(groups, sum(s.length for s in segments)) - sum(counts)
        # Give extra groups to the segment whose groups are longest on average.
        heap = [(-s.length / c, i) for i, (s, c) in enumerate(zip(segments, counts)) if c < s.length]
        heapq.heapify(heap)
        while extra > 0 and heap:
            _, i = heapq.heappop(heap)
            counts[i] += 1
            extra -= 1
            if counts[i] < segments[i].length:
                heapq.heappush(heap, (-segments[i].length / counts[i], i))
        out = []
        for seg, c in zip(segments, counts):
            out.extend(_greedy_exact_count(bounds, seg, c))
        return out
    base = fewest_groups(bounds, segments, force_dp=force_dp).groups
    assert base is not None
    target = min(groups, sum(s.length for s in segments))
    split = _split_to(bounds, base, target)
    if len(split) == target:
        return split
    # Splitting the fewest-groups partition got stuck: an exact count table decides.
    tables = [_counts_bitsets(bounds, seg, groups) for seg in segments]
    # Knapsack over segments: reach[i] = set of totals achievable with segments 0..i-1.
    reach = [1]
    for table in tables:
        own, total, t = table[-1], 0, 0
        prev = reach[-1]
        while own >> t:
            if own >> t & 1:
                total |= prev << t
            t += 1
        reach.append(total & ((1 << (groups + 1)) - 1))
    best = reach[-1].bit_length() - 1
    if best <= 0:
        raise AssertionError("spread called on an infeasible instance")
    counts = [0] * len(segments)
    need = best
    for i in range(len(segments) - 1, -1, -1):
        own = tables[i][-1]
        for t in range(need + 1):
            if own >> t & 1 and reach[i] >> (need - t) & 1:
                counts[i] = t
                need -= t
                break
    out = []
    for seg, c, table in zip(segments, counts, tables):
        out.extend(_dp_exact_count(bounds, seg, c, table))
    return out


def _split_to(bounds: Sequence[Bound], groups: list, target: int) -> list:
    """Split allowed groups in two (both halves allowed), largest first, until ``target`` groups.

    Each split is at the point that minimises the larger half (by the first bound's cost).
    Stops early when no group can be split; the caller then falls back to an exact method.
    """
    main = bounds[0][0]
    out = list(groups)
    heap = [(-main.cost(a, b), a, b) for a, b in out if b - a >= 2]
    heapq.heapify(heap)
    while len(out) < target and heap:
        _, a, b = heapq.heappop(heap)
        best = None
        for m in range(a + 1, b):
            if all(c.cost(a, m) <= lim and c.cost(m, b) <= lim for c, lim in bounds):
                v = max(main.cost(a, m), main.cost(m, b))
                if best is None or v < best[0]:
                    best = (v, m)
        if best is None:
            continue
        m = best[1]
        out.remove((a, b))
        out += [(a, m), (m, b)]
        for g in ((a, m), (m, b)):
            if g[1] - g[0] >= 2:
                heapq.heappush(heap, (-main.cost(*g), *g))
    return sorted(out)


def float_key(x: float) -> int:
    """An integer with the order of non-negative floats (their IEEE-754 bit pattern)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def key_float(k: int) -> float:
    return struct.unpack("<d", struct.pack("<q", k))[0]


@dataclass
class Bottleneck:
    """An optimal partition: ``groups``, the bottleneck ``value`` and the number of tests run."""

    groups: list
    value: object
    tests: int = 0


def min_bottleneck(
    varied: GroupCost,
    fixed: Sequence[Bound],
    segments: Sequence[Segment],
    max_groups: int,
    lo,
    hi,
    floor=0,
    integer: bool = True,
    force_dp: bool = False,
) -> Bottleneck | None:
    """Smallest bound ``B`` of ``varied`` such that at most ``max_groups`` groups, each within
    ``B`` and within every ``fixed`` bound, cover the segments; ``None`` if even ``hi`` fails.

    ``lo`` must be a lower bound of the optimum and ``hi`` an upper bound to try. ``floor`` is
    a value the bottleneck cannot go below whatever the groups (spilling stages' costs); the
    result's value is ``max(floor, largest varied cost of a group)``. Integer bounds are
    bisected as integers, float bounds over their bit patterns, so the result is the exact
    optimum of the costs as computed. A gated ``varied`` cost (:attr:`GroupCost.gx`: stage times
    with overlapped transfers) is tested at each bound through :meth:`GroupCost.at_bound`.
    """

    def test(bound):
        # A gated cost (overlapped transfers) is tested through its plain view at this bound;
        # the view stays the same up to the next gate value, which caps the leap.
        c = varied.at_bound(bound)
        r = fewest_groups([(c, bound), *fixed], segments, max_groups, c, force_dp)
        if c is not varied and r.groups is None and r.leap is not None:
            r.leap = min(r.leap, varied.next_gate(bound))
        return r

    def value_of(groups):
        return max([floor, *(varied.cost(a, b) for a, b in groups)])

    def to_key(v):
        return int(v) if integer else float_key(v)

    def from_key(k):
        return k if integer else key_float(k)

    first = test(hi)
    if first.groups is None:
        return None
    best = first.groups
    hi_k = to_key(value_of(best))
    lo_k = min(to_key(max(lo, floor)), hi_k)
    tests = 1

    def probe(k: int) -> None:
        """Test bound key ``k`` (``lo_k <= k < hi_k``) and narrow ``[lo_k, hi_k]``."""
        nonlocal best, hi_k, lo_k, tests
        r = test(from_key(k))
        tests += 1
        if r.groups is not None:
            best = r.groups
            hi_k = to_key(value_of(best))
        else:
            nxt = k + 1
            if r.leap == INF:
                nxt = hi_k  # no bound below the one that succeeded can do better
            elif r.leap is not None:
                nxt = max(nxt, to_key(r.leap))
            lo_k = min(nxt, hi_k)

    # Count-guided bracketing: the fewest-groups count falls about like 1 / bound, so from a
    # success with c < max_groups groups at value v the optimum is near v * c / max_groups; test
    # there, then step away from it by about one group's share of the bound (doubling) until
    # the optimum is bracketed. Only the choice of bounds to test changes: each test narrows
    # [lo_k, hi_k] exactly as a bisection step would.
    if max_groups >= 8 and len(best) < max_groups and lo_k < hi_k:
        v = from_key(hi_k)
        guess = v * len(best) / max_groups
        step = v / max_groups
        k0 = min(max(to_key(guess), lo_k), hi_k - 1)
        probe(k0)
        sign = 1 if lo_k > k0 else -1  # failed: look above; succeeded: look below
        while lo_k < hi_k:
            k = to_key(max(guess + sign * step, 0))
            if not lo_k <= k < hi_k:
                break
            before = (lo_k, hi_k)
            probe(k)
            if (sign > 0 and hi_k < before[1]) or (sign < 0 and lo_k > before[0]):
                break  # the other side reached: bracketed
            step *= 2
    while lo_k < hi_k:
        probe((lo_k + hi_k) // 2)
    return Bottleneck(best, from_key(hi_k), tests)


def reference_balanced(
    cost: Callable[[int, int], object],
    n: int,
    max_groups: int,
    capacity,
    spill: Sequence[int] = (),
    fewest: bool = False,
) -> tuple[list, object] | None:
    """The seed's dynamic programme, given the group count: O(n^2 k) cost evaluations.

    ``best[t][b]`` = smallest bottleneck covering layers ``0 .. b-1`` with exactly ``t`` groups,
    every group within ``capacity``, except that a layer in ``spill`` may form a group alone
    (contributing nothing to the bottleneck). Returns the groups and the bottleneck of the
    best ``t <= max_groups`` (the largest such ``t`` on ties, the smallest with ``fewest``), or
    None if none is feasible. ``cost`` may be any function of the group: no monotonicity is
    assumed.
    """
    spill = set(spill)
    k = min(max_groups, n)
    best = [[INF] * (n + 1) for _ in range(k + 1)]
    parent = [[-1] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for t in range(1, k + 1):
        prev, row, par = best[t - 1], best[t], parent[t]
        for b in range(t, n + 1):
            bb, arg = INF, -1
            for a in range(t - 1, b):
                pa = prev[a]
                if pa == INF:
                    continue
                c = cost(a, b)
                if c <= capacity:
                    v = c if c > pa else pa
                elif b == a + 1 and a in spill:
                    v = pa
                else:
                    continue
                if v < bb:
                    bb, arg = v, a
            row[b], par[b] = bb, arg
    value, t_best = INF, -1
    for t in range(1, k + 1):
        if best[t][n] < value or (best[t][n] == value and not fewest):
            value, t_best = best[t][n], t
    if t_best < 0 or value == INF:
        return None
    groups, b = [], n
    for t in range(t_best, 0, -1):
        a = parent[t][b]
        groups.append((a, b))
        b = a
    groups.reverse()
    return groups, value
