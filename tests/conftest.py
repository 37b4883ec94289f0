"""Shared test fixtures: where the test models live, a session cache of analysed models, and a
small builder for hand-made ONNX graphs.

Test models are named by one string (see :func:`model_source`):

- a :mod:`cachefit.models` preset (``mlp-tiny``, ``dense-tiny``, ``moe-tiny``), built in memory;
- a file of ``tests/data`` (``gpt2_dynamo.onnx``), the exported transformers listed in models.json;
- a light CNN of the onnx package's backend test data (``light_resnet50``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import onnx
import pytest
from onnx import TensorProto, helper

# shared fixture modules of this folder (``relax_fixtures``) import by name from any test file; the
# folder is no package, and pytest's default import mode puts it on sys.path only as a side effect
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

DATA_DIR = Path(__file__).parent / "data"
EXPORTED = json.loads((DATA_DIR / "models.json").read_text())["models"]
EXPORTED_FILES = [e["file"] for e in EXPORTED]
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_CNNS = sorted(p.stem for p in LIGHT_DIR.glob("light_*.onnx"))
TINY_PRESETS = ["mlp-tiny", "dense-tiny", "moe-tiny"]


def model_source(name: str) -> onnx.ModelProto | Path:
    """The model a test-model name stands for: a ModelProto for presets, else a file path."""
    if name.startswith("light_"):
        return LIGHT_DIR / f"{name}.onnx"
    if name.endswith(".onnx"):
        return DATA_DIR / name
    from cachefit.models import build

    return build(name)


def load_test_model(name: str) -> onnx.ModelProto:
    """The ONNX model behind a test-model name, as written (weights loaded)."""
    src = model_source(name)
    return src if isinstance(src, onnx.ModelProto) else onnx.load(str(src))


@pytest.fixture(scope="session")
def analyzed() -> Callable:
    """``analyzed(name, **options)`` -> :class:`cachefit.analysis.ModelAnalysis`, computed once per
    session for each (name, options); options are :func:`cachefit.analysis.analyze_onnx`'s."""
    from cachefit.analysis import analyze_onnx

    cache: dict = {}

    def get(name: str, **options):
        key = (name, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items())))
        if key not in cache:
            cache[key] = analyze_onnx(model_source(name), **options)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def compiled_artifact(tmp_path_factory) -> Callable[..., Path]:
    """``compiled_artifact(name, devices)`` -> the artifact folder of ``compile_model(name, target="llvm",
    cache="1GB", strategy="balanced", devices=devices)``, compiled once per session for each (name,
    devices) and shared by every test that asks for it (``name`` as in :func:`model_source`; presets
    are exported to a file first, as ``cachefit compile`` users have them). Compiling is most of the
    cost of tests that run artifacts, so tests must treat the folder as read-only: copy it
    (``shutil.copytree``) before changing any file."""
    from cachefit.compiler import compile_model

    cache: dict = {}

    def get(name: str, devices: int) -> Path:
        key = (name, devices)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"artifact_{name.replace('.', '_')}_k{devices}")
            if name.startswith("light_") or name.endswith(".onnx"):
                src = model_source(name)
            else:
                from cachefit.models import export

                src = export(name, root / f"{name}.onnx")
            compile_model(src, target="llvm", out_dir=root / "art", cache="1GB", strategy="balanced",
                          devices=devices)
            cache[key] = root / "art"
        return cache[key]

    return get


def make_onnx_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, int, Sequence[int | str] | None]],
    outputs: Sequence[tuple[str, int, Sequence[int | str] | None]],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = 17,
    extra_opsets: dict[str, int] | None = None,
    ir_version: int = 9,
) -> onnx.ModelProto:
    """A small ONNX model: inputs/outputs as (name, TensorProto elem type, shape or None);
    IR 9 so that onnxruntime accepts it."""
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        list(initializers),
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)


@pytest.fixture
def onnx_model() -> Callable[..., onnx.ModelProto]:
    """The :func:`make_onnx_model` builder, as a fixture."""
    return make_onnx_model


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
