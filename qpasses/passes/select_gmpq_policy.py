"""select-gmpq-policy: the trained GMPQ/EdMIPS supernet's argmax policy as ordinary bit
annotations (docs/algorithms.md, "GMPQ").

Per searched layer, ``b_w = B_w[argmax logits_w]`` and ``b_a = B_a[argmax logits_a]``,
independently (ties go to the first candidate, i.e. the lowest bits when the list is sorted).
Written as ``QMeta.weight.bits`` and ``QMeta.act.bits``; layers reading one scale-sharing group
(one tensor, or tensors joined by add/cat) get one input width, the max of the group, which is
also written on the group's joins (``QMeta.output``), as ``annotate-bitwidths`` would. Then the
supernet is removed: layers are restored to their float classes (trained weights kept), the
activation mixer and feature tap nodes are removed, so ``insert-fake-quant``, ``calibrate``,
``lower-to-int-sim`` apply unchanged. The learned values are kept in the
``qpasses.gmpq.selected`` graph record (``GmpqSelectedRecord``: per layer ``w_candidates``,
``pi_w``, ``a_candidates``, ``pi_a``, ``alpha``, ``threshold``, ``w_bits``, ``a_bits``;
``alpha``: the chosen branch's PACT clip, ``threshold``: the weight range T).

``target-bitops`` (beyond the paper): project the weights onto an exact BitOPs budget with
``solve-bitwidths`` (``sensitivity=gmpq-pi``): the most probable weight policy (max
``Σ log π_w(b)``) whose BitOPs lie in ``[0.99, 1]·target`` where the candidate grid allows
(a cost reward μ is bisected so the budget is used, not just respected); activations stay at
their argmax. The budget is in GBitOPs as the ``bitops`` analysis and ``qpasses.report`` count
them (FracBits conventions).

Warnings: layers whose logits are still all equal (uniform π: the supernet was not trained, and
argmax picks the first candidate). Errors: no supernet (static: requires ``gmpq-supernet``);
an unreachable budget (``BudgetError`` with the reachable range).
"""
from __future__ import annotations

import dataclasses
import math
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from passes_registry import (Pass, PassResult, PreservedAnalyses, pop_record, register_pass,
                             set_record)
from passes_registry.errors import OptionError

from qpasses.errors import BudgetError, QpassesWarning
from qpasses.ir.annotations import get_qmeta
from qpasses.ir.records import (GMPQ_META, SELECTED_META, GmpqSelectedLayer, GmpqSelectedRecord,
                                GmpqSupernetRecord)
from qpasses.modules.gmpq import supernet_modules, supernet_record
from qpasses.algorithms.search_layers import (remove_search_modules, restore_on_failure,
                                              write_input_widths)
from qpasses.algorithms.bit_allocation import SolveBitwidthsOptions, solve_bitwidths, write_bits

__all__ = ["SelectGMPQPolicy", "SelectGMPQPolicyOptions"]

PASS_NAME = "select-gmpq-policy"


@dataclass(frozen=True)
class SelectGMPQPolicyOptions:
    target_bitops: float | None = field(default=None, metadata={
        "help": "optional exact BitOPs budget in GBitOPs (as the bitops analysis counts): weights "
                "re-chosen by solve-bitwidths (most probable policy within [0.99, 1]·target), "
                "activations stay argmax"})

    def __post_init__(self) -> None:
        if self.target_bitops is not None and not (math.isfinite(self.target_bitops)
                                                   and self.target_bitops > 0):
            raise OptionError(PASS_NAME, "target-bitops",
                              f"{self.target_bitops} must be a positive finite number")


def _argmax(candidates: tuple[int, ...], logits: torch.Tensor) -> int:
    return candidates[int(torch.argmax(logits.detach()))]   # first maximum on ties


def _uniform(logits: torch.Tensor) -> bool:
    d = logits.detach()
    return bool((d == d[0]).all())


def _remove_supernet(gm: torch.fx.GraphModule, info: GmpqSupernetRecord) -> None:
    """Float layer classes back; act mixer and tap nodes out; their modules deleted."""
    targets = [rec.act for rec in info.layers.values() if rec.act]
    remove_search_modules(gm, [rec.module for rec in info.layers.values()],
                          targets + ([info.tap] if info.tap else []))


