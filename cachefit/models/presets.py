"""Model presets, parameter validation, build/export entry points."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from ..errors import CachefitError
from ._graph import DTYPES, GraphBuilder
from .mlp import build_mlp, mlp_num_params
from .transformer import INITS, build_transformer, transformer_active_params, transformer_num_params

#: Defaults per family; a preset or explicit overrides replace them.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": dict(layers=6, hidden=512, batch=8, dtype="float32", seed=0, shape_only=False),
    "dense": dict(layers=4, hidden=160, heads=4, ffn=640, seq=16, batch=2, dtype="float32",
                  activation="gelu", vocab=0, tie_embeddings=False, seed=0, shape_only=False, init="default"),
    "moe": dict(layers=4, hidden=128, heads=4, ffn=256, experts=4, top_k=2, seq=16, batch=2,
                dtype="float32", activation="gelu", vocab=0, tie_embeddings=False, seed=0,
                shape_only=False, init="default"),
}

#: Preset name -> parameters (``family`` plus the family's keys; missing keys take the defaults).
PRESETS: dict[str, dict[str, Any]] = {
    "mlp-tiny": dict(family="mlp", layers=6, hidden=512, batch=8, dtype="float32"),
    "dense-tiny": dict(family="dense", layers=4, hidden=160, heads=4, ffn=640, seq=16, batch=2,
                       dtype="float32"),
    "moe-tiny": dict(family="moe", layers=4, hidden=128, heads=4, ffn=256, experts=4, top_k=2,
                     seq=16, batch=2, dtype="float32"),
    "paper-dense": dict(family="dense", layers=16, hidden=8192, heads=16, ffn=32768, seq=1,
                        batch=1024, dtype="float16", shape_only=True),
    "paper-dense-30b": dict(family="dense", layers=16, hidden=16384, heads=128, ffn=32768,
                            seq=10000, batch=128, dtype="bfloat16", shape_only=True),
    "paper-moe": dict(family="moe", layers=16, hidden=8192, heads=16, ffn=4096, experts=8,
                      top_k=2, seq=1, batch=1024, dtype="float16", shape_only=True),
}

#: Models with inline (materialised) weights above this size are refused: protobuf cannot
#: serialise more than 2 GiB, and nothing in cachefit needs such weights to be real.
MAX_INLINE_WEIGHT_BYTES = 2**31 - 2**26

_INT_KEYS = ("layers", "hidden", "heads", "ffn", "seq", "batch", "experts", "top_k")


def resolve(name_or_family: str, **overrides: Any) -> dict[str, Any]:
    """The full, validated parameter dict for a preset name or a family plus overrides.

    The result has ``family`` and ``name`` (the preset or family name) besides the family's keys.
    """
    key = str(name_or_family).strip()
    if key in PRESETS:
        preset = dict(PRESETS[key])
        family = preset.pop("family")
    elif key in FAMILY_DEFAULTS:
        preset, family = {}, key
    else:
        raise CachefitError(
            f"unknown model {name_or_family!r}; presets: {', '.join(PRESETS)}; "
            f"families (with explicit parameters): {', '.join(FAMILY_DEFAULTS)}"
        )
    allowed = FAMILY_DEFAULTS[family]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise CachefitError(
            f"model {key!r} (family {family!r}) has no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters are: {', '.join(allowed)}"
        )
    p = {**allowed, **preset, **overrides}
    _validate(key, family, p)
    p["family"] = family
    p["name"] = key
    p["location"] = f"{key}.weights.bin"
    return p


def _validate(key: str, family: str, p: dict[str, Any]) -> None:
    for k in _INT_KEYS:
        if k in p:
            v = p[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CachefitError(f"model {key!r}: {k}={v!r} must be a positive integer")
    if "vocab" in p and (isinstance(p["vocab"], bool) or not isinstance(p["vocab"], int) or p["vocab"] < 0):
        raise CachefitError(f"model {key!r}: vocab={p['vocab']!r} must be an integer >= 0 (0: no embedding/head)")
    if not isinstance(p["seed"], int) or isinstance(p["seed"], bool):
        raise CachefitError(f"model {key!r}: seed={p['seed']!r} must be an integer")
    if p["dtype"] not in DTYPES:
        raise CachefitError(f"model {key!r}: dtype={p['dtype']!r} unsupported; use one of {', '.join(DTYPES)}")
    for k in ("shape_only", "tie_embeddings"):
        if k in p and not isinstance(p[k], bool):
            raise CachefitError(f"model {key!r}: {k}={p[k]!r} must be True or False")
    if "activation" in p and p["activation"] not in ("gelu", "relu"):
        raise CachefitError(f"model {key!r}: activation={p['activation']!r} unsupported; use 'gelu' or 'relu'")
    if "init" in p and p["init"] not in INITS:
        raise CachefitError(f"model {key!r}: init={p['init']!r} unsupported; use one of {', '.join(INITS)} "
                            "(gpt2: N(0, 0.02) with residual projections scaled by 1/sqrt(2 * layers))")
    if "heads" in p and p["hidden"] % p["heads"]:
        raise CachefitError(
            f"model {key!r}: hidden={p['hidden']} is not divisible by heads={p['heads']}; "
            f"pick heads among the divisors of hidden"
        )
    if "experts" in p and p["top_k"] > p["experts"]:
        raise CachefitError(
            f"model {key!r}: top_k={p['top_k']} exceeds experts={p['experts']}; use top_k <= experts"
        )
    if p.get("tie_embeddings") and not p.get("vocab"):
        raise CachefitError(f"model {key!r}: tie_embeddings=True needs vocab > 0")
    if not p["shape_only"]:
        nbytes = _num_params(family, p) * DTYPES[p["dtype"]][2]
        if nbytes > MAX_INLINE_WEIGHT_BYTES:
            raise CachefitError(
                f"model {key!r}: {nbytes / 1e9:.2f} GB of weights is too large to materialise "
                f"(limit {MAX_INLINE_WEIGHT_BYTES / 1e9:.2f} GB); pass shape_only=True to declare the "
                f"weights without data"
            )


def _num_params(family: str, p: dict[str, Any]) -> int:
    if family == "mlp":
        return mlp_num_params(p)
    return transformer_num_params(p, moe=family == "moe")


def num_params(name_or_family: str, **overrides: Any) -> int:
    """Parameter count of a preset/family (from the formula; nothing is built)."""
    p = resolve(name_or_family, **overrides)
    return _num_params(p["family"], p)


def active_params(name_or_family: str, **overrides: Any) -> int:
    """Parameters one token reads: all of them for dense models; the router and ``top_k``
    experts per layer for MoE."""
    p = resolve(name_or_family, **overrides)
    if p["family"] == "mlp":
        return mlp_num_params(p)
    return transformer_active_params(p, moe=p["family"] == "moe")


def layer_names(p: dict[str, Any]) -> list[str]:
    """Scope names of the model's layers in execution order (``embed``, ``layers.i``, ``head``)."""
    names = [f"layers.{i}" for i in range(p["layers"])]
    if p.get("vocab"):
        names = ["embed", *names, "head"]
    return names


