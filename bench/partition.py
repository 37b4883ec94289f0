"""Benchmark: the fast exact partitioners (``balanced``, ``min-time``) against the dynamic programmes.

    python bench/partition.py            # the issue's instances (the reference at n=2,000 takes a while)
    python bench/partition.py --quick    # smaller instances, for a smoke run
    python bench/partition.py --json out.json

Instances (seeded, reproducible):
- ``sizes``: the seed's additive case, ``partition(sizes, capacity, "balanced", devices=k)`` on
  random integer sizes (1 B .. 1 MB), capacity not binding, so the k groups are balanced.
- ``exact``: layer records of a transformer-like model (per-layer weights, working set and
  boundary tensors, one tied parameter between the first and last layer) through
  ``make_plan(..., footprint="exact")``, whose footprint is non-additive.
- ``exact-nonmono``: the same with random boundary tensors large enough that the footprint is
  not monotone in the group's extent, so the greedy test is not exact: the frontier search
  answers the feasibility tests (``cachefit.partition.search._frontier_fewest``). These rows also
  time the same search with the per-layer dynamic programme as the test (``force_dp=True``, the
  algorithm before the frontier search) and assert the same bottleneck.
- ``min-time-nonmono`` / ``min-time-overlap-nonmono``: ``solve(..., "min-time", k)`` on the
  ``exact-nonmono`` records with the h100 roofline (``default_cost_model``; the overlap rows with
  ``overlap_transfers=True``) and a capacity that binds (0.7 x the average footprint per device:
  the fewest devices within it are about 0.84 k), so every feasibility test has two bounds (stage
  time and capacity) and the two-bound frontier search answers it. Timed from the records (the
  footprint and stage-time oracles are built inside). The last column is the same search
  with the per-layer dynamic programme as the test (``force_dp=True``: what min-time ran on a
  non-monotone footprint before; last column), identical bottleneck asserted.

Each row asserts that the fast algorithm and the reference DP find the identical bottleneck.
Times are CPU seconds of this process (single-threaded pure Python).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachefit.partition import (  # noqa: E402
    LayerRecord,
    RooflineCostModel,
    StageTime,
    make_footprint_cost,
    partition,
    solve,
)
from cachefit.perf.hardware import PRESETS  # noqa: E402


def sizes_instance(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 1_000_000) for _ in range(n)]


def records_instance(n: int, seed: int, nonmono: bool = False) -> list[LayerRecord]:
    rng = random.Random(seed)
    layers = []
    for i in range(n):
        hidden = 4096 * rng.choice((1, 1, 2))
        params = {f"layers.{i}.w": rng.randint(200_000, 1_000_000)}
        if i in (0, n - 1):
            params["tied.embedding"] = 3_000_000
        io = rng.randint(0, 400_000) if nonmono else hidden
        layers.append(LayerRecord(
            name=f"layers.{i}",
            weight_bytes=sum(params.values()),
            activation_bytes=rng.randint(2 * hidden, 8 * hidden),
            buffer_bytes=rng.randint(0, hidden),
            in_bytes=io if nonmono else hidden,
            out_bytes=rng.randint(0, 400_000) if nonmono else hidden,
            params=params,
        ))
    return layers


def timed(fn, repeat: int):
    """CPU seconds of ``fn()`` (``time.process_time``: the figures hold on a shared, loaded machine
    where wall-clock time would count other processes), minimum and median over ``repeat`` runs."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.process_time()
        result = fn()
        times.append(time.process_time() - t0)
    return result, min(times), statistics.median(times)


def bench_sizes(n: int, k: int, with_reference: bool, repeat: int) -> dict:
    sizes = sizes_instance(n, seed=n)
    capacity = sum(sizes)
    fast, fast_min, fast_med = timed(lambda: partition(sizes, capacity, "balanced", devices=k), repeat)
    fast_value = max(sum(sizes[a:b + 1]) for a, b in fast)
    row = {"instance": "sizes", "n": n, "k": k, "fast_s": fast_min, "fast_median_s": fast_med,
           "bottleneck": fast_value, "groups": len(fast)}
    if with_reference:
        ref, ref_s, _ = timed(lambda: partition(sizes, capacity, "balanced-reference", devices=k), 1)
        ref_value = max(sum(sizes[a:b + 1]) for a, b in ref)
        assert ref_value == fast_value, (n, k, ref_value, fast_value)
        row.update(reference_s=ref_s, speedup=ref_s / fast_min, identical=True)
    return row


