"""Build an artifact directory: one compiled library and one weights file per stage, plus manifest.json."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from .. import __version__
from ..errors import CachefitError, ModelError
from ..passes.split_stages import _Rebind, stage_names
from ..runtime.loader import sha256_file
from ..runtime.weights import numpy_dtype, save_weights
from . import cuda as cuda_tools
from .prepack import CompiledModule

logger = logging.getLogger(__name__)

FORMAT = "cachefit-artifact"
FORMAT_VERSION = 1
TARGETS = ("llvm", "cuda")
#: the VM function every stage library exports (``stages[i].function`` in the manifest)
ENTRY = "main"


def make_target(target: str, arch: str = "sm_90a", mcpu: str | None = None) -> tvm.target.Target:
    """The TVM target for ``"llvm"`` (with ``mcpu`` when given, else the pipeline picks this host's
    CPU) or ``"cuda"`` (with ``arch``, host llvm)."""
    if target == "llvm":
        if mcpu:
            from tvm.target.codegen import (  # pylint: disable=import-outside-toplevel
                llvm_get_system_triple,
                llvm_is_valid_cpu,
            )

            if not llvm_is_valid_cpu(str(mcpu), str(llvm_get_system_triple())):
                raise CachefitError(f"--mcpu {mcpu!r} is not a CPU LLVM knows for {llvm_get_system_triple()}; use an "
                                    "LLVM CPU name such as x86-64-v3, skylake-avx512 or sapphirerapids, or leave "
                                    "--mcpu out to compile for this host's CPU")
            return tvm.target.Target({"kind": "llvm", "mcpu": str(mcpu)})
        return tvm.target.Target({"kind": "llvm"})
    if target == "cuda":
        cuda_tools._arch_number(arch)
        # 48 KB is the static shared memory a block may use on every arch (more needs a dynamic opt-in)
        return tvm.target.Target({"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152,
                                  "max_threads_per_block": 1024, "thread_warp_size": 32}, host={"kind": "llvm"})
    raise CachefitError(f"unknown target {target!r}: use 'llvm' (CPU stages) or 'cuda' (GPU stages)")


def extract_stage(mod: tvm.IRModule, index: int) -> tvm.IRModule:
    """Stage ``index`` of a split module on its own: ``stage_<index>`` and every function it calls."""
    name = f"stage_{index}"
    try:
        root = mod.get_global_var(name)
    except (ValueError, KeyError, tvm.error.TVMError) as exc:  # pragma: no cover - depends on TVM's error type
        raise CachefitError(f"the module has no function {name}; run SplitStages first") from exc
    keep = {root}
    todo = [root]
    while todo:
        func = mod[todo.pop()]
        if not isinstance(func, relax.Function):
            continue
        for gv in relax.analysis.all_global_vars(func):
            if gv not in keep:
                keep.add(gv)
                todo.append(gv)
    sub = tvm.IRModule({gv: mod[gv] for gv in keep}, attrs=mod.attrs)
    for key, infos in mod.global_infos.items():
        if key != "vdevice":
            sub.update_global_info(key, infos)
    return sub


def _compile_relax(mod: tvm.IRModule, target: tvm.target.Target, threads: int | None,
                   tuning_records: str | None = None, prepack: bool = False):
    """Compile one stage module: the CPU-kernels pipeline when present, else TVM's default pipeline
    (with ``prepack``: a ``CompiledModule``, whose weights are the original ones on that fallback)."""
    try:
        from .pipeline import compile_relax  # the house pipeline (CPU schedules, dlight for GPUs)
    except ImportError:
        compile_relax = None
    if compile_relax is not None:
        return compile_relax(mod, target, threads=threads, tuning_records=tuning_records, prepack=prepack)
    ex = tvm.compile(mod, target)
    return CompiledModule(ex, {}) if prepack else ex


def prepare_stage(mod: tvm.IRModule, index: int) -> tvm.IRModule:
    """Stage ``index`` of a split module as it is compiled: its functions alone (``extract_stage``), the
    layer functions inlined, the entry renamed ``main`` (exported symbol included), parameters renamed
    by position (``a0..`` activations, ``w0..`` weights: no user tensor name reaches generated C or
    CUDA code) and the ``cachefit.*`` attributes dropped. Two stages made of identical layers give
    structurally equal modules, which ``build_artifact`` compiles once.
    """
    sub = relax.transform.InlinePrivateFunctions()(extract_stage(mod, index))
    name = f"stage_{index}"
    func = sub[name]
    n_in = int(func.attrs["num_input"])
    params = [relax.Var(f"a{i}" if i < n_in else f"w{i - n_in}", p.ty) for i, p in enumerate(func.params)]
    body = _Rebind(dict(zip(func.params, params))).visit_expr(func.body)
    new = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
    for key in list(func.attrs.keys()):
        if str(key).startswith("cachefit."):
            new = new.without_attr(key)
    new = new.with_attr("global_symbol", ENTRY)
    funcs = {gv: f for gv, f in sub.functions_items() if gv.name_hint != name}
    funcs[tvm.ir.GlobalVar(ENTRY)] = new
    out = tvm.IRModule(funcs, attrs=sub.attrs)
    for key, infos in sub.global_infos.items():
        out.update_global_info(key, infos)
    return out


def compile_stage(stage_mod: tvm.IRModule, target: str, *, arch: str = "sm_90a", threads: int | None = None,
                  mcpu: str | None = None, tuning_records: str | None = None, prepack: bool = False):
    """Compile one prepared stage module (``prepare_stage``) for ``target`` -> ``relax.Executable``.

    prepack: weights pre-packed at compile time (``cachefit.codegen.prepack``); returns a
    :class:`~cachefit.codegen.prepack.CompiledModule`: the executable, plus ``pack``, which turns
    the stage's weights into the (pre-packed) weights its ``main`` takes.
    Uses ``cachefit.codegen.pipeline.compile_relax`` (CPU schedules, dlight for GPUs) when present, else
    TVM's default pipeline. For CUDA the kernels are compiled by nvcc into a fatbin for ``arch`` during
    the build (raises :class:`~cachefit.codegen.cuda.CudaToolchainError` without a toolkit).
    mcpu: the CPU to compile llvm stages for (default: this host's); tuning_records: see
    ``compile_relax``.
    """
    tgt = make_target(target, arch, mcpu=mcpu)
    if target == "cuda":
        with cuda_tools.nvcc_device_code(arch), tgt:
            return _compile_relax(stage_mod, tgt, threads, tuning_records, prepack)
    return _compile_relax(stage_mod, tgt, threads, tuning_records, prepack)


def _tensor_desc(name: str, ty) -> dict:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise ModelError(f"tensor {name!r} has type {ty}; a stage boundary needs a tensor of static shape")
    try:
        shape = [int(d) for d in ty.shape]
    except (TypeError, ValueError) as exc:
        raise ModelError(f"tensor {name!r} has a dynamic shape {ty.shape}; give static input shapes "
                         "(--input-shapes) before compiling") from exc
    return {"name": name, "shape": shape, "dtype": str(ty.dtype)}


def _out_types(func: relax.Function) -> list:
    ret = func.ret_ty
    if isinstance(ret, relax.TupleType):
        return list(ret.fields)
    return [ret]


def _nbytes(desc: dict) -> int:
    return int(np.prod(desc["shape"], dtype=np.int64)) * numpy_dtype(desc["dtype"]).itemsize


def build_artifact(
    mod: tvm.IRModule,
    params: Mapping[str, np.ndarray],
    plan: Mapping | None,
    target: str,
    out_dir: str | Path,
    *,
    arch: str = "sm_90a",
    model_name: str = "model",
    model_sha256: str | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    threads: int | None = None,
    reuse_identical_stages: bool = True,
    progress: Callable[[str], None] | None = None,
    mcpu: str | None = None,
    tuning_records: str | None = None,
) -> Path:
    """Compile every stage of a split module and write the artifact directory (docs/artifact-format.md).

    mod:          the output of :class:`~cachefit.passes.split_stages.SplitStages` (``stage_i`` functions).
    params:       weight name -> array, for every weight any stage reads (a weight shared by two stages
                  is written into both stages' weights files).
    plan:         the partition plan as a plain dict (``Plan.to_dict()``), stored in the manifest; its
                  ``stages[i].first_layer/last_layer`` must match the stages. ``None``: a minimal plan
                  made from the stages.
    target:       ``"llvm"`` (CPU stages) or ``"cuda"`` (GPU stages, device code for ``arch``).
    input_names / output_names: the model's input and output names as users know them (default: the
                  IR's names; outputs without a name are ``output_<k>``).
    threads:      passed to the CPU pipeline (``cachefit.codegen.pipeline.compile_relax``) when present.
    reuse_identical_stages: a stage whose prepared module (``prepare_stage``) is structurally equal to
                  an earlier stage's gets a copy of that stage's library instead of a new compile
                  (transformer stages of identical blocks); the manifest says ``reused_from``.
    progress:     called with one line per finished stage.
    mcpu:         the CPU llvm stages are compiled for (default: this host's, ``host_llvm_target``);
                  recorded in the manifest's ``target``, checked by the runtimes at load.
    tuning_records: tile records (``cachefit.codegen.cpu_tuning``) or a meta-schedule database,
                  passed to ``compile_relax``.
    Weights are stored as the compiled stage reads them: a weight that a kernel wants in another
    layout (``cachefit.codegen.prepack``: matmul column panels, packed conv weights) is stored
    pre-packed, described in the manifest's ``params`` with ``packed_from``.
    Returns the artifact directory.
    """
    if target not in TARGETS:
        raise CachefitError(f"unknown target {target!r}: use 'llvm' (CPU stages) or 'cuda' (GPU stages)")
    names = stage_names(mod)
    if not names:
        raise CachefitError("the module has no stage functions (cachefit.stage); run SplitStages before build_artifact")
    k = len(names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if target == "cuda":
        cuda_tools.find_nvcc()  # fail before any work without a toolkit

    stages = []
    funcs = [mod[n] for n in names]
    for s, func in enumerate(funcs):
        attrs = func.attrs
        first, last = int(attrs["cachefit.first_layer"]), int(attrs["cachefit.last_layer"])
        in_names = [str(x) for x in attrs["cachefit.input_names"]]
        out_names = [str(x) for x in attrs["cachefit.output_names"]]
        p_names = [str(x) for x in attrs["cachefit.param_names"]]
        n_in = len(in_names)
        ins = [_tensor_desc(n, p.ty) for n, p in zip(in_names, func.params[:n_in])]
        pars = [_tensor_desc(n, p.ty) for n, p in zip(p_names, func.params[n_in:])]
        outs = [_tensor_desc(n, t) for n, t in zip(out_names, _out_types(func))]
        stages.append({"first": first, "last": last, "inputs": ins, "params": pars, "outputs": outs})

    # Model-level names as the user knows them.
    if input_names is not None:
        if len(input_names) != len(stages[0]["inputs"]):
            raise CachefitError(f"input_names has {len(input_names)} names, the model has {len(stages[0]['inputs'])} inputs")
        for d, n in zip(stages[0]["inputs"], input_names):
            d["name"] = str(n)
    if output_names is not None:
        if len(output_names) != len(stages[-1]["outputs"]):
            raise CachefitError(f"output_names has {len(output_names)} names, the model has "
                                f"{len(stages[-1]['outputs'])} outputs")
        for d, n in zip(stages[-1]["outputs"], output_names):
            d["name"] = str(n)
    seen = set()
    for i, d in enumerate(stages[-1]["outputs"]):
        if d["name"] in seen:
            d["name"] = f"output_{i}"
        seen.add(d["name"])
    # the chaining rule: stage i+1's inputs are stage i's outputs (names follow the producer)
    for s in range(k - 1):
        for d_out, d_in in zip(stages[s]["outputs"], stages[s + 1]["inputs"]):
            d_in["name"] = d_out["name"]

    if plan is None:
        plan = {"stages": [{"index": s, "device": s, "first_layer": st["first"], "last_layer": st["last"]}
                           for s, st in enumerate(stages)]}
    plan = json.loads(json.dumps(plan, default=_json_default))
    plan_stages = plan.get("stages", [])
    if len(plan_stages) != k or any(
        int(ps.get("first_layer", -1)) != st["first"] or int(ps.get("last_layer", -1)) != st["last"]
        for ps, st in zip(plan_stages, stages)
    ):
        got = [(ps.get("first_layer"), ps.get("last_layer")) for ps in plan_stages]
        raise CachefitError(f"the plan's stages {got} do not match the module's stages "
                            f"{[(st['first'], st['last']) for st in stages]}; split with the plan's groups")

    layer_names = {}
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function) and f.attrs is not None and "cachefit.layer" in f.attrs:
            layer_names[int(f.attrs["cachefit.layer"])] = str(f.attrs.get("cachefit.layer_name", gv.name_hint))

    entries = []
    built: list = []  # (stage index, prepared module, compiled module) of the stages compiled so far
    total_t0 = time.perf_counter()
    for s, (name, st) in enumerate(zip(names, stages)):
        # the stage's weights, as the model has them
        originals = []
        for d in st["params"]:
            if d["name"] not in params or params[d["name"]] is None:
                raise ModelError(f"stage {s} reads weight {d['name']!r}, which is missing from params "
                                 "(a shape-only model cannot be compiled: load the weights)")
            arr = np.asarray(params[d["name"]])
            want = numpy_dtype(d["dtype"])
            if list(arr.shape) != d["shape"] or arr.dtype != want:
                raise ModelError(f"weight {d['name']!r} is {arr.dtype}{list(arr.shape)} but stage {s} expects "
                                 f"{d['dtype']}{d['shape']}")
            originals.append(arr)

        # library
        t0 = time.perf_counter()
        prepared = prepare_stage(mod, s)
        lib = out / f"{name}.so"
        reused_from = None
        if reuse_identical_stages:
            for earlier, earlier_mod, _ in built:
                if tvm_ffi.structural_equal(earlier_mod, prepared):
                    reused_from = earlier
                    break
        if reused_from is not None:
            shutil.copyfile(out / f"{names[reused_from]}.so", lib)
            compiled = next(c for e, _, c in built if e == reused_from)
        else:
            compiled = compile_stage(prepared, target, arch=arch, threads=threads, mcpu=mcpu,
                                     tuning_records=tuning_records, prepack=True)
            compiled.export_library(str(lib))
            built.append((s, prepared, compiled))

        # weights, pre-packed into the layouts the kernels read (compile-time weight packs)
        st["params"], tensors = _stage_weights(compiled, ENTRY, st["params"], originals)
        wfile = out / f"{name}.safetensors"
        save_weights(wfile, tensors, metadata={"format": "cachefit", "stage": str(s)})
        seconds = time.perf_counter() - t0
        if target == "cuda":
            kinds = cuda_tools.device_code_kinds(lib)
            if kinds["fatbin"] == 0 and kinds["cubin"] == 0:
                raise cuda_tools.CudaToolchainError(
                    f"{lib} holds no compiled device code for {arch} (only CUDA source): TVM's CUDA runtime did "
                    "not take the nvcc build; check the CUDA toolkit installation"
                )
        how = f"reused stage {reused_from}'s library" if reused_from is not None else f"compiled for {target}"
        logger.info("stage %d: layers %d..%d %s in %.1f s", s, st["first"], st["last"], how, seconds)
        if progress is not None:
            progress(f"stage {s}: layers {st['first']}..{st['last']} {how} in {seconds:.1f} s")
        entry = {
            "index": s,
            "name": name,
            "function": ENTRY,
            "layers": {"first": st["first"], "last": st["last"],
                       "names": [layer_names.get(i, f"layer_{i}") for i in range(st["first"], st["last"] + 1)]},
            "device": {"kind": "cpu" if target == "llvm" else "cuda", "index": s},
            "library": {"file": lib.name, "sha256": sha256_file(lib), "bytes": lib.stat().st_size},
            "weights": {"file": wfile.name, "sha256": sha256_file(wfile), "bytes": wfile.stat().st_size},
            "inputs": st["inputs"],
            "params": st["params"],
            "outputs": st["outputs"],
            "compile_seconds": round(seconds, 3),
        }
        if reused_from is not None:
            entry["reused_from"] = reused_from
        entries.append(entry)

    transfers = []
    for s in range(k - 1):
        tensors = [dict(d, bytes=_nbytes(d)) for d in stages[s]["outputs"]]
        transfers.append({"from_stage": s, "to_stage": s + 1, "bytes": sum(t["bytes"] for t in tensors),
                          "tensors": tensors})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cachefit_version": __version__,
        "model": {"name": model_name, "sha256": model_sha256},
        "target": _target_entry(target, arch, mcpu),
        "plan": plan,
        "inputs": stages[0]["inputs"],
        "outputs": stages[-1]["outputs"],
        "stages": entries,
        "transfers": transfers,
        "compile_seconds": round(time.perf_counter() - total_t0, 3),
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / "manifest.json")
    return out


def _stage_weights(compiled: CompiledModule, func: str, descs: list, originals: list) -> tuple[list, dict]:
    """(manifest params, name -> array) of the weights the compiled ``func`` takes, packed from the
    stage's original weights ``originals`` (described by ``descs``)."""
    layout = compiled.params(func)
    if layout is None:
        return descs, {d["name"]: a for d, a in zip(descs, originals)}
    packed = compiled.pack(originals, func)
    out_descs, tensors, seen = [], {}, {}
    for p, t in zip(layout, packed):
        src = descs[p.source]
        if p.pack is None:
            out_descs.append(src)
            tensors[src["name"]] = originals[p.source]
            continue
        k = seen[src["name"]] = seen.get(src["name"], -1) + 1
        name = f"{src['name']}.packed" + (str(k) if k else "")
        arr = t.numpy()
        packed_from = {"name": src["name"], "shape": list(src["shape"]), "dtype": src["dtype"], "pack": p.pack}
        if len(p.sources) > 1:  # a pack computed from several weights (a batch norm folded into a conv)
            packed_from["sources"] = [{"name": descs[i]["name"], "shape": list(descs[i]["shape"]),
                                       "dtype": descs[i]["dtype"]} for i in p.sources]
        out_descs.append({"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype), "packed_from": packed_from})
        tensors[name] = arr
    return out_descs, tensors


def _target_entry(target: str, arch: str, mcpu: str | None) -> dict:
    """The manifest's ``target``: kind, CUDA arch, and for llvm the CPU (``mcpu``) and its features."""
    entry = {"kind": target, "arch": arch if target == "cuda" else None}
    if target == "llvm":
        from .pipeline import host_llvm_target  # pylint: disable=import-outside-toplevel

        tgt = host_llvm_target(make_target("llvm", arch, mcpu=mcpu))
        entry["mcpu"] = str(tgt.attrs.get("mcpu") or "") or None
        mattr = tgt.attrs.get("mattr")
        entry["mattr"] = [str(a) for a in mattr] if mattr else None
        entry["cpu_features"] = target_cpu_features(tgt)
    return entry


#: x86 features whose absence makes code compiled for them fault (SIGILL); /proc/cpuinfo names
ISA_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd",
                "avx512vnni", "avx512bf16", "avx512fp16", "amx-tile")


def target_cpu_features(tgt: tvm.target.Target) -> list[str]:
    """The :data:`ISA_FEATURES` an llvm target's code may use (from its ``mcpu`` / ``mattr``)."""
    from tvm.target.codegen import llvm_cpu_has_features  # pylint: disable=import-outside-toplevel

    found = []
    for feat in ISA_FEATURES:
        try:
            if llvm_cpu_has_features([feat], tgt):
                found.append(feat)
        except Exception:  # noqa: BLE001 - a feature this LLVM does not know
            logger.debug("LLVM does not know CPU feature %s", feat)
    return found


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"plan value {obj!r} is not JSON serialisable")
