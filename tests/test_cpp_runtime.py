"""The C++ runtime (cachefit/runtime/cpp): built with CMake, checked against the Python runtime.

The build is made once per module, the artifacts once per session (conftest's ``compiled_artifact``: a
dense reference model in 3 CPU stages and the legacy GPT-2 export in 2). Tests that need them are skipped, with the reason printed as a warning, only
when no C++ compiler or no CMake is installed; a missing JSON library or TVM is a failure.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import shutil
import subprocess
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cachefit.cli import main as cli_main
from cachefit.runtime.cpp_config import CPP_DIR, cpp_build_config


# --- build --------------------------------------------------------------------------------------


def _toolchain_missing() -> str | None:
    if shutil.which("cmake") is None:
        return "CMake is not installed (apt-get install cmake)"
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")) and not os.environ.get("CXX"):
        return "no C++ compiler is installed (apt-get install g++)"
    return None


@pytest.fixture(scope="module")
def cpp_build(tmp_path_factory) -> Path:
    """The CMake build folder holding cachefit-run, cachefit-selftest and cachefit-embed-example."""
    reason = _toolchain_missing()
    if reason:
        warnings.warn(f"C++ runtime tests skipped: {reason}")
        pytest.skip(reason)
    build = tmp_path_factory.mktemp("cpp_build")
    # The -D arguments come from `cachefit config --cmake-args`, as users get them.
    res = CliRunner().invoke(cli_main, ["config", "--cmake-args"])
    assert res.exit_code == 0, res.output
    configure = ["cmake", "-S", str(CPP_DIR), "-B", str(build), "-DCMAKE_BUILD_TYPE=Debug",
                 "-DCMAKE_CXX_FLAGS=-D_GLIBCXX_ASSERTIONS", *res.output.split()]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", str(max(1, min(4, os.cpu_count() or 1)))]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for exe in ("cachefit-run", "cachefit-selftest", "cachefit-embed-example"):
        assert (build / exe).is_file(), exe
    return build


def _run(exe: Path, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def _assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A clear one-line error and exit status 2: no crash, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "cachefit-run: error:" in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr


# --- artifacts ----------------------------------------------------------------------------------


# The artifacts come from conftest's session cache (compile_model(..., cache="1GB", strategy="balanced",
# devices=k)), shared with any other test file that runs the same model in as many stages; tests
# copy them (_copy) before changing a file.


@pytest.fixture(scope="module")
def dense_artifact(compiled_artifact) -> Path:
    out = compiled_artifact("dense-tiny", 3)
    assert len(json.loads((out / "manifest.json").read_text())["stages"]) == 3
    return out


@pytest.fixture(scope="module")
def gpt2_artifact(compiled_artifact) -> Path:
    out = compiled_artifact("gpt2_legacy.onnx", 2)
    assert len(json.loads((out / "manifest.json").read_text())["stages"]) == 2
    return out


def _inputs(artifact: Path, seed: int = 0) -> dict[str, np.ndarray]:
    from cachefit.runtime.tools import make_inputs

    return make_inputs(json.loads((artifact / "manifest.json").read_text())["inputs"], "random", seed)


def _copy(artifact: Path, dest: Path) -> Path:
    return Path(shutil.copytree(artifact, dest))


# --- `cachefit config` --------------------------------------------------------------------------


def test_config_prints_cmake_inputs():
    """`cachefit config` names existing folders: the package file, TVM's and tvm-ffi's libraries and headers."""
    runner = CliRunner()
    prefix = runner.invoke(cli_main, ["config", "--cmake-prefix"])
    assert prefix.exit_code == 0, prefix.output
    assert (Path(prefix.output.strip()) / "cmake" / "cachefit-config.cmake").is_file()

    args = runner.invoke(cli_main, ["config", "--cmake-args"])
    assert args.exit_code == 0, args.output
    defs = dict(a[2:].split("=", 1) for a in args.output.split())
    assert set(defs) == {"cachefit_DIR", "CACHEFIT_TVM_LIB_DIR", "CACHEFIT_TVM_FFI_INCLUDE_DIR", "CACHEFIT_TVM_FFI_LIB_DIR"}
    assert (Path(defs["cachefit_DIR"]) / "cachefit-config.cmake").is_file()
    assert (Path(defs["CACHEFIT_TVM_LIB_DIR"]) / "libtvm_runtime.so").is_file()
    assert (Path(defs["CACHEFIT_TVM_FFI_LIB_DIR"]) / "libtvm_ffi.so").is_file()
    assert (Path(defs["CACHEFIT_TVM_FFI_INCLUDE_DIR"]) / "tvm" / "ffi" / "function.h").is_file()

    as_json = runner.invoke(cli_main, ["config", "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == cpp_build_config().to_dict()
    table = runner.invoke(cli_main, ["config"])
    assert table.exit_code == 0 and "tvm_lib_dir" in table.output


def test_config_names_a_tvm_library_path_without_the_library(monkeypatch, tmp_path):
    """TVM_LIBRARY_PATH wins only when it holds libtvm_runtime.so; otherwise the wheel's folder is used."""
    monkeypatch.setenv("TVM_LIBRARY_PATH", str(tmp_path))
    assert cpp_build_config().tvm_lib_dir != tmp_path
    (tmp_path / "libtvm_runtime.so").write_bytes(b"")
    assert cpp_build_config().tvm_lib_dir == tmp_path.resolve()


