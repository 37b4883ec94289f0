"""A small ONNX graph builder that names nodes the way torch's legacy exporter does."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import CachefitError

OPSET = 17
IR_VERSION = 9

#: dtype name -> (ONNX element type, numpy dtype, bytes per element)
DTYPES: dict[str, tuple[int, type, int]] = {
    "float32": (TensorProto.FLOAT, np.float32, 4),
    "float16": (TensorProto.FLOAT16, np.float16, 2),
    "bfloat16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16, 2),
}


class GraphBuilder:
    """Collects nodes and initializers for one ONNX graph.

    Node names carry the current scope stack the way torch's legacy exporter writes them:
    ``/layers.3/attn/q_proj/MatMul``, a second node of the same type in the same scope gets
    ``_1``, ``_2``... and a node's outputs are ``<node name>_output_<i>``. Weights are named
    after the scope with dots (``layers.3.attn.q_proj.weight``). Shape and scalar constants are
    ``Constant`` nodes in the current scope, so every node belongs to a scope and no integer
    constant is an initializer.

    dtype:       element type of activations and weights (a key of ``DTYPES``).
    rng:         numpy Generator for random weights; ``None`` with ``shape_only``.
    shape_only:  declare every weight as external data that is never written (dims, type,
                 location, offset and length only).
    location:    the external data file name recorded in shape-only weights.
    """

    def __init__(self, dtype: str, rng: np.random.Generator | None, shape_only: bool,
                 location: str = "weights.bin") -> None:
        self.dtype = dtype
        self.elem_type, self.np_dtype, self.itemsize = DTYPES[dtype]
        self.rng = rng
        self.shape_only = shape_only
        self.location = location
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._scope: list[str] = []
        self._counts: dict[str, int] = {}
        self._offset = 0
        self.num_params = 0

    # --- scopes -------------------------------------------------------------------------------
    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _node_name(self, op: str) -> str:
        base = "/" + "".join(s + "/" for s in self._scope) + op
        k = self._counts.get(base, 0)
        self._counts[base] = k + 1
        return base if k == 0 else f"{base}_{k}"

    # --- nodes --------------------------------------------------------------------------------
    def node(self, op: str, inputs: Sequence[str], num_outputs: int = 1, **attrs) -> str | list[str]:
        """Append a node in the current scope; returns its output name (a list if several)."""
        name = self._node_name(op)
        outputs = [f"{name}_output_{i}" for i in range(num_outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=name, **attrs))
        return outputs[0] if num_outputs == 1 else outputs

    def const(self, value, dtype: str | None = None) -> str:
        """A ``Constant`` node in the current scope. ``dtype`` None means the model dtype;
        ``"int64"`` for shapes and indices."""
        if dtype == "int64":
            arr = np.asarray(value, dtype=np.int64)
        else:
            arr = np.asarray(value, dtype=np.float32).astype(DTYPES[dtype or self.dtype][1])
        return self.node("Constant", [], value=numpy_helper.from_array(arr))

    # --- graph inputs/outputs -----------------------------------------------------------------
    def add_input(self, name: str, shape: Sequence[int], elem_type: int | None = None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type or self.elem_type, list(shape)))
        return name

    def add_output(self, tensor: str, name: str, shape: Sequence[int], elem_type: int | None = None) -> str:
        """Expose ``tensor`` (an output of the last node) as graph output ``name``."""
        if tensor != name:
            last = self.nodes[-1]
            assert list(last.output).count(tensor) == 1, "graph output must come from the last node"
            last.output[list(last.output).index(tensor)] = name
        self.outputs.append(helper.make_tensor_value_info(name, elem_type or self.elem_type, list(shape)))
        return name

    # --- weights ------------------------------------------------------------------------------
    def weight(self, leaf: str, shape: Sequence[int], std: float = 0.0, mean: float = 0.0) -> str:
        """A weight initializer named after the scope (``layers.0.attn.q_proj.weight``).

        Values are N(mean, std) drawn from the builder's generator (float32, then cast), or
        nothing at all for shape-only models.
        """
        name = ".".join([*self._scope, leaf])
        shape = [int(d) for d in shape]
        count = math.prod(shape)
        self.num_params += count
        if self.shape_only:
            t = TensorProto()
            t.name = name
            t.data_type = self.elem_type
            t.dims.extend(shape)
            length = count * self.itemsize
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self.location), ("offset", str(self._offset)),
                         ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            self._offset += length
        else:
            assert self.rng is not None
            vals = self.rng.standard_normal(shape, dtype=np.float32)
            vals = (vals * np.float32(std) + np.float32(mean)).astype(self.np_dtype)
            t = numpy_helper.from_array(vals, name)
        self.initializers.append(t)
        return name

    def linear(self, name: str, x: str, fan_in: int, fan_out: int, bias: bool = True,
               gain: float = 1.0, std: float | None = None, bias_std: float = 0.02) -> str:
        """``x @ W (+ b)`` in scope ``name`` with W of shape [fan_in, fan_out] drawn from
        N(0, gain/sqrt(fan_in)) (or N(0, ``std``) when given) and b from N(0, ``bias_std``)."""
        with self.scope(name):
            w = self.weight("weight", [fan_in, fan_out], std=gain / math.sqrt(fan_in) if std is None else std)
            y = self.node("MatMul", [x, w])
            if bias:
                b = self.weight("bias", [fan_out], std=bias_std)
                y = self.node("Add", [y, b])
        return y

    def layer_norm(self, name: str, x: str, width: int, eps: float = 1e-5, std: float = 0.02) -> str:
        """LayerNormalization over the last axis, gamma ~ 1 + N(0, std), beta ~ N(0, std)
        (``std=0``: gamma 1, beta 0)."""
        with self.scope(name):
            gamma = self.weight("weight", [width], std=std, mean=1.0)
            beta = self.weight("bias", [width], std=std)
            return self.node("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=eps)

    def activation(self, kind: str, x: str) -> str:
        """GELU (exact, erf form as torch's legacy exporter writes it at opset 17) or ReLU, in scope ``act``."""
        with self.scope("act"):
            if kind == "relu":
                return self.node("Relu", [x])
            if kind == "gelu":
                t = self.node("Div", [x, self.const(math.sqrt(2.0))])
                t = self.node("Erf", [t])
                t = self.node("Add", [t, self.const(1.0)])
                t = self.node("Mul", [x, t])
                return self.node("Mul", [t, self.const(0.5)])
        raise CachefitError(f"unknown activation {kind!r}: use 'gelu' or 'relu'")

    # --- model --------------------------------------------------------------------------------
    def model(self, graph_name: str, metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="cachefit.models",
            ir_version=IR_VERSION,
        )
        helper.set_model_props(model, metadata)
        return model
