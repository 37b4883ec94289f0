"""cachefit.perf: hardware presets, the roofline-with-residency cost model, baselines, estimates.

Plain Python on ``LayerRecord``s except :mod:`.flops` (counts a Relax function) and
:mod:`.calibrate` (times TVM or numpy kernels on this CPU).
"""

from .baselines import Baseline, estimate_tensor_pipeline, even_groups, parse_baselines
from .costmodel import CostModel, LayerCost, PipelineEstimate, StageEstimate, estimate_pipeline, rebatch, requantize
from .hardware import PRESETS, Hardware, format_bytes, get_hardware, parse_size

__all__ = [
    "Baseline", "CostModel", "Hardware", "LayerCost", "PRESETS", "PipelineEstimate", "StageEstimate",
    "estimate_pipeline", "estimate_tensor_pipeline", "even_groups", "format_bytes", "get_hardware",
    "parse_baselines", "parse_size", "rebatch", "requantize",
]
