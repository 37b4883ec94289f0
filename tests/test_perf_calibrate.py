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
    assert get_hardware(str(path)).source.startswith("calibrated (tvm")


def test_calibrate_refuses_an_unwritable_path(tmp_path):
    from cachefit.errors import CachefitError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CachefitError, match="cannot write the CPU preset"):
        calibrate(blocker / "cpu.json", method="numpy", quick=True)