# --- SHA-256 and .npz (the runtime's own implementations) ----------------------------------------


@pytest.mark.slow
def test_sha256_matches_known_vectors_and_hashlib(cpp_build, tmp_path):
    """FIPS 180-2 examples, every length around the 55/56/64-byte padding edges, and a file over the 1 MiB
    read chunk, each hashed by streaming (sha256_file) and in one buffer (sha256_hex)."""
    known = {
        b"": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        b"abc": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq":
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu":
            "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1",
        b"a" * 1_000_000: "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
    }
    rng = np.random.default_rng(0)
    files, want = [], []
    for i, (data, digest) in enumerate(known.items()):
        assert hashlib.sha256(data).hexdigest() == digest
        files.append(tmp_path / f"known_{i}")
        files[-1].write_bytes(data)
        want.append(digest)
    for n in [*range(0, 130), 1 << 20, (1 << 20) + 1, 2_500_003]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        files.append(tmp_path / f"random_{n}")
        files[-1].write_bytes(data)
        want.append(hashlib.sha256(data).hexdigest())
    proc = _run(cpp_build / "cachefit-selftest", "sha256", *files)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(files)
    for line, digest, path in zip(lines, want, files):
        streamed, whole, name = line.split(" ", 2)
        assert (streamed, whole, name) == (digest, digest, str(path)), path.name


def _npz_arrays() -> dict[str, np.ndarray]:
    import ml_dtypes

    rng = np.random.default_rng(1)
    return {
        "f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "f64_be": rng.standard_normal((3, 5)).astype(">f8"),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "i64": rng.integers(-(2**62), 2**62, (4, 2)).astype(np.int64),
        "i32_be": rng.integers(-1000, 1000, (3, 2)).astype(">i4"),
        "i8": rng.integers(-128, 127, (9,)).astype(np.int8),
        "u16": rng.integers(0, 60000, (2, 2)).astype(np.uint16),
        "u64": rng.integers(0, 2**64 - 1, (3,), dtype=np.uint64),
        "flag": rng.integers(0, 2, (2, 5)).astype(bool),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((3, 4, 5)).astype(np.float32)),
        "fortran_be_i16": np.asfortranarray(rng.integers(-300, 300, (4, 3)).astype(">i2")),
        "layers.1:0": rng.standard_normal((1, 2)).astype(np.float32),
        "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
    }


