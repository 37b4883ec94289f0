"""Partitioners on hand-made instances: edge cases, errors, diagnosis, layouts and the plan report."""

from __future__ import annotations

import json

import pytest

from cachefit.errors import PlanError
from cachefit.partition import (
    DeviceCountError,
    FootprintCost,
    LayerRecord,
    Layout,
    OversizedLayerError,
    RooflineCostModel,
    diagnose,
    group_footprint,
    make_plan,
    parse_layout,
    partition,
    resolve_layout,
)
from cachefit.perf.hardware import PRESETS


def uniform(n, w=100, act=40, buf=10, io=20, **kw):
    return [
        LayerRecord(f"layers.{i}", w, act, buf, in_bytes=io, out_bytes=io, flops=10_000, **kw)
        for i in range(n)
    ]


# ---------------------------------------------------------------- plain integer sizes
def test_partition_greedy_is_seed_accumulation():
    """greedy closes a group when the next layer would overflow it."""
    assert partition([5, 3, 8, 2, 7, 1, 4], 12, "greedy") == [(0, 1), (2, 3), (4, 6)]


def test_partition_balanced_uses_the_given_devices():
    """balanced with k devices returns k groups minimising the largest sum."""
    groups = partition([1] * 16, 100, devices=4)
    assert groups == [(0, 3), (4, 7), (8, 11), (12, 15)]
    sizes = [7, 2, 2, 2, 2, 2, 7]
    for strategy in ("balanced", "balanced-reference"):
        groups = partition(sizes, 100, strategy, devices=3)
        assert len(groups) == 3
        assert max(sum(sizes[a:b + 1]) for a, b in groups) == 9  # 7+2 | 2+2+2 | 2+7


def test_partition_default_devices_is_greedy_minimum():
    """Without --devices, balanced uses as many groups as greedy and balances them."""
    sizes = [9, 1, 1, 1, 1, 1, 1, 9]
    assert partition(sizes, 11, "greedy") == [(0, 2), (3, 6), (7, 7)]
    assert partition(sizes, 11) == [(0, 0), (1, 6), (7, 7)]  # largest group 9, not 11


def test_partition_edge_cases():
    assert partition([], 10) == []
    assert partition([7], 7) == [(0, 0)]
    assert partition([0, 0, 0], 0, "greedy") == [(0, 2)]
    assert partition([0, 0, 0], 0, devices=3) == [(0, 0), (1, 1), (2, 2)]
    assert partition([4, 4, 4, 4], 8) == [(0, 1), (2, 3)]
    # k > n: one layer per group, never an empty group
    assert partition([3, 1, 2], 10, devices=7) == [(0, 0), (1, 1), (2, 2)]


def test_partition_errors_name_the_numbers():
    with pytest.raises(PlanError, match=r"capacity of 10 bytes alone: layer 1 \(50 bytes\)"):
        partition([5, 50, 5], 10)
    with pytest.raises(PlanError, match="exceed the capacity"):
        partition([5, 6], 4, "greedy")  # C below every layer
    with pytest.raises(DeviceCountError, match="at least 3 devices") as err:
        partition([5, 5, 5], 5, devices=2)
    assert err.value.minimum == 3 and err.value.requested == 2
    with pytest.raises(PlanError, match="unknown strategy"):
        partition([1], 1, "min-time")
    with pytest.raises(PlanError, match="negative"):
        partition([1, -1], 1)


def test_tie_break_early_and_late():
    """Six equal layers into four groups: the largest holds two layers either way; `early` puts
    the pairs first, `late` last (the mirror image). An unknown rule is refused."""
    assert partition([1] * 6, 100, devices=4) == [(0, 1), (2, 3), (4, 4), (5, 5)]
    assert partition([1] * 6, 100, devices=4, tie_break="late") == [(0, 0), (1, 1), (2, 3), (4, 5)]
    with pytest.raises(PlanError, match="unknown tie_break 'middle': use one of early, late"):
        partition([1], 1, tie_break="middle")


