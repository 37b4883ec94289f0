"""cachefit.runtime: weights files, loading an artifact (checksums first), running the pipeline, bad input."""

import json
import shutil
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm import relax

import cachefit.runtime as rt
from cachefit.codegen import build_artifact, compile_stage
from cachefit.errors import ArtifactError, InputError
from cachefit.passes.split_stages import SplitStages
from cachefit.runtime.weights import load_weights, read_header, save_weights
from test_codegen import TiedResidual, tied_params


# -- weights files ------------------------------------------------------------------------------


def test_weights_round_trip_every_dtype(tmp_path):
    """Every supported dtype, bf16 and fp8 included, comes back bit-exact, in the order written."""
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype("float32"),
        "f16": rng.standard_normal((7,)).astype("float16"),
        "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "f8": rng.standard_normal((4,)).astype(ml_dtypes.float8_e4m3fn),
        "i64": np.arange(6, dtype="int64").reshape(2, 3),
        "u8": np.arange(5, dtype="uint8"),
        "b": np.array([True, False, True]),
        "scalar": np.array(3.5, dtype="float64"),
        "empty": np.zeros((0, 4), dtype="float32"),
    }
    save_weights(tmp_path / "w.safetensors", tensors)
    back = load_weights(tmp_path / "w.safetensors")
    assert list(back) == list(tensors)
    for name, arr in tensors.items():
        assert back[name].dtype == arr.dtype and back[name].shape == arr.shape, name
        assert back[name].tobytes() == arr.tobytes(), name


def test_weights_file_uses_the_safetensors_layout(tmp_path):
    """8-byte little-endian header length, JSON header padded to 8 bytes, tensors back to back."""
    a = np.arange(6, dtype="float32").reshape(2, 3)
    b = np.arange(4, dtype="int32")
    save_weights(tmp_path / "w.safetensors", {"a": a, "b": b}, metadata={"stage": "0"})
    raw = (tmp_path / "w.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["b"] == {"dtype": "I32", "shape": [4], "data_offsets": [24, 40]}
    assert header["__metadata__"] == {"stage": "0"}
    assert raw[8 + n:] == a.tobytes() + b.tobytes()
    assert read_header(tmp_path / "w.safetensors") == (header, 8 + n)


def test_truncated_weights_file_is_an_artifact_error(tmp_path):
    save_weights(tmp_path / "w.safetensors", {"a": np.ones((100,), "float32")})
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(raw[:-8])
    with pytest.raises(ArtifactError, match=r"tensor 'a'"):
        load_weights(tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").write_bytes(raw[:5])
    with pytest.raises(ArtifactError, match="truncated"):
        load_weights(tmp_path / "w.safetensors")


def test_runtime_does_not_import_the_compiler():
    """Loading cachefit.runtime pulls in neither onnx nor any compiler-side cachefit package."""
    code = (
        "import sys, cachefit.runtime\n"
        "bad = [m for m in sys.modules if m == 'onnx' or m.startswith('onnx.') or m.startswith(('cachefit.passes', "
        "'cachefit.frontends', 'cachefit.codegen', 'cachefit.partition', 'cachefit.compiler'))]\n"
        "print(repr(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# -- loading and running -----------------------------------------------------------------------

GROUPS = [(0, 1), (2, 3)]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("rt")
    build_artifact(SplitStages(GROUPS)(TiedResidual), tied_params(), None, "llvm", out, model_name="tied")
    return out


@pytest.fixture
def copy(artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(artifact, dst)
    return dst


def reference(ids):
    """The unpartitioned module, compiled whole by the same pipeline as the stages."""
    ex = compile_stage(relax.transform.InlinePrivateFunctions()(TiedResidual), "llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    p = tied_params()
    return vm["main"](tvm.runtime.tensor(ids), *[tvm.runtime.tensor(p[n]) for n in ("emb", "w1", "w2")]).numpy()


def test_pipeline_matches_the_unpartitioned_module(artifact):
    pipe = rt.load(artifact)
    assert [s.name for s in pipe.stages] == ["stage_0", "stage_1"]
    assert [s.input_names for s in pipe.stages] == [["ids"], ["embed:0", "layers.0:0"]]
    assert pipe.stages[1].output_names == ["head:0"]
    ids = np.random.default_rng(1).standard_normal((2, 16)).astype("float32")
    out = pipe.run({"ids": ids})
    assert list(out) == ["head:0"]
    np.testing.assert_allclose(out["head:0"], reference(ids), rtol=1e-6, atol=1e-6)
    assert len(pipe.last_stage_seconds) == 2


def test_devices_can_be_given_per_stage_or_once(artifact):
    ids = np.ones((2, 16), "float32")
    a = rt.load(artifact, devices="cpu").run({"ids": ids})
    b = rt.load(artifact, devices=["cpu:0", tvm.cpu(0)]).run({"ids": ids})
    np.testing.assert_array_equal(a["head:0"], b["head:0"])
    with pytest.raises(ArtifactError, match="3 devices given for 2 stages"):
        rt.load(artifact, devices=["cpu", "cpu", "cpu"])


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"idz": np.ones((2, 16), "float32")}, r"unknown input 'idz'; the model's inputs are \['ids'\]"),
        ({}, r"input 'ids' \(float32\[2, 16\]\) is missing"),
        ({"ids": np.ones((3, 16), "float32")}, r"input 'ids' has shape \[3, 16\], the model expects \[2, 16\]"),
        ({"ids": np.ones((2, 16), "float64")}, r"input 'ids' has dtype float64, the model expects float32"),
    ],
)
def test_wrong_inputs_are_input_errors(artifact, inputs, message):
    pipe = rt.load(artifact)
    with pytest.raises(InputError, match=message):
        pipe.run(inputs)


def test_missing_file_names_the_file(copy):
    (copy / "stage_1.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"stage_1\.safetensors is missing"):
        rt.load(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        rt.load(copy)


def test_checksum_mismatch_is_refused_before_loading_native_code(copy, monkeypatch):
    """A tampered library is refused by its sha256 before tvm ever loads any library of the artifact."""
    lib = copy / "stage_1.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    loaded = []
    real = tvm.runtime.load_module
    monkeypatch.setattr(tvm.runtime, "load_module", lambda *a, **k: loaded.append(a) or real(*a, **k))
    with pytest.raises(ArtifactError, match=r"stage_1\.so does not match its checksum"):
        rt.load(copy)
    assert loaded == []


def test_newer_format_is_refused(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = 2
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format version 2, newer than this cachefit reads \\(up to 1\\)"):
        rt.load(copy)


def test_broken_chain_and_foreign_paths_are_refused(copy):
    m = json.loads((copy / "manifest.json").read_text())
    bad = json.loads(json.dumps(m))
    bad["stages"][1]["inputs"][0]["shape"] = [9, 9]
    (copy / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match="stage 1's inputs are not stage 0's outputs"):
        rt.load(copy)
    bad = json.loads(json.dumps(m))
    bad["stages"][0]["library"]["file"] = "../stage_0.so"
    (copy / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match="must be a plain file name"):
        rt.load(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        rt.load(copy)


def test_not_a_directory(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        rt.load(tmp_path / "nowhere")
