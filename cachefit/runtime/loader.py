"""Load an artifact directory (docs/artifact-format.md) and run its stages as a pipeline.

Runtime only: numpy and ``tvm.runtime``; nothing from cachefit's compiler side (no onnx, passes,
frontends, codegen or partition).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import ArtifactError, InputError
from .weights import load_weights, numpy_dtype

logger = logging.getLogger(__name__)

FORMAT = "cachefit-artifact"
SUPPORTED_VERSION = 1


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (the artifact's checksums)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(artifact_dir: str | Path) -> dict:
    """Read and check ``manifest.json`` (format, version, stage chaining); no file is loaded."""
    root = Path(artifact_dir)
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {root} does not exist; compile a model first (cachefit compile ... -o {root})")
    path = root / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {root} is not a cachefit artifact directory (compile with cachefit compile -o {root})")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a cachefit manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                            f"expected {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{path} has no integer format_version")
    if version > SUPPORTED_VERSION:
        raise ArtifactError(
            f"{path} has format version {version}, newer than this cachefit reads (up to {SUPPORTED_VERSION}); "
            "upgrade cachefit or recompile the model with this version"
        )
    stages = manifest.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ArtifactError(f"{path} lists no stages")
    try:
        _check_chain(manifest)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{path} is malformed: missing or wrong field {exc}") from exc
    return manifest


def _sig(descs) -> list:
    return [(d["name"], list(d["shape"]), d["dtype"]) for d in descs]


def _check_chain(manifest: dict) -> None:
    stages = manifest["stages"]
    if _sig(stages[0]["inputs"]) != _sig(manifest["inputs"]):
        raise ArtifactError("manifest.json: stage 0's inputs are not the model inputs")
    if _sig(stages[-1]["outputs"]) != _sig(manifest["outputs"]):
        raise ArtifactError("manifest.json: the last stage's outputs are not the model outputs")
    for i in range(len(stages) - 1):
        if _sig(stages[i]["outputs"]) != _sig(stages[i + 1]["inputs"]):
            raise ArtifactError(f"manifest.json: stage {i + 1}'s inputs are not stage {i}'s outputs "
                                f"({_sig(stages[i + 1]['inputs'])} vs {_sig(stages[i]['outputs'])})")
    for i, st in enumerate(stages):
        if st["index"] != i:
            raise ArtifactError(f"manifest.json: stage {i} has index {st['index']}")
        for key in ("library", "weights"):
            entry = st[key]
            if not isinstance(entry.get("file"), str) or "/" in entry["file"] or entry["file"].startswith("."):
                raise ArtifactError(f"manifest.json: stage {i}'s {key} file {entry.get('file')!r} must be a plain "
                                    "file name inside the artifact directory")
            if not isinstance(entry.get("sha256"), str):
                raise ArtifactError(f"manifest.json: stage {i}'s {key} file has no sha256")


def verify_files(artifact_dir: str | Path, manifest: dict) -> None:
    """Check every stage file exists and matches its sha256 (raises ArtifactError naming the file)."""
    root = Path(artifact_dir)
    for st in manifest["stages"]:
        for key in ("library", "weights"):
            entry = st[key]
            path = root / entry["file"]
            if not path.is_file():
                raise ArtifactError(f"{path} is missing (stage {st['index']}'s {key}); the artifact is incomplete: "
                                    "recompile or copy the whole directory")
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise ArtifactError(
                    f"{path} does not match its checksum in manifest.json (sha256 {digest[:16]}..., expected "
                    f"{entry['sha256'][:16]}...): the file was modified or corrupted; refusing to load it. "
                    "Recompile the model"
                )


#: LLVM feature names (the manifest's ``target.cpu_features``) -> Linux /proc/cpuinfo flags
#: (the source: the C++ runtime's ``cpuinfo_flag_map`` in cachefit/runtime/cpp/cachefit_runtime.cc mirrors it,
#: and tests/test_cpp_runtime.py compares the two; change both together)
CPUINFO_FLAGS = {"avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f",
                 "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512cd": "avx512cd",
                 "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
                 "amx-tile": "amx_tile"}
CPUINFO = "/proc/cpuinfo"


def host_cpu(path: str | Path = CPUINFO) -> tuple[str, set] | None:
    """(model name, flags) of this host's first CPU from /proc/cpuinfo; None where it cannot be read."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    name, flags = "unknown CPU", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name == "unknown CPU":
            name = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
    return (name, flags) if flags is not None else None


