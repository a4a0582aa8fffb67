"""``bitops``: BitOPs per layer and in total, from the bit annotations and the one cost model.

``BitOPs = Σ_k MACs_k · w_k · a`` over output kernels k (FracBits; docs/algorithms.md,
"Cost accounting"), exactly as
:func:`qpasses.algorithms.cost_model.layer_bitops` computes it: per-kernel bit vectors are summed per
kernel, 0-bit and pruned kernels cost nothing, dead producer channels remove the consumer's input
channels, the first layers' input counts as 8 bits, unannotated layers count as fp32 (32 × 32).
Activation x activation products (matmul/bmm of two tensors) are the ``products`` rows:
``MACs · b_a1 · b_a2`` (:mod:`qpasses.algorithms.product_costs`), included in ``total`` and
``total_alive_macs``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from passes_registry import Analysis, register_analysis

from qpasses.algorithms.cost_model import FRACBITS, CostConventions, annotated_bits, kernel_bitops
from qpasses.algorithms.product_costs import product_cost_bitops, product_costs
from qpasses.analyses.table import LayerTable, bits_text, num, require_annotations, table


@dataclass(frozen=True)
class BitopsRow:
    name: str
    op: str
    w_bits: int | None                        # annotated weight bits (None: float)
    w_bits_per_kernel: tuple[int, ...] | None  # annotated per-kernel bits
    a_bits: int | None                        # annotated input-activation bits
    counted_a_bits: int | float               # input bits the cost uses (conventions applied)
    macs: int                                 # dense MACs
    alive_macs: int                           # MACs of alive kernels on alive input channels
    bitops: int | float
    kernel_bitops: tuple[int | float, ...] | None  # per kernel, when bits are per kernel
    float_layer: bool                         # counted at float bits (no weight/act spec)


@dataclass(frozen=True)
class ProductBitopsRow:
    """One act x act product: both operands at ``a_bits`` (None: float, counted at float bits)."""
    name: str
    op: str
    a_bits: int | None
    counted_a_bits: int
    macs: int
    bitops: int


@dataclass(frozen=True)
class BitopsResult(LayerTable):
    rows: tuple[BitopsRow, ...]
    total: int | float                        # layers and products
    total_alive_macs: int                     # layers and products
    conventions: CostConventions = FRACBITS
    products: tuple[ProductBitopsRow, ...] = ()

    @property
    def gbitops(self) -> float:
        return self.total / 1e9


def compute_bitops(gm, am, conventions: CostConventions = FRACBITS) -> BitopsResult:
    """The ``bitops`` result without the annotation check (the report of a float graph)."""
    layers = am.get("cost-layers", gm).rows
    w_map, a_map = annotated_bits(gm)
    rows = []
    for layer in layers:
        kb = kernel_bitops(layer, w_map, a_map, conventions)
        w = w_map.get(layer.name)
        a = a_map.get(layer.name)
        per_kernel = tuple(int(b) for b in w) if isinstance(w, tuple) else None
        w_vec = torch.as_tensor(w if w is not None else conventions.float_bits)
        alive = w_vec.expand(layer.out_channels) > 0
        counted_a = a if a is not None else conventions.float_bits
        if (w is not None or a is not None) and layer.first \
                and conventions.first_input_bits is not None:
            counted_a = conventions.first_input_bits
        rows.append(BitopsRow(
            layer.name, layer.op, None if w is None else (max(w) if per_kernel else int(w)),
            per_kernel, a, num(counted_a), layer.macs,
            int(layer.kernel_macs()[alive].sum()), num(kb.sum().item()),
            tuple(num(v) for v in kb.tolist()) if per_kernel is not None else None,
            w is None and a is None))
    prods = tuple(ProductBitopsRow(p.name, p.op, p.a_bits, p.a_bits if p.a_bits is not None
                                   else conventions.float_bits, p.macs,
                                   product_cost_bitops(p, conventions))
                  for p in product_costs(gm))
    total = num(sum(r.bitops for r in rows) + sum(p.bitops for p in prods))
    return BitopsResult(tuple(rows), total, sum(r.alive_macs for r in rows)
                        + sum(p.macs for p in prods), conventions, prods)


@register_analysis
class BitopsAnalysis(Analysis):
    """BitOPs per layer (per kernel where bits are per kernel) and in total (FracBits rules)."""
    name = "bitops"
    summary = "BitOPs per layer/kernel and in total (MACs x w_bits x a_bits, FracBits rules)"
    depends_on = frozenset({"structure", "annotations"})

    def compute(self, gm, am):
        require_annotations(gm, self.name)
        return compute_bitops(gm, am)

    def format(self, result, gm):
        body = [[r.name, r.op, bits_text(r.w_bits, r.w_bits_per_kernel),
                 "-" if r.a_bits is None else r.a_bits, r.counted_a_bits, r.macs, r.alive_macs,
                 r.bitops] for r in result.rows]
        body += [[p.name, p.op, "-", "-" if p.a_bits is None else p.a_bits,
                  f"{p.counted_a_bits}x{p.counted_a_bits}", p.macs, p.macs, p.bitops]
                 for p in result.products]
        body.append(["TOTAL", "", "", "", "", sum(r.macs for r in result.rows)
                     + sum(p.macs for p in result.products),
                     result.total_alive_macs, result.total])
        return (table(["layer", "op", "w", "a", "a counted", "MACs", "alive MACs", "BitOPs"],
                      body) + f"\nGBitOPs {result.gbitops:.3f}")
