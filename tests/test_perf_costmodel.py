"""The cost model on hand-computed cases: one matmul layer, a two-stage plan, a TP all-reduce."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit.errors import CachefitError, PlanError
from cachefit.partition.records import LayerRecord
from cachefit.perf.baselines import (
    Baseline,
    default_allreduces,
    estimate_tensor_pipeline,
    even_groups,
    parse_baselines,
    shard_layer,
)
from cachefit.perf.costmodel import CostModel, estimate_pipeline, rebatch, stage_footprint
from cachefit.perf.hardware import Hardware

# A toy device with round numbers: 1 GFLOP/s, 1 GB/s on chip, 0.1 GB/s off chip, 1 MB on chip,
# a 10 MB/s link with 1 ms latency.
TOY = Hardware(
    name="toy", onchip_bytes=1_000_000, onchip_bw=1e9, offchip_bw=1e8,
    peak_flops={"float32": 1e9}, link_bw=1e7, link_latency=1e-3,
)


def matmul_layer(m=8, k=256, n=256, name="layers.0") -> LayerRecord:
    """x[m,k] @ W[k,n] in float32: FLOPs 2mkn, weights 4kn, traffic = weights + x + y."""
    w, x, y = 4 * k * n, 4 * m * k, 4 * m * n
    return LayerRecord(name=name, weight_bytes=w, activation_bytes=x + y, in_bytes=x, out_bytes=y,
                       params={f"{name}.w": w}, flops=2 * m * k * n, bytes_moved=w + x + y,
                       weight_bits=32, batch=m)


def test_single_matmul_resident_is_compute_bound():
    """A resident 8x256x256 matmul: 1,048,576 FLOPs at 1 GFLOP/s = 1.048576 ms; its 278,528 bytes at
    1 GB/s take 0.278528 ms, so compute bounds it."""
    layer = matmul_layer()
    model = CostModel(TOY)
    cost = model.layer_cost(layer, resident=True)
    assert cost.compute_s == pytest.approx(1_048_576 / 1e9)
    assert cost.memory_s == pytest.approx(278_528 / 1e9)
    assert cost.bound == "compute"
    assert model.layer_time(layer, True) == pytest.approx(1.048576e-3)


def test_single_matmul_spilling_reads_weights_off_chip():
    """Capacity 100 kB < the 278,528-byte footprint: the 262,144 weight bytes stream at 0.1 GB/s
    (2.62144 ms) while the 16,384 activation bytes (working set within capacity) stay at 1 GB/s
    (0.016384 ms): 2.637824 ms, memory-bound. The stage also receives its 8,192-byte input (the
    model input, from the host): 1 ms + 8,192 / 1e7 s = 1.8192 ms, 4.457024 ms in all."""
    small = Hardware(**{**TOY.to_dict(), "onchip_bytes": 100_000})
    model = CostModel(small)
    layer = matmul_layer()
    est = estimate_pipeline([layer], [(0, 0)], model, tokens_per_microbatch=8)
    stage = est.stages[0]
    assert not stage.resident
    assert stage.footprint.total_bytes == 262_144 + 16_384 + 8_192 + 8_192
    assert stage.resident_fraction == pytest.approx(100_000 / 294_912)
    assert stage.time_s == pytest.approx(262_144 / 1e8 + 16_384 / 1e9 + 1.8192e-3)
    assert stage.bound == "memory"
    assert stage.transfer_s == pytest.approx(1e-3 + 8_192 / 1e7)  # the first stage receives the input too
    assert est.tokens_per_s == pytest.approx(8 / stage.time_s)


def test_two_stage_plan_by_hand():
    """Two resident matmul layers on two devices. Each stage: 1.048576 ms + its 8,192-byte input
    over the link (stage 0: the model input from the host; stage 1: the boundary tensor):
    1 ms + 8,192 / 1e7 s = 1.8192 ms -> 2.867776 ms.
    Bottleneck 2.867776 ms (both stages); 8 tokens per micro-batch -> 8 / 2.867776 ms tokens/s; with
    two micro-batches in flight TPOT = max(sum, 2 x bottleneck) = 5.735552 ms."""
    layers = [matmul_layer(name="layers.0"), matmul_layer(name="layers.1")]
    est = estimate_pipeline(layers, [(0, 0), (1, 1)], CostModel(TOY), tokens_per_microbatch=8)
    s0, s1 = est.stages
    assert s0.transfer_s == s1.transfer_s == pytest.approx(1e-3 + 8_192 / 1e7)
    assert s0.time_s == s1.time_s == pytest.approx(2.867776e-3)
    assert est.bottleneck_s == pytest.approx(2.867776e-3)
    assert est.latency_s == pytest.approx(2 * 2.867776e-3)
    assert est.tpot_s == pytest.approx(2 * 2.867776e-3)
    assert est.tokens_per_s == pytest.approx(8 / 2.867776e-3)
    assert est.resident_stages == 2


def test_one_micro_batch_in_flight_waits_for_the_whole_pipeline():
    """With a single micro-batch in flight nothing overlaps: throughput = tokens / latency."""
    layers = [matmul_layer(name="layers.0"), matmul_layer(name="layers.1")]
    est = estimate_pipeline(layers, [(0, 0), (1, 1)], CostModel(TOY), tokens_per_microbatch=8,
                            microbatches_in_flight=1)
    assert est.tpot_s == pytest.approx(est.latency_s)
    assert est.tokens_per_s == pytest.approx(8 / est.latency_s)


def test_overlapped_transfer_hides_behind_compute():
    layers = [matmul_layer(name="layers.0"), matmul_layer(name="layers.1")]
    est = estimate_pipeline(layers, [(0, 0), (1, 1)], CostModel(TOY, overlap_transfers=True),
                            tokens_per_microbatch=8)
    assert est.stages[1].time_s == pytest.approx(max(1.048576e-3, 1.8192e-3))


def test_ring_allreduce_by_hand():
    """Ring all-reduce of 1 MB over 4 devices: 2(4-1) = 6 steps of 1 ms latency plus
    2 x 3/4 x 1e6 B / 1e7 B/s = 0.15 s: 0.156 s. One device: free."""
    model = CostModel(TOY)
    assert model.allreduce_time(1_000_000, 4) == pytest.approx(6e-3 + 0.15)
    assert model.allreduce_time(1_000_000, 1) == 0.0
    assert model.allreduce_time(0, 8) == 0.0


def test_tensor_parallel_stage_by_hand():
    """tp=2, pp=1 on one 8x256x256 matmul block: each device does half the FLOPs (0.524288 ms),
    holds half the weights, and pays two all-reduces of the 8,192-byte output:
    2 x (2 x 1 ms + 2 x 1/2 x 8,192 / 1e7 s) = 2 x 2.8192 ms = 5.6384 ms."""
    layer = matmul_layer()
    est = estimate_tensor_pipeline([layer], CostModel(TOY), tp=2, pp=1, tokens_per_microbatch=8)
    (stage,) = est.stages
    assert est.devices == 2 and stage.tp == 2
    assert stage.compute_s == pytest.approx(524_288 / 1e9)
    assert stage.footprint.weight_bytes == 131_072
    assert stage.comm_s == pytest.approx(2 * (2e-3 + 8_192 / 1e7))
    # per device traffic: half the weights, half the activations, + the 2 all-reduced tensors read & written
    shard = shard_layer(layer, 2, 2)
    assert shard.bytes_moved == 131_072 + 16_384 // 2 + 2 * 2 * 8_192
    assert stage.time_s == pytest.approx(524_288 / 1e9 + 5.6384e-3 + 1.8192e-3)  # + its input transfer
    assert est.tokens_per_s == pytest.approx(8 / stage.time_s)


def test_tp_pp_splits_layers_evenly_and_transfers_between_stages():
    layers = [matmul_layer(name=f"layers.{i}") for i in range(4)]
    est = estimate_tensor_pipeline(layers, CostModel(TOY), tp=2, pp=2, tokens_per_microbatch=8)
    assert [(s.first_layer, s.last_layer) for s in est.stages] == [(0, 1), (2, 3)]
    assert est.devices == 4
    assert est.stages[0].transfer_s == est.stages[1].transfer_s == pytest.approx(1e-3 + 8_192 / 1e7)
    assert est.stages[0].comm_s == pytest.approx(2 * 2 * (2e-3 + 8_192 / 1e7))


def test_even_pipeline_baseline_equals_the_plan_with_the_same_groups():
    layers = [matmul_layer(name=f"layers.{i}") for i in range(5)]
    model = CostModel(TOY)
    base = estimate_tensor_pipeline(layers, model, tp=1, pp=2, tokens_per_microbatch=8)
    plan = estimate_pipeline(layers, [(0, 2), (3, 4)], model, tokens_per_microbatch=8)
    assert base.name == "pp2"
    assert base.stage_times == pytest.approx(plan.stage_times)


def test_allreduce_counts_by_layer_kind():
    assert default_allreduces(matmul_layer(name="layers.3")) == 2
    assert default_allreduces(matmul_layer(name="embed")) == 1
    assert default_allreduces(matmul_layer(name="head")) == 1
    assert default_allreduces(LayerRecord(name="cut_2", weight_bytes=0, activation_bytes=10)) == 0


def test_parse_baselines():
    assert parse_baselines("tp8pp2, pp16,tp16") == [Baseline(8, 2), Baseline(1, 16), Baseline(16, 1)]
    assert [b.name for b in parse_baselines("tp8pp2,pp16,tp16")] == ["tp8pp2", "pp16", "tp16pp1"]
    with pytest.raises(CachefitError, match="unknown baseline 'dp4'"):
        parse_baselines("tp8pp2,dp4")


def test_even_groups():
    assert even_groups(5, 2) == [(0, 2), (3, 4)]
    assert even_groups(16, 16) == [(i, i) for i in range(16)]
    with pytest.raises(CachefitError, match="at least 4 layers"):
        even_groups(3, 4)


def test_footprint_counts_shared_weights_once_and_peaks_working_sets():
    a = LayerRecord("embed", weight_bytes=100, activation_bytes=30, buffer_bytes=5, in_bytes=4, out_bytes=7,
                    params={"tied": 100})
    b = LayerRecord("head", weight_bytes=150, activation_bytes=20, buffer_bytes=1, in_bytes=7, out_bytes=9,
                    params={"tied": 100, "norm": 50})
    fp = stage_footprint([a, b])
    assert (fp.weight_bytes, fp.working_set_bytes, fp.boundary_bytes) == (150, 35, 4 + 9)


def test_bad_groups_are_refused():
    layers = [matmul_layer(name=f"layers.{i}") for i in range(3)]
    with pytest.raises(PlanError, match="contiguous"):
        estimate_pipeline(layers, [(0, 0), (2, 2)], CostModel(TOY), tokens_per_microbatch=1)
    with pytest.raises(PlanError, match="cover them all"):
        estimate_pipeline(layers, [(0, 1)], CostModel(TOY), tokens_per_microbatch=1)


def test_efficiency_out_of_range_is_refused():
    with pytest.raises(CachefitError, match="compute_efficiency"):
        CostModel(TOY, compute_efficiency=0.0)


def test_rebatch_scales_everything_but_weights():
    layer = matmul_layer(m=8)
    half = rebatch(layer, 4)
    direct = matmul_layer(m=4)
    for f in ("flops", "weight_bytes", "activation_bytes", "in_bytes", "out_bytes", "bytes_moved", "batch"):
        assert getattr(half, f) == getattr(direct, f), f


def test_dtype_from_weight_bits():
    hw = Hardware(name="g", onchip_bytes=1, onchip_bw=1, offchip_bw=1,
                  peak_flops={"float32": 1e9, "bfloat16": 4e9})
    layer16 = LayerRecord("l", weight_bytes=0, activation_bytes=0, flops=4_000, weight_bits=16)
    layer32 = LayerRecord("l", weight_bytes=0, activation_bytes=0, flops=4_000, weight_bits=32)
    model = CostModel(hw)
    assert model.layer_cost(layer16, True).compute_s == pytest.approx(1e-6)
    assert model.layer_cost(layer32, True).compute_s == pytest.approx(4e-6)
    assert CostModel(hw, dtype="bfloat16").layer_cost(layer32, True).compute_s == pytest.approx(1e-6)


layer_st = st.builds(
    matmul_layer,
    m=st.integers(1, 64), k=st.integers(1, 512), n=st.integers(1, 512),
)


@settings(max_examples=60, deadline=None)
@given(layer=layer_st, cap=st.integers(1, 3_000_000))
def test_residency_never_slows_a_layer(layer, cap):
    """Reading from on-chip memory (faster than off-chip) can never make a layer slower."""
    model = CostModel(Hardware(**{**TOY.to_dict(), "onchip_bytes": cap}))
    assert model.layer_time(layer, True) <= model.layer_time(layer, False)


@settings(max_examples=60, deadline=None)
@given(layers=st.lists(layer_st, min_size=2, max_size=6), k=st.integers(1, 6))
def test_throughput_is_tokens_over_bottleneck_and_tpot_at_least_latency(layers, k):
    k = min(k, len(layers))
    layers = [LayerRecord(**{**l.to_dict(), "name": f"layers.{i}"}) for i, l in enumerate(layers)]
    est = estimate_pipeline(layers, even_groups(len(layers), k), CostModel(TOY), tokens_per_microbatch=8)
    assert est.tokens_per_s == pytest.approx(8 / est.bottleneck_s)
    assert est.tpot_s >= est.latency_s * (1 - 1e-12)
    assert math.isclose(est.latency_s, sum(est.stage_times))


@settings(max_examples=40, deadline=None)
@given(layer=layer_st, tp=st.integers(2, 16))
def test_sharding_divides_compute_and_weights(layer, tp):
    shard = shard_layer(layer, tp, 2)
    assert shard.flops * tp >= layer.flops and (shard.flops - 1) * tp < layer.flops
    assert shard.weight_bytes * tp >= layer.weight_bytes and (shard.weight_bytes - 1) * tp < layer.weight_bytes


def test_overlapped_allreduce_hides_behind_the_layers():
    """With perfect overlap the tp=2 stage of the hand case takes max(0.524288 ms, 5.6384 ms), plus
    its input transfer (1.8192 ms, not overlapped)."""
    est = estimate_tensor_pipeline([matmul_layer()], CostModel(TOY, overlap_allreduce=True), tp=2, pp=1,
                                   tokens_per_microbatch=8)
    assert est.stages[0].time_s == pytest.approx(max(524_288 / 1e9, 5.6384e-3) + 1.8192e-3)


def test_memory_overlap_between_roofline_and_sum():
    """The spilling matmul of the hand case: compute 1.048576 ms, memory 2.637824 ms. overlap 1:
    max = 2.637824 ms; overlap 0: the sum 3.6864 ms; overlap 0.5: halfway."""
    layer = matmul_layer()
    for overlap, expect in ((1.0, 2.637824e-3), (0.0, 3.6864e-3), (0.5, 2.637824e-3 + 0.5 * 1.048576e-3)):
        hw = Hardware(**{**TOY.to_dict(), "onchip_bytes": 100_000, "memory_overlap": overlap})
        assert CostModel(hw).layer_time(layer, False) == pytest.approx(expect)


# --- the per-kernel model (a calibrated KernelTable and the layers' kernels) ------------------------

from cachefit.perf.costmodel import KernelProfile, KernelSpec  # noqa: E402
from cachefit.perf.hardware import KernelTable  # noqa: E402


def power_law_table() -> KernelTable:
    """Rates 1 GFLOP/s x sqrt(m) x n^(1/4) (k has no effect) on a 2 x 2 x 2 grid: log rate is linear
    in log m, log n, log k, so log-space interpolation reproduces the law exactly inside the grid."""
    ms, ns, ks = (4, 64), (16, 256), (16, 256)
    rates = tuple(1e9 * m ** 0.5 * n ** 0.25 for m in ms for n in ns for k in ks)
    return KernelTable(matmul_m=ms, matmul_n=ns, matmul_k=ks, matmul_flops_per_s=rates,
                       per_element={"elementwise": 1e-9, "norm": 4e-9}, fused_per_element={"elementwise": 0.5e-9},
                       per_kernel_s=1e-6)


def test_matmul_rate_interpolates_in_log_space():
    """Inside the grid: m=16, n=64 -> 1e9 x 4 x 64^(1/4) = 11.3137 GFLOP/s; between two rates on one
    axis the log-midpoint gets their geometric mean; outside the grid the nearest edge's rate."""
    t = power_law_table()
    assert t.matmul_rate(16, 64, 40) == pytest.approx(1e9 * 4 * 64 ** 0.25)
    assert t.matmul_rate(16, 16, 16) == pytest.approx(math.sqrt(t.matmul_rate(4, 16, 16) * t.matmul_rate(64, 16, 16)))
    assert t.matmul_rate(1, 16, 16) == pytest.approx(1e9 * 2 * 2)          # m clamped to 4
    assert t.matmul_rate(4096, 4096, 1) == pytest.approx(1e9 * 8 * 4)      # m to 64, n to 256
    # seconds: 2 m n k FLOPs at that rate, times the batch
    assert t.matmul_seconds(16, 64, 40, batch=3) == pytest.approx(3 * 2 * 16 * 64 * 40 / (1e9 * 4 * 64 ** 0.25))


