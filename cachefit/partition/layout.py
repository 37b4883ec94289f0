"""Explicit user layouts: ``4,4,4,4`` (layers per device) or ``layers.3,layers.7`` (stage starts by name)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import PlanError
from .records import LayerRecord


@dataclass(frozen=True)
class Layout:
    """A user layout: either ``counts`` (layers per stage, in order) or ``starts`` (the names of
    the layers that begin the second, third, ... stage; naming the first layer is allowed)."""

    counts: tuple = ()
    starts: tuple = ()

    def __str__(self) -> str:
        return ",".join(str(v) for v in (self.counts or self.starts))


def parse_layout(text) -> Layout:
    """Parse ``--layout``: comma-separated integers are layer counts per device, anything else
    is a list of layer names, each starting a new stage. A :class:`Layout`, or a sequence of
    ints or of names, is accepted as it is."""
    if isinstance(text, Layout):
        return text
    if isinstance(text, str):
        tokens = [t.strip() for t in text.split(",")]
    else:
        tokens = [t if isinstance(t, int) else str(t).strip() for t in text]
    if not tokens or any(t == "" for t in tokens):
        raise PlanError(
            f"malformed layout {text!r}: give layer counts per device (e.g. 4,4,4,4) or the names of "
            "the layers that start each stage (e.g. layers.4,layers.8), separated by commas, no empty items"
        )
    ints = []
    for t in tokens:
        try:
            ints.append(int(t))
        except (TypeError, ValueError):
            ints = None
            break
    if ints is not None:
        bad = [i for i, c in enumerate(ints) if c <= 0]
        if bad:
            raise PlanError(
                f"layout {text!r} gives stage {bad[0]} {ints[bad[0]]} layers: every stage needs at least one "
                "layer (cachefit never produces empty stages; use fewer devices instead)"
            )
        return Layout(counts=tuple(ints))
    return Layout(starts=tuple(str(t) for t in tokens))


def resolve_layout(layout: Layout, layers: Sequence[LayerRecord]) -> list[tuple[int, int]]:
    """The groups ``(first, last)`` (inclusive layer indices) that ``layout`` describes for ``layers``."""
    n = len(layers)
    if layout.counts:
        total = sum(layout.counts)
        if total != n:
            raise PlanError(
                f"layout {layout} places {total} layers but the model has {n}: the counts must add up to {n} "
                f"(e.g. {_even_counts(n, len(layout.counts))})"
            )
        out, first = [], 0
        for c in layout.counts:
            out.append((first, first + c - 1))
            first += c
        return out
    index: dict[str, int] = {}
    for i, l in enumerate(layers):
        index.setdefault(l.name, i)
    starts = []
    for name in layout.starts:
        if name not in index:
            near = [l.name for l in layers if name.split(".")[0] in l.name][:5] or [l.name for l in layers[:5]]
            raise PlanError(
                f"layout names layer {name!r}, which the model does not have; layer names look like "
                f"{', '.join(repr(x) for x in near)}"
            )
        starts.append(index[name])
    if starts and starts[0] == 0:
        starts = starts[1:]
    prev = 0
    for name, s in zip(layout.starts[-len(starts):] if starts else (), starts):
        if s <= prev:
            raise PlanError(
                f"layout {layout}: stage starts must be distinct layers in model order; {name!r} (layer {s}) "
                f"does not come after layer {prev} ({layers[prev].name!r})"
            )
        prev = s
    bounds = [0, *starts, n]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(len(bounds) - 1)]


def _even_counts(n: int, k: int) -> str:
    k = max(1, min(k, n))
    base, extra = divmod(n, k)
    return ",".join(str(base + (1 if i < extra else 0)) for i in range(k))