@pytest.mark.slow
def test_npz_roundtrip_matches_numpy(cpp_build, tmp_path):
    """Arrays np.savez writes (ZIP64 local headers, both byte orders, Fortran order, 0-d, empty, bool,
    bfloat16 as |V2) are read exactly; the .npz written back is a valid ZIP that numpy reads identically."""
    arrays = _npz_arrays()
    src, dst = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(src, **arrays)

    listed = _run(cpp_build / "cachefit-selftest", "npz-list", src)
    assert listed.returncode == 0, listed.stderr
    seen = {line.split(" ", 1)[0]: line.split(" ", 2)[1:] for line in listed.stdout.splitlines()}
    assert list(seen) == list(arrays)
    assert seen["f64_be"] == ["float64", "[3, 5]"]
    assert seen["flag"] == ["bool", "[2, 5]"]
    assert seen["scalar"] == ["float32", "[]"]
    assert seen["empty"] == ["float32", "[0, 3]"]
    assert seen["bf16"] == ["void2", "[2, 3]"]

    proc = _run(cpp_build / "cachefit-selftest", "npz-copy", src, dst)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(dst) as z:
        assert z.testzip() is None  # every CRC checks
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    with np.load(dst) as back:
        assert list(back.files) == list(arrays)
        for name, want in arrays.items():
            got = back[name]
            assert got.shape == want.shape, name
            assert got.flags.c_contiguous and got.dtype.byteorder in "=|<", name
            if name == "bf16":
                assert got.dtype == np.dtype("V2")
                np.testing.assert_array_equal(got.view(want.dtype), want)
            else:
                assert got.dtype == want.dtype.newbyteorder("<") or got.dtype == want.dtype, name
                np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.slow
def test_npz_reads_npy_format_versions_2_and_3(cpp_build, tmp_path):
    path = tmp_path / "v.npz"
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for version in ((1, 0), (2, 0), (3, 0)):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a, version=version)
            z.writestr(f"v{version[0]}.npy", buf.getvalue())
    out = tmp_path / "out.npz"
    proc = _run(cpp_build / "cachefit-selftest", "npz-copy", path, out)
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as back:
        for v in ("v1", "v2", "v3"):
            np.testing.assert_array_equal(back[v], a)


@pytest.mark.slow
def test_npz_rejects_what_it_cannot_read(cpp_build, tmp_path):
    """Compressed entries, object arrays, complex dtypes, a flipped data byte and non-ZIP files: a clear error,
    exit status 2."""
    cases = {}
    np.savez_compressed(tmp_path / "compressed.npz", x=np.zeros(3, np.float32))
    cases["compressed.npz"] = "np.savez_compressed"
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    cases["objects.npz"] = "NumPy dtype '|O'"
    np.savez(tmp_path / "complex.npz", x=np.zeros(2, np.complex64))
    cases["complex.npz"] = "NumPy dtype '<c8'"
    np.savez(tmp_path / "crc.npz", x=np.arange(100, dtype=np.float32))
    raw = bytearray((tmp_path / "crc.npz").read_bytes())
    raw[raw.index(b"\x93NUMPY") + 128 + 40] ^= 0xFF  # inside x.npy's data (after its 128-byte header)
    (tmp_path / "crc.npz").write_bytes(bytes(raw))
    cases["crc.npz"] = "CRC mismatch"
    (tmp_path / "text.npz").write_text("not a zip archive at all, just text")
    cases["text.npz"] = "not a ZIP archive"
    truncated = (tmp_path / "objects.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(truncated[: len(truncated) // 2])
    cases["truncated.npz"] = "not a readable .npz"
    for name, needle in cases.items():
        proc = _run(cpp_build / "cachefit-selftest", "npz-list", tmp_path / name)
        assert proc.returncode == 2, (name, proc.returncode, proc.stderr)
        assert needle in proc.stderr, (name, proc.stderr)


# --- runs against the Python runtime -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("which", ["dense", "gpt2"])
def test_cpp_run_matches_python_runtime(which, cpp_build, dense_artifact, gpt2_artifact, tmp_path):
    """cachefit-run and cachefit.runtime give the same outputs (within 1e-6) on 3 dense CPU stages and on
    the legacy GPT-2 export in 2 stages."""
    from cachefit.runtime import load

    artifact = dense_artifact if which == "dense" else gpt2_artifact
    inputs = _inputs(artifact, seed=3)
    np.savez(tmp_path / "in.npz", **inputs)
    proc = _run(cpp_build / "cachefit-run", artifact, "-i", tmp_path / "in.npz", "-o", tmp_path / "out.npz",
                "--print-time", "--repeat", "2")
    assert proc.returncode == 0, proc.stderr
    want = load(artifact).run(inputs)
    with np.load(tmp_path / "out.npz") as got:
        assert sorted(got.files) == sorted(want)
        for name, ref in want.items():
            assert got[name].dtype == ref.dtype and got[name].shape == ref.shape, name
            assert np.isfinite(ref).all() and np.abs(ref).max() > 0, "a reference of zeros would prove nothing"
            np.testing.assert_allclose(got[name], ref, rtol=0, atol=1e-6, err_msg=name)
    # the printed summary and the timing table (one row per stage and a total)
    k = len(load(artifact).stages)
    for name, ref in want.items():
        assert f"{name}: {ref.dtype}{list(ref.shape)} [" in proc.stdout
    table = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith(("stage_", "total"))]
    assert table == [f"stage_{i}" for i in range(k)] + ["total"]
    assert "(2 runs)" in proc.stdout