def test_seed_dp_without_group_count_degenerates():
    """The seed's DP has no k: minimising the largest group alone gives one layer per group,
    whose bottleneck is the largest layer; given k it balances instead."""
    sizes = [3, 1, 4, 1, 5, 9, 2, 6]
    one_per_layer = partition(sizes, 100, "balanced-reference", devices=len(sizes))
    assert one_per_layer == [(i, i) for i in range(len(sizes))]
    two = partition(sizes, 100, "balanced-reference", devices=2)
    assert max(sum(sizes[a:b + 1]) for a, b in two) == 17


# ---------------------------------------------------------------- footprints
def test_exact_footprint_components():
    """Shared weight counted once, peak (not sum) of working sets, boundaries of the group."""
    emb = LayerRecord("embed", 1000, 30, 5, in_bytes=8, out_bytes=64, params={"wte": 1000})
    mid = LayerRecord("layers.0", 400, 50, 20, in_bytes=64, out_bytes=64, params={"w0": 300})
    head = LayerRecord("head", 1000, 40, 0, in_bytes=64, out_bytes=16, params={"wte": 1000})
    fp = group_footprint([emb, mid, head])
    assert fp.weight_bytes == 1000 + 300 + 100  # wte once, w0, mid's 100 unitemised bytes
    assert (fp.activation_bytes, fp.buffer_bytes) == (50, 20)
    assert fp.total_bytes == 1400 + 70 + 8 + 16
    assert group_footprint([emb, mid, head], "sum").total_bytes == 1035 + 470 + 1040
    cost = FootprintCost([emb, mid, head])
    assert cost.cost(0, 3) == fp.total_bytes
    assert cost.cost(1, 2) == 400 + 70 + 64 + 64


def test_footprint_of_long_groups():
    """Groups longer than the range-maximum table's rows (1,024 layers) are answered by blocks:
    the same footprint as computed directly, shared parameters included."""
    import random

    rng = random.Random(1)
    n = 5000
    layers = [LayerRecord(f"l{i}", rng.randint(0, 100), rng.randint(0, 10**6), rng.randint(0, 9), rng.randint(0, 50),
                          rng.randint(0, 50), params={"tied": 7} if i in (3, 4000) else {}) for i in range(n)]
    cost = FootprintCost(layers)
    groups = [(0, n), (3, 4001), (4, 4001), (3, 4000)] + [
        (a, rng.randint(a + 1, n)) for a in (rng.randint(0, n - 1) for _ in range(100))]
    for a, b in groups:
        assert cost.cost(a, b) == group_footprint(layers[a:b]).total_bytes, (a, b)


def test_inconsistent_shared_parameter_refused():
    a = LayerRecord("a", 10, 0, params={"w": 10})
    b = LayerRecord("b", 12, 0, params={"w": 12})
    with pytest.raises(PlanError, match="'w' is recorded as 10 bytes in layer 'a' and 12 bytes in layer 'b'"):
        FootprintCost([a, b])


def test_non_monotone_footprint_greedy_accumulation_would_be_suboptimal():
    """Cutting after b pays for its 50-byte output on both sides; keeping a, b, c together does
    not. The seed's accumulation stops at [a] (a+b is over) and needs two devices; the exact
    search finds that all three fit together."""
    layers = [
        LayerRecord("a", 10, 10, 0, in_bytes=0, out_bytes=0),
        LayerRecord("b", 10, 10, 0, in_bytes=0, out_bytes=50),
        LayerRecord("c", 10, 10, 0, in_bytes=50, out_bytes=0),
    ]
    cost = FootprintCost(layers)
    assert not cost.monotone
    assert cost.cost(0, 1) == 20 and cost.cost(0, 2) == 80 and cost.cost(0, 3) == 40
    plan = make_plan(layers, 60, "greedy")
    assert plan.groups == [(0, 2)]
    assert any("not monotone" in n for n in plan.notes)
    # b alone (70) is over 60 but it fits with a neighbour: not oversized.
    plan = make_plan(layers, 60, devices=2)
    assert plan.groups == [(0, 0), (1, 2)] and plan.bottleneck_value == 30  # [a]=20, [b,c]=30