def check_host_cpu(manifest: dict, root: str | Path = ".", cpu: tuple[str, set] | None = None) -> None:
    """Refuse an llvm artifact whose code uses instruction-set extensions this host lacks.

    The manifest's ``target.cpu_features`` (LLVM names) are compared with the host's /proc/cpuinfo
    flags (``cpu``: (model name, flags) to check against instead). Manifests without the field and
    hosts without /proc/cpuinfo are not checked.
    """
    target = manifest.get("target") or {}
    needed = target.get("cpu_features")
    if target.get("kind") != "llvm" or not needed:
        return
    if not isinstance(needed, list) or not all(isinstance(f, str) for f in needed):
        raise ArtifactError(f"{root}/manifest.json is malformed: target.cpu_features must be a list of feature "
                            f"names, got {needed!r}")
    cpu = cpu if cpu is not None else host_cpu()
    if cpu is None:
        logger.info("cannot read %s: not checking the CPU features %s of %s", CPUINFO, needed, root)
        return
    name, flags = cpu
    missing = [f for f in needed if f in CPUINFO_FLAGS and CPUINFO_FLAGS[f] not in flags]
    if missing:
        raise ArtifactError(
            f"{root} was compiled for CPU {target.get('mcpu')!r}, whose code uses {', '.join(missing)}; this host's "
            f"CPU ({name}) lacks {'it' if len(missing) == 1 else 'them'}, and the stages would die of an illegal "
            "instruction. Recompile on this host, or with --mcpu naming a CPU this host has (e.g. --mcpu x86-64-v3 "
            "for AVX2 without AVX-512)"
        )


def _parse_device(spec, kind: str, index: int):
    import tvm

    if spec is None:
        return tvm.cpu(0) if kind == "cpu" else tvm.cuda(index)
    if isinstance(spec, tvm.runtime.Device):
        return spec
    text = str(spec).strip().lower()
    name, _, idx = text.partition(":")
    if name in ("cpu", "llvm"):
        return tvm.cpu(int(idx or 0))
    if name in ("cuda", "gpu"):
        return tvm.cuda(int(idx or 0))
    raise ArtifactError(f"unknown device {spec!r}: use 'cpu', 'cuda:<i>' or a tvm Device")


@dataclass
class Stage:
    """One loaded stage: its VM function on its device, with its weights resident there."""

    index: int
    name: str
    device: object
    input_names: list
    output_names: list
    layers: tuple
    library: Path
    _fn: object = field(repr=False, default=None)
    _params: list = field(repr=False, default_factory=list)
    _vm: object = field(repr=False, default=None)

    def __call__(self, args: list) -> list:
        result = self._fn(*args, *self._params)
        import tvm

        if isinstance(result, tvm.runtime.Tensor):
            return [result]
        return list(result)


