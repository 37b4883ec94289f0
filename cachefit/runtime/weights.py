"""Weights files in the safetensors layout: a small writer and reader on numpy (no torch, no TVM).

Layout (see docs/artifact-format.md): 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(padded with spaces to a multiple of 8), then the tensors back to back in the order written.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import ArtifactError

# TVM/numpy dtype name -> safetensors dtype code
_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
_NAMES = {code: name for name, code in _CODES.items()}

_MAX_HEADER = 100 * 1024 * 1024


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a TVM dtype name (bfloat16 and float8 through ml_dtypes)."""
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def dtype_name(dtype: np.dtype) -> str:
    """The TVM dtype name of a numpy dtype (``bool`` for numpy's ``bool``)."""
    name = np.dtype(dtype).name
    return "bool" if name == "bool" else name


def save_weights(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> int:
    """Write ``tensors`` (name -> array, in the mapping's order) to ``path``; returns the file size."""
    header: dict = {}
    offset = 0
    arrays = []
    for name, value in tensors.items():
        arr = np.asarray(value, order="C")
        dname = dtype_name(arr.dtype)
        if dname not in _CODES:
            raise ArtifactError(
                f"weight {name!r} has dtype {dname}, which the weights file format cannot store "
                f"(supported: {', '.join(_CODES)}); cast it before compiling"
            )
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        nbytes = arr.nbytes
        header[str(name)] = {"dtype": _CODES[dname], "shape": [int(d) for d in arr.shape],
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for arr in arrays:
            f.write(arr.tobytes(order="C"))
    return path.stat().st_size


def read_header(path: str | Path) -> tuple[dict, int]:
    """The JSON header of a weights file and the offset of its data section."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ArtifactError(f"weights file {path} is truncated: no header length")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise ArtifactError(f"weights file {path} has an implausible header length {n}")
            text = f.read(n)
    except OSError as exc:
        raise ArtifactError(f"cannot read weights file {path}: {exc}") from exc
    if len(text) != n:
        raise ArtifactError(f"weights file {path} is truncated: header of {n} bytes, {len(text)} present")
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"weights file {path} has a malformed JSON header: {exc}") from exc
    if not isinstance(header, dict):
        raise ArtifactError(f"weights file {path} has a malformed header (not a JSON object)")
    return header, 8 + n


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Read every tensor of a weights file (name -> numpy array, in file order)."""
    path = Path(path)
    header, start = read_header(path)
    data = path.read_bytes()[start:]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"weights file {path}: malformed entry for tensor {name!r}") from exc
        if code not in _NAMES:
            raise ArtifactError(f"weights file {path}: tensor {name!r} has unknown dtype code {code!r}")
        dtype = numpy_dtype(_NAMES[code])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if end - begin != count * dtype.itemsize or begin < 0 or end > len(data):
            raise ArtifactError(
                f"weights file {path}: tensor {name!r} ({code} {list(shape)}) needs "
                f"{count * dtype.itemsize} bytes, offsets [{begin}, {end}] in a {len(data)}-byte data section"
            )
        out[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape).copy()
    return out
