"""`plan --plot`: the memory map's numbers, the picture, and the error without matplotlib."""

from __future__ import annotations

import sys

import pytest

from cachefit.errors import CachefitError
from cachefit.partition.records import LayerRecord
from cachefit.perf.plot import memory_map, plot_plan


def _plan():
    from cachefit.partition.plan import make_plan

    layers = [
        LayerRecord("a", weight_bytes=600, activation_bytes=100, buffer_bytes=20, in_bytes=10, out_bytes=30,
                    params={"wa": 600}),
        LayerRecord("b", weight_bytes=300, activation_bytes=50, in_bytes=30, out_bytes=30, params={"wb": 300}),
        LayerRecord("c", weight_bytes=1_500, activation_bytes=40, in_bytes=30, out_bytes=5, params={"wc": 1_500}),
    ]
    return make_plan(layers, 1_000, strategy="greedy", allow_spill=True)


def test_memory_map_numbers():
    """Greedy within 1,000 bytes: {a} (600 + 120 peak + 10 in + 30 out = 760), {b} (300 + 50 + 60 = 410),
    and c alone, spilling (1,500 + 40 + 35)."""
    data = memory_map(_plan())
    assert data["capacity_bytes"] == 1_000
    bars = data["bars"]
    assert [b["label"] for b in bars] == ["a", "b", "c"]
    assert bars[0]["parts"] == {"weights": 600, "activations": 100, "buffers": 20, "boundary tensors": 40}
    assert [b["total"] for b in bars] == [760, 410, 1_575]
    assert [b["resident"] for b in bars] == [True, True, False]
    # the plan's dict form gives the same map
    assert memory_map(_plan().to_dict()) == data


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_plan(_plan(), tmp_path / "plan.png")
    head = out.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5_000


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(CachefitError, match=r"needs matplotlib.*pip install"):
        plot_plan(_plan(), tmp_path / "plan.png")


def test_bad_plan_and_bad_folder(tmp_path):
    with pytest.raises(CachefitError, match="stages and capacity_bytes"):
        memory_map({"stages": []})
    pytest.importorskip("matplotlib")
    with pytest.raises(CachefitError, match="does not exist"):
        plot_plan(_plan(), tmp_path / "no" / "plan.png")
