"""ONNX frontend: load, fix shapes, clean up, and import a model into cachefit's layered Relax IR.

The steps, each usable on its own:

1. :func:`load_model` reads a file (inline weights, external data, or *shape-only*: external data that
   was never materialised) and turns every failure into a :class:`~cachefit.errors.ModelError`.
2. :func:`apply_input_shapes` fixes dynamic input dimensions (tvmc-style ``x:[8,256]`` strings, or
   ``batch=N`` for the leading dimension) and refuses unknown names or leftover dynamic dimensions.
3. :func:`cleanup` makes exporter output importable: names sanitised, shape computations folded into
   constants, an empty-shape ``ConstantOfShape`` replaced by a scalar constant, shapes inferred.
4. :func:`import_onnx` imports the graph into Relax: the layer assignment of every node (from
   :mod:`cachefit.frontends.layers`) is carried across the import by importing each layer's subgraph
   on its own (TVM's importer drops node names), giving one private Relax function per layer and a
   ``main`` that chains them (docs/layered-ir.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError, ShapeError, UnsupportedOperatorError

log = logging.getLogger(__name__)

FLOAT_TYPES = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64",
}

DTYPE_NAMES = {
    TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64", TensorProto.INT64: "int64", TensorProto.INT32: "int32",
    TensorProto.INT16: "int16", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8",
    TensorProto.BOOL: "bool", TensorProto.UINT16: "uint16", TensorProto.UINT32: "uint32",
    TensorProto.UINT64: "uint64",
}

DTYPE_BITS = {
    "float32": 32, "float16": 16, "bfloat16": 16, "float64": 64, "int64": 64, "int32": 32,
    "int16": 16, "int8": 8, "uint8": 8, "bool": 8, "uint16": 16, "uint32": 32, "uint64": 64,
    "int4": 4, "uint4": 4,
}


def dtype_bytes(dtype: str) -> float:
    return DTYPE_BITS[str(dtype)] / 8


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """An ONNX model as cachefit holds it.

    model:       the ModelProto (external tensors left unloaded when ``shape_only``).
    path:        the file it came from (None for an in-memory model).
    sha256:      of the file bytes (of the serialised proto for in-memory models).
    shape_only:  the weights are declared but not materialised; only planning is possible.
    name:        a short model name (file stem or graph name).
    """

    model: onnx.ModelProto
    path: Path | None
    sha256: str
    shape_only: bool
    name: str


def _external_location(t: onnx.TensorProto) -> str | None:
    if t.data_location != TensorProto.EXTERNAL:
        return None
    for kv in t.external_data:
        if kv.key == "location":
            return kv.value
    return None


def load_model(source: str | os.PathLike | onnx.ModelProto) -> LoadedModel:
    """Read an ONNX model; weights in external files are loaded when the files exist.

    A model whose external data files are all absent is *shape-only*: its tensors are kept as
    declarations, enough to plan but not to compile or run. Some present and some absent is an
    error naming the missing file.
    """
    if isinstance(source, onnx.ModelProto):
        data = source.SerializeToString()
        model = source
        path = None
        name = source.graph.name or "model"
    else:
        path = Path(source)
        if not path.exists():
            raise ModelError(f"model file not found: {path}")
        if path.is_dir():
            raise ModelError(f"{path} is a directory, not an ONNX model file")
        data = path.read_bytes()
        if not data:
            raise ModelError(f"{path} is empty (0 bytes): not an ONNX model")
        try:
            model = onnx.load_model_from_string(data)
        except Exception as exc:  # protobuf DecodeError and friends
            raise ModelError(
                f"{path} is not a readable ONNX model ({len(data)} bytes; the protobuf parser says: "
                f"{str(exc).strip() or type(exc).__name__}). Is the file truncated or of another format?"
            ) from None
        name = path.stem
        if not model.graph.node and not model.graph.input and not model.graph.output:
            raise ModelError(
                f"{path} parsed as protobuf but holds no ONNX graph (no nodes, inputs or outputs): "
                "is it really an ONNX model?"
            )
    if not model.opset_import:
        raise ModelError(f"{path or name}: the model declares no opset (ONNX opset_import is empty)")

    sha = hashlib.sha256(data).hexdigest()
    externals = [t for t in model.graph.initializer if _external_location(t) is not None]
    shape_only = False
    if externals:
        base = path.parent if path is not None else Path(".")
        present = {loc: (base / loc).exists() for loc in {_external_location(t) for t in externals}}
        if all(present.values()):
            try:
                onnx.load_external_data_for_model(model, str(base))
            except Exception as exc:  # short file, location outside the model's folder, ...
                raise ModelError(
                    f"{path or name}: cannot read the external weights ({', '.join(sorted(present))} in {base}): "
                    f"{str(exc).strip() or type(exc).__name__}. Re-save the model with its data files "
                    "(onnx.save_model(..., save_as_external_data=True)), or remove them all to plan from shapes only"
                ) from None
        elif not any(present.values()):
            shape_only = True
            log.info("%s: external data %s absent: shape-only model", name, sorted(present))
        else:
            missing = sorted(k for k, v in present.items() if not v)
            raise ModelError(
                f"{path}: external weight files missing: {', '.join(missing)} (expected next to the model "
                f"in {base}); the other external files exist, so this is not a shape-only model"
            )
    return LoadedModel(model=model, path=path, sha256=sha, shape_only=shape_only, name=name)


# ---------------------------------------------------------------------------------------------
# Input shapes
# ---------------------------------------------------------------------------------------------

_SHAPE_ITEM = re.compile(r"\s*([^:,\[\]]+?)\s*:\s*\[([^\]]*)\]\s*")


def parse_input_shapes(text: str | None) -> dict[str, list[int]]:
    """Parse tvmc-style ``"x:[8,256] mask:[8,1]"`` (comma or space separated) into a dict."""
    if not text:
        return {}
    shapes: dict[str, list[int]] = {}
    pos = 0
    s = text.strip()
    while pos < len(s):
        m = _SHAPE_ITEM.match(s, pos)
        if not m:
            raise ShapeError(
                f"malformed --input-shapes {text!r} near {s[pos:]!r}: expected NAME:[d0,d1,...], "
                "e.g. \"x:[8,256] mask:[8,1]\""
            )
        name, dims = m.group(1), m.group(2)
        if name in shapes:
            raise ShapeError(f"--input-shapes gives input {name!r} twice ({text!r}): give each input once")
        try:
            shapes[name] = [int(d) for d in dims.split(",") if d.strip()] if dims.strip() else []
        except ValueError:
            raise ShapeError(f"malformed dimensions [{dims}] for input {name!r} in --input-shapes: use integers") from None
        if any(d <= 0 for d in shapes[name]):
            raise ShapeError(f"input {name!r}: dimensions must be positive, got [{dims}]")
        pos = m.end()
        while pos < len(s) and s[pos] in ", ":
            pos += 1
    return shapes


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs of a graph (old IR files also list every initializer as an input)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None  # type: ignore[return-value]
    out = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def apply_input_shapes(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None = None, batch: int | None = None
) -> onnx.ModelProto:
    """Return a copy of ``model`` whose inputs have the given static shapes.

    ``batch`` sets the leading dimension of every input whose leading dimension is dynamic (or all
    inputs' leading dimension when given explicitly). Every input must end fully static.
    """
    shapes = dict(shapes or {})
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ShapeError(f"--batch must be a positive integer, got {batch!r}")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    ins = {i.name: i for i in graph_inputs(m)}
    unknown = [n for n in shapes if n not in ins]
    if unknown:
        raise ShapeError(
            f"--input-shapes names {', '.join(map(repr, unknown))}, which the model does not have; "
            f"its inputs are: {', '.join(repr(n) for n in ins) or '(none)'}"
        )
    for name, vi in ins.items():
        dims = _dims(vi)
        if name in shapes:
            new = list(shapes[name])
            if dims is not None and len(dims) != len(new):
                raise ShapeError(
                    f"input {name!r} has rank {len(dims)} ({_fmt_dims(dims)}) but --input-shapes gives "
                    f"rank {len(new)} {new}"
                )
            if dims is not None:
                for ax, (old, nd) in enumerate(zip(dims, new)):
                    if isinstance(old, int) and old > 0 and old != nd:
                        raise ShapeError(
                            f"input {name!r} dimension {ax} is fixed to {old} in the model; "
                            f"--input-shapes asks for {nd}"
                        )
        else:
            if dims is None:
                raise ShapeError(f"input {name!r} has no shape in the model: give it with --input-shapes \"{name}:[...]\"")
            new = list(dims)
            if batch is not None and new:
                new[0] = batch
            for ax, d in enumerate(new):
                if not (isinstance(d, int) and d > 0):
                    raise ShapeError(
                        f"input {name!r} dimension {ax} is dynamic ({d!r} in {_fmt_dims(dims)}): "
                        f"give a static shape with --input-shapes \"{name}:[...]\""
                        + (" or --batch N" if ax == 0 else "")
                    )
        tt = vi.type.tensor_type
        tt.ClearField("shape")
        for d in new:
            tt.shape.dim.add().dim_value = int(d)
    # stale intermediate shapes would contradict the new input shapes
    del m.graph.value_info[:]
    for o in m.graph.output:
        o.type.tensor_type.ClearField("shape")
    return m


def _fmt_dims(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in (dims or [])) + "]"


# ---------------------------------------------------------------------------------------------
# Cleanup
# ---------------------------------------------------------------------------------------------

_SAFE = re.compile(r"[^A-Za-z0-9_]")


def _safe_name(name: str, taken: set[str]) -> str:
    base = _SAFE.sub("_", name).strip("_") or "t"
    if base[0].isdigit():
        base = "t_" + base
    cand, k = base, 1
    while cand in taken:
        cand = f"{base}_{k}"
        k += 1
    taken.add(cand)
    return cand


def sanitize_names(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Rename every tensor to a C identifier (names like ``gpu_0/data_0`` break CUDA codegen).

    Returns the renamed copy and the map new name -> original name. Node names are kept.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    taken: set[str] = set()
    ren: dict[str, str] = {"": ""}

    def r(n: str) -> str:
        if n not in ren:
            ren[n] = _safe_name(n, taken)
        return ren[n]

    for i in g.input:
        i.name = r(i.name)
    for t in g.initializer:
        t.name = r(t.name)
    for n in g.node:
        for k, x in enumerate(n.input):
            n.input[k] = r(x)
        for k, x in enumerate(n.output):
            n.output[k] = r(x)
    for o in g.output:
        o.name = r(o.name)
    for v in g.value_info:
        v.name = r(v.name)
    return m, {v: k for k, v in ren.items() if k}


_SIDE_EFFECT_OR_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_MAX_FOLD_ELEMS = 1 << 22
_MAX_CONST_NODE_ELEMS = 16


def fold_constants(model: onnx.ModelProto, weight_names: set[str]) -> onnx.ModelProto:
    """Evaluate, once, every node whose inputs are all known constants, and ``Shape``/``Size`` of
    statically shaped tensors; their results become initializers.

    ``weight_names`` are the model's floating-point weights: nodes reading them are left alone, so
    weights stay parameters (a quantizer or pruner can still see them). This resolves the shape
    arithmetic exporters emit (``Shape -> Gather -> Concat -> Reshape``) that TVM's importer would
    otherwise turn into dynamic shapes.
    """
    from onnx.reference import ReferenceEvaluator

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    shapes = _static_shapes(m)
    consts: dict[str, np.ndarray] = {}
    for t in g.initializer:
        if t.name not in weight_names and t.data_location != TensorProto.EXTERNAL:
            consts[t.name] = numpy_helper.to_array(t)
    opset = {o.domain: o.version for o in m.opset_import}
    keep: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    changed = False
    for node in g.node:
        out_vals: list[np.ndarray] | None = None
        if node.domain not in ("", "ai.onnx") or node.op_type in _SIDE_EFFECT_OR_RANDOM:
            keep.append(node)
            continue
        if node.op_type == "Constant":
            # stays a Constant node (an embedded constant, not a weight); its value feeds folding
            try:
                consts[node.output[0]] = _eval_node(ReferenceEvaluator, node, [], opset)[0]
            except Exception:
                pass
            keep.append(node)
            continue
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in consts:
            fill = _large_fill(node, consts[node.input[0]])
            if fill is not None:
                # a weight too large to materialise here (VGG's fc6 in the zoo's light models):
                # declared by shape and fill value, its array made only when asked for
                changed = True
                new_inits.append(fill)
                continue
        if node.op_type in ("Shape", "Size") and node.input and node.input[0] not in consts:
            shp = shapes.get(node.input[0])
            if shp is not None:
                if node.op_type == "Size":
                    out_vals = [np.array(int(np.prod(shp)), dtype=np.int64)]
                else:
                    start = next((a.i for a in node.attribute if a.name == "start"), 0)
                    end = next((a.i for a in node.attribute if a.name == "end"), None)
                    out_vals = [np.array(shp[start:end], dtype=np.int64)]
        elif all((x == "" or x in consts) for x in node.input) and node.input:
            if sum(consts[x].size for x in node.input if x) <= _MAX_FOLD_ELEMS:
                try:
                    vals = _eval_node(ReferenceEvaluator, node, [consts[x] if x else None for x in node.input], opset)
                    if all(v.size <= _MAX_FOLD_ELEMS for v in vals):
                        out_vals = vals
                except Exception as exc:  # leave the node for the importer
                    log.debug("not folding %s (%s): %s", node.name, node.op_type, exc)
        if out_vals is None:
            keep.append(node)
            continue
        changed = True
        for name, val in zip(node.output, out_vals):
            if name:
                val = np.asarray(val)
                consts[name] = val
                if val.dtype.kind != "f" or val.size > _MAX_CONST_NODE_ELEMS:
                    # shape arithmetic (integer initializers are constants at import) or a computed
                    # weight (the zoo's ConstantOfShape-built CNN weights: a parameter)
                    new_inits.append(numpy_helper.from_array(val, name))
                else:
                    # small float scalars: an embedded constant, not a weight
                    keep.append(helper.make_node("Constant", [], [name], name=f"{node.name}/folded" if node.name else "",
                                                 value=numpy_helper.from_array(val)))
    if not changed:
        return m
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    return _prune_unused(m)


_FILL_LOCATION = "cachefit:fill"


def _large_fill(node: onnx.NodeProto, shape: np.ndarray) -> onnx.TensorProto | None:
    """A floating-point ``ConstantOfShape`` output over ``_MAX_FOLD_ELEMS`` elements as a *lazy fill*
    initializer: dims and type, the value in ``external_data`` (``location = cachefit:fill``);
    :func:`fill_array` gives its (broadcast, read-only) array. None for anything else."""
    dims = [int(d) for d in np.asarray(shape).reshape(-1)]
    if int(np.prod(dims, dtype=np.int64)) <= _MAX_FOLD_ELEMS:
        return None
    value = next((a.t for a in node.attribute if a.name == "value"), None)
    dtype = value.data_type if value is not None else TensorProto.FLOAT
    if dtype not in FLOAT_TYPES:
        return None
    scalar = float(numpy_helper.to_array(value).reshape(-1)[0]) if value is not None else 0.0
    t = onnx.TensorProto(name=node.output[0], data_type=dtype, dims=dims, data_location=TensorProto.EXTERNAL)
    for k, v in (("location", _FILL_LOCATION), ("cachefit.fill_value", repr(scalar))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def fill_array(t: onnx.TensorProto) -> np.ndarray | None:
    """The array of a lazy fill initializer (see :func:`_large_fill`), or None for other tensors."""
    if t.data_location != TensorProto.EXTERNAL:
        return None
    kv = {e.key: e.value for e in t.external_data}
    if kv.get("location") != _FILL_LOCATION:
        return None
    if t.data_type == TensorProto.BFLOAT16:
        import ml_dtypes

        np_dtype = ml_dtypes.bfloat16
    else:
        np_dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.broadcast_to(np.array(float(kv["cachefit.fill_value"]), dtype=np_dtype), tuple(t.dims))


def _eval_node(RefEval, node, inputs, opset):
    names = [x for x in node.input]
    ins = []
    feeds = {}
    for n, v in zip(names, inputs):
        if n:
            ins.append(helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape))
            feeds[n] = v
    outs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output if o]
    g = helper.make_graph([node], "fold", ins, outs)
    mm = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opset.items()])
    res = RefEval(mm).run(None, feeds)
    return [np.asarray(r) for r in res]


def _prune_unused(m: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers that no graph output depends on."""
    g = m.graph
    needed = {o.name for o in g.output}
    live_nodes = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output) or _has_subgraph(node):
            live_nodes.append(node)
            needed.update(x for x in node.input if x)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    needed.update(_outer_refs(a.g))
    live_nodes.reverse()
    del g.node[:]
    g.node.extend(live_nodes)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    return m