def build(name_or_family: str, **overrides: Any) -> onnx.ModelProto:
    """Build a preset (``"dense-tiny"``) or a family (``"dense"``, ``"moe"``, ``"mlp"``) as an
    ONNX ModelProto (IR 9, opset 17), with overrides such as ``layers=2, hidden=128, batch=4,
    dtype="float16", seed=0, vocab=1000, shape_only=True``.

    Shape-only models declare every weight as external data that is never written.
    """
    p = resolve(name_or_family, **overrides)
    family = p["family"]
    g: GraphBuilder
    if family == "mlp":
        g = build_mlp(p)
    else:
        g = build_transformer(p, moe=family == "moe")
    n = _num_params(family, p)
    assert g.num_params == n, (g.num_params, n)
    meta = {
        "cachefit.family": family,
        "cachefit.preset": p["name"],
        "cachefit.layers": str(p["layers"]),
        "cachefit.layer_names": ",".join(layer_names(p)),
        "cachefit.num_params": str(n),
        "cachefit.weight_bytes": str(n * DTYPES[p["dtype"]][2]),
    }
    for k, v in p.items():
        if k in ("family", "name", "location", "layers"):
            continue
        meta[f"cachefit.{k}"] = ("true" if v else "false") if isinstance(v, bool) else str(v)
    model = g.model(p["name"], meta)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def model_params(model: onnx.ModelProto) -> dict[str, Any]:
    """The build parameters recorded in a model's ``cachefit.*`` metadata, typed back."""
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if not prop.key.startswith("cachefit."):
            continue
        k, v = prop.key[len("cachefit."):], prop.value
        if v in ("true", "false"):
            out[k] = v == "true"
        elif v.lstrip("-").isdigit():
            out[k] = int(v)
        elif k == "layer_names":
            out[k] = v.split(",")
        else:
            out[k] = v
    return out


def is_shape_only(model: onnx.ModelProto) -> bool:
    """True when some initializer is declared as external data whose bytes are not in the
    model (a shape-only model, or any model loaded with ``load_external_data=False``)."""
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL and not t.raw_data:
            return True
    return False


def count_params(model: onnx.ModelProto) -> int:
    """Elements in the model's floating-point initializers (from dims; data is not read)."""
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    return sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in floats)


def export(name: str, path: str | Path, **overrides: Any) -> Path:
    """Build ``name`` with ``overrides`` and write it to ``path``; returns the path.

    Shape-only models are written as they are (a small file whose weights point to a data file
    that does not exist): load them with ``onnx.load(path, load_external_data=False)``.
    """
    model = build(name, **overrides)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path
