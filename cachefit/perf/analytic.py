"""Layer records of cachefit's reference transformers computed by hand from their shapes.

An independent check of the IR-derived records (same model, counted op by op on paper) and the
fast path for paper-scale estimates: no ONNX, no TVM, microseconds per model. It follows
``cachefit.models.transformer`` op for op (pre-norm block, biases on every projection, GELU or
ReLU MLP, optional embedding/head); counts are per micro-batch of ``batch`` sequences of ``seq``
tokens.

Traffic is counted unfused, op by op: every op reads its inputs and writes its output once;
reshapes are free, transposes copy. The activation working set is the peak of live tensors in
program order (the layer's input, held for the residual, included).

MoE: the ONNX reference runs every expert on every token with zero gates for the unselected
ones (a formulation both onnxruntime and TVM execute). A real MoE kernel computes only the
``top_k`` selected experts per token, so ``sparse_moe=True`` (the default) counts ``top_k`` experts'
FLOPs and activations per token, while still reading every expert's weights (with a batch of
hundreds of tokens and a near-uniform router every expert receives tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..partition.records import LayerRecord

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}
_ACT_FLOPS = {"gelu": 8, "relu": 1}


@dataclass
class _Tally:
    flops: int = 0
    traffic: int = 0          # elements read + written by activations
    live: int = 0             # elements currently live
    peak: int = 0

    def op(self, flops: int, reads: int, writes: int) -> None:
        self.flops += flops
        self.traffic += reads + writes

    def alloc(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def free(self, n: int) -> None:
        self.live -= n


def _block(p: dict, moe: bool, sparse_moe: bool, fused_attention: bool) -> tuple[_Tally, int]:
    """(tally, parameter count) of one transformer block."""
    b, s, h, heads, f = p["batch"], p["seq"], p["hidden"], p["heads"], p["ffn"]
    t_tok = b * s
    th, sq = t_tok * h, b * heads * s * s
    act = _ACT_FLOPS[p.get("activation", "gelu")]
    t = _Tally()
    t.alloc(th)                                    # x, live for the residual
    # attention half
    t.alloc(th); t.op(8 * th, th, th)              # ln1 -> hn
    for _ in range(3):                             # q, k, v: matmul + bias + transpose copy
        t.alloc(th); t.op(2 * th * h, th, th)
        t.op(th, th, th)
        t.op(0, th, th)
    t.free(th)                                     # hn dead after v
    if fused_attention:                             # one kernel, scores never leave registers
        t.alloc(th); t.op(4 * sq * (h // heads) + 6 * sq, 3 * th, th); t.free(3 * th)
    else:
        t.alloc(sq); t.op(2 * sq * (h // heads), 2 * th, sq)   # scores = q k^T
        t.op(sq, sq, sq)                                # / sqrt(d)
        t.alloc(sq); t.op(5 * sq, sq, sq); t.free(sq)   # softmax (scores die)
        t.free(2 * th)                                  # q, k dead
        t.alloc(th); t.op(2 * sq * (h // heads), sq + th, th); t.free(sq + th)   # ctx = p v
    t.op(0, th, th)                                 # transpose back
    t.alloc(th); t.op(2 * th * h, th, th); t.op(th, th, th); t.free(th)      # o_proj + bias
    t.alloc(th); t.op(th, 2 * th, th); t.free(2 * th)                       # x + attn -> x1
    # MLP half
    t.alloc(th); t.op(8 * th, th, th)              # ln2 -> hn
    params = 4 * h * h + 4 * h + 4 * h
    tf = t_tok * f
    if not moe:
        t.alloc(tf); t.op(2 * th * f, th, tf); t.op(tf, tf, tf)             # fc1 + bias
        t.op(act * tf, tf, tf)                                             # activation
        t.free(th)
        t.alloc(th); t.op(2 * tf * h, tf, th); t.op(th, th, th); t.free(tf)  # fc2 + bias
        params += 2 * h * f + f + h
    else:
        e, k = p["experts"], p["top_k"]
        te = t_tok * e
        t.alloc(te); t.op(2 * th * e, th, te)                              # router logits
        t.op(te * e, te, t_tok * k)                                        # top-k
        t.op(t_tok * k, t_tok * k, t_tok)                                  # k-th value
        t.op(te, te + t_tok, te)                                           # keep mask
        t.op(te, 2 * te, te)                                               # where
        t.op(5 * te, te, te)                                               # softmax -> gates
        run = k if sparse_moe else e
        ttf = t_tok * f
        # per expert (sparse: the tokens routed to it, k/e of them on average)
        share = run / e
        outs = 0
        for _ in range(e):
            rows = share * ttf
            rows_h = share * th
            t.alloc(int(rows)); t.op(int(2 * rows_h * f), int(rows_h), int(rows)); t.op(int(rows), int(rows), int(rows))
            t.op(int(act * rows), int(rows), int(rows))
            t.alloc(int(rows_h)); t.op(int(2 * rows * h), int(rows), int(rows_h)); t.op(int(rows_h), int(rows_h), int(rows_h))
            t.free(int(rows))
            t.op(int(rows_h), int(rows_h) + t_tok, int(rows_h))            # * gate
            outs += int(rows_h)
        t.free(th + te)
        t.alloc(th); t.op(outs, outs, th); t.free(outs)                     # sum of experts
        params += h * e + e * (2 * h * f + f + h)
    t.alloc(th); t.op(th, 2 * th, th); t.free(2 * th)                      # residual -> out
    return t, params


def transformer_records(p: dict[str, Any], *, moe: bool | None = None, sparse_moe: bool = True,
                        fused_attention: bool = False) -> list[LayerRecord]:
    """Layer records for a resolved parameter dict of ``cachefit.models`` (``models.presets.resolve``).

    ``fused_attention=True`` counts attention as one fused kernel (FlashAttention-style: the
    ``[B, H, S, S]`` scores are never written), as any GPU deployment at long sequence runs it;
    False counts the reference graph's explicit MatMul/Div/Softmax/MatMul.

    Layers: ``embed`` (when ``vocab``), ``layers.0`` ... ``layers.{L-1}``, ``head`` (when ``vocab``).
    """
    moe = p.get("family") == "moe" if moe is None else moe
    eb = _BYTES[p["dtype"]]
    bits = 8 * eb
    b, s, h = p["batch"], p["seq"], p["hidden"]
    th = b * s * h
    records: list[LayerRecord] = []
    vocab = p.get("vocab", 0)
    if vocab:
        nbytes = vocab * h * eb
        ids = b * s * 8
        records.append(LayerRecord(
            name="embed", weight_bytes=nbytes, activation_bytes=ids + th * eb, in_bytes=ids, out_bytes=th * eb,
            params={"embed.weight": nbytes}, flops=0, bytes_moved=ids + 2 * th * eb, weight_bits=bits, batch=b,
        ))
    # every block reads x and returns the new x: in = out = hidden state
    tally, nparams = _block(p, moe, sparse_moe, fused_attention)
    for i in range(p["layers"]):
        wbytes = nparams * eb
        records.append(LayerRecord(
            name=f"layers.{i}", weight_bytes=wbytes, activation_bytes=tally.peak * eb,
            in_bytes=th * eb, out_bytes=th * eb, params={f"layers.{i}": wbytes}, flops=tally.flops,
            bytes_moved=wbytes + tally.traffic * eb, weight_bits=bits, batch=b,
        ))
    if vocab:
        logits = b * s * vocab
        tied = bool(p.get("tie_embeddings"))
        head_w = vocab * h * eb
        params = {"head.norm": 2 * h * eb}
        params["embed.weight" if tied else "head.weight"] = head_w
        wbytes = sum(params.values())
        records.append(LayerRecord(
            name="head", weight_bytes=wbytes, activation_bytes=(2 * th + logits) * eb, in_bytes=th * eb,
            out_bytes=logits * eb, params=params, flops=8 * th + 2 * th * vocab,
            bytes_moved=wbytes + (4 * th + th + logits) * eb, weight_bits=bits, batch=b,
        ))
    return records


def preset_records(name: str, *, sparse_moe: bool = True, fused_attention: bool = False,
                   **overrides: Any) -> list[LayerRecord]:
    """Layer records of a ``cachefit.models`` preset (``paper-dense``, ``paper-moe`` ...) from shapes alone."""
    from ..models.presets import resolve

    p = resolve(name, **overrides)
    if p["family"] == "mlp":
        raise NotImplementedError("analytic records cover the transformer families (dense, moe), not mlp")
    return transformer_records(p, sparse_moe=sparse_moe, fused_attention=fused_attention)


def tokens_per_batch(p: dict[str, Any]) -> int:
    return int(p["batch"]) * int(p["seq"])
