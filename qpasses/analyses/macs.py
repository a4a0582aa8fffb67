"""``macs``: dense multiply-accumulate counts and parameter counts per layer (structure only).

MACs are what the graph computes as it stands: ``C_in/groups · C_out · prod(kernel) ·
prod(out_spatial)`` for convolutions (grouped and depthwise included) and ``C_in · C_out`` (times
the leading token dims) for linear layers. Pruning that has only been *planned* (0-bit kernels)
is accounted in ``bitops`` (its ``alive_macs`` column: 0-bit kernels and the consumers' inputs
they feed are left out); once ``prune-zero-bit-channels`` removes the channels, the shapes shrink
and these dense counts drop to the same number.

Activation x activation products (matmul/bmm of two tensors, e.g. attention after
``canonicalize``) are the ``products`` rows (op ``matmul``, no parameters; MACs =
``prod(batch dims) · M · K · N`` per sample, :mod:`qpasses.algorithms.product_costs`) and are in
``total``.
"""
from __future__ import annotations

from dataclasses import dataclass

from passes_registry import Analysis, register_analysis

from qpasses.algorithms.product_costs import product_costs
from qpasses.ir.layers import quantizable_layers
from qpasses.analyses.table import LayerTable, table


@dataclass(frozen=True)
class MacsRow:
    name: str
    op: str
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, ...]
    out_spatial: tuple[int, ...]
    fan_in: int          # products per accumulator: C_in/groups · prod(kernel)
    kernel_macs: int     # MACs of one output kernel
    macs: int
    params: int          # weights + biases


@dataclass(frozen=True)
class MacsResult(LayerTable):
    rows: tuple[MacsRow, ...]
    total: int               # layers and products
    total_params: int
    products: tuple[MacsRow, ...] = ()  # act x act products (op "matmul", no parameters)


@register_analysis
class MacsAnalysis(Analysis):
    """Dense MACs and parameters of every conv/linear layer, with totals."""
    name = "macs"
    summary = "dense MACs and parameter counts per layer (structure only)"
    depends_on = frozenset({"structure"})

    def compute(self, gm, am):
        rows = []
        for info in quantizable_layers(gm):
            km = info.macs // info.out_channels if info.out_channels else 0
            rows.append(MacsRow(info.name, info.kind, info.in_channels, info.out_channels,
                                info.groups, tuple(info.kernel_size), tuple(info.out_spatial),
                                info.fan_in, int(km), int(info.macs), int(info.params)))
        prods = tuple(MacsRow(p.name, p.op, p.k, p.out_shape[-1], 1, (),
                              tuple(p.out_shape[1:-1] if len(p.out_shape) >= 3
                                    else p.out_shape[:-1]),
                              p.k, p.macs // max(1, p.out_shape[-1]), p.macs, 0)
                      for p in product_costs(gm))
        return MacsResult(tuple(rows), sum(r.macs for r in rows + list(prods)),
                          sum(r.params for r in rows), prods)

    def format(self, result, gm):
        body = [[r.name, r.op, r.fan_in, r.out_channels, "x".join(map(str, r.out_spatial)) or "-",
                 r.macs, r.params] for r in result.rows + result.products]
        body.append(["TOTAL", "", "", "", "", result.total, result.total_params])
        return (table(["layer", "op", "fan-in", "C_out", "out", "MACs", "params"], body)
                + f"\nGMACs {result.total / 1e9:.4f}  params {result.total_params:,}")
