"""The int-sim record of a lowered graph (:class:`~qpasses.ir.records.IntSimRecord` under
``INT_SIM_KEY``).

``lower-fake-quant-ops`` writes it; the passes after it in ``lower-to-int-sim`` keep it up to date
(stats, the ``fq_map`` node names). Fields: the contract (``rounding``, ``backend``,
``multiplier_bits``, ``lut_bits``, ``gate_bits``, ``bias_frac_bits``, ``bias``), ``float_islands`` (node,
op, reason), ``stats``, ``fake_quant`` (a copy of the fake-quant graph, or None), ``ranges``
(observed ranges of values without a quantizer) and ``fq_map`` (fake-quant activation node ->
the integer node carrying its codes, with scale and zero point; read by verify-int-sim). The
record is frozen: every update here stores a new one with :func:`passes_registry.set_record`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch.fx

from passes_registry import get_record, set_record

from qpasses.ir.records import INT_SIM_KEY, IntSimRecord
from qpasses.algorithms.lowering.config import LoweringOptions

__all__ = ["add_to_stats", "int_sim_record", "keep_live_fq_nodes", "new_record",
           "rename_fq_nodes"]


def new_record(gm: torch.fx.GraphModule, options: LoweringOptions,
               islands: list[dict[str, str]], stats: dict[str, int],
               fake_quant: torch.fx.GraphModule | None, ranges: dict[str, tuple[float, float]],
               fq_map: dict[str, dict[str, Any]]) -> IntSimRecord:
    """Write the record of a freshly built integer graph. The counters of the later passes
    start at 0 so that each only adds to them."""
    stats = dict(stats)
    kernels = {k: stats.pop(k) for k in [k for k in stats if k.startswith("num_kernel_")]}
    stats["num_fused_requant"] = 0
    stats["num_exact_zero_kernel_constants"] = 0
    stats.update(kernels)
    record = IntSimRecord(
        rounding=options.rounding, backend=options.backend,
        multiplier_bits=options.multiplier_bits, lut_bits=options.lut_bits,
        gate_bits=options.gate_bits, bias_frac_bits=options.bias_frac_bits,
        bias=options.bias, float_islands=tuple(islands), stats=stats, ranges=dict(ranges), fq_map=dict(fq_map),
        fake_quant=fake_quant)
    set_record(gm, INT_SIM_KEY, record)
    return record


def int_sim_record(gm: torch.fx.GraphModule) -> IntSimRecord:
    """The record of a lowered graph (KeyError when ``gm`` is not lowered)."""
    record = get_record(gm, INT_SIM_KEY)
    if record is None:
        raise KeyError(INT_SIM_KEY)
    return record


def add_to_stats(gm: torch.fx.GraphModule, **deltas: int) -> None:
    """Add ``deltas`` to the record's stats."""
    rec = int_sim_record(gm)
    stats = dict(rec.stats)
    for k, v in deltas.items():
        stats[k] = stats.get(k, 0) + v
    set_record(gm, INT_SIM_KEY, replace(rec, stats=stats))


def rename_fq_nodes(gm: torch.fx.GraphModule, renames: dict[str, str]) -> None:
    """Point ``fq_map`` entries at the nodes that replaced theirs (``{old name: new name}``)."""
    rec = int_sim_record(gm)
    fq_map = {k: dict(v, node=renames.get(v["node"], v["node"])) for k, v in rec.fq_map.items()}
    set_record(gm, INT_SIM_KEY, replace(rec, fq_map=fq_map))


def keep_live_fq_nodes(gm: torch.fx.GraphModule) -> None:
    """Drop ``fq_map`` entries whose integer node is no longer in the graph."""
    rec = int_sim_record(gm)
    live = {n.name for n in gm.graph.nodes}
    fq_map = {k: v for k, v in rec.fq_map.items() if v["node"] in live}
    set_record(gm, INT_SIM_KEY, replace(rec, fq_map=fq_map))