def bench_records(n: int, k: int, with_reference: bool, repeat: int, nonmono: bool) -> dict:
    layers = records_instance(n, seed=n + 7, nonmono=nonmono)
    cost = make_footprint_cost(layers, "exact")
    capacity = sum(l.total_bytes + l.in_bytes + l.out_bytes for l in layers)  # not binding
    # Timed from the records: building the footprint oracle is part of the fast algorithm's cost.
    fast, fast_min, fast_med = timed(
        lambda: solve(make_footprint_cost(layers, "exact"), capacity, "balanced", k), repeat
    )
    row = {"instance": "exact-nonmono" if nonmono else "exact", "n": n, "k": k, "monotone": cost.monotone,
           "fast_s": fast_min, "fast_median_s": fast_med, "bottleneck": fast.value, "groups": len(fast.groups)}
    assert max(cost.cost(a, b) for a, b in fast.groups) == fast.value
    if with_reference:
        ref, ref_s, _ = timed(lambda: solve(cost, capacity, "balanced-reference", k), 1)
        assert ref.value == fast.value, (n, k, ref.value, fast.value)
        row.update(reference_s=ref_s, speedup=ref_s / fast_min, identical=True)
    if nonmono:
        dp, dp_s, _ = timed(
            lambda: solve(make_footprint_cost(layers, "exact"), capacity, "balanced", k, force_dp=True), 1
        )
        assert dp.value == fast.value, (n, k, dp.value, fast.value)
        row.update(dp_s=dp_s)
    return row


def bench_min_time(n: int, k: int, with_dp: bool, repeat: int, overlap: bool) -> dict:
    layers = records_instance(n, seed=n + 7, nonmono=True)
    total = sum(l.total_bytes + l.in_bytes + l.out_bytes for l in layers)
    capacity = int(total / k * 0.7)  # binds: the fewest devices within it are about 0.84 k
    model = replace(RooflineCostModel.from_hardware(PRESETS["h100"]), overlap_transfers=overlap)

    def run(force_dp: bool):
        return solve(make_footprint_cost(layers, "exact"), capacity, "min-time", k,
                     time=StageTime(layers, model), force_dp=force_dp)

    fast, fast_min, fast_med = timed(lambda: run(False), repeat)
    time = StageTime(layers, model)
    cost = make_footprint_cost(layers, "exact")
    assert max(time.cost(a, b) for a, b in fast.groups) == fast.value
    assert all(cost.cost(a, b) <= capacity for a, b in fast.groups)
    row = {"instance": "min-time-overlap-nonmono" if overlap else "min-time-nonmono", "n": n, "k": k,
           "monotone": cost.monotone, "minimum": fast.minimum, "fast_s": fast_min, "fast_median_s": fast_med,
           "bottleneck": fast.value, "groups": len(fast.groups), "notes": fast.notes}
    if with_dp:
        dp, dp_s, _ = timed(lambda: run(True), 1)
        assert dp.value == fast.value, (n, k, dp.value, fast.value)
        row.update(dp_s=dp_s, identical=True, dp_notes=dp.notes)
    return row


def fmt(row: dict) -> str:
    ref = f"{row['reference_s']:.3f}" if "reference_s" in row else "-"
    speed = f"{row['speedup']:.0f}x" if "speedup" in row else "-"
    same = "yes" if row.get("identical") else "-"
    dp = f"{row['dp_s']:.3f} ({row['dp_s'] / row['fast_s']:.0f}x)" if "dp_s" in row else "-"
    return (f"| {row['instance']} | {row['n']:,} | {row['k']:,} | {row['fast_s'] * 1e3:.1f} | {ref} | {speed} "
            f"| {same} | {dp} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small instances only")
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats of the fast algorithm (min reported)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--only", action="append", metavar="KIND[:N]",
                    help="run only these rows (e.g. exact-nonmono:100000); repeatable")
    args = ap.parse_args(argv)

    plan = []
    if args.quick:
        plan += [("sizes", 300, 16, True), ("exact", 300, 16, True), ("exact-nonmono", 200, 16, True),
                 ("sizes", 20_000, 200, False), ("exact", 20_000, 200, False),
                 ("min-time-nonmono", 2_000, 16, True), ("min-time-overlap-nonmono", 2_000, 16, True)]
    else:
        plan += [("sizes", 500, 16, True), ("sizes", 2_000, 16, True), ("sizes", 100_000, 1_000, False),
                 ("exact", 500, 16, True), ("exact", 2_000, 16, True), ("exact", 100_000, 1_000, False),
                 ("exact-nonmono", 500, 16, True), ("exact-nonmono", 2_000, 16, True),
                 ("exact-nonmono", 100_000, 1_000, False),
                 ("min-time-nonmono", 2_000, 16, True), ("min-time-nonmono", 20_000, 200, True),
                 ("min-time-nonmono", 100_000, 1_000, True),
                 ("min-time-overlap-nonmono", 20_000, 200, True)]
    if args.only:
        wanted = [o.split(":") for o in args.only]
        plan = [p for p in plan if any(w[0] == p[0] and (len(w) == 1 or int(w[1]) == p[1]) for w in wanted)]
    rows = []
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.processor() or 'cpu'}")
    print("| instance | n | k | fast (ms) | reference DP (s) | speed-up | same bottleneck "
          "| with the DP as feasibility test (s) |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for kind, n, k, ref in plan:
        if kind == "sizes":
            row = bench_sizes(n, k, ref, args.repeat)
        elif kind.startswith("min-time"):
            row = bench_min_time(n, k, ref, args.repeat, overlap="overlap" in kind)
        else:
            row = bench_records(n, k, ref, args.repeat, nonmono=kind == "exact-nonmono")
        rows.append(row)
        print(fmt(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
