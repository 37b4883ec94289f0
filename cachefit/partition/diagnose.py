"""Oversized layers: a layer that does not fit the capacity even alone, and what would make it fit."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..perf.hardware import format_bytes
from .footprint import Footprint, check_mode, group_footprint
from .records import LayerRecord


@dataclass(frozen=True)
class Fix:
    """One way to bring a layer under the capacity, computed from its components.

    kind:        ``int8`` / ``int4`` (weight quantization), ``prune`` (remove a fraction of the
                 weights), ``micro-batch`` (a smaller batch shrinks activations, buffers and
                 boundary tensors proportionally), ``split`` (an intra-layer split over devices).
    value:       bits per weight, the prune ratio, the micro-batch, or the number of devices.
    bytes_after: the layer's footprint once the fix is applied (per device for ``split``).
    fits:        whether that footprint is within the capacity.
    """

    kind: str
    value: float
    bytes_after: int
    fits: bool
    description: str

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "value": self.value,
            "bytes_after": self.bytes_after,
            "fits": self.fits,
            "description": self.description,
        }


@dataclass(frozen=True)
class OversizedLayer:
    """A layer whose footprint alone exceeds the capacity, with its components and the fixes."""

    index: int
    name: str
    capacity_bytes: int
    footprint: Footprint
    mode: str
    fixes: tuple = field(default_factory=tuple)

    @property
    def excess_bytes(self) -> int:
        return self.footprint.total_bytes - self.capacity_bytes

    def describe(self) -> str:
        fp = self.footprint
        parts = [f"weights {format_bytes(fp.weight_bytes)}", f"activations {format_bytes(fp.activation_bytes)}",
                 f"buffers {format_bytes(fp.buffer_bytes)}"]
        if self.mode == "exact":
            parts += [f"input boundary {format_bytes(fp.in_bytes)}", f"output boundary {format_bytes(fp.out_bytes)}"]
        lines = [
            f"layer {self.index} ({self.name!r}) needs {format_bytes(fp.total_bytes)} alone "
            f"({', '.join(parts)}), over the capacity {format_bytes(self.capacity_bytes)} "
            f"by {format_bytes(self.excess_bytes)}."
        ]
        fitting = [f for f in self.fixes if f.fits]
        others = [f for f in self.fixes if not f.fits]
        if fitting:
            lines.append("  Fixes that bring it under the capacity:")
            lines += [f"    - {f.description}" for f in fitting]
        if others:
            lines.append("  Not enough on their own:")
            lines += [f"    - {f.description}" for f in others]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "capacity_bytes": self.capacity_bytes,
            "footprint": self.footprint.to_dict(),
            "excess_bytes": self.excess_bytes,
            "mode": self.mode,
            "fixes": [f.to_dict() for f in self.fixes],
        }


def diagnose(layer: LayerRecord, capacity: int, footprint: str = "exact", index: int = -1) -> OversizedLayer:
    """Diagnose ``layer`` against ``capacity`` bytes: its footprint by component and the fixes.

    The fixes are computed one at a time from the components (``fits`` tells whether each is
    enough alone):
    - ``int8``/``int4``: weights scaled by ``bits / layer.weight_bits`` (only if that is smaller);
    - ``prune``: the fraction of the weights to remove, ``excess / weights``;
    - ``micro-batch``: the largest batch ``b' < layer.batch`` with
      ``weights + (footprint - weights) * b' / batch <= capacity`` (activations, buffers and
      boundary tensors scale with the batch);
    - ``split``: the devices ``d`` of an intra-layer split, weights and working set divided by
      ``d``, boundary tensors (the full input and output) held by every device.
    """
    check_mode(footprint)
    fp = group_footprint([layer], footprint)
    cap = int(capacity)
    total, w = fp.total_bytes, fp.weight_bytes
    rest = total - w
    excess = total - cap
    fixes: list[Fix] = []

    for bits in (8, 4):
        if layer.weight_bits > bits and w > 0:
            w_after = math.ceil(w * bits / layer.weight_bits)
            after = rest + w_after
            ok = after <= cap
            fixes.append(Fix(
                f"int{bits}", bits, after, ok,
                f"INT{bits} weights: {format_bytes(w)} -> {format_bytes(w_after)}, "
                f"layer {format_bytes(after)}" + ("" if ok else f" (still over by {format_bytes(after - cap)})"),
            ))

    if w > 0 and excess > 0:
        ratio = excess / w
        if ratio < 1:
            after = total - math.ceil(ratio * w)
            fixes.append(Fix(
                "prune", round(ratio, 4), after, after <= cap,
                f"prune {ratio:.1%} of the weights ({format_bytes(math.ceil(ratio * w))}), layer {format_bytes(after)}",
            ))
        else:
            fixes.append(Fix(
                "prune", 1.0, rest, rest <= cap,
                f"pruning cannot help enough: activations, buffers and boundaries alone are {format_bytes(rest)}",
            ))

    if rest > 0:
        batch = max(1, layer.batch)
        if cap > w:
            best = (cap - w) * batch // rest
            if 1 <= best < batch:
                after = w + math.ceil(rest * best / batch)
                fixes.append(Fix(
                    "micro-batch", best, after, after <= cap,
                    f"micro-batch {best} instead of {batch}: activations {format_bytes(rest)} -> "
                    f"{format_bytes(after - w)}, layer {format_bytes(after)}",
                ))
            else:
                after = w + math.ceil(rest / batch)
                fixes.append(Fix(
                    "micro-batch", 1, after, after <= cap,
                    f"a smaller micro-batch cannot help enough: at batch 1 the layer still needs {format_bytes(after)}"
                    if batch > 1 else
                    f"the layer is already at batch 1; its activations ({format_bytes(rest)}) do not shrink further",
                ))
        else:
            fixes.append(Fix(
                "micro-batch", 1, w, False,
                f"a smaller micro-batch cannot help: the weights alone ({format_bytes(w)}) exceed the capacity",
            ))

    boundary = fp.in_bytes + fp.out_bytes if footprint == "exact" else 0
    divisible = total - boundary
    if cap > boundary and divisible > 0:
        devices = max(2, math.ceil(divisible / (cap - boundary)))
        after = math.ceil(divisible / devices) + boundary
        fixes.append(Fix(
            "split", devices, after, after <= cap,
            f"split the layer over {devices} devices (weights and working set divided, "
            f"{format_bytes(after)} per device)",
        ))
    else:
        fixes.append(Fix(
            "split", 0, boundary, False,
            f"an intra-layer split cannot help: the boundary tensors alone ({format_bytes(boundary)}) exceed the capacity",
        ))
    return OversizedLayer(index, layer.name, cap, fp, footprint, tuple(fixes))
