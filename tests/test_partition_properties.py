"""Every partitioner against brute force over all 2^(n-1) partitions, for n <= 12.

Rule checked: each strategy is optimal for its own objective (greedy: fewest groups;
balanced / balanced-reference: smallest largest footprint with at most k groups; min-time:
smallest largest stage time with at most k groups, transfers added to or overlapped with compute), its groups are contiguous, in order,
cover every layer exactly once and are within capacity; infeasible requests raise the
documented errors. The brute force computes footprints and times on its own.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cachefit.errors import PlanError
from cachefit.partition import (
    DeviceCountError,
    FootprintCost,
    LayerRecord,
    OversizedLayerError,
    RooflineCostModel,
    StageTime,
    make_plan,
    partition,
    solve,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- brute force
def all_partitions(n):
    """Every partition of layers 0..n-1 into contiguous groups, as half-open (a, b) pairs."""
    for mask in range(1 << (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        yield list(zip(cuts, cuts[1:]))


def brute_footprint(group, mode):
    if mode == "sum":
        return sum(l.weight_bytes + l.activation_bytes + l.buffer_bytes for l in group)
    params, private = {}, 0
    for l in group:
        params.update(l.params)
        private += max(0, l.weight_bytes - sum(l.params.values()))
    peak = max(l.activation_bytes + l.buffer_bytes for l in group)
    return private + sum(params.values()) + peak + group[0].in_bytes + group[-1].out_bytes


def brute_time(layers, a, b, model, resident=True):
    """A stage's time: its layers plus its input transfer (the first stage's too), or the larger
    of the two when the model overlaps transfers with compute."""
    work = math.fsum(model.layer_time(l, resident) for l in layers[a:b])
    transfer = model.transfer_time(layers[a].in_bytes)
    return max(work, transfer) if getattr(model, "overlap_transfers", False) else work + transfer


class Brute:
    """All the optima of one instance, by enumeration."""

    def __init__(self, layers, capacity, mode, allow_spill=False, model=None):
        n = len(layers)
        self.n = n
        fp = {(a, b): brute_footprint(layers[a:b], mode) for a in range(n) for b in range(a + 1, n + 1)}
        self.fp = fp
        self.unplaceable = [l for l in range(n) if not any(fp[a, b] <= capacity for (a, b) in fp if a <= l < b)]
        self.spill = set(self.unplaceable) if allow_spill else set()
        self.feasible = []
        for part in all_partitions(n):
            ok = True
            for a, b in part:
                if fp[a, b] <= capacity:
                    continue
                if b == a + 1 and a in self.spill:
                    continue
                ok = False
                break
            if ok:
                self.feasible.append(part)
        self.min_groups = min((len(p) for p in self.feasible), default=None)
        self.model = model
        self.layers = layers
        self.capacity = capacity

    def resident_groups(self, part):
        return [(a, b) for a, b in part if self.fp[a, b] <= self.capacity]

    def bottleneck(self, part):
        return max([0, *(self.fp[g] for g in self.resident_groups(part))])

    def balanced(self, k):
        return min((self.bottleneck(p) for p in self.feasible if len(p) <= k), default=None)

    def balanced_groups(self, k):
        """The most groups (<= k) of any partition reaching the balanced optimum."""
        best = self.balanced(k)
        return max(len(p) for p in self.feasible if len(p) <= k and self.bottleneck(p) == best)

    def min_time(self, k):
        def stage(a, b):
            if self.fp[a, b] <= self.capacity:
                return brute_time(self.layers, a, b, self.model)
            return brute_time(self.layers, a, b, self.model, resident=False)

        return min((max(stage(a, b) for a, b in p) for p in self.feasible if len(p) <= k), default=None)


def check_groups(groups, n):
    """Contiguous, in order, every layer exactly once (inclusive (first, last) pairs)."""
    assert groups, "no groups"
    assert groups[0][0] == 0 and groups[-1][1] == n - 1
    for (a, b), (c, d) in zip(groups, groups[1:]):
        assert c == b + 1
    for a, b in groups:
        assert a <= b


# ---------------------------------------------------------------- plain sizes
@st.composite
def size_instances(draw):
    n = draw(st.integers(1, 12))
    sizes = draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
    capacity = draw(st.integers(0, 60))
    devices = draw(st.one_of(st.none(), st.integers(1, 14)))
    return sizes, capacity, devices


@SETTINGS
@given(size_instances())
def test_sizes_all_strategies_optimal(inst):
    sizes, capacity, devices = inst
    n = len(sizes)
    feasible = [p for p in all_partitions(n) if all(sum(sizes[a:b]) <= capacity for a, b in p)]
    if not feasible:
        for strategy in ("greedy", "balanced", "balanced-reference"):
            with pytest.raises(PlanError, match="exceed the capacity"):
                partition(sizes, capacity, strategy, devices)
        return
    fewest = min(len(p) for p in feasible)
    if devices is not None and devices < fewest:
        for strategy in ("greedy", "balanced", "balanced-reference"):
            with pytest.raises(DeviceCountError) as err:
                partition(sizes, capacity, strategy, devices)
            assert err.value.minimum == fewest
        return
    k = devices if devices is not None else fewest
    best = min(max(sum(sizes[a:b]) for a, b in p) for p in feasible if len(p) <= k)

    greedy = partition(sizes, capacity, "greedy", devices)
    check_groups(greedy, n)
    assert len(greedy) == fewest
    assert all(sum(sizes[a:b + 1]) <= capacity for a, b in greedy)

    for strategy in ("balanced", "balanced-reference"):
        for tie_break in ("early", "late"):
            groups = partition(sizes, capacity, strategy, devices, tie_break=tie_break)
            check_groups(groups, n)
            assert max(sum(sizes[a:b + 1]) for a, b in groups) == best, strategy
            # Additive sizes: the optimum is reachable with exactly min(k, n) groups, and both use it.
            assert len(groups) == min(k, n), strategy

    # The tie break of balanced: among the optimal partitions into min(k, n) groups, `early` has
    # every cut as late as any of them (the componentwise-largest cut vector), `late` every cut
    # as early as any of them.
    optimal = [[a for a, _ in p] for p in feasible
               if len(p) == min(k, n) and max(sum(sizes[a:b]) for a, b in p) == best]
    early = [a for a, _ in partition(sizes, capacity, "balanced", devices)]
    late = [a for a, _ in partition(sizes, capacity, "balanced", devices, tie_break="late")]
    assert early in optimal and late in optimal
    assert all(e >= c and l <= c for cuts in optimal for e, l, c in zip(early, late, cuts))


# ---------------------------------------------------------------- layer records
# The strategies record_instances draws from, built once: building them inside the draw (a new
# st.integers / st.lists per field and layer) cost a third of the data generation, which is most
# of these tests' time. The same strategies in the same order: the same instances.
_POOL_NAMES = [f"p{i}" for i in range(4)]
_PARAM_NAMES = st.lists(st.sampled_from(_POOL_NAMES), max_size=2, unique=True)
_UP_TO = {hi: st.integers(0, hi) for hi in (10, 30, 200, 250, 1000)}
_MODES = st.sampled_from(["exact", "exact", "sum"])
_STRATEGIES: dict = {}  # (lo, hi) -> st.integers(lo, hi), for the bounds that vary by call or by n
_DEVICES: dict = {}  # n -> none or 1..n+2


def _ints(lo: int, hi: int):
    if (lo, hi) not in _STRATEGIES:
        _STRATEGIES[lo, hi] = st.integers(lo, hi)
    return _STRATEGIES[lo, hi]


@st.composite
def record_instances(draw, max_n=8, boundary=(0, 40)):
    n = draw(_ints(1, max_n))
    pool = {name: draw(_UP_TO[30]) for name in _POOL_NAMES}
    io = _ints(*boundary)
    layers = []
    for i in range(n):
        names = draw(_PARAM_NAMES)
        params = {k: pool[k] for k in names}
        private = draw(_UP_TO[30])
        layers.append(LayerRecord(
            name=f"layers.{i}",
            weight_bytes=sum(params.values()) + private,
            activation_bytes=draw(_UP_TO[30]),
            buffer_bytes=draw(_UP_TO[10]),
            in_bytes=draw(io),
            out_bytes=draw(io),
            params=params,
            flops=draw(_UP_TO[1000]),
            bytes_moved=draw(_UP_TO[200]),
        ))
    capacity = draw(_UP_TO[250])
    if n not in _DEVICES:
        _DEVICES[n] = st.one_of(st.none(), st.integers(1, n + 2))
    devices = draw(_DEVICES[n])
    mode = draw(_MODES)
    allow_spill = draw(st.booleans())
    return layers, capacity, devices, mode, allow_spill


MODEL = RooflineCostModel(onchip_bw=40.0, offchip_bw=10.0, peak_flops=100.0, link_bw=8.0, link_latency=0.5)
# Transfers hidden behind compute: a stage takes max(layers, transfer). A slower link, so that the
# transfers often exceed the layers' times and the overlap decides the optimum.
OVERLAP = RooflineCostModel(onchip_bw=40.0, offchip_bw=10.0, peak_flops=100.0, link_bw=2.0, link_latency=0.5,
                            overlap_transfers=True)


def expect_errors(brute, devices, fn):
    """If the instance is infeasible for this request, assert the right error and return True."""
    if brute.unplaceable and not brute.spill:
        with pytest.raises(OversizedLayerError) as err:
            fn()
        assert [o.index for o in err.value.oversized] == brute.unplaceable
        return True
    if brute.min_groups is None:
        with pytest.raises(PlanError, match="no partition"):
            fn()
        return True
    if devices is not None and devices < brute.min_groups:
        with pytest.raises(DeviceCountError) as err:
            fn()
        assert err.value.minimum == brute.min_groups
        return True
    return False


def check_plan(plan, layers, capacity, brute):
    check_groups(plan.groups, len(layers))
    for s in plan.stages:
        a, b = s.first_layer, s.last_layer + 1
        assert s.total_bytes == brute.fp[a, b]
        if s.spilling:
            assert b == a + 1 and a in brute.spill
        else:
            assert s.total_bytes <= capacity


@SETTINGS
@given(record_instances())
def test_records_greedy_fewest(inst):
    layers, capacity, devices, mode, allow_spill = inst
    brute = Brute(layers, capacity, mode, allow_spill)
    run = lambda: make_plan(layers, capacity, "greedy", devices, mode, allow_spill=allow_spill)  # noqa: E731
    if expect_errors(brute, devices, run):
        return
    plan = run()
    check_plan(plan, layers, capacity, brute)
    assert plan.devices_used == brute.min_groups == plan.min_devices


@SETTINGS
@given(record_instances())
def test_records_balanced_and_reference_optimal(inst):
    layers, capacity, devices, mode, allow_spill = inst
    brute = Brute(layers, capacity, mode, allow_spill)
    for strategy, tie_break in (("balanced", "early"), ("balanced", "late"), ("balanced-reference", "early")):
        run = lambda: make_plan(  # noqa: E731
            layers, capacity, strategy, devices, mode, allow_spill=allow_spill, tie_break=tie_break
        )
        if expect_errors(brute, devices, run):
            return
        plan = run()
        check_plan(plan, layers, capacity, brute)
        k = devices if devices is not None else brute.min_groups
        assert plan.devices_used <= k
        resident = [s.total_bytes for s in plan.stages if s.resident]
        assert max([0, *resident]) == brute.balanced(k), strategy
        # Every device it can use without raising the bottleneck is used.
        assert plan.devices_used == brute.balanced_groups(k), strategy
        if resident:
            assert plan.bottleneck_value == brute.balanced(k)
            assert plan.stages[plan.bottleneck].total_bytes == plan.bottleneck_value


@SETTINGS
@given(record_instances(), st.sampled_from(["early", "late"]), st.sampled_from([MODEL, OVERLAP]))
def test_records_min_time_optimal(inst, tie_break, model):
    """min-time reaches the brute-force optimum, with transfers added (MODEL) or overlapped with
    compute (OVERLAP: the cost model's overlap_transfers), and reports each stage's time."""
    layers, capacity, devices, mode, allow_spill = inst
    brute = Brute(layers, capacity, mode, allow_spill, model)
    run = lambda: make_plan(  # noqa: E731
        layers, capacity, "min-time", devices, mode, allow_spill=allow_spill, cost_model=model,
        tie_break=tie_break,
    )
    if expect_errors(brute, devices, run):
        return
    plan = run()
    check_plan(plan, layers, capacity, brute)
    k = devices if devices is not None else brute.min_groups
    assert plan.devices_used <= k
    assert math.isclose(plan.bottleneck_value, brute.min_time(k), rel_tol=1e-9, abs_tol=1e-12)
    for s in plan.stages:
        a, b = s.first_layer, s.last_layer + 1
        assert math.isclose(s.predicted_time, brute_time(layers, a, b, model, s.resident), rel_tol=1e-9)
        assert s.transfer_time == model.transfer_time(layers[a].in_bytes)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(record_instances(max_n=10), st.sampled_from(["greedy", "balanced", "min-time", "min-time-overlap"]),
       st.booleans())
def test_exact_dp_matches_brute_force_when_forced(inst, strategy, force_dp):
    """The dynamic programme (the reference when the footprint is not monotone) is exact on every
    instance, monotone ones included: forced here on all of them; and so are the searches chosen
    without forcing (the frontier searches, one bound or two)."""
    layers, capacity, devices, _, _ = inst
    model = OVERLAP if strategy == "min-time-overlap" else MODEL
    strategy = strategy.replace("-overlap", "")
    brute = Brute(layers, capacity, "exact", False, model)
    assume(not brute.unplaceable and brute.min_groups is not None)
    assume(devices is None or devices >= brute.min_groups)
    cost = FootprintCost(layers)
    time = StageTime(layers, model)
    sol = solve(cost, capacity, strategy, devices, time=time, force_dp=force_dp)
    groups = [(a, b - 1) for a, b in sol.groups]
    check_groups(groups, len(layers))
    assert all(brute.fp[a, b] <= capacity for a, b in sol.groups)
    k = devices if devices is not None else brute.min_groups
    assert sol.minimum == brute.min_groups
    if strategy == "greedy":
        assert len(sol.groups) == brute.min_groups
    elif strategy == "balanced":
        assert sol.value == brute.balanced(k)
        assert max(brute.fp[g] for g in sol.groups) == sol.value
        assert len(sol.groups) == brute.balanced_groups(k)
    else:
        assert math.isclose(sol.value, brute.min_time(k), rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record_instances(max_n=12, boundary=(0, 5)))
def test_records_small_boundaries_n12(inst):
    """Up to 12 layers with small boundary tensors (mostly monotone footprints: the greedy path)."""
    layers, capacity, devices, mode, allow_spill = inst
    brute = Brute(layers, capacity, mode, allow_spill)
    run = lambda: make_plan(layers, capacity, "balanced", devices, mode, allow_spill=allow_spill)  # noqa: E731
    if expect_errors(brute, devices, run):
        return
    plan = run()
    check_plan(plan, layers, capacity, brute)
    k = devices if devices is not None else brute.min_groups
    resident = [s.total_bytes for s in plan.stages if s.resident]
    assert max([0, *resident]) == brute.balanced(k)


_SHARED_NAMES = [f"w{i}" for i in range(6)]
_SHARED_PARAM_NAMES = st.lists(st.sampled_from(_SHARED_NAMES), max_size=4, unique=True)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_footprint_oracle_matches_direct_many_shared_params(data):
    """FootprintCost.cost(a, b) equals the direct footprint for every group, including models
    where many parameters are shared (the merge-sort-tree path of the repeat sums)."""
    n = data.draw(_ints(1, 30))
    pool = {name: data.draw(_ints(0, 50)) for name in _SHARED_NAMES}
    layers = []
    for i in range(n):
        names = data.draw(_SHARED_PARAM_NAMES)
        params = {k: pool[k] for k in names}
        layers.append(LayerRecord(
            f"l{i}", sum(params.values()) + data.draw(_ints(0, 9)), data.draw(_ints(0, 40)),
            data.draw(_ints(0, 5)), data.draw(_ints(0, 20)), data.draw(_ints(0, 20)), params,
        ))
    cost = FootprintCost(layers)
    # The monotonicity check on numpy arrays and on Python integers agree.
    ws = [l.activation_bytes + l.buffer_bytes for l in layers]
    own = [cost.core(i, i + 1) - ws[i] for i in range(n)]  # a layer alone holds no repeat
    if n > 1:
        assert cost._check_monotone_np(ws, own, cost._dup.repeats) == cost.monotone
        assert cost._check_monotone_py(ws, own, cost._dup.repeats) == cost.monotone
    for a in range(n):
        for b in range(a + 1, n + 1):
            want = brute_footprint(layers[a:b], "exact")  # once per group: both checks compare with it
            assert cost.cost(a, b) == want
            assert cost.core(a, b) == want - layers[a].in_bytes - layers[b - 1].out_bytes
    if cost.monotone:
        for a in range(n):
            for b in range(a + 1, n + 1):
                if b < n:
                    assert cost.cost(a, b + 1) >= cost.cost(a, b)
                if a > 0:
                    assert cost.cost(a - 1, b) >= cost.cost(a, b)


# ---------------------------------------------------------------- the frontier search
def _check_fewest_against_dp(cost, bound, limit, start=0, end=None):
    """The frontier search against the dynamic programme on one bound; False if it gave up."""
    from cachefit.partition.search import _dp_fewest_single, _frontier_fewest, _GiveUp

    end = cost.n if end is None else end
    ref, _ = _dp_fewest_single((cost, bound), start, end, cost)
    try:
        got, count, leap = _frontier_fewest((cost, bound), start, end, limit, cost)
    except _GiveUp:
        return False
    if ref is not None and (limit is None or len(ref) <= limit):
        assert got is not None and len(got) == len(ref) == count
        assert got[0][0] == start and got[-1][1] == end
        assert all(b == c for (_, b), (c, _) in zip(got, got[1:]))
        assert all(cost.cost(a, b) <= bound for a, b in got)
        return True
    assert got is None
    # The leap: no bound below it does better (every comparison, hence the run, is the same).
    assert leap > bound
    for b2 in sorted({bound + 1, (bound + leap) // 2 if leap < float("inf") else bound + 2, bound + 3}):
        if b2 < leap:
            r2, _ = _dp_fewest_single((cost, b2), start, end, cost)
            assert r2 is None or (limit is not None and len(r2) > limit), (bound, b2, leap)
    return True


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record_instances(max_n=40, boundary=(0, 60)), st.integers(10, 300),
       st.one_of(st.none(), st.integers(1, 40)))
def test_frontier_search_matches_the_dynamic_programme(inst, bound, limit):
    """The level-by-level frontier search (used for non-monotone footprints) finds the same
    fewest-groups count as the dynamic programme, valid groups, and a sound leap, whenever it
    does not hand the case back to the programme."""
    layers = inst[0]
    _check_fewest_against_dp(FootprintCost(layers), bound, limit)


def test_frontier_search_seeded_instances_mostly_answered_itself():
    """1,500 seeded random models of 1..60 layers (shared parameters, boundaries up to 5, 40 or
    100 bytes against layers of 0..70): the same checks, and the search answers most of them
    without the programme (it hands back only cases where a level makes no progress)."""
    import random

    rng = random.Random(11)
    answered = 0
    for _ in range(1500):
        n = rng.randint(1, 60)
        pool = {f"p{i}": rng.randint(0, 30) for i in range(4)}
        io = rng.choice([5, 40, 100])
        layers = []
        for i in range(n):
            params = {k: pool[k] for k in rng.sample(sorted(pool), rng.randint(0, 2))} if rng.random() < 0.3 else {}
            layers.append(LayerRecord(f"l{i}", sum(params.values()) + rng.randint(0, 30), rng.randint(0, 30),
                                      rng.randint(0, 10), rng.randint(0, io), rng.randint(0, io), params))
        answered += _check_fewest_against_dp(FootprintCost(layers), rng.randint(20, 400),
                                             rng.choice([None, rng.randint(1, n + 1)]))
    assert answered > 900


def test_frontier_search_on_a_long_non_monotone_model():
    """3,000 layers with random boundary tensors up to 400 KB (the benchmark's kind): the frontier
    search answers every bound itself (no fallback) and agrees with the programme."""
    import random

    rng = random.Random(5)
    layers = [LayerRecord(f"l{i}", rng.randint(200_000, 1_000_000), rng.randint(8_000, 64_000),
                          in_bytes=rng.randint(0, 400_000), out_bytes=rng.randint(0, 400_000),
                          params={"tied": 3_000_000} if i in (0, 2999) else {})
              for i in range(3000)]
    cost = FootprintCost(layers)
    assert not cost.monotone
    answered = 0
    for bound, limit in ((20_000_000, None), (20_000_000, 80), (6_000_000, None), (60_000_000, 30),
                         (61_000_000, 30), (3_900_000, None)):
        answered += _check_fewest_against_dp(cost, bound, limit)
    assert answered == 6


# ---------------------------------------------------------------- the two-bound frontier search (min-time)
def _check_two_bounds_against_dp(layers, model, capacity, bound, limit):
    """The two-bound frontier search (stage time <= bound, footprint <= capacity) against the
    dynamic programme; False if it gave up. Checks the count, the groups and the leap."""
    from cachefit.partition.search import _dp_fewest, _frontier_fewest_multi, _GiveUp, _shared_order

    fp, time = FootprintCost(layers), StageTime(layers, model)
    n = len(layers)

    def dp(b):
        view = time.at_bound(b)
        return _dp_fewest([(view, b), (fp, capacity)], 0, n, view)[0]

    view = time.at_bound(bound)
    bounds = [(view, bound), (fp, capacity)]
    order = _shared_order(bounds)
    assert order is not None  # transfer_time grows with the bytes: one order serves both bounds
    try:
        got, count, leap = _frontier_fewest_multi(bounds, 0, n, limit, view, order)
    except _GiveUp:
        return False
    ref = dp(bound)
    if ref is not None and (limit is None or len(ref) <= limit):
        assert got is not None and len(got) == len(ref) == count
        assert got[0][0] == 0 and got[-1][1] == n
        assert all(b == c for (_, b), (c, _) in zip(got, got[1:]))
        assert all(time.cost(a, b) <= bound and fp.cost(a, b) <= capacity for a, b in got)
        return True
    assert got is None
    # The leap (capped by the next gate, as min_bottleneck does): no bound below it does better.
    leap = min(leap, time.next_gate(bound))
    assert leap > bound
    for frac in (1e-9, 0.5, 1 - 1e-9):
        b2 = bound + (leap - bound) * frac if leap < float("inf") else bound * (1 + frac) + frac
        if bound < b2 < leap:
            r2 = dp(b2)
            assert r2 is None or (limit is not None and len(r2) > limit), (bound, b2, leap)
    return True


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record_instances(max_n=40, boundary=(0, 60)), st.integers(10, 300), st.floats(0.0, 60.0),
       st.one_of(st.none(), st.integers(1, 40)), st.sampled_from([MODEL, OVERLAP]))
def test_two_bound_frontier_matches_the_dynamic_programme(inst, capacity, bound, limit, model):
    """min-time's feasibility test on a non-monotone footprint (two bounds: stage time and
    capacity) finds the programme's fewest-groups count, valid groups and a sound leap whenever it
    does not hand the case back, with transfers added or overlapped (gated)."""
    _check_two_bounds_against_dp(inst[0], model, capacity, bound, limit)


def test_two_bound_frontier_seeded_instances_mostly_answered_itself():
    """600 seeded random models of 1..50 layers: the same checks; the search answers most of
    them without the programme (522 of 600 when written)."""
    import random

    rng = random.Random(23)
    answered = 0
    for i in range(600):
        n = rng.randint(1, 50)
        io = rng.choice([5, 40, 100])
        layers = [LayerRecord(f"l{j}", rng.randint(0, 30), rng.randint(0, 30), rng.randint(0, 10),
                              rng.randint(0, io), rng.randint(0, io), flops=rng.randint(0, 1000),
                              bytes_moved=rng.randint(0, 200)) for j in range(n)]
        answered += _check_two_bounds_against_dp(layers, OVERLAP if i % 2 else MODEL, rng.randint(20, 400),
                                                 rng.uniform(0.0, 60.0), rng.choice([None, rng.randint(1, n + 1)]))
    assert answered > 450


def test_min_time_on_a_long_non_monotone_model_without_the_programme(monkeypatch):
    """2,000 layers with boundary tensors up to 400 KB and a capacity that binds (the benchmark's
    kind): min-time's bottleneck with the programme disabled (every feasibility test answered by
    the two-bound frontier search) equals the programme's, with and without overlapped transfers."""
    import random

    from cachefit.partition import search

    rng = random.Random(9)
    layers = [LayerRecord(f"l{i}", rng.randint(200_000, 1_000_000), rng.randint(8_000, 64_000),
                          in_bytes=rng.randint(0, 400_000), out_bytes=rng.randint(0, 400_000),
                          params={"tied": 3_000_000} if i in (0, 1999) else {})
              for i in range(2000)]
    cost = FootprintCost(layers)
    assert not cost.monotone
    capacity = 12_000_000
    for model in (RooflineCostModel(7e12, 3.35e12, 989e12, 900e9, 2e-6),
                  RooflineCostModel(7e12, 3.35e12, 989e12, 50e9, 2e-6, overlap_transfers=True)):
        ref = solve(cost, capacity, "min-time", 300, time=StageTime(layers, model), force_dp=True)
        with monkeypatch.context() as m:
            def refuse(*args, **kwargs):
                raise AssertionError("the dynamic programme ran")

            m.setattr(search, "_dp_fewest", refuse)
            got = solve(cost, capacity, "min-time", 300, time=StageTime(layers, model))
        assert got.value == ref.value and got.minimum == ref.minimum
        assert all(cost.cost(a, b) <= capacity for a, b in got.groups)
        time = StageTime(layers, model)
        assert max(time.cost(a, b) for a, b in got.groups) == got.value
