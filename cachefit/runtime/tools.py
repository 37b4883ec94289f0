"""What ``cachefit run`` and ``cachefit inspect`` do, as library functions (runtime side only)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import InputError
from .weights import numpy_dtype

FILL_MODES = ("random", "zeros", "ones")


def _fmt_bytes(n) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"  # pragma: no cover


def make_inputs(inputs: list[dict], fill_mode: str = "random", seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the manifest's shapes and dtypes: ``random`` (integers in [0, 100) for integer
    inputs, normal floats otherwise), ``zeros`` or ``ones``."""
    if fill_mode not in FILL_MODES:
        raise InputError(f"unknown fill mode {fill_mode!r}: use one of {', '.join(FILL_MODES)}")
    rng = np.random.default_rng(seed)
    out = {}
    for d in inputs:
        dtype = numpy_dtype(d["dtype"])
        shape = tuple(d["shape"])
        if fill_mode == "zeros":
            out[d["name"]] = np.zeros(shape, dtype)
        elif fill_mode == "ones":
            out[d["name"]] = np.ones(shape, dtype)
        elif dtype.kind in "iu":
            out[d["name"]] = rng.integers(0, 100, size=shape).astype(dtype)
        elif dtype.kind == "b":
            out[d["name"]] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            out[d["name"]] = rng.standard_normal(shape).astype(dtype)
    return out


def read_inputs(path: str | Path) -> dict[str, np.ndarray]:
    """Inputs from an ``.npz`` file (one array per input name)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read inputs from {path}: {exc} (expected an .npz file of name -> array)") from exc


def time_pipeline(pipe, inputs: Mapping[str, np.ndarray], repeat: int) -> dict:
    """Run ``repeat`` times; per-stage and end-to-end wall times in seconds (mean, median, min, max)."""
    if repeat < 1:
        raise InputError(f"--repeat {repeat}: give at least 1")
    import time

    totals, per_stage = [], [[] for _ in pipe.stages]
    for _ in range(repeat):
        t0 = time.perf_counter()
        pipe.run(inputs)
        totals.append(time.perf_counter() - t0)
        for i, t in enumerate(pipe.last_stage_seconds):
            per_stage[i].append(t)

    def summary(xs):
        return {"mean": statistics.fmean(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs)}

    return {"repeat": repeat, "total": summary(totals), "stages": [summary(xs) for xs in per_stage]}


def format_times(times: dict, stage_names: list[str]) -> str:
    lines = [f"{'':10}{'mean ms':>10}{'median ms':>11}{'min ms':>10}{'max ms':>10}   ({times['repeat']} runs)"]
    rows = [(n, s) for n, s in zip(stage_names, times["stages"])] + [("total", times["total"])]
    for name, s in rows:
        lines.append(f"{name:10}{s['mean'] * 1e3:10.3f}{s['median'] * 1e3:11.3f}{s['min'] * 1e3:10.3f}{s['max'] * 1e3:10.3f}")
    return "\n".join(lines)


def _sig(descs) -> str:
    return ", ".join(f"{d['name']} {d['dtype']}{list(d['shape'])}" for d in descs)


def format_manifest(manifest: dict) -> str:
    """The plan and the stages of an artifact as text tables (``cachefit inspect``)."""
    model = manifest.get("model", {})
    target = manifest.get("target", {})
    plan = manifest.get("plan") or {}
    lines = [
        f"model {model.get('name')} (sha256 {str(model.get('sha256'))[:16] if model.get('sha256') else '-'}), "
        f"target {target.get('kind')}{' ' + target['arch'] if target.get('arch') else ''}, "
        f"{len(manifest['stages'])} stages, format {manifest.get('format_version')}",
    ]
    plan_bits = []
    for key in ("strategy", "footprint", "objective"):
        if plan.get(key) is not None:
            plan_bits.append(f"{key} {plan[key]}")
    if plan.get("capacity_bytes") is not None:
        plan_bits.append(f"capacity {_fmt_bytes(plan['capacity_bytes'])}")
    if plan_bits:
        lines.append("plan: " + ", ".join(plan_bits))
    plan_stages = plan.get("stages") or []

    head = ["stage", "device", "layers", "n", "weights", "act+buf", "total", "util", "library", "weights file"]
    rows = []
    for i, st in enumerate(manifest["stages"]):
        ps = plan_stages[i] if i < len(plan_stages) else {}
        names = st["layers"].get("names") or []
        first, last = st["layers"]["first"], st["layers"]["last"]
        label = (names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}") if names else f"{first}..{last}"
        act = None
        if ps.get("activation_bytes") is not None:
            act = ps["activation_bytes"] + ps.get("buffer_bytes", 0)
        rows.append([
            str(i),
            f"{st['device']['kind']}:{st['device'].get('index', i)}",
            f"{label} ({first}..{last})",
            str(last - first + 1),
            _fmt_bytes(ps["weight_bytes"]) if ps.get("weight_bytes") is not None else "-",
            _fmt_bytes(act) if act is not None else "-",
            _fmt_bytes(ps["total_bytes"]) if ps.get("total_bytes") is not None else "-",
            f"{ps['utilisation']:.0%}" if isinstance(ps.get("utilisation"), (int, float)) else "-",
            f"{st['library']['file']} ({_fmt_bytes(st['library']['bytes'])})",
            f"{st['weights']['file']} ({_fmt_bytes(st['weights']['bytes'])})",
        ])
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(head)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"inputs:  {_sig(manifest['inputs'])}")
    for t in manifest.get("transfers", []):
        lines.append(f"stage {t['from_stage']} -> {t['to_stage']}: {_fmt_bytes(t['bytes'])} ({_sig(t['tensors'])})")
    lines.append(f"outputs: {_sig(manifest['outputs'])}")
    return "\n".join(lines)
