"""The int-sim record of a lowered graph (:class:`~qpasses.ir.records.IntSimRecord` under
``INT_SIM_KEY``).

``lower-fake-quant-ops`` writes it; the passes after it in ``lower-to-int-sim`` keep it up to date
(stats, the ``fq_map`` node names). Fields: the contract (``rounding``, ``backend``,
``multiplier_bits``, ``lut_bits``, ``gate_bits``, ``bias_frac_bits``, ``bias``), ``float_islands`` (node,
op, reason), ``stats``, ``fake_quant`` (the fake-quant graph as it was, sharing the weight tensors:
:func:`fake_quant_graph` / :func:`fake_quant_copy`; or None), ``ranges``
(observed ranges of values without a quantizer) and ``fq_map`` (fake-quant activation node ->
the integer node carrying its codes, with scale and zero point; read by verify-int-sim). The
record is frozen: every update here stores a new one with :func:`passes_registry.set_record`.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch.fx

from passes_registry import get_record, pop_record, set_record

from qpasses.ir.records import INT_SIM_KEY, IntSimRecord
from qpasses.algorithms.lowering.config import LoweringOptions

__all__ = ["add_to_stats", "fake_quant_copy", "fake_quant_graph", "int_sim_record",
           "keep_live_fq_nodes", "new_record", "rename_fq_nodes"]


def fake_quant_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a fake-quant graph to keep (``keep-fake-quant``) before something rewrites it in
    place: a deep copy of everything but the Parameters, which it shares with ``gm`` (the integer
    layers share them too: lowering never writes a weight), so it costs the graph and the
    quantizers' small buffers, not a second copy of the weights. Without its int-sim record."""
    memo: dict[int, Any] = {id(p): p for _, p in gm.named_parameters(remove_duplicate=False)}
    source = copy.deepcopy(gm, memo)
    pop_record(source, INT_SIM_KEY)
    return source


def fake_quant_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The fake-quant graph to keep (``keep-fake-quant``) when its rewrite builds a *new* graph and
    new modules and leaves ``gm.graph`` and the modules it calls untouched (the lowering's walk):
    a GraphModule over ``gm``'s current graph and the very modules it calls (fresh containers, so
    installing the integer layers in ``gm`` does not reach it), with a deep copy of ``gm.meta``
    less the int-sim record. No tensor is copied. Call it before ``gm.graph`` is replaced."""
    source = torch.fx.GraphModule(gm, gm.graph, class_name=type(gm).__name__)
    memo: dict[int, Any] = {id(p): p for _, p in gm.named_parameters(remove_duplicate=False)}
    source.meta = copy.deepcopy({k: v for k, v in gm.meta.items() if k != INT_SIM_KEY}, memo)
    return source


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