def test_no_partition_although_every_layer_fits_somewhere():
    """a fits only in [a, b], c only in [b, c], and [a, b, c] is over: every layer is
    placeable, no partition exists, and the error says so (not an oversized layer)."""
    layers = [
        LayerRecord("a", 50, 0, out_bytes=60),
        LayerRecord("b", 10, 0),
        LayerRecord("c", 50, 0, in_bytes=60),
    ]
    cost = FootprintCost(layers)
    assert [cost.cost(0, 1), cost.cost(1, 2), cost.cost(2, 3)] == [110, 10, 110]
    assert [cost.cost(0, 2), cost.cost(1, 3), cost.cost(0, 3)] == [60, 60, 110]
    with pytest.raises(PlanError, match=r"no partition of layers 0 \('a'\) .. 2 \('c'\)") as err:
        make_plan(layers, 100)
    assert not isinstance(err.value, OversizedLayerError)
    assert make_plan(layers, 110, "greedy").groups == [(0, 2)]


# ---------------------------------------------------------------- oversized layers
def test_diagnose_fixes_from_components():
    layer = LayerRecord("big", 80, 30, 10, in_bytes=5, out_bytes=5, weight_bits=32, batch=4)
    d = diagnose(layer, 100, index=3)
    assert (d.index, d.name, d.footprint.total_bytes, d.excess_bytes) == (3, "big", 130, 30)
    fixes = {f.kind: f for f in d.fixes}
    assert (fixes["int8"].bytes_after, fixes["int8"].fits) == (70, True)
    assert (fixes["int4"].bytes_after, fixes["int4"].fits) == (60, True)
    assert fixes["prune"].value == 0.375 and fixes["prune"].bytes_after == 100 and fixes["prune"].fits
    assert (fixes["micro-batch"].value, fixes["micro-batch"].bytes_after) == (1, 93)
    assert (fixes["split"].value, fixes["split"].bytes_after, fixes["split"].fits) == (2, 70, True)
    text = d.describe()
    assert "130 B" in text and "capacity 100 B" in text and "INT8" in text
    json.dumps(d.to_dict())


def test_diagnose_when_nothing_single_helps():
    layer = LayerRecord("huge", 1000, 500, 0, in_bytes=200, out_bytes=200, weight_bits=8, batch=1)
    d = diagnose(layer, 300)
    fixes = {f.kind: f for f in d.fixes}
    assert "int8" not in fixes  # already 8-bit weights
    assert fixes["int4"].bytes_after == 500 + 500 + 400 and not fixes["int4"].fits
    assert not fixes["micro-batch"].fits  # weights alone exceed the capacity
    assert not fixes["prune"].fits  # activations and boundaries alone are 900
    assert fixes["split"].fits is False and fixes["split"].value == 0  # boundaries 400 > 300


def test_oversized_layer_error_and_spill():
    layers = uniform(4)
    layers[2] = LayerRecord("layers.2", 900, 40, 10, in_bytes=20, out_bytes=20, batch=2)
    with pytest.raises(OversizedLayerError, match=r"layer 2 \('layers.2'\) needs 990 B alone") as err:
        make_plan(layers, 400)
    assert [o.index for o in err.value.oversized] == [2]
    assert "--allow-spill" in str(err.value)
    plan = make_plan(layers, 400, allow_spill=True, devices=3)
    assert plan.groups == [(0, 1), (2, 2), (3, 3)]
    spill = plan.stages[1]
    assert spill.spilling and not spill.resident
    assert spill.resident_fraction == pytest.approx(400 / 990)
    assert plan.stages[0].resident and plan.bottleneck == 0
    assert [o.index for o in plan.oversized] == [2]
    with pytest.raises(DeviceCountError, match="1 of them for spilling layers") as derr:
        make_plan(layers, 400, allow_spill=True, devices=2)
    assert derr.value.minimum == 3


def test_capacity_below_every_layer():
    layers = uniform(3)
    with pytest.raises(OversizedLayerError) as err:
        make_plan(layers, 10)
    assert [o.index for o in err.value.oversized] == [0, 1, 2]
    plan = make_plan(layers, 10, allow_spill=True)
    assert plan.groups == [(0, 0), (1, 1), (2, 2)] and all(s.spilling for s in plan.stages)


# ---------------------------------------------------------------- devices
def test_more_devices_than_layers_leaves_idle_devices():
    plan = make_plan(uniform(3), 10_000, devices=5)
    assert plan.groups == [(0, 0), (1, 1), (2, 2)]
    assert plan.idle_devices == [3, 4]
    assert any("fewer layers than devices" in n for n in plan.notes)


