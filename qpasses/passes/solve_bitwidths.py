"""solve-bitwidths: budget-exact weight bit allocation as a multiple-choice knapsack.

Each searchable layer (``granularity=layer``) or output kernel (``granularity=kernel``) is an item;
its candidates are the allowed weight bit-widths. A candidate's **cost** is its BitOPs (or storage
bits) from the one cost model (:mod:`qpasses.algorithms.cost_model`, the same functions the ``bitops`` and
``model-size`` analyses use, with the layer's annotated input bits); its **error** comes from a
pluggable sensitivity (:mod:`qpasses.algorithms.sensitivity`: ``quant-error`` by default, ``hessian``,
``lambda``, or any registered one). The exact solver (:mod:`qpasses.algorithms.solver`: DP when small,
else a MILP with HiGHS after Lagrangian reduction) minimizes the total error with total cost <=
budget and then spends leftover budget on equal-error candidates, so the result lands within 1%
below the target whenever the candidate grid allows it. ``method=greedy`` is the classic
error-per-cost baseline.

Costs of everything that is not searched (pinned first/last layers, float islands, biases) are a
fixed part of the budget. ``max-acc-bits`` drops candidates whose worst-case accumulator (docs/algorithms.md,
"Cost accounting";
annotated input bits, signedness and zero point, the layer's fan-in) would be wider.
Costs are separable per item: dead-channel savings in consumers of kernels the solver sets to 0
bits are not credited (the real cost can only be lower), and consumers of channels that are dead
now are costed as if the channels were alive (they might be revived).

By default only weights are searched and activation bits come from the annotations
(``annotate-bitwidths`` resolves them per scale-sharing group). With ``act-candidates=[...]`` the
pass chooses a (weight, activation) pair per layer, as FracBits, HAWQ-V3 and AIMET choose both
widths together: one MILP over pairs (BitOPs ``MACs·w·a`` make the cost grid fine, so the budget
is met from below within 1% far more often than with weights alone), the layers reading one
scale-sharing group sharing one activation width, the first layers' input (the image) kept as
annotated. The error of a pair is a first-order output-noise model, ``E[x²]·‖Q_w(W) − W‖² +
‖W‖²·E[(Q_a(x) − x)²]``, with the activation term measured on up to 4 batches of the context's
calibration data or example inputs (a ``SensitivityError`` without data); it needs
``granularity=layer``, ``sensitivity=quant-error`` and ``method=exact|milp``.
"""
from __future__ import annotations

import warnings

from passes_registry import Pass, PassResult, PreservedAnalyses, register_pass
from qpasses.analyses.properties import refuse_realized_widths
from qpasses.ir.annotations import get_qmeta

from qpasses.algorithms.bit_allocation import (SolveBitwidthsOptions, format_budget,
                                               solve_bitwidths, write_bits)
from qpasses.algorithms.search_layers import write_input_widths

__all__ = ["SolveBitwidths"]

PASS_NAME = "solve-bitwidths"


@register_pass
class SolveBitwidths(Pass):
    """Choose weight bit-widths that meet a BitOPs or size budget from below (within 1% where the
    candidate grid allows) while minimizing a sensitivity objective (module docstring).

    Writes ``QMeta.weight.bits`` (layer) or ``bits_per_kernel`` (kernel) of every searchable layer
    (all annotated layers except pinned first/last ones and float islands); activation bits are
    read from the annotations and not changed, unless ``act-candidates`` is given: then
    (weight, activation) pairs are chosen per layer and ``QMeta.act`` of the readers of each
    scale-sharing group (and its joins' ``output``) get the group's one chosen width.
    Calibrated scales of tensors whose width changes are cleared (re-run ``calibrate``). Stats:
    ``num_layers``, ``num_items``, ``budget_ppm`` (chosen total / budget, parts per million),
    ``optimal``, ``solver_ms``, ``scales_dropped`` (and ``num_act_layers`` with act-candidates).
    Errors: exactly one of target-bitops/target-size, positive; candidates in 0..32,
    act-candidates in 1..32, non-empty, with layer granularity, quant-error and an exact method
    (``OptionError``); a target outside the reachable range (``BudgetError`` with the range);
    ``max-acc-bits`` that no candidate of a layer meets (``PassFailure`` naming it).
    """
    name = PASS_NAME
    summary = "budget-exact bit allocation (multiple-choice knapsack: MILP/DP or greedy)"
    Options = SolveBitwidthsOptions
    requires = frozenset({"bits-annotated"})
    establishes = frozenset({"bits-annotated"})
    preserves = PreservedAnalyses.unaffected_by("annotations")

    def run(self, gm, ctx, am):
        opts: SolveBitwidthsOptions = self.options
        refuse_realized_widths(gm, self.name)
        res = solve_bitwidths(gm, opts, ctx)
        modified, dropped = write_bits(gm, res.bits, self.name)
        if opts.act_candidates is not None:
            before = [get_qmeta(n).act for n in gm.graph.nodes]
            write_input_widths(gm, res.act_bits, self.name)
            modified |= before != [get_qmeta(n).act for n in gm.graph.nodes]
        if res.utilisation < 0.99:
            warnings.warn(f"{self.name}: the chosen bits use {100 * res.utilisation:.2f}% of the "
                          f"budget {format_budget(res.metric, res.budget)} (the candidate grid allows no "
                          "closer allocation from below)", RuntimeWarning, stacklevel=2)
        return PassResult(modified=modified, stats={
            "num_layers": len(res.bits), "num_items": res.num_items,
            "budget_ppm": int(round(1e6 * res.utilisation)),
            "optimal": int(res.allocation.optimal),
            "solver_ms": int(round(1000 * res.allocation.seconds)),
            "scales_dropped": dropped,
            **({"num_act_layers": len(res.act_bits)} if opts.act_candidates is not None else {})})
