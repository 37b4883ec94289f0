"""cachefit run / inspect / compile on artifact directories."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from cachefit.cli import main
from cachefit.codegen import build_artifact
from cachefit.passes.split_stages import SplitStages
from cachefit.runtime.tools import make_inputs
from test_codegen import TiedResidual, tied_params


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    plan = {"strategy": "balanced", "footprint": "exact", "capacity_bytes": 50_000_000,
            "stages": [{"index": 0, "device": 0, "first_layer": 0, "last_layer": 1, "weight_bytes": 2048,
                        "activation_bytes": 256, "buffer_bytes": 0, "total_bytes": 2304, "utilisation": 0.25},
                       {"index": 1, "device": 1, "first_layer": 2, "last_layer": 3, "weight_bytes": 2048,
                        "activation_bytes": 256, "buffer_bytes": 64, "total_bytes": 2368, "utilisation": 0.26}]}
    build_artifact(SplitStages([(0, 1), (2, 3)])(TiedResidual), tied_params(), plan, "llvm", out,
                   model_name="tied", output_names=["logits"])
    return out


def test_inspect_shows_plan_and_stages(artifact):
    res = CliRunner().invoke(main, ["inspect", str(artifact)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("model tied") and "target llvm, 2 stages, format 1" in lines[0]
    assert "strategy balanced" in lines[1] and "capacity 50.00 MB" in lines[1]
    row0 = next(line for line in lines if line.startswith("0 "))
    assert "cpu:0" in row0 and "embed .. layers.0 (0..1)" in row0 and "2.05 KB" in row0 and "25%" in row0
    row1 = next(line for line in lines if line.startswith("1 "))
    assert "layers.1 .. head (2..3)" in row1 and "320 B" in row1 and "stage_1.so" in row1
    assert "stage 0 -> 1: 256 B (embed:0 float32[2, 16], layers.0:0 float32[2, 16])" in res.output
    assert "outputs: logits float32[2, 16]" in res.output
    res = CliRunner().invoke(main, ["inspect", str(artifact), "--format", "json"])
    assert json.loads(res.output)["stages"][1]["layers"]["names"] == ["layers.1", "head"]


def test_run_writes_outputs_and_times(artifact, tmp_path):
    inputs = make_inputs([{"name": "ids", "shape": [2, 16], "dtype": "float32"}], "random", seed=3)
    np.savez(tmp_path / "in.npz", **inputs)
    res = CliRunner().invoke(main, ["run", str(artifact), "-i", str(tmp_path / "in.npz"), "-o",
                                    str(tmp_path / "out.npz"), "--print-time", "--repeat", "3"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("logits: float32[2, 16] [")
    assert "(3 runs)" in res.output and "stage_0" in res.output and "total" in res.output
    import cachefit.runtime as rt

    want = rt.load(artifact).run(inputs)["logits"]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["logits"], want)


@pytest.mark.parametrize("mode, value", [("zeros", 0.0), ("ones", 1.0)])
def test_fill_modes(mode, value):
    got = make_inputs([{"name": "a", "shape": [3], "dtype": "float32"}, {"name": "b", "shape": [2], "dtype": "int64"}], mode)
    assert got["a"].dtype == np.float32 and got["b"].dtype == np.int64
    assert (got["a"] == value).all() and (got["b"] == value).all()
    rnd = make_inputs([{"name": "b", "shape": [50], "dtype": "int64"}], "random")
    assert rnd["b"].min() >= 0 and rnd["b"].max() < 100 and len(set(rnd["b"].tolist())) > 1


def test_run_errors_are_one_line_and_exit_2(artifact, tmp_path):
    np.savez(tmp_path / "bad.npz", ids=np.ones((2, 16), "float64"))
    res = CliRunner().invoke(main, ["run", str(artifact), "-i", str(tmp_path / "bad.npz")])
    assert res.exit_code == 2
    assert "cachefit: error: input 'ids' has dtype float64, the model expects float32" in res.output
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    (broken / "stage_0.so").write_bytes(b"not a library")
    res = CliRunner().invoke(main, ["run", str(broken)])
    assert res.exit_code == 2 and "stage_0.so does not match its checksum" in res.output
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "none")])
    assert res.exit_code == 2 and "does not exist" in res.output


@pytest.mark.slow
def test_compile_then_run_mlp(tmp_path):
    """cachefit compile of a bundled model into 2 CPU stages, then run and inspect the result."""
    from cachefit import models
    from cachefit.compiler import reference_outputs

    model = models.export("mlp-tiny", tmp_path / "mlp.onnx")
    res = CliRunner().invoke(main, ["compile", str(model), "--target", "llvm", "--devices", "2", "--strategy",
                                    "balanced", "--cache", "50MB", "-o", str(tmp_path / "build")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "build" / "manifest.json").read_text())
    assert len(manifest["stages"]) == 2 and manifest["model"]["name"]
    inputs = make_inputs(manifest["inputs"], "random", seed=1)
    np.savez(tmp_path / "in.npz", **inputs)
    res = CliRunner().invoke(main, ["run", str(tmp_path / "build"), "-i", str(tmp_path / "in.npz"), "-o",
                                    str(tmp_path / "out.npz")])
    assert res.exit_code == 0, res.output
    got = np.load(tmp_path / "out.npz")
    ref = reference_outputs(model, inputs)
    for name, want in ref.items():
        assert np.abs(got[name] - want).max() <= 1e-4 * np.abs(want).max()
