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

Only weights are searched. Activation bits come from the annotations (``annotate-bitwidths``
resolves them per scale-sharing group, which a weight solver must not break), so there is no
``act-bits`` option: re-annotate to change them.
"""
from __future__ import annotations

import warnings

from passes_registry import Pass, PassResult, PreservedAnalyses, register_pass
from qpasses.analyses.properties import refuse_realized_widths

from qpasses.algorithms.bit_allocation import (SolveBitwidthsOptions, format_budget,
                                               solve_bitwidths, write_bits)

__all__ = ["SolveBitwidths"]

PASS_NAME = "solve-bitwidths"


@register_pass
class SolveBitwidths(Pass):
    """Choose weight bit-widths that meet a BitOPs or size budget from below (within 1% where the
    candidate grid allows) while minimizing a sensitivity objective (module docstring).

    Writes ``QMeta.weight.bits`` (layer) or ``bits_per_kernel`` (kernel) of every searchable layer
    (all annotated layers except pinned first/last ones and float islands); activation bits are
    read from the annotations and not changed. Calibrated weight scales of layers whose width
    changes are cleared (re-run ``calibrate``). Stats: ``num_layers``, ``num_items``,
    ``budget_ppm`` (chosen total / budget, parts per million), ``optimal``, ``solver_ms``,
    ``scales_dropped``. Errors: exactly one of target-bitops/target-size, positive; candidates in
    0..32 (``OptionError``); a target outside the reachable range (``BudgetError`` with the range);
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
        if res.utilisation < 0.99:
            warnings.warn(f"{self.name}: the chosen bits use {100 * res.utilisation:.2f}% of the "
                          f"budget {format_budget(res.metric, res.budget)} (the candidate grid allows no "
                          "closer allocation from below)", RuntimeWarning, stacklevel=2)
        return PassResult(modified=modified, stats={
            "num_layers": len(res.bits), "num_items": res.num_items,
            "budget_ppm": int(round(1e6 * res.utilisation)),
            "optimal": int(res.allocation.optimal),
            "solver_ms": int(round(1000 * res.allocation.seconds)),
            "scales_dropped": dropped})
