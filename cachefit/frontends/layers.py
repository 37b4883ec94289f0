"""Which ONNX node belongs to which layer, read from the name scopes exporters write.

The legacy torch exporter writes scopes into node names (``/model/layers.0/self_attn/q_proj/MatMul``,
``/transformer/h.3/mlp/c_fc/MatMul``, ``/bert/encoder/layer.1/...``); the dynamo exporter writes plain
names (``node_MatMul_12``) and puts the scopes in ``node.metadata_props`` (``pkg.torch.onnx.name_scopes``,
``namespace``). Blocks become ``layers.i``; what comes before the first block is ``embed``, what comes
after the last is ``head``. Nodes without a scope (shared constants, glue) join the layer of their first
consumer, so that every layer stays a contiguous piece of a topological order.

Models without scopes (the onnx zoo's CNNs) are split later, on the Relax IR, at dataflow cut points
(:class:`cachefit.passes.discover_layers.DiscoverLayers`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx

# a block index inside a scope path: layers.3, h.3, layer.3, blocks.3, block.3, layers_3 (sanitised)
_BLOCK = re.compile(r"(?:^|[/.:\s\[',])(layers|layer|h|blocks|block|decoder_layers|encoder_layers)[._](\d+)(?=$|[/.:\s\]',_])")
_SCOPE_KEYS = ("pkg.torch.onnx.name_scopes", "namespace", "pkg.torch.onnx.class_hierarchy")


@dataclass
class LayerAssignment:
    """names[i] is layer i's name; node_layer[k] the layer of graph node k; method how it was found."""

    names: list[str]
    node_layer: list[int]
    method: str


def node_scope(node: onnx.NodeProto) -> str:
    """The scope text of a node: metadata scopes (dynamo) if present, else the node name (legacy)."""
    for kv in node.metadata_props:
        if kv.key in _SCOPE_KEYS and kv.value:
            return kv.value
    return node.name or ""


def has_scope(node: onnx.NodeProto) -> bool:
    """Whether the node carries a module scope (not just an op name like ``Constant_3``)."""
    for kv in node.metadata_props:
        if kv.key in _SCOPE_KEYS and kv.value:
            return True
    parts = [p for p in (node.name or "").split("/") if p]
    return len(parts) >= 2


def block_index(scope: str) -> tuple[str, int] | None:
    """``("layers", 3)`` for a scope inside block 3, else None. The outermost block scope wins
    (an encoder-decoder's ``decoder.layers.2.encoder_attn`` is block 2 of the decoder)."""
    m = _BLOCK.search(scope)
    if not m:
        return None
    return m.group(1), int(m.group(2))


def assign_by_scopes(model: onnx.ModelProto) -> LayerAssignment | None:
    """Group nodes by block scope; None when fewer than two blocks are named."""
    nodes = list(model.graph.node)
    blocks = [block_index(node_scope(n)) for n in nodes]
    found = sorted({b for b in blocks if b is not None}, key=lambda b: (b[0], b[1]))
    if len({b[1] for b in found}) < 2:
        return None
    # stacks with several block families (encoder + decoder): order by first appearance
    order: list[tuple[str, int]] = []
    for b in blocks:
        if b is not None and b not in order:
            order.append(b)
    families = {b[0] for b in order}
    block_names = [f"layers.{b[1]}" if len(families) == 1 else f"{b[0]}.{b[1]}" for b in order]
    rank = {b: i for i, b in enumerate(order)}

    n = len(nodes)
    producer: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for o in node.output:
            if o:
                producer[o] = k
    consumers: dict[int, list[int]] = {k: [] for k in range(n)}
    for k, node in enumerate(nodes):
        for x in node.input:
            if x in producer:
                consumers[producer[x]].append(k)

    first_block = min((k for k in range(n) if blocks[k] is not None), default=0)
    last_block = max((k for k in range(n) if blocks[k] is not None), default=n - 1)
    # provisional: block nodes by block; others: None for now
    layer: list[int | None] = [None if b is None else rank[b] + 1 for b in blocks]  # +1: 0 is embed
    head = len(order) + 1
    # nodes with a scope outside the blocks (/model/embed_tokens/Gather, /model/norm/..., /lm_head/MatMul):
    # before the first block -> embed, after the last block -> head
    for k in range(n):
        if layer[k] is None and has_scope(nodes[k]):
            if k < first_block:
                layer[k] = 0
            elif k > last_block:
                layer[k] = head
    # unscoped nodes (shared constants, glue): the earliest layer among their consumers
    # (walk backwards so that chains of unscoped nodes resolve)
    for k in range(n - 1, -1, -1):
        if layer[k] is not None:
            continue
        cons = [layer[c] for c in consumers[k] if layer[c] is not None]
        if cons:
            layer[k] = min(cons)
        elif k < first_block:
            layer[k] = 0
        elif k > last_block:
            layer[k] = head
        else:
            prods = [layer[producer[x]] for x in nodes[k].input if x in producer and layer[producer[x]] is not None]
            layer[k] = max(prods) if prods else 0
    # keep a valid topological order: a producer must not sit in a later layer than its consumer
    changed = True
    while changed:
        changed = False
        for k in range(n - 1, -1, -1):
            lk = layer[k]
            for c in consumers[k]:
                if layer[c] < lk:  # type: ignore[operator]
                    layer[k] = lk = layer[c]
                    changed = True
    used = sorted(set(layer))  # type: ignore[arg-type]
    all_names = ["embed"] + block_names + ["head"]
    remap = {old: i for i, old in enumerate(used)}
    return LayerAssignment(
        names=[all_names[u] for u in used],  # type: ignore[index]
        node_layer=[remap[x] for x in layer],  # type: ignore[index]
        method="scopes",
    )


def assign_by_boundaries(model: onnx.ModelProto, boundaries: list[str]) -> LayerAssignment:
    """A user's explicit layer starts: each name is a node name (or an output tensor name) where a
    new layer begins, in graph order."""
    from ..errors import ModelError

    nodes = list(model.graph.node)
    starts = []
    for b in boundaries:
        idx = next((k for k, n in enumerate(nodes) if n.name == b or b in n.output), None)
        if idx is None:
            raise ModelError(f"layer boundary {b!r} names no node (and no node output) of the model")
        starts.append(idx)
    starts = sorted(set(starts) - {0})
    node_layer = []
    cur = 0
    for k in range(len(nodes)):
        while cur < len(starts) and k >= starts[cur]:
            cur += 1
        node_layer.append(cur)
    return LayerAssignment(names=[f"part.{i}" for i in range(len(starts) + 1)], node_layer=node_layer, method="boundaries")
