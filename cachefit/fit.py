"""Make oversized layers fit: quantize, prune, micro-batch, in that order (``--fit auto``).

Two halves:

- plain Python on :class:`~cachefit.partition.records.LayerRecord` (no TVM): the escalation ladder
  (:func:`candidates`), the micro-batch choice (:func:`choose_micro_batch`), the report
  (:class:`FitReport`);
- :func:`fit_model`, which applies the choices to a :class:`~cachefit.analysis.ModelAnalysis` with
  the :class:`~cachefit.passes.quantize_weights.QuantizeWeights` and
  :class:`~cachefit.passes.prune_weights.PruneWeights` passes (and a re-import at a smaller
  batch for micro-batching) and measures every result with the footprint analysis, so that what
  the report says was measured on the rewritten IR, not predicted.

The ladder for one layer over capacity, least aggressive first: INT8 weights; INT4 weights
(group-wise with ``group_size``); INT4 plus pruning of its MLP hidden units by 5% steps up to
``max_prune`` (layers with an MLP); INT4, MLP pruned by ``max_prune``, plus pruning of its
attention heads one whole head (one whole key/value group under GQA) at a time up to
``max_prune_heads`` (layers with attention heads that :func:`~cachefit.passes.prune_weights.find_attention_heads`
can follow); then, for the whole model, a smaller micro-batch (the largest divisor of the batch
with which every layer fits); if nothing fits, the report says an intra-layer split is needed and
over how many devices (:func:`cachefit.partition.diagnose`). Heads come last among the per-layer
rungs: removing a head costs more accuracy than the same bytes of MLP units.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .errors import CachefitError
from .partition.diagnose import diagnose
from .partition.footprint import check_mode, group_footprint
from .partition.records import LayerRecord
from .perf.hardware import format_bytes

log = logging.getLogger(__name__)

FIT_MODES = ("none", "auto")
QUANTIZE_MODES = ("none", "int8", "int4")
#: the pruning ladder's step (fraction of the hidden units)
PRUNE_STEP = 0.05


# ---------------------------------------------------------------------------------------------
# Plain data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """What is applied to one layer: weight bits (None: as stored), the pruned fraction of its MLP
    hidden units, and the pruned fraction of its attention heads (key/value groups under GQA).

    ``heads`` is what is asked of :class:`~cachefit.passes.prune_weights.PruneWeights`, which
    rounds it to whole units of the layer (:func:`~cachefit.passes.prune_weights.kept_units`); the
    ladder's head rungs are exact (``k / units``), and the report gives the fraction applied."""

    bits: int | None = None
    prune: float = 0.0
    heads: float = 0.0

    def steps(self) -> list[str]:
        out = []
        if self.bits:
            out.append(f"int{self.bits}")
        if self.prune > 0:
            out.append(f"prune {self.prune:.0%}")
        if self.heads > 0:
            out.append(f"prune heads {self.heads:.0%}")
        return out

    def rank(self) -> tuple:
        """Aggressiveness: a later rung of the ladder compares greater."""
        return ({None: 0, 8: 1, 4: 2}[self.bits], round(self.prune, 6), round(self.heads, 6))


def removed_units(ratio: float, units: int) -> int:
    """Whole units (heads, key/value groups) that PruneWeights removes for ``ratio`` of ``units``."""
    from .passes.prune_weights import kept_units

    return units - kept_units(ratio, units) if ratio > 0 and units > 0 else 0


def head_fraction(removed: int, units: int) -> float:
    """The head fraction of a rung that removes ``removed`` whole units of ``units`` (exact, so that
    PruneWeights removes exactly ``removed``)."""
    return round(removed / units, 6)


def candidates(base: Recipe, max_prune: float, step: float = PRUNE_STEP, min_prune: float = 0.0, *,
               mlp: bool = True, head_units: int = 0, max_prune_heads: float = 0.0) -> list[Recipe]:
    """The ladder after ``base`` (the global --quantize/--prune/--prune-heads), least aggressive first:
    INT8, INT4, then (``mlp``: the layer has a prunable MLP) INT4 with pruning ``min_prune`` rounded
    up to ``step``, growing by ``step`` up to ``max_prune``; then (``head_units`` > 0: the layer's
    attention has that many prunable units, heads or key/value groups) INT4 with the MLP pruning
    reached so far and one more whole unit of heads removed per rung, as long as the removed fraction
    stays within ``max_prune_heads`` and one unit is left. Rungs not more aggressive than ``base``
    are left out."""
    out = [Recipe(8, base.prune, base.heads), Recipe(4, base.prune, base.heads)]
    prune = base.prune
    if mlp and max_prune > base.prune:
        start = max(base.prune + step, min_prune)
        p = math.ceil(round(start / step, 6)) * step
        while p < max_prune + 1e-9:
            out.append(Recipe(4, round(p, 6), base.heads))
            p += step
        if not out or out[-1].prune < max_prune - 1e-9:
            out.append(Recipe(4, round(max_prune, 6), base.heads))
        prune = out[-1].prune
    if head_units > 1 and max_prune_heads > 0:
        for k in range(removed_units(base.heads, head_units) + 1, head_units):
            if k / head_units > max_prune_heads + 1e-9:
                break
            out.append(Recipe(4, prune, head_fraction(k, head_units)))
    return [r for r in out if r.rank() > base.rank()]