def test_greedy_with_spare_devices_reports_them_idle():
    plan = make_plan(uniform(6), 10_000, "greedy", devices=4)
    assert plan.devices_used == 1 and plan.idle_devices == [1, 2, 3]


def test_too_few_devices_names_the_minimum():
    with pytest.raises(DeviceCountError, match="at least 3 devices") as err:
        make_plan(uniform(6), 300, devices=2)  # 2 layers per 300-byte device at most
    assert err.value.minimum == 3


def test_n1_and_equal_layers_and_zero_bytes():
    assert make_plan(uniform(1), 190).groups == [(0, 0)]
    plan = make_plan(uniform(8), 10_000, devices=4)
    assert plan.groups == [(0, 1), (2, 3), (4, 5), (6, 7)]
    zeros = [LayerRecord(f"z{i}", 0, 0) for i in range(5)]
    plan = make_plan(zeros, 0, devices=2)
    assert plan.groups == [(0, 3), (4, 4)] and plan.bottleneck_value == 0
    assert all(s.utilisation == 0.0 for s in plan.stages)


# ---------------------------------------------------------------- min-time
def test_min_time_balances_time_not_bytes():
    """Heavy-compute layers get stages of their own even though their bytes are small."""
    layers = [LayerRecord(f"l{i}", 100, 10, flops=f) for i, f in enumerate([10**6, 10**6, 10, 10, 10, 10])]
    model = RooflineCostModel(onchip_bw=1e9, offchip_bw=1e8, peak_flops=1e9)
    by_time = make_plan(layers, 10_000, "min-time", devices=3, cost_model=model)
    assert by_time.groups == [(0, 0), (1, 1), (2, 5)]
    assert by_time.objective == "time" and by_time.bottleneck_value == pytest.approx(1e-3)
    by_bytes = make_plan(layers, 10_000, "balanced", devices=3)
    assert by_bytes.groups == [(0, 1), (2, 3), (4, 5)]


def test_min_time_counts_spilling_and_transfer():
    layers = uniform(3, w=100)
    layers[1] = LayerRecord("layers.1", 1000, 40, 10, in_bytes=20, out_bytes=20, bytes_moved=1000)
    model = RooflineCostModel(onchip_bw=100.0, offchip_bw=10.0, peak_flops=1e12, link_bw=10.0, link_latency=1.0)
    plan = make_plan(layers, 300, "min-time", allow_spill=True, cost_model=model)
    spill = plan.stages[1]
    assert spill.spilling
    assert spill.predicted_time == pytest.approx(1000 / 10.0 + 1.0 + 20 / 10.0)
    assert plan.bottleneck == 1
    assert plan.cuts[0].transfer_time == pytest.approx(1.0 + 2.0)


def test_min_time_overlapped_transfers_change_the_optimum():
    """Four layers of 1 s (1 FLOP at 1 FLOP/s); the inputs of layers 1 and 2 take 2 s to arrive
    (2 bytes at 1 B/s), layer 3's nothing, layer 0's nothing. Two devices.
    Added transfers: [0][1 2 3] 5 s, [0 1][2 3] 4 s, [0 1 2][3] 3 s: the last is optimal.
    Overlapped (a stage takes max(layers, transfer)): 3 s, 2 s, 3 s: the middle one."""
    layers = [LayerRecord(f"l{i}", 1, 1, in_bytes=b, flops=1, bytes_moved=1) for i, b in enumerate([0, 2, 2, 0])]
    added = RooflineCostModel(onchip_bw=1e9, offchip_bw=1e9, peak_flops=1.0, link_bw=1.0)
    hidden = RooflineCostModel(onchip_bw=1e9, offchip_bw=1e9, peak_flops=1.0, link_bw=1.0, overlap_transfers=True)
    plan = make_plan(layers, 10_000, "min-time", devices=2, cost_model=added)
    assert plan.groups == [(0, 2), (3, 3)] and plan.bottleneck_value == pytest.approx(3.0)
    plan = make_plan(layers, 10_000, "min-time", devices=2, cost_model=hidden)
    assert plan.groups == [(0, 1), (2, 3)] and plan.bottleneck_value == pytest.approx(2.0)
    assert [s.predicted_time for s in plan.stages] == pytest.approx([2.0, 2.0])
    assert [s.transfer_time for s in plan.stages] == pytest.approx([0.0, 2.0])
    # tie_break late: the same optimum from the mirrored search (the transfer gates the stage ends there)
    late = make_plan(layers, 10_000, "min-time", devices=2, cost_model=hidden, tie_break="late")
    assert late.bottleneck_value == pytest.approx(2.0)


