"""Plain-data description of a layered model: what the partitioners and the cost model consume.

No TVM here: the frontend and the footprint analysis produce these records from the Relax IR,
and everything in ``cachefit.partition`` and ``cachefit.perf`` works on them alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol


@dataclass(frozen=True)
class LayerRecord:
    """One layer of a model, in execution order.

    Byte counts are for the batch/dtype the model was planned with.

    name:             human name of the layer (``layers.3``, ``embed``, ``head``).
    weight_bytes:     bytes of the parameters the layer reads (sum of ``params``).
    activation_bytes: peak bytes of live tensors inside the layer (liveness over the binding
                      order, the layer's own inputs and outputs included).
    buffer_bytes:     workspace of the lowered kernels (intermediate allocations inside fused
                      TIR functions) at the layer's peak.
    in_bytes:         bytes of the tensors live across the cut *before* this layer (for the first
                      layer: the model inputs it reads).
    out_bytes:        bytes of the tensors live across the cut *after* this layer (for the last
                      layer: the model outputs).
    params:           parameter name -> bytes; a parameter read by several layers (tied
                      embeddings) appears in each, and a group counts it once.
    flops:            floating-point operations of the layer (multiply-add = 2).
    bytes_moved:      memory traffic of the layer: weights read + activations read and written.
    weight_bits:      bits per stored weight element (32 fp32, 16 fp16/bf16, 8 int8, 4 int4):
                      what quantization would save is computed from it.
    batch:            the batch (micro-batch) size the activation figures are for; activation
                      and buffer bytes scale about linearly with it.
    """

    name: str
    weight_bytes: int
    activation_bytes: int
    buffer_bytes: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    params: Mapping[str, int] = field(default_factory=dict)
    flops: int = 0
    bytes_moved: int = 0
    weight_bits: int = 32
    batch: int = 1

    @property
    def working_set_bytes(self) -> int:
        """Activation + buffer bytes: the transient part of the footprint."""
        return self.activation_bytes + self.buffer_bytes

    @property
    def total_bytes(self) -> int:
        """The seed's additive size(l) = weights + activations + buffers."""
        return self.weight_bytes + self.activation_bytes + self.buffer_bytes

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "buffer_bytes": self.buffer_bytes,
            "in_bytes": self.in_bytes,
            "out_bytes": self.out_bytes,
            "params": dict(self.params),
            "flops": self.flops,
            "bytes_moved": self.bytes_moved,
            "weight_bits": self.weight_bits,
            "batch": self.batch,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "LayerRecord":
        return cls(
            name=str(d["name"]),
            weight_bytes=int(d["weight_bytes"]),
            activation_bytes=int(d["activation_bytes"]),
            buffer_bytes=int(d.get("buffer_bytes", 0)),
            in_bytes=int(d.get("in_bytes", 0)),
            out_bytes=int(d.get("out_bytes", 0)),
            params={str(k): int(v) for k, v in dict(d.get("params", {})).items()},
            flops=int(d.get("flops", 0)),
            bytes_moved=int(d.get("bytes_moved", 0)),
            weight_bits=int(d.get("weight_bits", 32)),
            batch=int(d.get("batch", 1)),
        )


class StageCostModel(Protocol):
    """What the ``min-time`` partitioner asks of a cost model (``cachefit.perf`` implements it).

    layer_time(layer, resident): seconds for one micro-batch through ``layer`` when its stage's
        working set is resident on chip (``resident=True``) or spills off chip.
    transfer_time(nbytes): seconds to receive ``nbytes`` of boundary activations over the link
        (nondecreasing in ``nbytes``; the partitioner's fast search relies on it and falls back
        to its dynamic programme where it does not hold).
    overlap_transfers (optional attribute, False when absent): a stage receives its next input
        while it computes, so its time is ``max(sum of layer times, input transfer)`` instead of
        their sum (:class:`cachefit.perf.costmodel.CostModel` has it).

    Every stage pays the transfer of its input, the first one included (it receives the model
    input from the host).
    """

    def layer_time(self, layer: LayerRecord, resident: bool) -> float: ...

    def transfer_time(self, nbytes: int) -> float: ...