def layer_bytes(layer: LayerRecord, footprint: str = "exact") -> int:
    """The footprint of ``layer`` alone on a device."""
    return group_footprint([layer], footprint).total_bytes


def scaled_bytes(layer: LayerRecord, micro_batch: int, footprint: str = "exact") -> int:
    """Predicted footprint of ``layer`` at ``micro_batch``: activations, buffers and boundary
    tensors scale linearly with the batch, weights do not (as in :func:`diagnose`)."""
    total = layer_bytes(layer, footprint)
    w = group_footprint([layer], footprint).weight_bytes
    batch = max(1, layer.batch)
    return w + math.ceil((total - w) * micro_batch / batch)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_micro_batch(layers: Sequence[LayerRecord], capacity: int, footprint: str = "exact") -> int:
    """The largest divisor ``m`` of the batch with which every layer fits (linear scaling of the
    working set). Layers whose weights alone exceed the capacity cannot be helped by a smaller
    batch and are ignored; when no divisor helps the others, 1."""
    if not layers:
        return 1
    batch = max(1, layers[0].batch)
    helpable = [l for l in layers if group_footprint([l], footprint).weight_bytes < capacity]
    for m in sorted(divisors(batch), reverse=True):
        if all(scaled_bytes(l, m, footprint) <= capacity for l in helpable):
            return m
    return 1


@dataclass
class LayerFit:
    """One layer in the fit report.

    applied:        what was applied to it (``int8``, ``int4``, ``prune 25%``, ``micro-batch 2``).
    bytes_before / bytes_after: its footprint alone (``footprint`` mode) before anything / at the end.
    split_devices:  when nothing fits: the devices of an intra-layer split that would.
    suggestions:    the diagnosis (what would help) when nothing was applied (``--fit none``) or nothing fits.
    heads_before / heads_after: its attention's query heads before / after head pruning (None: no
                    head was pruned); ``applied`` says ``prune heads 25% (4 -> 3)``.
    """

    index: int
    name: str
    bytes_before: int
    bytes_after: int
    weight_bytes_before: int
    weight_bytes_after: int
    fits: bool
    applied: list = field(default_factory=list)
    split_devices: int | None = None
    suggestions: list = field(default_factory=list)
    heads_before: int | None = None
    heads_after: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class FitReport:
    """What ``--fit`` / ``--quantize`` / ``--prune`` / ``--micro-batch`` did, per layer."""

    mode: str
    capacity_bytes: int
    footprint: str
    batch: int
    micro_batch: int
    quantize: str = "none"
    group_size: int | None = None
    prune: float = 0.0
    max_prune: float = 0.0
    layers: list = field(default_factory=list)
    quantized: list = field(default_factory=list)
    pruned: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    prune_heads: float = 0.0       # fraction of the attention heads removed (every layer with heads)
    calibration: int = 0           # input batches of the GPTQ calibration run (0: data-free)
    int8_weights: list = field(default_factory=list)   # name patterns kept at INT8 under int4
    max_prune_heads: float = 0.0   # the most --fit auto may remove of a layer's attention heads

    @property
    def fits(self) -> bool:
        return all(l.fits for l in self.layers)

    @property
    def changed(self) -> list:
        return [l for l in self.layers if l.applied]

    def to_dict(self) -> dict:
        return {
            "mode": self.mode, "capacity_bytes": self.capacity_bytes, "footprint": self.footprint,
            "batch": self.batch, "micro_batch": self.micro_batch, "quantize": self.quantize,
            "group_size": self.group_size, "prune": self.prune, "max_prune": self.max_prune,
            "fits": self.fits, "layers": [l.to_dict() for l in self.layers],
            "quantized": list(self.quantized), "pruned": list(self.pruned), "notes": list(self.notes),
            "calibration": self.calibration, "int8_weights": list(self.int8_weights), "prune_heads": self.prune_heads,
            "max_prune_heads": self.max_prune_heads,
        }

    def format_table(self) -> str:
        head = (f"fit {self.mode}: capacity {format_bytes(self.capacity_bytes)}, batch {self.batch}"
                + (f", micro-batch {self.micro_batch}" if self.micro_batch != self.batch else "")
                + (f", --quantize {self.quantize}" + (f" --group-size {self.group_size}" if self.group_size else "")
                   if self.quantize != "none" else "")
                + (f", GPTQ calibrated on {self.calibration} batch(es)" if self.calibration else "")
                + (f", INT8 kept for {', '.join(self.int8_weights)}" if self.int8_weights else "")
                + (f", --prune {self.prune:g}" if self.prune else "")
                + (f", --prune-heads {self.prune_heads:g}" if self.prune_heads else ""))
        lines = [head]
        shown = [l for l in self.layers if l.applied or not l.fits or l.bytes_before > self.capacity_bytes]
        if not shown:
            lines.append("  every layer fits as it is")
        for l in shown:
            what = ", ".join(l.applied) if l.applied else "nothing applied"
            state = "fits" if l.fits else (f"DOES NOT FIT: an intra-layer split over {l.split_devices} devices is needed"
                                           if l.split_devices else "DOES NOT FIT")
            lines.append(f"  layer {l.index} ({l.name}): {format_bytes(l.bytes_before)} -> {format_bytes(l.bytes_after)} "
                         f"(weights {format_bytes(l.weight_bytes_before)} -> {format_bytes(l.weight_bytes_after)}); "
                         f"{what}; {state}")
            for s in l.suggestions:
                lines.append(f"      - {s}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _suggestions(layer: LayerRecord, capacity: int, footprint: str, index: int) -> list[str]:
    return [f.description for f in diagnose(layer, capacity, footprint, index).fixes]


def _split_devices(layer: LayerRecord, capacity: int, footprint: str, index: int) -> int | None:
    for f in diagnose(layer, capacity, footprint, index).fixes:
        if f.kind == "split" and f.fits:
            return int(f.value)
    return None


# ---------------------------------------------------------------------------------------------
# Micro-batch: the same model at a smaller batch (ONNX level, before import)
# ---------------------------------------------------------------------------------------------

_SHAPE_INPUTS = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0}


