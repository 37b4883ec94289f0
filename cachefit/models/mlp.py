"""A plain MLP chain as an ONNX graph: ``layers`` x (MatMul + bias Add + Relu), input [batch, hidden].

Layer ``i`` is ``/layers.i/fc/MatMul``, ``/layers.i/fc/Add``, ``/layers.i/act/Relu`` with weights
``layers.i.fc.weight`` [hidden, hidden] and ``layers.i.fc.bias`` [hidden]. Input ``x``, output ``y``.
"""

from __future__ import annotations

import math

import numpy as np

from ._graph import GraphBuilder


def build_mlp(p: dict) -> GraphBuilder:
    """Fill a GraphBuilder with the MLP chain described by the (validated) parameters ``p``."""
    rng = None if p["shape_only"] else np.random.default_rng(p["seed"])
    g = GraphBuilder(p["dtype"], rng, p["shape_only"], location=p["location"])
    b, h = p["batch"], p["hidden"]
    x = g.add_input("x", [b, h])
    for i in range(p["layers"]):
        with g.scope(f"layers.{i}"):
            x = g.linear("fc", x, h, h, gain=math.sqrt(2.0))  # He init keeps the scale through ReLUs
            x = g.activation("relu", x)
    g.add_output(x, "y", [b, h])
    return g


def mlp_num_params(p: dict) -> int:
    """Parameter count of ``build_mlp(p)``."""
    return p["layers"] * (p["hidden"] ** 2 + p["hidden"])
