"""From an ONNX file to plain per-layer records: import, discover layers, annotate footprints.

``analyze_onnx`` is what ``cachefit plan``, ``estimate`` and ``compile`` start from.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import onnx
import tvm
from tvm import relax

from .errors import CachefitError
from .frontends.onnx import ImportedModel, LoadedModel, import_onnx
from .partition.records import LayerRecord
from .passes import layering, run_pass
from .passes.annotate_footprint import AnnotateFootprint, normalize_dtype
from .passes.discover_layers import DiscoverLayers
from .passes.merge_layers import MergeLayers

log = logging.getLogger(__name__)


@dataclass
class ModelAnalysis:
    """A model ready for planning.

    mod:      the layered, footprint-annotated IRModule (docs/layered-ir.md).
    params:   weight name -> array (None values for shape-only models).
    layers:   one LayerRecord per layer, in order.
    imported: the import result (source file, names, cleaned ONNX).
    tokens_per_batch: batch x sequence length of the (first) input, for throughput figures.
    dtype:    the planning dtype override, if any.
    """

    mod: tvm.IRModule
    params: dict
    layers: list[LayerRecord]
    imported: ImportedModel
    tokens_per_batch: int
    dtype: str | None

    @property
    def name(self) -> str:
        return self.imported.source.name

    @property
    def shape_only(self) -> bool:
        return self.imported.source.shape_only


def layer_records(mod: tvm.IRModule) -> list[LayerRecord]:
    """The plain records of an annotated layered module (see AnnotateFootprint)."""
    out = []
    plan_dtype = str(mod.attrs["cachefit.plan_dtype"]) if mod.attrs is not None and "cachefit.plan_dtype" in mod.attrs else None
    for gv, fn in layering.layer_functions(mod):
        a = fn.attrs
        if "cachefit.weight_bytes" not in a:
            raise CachefitError("the module has no footprint attributes: run AnnotateFootprint first")
        params = {str(k): int(v) for k, v in a["cachefit.params"].items()}
        bits = (int(a["cachefit.weight_bits"]) if "cachefit.weight_bits" in a
                else _weight_bits(fn, int(a["cachefit.num_weights"]), plan_dtype))
        out.append(LayerRecord(
            name=str(a["cachefit.layer_name"]),
            weight_bytes=int(a["cachefit.weight_bytes"]),
            activation_bytes=int(a["cachefit.activation_bytes"]),
            buffer_bytes=int(a["cachefit.buffer_bytes"]),
            in_bytes=int(a["cachefit.in_bytes"]),
            out_bytes=int(a["cachefit.out_bytes"]),
            params=params,
            flops=int(a["cachefit.flops"]),
            bytes_moved=int(a["cachefit.bytes_moved"]),
            weight_bits=bits,
            batch=int(mod.attrs["cachefit.batch"]) if mod.attrs is not None and "cachefit.batch" in mod.attrs else 1,
        ))
    return out


def _weight_bits(fn, num_weights: int, plan_dtype: str | None) -> int:
    from .passes.annotate_footprint import _BITS

    ws = list(fn.params)[len(fn.params) - num_weights:] if num_weights else []
    best = None
    biggest = -1
    for p in ws:
        ty = p.ty
        if isinstance(ty, relax.TensorType) and ty.shape is not None:
            n = 1
            for d in ty.shape.values:
                n *= int(d)
            if n > biggest:
                biggest, best = n, str(ty.dtype)
    if best is None:
        return 32
    if plan_dtype and best.startswith(("float", "bfloat")):
        best = plan_dtype
    return _BITS.get(best, 32)


def layer_pipeline(layers: int | None = None, boundaries_done: bool = False, dtype: str | None = None) -> tvm.transform.Pass:
    """The analysis passes after import, in order (commented phases, disabled steps empty)."""
    return tvm.transform.Sequential([
        # 1. layers: cut points for models without scopes (a layered module passes through)
        DiscoverLayers(),
        # 2. the user's --layers N: merge adjacent layers into N
        MergeLayers(layers) if layers is not None else tvm.transform.Sequential([]),
        # 3. footprints per layer
        AnnotateFootprint(dtype=dtype),
    ], name="cachefit.analysis")


def analyze_onnx(
    source: str | os.PathLike | onnx.ModelProto | LoadedModel,
    *,
    input_shapes: Mapping[str, Sequence[int]] | str | None = None,
    batch: int | None = None,
    dtype: str | None = None,
    layers: int | None = None,
    layer_boundaries: Sequence[str] | None = None,
) -> ModelAnalysis:
    """Import an ONNX model and compute its per-layer records."""
    dtype = normalize_dtype(dtype)
    imported = import_onnx(source, input_shapes=input_shapes, batch=batch, layer_boundaries=layer_boundaries)
    mod = run_pass(layer_pipeline(layers, bool(layer_boundaries), dtype), imported.mod)
    b, tokens = _batch_and_tokens(mod)
    mod = mod.with_attr("cachefit.batch", b)
    return ModelAnalysis(mod=mod, params=imported.params, layers=layer_records(mod), imported=imported,
                         tokens_per_batch=tokens, dtype=dtype)


def _batch_and_tokens(mod) -> tuple[int, int]:
    """Batch = leading dimension of the first input; tokens = batch x seq for rank >= 2 inputs of
    token ids or [batch, seq, hidden] activations, else batch."""
    main = mod["main"]
    n_in = layering.num_input(main)
    if n_in == 0:
        return 1, 1
    ty = main.params[0].ty
    dims = [int(d) for d in ty.shape.values] if isinstance(ty, relax.TensorType) and ty.shape is not None else []
    if not dims:
        return 1, 1
    b = dims[0]
    if str(ty.dtype).startswith("int") and len(dims) >= 2:
        return b, b * dims[1]
    if len(dims) == 3:
        return b, b * dims[1]
    return b, b
