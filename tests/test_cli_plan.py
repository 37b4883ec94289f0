"""``cachefit plan``: the JSON report, hardware presets, capacity units, planning dtype, layer
options, and a paper-scale shape-only model planned from shapes alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cachefit.cli import main as cli_main
from cachefit.models import export, resolve

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory) -> Path:
    return export("mlp-tiny", tmp_path_factory.mktemp("plan") / "mlp.onnx")


@pytest.fixture(scope="module")
def dense_file(tmp_path_factory) -> Path:
    return export("dense-tiny", tmp_path_factory.mktemp("plan") / "dense.onnx")


def plan_json(path: Path, *args: str) -> dict:
    res = CliRunner().invoke(cli_main, ["plan", str(path), "--format", "json", *args])
    assert res.exit_code == 0, (res.stderr, res.exception)
    return json.loads(res.stdout)


# ---------------------------------------------------------------------------------------------
# The JSON report
# ---------------------------------------------------------------------------------------------


def test_json_report_schema(mlp_file):
    d = plan_json(mlp_file, "--cache", "2MB")
    assert isinstance(d["capacity_bytes"], int) and d["capacity_bytes"] == 2_000_000
    assert isinstance(d["strategy"], str) and d["strategy"] == "greedy"
    assert len(d["layers"]) == 6
    for i, layer in enumerate(d["layers"]):
        assert {"index", "name", "weight_bytes", "activation_bytes", "buffer_bytes", "total_bytes"} <= set(layer)
        assert layer["index"] == i and layer["name"] == f"layers.{i}"
        for k in ("weight_bytes", "activation_bytes", "buffer_bytes", "total_bytes"):
            assert isinstance(layer[k], int) and layer[k] >= 0
        assert layer["total_bytes"] == layer["weight_bytes"] + layer["activation_bytes"] + layer["buffer_bytes"]
        assert layer["weight_bytes"] == 4 * (512 * 512 + 512)
    parts = d["partitions"]
    assert parts and all({"device", "first_layer", "last_layer", "total_bytes"} <= set(p) for p in parts)
    # contiguous, in order, covering every layer once, each within capacity
    assert parts[0]["first_layer"] == 0 and parts[-1]["last_layer"] == 5
    for a, b in zip(parts, parts[1:]):
        assert b["first_layer"] == a["last_layer"] + 1 and b["device"] == a["device"] + 1
    assert all(p["total_bytes"] <= d["capacity_bytes"] for p in parts)
    assert d["groups"] == [[p["first_layer"], p["last_layer"]] for p in parts]
    # 1.05 MB per layer, 2 MB per device: two layers never fit together
    assert len(parts) == 6


def test_json_partitions_pack_layers_when_they_fit(mlp_file):
    """Greedy fills a 5 MB device with as many 1.05 MB layers as fit (4), then the rest."""
    d = plan_json(mlp_file, "--cache", "5MB")
    assert d["groups"] == [[0, 3], [4, 5]]
    assert all(p["total_bytes"] <= 5_000_000 for p in d["partitions"])
    assert d["partitions"][0]["total_bytes"] > 4 * d["layers"][0]["weight_bytes"]


def test_table_report(mlp_file):
    res = CliRunner().invoke(cli_main, ["plan", str(mlp_file), "--cache", "2MB"])
    assert res.exit_code == 0
    out = res.stdout
    assert out.startswith("model mlp: 6 layers, capacity 2.00 MB per device")
    assert sum(line.split()[1:2] == [f"layers.{i}"] for line in out.splitlines() for i in range(6)) >= 6
    assert "6 of 6 devices used" in out


# ---------------------------------------------------------------------------------------------
# Capacity: hardware presets and --cache units
# ---------------------------------------------------------------------------------------------


def _sysfs_l2_bytes() -> int:
    """This machine's per-core L2, read here independently of cachefit (sysfs writes KiB as K)."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")):
        if (idx / "level").read_text().strip() == "2" and (idx / "type").read_text().strip() in ("Unified", "Data"):
            size = (idx / "size").read_text().strip()
            units = {"K": 1024, "M": 1024**2, "G": 1024**3}
            return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return 1 << 20  # cachefit's documented fallback


