"""``cost-layers``: the cost model's view of the graph (shapes, first/last layers, dead channels).

Shared, cached input of the ``bitops`` and ``model-size`` analyses (and of ``solve-bitwidths``):
computing it once per graph version keeps every cost consumer on the same layer list.
"""
from __future__ import annotations

from dataclasses import dataclass

from passes_registry import Analysis, register_analysis

from qpasses.algorithms.cost_model import FRACBITS, LayerCost, cost_layers
from qpasses.analyses.table import LayerTable, table


@dataclass(frozen=True)
class CostLayersResult(LayerTable):
    """``rows``: one :class:`qpasses.algorithms.cost_model.LayerCost` per quantizable layer."""
    rows: tuple[LayerCost, ...]


@register_analysis
class CostLayersAnalysis(Analysis):
    """Per-layer cost structure: kernel shapes, first/last layers and alive input channels
    (inputs from 0-bit producer kernels are dead, see qpasses.algorithms.cost_model)."""
    name = "cost-layers"
    summary = "per-layer cost structure (shapes, first/last, dead channels) for the cost analyses"
    # Dead channels come from bit annotations (0-bit kernels).
    depends_on = frozenset({"structure", "annotations"})

    def compute(self, gm, am):
        return CostLayersResult(cost_layers(gm, FRACBITS))

    def format(self, result, gm):
        body = [[r.name, r.op, r.fan_in, r.out_channels,
                 "all" if r.in_alive is None else sum(r.in_alive),
                 ("first " if r.first else "") + ("last" if r.last else "")]
                for r in result.rows]
        return table(["layer", "op", "fan-in", "C_out", "alive inputs", "position"], body)
