"""codegen.build_artifact: per-stage libraries, weights files and the manifest (docs/artifact-format.md)."""

import hashlib
import json

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from cachefit.codegen import build_artifact, extract_stage, prepare_stage
from cachefit.codegen.pipeline import host_llvm_target
from cachefit.codegen import cuda as cuda_tools
from cachefit.errors import CachefitError, ModelError
from cachefit.passes.split_stages import SplitStages
from cachefit.runtime.weights import load_weights


@I.ir_module
class TiedResidual:
    """embed (tied weight) -> layers.0 -> layers.1 (+ residual from embed) -> head (tied weight)."""

    @R.function(private=True)
    def layer_0(ids: R.Tensor((2, 16), "float32"), emb: R.Tensor((16, 16), "float32")) -> R.Tensor((2, 16), "float32"):
        R.func_attr({"cachefit.layer": 0, "cachefit.layer_name": "embed"})
        with R.dataflow():
            gv = R.matmul(ids, emb)
            R.output(gv)
        return gv

    @R.function(private=True)
    def layer_1(h: R.Tensor((2, 16), "float32"), w1: R.Tensor((16, 16), "float32")) -> R.Tensor((2, 16), "float32"):
        R.func_attr({"cachefit.layer": 1, "cachefit.layer_name": "layers.0"})
        with R.dataflow():
            gv = R.nn.relu(R.matmul(h, w1))
            R.output(gv)
        return gv

    @R.function(private=True)
    def layer_2(a: R.Tensor((2, 16), "float32"), h: R.Tensor((2, 16), "float32"), w2: R.Tensor((16, 16), "float32")) -> R.Tensor((2, 16), "float32"):
        R.func_attr({"cachefit.layer": 2, "cachefit.layer_name": "layers.1"})
        with R.dataflow():
            gv = R.add(R.matmul(a, w2), h)
            R.output(gv)
        return gv

    @R.function(private=True)
    def layer_3(z: R.Tensor((2, 16), "float32"), emb: R.Tensor((16, 16), "float32")) -> R.Tensor((2, 16), "float32"):
        R.func_attr({"cachefit.layer": 3, "cachefit.layer_name": "head"})
        with R.dataflow():
            gv = R.matmul(z, R.permute_dims(emb))
            R.output(gv)
        return gv

    @R.function
    def main(ids: R.Tensor((2, 16), "float32"), emb: R.Tensor((16, 16), "float32"), w1: R.Tensor((16, 16), "float32"), w2: R.Tensor((16, 16), "float32")) -> R.Tensor((2, 16), "float32"):
        R.func_attr({"num_input": 1})
        cls = TiedResidual
        with R.dataflow():
            h = cls.layer_0(ids, emb)
            a = cls.layer_1(h, w1)
            z = cls.layer_2(a, h, w2)
            out = cls.layer_3(z, emb)
            R.output(out)
        return out


def tied_params(seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((16, 16)).astype("float32") for n in ("emb", "w1", "w2")}


GROUPS = [(0, 0), (1, 2), (3, 3)]


@pytest.fixture(scope="module")
def llvm_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art")
    plan = {"strategy": "test", "capacity_bytes": 1000,
            "stages": [{"index": i, "device": i, "first_layer": a, "last_layer": b, "weight_bytes": 1024 * (i + 1)}
                       for i, (a, b) in enumerate(GROUPS)]}
    build_artifact(SplitStages(GROUPS)(TiedResidual), tied_params(), plan, "llvm", out,
                   model_name="tied", model_sha256="ab" * 32, output_names=["logits"])
    return out


