"""lower-fake-quant-ops: the first step of ``lower-to-int-sim``, building the integer graph.

The rules are in :mod:`qpasses.algorithms.lowering` (its docstring lists them); the runtime modules
in :mod:`qpasses.modules.int_sim`, :mod:`~qpasses.modules.int_sim_layers` and
:mod:`~qpasses.modules.int_sim_ops`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch.fx

from passes_registry import (Pass, PassFailure, PassResult, PreservedAnalyses, get_record,
                             register_pass, set_record)

from qpasses.analyses.properties import check_lowerable
from qpasses.ir.batches import context_batches
from qpasses.ir.records import EMULATION_KEY, INT_SIM_KEY
from qpasses.modules.int_sim import is_int_sim_graph, set_backend
from qpasses.algorithms.lowering.builder import build_int_sim_graph
from qpasses.algorithms.lowering.config import LoweringOptions
from qpasses.algorithms.lowering.emulation import prepare_emulated
from qpasses.algorithms.lowering.record import int_sim_record

__all__ = ["LowerFakeQuantOps"]


@register_pass
class LowerFakeQuantOps(Pass):
    """Rewrite a calibrated fake-quant graph into an integer-only graph (docs/int-sim.md).

    Every activation fake quantizer becomes a quantize, requantize or clamp, every conv/linear with
    fake-quant weights an ``IntConv*``/``IntLinear`` (at the float layer's module path, so the
    report and the cost analyses still see it), pools, joins and elementwise nonlinearities their
    integer modules; ops that cannot be lowered stay in float between a dequantize and a quantize,
    with ``QMeta.float_island`` set. Writes the int-sim record (``qpasses.int_sim``, an
    ``IntSimRecord``: the contract, float islands, stats, observed ranges, the quantization points
    verify-int-sim compares and, with ``keep-fake-quant``, a copy of the fake-quant graph). The
    requantizations stay separate nodes: ``fuse-requantize`` folds them into their layers.

    An emulating graph (``emulate-int-sim``) is lowered under the contract and ranges it emulates
    (``EmulationContractError`` naming both contracts when the options differ), after its emulation
    nodes are removed; the kept fake-quant graph is the emulating one.

    On an already lowered graph it only switches the backend, and fails when ``rounding``,
    ``multiplier-bits`` or ``bias`` differ from the graph's. Stats: ``num_int_layers``,
    ``num_kernel_<k>`` per fast kernel, ``num_requantize``, ``num_luts``, ``num_int_adds``,
    ``num_int_cats``, ``num_int_muls``, ``num_pools``, ``num_clamps``, ``num_quantize``,
    ``num_dequantize``, ``num_float_islands``.
    """
    name = "lower-fake-quant-ops"
    summary = "build the integer-only graph of a calibrated fake-quant graph (requants unfused)"
    Options = LoweringOptions
    requires = frozenset({"calibrated"})
    establishes = frozenset({"int-sim"})
    invalidates = frozenset({"fake-quant-inserted"})
    preserves = PreservedAnalyses.none()
    reads_records = frozenset({INT_SIM_KEY, EMULATION_KEY})
    writes_records = frozenset({INT_SIM_KEY, EMULATION_KEY})

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        opts: LoweringOptions = self.options
        if is_int_sim_graph(gm):
            rec = int_sim_record(gm)
            if (rec.rounding, rec.multiplier_bits, rec.bias) != (
                    opts.rounding, opts.multiplier_bits, opts.bias):
                raise PassFailure(
                    f"the graph is already lowered with rounding={rec.rounding} "
                    f"multiplier-bits={rec.multiplier_bits} bias={rec.bias}; lower the "
                    "fake-quant graph again to change the contract (only backend= can change "
                    "here)")
            record_changed = rec.backend != opts.backend
            modules_changed = set_backend(gm, opts.backend)
            return PassResult(modified=modules_changed or record_changed, stats={})
        check_lowerable(gm, self.name)
        emulated = prepare_emulated(gm, opts, self.name)
        stats = build_int_sim_graph(gm, opts, context_batches(ctx, gm), origin=self.name,
                                    ranges=None if emulated is None else emulated[0])
        if emulated is not None and emulated[1] is not None:
            set_record(gm, INT_SIM_KEY, replace(get_record(gm, INT_SIM_KEY),
                                                fake_quant=emulated[1]))
        return PassResult(modified=True, stats=stats)