@pytest.mark.parametrize("hardware,capacity", [("h100", 50_000_000), ("a100", 40_000_000), ("h200", 50_000_000)])
def test_hardware_presets(mlp_file, hardware, capacity):
    d = plan_json(mlp_file, "--hardware", hardware)
    assert d["capacity_bytes"] == capacity and d["hardware"] == hardware


def test_default_capacity_is_the_h100(mlp_file):
    d = plan_json(mlp_file)
    assert d["capacity_bytes"] == 50_000_000 and d["hardware"] == "h100"


def test_cpu_preset_is_this_machines_l2(mlp_file, monkeypatch, tmp_path):
    monkeypatch.setenv("CACHEFIT_CPU_PRESET", str(tmp_path / "no-calibration.json"))  # the sysfs preset
    d = plan_json(mlp_file, "--hardware", "cpu")
    assert d["capacity_bytes"] == _sysfs_l2_bytes()
    assert d["hardware"] == "cpu"


@pytest.mark.parametrize("cache,capacity", [("50MB", 50_000_000), ("2MiB", 2 * 2**20), ("1.5MB", 1_500_000),
                                            ("40000KB", 40_000_000), ("3GiB", 3 * 2**30)])
def test_cache_units(mlp_file, cache, capacity):
    d = plan_json(mlp_file, "--cache", cache)
    assert d["capacity_bytes"] == capacity


def test_cache_wins_over_hardware(mlp_file):
    d = plan_json(mlp_file, "--hardware", "a100", "--cache", "2MiB")
    assert d["capacity_bytes"] == 2 * 2**20 and d["hardware"] == "a100"


def test_capacity_decides_the_number_of_devices(mlp_file):
    """6 layers of 1.05 MB weights: 2 MiB holds one layer, 3.3 MB three, 50 MB all."""
    counts = {c: len(plan_json(mlp_file, "--cache", c)["partitions"]) for c in ("2MiB", "3.3MB", "50MB")}
    assert counts == {"2MiB": 6, "3.3MB": 2, "50MB": 1}


# ---------------------------------------------------------------------------------------------
# Planning dtype and layer options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "bfloat16", "fp16"])
def test_dtype_halves_the_weights_of_an_fp32_model(dense_file, dtype):
    fp32 = plan_json(dense_file, "--cache", "50MB")
    half = plan_json(dense_file, "--cache", "50MB", "--dtype", dtype)
    assert half["plan_dtype"] in ("bfloat16", "float16")
    assert [x["weight_bytes"] * 2 for x in half["layers"]] == [x["weight_bytes"] for x in fp32["layers"]]
    assert all(h["activation_bytes"] < f["activation_bytes"] for h, f in zip(half["layers"], fp32["layers"]))


def test_layers_option_merges(dense_file):
    d = plan_json(dense_file, "--layers", "2")
    assert [x["name"] for x in d["layers"]] == ["layers.0..layers.1", "layers.2..layers.3"]
    one = plan_json(dense_file)["layers"][0]["weight_bytes"]
    assert [x["weight_bytes"] for x in d["layers"]] == [2 * one, 2 * one]


def test_layer_boundaries_option(mlp_file):
    d = plan_json(mlp_file, "--layer-boundaries", "/layers.3/fc/MatMul")
    assert [x["name"] for x in d["layers"]] == ["part.0", "part.1"]
    assert [x["weight_bytes"] for x in d["layers"]] == [3 * 4 * (512 * 512 + 512)] * 2


def test_layout_option_is_followed(mlp_file):
    d = plan_json(mlp_file, "--layout", "2,4")
    assert d["strategy"] == "layout"
    assert d["groups"] == [[0, 1], [2, 5]]


def test_models_export_command(tmp_path):
    out = tmp_path / "p.onnx"
    res = CliRunner().invoke(cli_main, ["models", "export", "dense-tiny", "-o", str(out), "--layers", "2"])
    assert res.exit_code == 0 and out.is_file()
    d = plan_json(out)
    assert [x["name"] for x in d["layers"]] == ["layers.0", "layers.1"]