@pytest.mark.slow
def test_embedding_example_matches_python_runtime(cpp_build, gpt2_artifact):
    """The README's embedding example (library API: Pipeline::load, run) on inputs of ones."""
    from cachefit.runtime import load

    proc = _run(cpp_build / "cachefit-embed-example", gpt2_artifact)
    assert proc.returncode == 0, proc.stderr
    pipe = load(gpt2_artifact)
    want = pipe.run({d["name"]: np.ones(d["shape"], d["dtype"]) for d in pipe.inputs})
    lines = proc.stdout.splitlines()
    assert len(lines) == len(want)
    for line in lines:
        name, dtype, numel, first = line.split()
        assert dtype == str(want[name].dtype) and int(numel) == want[name].size
        assert float(first) == pytest.approx(float(want[name].reshape(-1)[0]), rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_devices_option(cpp_build, dense_artifact, tmp_path):
    """--devices maps stages onto devices: cpu for all works, a CUDA device for CPU code is refused."""
    np.savez(tmp_path / "in.npz", **_inputs(dense_artifact))
    ok = _run(cpp_build / "cachefit-run", dense_artifact, "-i", tmp_path / "in.npz", "--devices", "cpu",
              "--no-print-outputs")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == ""
    _assert_user_error(_run(cpp_build / "cachefit-run", dense_artifact, "-i", tmp_path / "in.npz",
                            "--devices", "cuda:0"), "stage 0 holds CPU code")
    _assert_user_error(_run(cpp_build / "cachefit-run", dense_artifact, "-i", tmp_path / "in.npz",
                            "--devices", "cpu,cpu"), "2 devices given for 3 stages")
    _assert_user_error(_run(cpp_build / "cachefit-run", dense_artifact, "-i", tmp_path / "in.npz",
                            "--devices", "tpu"), "unknown device 'tpu'")


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_tampered_stage_library_is_refused_before_any_library_loads(cpp_build, dense_artifact, tmp_path):
    """A changed byte in stage_1.so: checksum error naming the file; and a tampered last file stops the run
    before stage_0.so is opened (the dynamic loader's log, LD_DEBUG=files, shows no stage library)."""
    np.savez(tmp_path / "in.npz", **_inputs(dense_artifact))
    bad = _copy(dense_artifact, tmp_path / "tampered")
    lib = bytearray((bad / "stage_1.so").read_bytes())
    lib[len(lib) // 2] ^= 0x01
    (bad / "stage_1.so").write_bytes(bytes(lib))
    _assert_user_error(_run(cpp_build / "cachefit-run", bad, "-i", tmp_path / "in.npz"),
                       "stage_1.so does not match its checksum", "refusing to load it")

    env = dict(os.environ, LD_DEBUG="files")
    intact = _run(cpp_build / "cachefit-run", dense_artifact, "-i", tmp_path / "in.npz", env=env)
    assert intact.returncode == 0 and "stage_0.so" in intact.stderr  # the log does show loaded stages
    late = _copy(dense_artifact, tmp_path / "tampered_last")
    with open(late / "stage_2.safetensors", "ab") as f:
        f.write(b"\0")
    proc = _run(cpp_build / "cachefit-run", late, "-i", tmp_path / "in.npz", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "stage_2.safetensors does not match its checksum" in proc.stderr
    assert "stage_0.so" not in proc.stderr and "stage_1.so" not in proc.stderr


@pytest.mark.slow
def test_missing_stage_file(cpp_build, dense_artifact, tmp_path):
    np.savez(tmp_path / "in.npz", **_inputs(dense_artifact))
    for victim in ("stage_1.safetensors", "stage_2.so", "manifest.json"):
        bad = _copy(dense_artifact, tmp_path / f"missing_{victim}")
        (bad / victim).unlink()
        _assert_user_error(_run(cpp_build / "cachefit-run", bad, "-i", tmp_path / "in.npz"), victim, "is missing")
    _assert_user_error(_run(cpp_build / "cachefit-run", tmp_path / "nowhere", "-i", tmp_path / "in.npz"),
                       "does not exist")


@pytest.mark.slow
def test_bad_inputs(cpp_build, gpt2_artifact, tmp_path):
    """Wrong shape, wrong dtype, a missing and an unknown input, a missing inputs file: the message names the
    tensor with the expected and the given values."""
    good = _inputs(gpt2_artifact)
    (name, arr), = good.items()
    cases = {
        "shape": ({name: np.zeros((1, 8), arr.dtype)}, [f"input '{name}' has shape [1, 8], the model expects [1, 16]"]),
        "dtype": ({name: arr.astype(np.int32)}, [f"input '{name}' has dtype int32, the model expects int64"]),
        "missing": ({"other": arr}, ["unknown input 'other'"]),
        "absent": ({}, [f"input '{name}' (int64[1, 16]) is missing"]),
    }
    for case, (arrays, needles) in cases.items():
        np.savez(tmp_path / f"{case}.npz", **arrays)
        _assert_user_error(_run(cpp_build / "cachefit-run", gpt2_artifact, "-i", tmp_path / f"{case}.npz"), *needles)
    _assert_user_error(_run(cpp_build / "cachefit-run", gpt2_artifact, "-i", tmp_path / "none.npz"), "cannot open")
    usage = _run(cpp_build / "cachefit-run", gpt2_artifact)
    _assert_user_error(usage, "-i INPUTS.npz")


@pytest.mark.slow
def test_bad_manifests(cpp_build, dense_artifact, tmp_path):
    """A newer format version, broken JSON, a broken stage chain, a path outside the artifact: refused."""
    np.savez(tmp_path / "in.npz", **_inputs(dense_artifact))

    def edited(tag, edit):
        bad = _copy(dense_artifact, tmp_path / tag)
        manifest = json.loads((bad / "manifest.json").read_text())
        edit(manifest)
        (bad / "manifest.json").write_text(json.dumps(manifest))
        return bad

    newer = edited("newer", lambda m: m.update(format_version=2))
    _assert_user_error(_run(cpp_build / "cachefit-run", newer, "-i", tmp_path / "in.npz"),
                       "format version 2, newer than this runtime reads (up to 1)")
    chain = edited("chain", lambda m: m["stages"][1]["inputs"][0].update(shape=[1, 2, 3]))
    _assert_user_error(_run(cpp_build / "cachefit-run", chain, "-i", tmp_path / "in.npz"),
                       "stage 1's inputs", "are not stage 0's outputs")
    escape = edited("escape", lambda m: m["stages"][0]["library"].update(file="../stage_0.so"))
    _assert_user_error(_run(cpp_build / "cachefit-run", escape, "-i", tmp_path / "in.npz"),
                       "must be a plain file name")
    nofield = edited("nofield", lambda m: m["stages"][2].pop("params"))
    _assert_user_error(_run(cpp_build / "cachefit-run", nofield, "-i", tmp_path / "in.npz"),
                       "stages[2] has no field 'params'")
    broken = _copy(dense_artifact, tmp_path / "broken")
    (broken / "manifest.json").write_text('{"format": "cachefit-artifact", ')
    _assert_user_error(_run(cpp_build / "cachefit-run", broken, "-i", tmp_path / "in.npz"), "not valid JSON")


@pytest.mark.slow
def test_weights_file_that_disagrees_with_the_manifest(cpp_build, dense_artifact, tmp_path):
    """A weights file rewritten with a wrong shape (and its checksum updated): refused, naming the weight."""
    from cachefit.runtime.weights import load_weights, save_weights

    np.savez(tmp_path / "in.npz", **_inputs(dense_artifact))
    bad = _copy(dense_artifact, tmp_path / "weights")
    weights = load_weights(bad / "stage_1.safetensors")
    first = next(name for name, w in weights.items() if w.ndim >= 2)
    weights[first] = weights[first].reshape(-1)
    save_weights(bad / "stage_1.safetensors", weights)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["stages"][1]["weights"]["sha256"] = hashlib.sha256((bad / "stage_1.safetensors").read_bytes()).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    _assert_user_error(_run(cpp_build / "cachefit-run", bad, "-i", tmp_path / "in.npz"),
                       f"weight '{first}' is F32[", "the manifest says float32[")


def _cuda_driver_missing() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return True
    return False


@pytest.mark.slow
def test_cuda_stages_without_a_gpu_driver(cpp_build, dense_artifact, tmp_path):
    """On a machine without the NVIDIA driver, CUDA stages fail with a message about the driver, no crash."""
    if not _cuda_driver_missing():
        pytest.skip("this machine has a CUDA driver; the no-driver message cannot be provoked here")
    np.savez(tmp_path / "in.npz", **_inputs(dense_artifact))
    bad = _copy(dense_artifact, tmp_path / "cuda")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["target"] = {"kind": "cuda", "arch": "sm_90a"}
    for st in manifest["stages"]:
        st["device"]["kind"] = "cuda"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    _assert_user_error(_run(cpp_build / "cachefit-run", bad, "-i", tmp_path / "in.npz"),
                       "TVM's CUDA runtime", "libcuda.so.1")


# --- the host CPU check (manifest target.cpu_features) -------------------------------------------


def _fake_cpuinfo(path: Path, model: str, flags) -> Path:
    """A /proc/cpuinfo-format file of two processors (only the first one's lines count)."""
    text = "".join(f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\n"
                   f"flags\t\t: {' '.join(flags)}\n\n" for i in range(2))
    path.write_text(text)
    return path


@pytest.mark.slow
def test_cpu_flag_map_mirrors_python(cpp_build):
    """The C++ table (cachefit-run --print-cpu-flag-map) is cachefit.runtime.loader.CPUINFO_FLAGS, in order."""
    from cachefit.runtime.loader import CPUINFO_FLAGS

    proc = _run(cpp_build / "cachefit-run", "--print-cpu-flag-map")
    assert proc.returncode == 0, proc.stderr
    pairs = [tuple(line.split()) for line in proc.stdout.splitlines()]
    assert pairs == list(CPUINFO_FLAGS.items())


@pytest.mark.slow
def test_host_without_the_artifacts_isa_is_refused(cpp_build, dense_artifact, tmp_path):
    """A manifest claiming AVX-512 features a (fake, CACHEFIT_CPUINFO) host lacks: cachefit-run exits 2 naming
    the artifact's mcpu, the host's model name and the missing features, before any stage library is
    loaded; the library throws CpuFeatureError with those fields; Python refuses the same host alike."""
    from cachefit.errors import ArtifactError
    from cachefit.runtime import loader

    np.savez(tmp_path / "in.npz", **_inputs(dense_artifact))
    art = _copy(dense_artifact, tmp_path / "claims_avx512")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["target"].update(mcpu="sapphirerapids", cpu_features=["avx", "avx2", "fma", "avx512f", "avx512vnni"])
    (art / "manifest.json").write_text(json.dumps(manifest))
    old = _fake_cpuinfo(tmp_path / "old_cpuinfo", "Old Test CPU", ["fpu", "sse2", "avx", "avx2", "fma", "avx512_bw"])
    env = dict(os.environ, CACHEFIT_CPUINFO=str(old), LD_DEBUG="files")

    proc = _run(cpp_build / "cachefit-run", art, "-i", tmp_path / "in.npz", env=env)
    _assert_user_error(proc, "was compiled for CPU 'sapphirerapids'", "whose code uses avx512f, avx512vnni",
                       "this host's CPU (Old Test CPU) lacks them", "illegal instruction", "--mcpu x86-64-v3")
    assert "stage_0.so" not in proc.stderr  # refused before the dynamic loader saw any stage library
    lib = _run(cpp_build / "cachefit-selftest", "load", art, env=dict(os.environ, CACHEFIT_CPUINFO=str(old)))
    assert lib.returncode == 3, (lib.stdout, lib.stderr)
    assert lib.stdout.strip() == ("CpuFeatureError mcpu=sapphirerapids host=Old Test CPU "
                                  "missing=avx512f,avx512vnni kind_artifact=1")
    # the Python runtime, given the same cpuinfo file, refuses the same features
    with pytest.raises(ArtifactError, match="avx512f, avx512vnni; this host's CPU \\(Old Test CPU\\) lacks them"):
        loader.check_host_cpu(manifest, art, cpu=loader.host_cpu(old))

    # one missing feature ("it"); features outside the table are not checked, as in Python
    manifest["target"]["cpu_features"] = ["avx2", "avx512vnni", "sse4.2", "made-up"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    _assert_user_error(_run(cpp_build / "cachefit-run", art, "-i", tmp_path / "in.npz", env=env),
                       "whose code uses avx512vnni; this host's CPU (Old Test CPU) lacks it")

    # the unedited artifact (compiled for this host) on a host with no SIMD at all
    bare = _fake_cpuinfo(tmp_path / "bare_cpuinfo", "No-SIMD CPU", ["fpu", "sse2"])
    real = json.loads((dense_artifact / "manifest.json").read_text())["target"]
    assert real["kind"] == "llvm" and real["cpu_features"], real
    proc = _run(cpp_build / "cachefit-run", dense_artifact, "-i", tmp_path / "in.npz",
                env=dict(os.environ, CACHEFIT_CPUINFO=str(bare)))
    _assert_user_error(proc, "No-SIMD CPU", f"was compiled for CPU '{real['mcpu']}'",
                       f"whose code uses {', '.join(f for f in real['cpu_features'] if f in loader.CPUINFO_FLAGS)};")


@pytest.mark.slow
def test_host_with_the_artifacts_isa_runs_and_matches_python(cpp_build, dense_artifact, tmp_path):
    """A (fake) host with every feature the manifest claims runs, with outputs equal to Python's bit for bit;
    so do a manifest without cpu_features (older builds) on a bare host and a cpuinfo without a flags line
    (a warning on stderr: nothing to check against). A CACHEFIT_CPUINFO that cannot be read, or a
    cpu_features that is not a list of strings, is refused."""
    from cachefit.runtime import load
    from cachefit.runtime.loader import CPUINFO_FLAGS

    inputs = _inputs(dense_artifact, seed=5)
    np.savez(tmp_path / "in.npz", **inputs)
    want = load(dense_artifact).run(inputs)
    features = json.loads((dense_artifact / "manifest.json").read_text())["target"]["cpu_features"]
    has_all = _fake_cpuinfo(tmp_path / "has_all", "New Test CPU",
                            ["fpu", "sse2", *(CPUINFO_FLAGS[f] for f in features if f in CPUINFO_FLAGS)])

    def run_ok(artifact, cpuinfo, tag):
        proc = _run(cpp_build / "cachefit-run", artifact, "-i", tmp_path / "in.npz", "-o", tmp_path / f"{tag}.npz",
                    "--no-print-outputs", env=dict(os.environ, CACHEFIT_CPUINFO=str(cpuinfo)))
        assert proc.returncode == 0, proc.stderr
        with np.load(tmp_path / f"{tag}.npz") as got:
            assert sorted(got.files) == sorted(want)
            for name, ref in want.items():
                assert np.abs(ref).max() > 0, "a reference of zeros would prove nothing"
                np.testing.assert_array_equal(got[name], ref, err_msg=name)
        return proc

    assert "warning" not in run_ok(dense_artifact, has_all, "has_all").stderr

    bare = _fake_cpuinfo(tmp_path / "bare", "No-SIMD CPU", ["fpu", "sse2"])
    older = _copy(dense_artifact, tmp_path / "older")
    manifest = json.loads((older / "manifest.json").read_text())
    for key in ("mcpu", "mattr", "cpu_features"):
        manifest["target"].pop(key)
    (older / "manifest.json").write_text(json.dumps(manifest))
    assert "warning" not in run_ok(older, bare, "older").stderr

    no_flags = tmp_path / "arm_cpuinfo"
    no_flags.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n")
    proc = run_ok(dense_artifact, no_flags, "no_flags")
    assert "cachefit: warning:" in proc.stderr and "has no 'flags' line: not checking" in proc.stderr, proc.stderr

    _assert_user_error(_run(cpp_build / "cachefit-run", dense_artifact, "-i", tmp_path / "in.npz",
                            env=dict(os.environ, CACHEFIT_CPUINFO=str(tmp_path / "nowhere"))),
                       "CACHEFIT_CPUINFO names", "nowhere, which cannot be read")
    manifest["target"]["cpu_features"] = "avx2"
    (older / "manifest.json").write_text(json.dumps(manifest))
    _assert_user_error(_run(cpp_build / "cachefit-run", older, "-i", tmp_path / "in.npz"),
                       "target.cpu_features is not a list")