def test_manifest_describes_stages_and_files(llvm_artifact):
    """The manifest lists each stage's layers, device, files with their sha256, and the tensor signatures."""
    m = json.loads((llvm_artifact / "manifest.json").read_text())
    assert m["format"] == "cachefit-artifact" and m["format_version"] == 1
    assert m["model"] == {"name": "tied", "sha256": "ab" * 32}
    assert m["target"]["kind"] == "llvm" and m["target"]["arch"] is None
    assert m["target"]["mcpu"] == str(host_llvm_target(tvm.target.Target({"kind": "llvm"})).attrs["mcpu"])
    assert m["target"]["mattr"] is None and "avx" in m["target"]["cpu_features"]
    assert m["plan"]["strategy"] == "test" and m["plan"]["stages"][1]["weight_bytes"] == 2048
    assert m["inputs"] == [{"name": "ids", "shape": [2, 16], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "logits", "shape": [2, 16], "dtype": "float32"}]
    assert [(s["layers"]["first"], s["layers"]["last"]) for s in m["stages"]] == GROUPS
    assert [s["layers"]["names"] for s in m["stages"]] == [["embed"], ["layers.0", "layers.1"], ["head"]]
    assert [s["device"] for s in m["stages"]] == [{"kind": "cpu", "index": i} for i in range(3)]
    for s in m["stages"]:
        for key, suffix in (("library", ".so"), ("weights", ".safetensors")):
            f = llvm_artifact / s[key]["file"]
            assert s[key]["file"] == f"stage_{s['index']}{suffix}"
            assert hashlib.sha256(f.read_bytes()).hexdigest() == s[key]["sha256"]
            assert f.stat().st_size == s[key]["bytes"]
    # the residual (embed:0) crosses the first cut with nothing else; after stage 1 only layers.1:0 is live
    assert [d["name"] for d in m["stages"][0]["outputs"]] == ["embed:0"]
    assert [d["name"] for d in m["stages"][1]["outputs"]] == ["layers.1:0"]
    assert m["stages"][1]["inputs"] == m["stages"][0]["outputs"]
    assert m["stages"][2]["outputs"] == m["outputs"]


def test_transfers_have_the_bytes_of_the_cut(llvm_artifact):
    m = json.loads((llvm_artifact / "manifest.json").read_text())
    assert [(t["from_stage"], t["to_stage"]) for t in m["transfers"]] == [(0, 1), (1, 2)]
    for t, s in zip(m["transfers"], m["stages"]):
        assert [x["name"] for x in t["tensors"]] == [d["name"] for d in s["outputs"]]
        assert t["bytes"] == sum(x["bytes"] for x in t["tensors"]) == 2 * 16 * 4