def _project(gm: torch.fx.GraphModule, target: float, info: GmpqSupernetRecord,
             ctx: Any) -> Any:
    """The most probable weight policy (max Σ log π_w) with BitOPs in [0.99, 1]·target where
    the grid allows: solve-bitwidths with ``-log π_w(b) - μ·cost share``, μ >= 0 bisected to the
    smallest value that uses 99% of the budget (the chosen cost grows with μ)."""
    sopts = SolveBitwidthsOptions(target_bitops=target, candidates=tuple(info.w_candidates),
                                  granularity="layer", sensitivity="gmpq-pi",
                                  pin_first_last=bool(info.pin_first_last))

    def solve(mu: float) -> Any:
        sctx = types.SimpleNamespace(config={"gmpq_cost_reward": mu},
                                     example_inputs=getattr(ctx, "example_inputs", None))
        try:
            return solve_bitwidths(gm, sopts, sctx)
        except BudgetError as e:   # name this pass's option, not the inner solver's
            raise BudgetError(PASS_NAME, "target-bitops", e.reason, minimum=e.minimum,
                              maximum=e.maximum, unit=e.unit) from None

    best = solve(0.0)
    if best.utilisation >= 0.99:
        return best
    hi = 1.0
    top = solve(hi)
    while top.utilisation < 0.99 and hi < 1e9:   # μ large: the cost reward dominates -log π
        hi *= 8
        top = solve(hi)
    if top.utilisation < 0.99:
        return top                               # the grid allows no closer allocation
    lo, best = 0.0, top
    for _ in range(30):
        mid = (lo + hi) / 2
        res = solve(mid)
        if res.utilisation >= 0.99:
            hi, best = mid, res
        else:
            lo = mid
    return best


@register_pass
class SelectGMPQPolicy(Pass):
    """Write the supernet's per-layer argmax bit-widths (weights and activations chosen
    independently) as ordinary QMeta annotations and remove the supernet (module docstring).

    Optional ``target-bitops``: project the weight widths onto that exact budget (the most
    probable policy within [0.99, 1]·target where the grid allows) with solve-bitwidths
    (``sensitivity=gmpq-pi``). Warns (``QpassesWarning``) when some
    layers still have uniform π (selecting before training: argmax is the first candidate).
    Requires ``gmpq-supernet``; establishes ``bits-annotated``; invalidates ``gmpq-supernet``.

    Stats: ``num_layers``, ``num_uniform`` (layers with untrained, all-equal logits),
    ``num_act_raised`` (input widths raised to their scale-sharing group's max), ``budget_ppm``
    (with a target: chosen BitOPs / target, parts per million).
    """
    name = PASS_NAME
    summary = "argmax GMPQ/EdMIPS policy to bit annotations (optional exact-budget projection)"
    Options = SelectGMPQPolicyOptions
    requires = frozenset({"gmpq-supernet"})
    establishes = frozenset({"bits-annotated"})
    invalidates = frozenset({"gmpq-supernet"})
    preserves = PreservedAnalyses.none()
    requires_records = frozenset({GMPQ_META})
    writes_records = frozenset({GMPQ_META, SELECTED_META})

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        opts: SelectGMPQPolicyOptions = self.options
        mods = supernet_modules(gm)
        info = supernet_record(gm)
        uniform = [n for n, (wm, act) in mods.items()
                   if _uniform(wm.logits) or (act is not None and _uniform(act.logits))]
        if uniform:
            warnings.warn(f"{self.name}: {len(uniform)} of {len(mods)} layers still have uniform "
                          f"π (all logits equal: {', '.join(uniform[:5])}"
                          f"{', ...' if len(uniform) > 5 else ''}); argmax picks the first "
                          "candidate there. Train the supernet (search_loss) before selecting.",
                          QpassesWarning, stacklevel=2)
        w_bits = {n: _argmax(wm.candidates, wm.logits) for n, (wm, _) in mods.items()}
        a_bits = {n: _argmax(act.candidates, act.logits) for n, (_, act) in mods.items()
                  if act is not None}
        selected = {}
        for n, (wm, act) in mods.items():
            j = act.candidates.index(a_bits[n]) if act is not None else None
            selected[n] = GmpqSelectedLayer(
                w_candidates=tuple(wm.candidates), pi_w=tuple(wm.probs().detach().tolist()),
                a_candidates=tuple(act.candidates) if act is not None else (),
                pi_a=tuple(act.probs().detach().tolist()) if act is not None else (),
                alpha=float(act.alpha.detach()[j].abs()) if act is not None else None,
                threshold=float(wm.threshold), w_bits=w_bits[n], a_bits=a_bits.get(n))

        # the projection needs the float graph (the cost model) and may fail (an unreachable
        # budget): then the supernet is put back, so a retry with another target works
        with restore_on_failure(gm):
            _remove_supernet(gm, info)
            write_bits(gm, w_bits, self.name)
            raised = write_input_widths(gm, a_bits, self.name)
            pop_record(gm, GMPQ_META)
            # the gmpq-pi sensitivity of the projection below reads π from this record
            set_record(gm, SELECTED_META, GmpqSelectedRecord(selected))
            stats = {"num_layers": len(mods), "num_uniform": len(uniform),
                     "num_act_raised": raised}
            if opts.target_bitops is not None:
                res = _project(gm, opts.target_bitops, info, ctx)
                write_bits(gm, res.bits, self.name)
                w_bits.update(res.bits)
                stats["budget_ppm"] = int(round(1e6 * res.utilisation))
        nodes = {n.name: n for n in gm.graph.nodes}
        chosen = {}
        for n, rec in info.layers.items():
            q = get_qmeta(nodes[rec.node])
            chosen[n] = dataclasses.replace(selected[n], w_bits=w_bits[n],
                                            a_bits=q.act.bits if q.act is not None else None)
        set_record(gm, SELECTED_META, GmpqSelectedRecord(chosen))
        return PassResult(modified=True, stats=stats)
