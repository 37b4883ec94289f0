"""cachefit.partition: which contiguous layers go on which device.

Plain Python on plain data (:class:`~.records.LayerRecord`), independent of TVM.

- :func:`partition`: the seed's additive case on plain integer sizes.
- :func:`make_plan`: every strategy on layer records, with the per-device report (:class:`Plan`).
- :func:`diagnose`: what would make an oversized layer fit.
"""

from .cost import RooflineCostModel, StageTime, default_cost_model
from .diagnose import Fix, OversizedLayer, diagnose
from .footprint import (
    FOOTPRINT_MODES,
    AdditiveCost,
    Footprint,
    FootprintCost,
    GroupCost,
    Mirrored,
    group_footprint,
    make_footprint_cost,
)
from .layout import Layout, parse_layout, resolve_layout
from .plan import Cut, OversizedLayerError, Plan, Stage, make_plan
from .records import LayerRecord, StageCostModel
from .strategies import (
    STRATEGIES,
    TIE_BREAKS,
    DeviceCountError,
    Solution,
    partition,
    solve,
    unplaceable_layers,
)

__all__ = [
    "FOOTPRINT_MODES",
    "STRATEGIES",
    "AdditiveCost",
    "Cut",
    "DeviceCountError",
    "Fix",
    "Footprint",
    "FootprintCost",
    "GroupCost",
    "LayerRecord",
    "Mirrored",
    "Layout",
    "OversizedLayer",
    "OversizedLayerError",
    "Plan",
    "RooflineCostModel",
    "Solution",
    "Stage",
    "StageCostModel",
    "StageTime",
    "TIE_BREAKS",
    "default_cost_model",
    "diagnose",
    "group_footprint",
    "make_footprint_cost",
    "make_plan",
    "parse_layout",
    "partition",
    "resolve_layout",
    "solve",
    "unplaceable_layers",
]