def test_stage_time_with_overlap_is_a_gated_cost():
    """StageTime with overlap_transfers: cost = max(layers, transfer), the transfer a gate; its view at
    a bound refuses exactly the stage starts whose transfer exceeds the bound."""
    from cachefit.partition import StageTime

    layers = [LayerRecord(f"l{i}", 1, 1, in_bytes=b, flops=1, bytes_moved=1) for i, b in enumerate([0, 5, 2, 0])]
    model = RooflineCostModel(onchip_bw=1e9, offchip_bw=1e9, peak_flops=1.0, link_bw=1.0, overlap_transfers=True)
    t = StageTime(layers, model)
    assert t.gated and t.cost(1, 2) == pytest.approx(5.0) and t.cost(1, 4) == pytest.approx(5.0)
    assert t.cost(0, 4) == pytest.approx(4.0) and t.spill_time(1) == pytest.approx(5.0)
    assert not t.monotone  # [1, 2) costs 5 s, [0, 2) only 2 s
    view = t.at_bound(3.0)
    for a in range(4):
        for b in range(a + 1, 5):
            assert (view.cost(a, b) <= 3.0) == (t.cost(a, b) <= 3.0), (a, b)
    assert t.next_gate(3.0) == pytest.approx(5.0) and t.next_gate(5.0) == float("inf")


def test_roofline_from_hardware():
    m = RooflineCostModel.from_hardware(PRESETS["h100"], "bfloat16")
    assert m.peak_flops == 989e12 and m.onchip_bw == 7.0e12
    layer = LayerRecord("l", 10**6, 0, flops=2 * 10**9)
    assert m.layer_time(layer, True) == pytest.approx(max(2e9 / 989e12, 1e6 / 7e12))
    assert m.layer_time(layer, False) >= m.layer_time(layer, True)
    assert m.transfer_time(0) == 0.0 and m.transfer_time(900) == pytest.approx(2e-6 + 1e-9)


# ---------------------------------------------------------------- layouts
def test_parse_layout_forms():
    assert parse_layout("4,4,4,4") == Layout(counts=(4, 4, 4, 4))
    assert parse_layout(" layers.3 , layers.7") == Layout(starts=("layers.3", "layers.7"))
    assert parse_layout([2, 2]) == Layout(counts=(2, 2))
    for bad in ("", "4,,4", "4,0,4"):
        with pytest.raises(PlanError):
            parse_layout(bad)


def test_resolve_layout_by_counts_and_names():
    layers = uniform(8)
    assert resolve_layout(parse_layout("3,3,2"), layers) == [(0, 2), (3, 5), (6, 7)]
    assert resolve_layout(parse_layout("layers.3,layers.6"), layers) == [(0, 2), (3, 5), (6, 7)]
    assert resolve_layout(parse_layout("layers.0,layers.4"), layers) == [(0, 3), (4, 7)]
    with pytest.raises(PlanError, match="places 7 layers but the model has 8.*3,3,2"):
        resolve_layout(parse_layout("3,3,1"), layers)
    with pytest.raises(PlanError, match="does not have"):
        resolve_layout(parse_layout("layers.3,layers.99"), layers)
    with pytest.raises(PlanError, match="model order"):
        resolve_layout(parse_layout("layers.5,layers.2"), layers)


def test_layout_plan_validated_against_capacity():
    layers = uniform(8)  # one layer: 100 + 50 + 20 + 20 = 190; two: 200 + 50 + 40 = 290
    plan = make_plan(layers, 300, layout="2,2,2,2")
    assert plan.strategy == "layout" and plan.groups == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert plan.layout == "2,2,2,2" and plan.min_devices is None
    with pytest.raises(PlanError) as err:
        make_plan(layers, 300, layout="3,1,4")
    msg = str(err.value)
    assert "stage 0: layers 'layers.0' .. 'layers.2' (3 layers) need 390 B" in msg
    assert "stage 2" in msg and "stage 1" not in msg
    with pytest.raises(PlanError, match="4 stages but only 3 devices"):
        make_plan(layers, 300, layout="2,2,2,2", devices=3)
    idle = make_plan(layers, 300, layout="2,2,2,2", devices=6)
    assert idle.idle_devices == [4, 5]