def _has_subgraph(node) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _outer_refs(g) -> set[str]:
    refs = set()
    for n in g.node:
        refs.update(n.input)
    return refs


def _static_shapes(m: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes of every tensor onnx shape inference can resolve."""
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as exc:
        log.debug("shape inference failed: %s", exc)
        inferred = m
    out: dict[str, list[int]] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        d = _dims(vi)
        if d is not None and all(isinstance(x, int) and x >= 0 for x in d):
            out[vi.name] = d  # type: ignore[assignment]
    for t in inferred.graph.initializer:
        out[t.name] = list(t.dims)
    return out


def _fix_empty_constant_of_shape(m: onnx.ModelProto) -> onnx.ModelProto:
    """``ConstantOfShape`` with an empty shape makes a scalar; TVM's importer refuses it
    (``broadcast_to expects the input shape to have the number of ndim``): use a Constant."""
    inits = {t.name: t for t in m.graph.initializer}
    for k, node in enumerate(m.graph.node):
        if node.op_type != "ConstantOfShape" or not node.input or node.input[0] not in inits:
            continue
        shape = numpy_helper.to_array(inits[node.input[0]])
        if shape.size != 0:
            continue
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        arr = numpy_helper.to_array(value).reshape(()) if value is not None else np.array(0.0, np.float32)
        new = helper.make_node("Constant", [], [node.output[0]], name=node.name, value=numpy_helper.from_array(arr))
        m.graph.node[k].CopyFrom(new)
    return m


def weight_initializer_names(model: onnx.ModelProto) -> set[str]:
    """The floating-point initializers: the model's weights (integer ones are index/shape constants)."""
    return {t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES}


def cleanup(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Make exporter output importable by TVM; returns the cleaned model and new->original names."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    # Old zoo files list initializers as graph inputs too: drop those entries.
    inits = {t.name for t in m.graph.initializer}
    real_inputs = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(real_inputs)
    m, names = sanitize_names(m)
    weights = weight_initializer_names(m)
    m = fold_constants(m, weights)
    m = _fix_empty_constant_of_shape(m)
    m = fold_constants(m, weights)
    return m, names


_KNOWN_DOMAINS = ("", "ai.onnx", "com.microsoft")


# operators the importer translates itself rather than through its converter table
_IMPORTER_HANDLED = {"If"}


def check_operators(model: onnx.ModelProto) -> None:
    """Refuse, by name, an operator TVM's ONNX importer has no converter for.

    TVM's importer looks operators up by type alone, whatever their domain: an operator of a custom
    domain (``com.example::Relu``) would be translated as the standard one of the same name, so
    domains other than the standard one and ``com.microsoft`` (whose contrib operators TVM knows
    by name) are refused too.
    """
    from tvm.relax.frontend.onnx import onnx_frontend as of

    table = set(of._get_convert_map()) | _IMPORTER_HANDLED
    bad = [n for n in model.graph.node if n.op_type not in table or n.domain not in _KNOWN_DOMAINS]
    if not bad:
        return
    node = bad[0]
    where = f"node {node.name!r}" if node.name else f"the node producing {list(node.output)}"
    if node.domain not in _KNOWN_DOMAINS:
        why = f"operators of domain {node.domain!r} are not ONNX operators TVM can translate"
    else:
        why = "TVM's ONNX importer has no converter for it"
    others = sorted({f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in bad[1:]}
                    - {f"{node.domain + '::' if node.domain else ''}{node.op_type}"})
    raise UnsupportedOperatorError(
        f"unsupported operator {node.op_type!r}"
        + (f" (domain {node.domain!r})" if node.domain not in ("", "ai.onnx") else "")
        + f" at {where}: {why}"
        + (f"; {len(bad) - 1} more unsupported node(s)" + (f" ({', '.join(others)})" if others else "") if len(bad) > 1 else "")
        + ". Re-export without it, or replace it by standard ONNX operators."
    )


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


@dataclass
class ImportedModel:
    """The result of :func:`import_onnx`.

    mod:            layered IRModule (docs/layered-ir.md) when ``layered``; else a flat ``main`` for
                    :class:`~cachefit.passes.discover_layers.DiscoverLayers` to split at cut points.
    params:         weight name -> numpy array (``None`` values for a shape-only model).
    input_names / output_names: the model's inputs and outputs (sanitised names, as in the IR).
    original_names: sanitised name -> name in the ONNX file.
    source:         the loaded model (path, sha256, shape_only, name).
    layer_method:   how layers were found: "scopes", "boundaries", or "" (not yet: flat module).
    onnx_model:     the cleaned ONNX model with static shapes (what was imported).
    """

    mod: "object"
    params: dict[str, np.ndarray | None]
    input_names: list[str]
    output_names: list[str]
    original_names: dict[str, str]
    source: LoadedModel
    layer_method: str
    onnx_model: onnx.ModelProto
    layered: bool = True
    extra: dict = field(default_factory=dict)


def _value_types(m: onnx.ModelProto) -> dict[str, tuple[list[int], int]]:
    """name -> (static shape, elem_type) for every tensor, from ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as exc:
        raise ModelError(f"ONNX shape inference failed on the model: {exc}") from None
    out: dict[str, tuple[list[int], int]] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        d = _dims(vi)
        if d is not None and all(isinstance(x, int) and x >= 0 for x in d) and tt.elem_type:
            out[vi.name] = (d, tt.elem_type)  # type: ignore[assignment]
    for t in m.graph.initializer:
        out[t.name] = (list(t.dims), t.data_type)
    return out


def _to_relax_import(sub: onnx.ModelProto, what: str):
    import contextlib
    import io

    import tvm.relax.frontend.onnx as rx_onnx

    printed = io.StringIO()  # the importer prints "Error converting operator X" to stdout
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.simplefilter("ignore")
        try:
            return rx_onnx.from_onnx(sub, keep_params_in_input=False, sanitize_input_names=False)
        except Exception as exc:  # the importer's own errors: name the piece that failed
            msg = str(exc).strip().splitlines()
            last = next((line for line in reversed(msg) if line.strip()), type(exc).__name__)
            failed = re.search(r"Error converting operator (\w+)", printed.getvalue())
            if failed:
                op = failed.group(1)
                at = [n.name or f"producing {list(n.output)}" for n in sub.graph.node if n.op_type == op]
                where = f"{op} ({', '.join(map(repr, at[:3]))}{', ...' if len(at) > 3 else ''})"
            else:
                where = "operators: " + ", ".join(sorted({n.op_type for n in sub.graph.node}))
            raise ModelError(
                f"TVM's ONNX importer failed on {what} at {where}: {last.strip()}"
            ) from None
        finally:
            if printed.getvalue():
                log.debug("TVM's ONNX importer printed: %s", printed.getvalue().strip())


def _initializer_array(t: onnx.TensorProto, shape_only: bool) -> np.ndarray | None:
    fill = fill_array(t)
    if fill is not None:
        return fill
    if shape_only and t.data_location == TensorProto.EXTERNAL:
        return None
    if t.data_type == TensorProto.BFLOAT16:
        import ml_dtypes

        raw = numpy_helper.to_array(t)
        return np.asarray(raw).view(np.uint16).view(ml_dtypes.bfloat16) if raw.dtype == np.uint16 else raw.astype(ml_dtypes.bfloat16)
    return numpy_helper.to_array(t)


def prepare(
    source: str | os.PathLike | onnx.ModelProto | LoadedModel,
    input_shapes: Mapping[str, Sequence[int]] | str | None = None,
    batch: int | None = None,
) -> tuple[LoadedModel, onnx.ModelProto, dict[str, str]]:
    """Load, fix input shapes, check operators, clean up. Returns (loaded, cleaned model, names)."""
    loaded = source if isinstance(source, LoadedModel) else load_model(source)
    if isinstance(input_shapes, str):
        input_shapes = parse_input_shapes(input_shapes)
    check_operators(loaded.model)
    m = apply_input_shapes(loaded.model, input_shapes, batch)
    m, names = cleanup(m)
    return loaded, m, names


def import_onnx(
    source: str | os.PathLike | onnx.ModelProto | LoadedModel,
    input_shapes: Mapping[str, Sequence[int]] | str | None = None,
    batch: int | None = None,
    layer_boundaries: Sequence[str] | None = None,
) -> ImportedModel:
    """Import an ONNX model into cachefit's Relax IR.

    Layers come from the exporters' name scopes (or ``layer_boundaries``, node names where a layer
    starts); each layer's subgraph is imported on its own and becomes a private ``layer_i`` function.
    A model without scopes is imported whole (``layered=False``) for the cut-point pass.
    """
    from .layers import assign_by_boundaries, assign_by_scopes

    loaded, m, names = prepare(source, input_shapes, batch)
    rev = {v: k for k, v in names.items()}
    if layer_boundaries:
        assignment = assign_by_boundaries(m, [rev.get(b, b) for b in layer_boundaries])
    else:
        assignment = assign_by_scopes(m)
    types = _value_types(m)
    weights = [t for t in m.graph.initializer if t.data_type in FLOAT_TYPES]
    params = {t.name: _initializer_array(t, loaded.shape_only) for t in weights}
    input_names = [i.name for i in graph_inputs(m)]
    output_names = [o.name for o in m.graph.output]
    if assignment is None or len(set(assignment.node_layer)) < 2:
        mod = _import_flat(m, types, [t.name for t in weights], input_names)
        return ImportedModel(mod, params, input_names, output_names, names, loaded, "", m, layered=False)
    mod = _import_layered(m, types, assignment, input_names, output_names)
    return ImportedModel(mod, params, input_names, output_names, names, loaded, assignment.method, m)


def _weights_as_inputs(m: onnx.ModelProto, weight_names: list[str]) -> onnx.ModelProto:
    """A copy where the floating-point weights are graph inputs (they become Relax parameters
    without their values being touched: works for shape-only models)."""
    sub = onnx.ModelProto()
    sub.CopyFrom(m)
    wset = set(weight_names)
    winits = {t.name: t for t in sub.graph.initializer if t.name in wset}
    for name in weight_names:
        t = winits[name]
        sub.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    keep = [t for t in sub.graph.initializer if t.name not in wset]
    del sub.graph.initializer[:]
    sub.graph.initializer.extend(keep)
    return sub


def _import_flat(m, types, weight_names, input_names):
    from tvm import relax

    sub = _weights_as_inputs(m, weight_names)
    mod = _to_relax_import(sub, "the model")
    main = mod["main"].with_attr("num_input", len(input_names))
    mod = mod.__class__({gv: f for gv, f in mod.functions.items()})
    out = relax.transform.Normalize()(mod)
    out["main"] = main
    return out


def _import_layered(m: onnx.ModelProto, types, assignment, input_names, output_names):
    from tvm import relax

    g = m.graph
    nodes = list(g.node)
    nlayers = len(assignment.names)
    inits = {t.name: t for t in g.initializer}
    weight_set = {n for n, t in inits.items() if t.data_type in FLOAT_TYPES}
    produced_in: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for o in node.output:
            if o:
                produced_in[o] = assignment.node_layer[k]
    last_use: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for x in node.input:
            if x:
                last_use[x] = max(last_use.get(x, -1), assignment.node_layer[k])
    for o in output_names:
        last_use[o] = nlayers  # model outputs live to the end

    per_layer_nodes: list[list[onnx.NodeProto]] = [[] for _ in range(nlayers)]
    for k, node in enumerate(nodes):
        per_layer_nodes[assignment.node_layer[k]].append(node)

    # Constant nodes are copied into every layer that reads them, never passed between layers
    # (an importer needs axes/shapes as constants, not as inputs)
    const_nodes = {n.output[0]: n for n in nodes if n.op_type == "Constant" and n.output}
    for i in range(nlayers):
        own_out = {o for n in per_layer_nodes[i] for o in n.output if o}
        needed = []
        for n in per_layer_nodes[i]:
            for x in n.input:
                if x in const_nodes and x not in own_out and const_nodes[x] not in needed:
                    needed.append(const_nodes[x])
        if needed:
            per_layer_nodes[i] = needed + per_layer_nodes[i]
    # a Constant's value is live out of its layer only through copies
    for x in const_nodes:
        last_use.pop(x, None)
    for o in output_names:
        last_use[o] = nlayers

    layer_funcs = []
    signatures = []  # (live_in, weights, live_out)
    for i in range(nlayers):
        lnodes = per_layer_nodes[i]
        own = {o for n in lnodes for o in n.output if o}
        live_in: list[str] = []
        wts: list[str] = []
        consts: list[str] = []
        for n in lnodes:
            for x in n.input:
                if not x or x in own:
                    continue
                if x in weight_set:
                    if x not in wts:
                        wts.append(x)
                elif x in inits:
                    if x not in consts:
                        consts.append(x)
                elif x not in live_in:
                    live_in.append(x)
        live_out = [o for n in lnodes for o in n.output if o and last_use.get(o, -1) > i]
        # a model input or earlier tensor that is a model output and passes through: not produced here
        if not live_out:
            raise ModelError(f"layer {assignment.names[i]!r} produces nothing used later (its nodes are dead code)")

        def vi(name):
            if name in inits:
                t = inits[name]
                return helper.make_tensor_value_info(name, t.data_type, list(t.dims))
            if name not in types:
                raise ShapeError(
                    f"the shape of tensor {name!r} (crossing into or out of layer {assignment.names[i]!r}) "
                    "could not be inferred statically; give the inputs static shapes with --input-shapes"
                )
            shp, et = types[name]
            return helper.make_tensor_value_info(name, et, shp)

        sub_graph = helper.make_graph(
            lnodes,
            f"{assignment.names[i]}",
            [vi(x) for x in live_in] + [vi(w) for w in wts],
            [vi(o) for o in live_out],
            [inits[c] for c in consts],
        )
        sub = helper.make_model(sub_graph, opset_imports=list(m.opset_import), ir_version=m.ir_version)
        smod = _to_relax_import(sub, f"layer {assignment.names[i]!r}")
        fn = smod["main"]
        fn = fn.without_attr("global_symbol").without_attr("num_input")
        fn = fn.with_attrs({"cachefit.layer": i, "cachefit.layer_name": assignment.names[i]})
        # carry over any helper PrimFuncs the importer emitted
        extras = {gv.name_hint: f for gv, f in smod.functions.items() if gv.name_hint != "main"}
        layer_funcs.append((fn, extras))
        signatures.append((live_in, wts, live_out))

    # main: chain the layer calls
    bb = relax.BlockBuilder()
    gvs = []
    for i, (fn, extras) in enumerate(layer_funcs):
        if extras:
            # helper PrimFuncs the importer emitted for this layer (e.g. ``tile``): add them under
            # unique names and point the layer's calls at them
            renamed = {name: bb.add_func(f, f"layer{i}_{name}") for name, f in extras.items()}
            fn = _rename_globals(fn, renamed)
        gvs.append(bb.add_func(fn, f"layer_{i}"))
    env: dict[str, relax.Expr] = {}
    in_vars = []
    for name in input_names:
        shp, et = types[name]
        v = relax.Var(name, relax.TensorType(shp, DTYPE_NAMES[et]))
        env[name] = v
        in_vars.append(v)
    w_order = []
    for live_in, wts, _ in signatures:
        for w in wts:
            if w not in w_order:
                w_order.append(w)
    w_vars = []
    for w in w_order:
        t = inits[w]
        v = relax.Var(w, relax.TensorType(list(t.dims), DTYPE_NAMES[t.data_type]))
        env[w] = v
        w_vars.append(v)
    with bb.function("main", in_vars + w_vars, attrs={"num_input": len(in_vars)}):
        with bb.dataflow():
            for i, (live_in, wts, live_out) in enumerate(signatures):
                missing = [x for x in live_in if x not in env]
                if missing:
                    raise ModelError(
                        f"layer {assignment.names[i]!r} reads {missing} before any layer produces them "
                        "(the layer order is not a topological order of the graph)"
                    )
                call = bb.emit(relax.Call(gvs[i], [env[x] for x in live_in] + [env[w] for w in wts]))
                if len(live_out) == 1:
                    env[live_out[0]] = call
                else:
                    for j, o in enumerate(live_out):
                        env[o] = bb.emit(relax.TupleGetItem(call, j))
            outs = [env[o] for o in output_names]
            res = bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        bb.emit_func_output(res)
    # drop the alias binding of the output (``gv = lv2``)
    return relax.transform.CanonicalizeBindings()(bb.get())


def _rename_globals(fn, renamed: dict):
    """``fn`` with every call to a GlobalVar named in ``renamed`` pointing at the new GlobalVar."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Rename(PyExprMutator):
        def visit_global_var_(self, op):  # noqa: N802
            return renamed.get(op.name_hint, op)

    return _Rename().visit_expr(fn)
