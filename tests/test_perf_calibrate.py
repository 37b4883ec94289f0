"""`cachefit calibrate`: measures this CPU and stores a preset that `--hardware cpu` then reads."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cachefit.cli import main
from cachefit.perf import hardware as hwmod
from cachefit.perf.calibrate import calibrate, format_calibration
from cachefit.perf.hardware import get_hardware


def test_numpy_calibration_is_stored_and_read_back(tmp_path, monkeypatch):
    path = tmp_path / "cpu.json"
    monkeypatch.setenv(hwmod.CPU_PRESET_ENV, str(path))
    hw, out, meas = calibrate(method="numpy", quick=True)
    assert out == path and path.is_file()
    assert get_hardware("cpu") == hw
    assert hw.onchip_bytes == hwmod.cpu_preset().onchip_bytes
    assert hw.peak_flops["float32"] > 0 and hw.onchip_bw > 0 and hw.offchip_bw > 0 and hw.link_bw > 0
    assert hw.source.startswith("calibrated (numpy")
    # every measured shape and working set is in the file, with the figures the preset took
    doc = json.loads(path.read_text())
    assert [m["m"] for m in doc["measurements"]["matmul"]] == [32, 32, 32]
    assert {b["fraction_of_l2"] for b in doc["measurements"]["bandwidth"]} == {0.25, 8}
    assert hw.offchip_bw == next(b["bytes_per_s"] for b in meas["bandwidth"] if b["fraction_of_l2"] == 8)
    assert "GFLOP/s" in format_calibration(hw, meas)


@pytest.mark.slow
def test_cli_calibrate_with_tvm_kernels(tmp_path):
    path = tmp_path / "cpu.json"
    r = CliRunner().invoke(main, ["calibrate", "--quick", "-o", str(path), "--format", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["path"] == str(path)
    assert doc["measurements"]["method"] == "tvm"
    assert doc["measurements"]["per_kernel_seconds"] >= 0
    hw = get_hardware(str(path))
    assert hw.source.startswith("calibrated (tvm")
    # the kernel table: the quick grid, every rate and per-element cost measured
    from cachefit.perf.calibrate import QUICK_GRID_M, QUICK_GRID_NK
    from cachefit.perf.hardware import KERNEL_CLASSES

    table = hw.kernels
    assert table.matmul_m == QUICK_GRID_M and table.matmul_n == table.matmul_k == QUICK_GRID_NK
    assert len(doc["measurements"]["matmul_grid"]) == len(QUICK_GRID_M) * len(QUICK_GRID_NK) ** 2
    assert all(r > 0 for r in table.matmul_flops_per_s)
    assert set(table.per_element) == set(KERNEL_CLASSES)
    assert all(v > 0 for v in table.per_element.values())
    assert set(table.fused_per_element) == {"elementwise", "transcendental"}
    assert 0.0 <= hw.memory_overlap <= 1.0 and doc["measurements"]["spill_matmul"]["count"] >= 2


def test_calibrate_refuses_an_unwritable_path(tmp_path):
    from cachefit.errors import CachefitError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CachefitError, match="cannot write the CPU preset"):
        calibrate(blocker / "cpu.json", method="numpy", quick=True)


def test_numpy_calibration_has_no_kernel_table(tmp_path):
    """numpy kernels say nothing of cachefit's compiled kernels: no table, the flops / peak model."""
    hw, _, _ = calibrate(tmp_path / "cpu.json", method="numpy", quick=True)
    assert hw.kernels is None
    assert get_hardware(str(tmp_path / "cpu.json")).kernels is None


def test_kernel_table_round_trip_and_old_files(tmp_path):
    """The table travels in the preset file under "kernels"; a file written before it existed loads
    with no table; a malformed table is refused with a message naming it."""
    from cachefit.errors import CachefitError
    from cachefit.perf.hardware import Hardware, KernelTable, load_hardware, save_hardware

    table = KernelTable(matmul_m=(4, 64), matmul_n=(32,), matmul_k=(32, 128),
                        matmul_flops_per_s=(1e9, 2e9, 3e9, 4e9), per_element={"norm": 3e-10},
                        fused_per_element={"elementwise": 1e-10}, per_kernel_s=5e-7, call_s=1e-6)
    hw = Hardware(name="cpu", onchip_bytes=2_000_000, onchip_bw=6e10, offchip_bw=1e10,
                  peak_flops={"float32": 5e10}, kernels=table)
    path = save_hardware(hw, tmp_path / "cpu.json")
    assert load_hardware(path) == hw
    assert load_hardware(path).kernels.matmul_rate(64, 32, 128) == pytest.approx(4e9)
    doc = json.loads(path.read_text())
    del doc["kernels"]
    (tmp_path / "old.json").write_text(json.dumps(doc))
    assert load_hardware(tmp_path / "old.json").kernels is None
    doc["kernels"] = {**table.to_dict(), "matmul_flops_per_s": [1e9, 2e9]}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(CachefitError, match=r"2 matmul rates for a 2 x 1 x 2 grid of shapes \(4 expected\)"):
        load_hardware(tmp_path / "bad.json")
    doc["kernels"] = {"per_element": {}}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(CachefitError, match="malformed kernel table"):
        load_hardware(tmp_path / "bad.json")


def test_time_calls_interleaves_passes_and_keeps_the_minimum():
    """Every function runs in every pass (once warm, then at least 3 timed calls), in round-robin
    order; the result is one best time per function."""
    from cachefit.perf.calibrate import time_calls

    order = []
    best = time_calls({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, passes=3, per_pass=0.0)
    assert order == (["a"] * 4 + ["b"] * 4) * 3
    assert set(best) == {"a", "b"} and all(t >= 0 for t in best.values())


def test_overlap_inverts_the_layer_time():
    """_overlap gives the memory_overlap for which the cost model's layer time is the measured one:
    roofline form, c 3 ms, m 2 ms, t 4 ms: 1 - (4 - 3) / 2 = 0.5; kernel-timed, c 3, m 2, t 4.5:
    1 - 1.5 / 2 = 0.25; a time at or under the stream itself: 1; slower than the sum: 0."""
    from cachefit.perf.calibrate import _overlap
    from cachefit.perf.costmodel import LayerCost

    assert _overlap(4.0, 3.0, 2.0, kernel_timed=False) == pytest.approx(0.5)
    assert _overlap(4.5, 3.0, 2.0, kernel_timed=True) == pytest.approx(0.25)
    assert LayerCost("l", 3.0, 2.0, 0.0, overlap=0.25, kernel_timed=True).time_s == pytest.approx(4.5)
    assert _overlap(1.5, 1.0, 2.0, kernel_timed=True) == 1.0
    assert _overlap(9.0, 3.0, 2.0, kernel_timed=True) == 0.0
