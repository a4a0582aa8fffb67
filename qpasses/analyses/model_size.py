"""``model-size``: storage per layer and in total, from the bit annotations and the one cost model.

``size = Σ_k params_k · w_k + #bias · 32`` bits (FracBits; docs/algorithms.md,
"Cost accounting"): weights at their
(per-kernel) bit-width, 0-bit/pruned kernels and weights on dead input channels cost nothing,
biases are fp32, BN is not counted, unannotated layers are fp32. MB = 1e6 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from passes_registry import Analysis, register_analysis

from qpasses.algorithms.cost_model import (FRACBITS, CostConventions, annotated_bits,
                                           kernel_size_bits)
from qpasses.analyses.table import LayerTable, bits_text, num, require_annotations, table


@dataclass(frozen=True)
class ModelSizeRow:
    name: str
    op: str
    w_bits: int | None
    w_bits_per_kernel: tuple[int, ...] | None
    params: int                               # dense weights + biases
    weight_bits: int | float                  # Σ_k params_k · w_k
    bias_bits: int
    size_bits: int | float
    kernel_size_bits: tuple[int | float, ...] | None  # per kernel (weights), when per-kernel bits


@dataclass(frozen=True)
class ModelSizeResult(LayerTable):
    rows: tuple[ModelSizeRow, ...]
    total_bits: int | float
    total_params: int
    conventions: CostConventions = FRACBITS

    @property
    def total_bytes(self) -> float:
        return self.total_bits / 8

    @property
    def mb(self) -> float:
        return self.total_bits / 8e6


def compute_model_size(gm, am, conventions: CostConventions = FRACBITS) -> ModelSizeResult:
    layers = am.get("cost-layers", gm).rows
    w_map, _ = annotated_bits(gm)
    rows = []
    for layer in layers:
        ks = kernel_size_bits(layer, w_map, conventions)
        w = w_map.get(layer.name)
        per_kernel = tuple(int(b) for b in w) if isinstance(w, tuple) else None
        weight_bits = num(ks.sum().item())
        bias_bits = layer.bias_count * conventions.bias_bits
        rows.append(ModelSizeRow(
            layer.name, layer.op, None if w is None else (max(w) if per_kernel else int(w)),
            per_kernel, layer.params, weight_bits, bias_bits, num(weight_bits + bias_bits),
            tuple(num(v) for v in ks.tolist()) if per_kernel is not None else None))
    return ModelSizeResult(tuple(rows), num(sum(r.size_bits for r in rows)),
                           sum(r.params for r in rows), conventions)


@register_analysis
class ModelSizeAnalysis(Analysis):
    """Model size in bits per layer (per kernel where bits are per kernel) and in total."""
    name = "model-size"
    summary = "storage per layer and in total (weights at their bits, fp32 biases; MB = 1e6 B)"
    depends_on = frozenset({"structure", "annotations"})

    def compute(self, gm, am):
        require_annotations(gm, self.name)
        return compute_model_size(gm, am)

    def format(self, result, gm):
        body = [[r.name, r.op, bits_text(r.w_bits, r.w_bits_per_kernel), r.params,
                 r.weight_bits, r.bias_bits, r.size_bits / 8] for r in result.rows]
        body.append(["TOTAL", "", "", result.total_params, "", "", result.total_bytes])
        return (table(["layer", "op", "w", "params", "weight bits", "bias bits", "bytes"], body)
                + f"\nsize {result.mb:.3f} MB (MB = 1e6 bytes)")
