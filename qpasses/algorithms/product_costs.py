"""Costs of activation x activation products (matmul/bmm of two tensors; attention's Q·Kᵀ and
attention·V), beside the conv/linear layers of :mod:`qpasses.algorithms.cost_model`.

Conventions (docs/algorithms.md, "Cost accounting"): MACs = ``prod(batch dims) · M · K · N`` per
sample (:func:`qpasses.numerics.costs.product_macs`), BitOPs = ``MACs · b_a1 · b_a2`` with both
operand widths from the product's ``QMeta.act`` (annotate-bitwidths gives both operands one spec;
``float_bits`` each when the product has none or is a float island), no weights (size 0). The
operands' widths are not searched, so for ``solve-bitwidths`` and the FracBits/GMPQ penalties the
products are a constant part of the BitOPs (:func:`products_bitops`), which keeps their budgets
and targets on the same total the report shows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from qpasses.algorithms.cost_model import FRACBITS, CostConventions
from qpasses.ir.act_products import product_operands
from qpasses.ir.annotations import get_qmeta
from qpasses.ir.fx import node_shape, rows_per_sample
from qpasses.modules.int_sim_transformer import IntMatMul
from qpasses.modules.lookup import submodule_or_none
from qpasses.numerics import costs

__all__ = ["ProductCost", "product_costs", "product_cost_bitops", "products_bitops"]


@dataclass(frozen=True)
class ProductCost:
    """Cost-relevant facts of one act x act product."""
    name: str                 # the product's node name (its report row)
    node: str
    op: str                   # "matmul"
    k: int                    # contracted dim (products per accumulator)
    out_shape: tuple[int, ...]
    macs: int                 # per sample
    a_bits: int | None        # annotated width of both operands (None: float)
    float_island: bool


def _operands(gm: torch.fx.GraphModule, n: torch.fx.Node) -> tuple | None:
    """The operands of a product: a matmul/bmm node, or one lowered to an integer matmul."""
    ab = product_operands(n)
    if ab is None and n.op == "call_module" and len(n.args) == 2 and not n.kwargs \
            and isinstance(submodule_or_none(gm, str(n.target)), IntMatMul) \
            and all(node_shape(x) is not None for x in (*n.args, n)):
        ab = tuple(n.args)
    return ab


def product_costs(gm: torch.fx.GraphModule) -> tuple[ProductCost, ...]:
    """One :class:`ProductCost` per act x act product (also once lowered to an integer
    matmul, so the report of a lowered graph keeps them), in graph order."""
    out = []
    for n in gm.graph.nodes:
        ab = _operands(gm, n)
        if ab is None:
            continue
        a = ab[0]
        a_shape, out_shape = node_shape(a), node_shape(n)
        q = get_qmeta(n)
        bits = q.act.bits if q.act is not None and q.float_island is None else None
        out.append(ProductCost(n.name, n.name, "matmul", int(a_shape[-1]), out_shape,
                               costs.product_macs(a_shape, out_shape,
                                                  rows_per_sample(gm, out_shape)), bits,
                               q.float_island is not None))
    return tuple(out)


def product_cost_bitops(p: ProductCost, conventions: CostConventions = FRACBITS) -> int:
    """BitOPs of one product: ``MACs · b · b`` (``float_bits`` when not annotated)."""
    b = p.a_bits if p.a_bits is not None else conventions.float_bits
    return int(costs.product_bitops(p.macs, b, b))


def products_bitops(gm: torch.fx.GraphModule, conventions: CostConventions = FRACBITS) -> int:
    """Total BitOPs of every act x act product of ``gm`` (0 without products)."""
    return sum(product_cost_bitops(p, conventions) for p in product_costs(gm))
