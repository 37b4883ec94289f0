"""End to end: ONNX -> plan -> k stages -> per-stage CPU libraries -> runtime pipeline.

The k-stage pipeline must match onnxruntime within 1e-4 of the output's scale and the unpartitioned
TVM module (the layered module's ``main`` compiled whole) within 1e-6.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

import cachefit.runtime as rt
from cachefit.analysis import analyze_onnx
from cachefit.codegen import compile_stage
from cachefit.compiler import compile_model, reference_outputs

DATA = Path(__file__).parent / "data"


def _inputs(pipe, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for d in pipe.inputs:
        if d["dtype"].startswith("int"):
            out[d["name"]] = rng.integers(0, 50, d["shape"]).astype(d["dtype"])
        else:
            out[d["name"]] = rng.standard_normal(d["shape"]).astype(d["dtype"])
    return out


def _scaled_error(got, want):
    return float(np.abs(got.astype("float64") - want).max() / (np.abs(want).max() + 1e-30))


def _unpartitioned(analysis, inputs_in_order, prepack: bool = False):
    """The layered module's main, compiled whole (same compiler pipeline as the stages; with
    ``prepack`` its weights pre-packed at compile time as ``build_artifact`` does: the CNNs need
    it, since their 3x3 convolutions run as Winograd only then) and run."""
    mod = analysis.mod
    compiled = compile_stage(relax.transform.InlinePrivateFunctions()(mod), "llvm", prepack=prepack)
    ex = compiled.executable if prepack else compiled
    vm = relax.VirtualMachine(ex, tvm.cpu())
    main = mod["main"]
    n_in = int(main.attrs["num_input"])
    weights = [np.asarray(analysis.params[p.name]) for p in main.params[n_in:]]
    weights = compiled.pack(weights) if prepack else [tvm.runtime.tensor(w) for w in weights]
    res = vm["main"](*[tvm.runtime.tensor(a) for a in inputs_in_order], *weights)
    return [res.numpy()] if isinstance(res, tvm.runtime.Tensor) else [r.numpy() for r in res]


# (model, k) whose artifact other test files compile with the same arguments (test_cpp_runtime):
# taken from conftest's session cache instead of compiled again
_SHARED = {("dense-tiny", 3), ("gpt2_legacy.onnx", 2)}


def check_model(path: Path, ks, tmp_path: Path, input_shapes=None, baseline_prepack: bool = False,
                shared=None, name: str | None = None):
    """``shared``: conftest's ``compiled_artifact``, used for the (``name``, k) in :data:`_SHARED`."""
    analysis = analyze_onnx(path, input_shapes=input_shapes)
    baseline = None
    for k in ks:
        if shared is not None and (name, k) in _SHARED and input_shapes is None:
            out = shared(name, k)
        else:
            out = tmp_path / f"k{k}"
            result = compile_model(path, target="llvm", out_dir=out, cache="1GB", strategy="balanced", devices=k,
                                   input_shapes=input_shapes, analysis=analysis)
            assert result.report.plan.devices_used == k
        manifest = json.loads((out / "manifest.json").read_text())
        assert len(manifest["stages"]) == k
        pipe = rt.load(out)
        inputs = _inputs(pipe)
        got = pipe.run(inputs)
        ref = reference_outputs(path, inputs)
        assert list(got) == [o for o in ref][: len(got)]
        for name, arr in got.items():
            err = _scaled_error(arr, ref[name])
            assert err <= 1e-4, f"{path.name} k={k} output {name}: error {err:.2e} vs onnxruntime"
        if baseline is None:
            baseline = _unpartitioned(analysis, [inputs[d["name"]] for d in pipe.inputs], baseline_prepack)
        for (name, arr), want in zip(got.items(), baseline):
            err = _scaled_error(arr, want)
            assert err <= 1e-6, f"{path.name} k={k} output {name}: error {err:.2e} vs the unpartitioned module"


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dense-tiny", "moe-tiny"])
def test_reference_models_k_stages(preset, tmp_path, compiled_artifact):
    from cachefit import models

    path = models.export(preset, tmp_path / f"{preset}.onnx")
    check_model(path, [2, 3, 4], tmp_path, baseline_prepack=True, shared=compiled_artifact, name=preset)


def _exported():
    meta = json.loads((DATA / "models.json").read_text())
    return [m["file"] for m in meta["models"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", _exported())
def test_exported_transformers_k_stages(name, tmp_path, compiled_artifact):
    ks = [2, 3, 4] if name == "gpt2_legacy.onnx" else [2]
    check_model(DATA / name, ks, tmp_path, baseline_prepack=True, shared=compiled_artifact, name=name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["squeezenet", "resnet50", "vgg19"])
def test_light_zoo_cnns_k_stages(name, tmp_path):
    import onnx

    from cachefit.codegen.cpu_refmodels import light_model

    path = tmp_path / f"{name}.onnx"
    onnx.save(light_model(name), str(path))
    # squeezenet at 2 and 4 stages (each k is a whole compile, ~40 s; 3 stages are exercised by
    # the reference models and gpt2_legacy); the larger CNNs at 2
    check_model(path, [2, 4] if name == "squeezenet" else [2], tmp_path, baseline_prepack=True)


def _model_path(name: str, tmp_path: Path) -> Path:
    if name in ("dense-tiny", "moe-tiny"):
        from cachefit import models

        return models.export(name, tmp_path / f"{name}.onnx")
    if name.endswith(".onnx"):
        return DATA / name
    import onnx

    from cachefit.codegen.cpu_refmodels import light_model

    path = tmp_path / f"{name}.onnx"
    onnx.save(light_model(name), str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense-tiny", "moe-tiny", "gpt2_legacy.onnx", "squeezenet"])
def test_cuda_k_stages_carry_device_code(name, tmp_path):
    """--target cuda: k per-GPU libraries, each with a fatbin for sm_90a and no CUDA source."""
    from cachefit.codegen.cuda import device_code_kinds

    path = _model_path(name, tmp_path)
    out = tmp_path / "cuda"
    compile_model(path, target="cuda", arch="sm_90a", out_dir=out, cache="1GB", strategy="balanced", devices=2)
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"] == {"kind": "cuda", "arch": "sm_90a"} and len(m["stages"]) == 2
    for s in m["stages"]:
        assert s["device"] == {"kind": "cuda", "index": s["index"]}
        kinds = device_code_kinds(out / s["library"]["file"])
        assert kinds["fatbin"] >= 1 and not kinds["source"], (s["name"], kinds)