def test_kernel_seconds_by_hand():
    """A batch of 2 matmuls 10x30x20 at a flat 1.2 GFLOP/s: 2 x 12,000 FLOPs = 20 us; a fused bias of
    400 elements at 0.5 ns = 0.2 us; one kernel call 1 us: 21.2 us. A 1,000-element norm kernel at
    4 ns per element: 4 us + 1 us."""
    flat = KernelTable(matmul_m=(1,), matmul_n=(1,), matmul_k=(1,), matmul_flops_per_s=(1.2e9,),
                       per_element={"norm": 4e-9}, fused_per_element={"elementwise": 0.5e-9}, per_kernel_s=1e-6)
    mm = KernelSpec("matmul", m=10, n=20, k=30, batch=2, fused=(("elementwise", 400),))
    assert mm.seconds(flat) == pytest.approx(21.2e-6)
    assert KernelSpec("norm", elements=1000).seconds(flat) == pytest.approx(5e-6)
    # a class the table lacks is timed as element-wise (0 here: the table has no element-wise rate)
    assert KernelSpec("softmax", elements=1000).seconds(flat) == pytest.approx(1e-6)
    with pytest.raises(CachefitError, match="unknown kernel class 'gemm'"):
        KernelSpec("gemm")


def kernel_layer(name="layers.0") -> tuple[LayerRecord, KernelProfile]:
    """The 8x256x256 matmul layer with its kernels: the matmul plus its fused bias, then a norm."""
    layer = matmul_layer(name=name)
    prof = KernelProfile(batch=8, kernels=(
        KernelSpec("matmul", m=8, n=256, k=256, fused=(("elementwise", 2048),)),
        KernelSpec("norm", elements=2048)))
    return layer, prof