def rebatch_onnx(model, batch: int, micro_batch: int):
    """A copy of a (cleaned, static-shape) ONNX model whose batch dimension is ``micro_batch``.

    The inputs' leading dimension ``batch`` becomes ``micro_batch``; so does the leading entry of
    every constant shape fed to Reshape / Expand / ConstantOfShape that equals ``batch`` (or, for
    a Reshape of a batch-led tensor, a multiple of it: ``[B*S, H]``).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
    lead: dict = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in list(inferred.graph.input) + list(inferred.graph.value_info):
            dims = vi.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value"):
                lead[vi.name] = dims[0].dim_value
    except Exception:  # noqa: BLE001 - only a refinement
        pass
    init_names = set(inits)
    for vi in g.input:
        if vi.name in init_names:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].dim_value = micro_batch
    changed = 0
    for node in g.node:
        pos = _SHAPE_INPUTS.get(node.op_type)
        if pos is None or len(node.input) <= pos:
            continue
        name = node.input[pos]
        if name in inits:
            arr = numpy_helper.to_array(inits[name])
        elif name in consts:
            attr = next((a for a in consts[name].attribute if a.name == "value"), None)
            if attr is None:
                continue
            arr = numpy_helper.to_array(attr.t)
        else:
            continue
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
            continue
        first = int(arr[0])
        new_first = None
        if first == batch:
            new_first = micro_batch
        elif (node.op_type == "Reshape" and first > batch and first % batch == 0
              and lead.get(node.input[0]) == batch):
            new_first = first // batch * micro_batch
        if new_first is None:
            continue
        new = np.array(arr, copy=True)
        new[0] = new_first
        t = numpy_helper.from_array(new.astype(arr.dtype), f"{name}_mb{micro_batch}_{changed}")
        g.initializer.append(t)
        node.input[pos] = t.name
        changed += 1
    del g.value_info[:]
    for o in g.output:
        dims = o.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].dim_value = micro_batch
    return m


def rebatch_analysis(analysis, micro_batch: int, *, layers: int | None = None,
                     layer_boundaries: Sequence[str] | None = None):
    """Analyse the same model at ``micro_batch`` (see :func:`rebatch_onnx`)."""
    from .analysis import analyze_onnx
    from .frontends.onnx import LoadedModel

    batch = analysis.layers[0].batch if analysis.layers else 1
    if micro_batch == batch:
        return analysis
    if micro_batch < 1 or batch % micro_batch:
        raise CachefitError(f"--micro-batch {micro_batch} does not divide the batch {batch}: use one of "
                            f"{', '.join(map(str, divisors(batch)))}")
    src = analysis.imported.source
    model = rebatch_onnx(analysis.imported.onnx_model, batch, micro_batch)
    loaded = LoadedModel(model=model, path=src.path, sha256=src.sha256, shape_only=src.shape_only, name=src.name)
    try:
        new = analyze_onnx(loaded, dtype=analysis.dtype, layers=layers, layer_boundaries=layer_boundaries)
    except Exception as exc:  # noqa: BLE001 - TVM's importer raises its own types too
        log.debug("re-import at micro-batch %d failed", micro_batch, exc_info=True)
        raise CachefitError(
            f"{analysis.name}: re-importing the model at micro-batch {micro_batch} (batch {batch}) failed: "
            f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}. Its batch dimension seems fixed inside "
            "the graph; re-export it with a "
            "dynamic batch or leave --micro-batch out"
        ) from None
    got = new.layers[0].batch if new.layers else 1
    if got != micro_batch or len(new.layers) != len(analysis.layers):
        raise CachefitError(f"{analysis.name}: at micro-batch {micro_batch} the model reads as batch {got} with "
                            f"{len(new.layers)} layers (expected {len(analysis.layers)}); micro-batching is not possible")
    imported = dataclasses.replace(new.imported, original_names=analysis.imported.original_names)
    return dataclasses.replace(new, imported=imported)


# ---------------------------------------------------------------------------------------------
# Applying recipes and measuring them
# ---------------------------------------------------------------------------------------------


class _Workbench:
    """One batch size of the model: builds the module for per-layer recipes and measures it.

    Recipes are applied to the float model in a fixed order (pruning first, it needs the float
    weights; then quantization), so any combination can be built again from scratch. The
    footprint pass keeps its per-layer cache across builds: only changed layers are lowered.
    """

    def __init__(self, analysis, group_size: int | None, hessians: dict | None = None,
                 int8_weights: Sequence[str] | None = None):
        from .passes.annotate_footprint import AnnotateFootprint

        self.analysis = analysis
        self.group_size = group_size
        self.hessians = dict(hessians or {})
        self.int8_weights = list(int8_weights or [])
        self.annotator = AnnotateFootprint(dtype=analysis.dtype)
        self.n = len(analysis.layers)
        self._cache: dict = {}
        self._structure: dict = {}

    def structure(self, i: int) -> tuple[bool, int, str | None]:
        """(layer ``i`` has a prunable MLP, units of its prunable attention heads (0: none), why its
        heads cannot be pruned (None: they can, or it has none)), on the float model."""
        if i not in self._structure:
            self._structure[i] = layer_structure(self.analysis.mod, i)
        return self._structure[i]

    def build(self, recipes: Sequence[Recipe]):
        """(module, params, records, quantized, pruned) for one recipe per layer."""
        key = tuple(recipes)
        if key in self._cache:
            return self._cache[key]
        from .passes.prune_weights import prune_weights
        from .passes.quantize_weights import quantize_weights

        mod, params = self.analysis.mod, self.analysis.params
        quantized, pruned = [], []
        hessians = dict(self.hessians)
        for ratio in sorted({r.heads for r in recipes if r.heads > 0}):
            sel = [i for i, r in enumerate(recipes) if r.heads == ratio]
            mod, params, done = prune_weights(mod, params, 0.0, layers=sel, heads=ratio)
            pruned += [d.to_dict() for d in done]
            for d in done:   # the output projection lost rows of its reduction axis
                for name, rows in d.reduced:
                    if name in hessians:
                        hessians[name] = hessians[name][np.ix_(rows, rows)]
        for ratio in sorted({r.prune for r in recipes if r.prune > 0}):
            sel = [i for i, r in enumerate(recipes) if r.prune == ratio]
            mod, params, done = prune_weights(mod, params, ratio, layers=sel)
            pruned += [d.to_dict() for d in done]
            for d in done:   # fc2 lost rows of its reduction axis: the Hessian loses them too
                kept = d.kept
                h = hessians.get(d.weights[-1]) if d.weights else None
                if h is not None and h.shape[0] == d.hidden_before:
                    hessians[d.weights[-1]] = h[np.ix_(kept, kept)]
        for bits in (8, 4):
            sel = [i for i, r in enumerate(recipes) if r.bits == bits]
            if sel:
                mod, params, done = quantize_weights(mod, params, bits=bits, group_size=self.group_size, layers=sel,
                                                     hessians=hessians, int8_weights=self.int8_weights)
                quantized += [d.to_dict() for d in done]
        if all(r == Recipe() for r in recipes):
            result = (mod, params, list(self.analysis.layers), quantized, pruned)
        else:
            mod, records = self.measure(mod)
            result = (mod, params, records, quantized, pruned)
        self._cache[key] = result
        return result

    def measure(self, mod):
        """Footprints of a rewritten module: (annotated module, records)."""
        from tvm import relax

        from .analysis import layer_records
        from .passes import layering, run_pass
        from .passes.quantize_weights import FOOTPRINT_ATTRS, dequant_flops

        # strip old figures so identical layers share the footprint pass's cache
        import tvm

        funcs = {}
        for gv, f in mod.functions_items():
            if isinstance(f, relax.Function) and f.attrs is not None and "cachefit.layer" in f.attrs:
                for k in FOOTPRINT_ATTRS:
                    if k in f.attrs:
                        f = f.without_attr(k)
            funcs[gv] = f
        clean = tvm.IRModule(funcs, attrs=mod.attrs)
        for k, infos in mod.global_infos.items():
            clean.update_global_info(k, infos)
        annotated = run_pass(self.annotator, clean)
        records = layer_records(annotated)
        out = []
        for (gv, fn), r in zip(layering.layer_functions(annotated), records):
            true_flops, counted = dequant_flops(annotated, fn)
            extra = true_flops - counted
            bits = int(fn.attrs["cachefit.weight_bits"]) if "cachefit.weight_bits" in fn.attrs else r.weight_bits
            out.append(dataclasses.replace(r, flops=r.flops + extra, weight_bits=bits))
        return annotated, out


def _layer_fit(i, before: LayerRecord, after: LayerRecord, recipe: Recipe, capacity: int, footprint: str,
               micro: int | None, heads_done: dict | None = None) -> LayerFit:
    """One layer's report entry. The head step says what was applied to this layer (``heads_done``,
    PruneWeights' record for it: whole heads, so the fraction may differ from the one asked for;
    a layer without heads gets no head step)."""
    applied = dataclasses.replace(recipe, heads=0.0).steps()
    h_before = h_after = None
    if heads_done is not None:
        h_before, h_after = int(heads_done["heads_before"]), int(heads_done["heads_after"])
        applied.append(f"prune heads {(h_before - h_after) / h_before:.0%} ({h_before} -> {h_after})")
    applied += [f"micro-batch {micro}"] if micro else []
    b_after = layer_bytes(after, footprint)
    fits = b_after <= capacity
    return LayerFit(
        index=i, name=before.name,
        bytes_before=layer_bytes(before, footprint), bytes_after=b_after,
        weight_bytes_before=before.weight_bytes, weight_bytes_after=after.weight_bytes,
        fits=fits, applied=applied,
        split_devices=None if fits else _split_devices(after, capacity, footprint, i),
        suggestions=[] if fits else _suggestions(after, capacity, footprint, i),
        heads_before=h_before, heads_after=h_after,
    )


def _escalate(bench: _Workbench, base: Recipe, capacity: int, footprint: str, max_prune: float,
              progress: Callable[[str], None] | None, max_prune_heads: float = 0.0):
    """Per layer over capacity, the least aggressive rung that fits (:func:`candidates`, with the
    layer's own structure: MLP rungs only where it has a prunable MLP, head rungs only where it has
    attention heads that can be followed). Returns (recipes, unresolved, notes)."""
    n = bench.n
    recipes = [base] * n
    _, _, records, _, _ = bench.build(recipes)
    over = [i for i, r in enumerate(records) if layer_bytes(r, footprint) > capacity]
    unresolved, notes = [], []
    for i in over:
        chosen = None
        last = records[i]
        best = (layer_bytes(last, footprint), base)   # the smallest footprint measured so far
        mlp, units, why = bench.structure(i)
        if why and max_prune_heads > 0:
            notes.append(f"layer {i} ({records[i].name}): its attention heads are not pruned by --fit auto: {why}")
        for cand in candidates(base, max_prune, mlp=mlp, head_units=units, max_prune_heads=max_prune_heads):
            trial = list(recipes)
            trial[i] = cand
            _, _, recs, _, _ = bench.build(trial)
            last = recs[i]
            if progress:
                progress(f"fit: layer {i} ({records[i].name}) with {', '.join(cand.steps())}: "
                         f"{format_bytes(layer_bytes(last, footprint))} (capacity {format_bytes(capacity)})")
            if layer_bytes(last, footprint) <= capacity:
                chosen = cand
                break
            if layer_bytes(last, footprint) < best[0]:
                best = (layer_bytes(last, footprint), cand)
        if chosen is None:
            unresolved.append(i)
            # keep the rung that came closest (usually the last; not always: a rewrite may not help)
            recipes[i] = best[1]
        else:
            recipes[i] = chosen
    return recipes, unresolved, notes


def layer_structure(mod, i: int) -> tuple[bool, int, str | None]:
    """What the pruning rungs can do to layer ``i`` of a layered module: (it has a prunable MLP
    pair, the prunable units of its attention (heads; key/value groups under GQA; 0 when it has no
    attention), why its attention cannot be pruned (the
    :class:`~cachefit.passes.prune_weights.HeadsNotFound` message; None when it can or has none))."""
    from .passes.prune_weights import HeadsNotFound, find_attention_heads, find_mlp_pairs

    mlp = bool(find_mlp_pairs(mod, layers=[i]))
    try:
        atts = find_attention_heads(mod, layers=[i])
    except HeadsNotFound as exc:
        log.info("fit: layer %d: no head rungs: %s", i, exc)
        return mlp, 0, str(exc)
    return mlp, (atts[0].units if atts else 0), None


def check_fit_options(*, mode: str = "none", quantize: str | None = None, group_size: int | None = None,
                      prune: float = 0.0, max_prune: float = 0.5, max_prune_heads: float | None = None,
                      prune_heads: float = 0.0, int8_weights: Sequence[str] | None = None) -> None:
    """Refuse option values :func:`fit_model` cannot use (a CachefitError naming the flag and the value);
    cheap, no model needed: run it before importing one."""
    if mode not in FIT_MODES:
        raise CachefitError(f"unknown --fit {mode!r}: use auto (apply the fixes) or none (only report)")
    quantize = (quantize or "none").lower()
    if quantize not in QUANTIZE_MODES:
        raise CachefitError(f"unknown --quantize {quantize!r}: use none, int8 or int4")

    def fraction(flag, value, example):
        try:
            ok = 0.0 <= float(value) < 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise CachefitError(f"{flag} {value} is not a fraction in [0, 1): {example}")

    fraction("--prune", prune, "e.g. 0.25 removes a quarter of the MLP units")
    fraction("--max-prune", max_prune, "e.g. 0.5 lets --fit auto remove up to half of a layer's MLP units")
    if max_prune_heads is not None:
        fraction("--max-prune-heads", max_prune_heads, "e.g. 0.25 lets --fit auto remove up to a quarter of a "
                 "layer's attention heads; 0 keeps every head")
    fraction("--prune-heads", prune_heads, "e.g. 0.25 removes a quarter of each attention layer's heads")
    if group_size is not None and int(group_size) < 1:
        raise CachefitError(f"--group-size {group_size} must be a positive number of rows")
    for pat in int8_weights or ():
        if not str(pat).strip() or str(pat).strip() == "@":
            raise CachefitError(f"--int8-weights {pat!r} is empty: give a weight-name pattern ('*router*') or "
                                "@LAYER ('@head')")
    if int8_weights and quantize != "int4" and mode != "auto":
        raise CachefitError(f"--int8-weights {' '.join(map(str, int8_weights))} keeps weights at INT8 where INT4 "
                            f"is applied, and nothing is quantized to INT4 here (--quantize {quantize}, --fit {mode}): "
                            "add --quantize int4 or --fit auto, or leave --int8-weights out")


def int8_pattern_notes(analysis, int8_weights: Sequence[str]) -> list[str]:
    """A note per --int8-weights pattern that names nothing in ``analysis`` (no IR weight; no layer for
    ``@LAYER``), with the IR name when the pattern matches an ONNX name instead. Notes, not errors:
    a list such as :data:`~cachefit.passes.quantize_weights.SENSITIVE_INT8` is meant for many models."""
    import fnmatch

    names = [str(k) for k in analysis.params]
    layer_names = [r.name for r in analysis.layers]
    originals = getattr(getattr(analysis, "imported", None), "original_names", None) or {}
    notes = []
    for pat in map(str, int8_weights):
        if pat.startswith("@"):
            if not any(fnmatch.fnmatchcase(n, pat[1:]) for n in layer_names):
                notes.append(f"--int8-weights {pat!r} matches no layer of {analysis.name} (its layers: "
                             f"{', '.join(layer_names[:6])}{', ...' if len(layer_names) > 6 else ''})")
        elif not any(fnmatch.fnmatchcase(n, pat) for n in names):
            hint = next((ir for ir, orig in originals.items() if fnmatch.fnmatchcase(str(orig), pat)), None)
            notes.append(f"--int8-weights {pat!r} matches no weight of {analysis.name}"
                         + (f"; the patterns match the IR's names, where {originals[hint]!r} is {hint!r}" if hint
                            else f" (its weights are named like {', '.join(names[:3])})"))
    for n in notes:
        log.warning("%s", n)
    return notes


def fit_model(
    analysis,
    capacity: int,
    *,
    mode: str = "none",
    quantize: str | None = None,
    group_size: int | None = None,
    prune: float = 0.0,
    max_prune: float = 0.5,
    micro_batch: int | str | None = None,
    footprint: str = "exact",
    layers: int | None = None,
    layer_boundaries: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    calibration: int | Sequence[Mapping] | None = None,
    int8_weights: Sequence[str] | None = None,
    prune_heads: float = 0.0,
    max_prune_heads: float | None = None,
):
    """Apply ``--quantize``/``--prune``/``--prune-heads`` to every layer, then (``mode="auto"``)
    escalate on each layer still over ``capacity``; ``micro_batch`` is ``None`` (auto only as a last
    resort of ``mode="auto"``), ``"auto"`` (the largest divisor of the batch that fits, see
    :func:`choose_micro_batch`) or a number. ``layers``/``layer_boundaries`` are the ones the model was
    analysed with (a smaller micro-batch imports it again).

    ``max_prune`` bounds the MLP rungs, ``max_prune_heads`` (None: the value of ``max_prune``; 0: no
    head rungs) the attention-head rungs of ``mode="auto"``: whole heads (whole key/value groups under
    GQA) are removed one at a time, only where the removed fraction stays within it, only after the
    MLP rungs reached ``max_prune``, and only in layers whose attention
    :func:`~cachefit.passes.prune_weights.find_attention_heads` follows. The report gives the
    fraction each layer got (``prune heads 25% (4 -> 3)``).

    ``calibration`` (opt-in; the default is data-free): a number N of random input batches (N(0, 1)
    floats, token ids uniform over the embedding) or a list of input feeds (ONNX input name ->
    array); the float model runs on them in onnxruntime, and every quantized matmul weight is
    rounded by GPTQ against its input Hessian (:mod:`cachefit.passes.calibrate_weights`).
    ``int8_weights``: weight-name patterns kept at INT8 where INT4 is applied, or ``@<layer>``
    for the weights a layer reads (``@head``) (mixed precision;
    :data:`cachefit.passes.quantize_weights.SENSITIVE_INT8` are the MoE routers); a pattern that
    matches no weight (no layer) gets a note in the report.

    Returns ``(analysis, report)``: a :class:`~cachefit.analysis.ModelAnalysis` of the rewritten model
    (module, params, records measured on it) and the :class:`FitReport`.
    """
    check_mode(footprint)
    check_fit_options(mode=mode, quantize=quantize, group_size=group_size, prune=prune, max_prune=max_prune,
                      max_prune_heads=max_prune_heads, prune_heads=prune_heads, int8_weights=int8_weights)
    quantize = (quantize or "none").lower()
    max_prune_heads = float(max_prune if max_prune_heads is None else max_prune_heads)
    if capacity <= 0:
        raise CachefitError(f"the capacity must be positive, got {capacity}")
    batch = analysis.layers[0].batch if analysis.layers else 1
    base = Recipe({"none": None, "int8": 8, "int4": 4}[quantize], float(prune), float(prune_heads))
    original = list(analysis.layers)
    notes: list[str] = int8_pattern_notes(analysis, int8_weights) if int8_weights else []

    def rebatch(m):
        return rebatch_analysis(analysis, m, layers=layers, layer_boundaries=layer_boundaries)

    hessians, n_calib = {}, 0
    if calibration is not None and (quantize != "none" or mode == "auto"):
        hessians, n_calib = _calibrate(analysis, calibration, progress)

    def workbench(a):
        return _Workbench(a, group_size, hessians, int8_weights)

    micro = batch
    current = analysis
    if micro_batch not in (None, "auto"):
        micro = int(micro_batch)
        if micro != batch:
            current = rebatch(micro)
    bench = workbench(current)

    if mode == "auto":
        recipes, unresolved, found = _escalate(bench, base, capacity, footprint, max_prune, progress, max_prune_heads)
        if unresolved and micro_batch in (None, "auto") and micro > 1:
            _, _, recs, _, _ = bench.build(recipes)
            m = choose_micro_batch(recs, capacity, footprint)
            if m < micro:
                if progress:
                    progress(f"fit: layers {unresolved} still over capacity; trying micro-batch {m}")
                try:
                    current = rebatch(m)
                except CachefitError as exc:
                    notes.append(str(exc))
                else:
                    micro = m
                    bench = workbench(current)
                    recipes, unresolved, found = _escalate(bench, base, capacity, footprint, max_prune, progress,
                                                           max_prune_heads)
        notes += found
    else:
        recipes = [base] * bench.n
        if micro_batch == "auto":
            _, _, recs, _, _ = bench.build(recipes)
            m = choose_micro_batch(recs, capacity, footprint)
            if m < micro:
                current = rebatch(m)
                micro = m
                bench = workbench(current)

    mod, params, records, quantized, pruned = bench.build(recipes)
    report = FitReport(mode=mode, capacity_bytes=int(capacity), footprint=footprint, batch=batch, micro_batch=micro,
                       quantize=quantize, group_size=group_size, prune=float(prune), max_prune=float(max_prune),
                       quantized=quantized, pruned=pruned, notes=notes, calibration=n_calib,
                       int8_weights=list(int8_weights or []), prune_heads=float(prune_heads),
                       max_prune_heads=max_prune_heads if mode == "auto" else 0.0)
    head_layers = {d["layer"]: d for d in pruned if "heads_before" in d}
    for i, (before, after) in enumerate(zip(original, records)):
        rec = recipes[i]
        changed = rec != Recipe() or micro != batch or i in head_layers
        lf = _layer_fit(i, before, after, rec, capacity, footprint, micro if micro != batch else None,
                        head_layers.get(i))
        if not changed:
            lf.applied = []
        if mode == "none" and not lf.fits:
            lf.suggestions = _suggestions(after, capacity, footprint, i)
        report.layers.append(lf)
    new = dataclasses.replace(current, mod=mod, params=params, layers=list(records))
    return new, report


# ---------------------------------------------------------------------------------------------
# The fit options of `cachefit plan` and `cachefit compile` (one set, applied the same way)
# ---------------------------------------------------------------------------------------------

#: the keyword arguments of the fit options, as compile_model / fit_and_plan / fit_analysis name them
FIT_KWARGS = ("fit", "quantize", "group_size", "prune", "max_prune", "max_prune_heads", "micro_batch", "prune_heads",
              "quantize_int8_weights", "quantize_calibration")


def wants_fit(*, fit: str | None = None, quantize: str | None = None, prune: float = 0.0, prune_heads: float = 0.0,
              micro_batch: int | str | None = None, **_other) -> bool:
    """Whether the fit options change the model at all (else :func:`cachefit.fit.fit_model` is not run)."""
    return bool(fit is not None or (quantize or "none") != "none" or prune or prune_heads or micro_batch is not None)


def check_fit_kwargs(*, fit=None, quantize=None, group_size=None, prune=0.0, max_prune=0.5, max_prune_heads=None,
                     prune_heads=0.0, quantize_int8_weights=None, **_other) -> None:
    """Refuse bad fit option values before any model is read (:func:`cachefit.fit.check_fit_options`)."""
    check_fit_options(mode=fit or "none", quantize=quantize, group_size=group_size, prune=prune, max_prune=max_prune,
                      max_prune_heads=max_prune_heads, prune_heads=prune_heads, int8_weights=quantize_int8_weights)


def fit_analysis(analysis, *, cache=None, hardware=None, fit=None, quantize=None, group_size=None, prune=0.0,
                 max_prune=0.5, max_prune_heads=None, micro_batch=None, prune_heads=0.0,
                 quantize_int8_weights=None, quantize_calibration=None, footprint="exact", layers=None,
                 layer_boundaries=None, allow_spill=False, progress=None, refuse_unfit=False):
    """The fit options shared by ``cachefit plan`` and ``cachefit compile`` (:func:`cachefit.fit.fit_model`)
    on an analysed model: ``(rewritten analysis, FitReport)``, or ``(analysis, None)`` when no option
    changes the model. ``refuse_unfit`` (compile): a PlanError when ``fit="auto"`` leaves a layer over
    the capacity and spilling is not allowed."""
    from .errors import PlanError
    from .planning import resolve_capacity

    check_fit_kwargs(fit=fit, quantize=quantize, group_size=group_size, prune=prune, max_prune=max_prune,
                     max_prune_heads=max_prune_heads, prune_heads=prune_heads,
                     quantize_int8_weights=quantize_int8_weights)
    if not wants_fit(fit=fit, quantize=quantize, prune=prune, prune_heads=prune_heads, micro_batch=micro_batch):
        return analysis, None
    cap, _hw = resolve_capacity(cache, hardware)
    new, fit_report = fit_model(analysis, cap, mode=fit or "none", quantize=quantize, group_size=group_size,
                                prune=prune, max_prune=max_prune, max_prune_heads=max_prune_heads,
                                micro_batch=micro_batch, footprint=footprint, layers=layers,
                                layer_boundaries=layer_boundaries, progress=progress,
                                calibration=quantize_calibration, int8_weights=quantize_int8_weights,
                                prune_heads=prune_heads)
    if progress:
        progress(fit_report.format_table())
    if refuse_unfit and fit == "auto" and not fit_report.fits and not allow_spill:
        raise PlanError("--fit auto could not make every layer fit:\n" + fit_report.format_table()
                        + "\nAn intra-layer split is not implemented: use more capacity (--cache/--hardware), "
                        "a larger --max-prune or --max-prune-heads, or --allow-spill")
    return new, fit_report


def fit_and_plan(model, **kwargs):
    """``cachefit plan``: :func:`cachefit.planning.plan_model` with the same keyword arguments (kept
    for its callers). ``plan_model`` applies the fit options of ``cachefit compile`` that change a
    footprint (:data:`FIT_KWARGS`) as compile applies them (:func:`fit_analysis`) before planning."""
    from .planning import plan_model

    return plan_model(model, **kwargs)


def _calibrate(analysis, calibration, progress) -> tuple[dict, int]:
    """(weight name -> input Hessian, number of batches) from a calibration run of the float model."""
    from .passes.calibrate_weights import collect_hessians, random_inputs

    model = analysis.imported.onnx_model
    if isinstance(calibration, (int, np.integer)) and not isinstance(calibration, bool):
        if int(calibration) < 1:
            raise CachefitError(f"--calibrate {calibration}: give a positive number of random input batches")
        feeds = random_inputs(model, int(calibration))
    else:
        names = analysis.imported.original_names
        back = {orig: new for new, orig in names.items()}
        feeds = [{back.get(k, k): np.asarray(v) for k, v in dict(f).items()} for f in calibration]
        if not feeds:
            raise CachefitError("the calibration input list is empty: give at least one input feed or a number")
    if progress:
        progress(f"calibration: running the float model on {len(feeds)} batch(es) for GPTQ")
    hessians = collect_hessians(model, feeds, weights=[k for k in analysis.params])
    return hessians, len(feeds)