def test_layout_single_oversized_stage_needs_allow_spill():
    layers = uniform(3)
    with pytest.raises(PlanError, match="does not fit alone"):
        make_plan(layers, 150, layout="1,1,1")
    with pytest.raises(PlanError, match="3 layers"):
        make_plan(layers, 150, layout="3", allow_spill=True)  # only single layers may spill
    plan = make_plan(layers, 150, layout="1,1,1", allow_spill=True)
    assert all(s.spilling for s in plan.stages) and len(plan.oversized) == 3


# ---------------------------------------------------------------- report
def test_plan_report_fields_and_json():
    layers = uniform(6)
    model = RooflineCostModel(onchip_bw=1e9, offchip_bw=1e8, peak_flops=1e9, link_bw=1e9)
    plan = make_plan(layers, 400, "balanced", devices=4, cost_model=model)
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["strategy"] == "balanced" and d["footprint"] == "exact"
    assert d["groups"] == [[a, b] for a, b in plan.groups] and d["devices_used"] == 4
    assert d["min_devices"] == 2 and d["idle_devices"] == []
    stage = d["stages"][0]
    for key in ("weight_bytes", "activation_bytes", "buffer_bytes", "in_bytes", "out_bytes", "total_bytes",
                "utilisation", "resident", "resident_fraction", "spilling", "predicted_time", "layer_names"):
        assert key in stage
    assert len(d["cuts"]) == 3 and all(c["bytes"] == 20 for c in d["cuts"])
    assert d["stages"][d["bottleneck_stage"]]["total_bytes"] == d["bottleneck_value"]
    assert stage["utilisation"] == pytest.approx(stage["total_bytes"] / 400)
    text = plan.format_table()
    assert "bottleneck: stage" in text and "layers.0 .. layers.1" in text and "cuts:" in text


def test_sum_footprint_is_additive():
    layers = uniform(4)
    plan = make_plan(layers, 10_000, devices=2, footprint="sum")
    assert [s.total_bytes for s in plan.stages] == [300, 300]
    with pytest.raises(PlanError, match="unknown footprint mode"):
        make_plan(layers, 10_000, footprint="max")


def test_spread_falls_back_to_exact_count_when_splitting_gets_stuck():
    """Non-monotone footprint, bound 33: the fewest groups are [0,3) [3,5); splitting them
    reaches 3 groups, but 4 exist ([0,1) [1,2) [2,4) [4,5)); balanced must find them."""
    from cachefit.partition.search import Segment, _split_to, fewest_groups, spread

    spec = [(3, 0, 12), (4, 16, 5), (7, 10, 19), (8, 0, 3), (1, 9, 19)]  # weights, in, out
    layers = [LayerRecord(f"l{i}", w, 0, in_bytes=a, out_bytes=b) for i, (w, a, b) in enumerate(spec)]
    cost = FootprintCost(layers)
    bound = [(cost, 33)]
    base = fewest_groups(bound, [Segment(0, 5)], force_dp=True).groups
    assert base == [(0, 3), (3, 5)]
    assert len(_split_to(bound, base, 5)) == 3
    groups = spread(bound, [Segment(0, 5)], 5)
    assert groups == [(0, 1), (1, 2), (2, 4), (4, 5)]
    assert all(cost.cost(a, b) <= 33 for a, b in groups)
    # Through make_plan: 5 devices, 4 usable without raising the bottleneck (29), one idle.
    plan = make_plan(layers, 33, devices=5)
    assert plan.groups == [(0, 0), (1, 1), (2, 3), (4, 4)] and plan.bottleneck_value == 29
    assert plan.idle_devices == [4]


def test_min_time_refuses_a_cost_model_with_negative_times():
    class Broken:
        def layer_time(self, layer, resident):
            return -1.0

        def transfer_time(self, nbytes):
            return 0.0

    with pytest.raises(PlanError, match="layer_time returned a negative"):
        make_plan(uniform(2), 10_000, "min-time", cost_model=Broken())