def test_layer_compute_is_the_sum_of_its_kernels():
    """On TOY with a flat 2 GFLOP/s table: matmul 1,048,576 FLOPs = 524.288 us + bias 2,048 x 1 ns
    + 1 us call; norm 2,048 x 3 ns + 1 us: 534.432 us. Resident: the kernel times already hold the
    on-chip traffic, so the layer takes exactly that (no memory time on top)."""
    table = KernelTable(matmul_m=(1,), matmul_n=(1,), matmul_k=(1,), matmul_flops_per_s=(2e9,),
                        per_element={"norm": 3e-9}, fused_per_element={"elementwise": 1e-9}, per_kernel_s=1e-6)
    hw = Hardware(name="toy", onchip_bytes=1_000_000, onchip_bw=1e9, offchip_bw=1e8, peak_flops={"float32": 1e9},
                  link_bw=1e7, link_latency=1e-3, kernels=table, memory_overlap=0.5)
    layer, prof = kernel_layer()
    model = CostModel(hw, kernels={"layers.0": prof})
    expect = 1_048_576 / 2e9 + 2_048e-9 + 1e-6 + 2_048 * 3e-9 + 1e-6
    cost = model.layer_cost(layer, resident=True)
    assert cost.compute_s == pytest.approx(expect)
    assert cost.memory_s == 0.0 and cost.time_s == pytest.approx(expect)
    # spilling (1 MB capacity, but the stage is not resident): the 262,144 weight bytes come from
    # off chip at 0.1 GB/s = 2.62144 ms; the activations stay on chip (working set within capacity).
    # The kernels stall for (1 - overlap) of that stream, and the layer is never faster than it:
    # overlap 0.5: max(2.62144 ms, 0.534432 + 1.31072 ms) = 2.62144 ms; overlap 0: the sum.
    spill = model.layer_cost(layer, resident=False)
    m = 262_144 / 1e8
    assert spill.weight_s == pytest.approx(m) and spill.activation_s == 0.0
    assert spill.time_s == pytest.approx(m)
    hw0 = Hardware(**{**hw.__dict__, "memory_overlap": 0.0})
    assert CostModel(hw0, kernels={"layers.0": prof}).layer_time(layer, False) == pytest.approx(expect + m)
    # compute_efficiency divides the kernel sum as it divides the peak
    assert CostModel(hw, kernels={"layers.0": prof}, compute_efficiency=0.5).compute_time(layer) == pytest.approx(
        2 * expect)
    # a layer without kernels falls back to flops / peak (1 GFLOP/s): 1.048576 ms
    other = matmul_layer(name="layers.9")
    assert model.compute_time(other) == pytest.approx(1_048_576 / 1e9)


