"""``cachefit plan --plot``: a memory map, one stacked bar per device against the capacity line."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..errors import CachefitError
from .hardware import format_bytes

logger = logging.getLogger(__name__)

# (label, stage field(s), colour)
_PARTS = (
    ("weights", ("weight_bytes",), "#4477aa"),
    ("activations", ("activation_bytes",), "#ee6677"),
    ("buffers", ("buffer_bytes",), "#ccbb44"),
    ("boundary tensors", ("in_bytes", "out_bytes"), "#66ccee"),
)


def _get(stage: Any, key: str, default=0):
    if isinstance(stage, dict):
        return stage.get(key, default)
    return getattr(stage, key, default)


def memory_map(plan: Any) -> dict:
    """The numbers the picture shows: per device the bytes of each part, and the capacity.

    ``plan`` is a :class:`cachefit.partition.plan.Plan` or its ``to_dict()``. Boundary tensors are
    drawn only for the ``exact`` footprint (the ``sum`` footprint does not count them).
    """
    stages = _get(plan, "stages", None)
    capacity = _get(plan, "capacity_bytes", None)
    if not stages or capacity is None:
        raise CachefitError("plot_plan needs a plan with stages and capacity_bytes (a Plan or Plan.to_dict())")
    exact = _get(plan, "footprint", "exact") != "sum"
    bars = []
    for s in stages:
        parts = {}
        for label, keys, _ in _PARTS:
            if label == "boundary tensors" and not exact:
                continue
            parts[label] = sum(int(_get(s, k, 0) or 0) for k in keys)
        names = list(_get(s, "layer_names", []) or [])
        label = names[0] if len(names) == 1 else (f"{names[0]}..{names[-1]}" if names else str(_get(s, "index")))
        bars.append({
            "device": int(_get(s, "device", _get(s, "index", len(bars)))),
            "label": label,
            "parts": parts,
            "total": int(_get(s, "total_bytes", sum(parts.values()))),
            "resident": bool(_get(s, "resident", sum(parts.values()) <= capacity)),
        })
    return {"capacity_bytes": int(capacity), "bars": bars, "strategy": _get(plan, "strategy", "")}


def plot_plan(plan: Any, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw ``plan``'s memory map to ``path`` (PNG, SVG or PDF by extension) and return the path.

    One stacked bar per device (weights, activations, buffers, boundary tensors) and a dashed line
    at the capacity; spilling devices are marked. Needs matplotlib (``pip install 'cachefit[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise CachefitError(
            "plotting a plan needs matplotlib, which is not installed: pip install 'cachefit[plot]' "
            "(or pip install matplotlib)"
        ) from None
    data = memory_map(plan)
    cap = data["capacity_bytes"]
    bars = data["bars"]
    out = Path(path)
    if out.parent and not out.parent.exists():
        raise CachefitError(f"cannot write the plot to {str(out)!r}: folder {str(out.parent)!r} does not exist")

    highest = max([b["total"] for b in bars] + [cap])
    log = cap > 0 and highest > 4 * cap
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(bars) + 2.5), 4.5))
    xs = list(range(len(bars)))
    bottoms = [0.0] * len(bars)
    for label, _, colour in _PARTS:
        heights = [float(b["parts"].get(label, 0)) for b in bars]
        if not any(heights) and label not in bars[0]["parts"]:
            continue
        ax.bar(xs, heights, bottom=bottoms, color=colour, label=label, width=0.7, edgecolor="white", linewidth=0.5)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.axhline(cap, color="black", linestyle="--", linewidth=1.2, label=f"capacity {format_bytes(cap)}")
    for x, b in zip(xs, bars):
        if not b["resident"]:
            ax.annotate("spills", (x, b["total"]), ha="center", va="bottom", fontsize=7, color="#aa3377")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{b['device']}\n{b['label']}" for b in bars], fontsize=7,
                       rotation=0 if len(bars) <= 8 else 45)
    ax.set_xlabel("device")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    if log:
        ax.set_yscale("log")
        ax.set_ylabel("bytes (log scale; segments not to scale)")
        smallest = min([b["total"] for b in bars if b["total"] > 0] + [cap])
        ax.set_ylim(bottom=max(1.0, smallest / 4), top=highest * 2.5)
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylabel("bytes")
        ax.set_ylim(0, highest * 1.12)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: format_bytes(v) if v > 0 else "0"))
    ax.tick_params(axis="y", labelsize=7)
    strategy = data["strategy"]
    ax.set_title(title or f"memory map: {len(bars)} devices" + (f", strategy {strategy}" if strategy else ""))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120)
    except (OSError, ValueError) as exc:
        raise CachefitError(f"cannot write the plot to {str(out)!r}: {exc}") from None
    finally:
        plt.close(fig)
    logger.info("wrote memory map %s", out)
    return out
