"""Plans: which contiguous layers go on which device, with the per-device report.

:func:`make_plan` is what ``cachefit plan`` and ``cachefit compile`` call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import PlanError
from ..perf.hardware import format_bytes
from .cost import StageTime, default_cost_model
from .diagnose import diagnose
from .footprint import check_mode, group_footprint, make_footprint_cost
from .layout import Layout, parse_layout, resolve_layout
from .records import LayerRecord, StageCostModel
from .strategies import STRATEGIES, check_strategy, check_tie_break, solve, unplaceable_layers

logger = logging.getLogger(__name__)


class OversizedLayerError(PlanError):
    """Layers that fit no device even alone; ``oversized`` holds their diagnoses."""

    def __init__(self, message: str, oversized: list):
        super().__init__(message)
        self.oversized = oversized


@dataclass
class Stage:
    """One device's share: layers ``first_layer .. last_layer`` (inclusive) and their footprint.

    ``total_bytes`` is the group footprint in the plan's mode; ``utilisation`` is
    ``total_bytes / capacity``; a ``spilling`` stage (an oversized layer placed alone with
    ``allow_spill``) keeps ``resident_fraction = capacity / total_bytes`` of it on chip.
    ``predicted_time`` (seconds per micro-batch, input transfer included) and
    ``transfer_time`` (of its input) are set when the plan has a cost model.
    """

    index: int
    device: int
    first_layer: int
    last_layer: int
    layer_names: list
    weight_bytes: int
    activation_bytes: int
    buffer_bytes: int
    in_bytes: int
    out_bytes: int
    total_bytes: int
    utilisation: float
    resident: bool
    resident_fraction: float
    spilling: bool
    predicted_time: float | None = None
    transfer_time: float | None = None

    @property
    def num_layers(self) -> int:
        return self.last_layer - self.first_layer + 1

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "device": self.device,
            "first_layer": self.first_layer,
            "last_layer": self.last_layer,
            "layer_names": list(self.layer_names),
            "num_layers": self.num_layers,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "buffer_bytes": self.buffer_bytes,
            "in_bytes": self.in_bytes,
            "out_bytes": self.out_bytes,
            "total_bytes": self.total_bytes,
            "utilisation": self.utilisation,
            "resident": self.resident,
            "resident_fraction": self.resident_fraction,
            "spilling": self.spilling,
            "predicted_time": self.predicted_time,
            "transfer_time": self.transfer_time,
        }


@dataclass
class Cut:
    """The boundary after layer ``after_layer``: the bytes crossing it (``out_bytes`` of that layer)."""

    after_layer: int
    after_name: str
    before_name: str
    bytes: int
    transfer_time: float | None = None

    def to_dict(self) -> dict:
        return {
            "after_layer": self.after_layer,
            "after_name": self.after_name,
            "before_name": self.before_name,
            "bytes": self.bytes,
            "transfer_time": self.transfer_time,
        }


@dataclass
class Plan:
    """A partition of the model's layers over devices, with the report of every stage.

    objective: ``bytes`` (the bottleneck is the largest resident footprint) or ``time``
               (``min-time``: the largest predicted stage time).
    bottleneck: index of the bottleneck stage; ``bottleneck_value`` its bytes or seconds.
    devices: the devices the plan was made for; ``idle_devices`` those left without a stage.
    min_devices: the fewest devices any plan within capacity needs (None for layouts).
    """

    strategy: str
    footprint: str
    capacity_bytes: int
    stages: list
    cuts: list
    objective: str
    bottleneck: int
    bottleneck_value: float
    devices: int
    idle_devices: list
    min_devices: int | None
    oversized: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    layout: str | None = None

    @property
    def groups(self) -> list[tuple[int, int]]:
        return [(s.first_layer, s.last_layer) for s in self.stages]

    @property
    def devices_used(self) -> int:
        return len(self.stages)

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "footprint": self.footprint,
            "capacity_bytes": self.capacity_bytes,
            "layout": self.layout,
            "devices": self.devices,
            "devices_used": self.devices_used,
            "min_devices": self.min_devices,
            "idle_devices": list(self.idle_devices),
            "objective": self.objective,
            "bottleneck_stage": self.bottleneck,
            "bottleneck_value": self.bottleneck_value,
            "groups": [list(g) for g in self.groups],
            "stages": [s.to_dict() for s in self.stages],
            "cuts": [c.to_dict() for c in self.cuts],
            "oversized": [o.to_dict() for o in self.oversized],
            "notes": list(self.notes),
        }

    def format_table(self) -> str:
        """A text rendering: one row per stage, then the cuts, the bottleneck and the notes."""
        timed = any(s.predicted_time is not None for s in self.stages)
        head = ["stage", "layers", "n", "weights", "act+buf", "in", "out", "total", "util", "residency"]
        if timed:
            head.append("time")
        rows = []
        for s in self.stages:
            names = s.layer_names[0] if s.num_layers == 1 else f"{s.layer_names[0]} .. {s.layer_names[-1]}"
            residency = "resident" if s.resident else f"spills ({s.resident_fraction:.0%} on chip)"
            row = [
                f"{s.index}{'*' if s.index == self.bottleneck else ''}",
                names,
                str(s.num_layers),
                format_bytes(s.weight_bytes),
                format_bytes(s.activation_bytes + s.buffer_bytes),
                format_bytes(s.in_bytes),
                format_bytes(s.out_bytes),
                format_bytes(s.total_bytes),
                f"{s.utilisation:.0%}",
                residency,
            ]
            if timed:
                row.append(_fmt_time(s.predicted_time))
            rows.append(row)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines = [
            f"strategy {self.strategy}, footprint {self.footprint}, capacity {format_bytes(self.capacity_bytes)}, "
            f"{self.devices_used} of {self.devices} devices used"
            + (f" (minimum {self.min_devices})" if self.min_devices is not None else ""),
            "  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if self.cuts:
            lines.append("cuts: " + ", ".join(
                f"{c.after_name}|{c.before_name} {format_bytes(c.bytes)}"
                + (f" ({_fmt_time(c.transfer_time)})" if c.transfer_time is not None else "")
                for c in self.cuts
            ))
        value = _fmt_time(self.bottleneck_value) if self.objective == "time" else format_bytes(self.bottleneck_value)
        lines.append(f"bottleneck: stage {self.bottleneck} ({value})")
        if self.idle_devices:
            lines.append(f"idle devices: {', '.join(str(d) for d in self.idle_devices)}")
        for o in self.oversized:
            lines.append(o.describe())
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    if t >= 1:
        return f"{t:.3f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3f} ms"
    return f"{t * 1e6:.2f} us"


def make_plan(
    layers: Sequence[LayerRecord],
    capacity: int,
    strategy: str = "balanced",
    devices: int | None = None,
    footprint: str = "exact",
    layout=None,
    allow_spill: bool = False,
    cost_model: StageCostModel | None = None,
    tie_break: str = "early",
) -> Plan:
    """Partition ``layers`` into contiguous stages for devices of ``capacity`` bytes.

    strategy:    ``greedy`` (fewest devices), ``balanced`` (``devices`` stages minimising the
                 largest footprint; default ``devices``: the greedy minimum),
                 ``balanced-reference`` (same optimum, O(n^2 k) DP), ``min-time`` (minimise the
                 largest predicted stage time with at most ``devices`` stages, all within
                 capacity), ``layout`` (the user's ``layout``, validated).
    footprint:   ``exact`` (shared weights once, peak working set, boundary tensors) or ``sum``.
    layout:      ``"4,4,4,4"``, ``"layers.4,layers.8"``, a :class:`Layout`, or a list; implies
                 ``strategy="layout"`` when given with the default strategy.
    allow_spill: place a layer that fits no device alone on its own device, marked spilling,
                 instead of raising :class:`OversizedLayerError`.
    cost_model:  layer and transfer times (``min-time`` defaults to the h100 roofline; other
                 strategies report predicted times only when one is given).
    tie_break:   among plans with the same optimum, ``early`` (earlier stages take as many layers
                 as the bound allows) or ``late`` (later stages do; the mirror image).
    """
    layers = list(layers)
    if layout is not None and strategy == "balanced":
        strategy = "layout"
    check_strategy(strategy, STRATEGIES)
    check_mode(footprint)
    check_tie_break(tie_break)
    if not layers:
        raise PlanError("the model has no layers to partition")
    cap = int(capacity)
    if cap < 0:
        raise PlanError(f"capacity must be >= 0 bytes, got {capacity}")
    if devices is not None and int(devices) < 1:
        raise PlanError(f"--devices must be at least 1, got {devices}")
    notes: list[str] = []
    if strategy == "min-time" and cost_model is None:
        cost_model = default_cost_model()
        notes.append("no cost model given: stage times from the h100 roofline preset")
    cost = make_footprint_cost(layers, footprint)
    time = StageTime(layers, cost_model) if cost_model is not None else None
    names = lambda i: repr(layers[i].name)  # noqa: E731

    if strategy == "layout":
        if layout is None:
            raise PlanError("strategy layout needs --layout (layers per device, e.g. 4,4,4,4, or stage-start layer names)")
        return _layout_plan(layers, cap, footprint, parse_layout(layout), devices, allow_spill, cost, time,
                            cost_model, notes)

    stuck = unplaceable_layers(cost, cap)
    oversized = [diagnose(layers[i], cap, footprint, i) for i in stuck]
    if oversized and not allow_spill:
        raise OversizedLayerError(
            f"{len(oversized)} layer(s) do not fit the capacity {format_bytes(cap)} even alone:\n"
            + "\n".join(o.describe() for o in oversized)
            + "\nApply one of the fixes, plan for a larger capacity, or pass --allow-spill to place each "
            "alone on a device that spills off chip.",
            oversized,
        )
    if not cost.monotone:
        notes.append(
            "the exact footprint of this model is not monotone in a group's extent (cutting at a large "
            "boundary tensor costs more than keeping its producer and consumer together), so the exact "
            "frontier search (the dynamic programme where it gives up) replaced the greedy feasibility test"
        )
    elif strategy == "min-time" and not time.monotone:
        notes.append(
            "stage times are not monotone in a stage's extent (an input transfer longer than the layer "
            "before it), so the exact frontier search (the dynamic programme where it gives up) replaced "
            "the greedy feasibility test"
        )
    sol = solve(cost, cap, strategy, int(devices) if devices is not None else None, stuck, time, names,
                tie_break=tie_break)
    if devices is None:
        notes.append(f"devices not given: planned for the minimum, {sol.minimum}")
    notes += sol.notes
    objective = "time" if strategy == "min-time" else "bytes"
    return _build(layers, cap, strategy, footprint, sol.groups, sol.devices, sol.minimum, objective,
                  oversized, notes, time, cost_model, None)


def _layout_plan(layers, cap, footprint, layout: Layout, devices, allow_spill, cost, time, cost_model,
                 notes) -> Plan:
    groups = [(a, b + 1) for a, b in resolve_layout(layout, layers)]
    if devices is not None and len(groups) > devices:
        raise PlanError(
            f"layout {layout} has {len(groups)} stages but only {devices} devices were given: "
            f"use --devices {len(groups)} or a layout with at most {devices} stages"
        )
    problems, oversized = [], []
    for s, (a, b) in enumerate(groups):
        total = cost.cost(a, b)
        if total <= cap:
            continue
        if b == a + 1 and allow_spill:
            oversized.append(diagnose(layers[a], cap, footprint, a))
            continue
        fp = group_footprint(layers[a:b], footprint)
        what = (f"layer {layers[a].name!r}" if b == a + 1
                else f"layers {layers[a].name!r} .. {layers[b - 1].name!r} ({b - a} layers)")
        problems.append(
            f"  stage {s}: {what} need {format_bytes(total)} (weights {format_bytes(fp.weight_bytes)}, "
            f"activations {format_bytes(fp.activation_bytes)}, buffers {format_bytes(fp.buffer_bytes)}"
            + (f", boundaries {format_bytes(fp.in_bytes)} in + {format_bytes(fp.out_bytes)} out"
               if footprint == "exact" else "")
            + f"): over by {format_bytes(total - cap)}"
            + ("" if b > a + 1 else
               "; this layer does not fit alone: see the fixes below or pass --allow-spill")
        )
        if b == a + 1:
            problems.append("    " + diagnose(layers[a], cap, footprint, a).describe().replace("\n", "\n    "))
    if problems:
        raise PlanError(
            f"layout {layout} does not fit the capacity {format_bytes(cap)}:\n" + "\n".join(problems)
            + "\nMove layers out of the stages above (e.g. a layout with more stages), or let "
            "--strategy balanced choose the cuts."
        )
    k = devices if devices is not None else len(groups)
    return _build(layers, cap, "layout", footprint, groups, k, None, "bytes", oversized, notes, time,
                  cost_model, str(layout))


def _build(layers, cap, strategy, footprint, groups, devices, minimum, objective, oversized, notes, time,
           cost_model, layout) -> Plan:
    stages = []
    for s, (a, b) in enumerate(groups):
        fp = group_footprint(layers[a:b], footprint)
        total = fp.total_bytes
        resident = total <= cap
        if resident:
            frac = 1.0
        else:
            frac = cap / total
            logger.info("stage %d (%s) spills: %.0f%% of %d bytes resident", s, layers[a].name, 100 * frac, total)
        t = tr = None
        if time is not None:
            t = time.cost(a, b) if resident else time.spill_time(a)
            tr = time.transfer(a)
        stages.append(Stage(
            index=s, device=s, first_layer=a, last_layer=b - 1,
            layer_names=[l.name for l in layers[a:b]],
            weight_bytes=fp.weight_bytes, activation_bytes=fp.activation_bytes, buffer_bytes=fp.buffer_bytes,
            in_bytes=fp.in_bytes, out_bytes=fp.out_bytes, total_bytes=total,
            utilisation=(total / cap) if cap > 0 else (0.0 if total == 0 else float("inf")),
            resident=resident, resident_fraction=frac, spilling=not resident,
            predicted_time=t, transfer_time=tr,
        ))
    cuts = []
    for s in range(len(stages) - 1):
        j = stages[s].last_layer
        nbytes = layers[j].out_bytes
        cuts.append(Cut(
            j, layers[j].name, layers[j + 1].name, nbytes,
            float(cost_model.transfer_time(nbytes)) if cost_model is not None else None,
        ))
    if objective == "time":
        bottleneck = max(range(len(stages)), key=lambda s: stages[s].predicted_time)
        value = stages[bottleneck].predicted_time
    else:
        pool = [s for s in stages if s.resident] or stages
        bottleneck = max(pool, key=lambda s: s.total_bytes).index
        value = stages[bottleneck].total_bytes
    idle = list(range(len(stages), devices))
    if idle:
        notes = [*notes, f"{len(idle)} of {devices} devices stay idle (devices {idle[0]}..{idle[-1]}): "
                 + ("there are fewer layers than devices" if len(stages) == len(layers) else
                    f"{strategy} reaches its optimum with {len(stages)} stages")]
    return Plan(strategy, footprint, cap, stages, cuts, objective, bottleneck, value, devices, idle, minimum,
                list(oversized), list(notes), layout)