def test_without_a_kernel_table_the_model_is_flops_over_peak():
    """A datasheet preset (no table) ignores the kernels: the GPU path is unchanged."""
    layer, prof = kernel_layer()
    plain, with_kernels = CostModel(TOY), CostModel(TOY, kernels={"layers.0": prof})
    for resident in (True, False):
        assert with_kernels.layer_cost(layer, resident) == plain.layer_cost(layer, resident)
    assert with_kernels.layer_time(layer, True) == pytest.approx(1.048576e-3)


def test_kernel_profile_follows_the_micro_batch():
    """Counted at batch 2, timed at batch 4: a weight matmul gets twice the rows, a batched matmul
    twice the batch, element counts double (power-law table: rate at m=32 is sqrt(2) x rate at 16)."""
    t = power_law_table()
    weight_mm = KernelSpec("matmul", m=16, n=64, k=64, rows_in_m=True, fused=(("elementwise", 1024),))
    batched = KernelSpec("matmul", m=16, n=16, k=64, batch=8, rows_in_m=False)
    norm = KernelSpec("norm", elements=1024)
    prof = KernelProfile(batch=2, kernels=(weight_mm, batched, norm))
    expect = (t.matmul_seconds(32, 64, 64) + 2048 * 0.5e-9 + t.matmul_seconds(16, 16, 64, batch=16)
              + 2048 * 4e-9 + 3 * 1e-6)
    assert prof.seconds(t, 4) == pytest.approx(expect)
    assert prof.seconds(t) == pytest.approx(sum(k.seconds(t) for k in prof.kernels))
    assert KernelSpec.from_dict(weight_mm.to_dict()) == weight_mm


