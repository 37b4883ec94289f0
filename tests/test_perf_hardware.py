"""Hardware presets: JSON round trip and the calibrated CPU preset file."""

from __future__ import annotations

import json

import pytest

from cachefit.errors import CachefitError
from cachefit.perf import hardware as hwmod
from cachefit.perf.hardware import Hardware, get_hardware, load_hardware, save_hardware


def test_presets_have_the_issue_figures():
    h100 = get_hardware("H100")
    assert h100.peak_flops["bfloat16"] == 989e12
    assert h100.offchip_bw == 3.35e12 and h100.link_bw == 900e9
    assert h100.onchip_bytes == 50_000_000
    assert h100.with_usable_fraction(0.7).capacity_bytes == 35_000_000
    assert get_hardware("a100").onchip_bytes == 40_000_000
    assert get_hardware("h200").offchip_bw > h100.offchip_bw


def test_round_trip(tmp_path):
    h = get_hardware("h100").with_usable_fraction(0.66)
    path = save_hardware(h, tmp_path / "h.json", extra={"note": 1})
    assert load_hardware(path) == h
    assert get_hardware(str(path)) == h


def test_cpu_reads_the_calibration_file(tmp_path, monkeypatch):
    path = tmp_path / "cpu.json"
    monkeypatch.setenv(hwmod.CPU_PRESET_ENV, str(path))
    default = get_hardware("cpu")
    assert default.source.startswith("defaults")
    measured = Hardware(name="cpu", onchip_bytes=default.onchip_bytes, onchip_bw=123e9, offchip_bw=45e9,
                        peak_flops={"float32": 7e9}, source="calibrated")
    save_hardware(measured, path)
    assert get_hardware("cpu") == measured


def test_cpu_ignores_a_calibration_from_another_processor(tmp_path, monkeypatch):
    path = tmp_path / "cpu.json"
    monkeypatch.setenv(hwmod.CPU_PRESET_ENV, str(path))
    doc = Hardware(name="cpu", onchip_bytes=1, onchip_bw=1.0, offchip_bw=1.0).to_dict()
    doc["cpu_model"] = "Some Other CPU 9000"
    path.write_text(json.dumps(doc))
    assert get_hardware("cpu").source.startswith("defaults")


def test_bad_files_and_names(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CachefitError, match="not valid JSON"):
        get_hardware(str(bad))
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(CachefitError, match="malformed hardware description"):
        get_hardware(str(bad))
    with pytest.raises(CachefitError, match="unknown hardware preset 'tpu'"):
        get_hardware("tpu")
    with pytest.raises(CachefitError, match="out of range"):
        get_hardware("h100").with_usable_fraction(1.5)
