"""Dense and mixture-of-experts transformer blocks as ONNX graphs (pre-norm, no causal mask).

Block ``i`` (every node named ``/layers.i/...``)::

    h = ln1(x)                                   /layers.i/ln1/LayerNormalization
    q, k, v = h @ Wq + bq, h @ Wk + bk, ...      /layers.i/attn/{q,k,v}_proj/{MatMul,Add}
    heads: Reshape [B,S,H,D], Transpose          /layers.i/attn/Reshape, /layers.i/attn/Transpose
    p = Softmax(q @ k^T / sqrt(D))               /layers.i/attn/{MatMul,Div,Softmax}
    a = (p @ v) -> [B,S,hidden] @ Wo + bo        /layers.i/attn/o_proj/{MatMul,Add}
    x = x + a                                    /layers.i/Add
    h = ln2(x)                                   /layers.i/ln2/LayerNormalization
    dense: m = fc2(act(fc1(h)))                  /layers.i/mlp/{fc1,act,fc2}/...
    moe:   m = sum_e gate_e * expert_e(h)        /layers.i/moe/...
    x = x + m                                    /layers.i/Add_1

The MoE router is dense-gated and exact for top-k (no data-dependent shapes, so onnxruntime and
TVM's Relax importer both run it with static shapes)::

    logits = h @ Wr                       [B,S,E]    /layers.i/moe/router/MatMul
    top    = TopK(logits, k).values       [B,S,k]    /layers.i/moe/TopK
    kth    = ReduceMin(top, axis=-1)      [B,S,1]    /layers.i/moe/ReduceMin   (k-th largest)
    keep   = logits >= kth                           /layers.i/moe/GreaterOrEqual
    gates  = Softmax(Where(keep, logits, -inf))      /layers.i/moe/{Where,Softmax}
    g_0..g_{E-1} = Split(gates, axis=-1)  [B,S,1]    /layers.i/moe/Split
    expert e: fc2(act(fc1(h))) * g_e                 /layers.i/moe/experts.e/{fc1,act,fc2,Mul}
    m = Sum(expert outputs)                          /layers.i/moe/Sum

Every expert runs on every token and unselected experts get gate 0 (the softmax of -inf), so
the result equals sparse top-k routing with softmax renormalised over the selected logits
(Mixtral's rule). Ties at the k-th largest logit select every tied expert; with continuous
random weights ties have probability zero.

With ``vocab > 0`` the input is ``input_ids`` (int64 [B,S]) looked up in ``embed.weight``
(``/embed/Gather``) and the output is ``logits`` [B,S,vocab] from a final LayerNorm and an LM head
(``/head/norm/LayerNormalization``, ``/head/MatMul``; ``tie_embeddings`` reuses ``embed.weight``
through ``/head/Transpose``). Otherwise the input is ``x`` [B,S,hidden] and the output ``y``.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from ._graph import GraphBuilder

INITS = ("default", "gpt2")
#: GPT-2's ``initializer_range``
GPT2_STD = 0.02


def _std(p: dict, residual: bool = False) -> dict:
    """``linear`` keyword arguments for a matrix under ``p["init"]`` (``residual``: an output
    projection added to the residual stream)."""
    if p.get("init", "default") != "gpt2":
        return {}
    std = GPT2_STD / math.sqrt(2 * p["layers"]) if residual else GPT2_STD
    return {"std": std, "bias_std": 0.0}


def _norm_std(p: dict) -> float:
    return 0.0 if p.get("init", "default") == "gpt2" else 0.02


def _attention(g: GraphBuilder, x: str, p: dict) -> str:
    b, s, hidden, heads = p["batch"], p["seq"], p["hidden"], p["heads"]
    d = hidden // heads
    with g.scope("attn"):
        q = g.linear("q_proj", x, hidden, hidden, **_std(p))
        k = g.linear("k_proj", x, hidden, hidden, **_std(p))
        v = g.linear("v_proj", x, hidden, hidden, **_std(p))
        split_shape = g.const([b, s, heads, d], "int64")
        q = g.node("Transpose", [g.node("Reshape", [q, split_shape])], perm=[0, 2, 1, 3])
        k = g.node("Transpose", [g.node("Reshape", [k, split_shape])], perm=[0, 2, 3, 1])
        v = g.node("Transpose", [g.node("Reshape", [v, split_shape])], perm=[0, 2, 1, 3])
        scores = g.node("MatMul", [q, k])                                   # [B,H,S,S]
        scores = g.node("Div", [scores, g.const(math.sqrt(d))])
        probs = g.node("Softmax", [scores], axis=-1)
        ctx = g.node("MatMul", [probs, v])                                  # [B,H,S,D]
        ctx = g.node("Transpose", [ctx], perm=[0, 2, 1, 3])
        ctx = g.node("Reshape", [ctx, g.const([b, s, hidden], "int64")])
        return g.linear("o_proj", ctx, hidden, hidden, **_std(p, residual=True))


def _mlp(g: GraphBuilder, x: str, p: dict) -> str:
    hidden, ffn = p["hidden"], p["ffn"]
    h = g.linear("fc1", x, hidden, ffn, **_std(p))
    h = g.activation(p["activation"], h)
    return g.linear("fc2", h, ffn, hidden, **_std(p, residual=True))


def _moe(g: GraphBuilder, x: str, p: dict) -> str:
    hidden, experts, top_k = p["hidden"], p["experts"], p["top_k"]
    with g.scope("moe"):
        logits = g.linear("router", x, hidden, experts, bias=False, **_std(p))          # [B,S,E]
        values, _ = g.node("TopK", [logits, g.const([top_k], "int64")], num_outputs=2, axis=-1)
        kth = g.node("ReduceMin", [values], axes=[-1], keepdims=1)          # [B,S,1]
        keep = g.node("GreaterOrEqual", [logits, kth])
        masked = g.node("Where", [keep, logits, g.const(-np.inf)])
        gates = g.node("Softmax", [masked], axis=-1)
        gate = g.node("Split", [gates], num_outputs=experts, axis=-1) if experts > 1 else [gates]
        outs = []
        for e in range(experts):
            with g.scope(f"experts.{e}"):
                y = _mlp(g, x, p)
                outs.append(g.node("Mul", [y, gate[e]]))
        return g.node("Sum", outs) if experts > 1 else outs[0]


def build_transformer(p: dict, moe: bool) -> GraphBuilder:
    """Fill a GraphBuilder with the transformer described by the (validated) parameters ``p``."""
    rng = None if p["shape_only"] else np.random.default_rng(p["seed"])
    g = GraphBuilder(p["dtype"], rng, p["shape_only"], location=p["location"])
    b, s, hidden, vocab = p["batch"], p["seq"], p["hidden"], p["vocab"]

    if vocab:
        ids = g.add_input("input_ids", [b, s], TensorProto.INT64)
        with g.scope("embed"):
            table = g.weight("weight", [vocab, hidden], std=GPT2_STD if p.get("init") == "gpt2" else 1.0)
            x = g.node("Gather", [table, ids], axis=0)
    else:
        x = g.add_input("x", [b, s, hidden])

    for i in range(p["layers"]):
        with g.scope(f"layers.{i}"):
            h = g.layer_norm("ln1", x, hidden, std=_norm_std(p))
            x = g.node("Add", [x, _attention(g, h, p)])
            h = g.layer_norm("ln2", x, hidden, std=_norm_std(p))
            if moe:
                m = _moe(g, h, p)
            else:
                with g.scope("mlp"):
                    m = _mlp(g, h, p)
            x = g.node("Add", [x, m])

    if vocab:
        with g.scope("head"):
            h = g.layer_norm("norm", x, hidden, std=_norm_std(p))
            if p["tie_embeddings"]:
                w = g.node("Transpose", [table], perm=[1, 0])
            else:
                w = g.weight("weight", [hidden, vocab],
                             std=GPT2_STD if p.get("init") == "gpt2" else 1.0 / math.sqrt(hidden))
            out = g.node("MatMul", [h, w])
            g.add_output(out, "logits", [b, s, vocab])
    else:
        g.add_output(x, "y", [b, s, hidden])
    return g


def transformer_num_params(p: dict, moe: bool) -> int:
    """Parameter count of ``build_transformer(p, moe)``, from the formula."""
    h, f = p["hidden"], p["ffn"]
    attn = 4 * h * h + 4 * h
    norms = 4 * h
    if moe:
        e = p["experts"]
        ffn_part = h * e + e * (2 * h * f + f + h)
    else:
        ffn_part = 2 * h * f + f + h
    total = p["layers"] * (attn + norms + ffn_part)
    if p["vocab"]:
        total += p["vocab"] * h + 2 * h + (0 if p["tie_embeddings"] else h * p["vocab"])
    return total


def transformer_active_params(p: dict, moe: bool) -> int:
    """Parameters one token reads (for MoE: the router and ``top_k`` experts per layer)."""
    if not moe:
        return transformer_num_params(p, moe)
    q = dict(p, experts=p["top_k"])
    return transformer_num_params(q, True) - p["layers"] * p["hidden"] * (p["top_k"] - p["experts"])
