"""Baselines modelled with the same cost model: tensor x pipeline parallelism and an even pipeline split.

* ``tp{t}pp{p}``: Megatron-style. The layers are split evenly (by count) into ``p`` pipeline stages;
  inside a stage every layer is sharded over ``t`` devices, so each device does ``1/t`` of the
  FLOPs, holds ``1/t`` of the weights and of the activation traffic, and the stage pays two ring
  all-reduces of the layer's output tensor per transformer layer (after the attention output
  projection and after the second MLP projection; one for an embedding or head layer, none for a
  layer without weights). Each device additionally reads and writes the full all-reduced tensor.
* ``pp{k}``: the layers split evenly by count into ``k`` stages, with no regard to bytes or cache.

Residency follows the same rule as for cachefit's plans: a stage (per device) whose footprint fits
the usable on-chip capacity reads its weights at on-chip bandwidth. Nothing is assumed in the
baselines' disfavour that is not assumed for cachefit's plan too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from ..errors import CachefitError
from ..partition.records import LayerRecord
from .costmodel import (
    CostModel,
    PipelineEstimate,
    activation_traffic,
    estimate_pipeline,
    estimate_stage,
    model_assumptions,
    stage_footprint,
)

_SINGLE_ALLREDUCE = re.compile(r"^(embed|embedding|wte|tok|head|lm_head|classifier|pool)", re.IGNORECASE)


def default_allreduces(layer: LayerRecord) -> int:
    """All-reduces per layer under tensor parallelism: 0 without weights, 1 for an embedding or
    output head (vocabulary-parallel), 2 for anything else (a transformer block)."""
    if layer.weight_bytes == 0:
        return 0
    if _SINGLE_ALLREDUCE.match(layer.name):
        return 1
    return 2


@dataclass(frozen=True)
class Baseline:
    """A parsed ``--compare`` entry: ``tp`` x ``pp`` devices."""

    tp: int
    pp: int

    @property
    def name(self) -> str:
        if self.tp == 1:
            return f"pp{self.pp}"
        return f"tp{self.tp}pp{self.pp}"

    @property
    def devices(self) -> int:
        return self.tp * self.pp


def parse_baselines(spec: str) -> list[Baseline]:
    """``"tp8pp2,pp16,tp16"`` -> [Baseline(8, 2), Baseline(1, 16), Baseline(16, 1)]."""
    out = []
    for part in (p.strip().lower() for p in spec.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(?:tp(\d+))?(?:pp(\d+))?", part)
        if not m or not (m.group(1) or m.group(2)):
            raise CachefitError(
                f"unknown baseline {part!r} in --compare {spec!r}: write tensor x pipeline degrees like "
                "tp8pp2, pp16 or tp16, separated by commas"
            )
        tp, pp = int(m.group(1) or 1), int(m.group(2) or 1)
        if tp < 1 or pp < 1:
            raise CachefitError(f"baseline {part!r}: degrees must be at least 1")
        out.append(Baseline(tp, pp))
    return out


def even_groups(n_layers: int, k: int) -> list[tuple[int, int]]:
    """``n_layers`` split by count into ``k`` contiguous groups whose sizes differ by at most one
    (the larger groups first)."""
    if k < 1:
        raise CachefitError(f"cannot split into {k} stages: give at least one")
    if k > n_layers:
        raise CachefitError(
            f"an even pipeline split into {k} stages needs at least {k} layers; the model has {n_layers}: "
            f"use at most {n_layers} stages"
        )
    base, extra = divmod(n_layers, k)
    groups, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        groups.append((start, start + size - 1))
        start += size
    return groups


def shard_layer(layer: LayerRecord, tp: int, allreduces: int) -> LayerRecord:
    """One device's share of ``layer`` under ``tp``-way tensor parallelism.

    FLOPs, weights, activation working set and activation traffic divide by ``tp``; every
    all-reduce adds a read and a write of the full output tensor on each device. The boundary
    tensors (``in_bytes``, ``out_bytes``) stay whole: every rank holds the full hidden state.
    """
    if tp == 1:
        return layer
    traffic = activation_traffic(layer) / tp + 2 * allreduces * layer.out_bytes
    weights = -(-layer.weight_bytes // tp)
    return replace(
        layer,
        flops=-(-layer.flops // tp),
        weight_bytes=weights,
        params={k: -(-v // tp) for k, v in layer.params.items()},
        activation_bytes=-(-layer.activation_bytes // tp),
        buffer_bytes=-(-layer.buffer_bytes // tp),
        bytes_moved=weights + round(traffic),
    )


def estimate_tensor_pipeline(layers: Sequence[LayerRecord], model: CostModel, *, tp: int, pp: int,
                             tokens_per_microbatch: float, microbatches_in_flight: int | None = None,
                             allreduces: Callable[[LayerRecord], int] = default_allreduces,
                             name: str | None = None) -> PipelineEstimate:
    """Predict ``tp`` x ``pp`` tensor x pipeline parallelism (``tp * pp`` devices)."""
    layers = list(layers)
    groups = even_groups(len(layers), pp)
    if tp == 1:
        est = estimate_pipeline(layers, groups, model, tokens_per_microbatch=tokens_per_microbatch,
                                microbatches_in_flight=microbatches_in_flight, name=name or f"pp{pp}")
        est.assumptions["split"] = "even by layer count"
        return est
    stages = []
    for i, (a, b) in enumerate(groups):
        group = layers[a:b + 1]
        counts = [allreduces(layer) for layer in group]
        shards = [shard_layer(layer, tp, c) for layer, c in zip(group, counts)]
        comm = sum(c * model.allreduce_time(layer.out_bytes, tp) for layer, c in zip(group, counts))
        stages.append(estimate_stage(shards, model, index=i, first_layer=a, comm_s=comm, tp=tp,
                                     footprint=stage_footprint(shards)))
    assumptions = model_assumptions(model)
    assumptions.update({"split": "even by layer count", "tensor_parallel": tp,
                        "allreduce": "ring, 2 per transformer layer"})
    return PipelineEstimate(
        name=name or f"tp{tp}pp{pp}", hardware=model.hardware.name, stages=stages,
        tokens_per_microbatch=float(tokens_per_microbatch),
        microbatches_in_flight=microbatches_in_flight or len(stages), devices=tp * pp, assumptions=assumptions,
    )


def estimate_baseline(layers: Sequence[LayerRecord], model: CostModel, baseline: Baseline, *,
                      tokens_per_microbatch: float, microbatches_in_flight: int | None = None) -> PipelineEstimate:
    return estimate_tensor_pipeline(layers, model, tp=baseline.tp, pp=baseline.pp,
                                    tokens_per_microbatch=tokens_per_microbatch,
                                    microbatches_in_flight=microbatches_in_flight)