def test_layer_kernels_follow_the_fusion_of_the_pipeline():
    """matmul + bias + erf is one kernel (2 fused ops); a matmul through a transposed weight costs no
    transpose (a weight prologue); reshape + permute is one move kernel, the softmax its own, and a
    transpose of that move's output joins it; the attention-like product is a batched matmul."""
    from tvm import relax

    from cachefit.perf.flops import layer_kernels

    def t(shape):
        return relax.TensorType(shape, "float32")

    x, w, b, w2 = (relax.Var("x", t((2, 16, 64))), relax.Var("w", t((64, 128))), relax.Var("b", t((128,))),
                   relax.Var("w2", t((32, 128))))
    op = relax.op
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w, b, w2]):
        with bb.dataflow():
            y = bb.emit(op.erf(bb.emit(op.add(bb.emit(op.matmul(x, w)), b))))
            z = bb.emit(op.matmul(y, bb.emit(op.permute_dims(w2, [1, 0]))))
            h = bb.emit(op.permute_dims(bb.emit(op.reshape(y, (2, 16, 4, 32))), [0, 2, 1, 3]))
            s = bb.emit(op.nn.softmax(h, axis=-1))
            ht = bb.emit(op.permute_dims(h, [0, 1, 3, 2]))
            a = bb.emit(op.matmul(s, ht))
            out = bb.emit_output(relax.Tuple([z, a]))
        bb.emit_func_output(out)
    kernels = layer_kernels(bb.get()["main"], num_weights=3)
    assert kernels == (
        KernelSpec("matmul", m=32, n=128, k=64, batch=1, fused=(("elementwise", 4096.0), ("transcendental", 4096.0))),
        KernelSpec("matmul", m=32, n=32, k=128, batch=1),
        KernelSpec("move", elements=4096.0),
        KernelSpec("softmax", elements=4096.0),
        KernelSpec("matmul", m=16, n=16, k=32, batch=8, rows_in_m=False),
    )


def test_kernel_timed_layer_stalls_for_the_unhidden_share_of_its_off_chip_stream():
    """Kernel-timed: max(memory, compute + (1 - overlap) memory). Compute-bound (c 3, m 2, overlap
    0.25): 3 + 1.5 = 4.5, as the roofline form gives; memory-bound (c 1, m 2, overlap 0.75):
    max(2, 1 + 0.5) = 2, where the roofline form would give 2 + 0.25 = 2.25."""
    from cachefit.perf.costmodel import LayerCost

    assert LayerCost("l", 3.0, 2.0, 0.0, overlap=0.25, kernel_timed=True).time_s == pytest.approx(4.5)
    assert LayerCost("l", 3.0, 2.0, 0.0, overlap=0.25).time_s == pytest.approx(4.5)
    assert LayerCost("l", 1.0, 1.5, 0.5, overlap=0.75, kernel_timed=True).time_s == pytest.approx(2.0)
    assert LayerCost("l", 1.0, 1.5, 0.5, overlap=0.75).time_s == pytest.approx(2.25)