def _panels(w, panel, transposed=False):
    """numpy's view of the matmul weight packing: W[K, N] (W[N, K] transposed) -> [N / P, K, P]."""
    if transposed:
        n, k = w.shape
        return w.reshape(n // panel, panel, k).transpose(0, 2, 1)
    k, n = w.shape
    return w.reshape(k, n // panel, panel).transpose(1, 0, 2)


def test_each_stage_stores_only_its_weights_and_a_tied_weight_in_both(llvm_artifact):
    """A stage's weights file holds the weights its layers read, pre-packed as its matmuls read them
    (column panels, the manifest saying what each was packed from); the tied embedding is in
    stages 0 and 2, packed once as it is (stage 0) and once transposed (stage 2's ``emb.T``)."""
    params = tied_params()
    stored = [load_weights(llvm_artifact / f"stage_{i}.safetensors") for i in range(3)]
    assert [sorted(w) for w in stored] == [["emb.packed"], ["w1.packed", "w2.packed"], ["emb.packed"]]
    m = json.loads((llvm_artifact / "manifest.json").read_text())
    assert [[p["name"] for p in s["params"]] for s in m["stages"]] == [["emb.packed"], ["w1.packed", "w2.packed"],
                                                                      ["emb.packed"]]
    for i, (s, w) in enumerate(zip(m["stages"], stored)):
        for d in s["params"]:
            src = d["packed_from"]
            assert src["shape"] == [16, 16] and src["dtype"] == "float32" and src["pack"]
            assert d["shape"] == list(w[d["name"]].shape) and d["dtype"] == "float32"
            panel = d["shape"][2]
            assert d["shape"] == [16 // panel, 16, panel]
            np.testing.assert_array_equal(w[d["name"]], _panels(params[src["name"]], panel, transposed=i == 2))


def test_extract_stage_keeps_only_its_functions():
    split = SplitStages(GROUPS)(TiedResidual)
    sub = extract_stage(split, 1)
    assert sorted(gv.name_hint for gv in sub.get_global_vars()) == ["layer_1", "layer_2", "stage_1"]
    prepared = prepare_stage(split, 1)
    assert [gv.name_hint for gv in prepared.get_global_vars()] == ["main"]
    assert [p.name for p in prepared["main"].params] == ["a0", "w0", "w1"]
    assert prepared["main"].attrs["global_symbol"] == "main"
    assert not any(str(k).startswith("cachefit.") for k in prepared["main"].attrs.keys())


def test_plan_that_does_not_match_the_stages_is_refused(tmp_path):
    plan = {"stages": [{"first_layer": 0, "last_layer": 1}, {"first_layer": 2, "last_layer": 3}]}
    with pytest.raises(CachefitError, match=r"do not match the module's stages"):
        build_artifact(SplitStages(GROUPS)(TiedResidual), tied_params(), plan, "llvm", tmp_path)


def test_missing_or_misshapen_weight_is_a_model_error(tmp_path):
    params = tied_params()
    del params["w2"]
    with pytest.raises(ModelError, match="'w2'"):
        build_artifact(SplitStages(GROUPS)(TiedResidual), params, None, "llvm", tmp_path)
    params = tied_params()
    params["w1"] = params["w1"].astype("float16")
    with pytest.raises(ModelError, match="'w1' is float16"):
        build_artifact(SplitStages(GROUPS)(TiedResidual), params, None, "llvm", tmp_path)


def test_unknown_target_is_refused(tmp_path):
    with pytest.raises(CachefitError, match="unknown target 'rocm'"):
        build_artifact(SplitStages(GROUPS)(TiedResidual), tied_params(), None, "rocm", tmp_path)


def test_cuda_without_toolkit_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(cuda_tools, "DEFAULT_NVCC", str(tmp_path / "no-nvcc"))
    with pytest.raises(cuda_tools.CudaToolchainError, match="no nvcc was found"):
        build_artifact(SplitStages(GROUPS, target="cuda")(TiedResidual), tied_params(), None, "cuda", tmp_path / "o")


def test_malformed_arch_is_refused(tmp_path):
    with pytest.raises(CachefitError, match="malformed CUDA arch"):
        build_artifact(SplitStages(GROUPS)(TiedResidual), tied_params(), None, "cuda", tmp_path, arch="90")


def test_device_code_kinds_reads_fatbin_and_cubin_headers(tmp_path):
    blob = tmp_path / "x.bin"
    cubin_header = b"\x7fELF" + bytes(14) + cuda_tools.EM_CUDA.to_bytes(2, "little")
    host_header = b"\x7fELF" + bytes(14) + (62).to_bytes(2, "little")
    blob.write_bytes(host_header + b"junk" + cuda_tools.FATBIN_MAGIC + bytes(8) + cubin_header)
    assert cuda_tools.device_code_kinds(blob) == {"fatbin": 1, "cubin": 1, "source": False}
    blob.write_bytes(host_header + b'extern "C" __global__ void k() {}')
    assert cuda_tools.device_code_kinds(blob) == {"fatbin": 0, "cubin": 0, "source": True}


@pytest.mark.slow
def test_cuda_stages_carry_compiled_device_code(tmp_path):
    """--target cuda: one library per stage, each with a fatbin for sm_90a built by nvcc, no CUDA source."""
    out = build_artifact(SplitStages([(0, 1), (2, 3)], target="cuda")(TiedResidual), tied_params(), None, "cuda",
                         tmp_path, arch="sm_90a")
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"] == {"kind": "cuda", "arch": "sm_90a"}
    assert [s["device"] for s in m["stages"]] == [{"kind": "cuda", "index": 0}, {"kind": "cuda", "index": 1}]
    for s in m["stages"]:
        kinds = cuda_tools.device_code_kinds(out / s["library"]["file"])
        assert kinds["fatbin"] >= 1, kinds
        assert not kinds["source"], kinds


def _odd_names_module():
    """Two layers whose input and weights have names that are not C identifiers (zoo-style)."""
    bb = relax.BlockBuilder()
    for i, wname in enumerate(["conv1/w:0", "conv2/w:0"]):
        x = relax.Var("gpu_0/data_0", relax.TensorType((4, 8), "float32"))
        w = relax.Var(wname, relax.TensorType((8, 8), "float32"))
        with bb.function(f"layer_{i}", [x, w], {"cachefit.layer": i, "cachefit.layer_name": f"l{i}"}, private=True):
            with bb.dataflow():
                y = relax.op.matmul(x, w)
                o = bb.emit_output(relax.op.nn.relu(y) if i == 0 else relax.op.add(y, x))
            bb.emit_func_output(o)
    mod = bb.get()
    params = [relax.Var(n, relax.TensorType(s, "float32")) for n, s in
              (("gpu_0/data_0", (4, 8)), ("conv1/w:0", (8, 8)), ("conv2/w:0", (8, 8)))]
    bb = relax.BlockBuilder(mod)
    with bb.function("main", params, {"num_input": 1}):
        with bb.dataflow():
            a = bb.emit(relax.Call(mod.get_global_var("layer_0"), [params[0], params[1]]))
            b = bb.emit_output(relax.Call(mod.get_global_var("layer_1"), [a, params[2]]))
        bb.emit_func_output(b)
    return bb.get()


@pytest.mark.slow
def test_cuda_build_with_non_identifier_tensor_names(tmp_path):
    """Names like gpu_0/data_0 and conv1/w:0 reach nvcc only sanitised; the manifest keeps the real names.
    Without a GPU, loading the CUDA artifact is a clear error naming the device."""
    import cachefit.runtime as rt
    from cachefit.errors import ArtifactError

    rng = np.random.default_rng(0)
    params = {n: rng.standard_normal((8, 8)).astype("float32") for n in ("conv1/w:0", "conv2/w:0")}
    out = build_artifact(SplitStages([(0, 0), (1, 1)], target="cuda")(_odd_names_module()), params, None, "cuda",
                         tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    assert m["inputs"][0]["name"] == "gpu_0/data_0"
    assert [s["params"][0]["name"] for s in m["stages"]] == ["conv1/w:0", "conv2/w:0"]
    for s in m["stages"]:
        assert cuda_tools.device_code_kinds(out / s["library"]["file"])["fatbin"] >= 1
    assert load_weights(out / "stage_1.safetensors")["conv2/w:0"].tobytes() == params["conv2/w:0"].tobytes()
    if not tvm.cuda(0).exist:
        with pytest.raises(ArtifactError, match=r"stage 0 needs device cuda:0.*which this machine does not have"):
            rt.load(out)


def _chain(n_layers: int):
    """n identical layers relu(x @ w_i) (different weights, same shapes)."""
    bb = relax.BlockBuilder()
    for i in range(n_layers):
        x = relax.Var("x", relax.TensorType((2, 16), "float32"))
        w = relax.Var(f"w{i}", relax.TensorType((16, 16), "float32"))
        with bb.function(f"layer_{i}", [x, w], {"cachefit.layer": i, "cachefit.layer_name": f"layers.{i}"}, private=True):
            with bb.dataflow():
                o = bb.emit_output(relax.op.nn.relu(relax.op.matmul(x, w)))
            bb.emit_func_output(o)
    mod = bb.get()
    params = [relax.Var("x", relax.TensorType((2, 16), "float32"))]
    params += [relax.Var(f"w{i}", relax.TensorType((16, 16), "float32")) for i in range(n_layers)]
    bb = relax.BlockBuilder(mod)
    with bb.function("main", params, {"num_input": 1}):
        with bb.dataflow():
            h = params[0]
            for i in range(n_layers):
                h = bb.emit(relax.Call(mod.get_global_var(f"layer_{i}"), [h, params[1 + i]]))
            out = bb.emit_output(h)
        bb.emit_func_output(out)
    return bb.get()


def test_identical_stages_are_compiled_once(tmp_path):
    """Stages made of identical layers share one compiled library (copied, same sha256), each with its
    own weights; the pipeline still computes the whole chain."""
    import cachefit.runtime as rt

    rng = np.random.default_rng(0)
    params = {f"w{i}": rng.standard_normal((16, 16)).astype("float32") / 4 for i in range(4)}
    split = SplitStages([(0, 0), (1, 1), (2, 3)])(_chain(4))
    out = build_artifact(split, params, None, "llvm", tmp_path / "reuse")
    m = json.loads((out / "manifest.json").read_text())
    assert [s.get("reused_from") for s in m["stages"]] == [None, 0, None]
    assert m["stages"][0]["library"]["sha256"] == m["stages"][1]["library"]["sha256"]
    assert {s["function"] for s in m["stages"]} == {"main"}
    x = rng.standard_normal((2, 16)).astype("float32")
    want = x
    for i in range(4):
        want = np.maximum(want @ params[f"w{i}"], 0)
    got = rt.load(out).run({"x": x})["layers.3:0"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    out2 = build_artifact(split, params, None, "llvm", tmp_path / "noreuse", reuse_identical_stages=False)
    m2 = json.loads((out2 / "manifest.json").read_text())
    assert [s.get("reused_from") for s in m2["stages"]] == [None, None, None]
    np.testing.assert_array_equal(rt.load(out2).run({"x": x})["layers.3:0"], got)


# ---------------------------------------------------------------------------------------------
# the CPU an llvm artifact needs (manifest target.mcpu / cpu_features), compile flags
# ---------------------------------------------------------------------------------------------


def test_host_without_the_artifacts_isa_is_refused():
    """An llvm artifact whose code uses AVX-512 is refused on a CPU without it (the error names the
    artifact's mcpu, the host CPU and the missing features); a CPU with them, a CUDA artifact or an
    older manifest without cpu_features pass."""
    from cachefit.errors import ArtifactError
    from cachefit.runtime.loader import check_host_cpu

    manifest = {"target": {"kind": "llvm", "arch": None, "mcpu": "sapphirerapids",
                           "cpu_features": ["avx", "avx2", "fma", "avx512f", "avx512vnni"]}}
    avx2_only = ("Old Test CPU", {"fpu", "avx", "avx2", "fma"})
    with pytest.raises(ArtifactError) as err:
        check_host_cpu(manifest, "build", cpu=avx2_only)
    text = str(err.value)
    assert "'sapphirerapids'" in text and "Old Test CPU" in text and "avx512f, avx512vnni" in text
    assert "--mcpu" in text
    check_host_cpu(manifest, "build", cpu=("New Test CPU", {"avx", "avx2", "fma", "avx512f", "avx512_vnni"}))
    check_host_cpu({"target": {"kind": "cuda", "arch": "sm_90a"}}, "build", cpu=avx2_only)
    check_host_cpu({"target": {"kind": "llvm", "arch": None}}, "build", cpu=avx2_only)
    # a malformed field (a string is not a list of features) is refused, not read letter by letter
    with pytest.raises(ArtifactError, match="cpu_features must be a list"):
        check_host_cpu({"target": {"kind": "llvm", "cpu_features": "avx512f"}}, "build", cpu=avx2_only)


def test_load_checks_the_host_cpu(llvm_artifact, tmp_path, monkeypatch):
    """cachefit.runtime.load applies the check before loading any library."""
    import shutil

    import cachefit.runtime as rt
    from cachefit.errors import ArtifactError
    from cachefit.runtime import loader

    art = tmp_path / "art"
    shutil.copytree(llvm_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    assert "avx512f" in m["target"]["cpu_features"] or "avx2" in m["target"]["cpu_features"]
    monkeypatch.setattr(loader, "host_cpu", lambda path=loader.CPUINFO: ("No-SIMD CPU", {"fpu", "sse2"}))
    with pytest.raises(ArtifactError, match="No-SIMD CPU"):
        rt.load(art)
    monkeypatch.undo()
    assert rt.load(art).run({"ids": np.zeros((2, 16), "float32")})["logits"].shape == (2, 16)


def _mlp_onnx(tmp_path):
    import onnx

    from cachefit.codegen import cpu_refmodels as ref

    path = tmp_path / "mlp.onnx"
    onnx.save(ref.mlp(batch=4, width=64, layers=2), str(path))
    return path


def test_compile_mcpu_and_tuning_records_flags(tmp_path, monkeypatch):
    """cachefit compile --mcpu x86-64-v3 records that CPU (AVX2, no AVX-512) in the manifest and the
    stages still compute the model; --tuning-records reaches compile_relax."""
    from click.testing import CliRunner

    import cachefit.runtime as rt
    from cachefit.cli import main
    from cachefit.codegen import pipeline
    from cachefit.compiler import reference_outputs

    seen = []
    real = pipeline.compile_relax

    def spy(*args, **kwargs):
        seen.append((kwargs.get("tuning_records"), str(args[1].attrs.get("mcpu"))))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compile_relax", spy)
    records = tmp_path / "records"
    records.mkdir()
    (records / "cachefit_tuning.json").write_text(json.dumps({"format": "cachefit-cpu-tuning", "version": 1,
                                                              "records": {}}))
    model = _mlp_onnx(tmp_path)
    out = tmp_path / "build"
    res = CliRunner().invoke(main, ["compile", str(model), "--devices", "2", "--mcpu", "x86-64-v3",
                                    "--tuning-records", str(records), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert seen and all(s == (str(records), "x86-64-v3") for s in seen)
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"]["mcpu"] == "x86-64-v3"
    assert "avx2" in m["target"]["cpu_features"] and "avx512f" not in m["target"]["cpu_features"]
    x = np.random.default_rng(0).standard_normal((4, 64)).astype("float32")
    got = rt.load(out).run({m["inputs"][0]["name"]: x})
    want = reference_outputs(model, {m["inputs"][0]["name"]: x})
    for name, ref in want.items():
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("flags, words", [
    (["--mcpu", "not-a-cpu"], ["'not-a-cpu'", "x86-64-v3"]),
    (["--tuning-records", "nowhere/at/all"], ["nowhere/at/all", "does not exist"]),
    (["--target", "cuda", "--mcpu", "x86-64-v3"], ["--mcpu", "--arch"]),
])
def test_bad_compile_flags_are_user_errors(tmp_path, flags, words):
    from click.testing import CliRunner

    from cachefit.cli import main

    res = CliRunner().invoke(main, ["compile", str(_mlp_onnx(tmp_path)), *flags, "-o", str(tmp_path / "b")])
    assert res.exit_code == 2, res.output
    assert all(w in res.output for w in words), res.output
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_manifest_lists_every_source_of_a_pack_of_several_weights():
    """A pack computed from several weights (a batch norm folded into a conv weight reads w, gamma,
    var) is described by its first source and lists all of them under ``sources``; a pack of one
    weight has no ``sources``; an unpacked weight keeps its own description."""
    import tvm

    from cachefit.codegen.artifact import _stage_weights
    from cachefit.codegen.prepack import PackedParam

    descs = [{"name": n, "shape": s, "dtype": "float32"} for n, s in
             (("w", [4, 3, 1, 1]), ("gamma", [4]), ("var", [4]), ("b", [4]))]
    originals = [np.ones(d["shape"], "float32") for d in descs]

    class Compiled:  # what build_artifact reads of a CompiledModule
        def params(self, func):
            assert func == "main"
            return [PackedParam(0, "cachefit_bn_fold_weight", (4, 3, 1, 1), "float32", (0, 1, 2)),
                    PackedParam(3, "weight_panels", (1, 4, 4), "float32", (3,)),
                    PackedParam(1, None, (4,), "float32", (1,))]

        def pack(self, arrays, func):
            return [tvm.runtime.tensor(np.full(s, i, "float32")) for i, s in enumerate([(4, 3, 1, 1), (1, 4, 4)])] + \
                [tvm.runtime.tensor(arrays[1])]

    out, tensors = _stage_weights(Compiled(), "main", descs, originals)
    assert [d["name"] for d in out] == ["w.packed", "b.packed", "gamma"]
    assert out[0]["packed_from"]["name"] == "w"
    assert [s["name"] for s in out[0]["packed_from"]["sources"]] == ["w", "gamma", "var"]
    assert out[0]["packed_from"]["sources"][1] == {"name": "gamma", "shape": [4], "dtype": "float32"}
    assert "sources" not in out[1]["packed_from"] and out[2] == descs[1]
    assert sorted(tensors) == ["b.packed", "gamma", "w.packed"]