class Pipeline:
    """The stages of an artifact, loaded on their devices; ``run`` passes inputs through all of them."""

    def __init__(self, manifest: dict, stages: list[Stage], root: Path):
        self.manifest = manifest
        self.stages = stages
        self.root = root
        self.inputs = [dict(d) for d in manifest["inputs"]]
        self.outputs = [dict(d) for d in manifest["outputs"]]
        self.last_stage_seconds: list[float] = []

    @property
    def input_names(self) -> list[str]:
        return [d["name"] for d in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [d["name"] for d in self.outputs]

    # --- pipelined execution: one worker thread per stage (cachefit.runtime.pipelined) -----------

    def start(self, **options):
        """Start one worker per stage (options of ``cachefit.runtime.pipelined.PipelinedRunner``:
        micro_batch, queue_depth, cores, ...), closing workers started before; returns the runner."""
        from .pipelined import PipelinedRunner

        self.close()
        self._runner = PipelinedRunner(self, **options)
        return self._runner

    def _pipelined(self):
        runner = getattr(self, "_runner", None)
        return runner if runner is not None and not runner.closed else self.start()

    def submit(self, inputs: Mapping[str, np.ndarray]):
        """Queue one request on the stage workers (started on first use); returns a
        ``concurrent.futures.Future`` of its outputs. Requests complete in submission order."""
        return self._pipelined().submit(inputs)

    def run_batches(self, batches, **options):
        """Outputs of every request of ``batches``, in order, run pipelined (``PipelinedRunner.run_batches``)."""
        return self._pipelined().run_batches(batches, **options)

    def close(self) -> None:
        """Finish the submitted requests and stop the stage workers (no-op when none were started)."""
        runner, self._runner = getattr(self, "_runner", None), None
        if runner is not None:
            runner.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_inputs(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if not isinstance(inputs, Mapping):
            raise InputError(f"inputs must be a dict of name -> array; expected names {self.input_names}")
        unknown = [n for n in inputs if n not in self.input_names]
        if unknown:
            raise InputError(f"unknown input {unknown[0]!r}; the model's inputs are {self.input_names}")
        arrays = []
        for d in self.inputs:
            name = d["name"]
            if name not in inputs:
                raise InputError(f"input {name!r} ({d['dtype']}{d['shape']}) is missing; the model's inputs are "
                                 f"{self.input_names}")
            arr = np.asarray(inputs[name])
            if list(arr.shape) != list(d["shape"]):
                raise InputError(f"input {name!r} has shape {list(arr.shape)}, the model expects {d['shape']} "
                                 "(recompile with --input-shapes for other shapes)")
            want = numpy_dtype(d["dtype"])
            if arr.dtype != want:
                raise InputError(f"input {name!r} has dtype {arr.dtype}, the model expects {d['dtype']}; "
                                 f"convert it (e.g. array.astype('{d['dtype']}'))")
            arrays.append(np.asarray(arr, order="C"))
        return arrays

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run every stage in order; returns the model outputs by name (numpy arrays on the host).

        Each stage's outputs are copied to the next stage's device. Per-stage wall times (seconds,
        including the copy into the stage) are left in ``last_stage_seconds``.
        """
        import tvm

        runner = getattr(self, "_runner", None)
        if runner is not None and not runner.closed:
            # the stage workers own the stage VMs while they run: calling a VM from this thread
            # at the same time would race with them, so the request goes through the workers
            return runner.run(inputs)
        joined = self._run_micro_batches(inputs)
        if joined is not None:
            return joined
        arrays = self._check_inputs(inputs)
        current = [tvm.runtime.tensor(a, self.stages[0].device) for a in arrays]
        times = []
        for stage in self.stages:
            t0 = time.perf_counter()
            args = [t if _same_device(t.device, stage.device) else t.copyto(stage.device) for t in current]
            current = stage(args)
            stage.device.sync()
            times.append(time.perf_counter() - t0)
        self.last_stage_seconds = times
        if len(current) != len(self.outputs):
            raise ArtifactError(f"the last stage returned {len(current)} tensors, the manifest lists "
                                f"{len(self.outputs)} outputs")
        return {d["name"]: t.numpy() for d, t in zip(self.outputs, current)}

    __call__ = run

    def _run_micro_batches(self, inputs) -> dict[str, np.ndarray] | None:
        """--micro-batch (cachefit.fit, ``plan.micro_batch`` in the manifest): the stages were compiled
        for a micro-batch; inputs of the full batch are split along axis 0 (the inputs whose leading
        dimension is the micro-batch), run one micro-batch after the other and the outputs joined
        along axis 0. None when there is nothing to split (inputs of the compiled shapes)."""
        mb = (self.manifest.get("plan") or {}).get("micro_batch")
        if not isinstance(mb, Mapping) or not isinstance(inputs, Mapping):
            return None
        batch, micro = int(mb["batch"]), int(mb["micro_batch"])
        split = {d["name"] for d in self.inputs if d["shape"] and d["shape"][0] == micro}
        if micro >= batch or batch % micro or not any(
                n in inputs and np.shape(inputs[n])[:1] == (batch,) for n in split):
            return None
        from .pipelined import join_rows, split_rows  # the pipelined runtime's splitting rules

        names = list(inputs)
        arrays = [np.asarray(inputs[n]) for n in names]
        batched = [n in split and a.shape[:1] == (batch,) for n, a in zip(names, arrays)]
        results, times = [], None
        for piece in split_rows(arrays, batched, micro):
            results.append(self.run(dict(zip(names, piece))))
            times = list(self.last_stage_seconds) if times is None else [t + u for t, u in zip(times, self.last_stage_seconds)]
        self.last_stage_seconds = times or []
        out_batched = [bool(d["shape"]) and d["shape"][0] == micro for d in self.outputs]
        joined = join_rows([[r[d["name"]] for d in self.outputs] for r in results], out_batched)
        return {d["name"]: a for d, a in zip(self.outputs, joined)}


def _dev_key(d) -> tuple[int, int]:
    return int(d.dlpack_device_type()), int(d.index)


def _same_device(a, b) -> bool:
    return _dev_key(a) == _dev_key(b)


def load(artifact_dir: str | Path, devices: Sequence | None = None) -> Pipeline:
    """Load a compiled artifact directory: verify every file's sha256, then load each stage on its device.

    devices: one device per stage (``"cpu"``, ``"cuda:1"`` or ``tvm.runtime.Device``), or a single one
             for all stages; default: the manifest's device (``cuda:i`` for GPU stage ``i``, ``cpu:0``
             for CPU stages).
    """
    import tvm
    from tvm.runtime.vm import VirtualMachine

    root = Path(artifact_dir)
    manifest = read_manifest(root)
    verify_files(root, manifest)  # before any native code is loaded
    check_host_cpu(manifest, root)
    k = len(manifest["stages"])
    if devices is not None and (isinstance(devices, (str, tvm.runtime.Device)) or not isinstance(devices, Sequence)):
        devices = [devices] * k
    if devices is not None and len(devices) != k:
        raise ArtifactError(f"{len(devices)} devices given for {k} stages; give one per stage or a single one")

    stages = []
    for i, st in enumerate(manifest["stages"]):
        kind = st["device"]["kind"]
        dev = _parse_device(devices[i] if devices is not None else None, kind, int(st["device"].get("index", i)))
        if kind == "cuda" and _dev_key(dev)[0] != _dev_key(tvm.cuda(0))[0]:
            raise ArtifactError(f"stage {i} holds CUDA code; it cannot run on {dev}")
        if kind == "cpu" and _dev_key(dev)[0] != _dev_key(tvm.cpu(0))[0]:
            raise ArtifactError(f"stage {i} holds CPU code; it cannot run on {dev}")
        if not dev.exist:
            raise ArtifactError(f"stage {i} needs device {dev}, which this machine does not have "
                                f"(pass devices=[...] / --devices to map stages onto the devices present)")
        lib_path = root / st["library"]["file"]
        try:
            lib = tvm.runtime.load_module(str(lib_path))
        except Exception as exc:  # noqa: BLE001 - TVM raises several types; name the file
            raise ArtifactError(f"cannot load {lib_path}: {exc}") from exc
        vm = VirtualMachine(lib, dev)
        try:
            fn = vm[st["function"]]
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"{lib_path} has no function {st['function']!r}") from exc
        w_path = root / st["weights"]["file"]
        weights = load_weights(w_path)
        params = []
        for d in st["params"]:
            if d["name"] not in weights:
                raise ArtifactError(f"{w_path} lacks weight {d['name']!r} that stage {i} needs")
            arr = weights[d["name"]]
            if list(arr.shape) != list(d["shape"]) or arr.dtype != numpy_dtype(d["dtype"]):
                raise ArtifactError(f"{w_path}: weight {d['name']!r} is {arr.dtype}{list(arr.shape)}, the manifest "
                                    f"says {d['dtype']}{d['shape']}")
            params.append(tvm.runtime.tensor(arr, dev))
        stages.append(Stage(
            index=i, name=st["name"], device=dev,
            input_names=[d["name"] for d in st["inputs"]], output_names=[d["name"] for d in st["outputs"]],
            layers=(st["layers"]["first"], st["layers"]["last"]), library=lib_path,
            _fn=fn, _params=params, _vm=vm,
        ))
        logger.info("loaded %s (layers %d..%d) on %s", st["name"], st["layers"]["first"], st["layers"]["last"], dev)
    return Pipeline(manifest, stages, root)
