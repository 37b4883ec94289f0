"""Per-stage accounting of a pipelined run and its timeline picture (one lane per stage)."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import CachefitError


@dataclass(frozen=True)
class TimelineEvent:
    """One micro-batch through one stage; times are ``time.perf_counter()`` seconds.

    ``t_start..t_compute`` copies the inputs onto the stage's device, ``t_compute..t_end`` runs the stage.
    """

    stage: int
    request: int
    micro_batch: int
    rows: int
    t_start: float
    t_compute: float
    t_end: float
    failed: bool = False


@dataclass
class StageStats:
    """Where one stage's worker spent a measurement window (seconds).

    compute: running the stage; transfer: copying inputs onto its device; blocked: waiting for room in
    the next stage's queue; idle: the rest of the window (waiting for work). cpu: CPU time the worker
    thread used (copies, compute, queue work; TVM pool threads beyond the worker itself are not
    counted): on a machine shared with other jobs, compute + transfer well above cpu means the thread
    was waiting for its core.
    """

    index: int
    name: str
    layers: tuple
    cores: tuple | None
    micro_batches: int = 0
    failed: int = 0
    compute_s: float = 0.0
    transfer_s: float = 0.0
    blocked_s: float = 0.0
    window_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def idle_s(self) -> float:
        return max(0.0, self.window_s - self.compute_s - self.transfer_s - self.blocked_s)

    @property
    def utilisation(self) -> float:
        return self.compute_s / self.window_s if self.window_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "layers": list(self.layers),
                "cores": list(self.cores) if self.cores is not None else None,
                "micro_batches": self.micro_batches, "failed": self.failed, "compute_s": self.compute_s,
                "transfer_s": self.transfer_s, "blocked_s": self.blocked_s, "idle_s": self.idle_s, "cpu_s": self.cpu_s,
                "window_s": self.window_s, "utilisation": self.utilisation}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class PipelineStats:
    """Accounting of a pipelined runner since its start or its last ``reset_stats()``."""

    stages: list[StageStats]
    window_s: float
    requests: int
    failed_requests: int
    rows: int
    latencies_s: list[float] = field(default_factory=list)

    @property
    def throughput_rows(self) -> float:
        return self.rows / self.window_s if self.window_s > 0 else 0.0

    def latency(self, q: float) -> float:
        return percentile(self.latencies_s, q)

    def to_dict(self) -> dict:
        return {"window_s": self.window_s, "requests": self.requests, "failed_requests": self.failed_requests,
                "rows": self.rows, "throughput_rows_per_s": self.throughput_rows,
                "latency_p50_s": self.latency(50), "latency_p99_s": self.latency(99),
                "latency_mean_s": statistics.fmean(self.latencies_s) if self.latencies_s else None,
                "stages": [s.to_dict() for s in self.stages]}

    def format_table(self) -> str:
        head = f"{'stage':10}{'layers':>10}{'cores':>8}{'batches':>9}{'compute ms':>12}{'(cpu ms)':>10}" \
               f"{'transfer ms':>13}{'blocked ms':>12}{'idle ms':>10}{'util':>7}"
        lines = [head]
        for s in self.stages:
            cores = ",".join(map(str, s.cores)) if s.cores else "-"
            lines.append(f"{s.name:10}{f'{s.layers[0]}..{s.layers[1]}':>10}{cores:>8}{s.micro_batches:>9}"
                         f"{s.compute_s * 1e3:12.2f}{s.cpu_s * 1e3:10.2f}{s.transfer_s * 1e3:13.2f}"
                         f"{s.blocked_s * 1e3:12.2f}"
                         f"{s.idle_s * 1e3:10.2f}{s.utilisation:7.0%}")
        lines.append(f"{self.requests} requests ({self.failed_requests} failed), {self.rows} rows in "
                     f"{self.window_s * 1e3:.2f} ms: {self.throughput_rows:.1f} rows/s; latency p50 "
                     f"{self.latency(50) * 1e3:.3f} ms, p99 {self.latency(99) * 1e3:.3f} ms")
        return "\n".join(lines)


_COLOURS = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb")


def plot_timeline(events: Sequence[TimelineEvent], stage_names: Sequence[str], path: str | os.PathLike, *,
                  title: str | None = None, max_events: int = 3000) -> Path:
    """Draw ``events`` as a Gantt chart: one lane per stage, one box per micro-batch (coloured by
    request, labelled ``request.micro-batch`` where it is wide enough), its input copy hatched in front
    of it, failed runs outlined in red. Only the first ``max_events`` runs are drawn.
    Needs matplotlib (``pip install cachefit[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise CachefitError("drawing a timeline needs matplotlib: pip install 'cachefit[plot]' "
                            "(or pip install matplotlib), or leave out --timeline") from exc
    if not events:
        raise CachefitError("the timeline is empty: no micro-batch has run through the pipeline yet")
    events = sorted(events, key=lambda e: e.t_start)
    total = len(events)
    events = events[:max_events]
    t0 = events[0].t_start
    span_ms = (max(e.t_end for e in events) - t0) * 1e3 or 1e-3
    k = len(stage_names)
    fig, ax = plt.subplots(figsize=(12.0, 1.4 + 0.6 * k))
    compute: dict = {}
    copies: dict = {}
    failed: dict = {}
    for e in events:
        colour = _COLOURS[e.request % len(_COLOURS)]
        xs, xc, xe = ((e.t_start - t0) * 1e3, (e.t_compute - t0) * 1e3, (e.t_end - t0) * 1e3)
        if xc > xs:
            copies.setdefault((e.stage, colour), []).append((xs, xc - xs))
        (failed if e.failed else compute).setdefault((e.stage, colour), []).append((xc, max(xe - xc, span_ms * 1e-4)))
    for (stage, colour), boxes in copies.items():
        ax.broken_barh(boxes, (k - 1 - stage - 0.35, 0.7), facecolors="white", edgecolors=colour, hatch="///",
                       linewidth=0.5)
    for (stage, colour), boxes in compute.items():
        ax.broken_barh(boxes, (k - 1 - stage - 0.35, 0.7), facecolors=colour, edgecolors="black", linewidth=0.3)
    for (stage, colour), boxes in failed.items():
        ax.broken_barh(boxes, (k - 1 - stage - 0.35, 0.7), facecolors=colour, edgecolors="red", linewidth=1.5)
    if len(events) <= 400:
        for e in events:
            xc, xe = (e.t_compute - t0) * 1e3, (e.t_end - t0) * 1e3
            if xe - xc > span_ms / 40:
                ax.text((xc + xe) / 2, k - 1 - e.stage, f"{e.request}.{e.micro_batch}", ha="center", va="center",
                        fontsize=7, color="white")
    ax.set_yticks(range(k))
    ax.set_yticklabels(list(reversed(stage_names)))
    ax.set_xlabel("time (ms)")
    ax.set_xlim(0, span_ms * 1.01)
    ax.set_ylim(-0.6, k - 0.4 + 0.5)
    shown = f"first {len(events)} of {total} stage runs" if total > len(events) else f"{total} stage runs"
    ax.set_title(title or f"pipeline timeline: {len({e.request for e in events})} requests, {shown}")
    ax.legend(handles=[Patch(facecolor=_COLOURS[0], label="compute (colour: request; label request.micro-batch)"),
                       Patch(facecolor="white", edgecolor=_COLOURS[0], hatch="///", label="input copy"),
                       Patch(facecolor="white", edgecolor="red", label="failed")],
              loc="upper right", fontsize=7, ncol=3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