# ---------------------------------------------------------------------------------------------
# Paper scale: a 68.7 GB shape-only model, planned from shapes alone
# ---------------------------------------------------------------------------------------------

_MEASURE = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t0
print(json.dumps({"rc": p.returncode, "wall_s": wall, "stdout": p.stdout, "stderr": p.stderr[-4000:],
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


@pytest.mark.slow
def test_paper_dense_30b_plans_from_shapes(tmp_path, record_property):
    """paper-dense-30b (16 blocks, hidden 16384, ffn 32768, bf16, batch 128 x seq 10000) is written
    shape-only (150 KB, no weight bytes); planning it never materialises a weight. Measured in a
    child process (so that the peak RSS is its own): under 2 GB. Weight bytes per layer follow
    from the dims: 4h^2 (Q, K, V, O) + 2hf (fc1, fc2) + 9h + f (biases: 4h attention, f + h MLP;
    two LayerNorms 4h), at 2 bytes."""
    path = export("paper-dense-30b", tmp_path / "paper-dense-30b.onnx")
    assert path.stat().st_size < 1_000_000
    cmd = [sys.executable, "-m", "cachefit", "plan", str(path), "--format", "json", "--allow-spill"]
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["rc"] == 0, m["stderr"]
    record_property("wall_s", round(m["wall_s"], 2))
    record_property("peak_rss_mib", round(m["maxrss_kib"] / 1024, 1))
    print(f"paper-dense-30b plan: {m['wall_s']:.1f} s wall, peak RSS {m['maxrss_kib'] / 1024:.0f} MiB")
    assert m["maxrss_kib"] * 1024 < 2 * 10**9
    assert "Traceback" not in m["stderr"]

    d = json.loads(m["stdout"])
    p = resolve("paper-dense-30b")
    h, f, b, s = p["hidden"], p["ffn"], p["batch"], p["seq"]
    per_layer = 2 * (4 * h * h + 2 * h * f + 9 * h + f)
    assert per_layer == 4_295_327_744
    assert d["shape_only"] is True
    assert [x["name"] for x in d["layers"]] == [f"layers.{i}" for i in range(16)]
    assert [x["weight_bytes"] for x in d["layers"]] == [per_layer] * 16
    assert 16 * per_layer == 68_725_243_904  # the preset's 68.73 GB
    # the residual stream [b, s, h] in bf16 crosses every cut
    assert all(x["in_bytes"] == x["out_bytes"] == 2 * b * s * h for x in d["layers"])
    # nothing fits 50 MB: with --allow-spill every layer sits alone on a device
    assert d["capacity_bytes"] == 50_000_000
    assert d["groups"] == [[i, i] for i in range(16)]
    assert len(d["oversized"]) == 16


# ---------------------------------------------------------------------------------------------
# --fit in the planner
# ---------------------------------------------------------------------------------------------


def test_plan_fit_auto_makes_oversized_layers_fit_and_says_what_applied(dense_file):
    """dense-tiny's layers are 1.89 MB each; under 700 KB none fits as is. ``plan --fit auto``
    escalates per layer, plans on the rewritten layers, and the JSON report records per layer what
    was applied and the bytes before and after."""
    d = plan_json(dense_file, "--cache", "700KB", "--fit", "auto")
    assert d["fit"]["mode"] == "auto"
    layers = d["fit"]["layers"]
    assert len(layers) == 4
    # the fitted layers are one per device here, so a layer's footprint alone is its stage's
    assert len(d["partitions"]) == 4
    for entry, part in zip(layers, d["partitions"]):
        assert entry["bytes_before"] > 700_000 >= entry["bytes_after"]
        assert entry["bytes_after"] == part["total_bytes"]
        assert entry["fits"] and entry["applied"], entry
    assert d["fit"]["fits"] is True
    assert all(p["total_bytes"] <= 700_000 for p in d["partitions"])


def test_plan_fit_none_only_reports(dense_file):
    """``--fit none`` leaves the layers as they are: planning then refuses the oversized layers."""
    res = CliRunner().invoke(cli_main, ["plan", str(dense_file), "--cache", "700KB", "--fit", "none"])
    assert res.exit_code == 2
    assert "do not fit" in res.stderr


# ---------------------------------------------------------------------------------------------
# compile's fit options on plan: --prune-heads, --int8-weights, --max-prune-heads
# ---------------------------------------------------------------------------------------------

_BYTES = ("weight_bytes", "activation_bytes", "buffer_bytes", "total_bytes", "in_bytes", "out_bytes")


@pytest.fixture(scope="module")
def small_dense_file(tmp_path_factory) -> Path:
    return export("dense", tmp_path_factory.mktemp("plan") / "small.onnx", layers=2, hidden=32, heads=4, ffn=64,
                  seq=4, batch=1)


def test_plan_prune_heads_reports_the_pruned_bytes(small_dense_file):
    """``cachefit plan --prune-heads 0.25`` gives, per layer, the footprint analysis' bytes after a
    real PruneWeights run, which are the ones compile's fit step (compiler.fit_analysis, what
    compile_model runs before planning) gives; the report says the fraction applied (1 of 4 heads)."""
    from cachefit.analysis import analyze_onnx, layer_records
    from cachefit.fit import fit_analysis
    from cachefit.passes import run_pass
    from cachefit.passes.annotate_footprint import AnnotateFootprint
    from cachefit.passes.prune_weights import prune_weights

    d = plan_json(small_dense_file, "--cache", "50MB", "--prune-heads", "0.25")
    plain = plan_json(small_dense_file, "--cache", "50MB")
    a = analyze_onnx(small_dense_file)
    mod, _params, done = prune_weights(a.mod, a.params, 0.0, heads=0.25)
    want = layer_records(run_pass(AnnotateFootprint(), mod))
    assert [(x.heads_before, x.heads_after) for x in done] == [(4, 3), (4, 3)]
    for got, w in zip(d["layers"], want):
        assert {k: got[k] for k in _BYTES} == {k: getattr(w, k) for k in _BYTES}
    compiled, rep = fit_analysis(a, cache="50MB", prune_heads=0.25)
    assert [r.total_bytes for r in compiled.layers] == [x["total_bytes"] for x in d["layers"]]
    assert all(p["weight_bytes"] < q["weight_bytes"] for p, q in zip(d["layers"], plain["layers"]))
    assert d["fit"]["prune_heads"] == 0.25 and rep.prune_heads == 0.25
    assert [x["applied"] for x in d["fit"]["layers"]] == [["prune heads 25% (4 -> 3)"]] * 2


@pytest.mark.slow
def test_plan_prune_heads_matches_the_compiled_manifest(small_dense_file, tmp_path):
    """``cachefit compile --prune-heads 0.25`` records in its manifest the per-layer bytes that
    ``cachefit plan --prune-heads 0.25`` reports."""
    d = plan_json(small_dense_file, "--cache", "50MB", "--prune-heads", "0.25")
    out = tmp_path / "art"
    r = CliRunner().invoke(cli_main, ["compile", str(small_dense_file), "--cache", "50MB", "--prune-heads", "0.25",
                                      "--threads", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())["plan"]
    assert [{k: x[k] for k in _BYTES} for x in d["layers"]] == [{k: x[k] for k in _BYTES} for x in manifest["layers"]]
    assert manifest["fit"]["layers"] == d["fit"]["layers"]


def test_plan_int8_weights_changes_the_bytes_as_recorded(small_dense_file):
    """``plan --quantize int4 --int8-weights '*fc2*'``: fc2 stays INT8 and each layer holds exactly
    the bytes that INT8 costs more than INT4 for it (from the quantization records)."""
    int4 = plan_json(small_dense_file, "--cache", "50MB", "--quantize", "int4")
    mixed = plan_json(small_dense_file, "--cache", "50MB", "--quantize", "int4", "--int8-weights", "*fc2*")
    assert mixed["fit"]["int8_weights"] == ["*fc2*"]
    q4 = {q["name"]: q for q in int4["fit"]["quantized"]}
    q8 = {q["name"]: q for q in mixed["fit"]["quantized"] if q["bits"] == 8}
    assert sorted(q8) == ["layers_0_mlp_fc2_weight", "layers_1_mlp_fc2_weight"]
    for i in range(2):
        name = f"layers_{i}_mlp_fc2_weight"
        extra = q8[name]["bytes_after"] - q4[name]["bytes_after"]
        assert extra > 0
        assert mixed["layers"][i]["weight_bytes"] - int4["layers"][i]["weight_bytes"] == extra


def test_plan_fit_auto_reaches_the_head_rungs(small_dense_file):
    """``plan --fit auto --max-prune 0.1`` at a capacity INT4 + 10% MLP pruning misses: the blocks get a
    head rung; with ``--max-prune-heads 0`` they do not (and the plan refuses them)."""
    d0 = plan_json(small_dense_file, "--cache", "50MB", "--quantize", "int4", "--prune", "0.1")
    cap = min(x["total_bytes"] for x in d0["layers"]) - 1
    d = plan_json(small_dense_file, "--cache", f"{cap}B", "--fit", "auto", "--max-prune", "0.1",
                  "--max-prune-heads", "0.5")
    assert d["fit"]["fits"] and d["fit"]["max_prune_heads"] == 0.5
    for entry in d["fit"]["layers"]:
        assert entry["applied"][:2] == ["int4", "prune 10%"] and entry["applied"][2].startswith("prune heads ")
        assert entry["heads_before"] == 4 and entry["heads_after"] in (2, 3)
    # one layer per device: a device's bytes are its layer's footprint alone
    assert [e["bytes_after"] for e in d["fit"]["layers"]] == [p["total_bytes"] for p in d["partitions"]]
    assert all(e["bytes_after"] <= cap < e["bytes_before"] for e in d["fit"]["layers"])
    res = CliRunner().invoke(cli_main, ["plan", str(small_dense_file), "--cache", f"{cap}B", "--fit", "auto",
                                        "--max-prune", "0.1", "--max-prune-heads", "0", "--micro-batch", "1"])
    assert res.exit_code == 2 and "do not fit" in res.stderr


@pytest.mark.parametrize("args,msg", [
    (["--prune-heads", "1.0"], "--prune-heads 1.0 is not a fraction in [0, 1)"),
    (["--prune-heads", "-0.5"], "--prune-heads -0.5 is not a fraction"),
    (["--max-prune-heads", "1.5"], "--max-prune-heads 1.5 is not a fraction"),
    (["--int8-weights", "*fc2*"], "--int8-weights *fc2* keeps weights at INT8 where INT4 is applied"),
    (["--quantize", "int4", "--int8-weights", ""], "--int8-weights '' is empty"),
    (["--calibrate", "4"], "--calibrate 4: GPTQ calibration changes the rounded weight values, not a byte"),
])
def test_plan_bad_fit_values_name_the_flag(small_dense_file, args, msg):
    """Refused before the model is read, with the flag and the value (exit 2, one line)."""
    res = CliRunner().invoke(cli_main, ["plan", str(small_dense_file), *args])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    assert res.stderr.startswith("cachefit: error: ") and msg in res.stderr, res.stderr


@pytest.mark.parametrize("args,kwargs", [
    (["--prune-heads", "0.25"], dict(prune_heads=0.25)),
    (["--quantize", "int4", "--int8-weights", "*fc2*"], dict(quantize="int4", quantize_int8_weights=["*fc2*"])),
])
def test_plan_model_agrees_with_the_cli(small_dense_file, args, kwargs):
    """The library call ``plan_model(path, prune_heads=0.25)`` (or INT4 with INT8 weights) reports
    what ``cachefit plan --prune-heads 0.25`` reports: per-layer bytes, the fit and the stages."""
    from cachefit.planning import plan_model

    cli = plan_json(small_dense_file, "--cache", "50MB", *args)
    lib = json.loads(json.dumps(plan_model(small_dense_file, cache="50MB", **kwargs).to_dict()))
    assert [{k: x[k] for k in _BYTES} for x in lib["layers"]] == [{k: x[k] for k in _BYTES} for x in cli["layers"]]
    assert lib["fit"] == cli["fit"] and lib["partitions"] == cli["partitions"]
    assert lib["fit"]["layers"][0]["applied"]
