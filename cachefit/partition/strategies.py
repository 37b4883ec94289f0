"""The partitioning strategies on a group-cost oracle, and the plain-integer ``partition`` API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..errors import PlanError
from ..perf.hardware import format_bytes
from .footprint import AdditiveCost, GroupCost
from .search import (
    Segment,
    fewest_groups,
    min_bottleneck,
    reference_balanced,
    segments_between,
    spread,
)

STRATEGIES = ("greedy", "balanced", "balanced-reference", "min-time", "layout")
SIZE_STRATEGIES = ("greedy", "balanced", "balanced-reference")
TIE_BREAKS = ("early", "late")


class DeviceCountError(PlanError):
    """Fewer devices than the fewest groups within capacity; ``minimum`` is that number."""

    def __init__(self, message: str, minimum: int, requested: int):
        super().__init__(message)
        self.minimum = minimum
        self.requested = requested


@dataclass
class Solution:
    """Groups ``(a, b)`` (layers ``a .. b-1``) chosen by a strategy, with what the report needs.

    minimum: the fewest devices any plan within capacity needs (spilling layers included).
    devices: the device count the strategy planned for (``--devices`` or ``minimum``).
    value:   the optimised bottleneck (bytes for ``balanced*``, seconds for ``min-time``),
             None for ``greedy``.
    """

    groups: list
    minimum: int
    devices: int
    value: object = None
    notes: list = field(default_factory=list)


def check_strategy(strategy: str, allowed: Sequence[str] = STRATEGIES) -> str:
    if strategy not in allowed:
        raise PlanError(f"unknown strategy {strategy!r}: use one of {', '.join(allowed)}")
    return strategy


def check_tie_break(tie_break: str) -> str:
    if tie_break not in TIE_BREAKS:
        raise PlanError(f"unknown tie_break {tie_break!r}: use one of {', '.join(TIE_BREAKS)}")
    return tie_break


def unplaceable_layers(cost: GroupCost, capacity) -> list[int]:
    """Layers that are in no group within ``capacity`` (for monotone costs: larger than it alone).

    With a non-monotone exact footprint, a layer too large alone may still fit together with a
    neighbour (whose boundary tensor it then no longer pays for): such a layer is placeable.
    """
    out = []
    n = cost.n
    for l in range(n):
        if cost.cost(l, l + 1) <= capacity:
            continue
        if cost.monotone or not _in_some_group(cost, l, capacity):
            out.append(l)
    return out


def _in_some_group(cost: GroupCost, l: int, capacity) -> bool:
    a = l
    while a >= 0 and cost.core(a, l + 1) <= capacity:
        b = l + 1
        while b <= cost.n and cost.core(a, b) <= capacity:
            if cost.cost(a, b) <= capacity:
                return True
            b += 1
        a -= 1
    return False


def _infeasible_message(cost: GroupCost, segments: Sequence[Segment], capacity, names) -> str:
    for seg in segments:
        if fewest_groups([(cost, capacity)], [seg]).groups is None:
            return (
                f"no partition of layers {seg.start} ({names(seg.start)}) .. {seg.end - 1} ({names(seg.end - 1)}) "
                f"into groups within {format_bytes(capacity)} exists: every layer fits in some group, but "
                "no way of cutting this run avoids a group over capacity (the tensors crossing the possible "
                "cuts are too large). Use a larger capacity, a smaller micro-batch, or --footprint sum to "
                "compare with the additive estimate"
            )
    return f"no partition into groups within {format_bytes(capacity)} exists"


def solve(
    cost: GroupCost,
    capacity,
    strategy: str,
    devices: int | None = None,
    spill: Sequence[int] = (),
    time: GroupCost | None = None,
    names=lambda i: f"layer {i}",
    force_dp: bool = False,
    tie_break: str = "early",
) -> Solution:
    """Run ``strategy`` (``greedy``, ``balanced``, ``balanced-reference``, ``min-time``).

    ``cost`` is the group footprint, ``capacity`` the bytes of one device; the layers in
    ``spill`` are placed alone (the caller checked they fit nowhere and spilling is allowed).
    ``time`` is the stage-time oracle (:class:`~.cost.StageTime`), required by ``min-time``.
    ``force_dp`` makes the exact dynamic programme run even where the greedy test is exact
    (tests use it to check one against the other).

    ``tie_break`` chooses among the partitions that reach the same optimum: ``early`` (the
    searches' natural order: earlier groups take as many layers as the bound allows; with a
    monotone cost every cut is as late as any optimal partition's, the componentwise-largest
    cut vector) or ``late``, its mirror image (the same search on the layers in reverse order:
    later groups take as many layers as they can, every cut as early as possible).
    """
    check_strategy(strategy, ("greedy", "balanced", "balanced-reference", "min-time"))
    check_tie_break(tie_break)
    if devices is not None and devices < 1:
        raise PlanError(f"--devices must be at least 1, got {devices}")
    n = cost.n
    spill = sorted(spill)
    segments = segments_between(n, spill)
    cap_bound = (cost, capacity)
    base = fewest_groups([cap_bound], segments, force_dp=force_dp)
    if base.groups is None:
        raise PlanError(_infeasible_message(cost, segments, capacity, names))
    minimum = base.count + len(spill)
    if devices is not None and devices < minimum:
        raise DeviceCountError(
            f"{n} layers need at least {minimum} devices of {format_bytes(capacity)} each"
            + (f" ({len(spill)} of them for spilling layers)" if spill else "")
            + f"; {devices} {'is' if devices == 1 else 'are'} too few. Use --devices {minimum} or more, "
            "a larger capacity, or shrink the layers (INT8/INT4 weights, a smaller micro-batch)",
            minimum,
            devices,
        )
    if tie_break == "late":  # after the checks above, whose messages name the layers in order
        sol = solve(cost.mirrored(), capacity, strategy, devices, [n - 1 - s for s in spill],
                    time.mirrored() if time is not None else None, lambda i: names(n - 1 - i), force_dp)
        sol.groups = sorted((n - b, n - a) for a, b in sol.groups)
        return sol
    k = devices if devices is not None else minimum
    sol = Solution([], minimum, k)
    free = k - len(spill)  # devices left for the ordinary segments
    singles = [(s, s + 1) for s in spill]

    if strategy == "greedy":
        sol.groups = base.groups
    elif strategy == "balanced":
        if isinstance(cost, AdditiveCost) and segments:
            # The largest layer and the average load are lower bounds of the bottleneck.
            total = sum(cost.cost(s.start, s.end) for s in segments)
            lo = max(max(max(cost.values[s.start:s.end]) for s in segments), -(-total // free))
        elif segments:
            # A group holding a layer has at least its core; with superadditive cores the
            # groups' cores add up to at least the segments' cores: one is >= their average.
            cores = cost.layer_cores()
            lo = max(max(cores[s.start:s.end]) for s in segments)
            if cost.superadditive:
                lo = max(lo, -(-sum(cost.core(s.start, s.end) for s in segments) // free))
        else:
            lo = 0
        # Start the search from an even split when it fits: a much smaller first bound than
        # the capacity, so the first tests look at groups of about the final length.
        hi = capacity
        even = _even_split(segments, free)
        if even:
            hi = min(hi, max(cost.cost(a, b) for a, b in even))
        res = min_bottleneck(cost, [], segments, free, lo, hi, integer=True, force_dp=force_dp)
        if res is None:  # pragma: no cover - the even split proves `hi` feasible
            res = min_bottleneck(cost, [], segments, free, lo, capacity, integer=True, force_dp=force_dp)
        assert res is not None  # the greedy at capacity needs at most `minimum` groups
        sol.value = res.value
        sol.groups = spread([(cost, res.value)], segments, free, force_dp=force_dp)
        sol.notes.append(f"bottleneck search: {res.tests} feasibility tests")
    elif strategy == "balanced-reference":
        ref = reference_balanced(cost.cost, n, k, capacity, spill)
        assert ref is not None
        groups, sol.value = ref
        sol.groups = [g for g in groups if g not in singles]
    else:  # min-time
        if time is None:
            raise PlanError("the min-time strategy needs a cost model (layer and transfer times)")
        floor = max([time.spill_time(s) for s in spill], default=0.0)
        hi = max([floor, *(time.cost(a, b) for a, b in base.groups)])
        res = min_bottleneck(
            time, [cap_bound], segments, free, 0.0, hi, floor=floor, integer=False, force_dp=force_dp
        )
        assert res is not None
        sol.value = res.value
        sol.groups = res.groups
        sol.notes.append(f"bottleneck search: {res.tests} feasibility tests")
    sol.groups = sorted([*sol.groups, *singles])
    return sol


def _even_split(segments: Sequence[Segment], groups: int) -> list:
    """At most ``groups`` groups of about equal layer counts over the segments ([] if impossible)."""
    total = sum(s.length for s in segments)
    shares = [min(s.length, max(1, groups * s.length // total)) for s in segments] if total else []
    if not shares or sum(shares) > groups:
        return []
    out = []
    for seg, share in zip(segments, shares):
        edges = [seg.start + (seg.length * t) // share for t in range(share + 1)]
        out.extend(zip(edges, edges[1:]))
    return out


def partition(
    sizes: Sequence[int],
    capacity: int,
    strategy: str = "balanced",
    devices: int | None = None,
    tie_break: str = "early",
) -> list[tuple[int, int]]:
    """Partition layers of additive integer ``sizes`` into contiguous groups within ``capacity``.

    Returns ``(first, last)`` layer indices (inclusive) of each group, in order.

    ``greedy``: fewest groups (the seed's accumulation). ``balanced``: ``devices`` groups
    (default: the greedy minimum; at most one per layer) minimising the largest group sum.
    ``balanced-reference``: the same optimum by the O(n^2 k) dynamic programme.
    ``tie_break``: among partitions with the same optimum, ``early`` lets earlier groups take as
    many layers as the bound allows, ``late`` later ones (see :func:`solve`).
    Raises :class:`PlanError` when a layer exceeds ``capacity`` and :class:`DeviceCountError`
    when ``devices`` is below the minimum.
    """
    check_strategy(strategy, SIZE_STRATEGIES)
    values = [int(s) for s in sizes]
    bad = [i for i, s in enumerate(values) if s < 0]
    if bad:
        raise PlanError(f"layer {bad[0]} has a negative size ({values[bad[0]]} bytes): sizes must be >= 0")
    if capacity < 0:
        raise PlanError(f"capacity must be >= 0 bytes, got {capacity}")
    if not values:
        return []
    over = [i for i, s in enumerate(values) if s > capacity]
    if over:
        shown = ", ".join(f"layer {i} ({values[i]} bytes)" for i in over[:5])
        raise PlanError(
            f"{len(over)} layer(s) exceed the capacity of {capacity} bytes alone: {shown}"
            f"{' ...' if len(over) > 5 else ''}; no partition can hold them. Shrink those layers "
            "(quantization, pruning, a smaller micro-batch), split them, or use make_plan(..., allow_spill=True)"
        )
    check_tie_break(tie_break)
    sol = solve(AdditiveCost(values), capacity, strategy, devices, tie_break=tie_break)
    return [(a, b - 1) for a, b in sol.groups]
