"""freeze-fracbits: round the learned FracBits λ to integer bit annotations (docs/algorithms.md,
"FracBits").

Rounding modes:

- ``nearest`` (paper): ``b = rne(λ)`` for weights and activations.
- ``offset-bisection`` (official code): ``b = rne(λ + δ)`` with one global offset ``δ <= 0``
  (weights and activations alike) found by bisection so that the rounded cost meets the target.
  ``δ = 0`` when the plainly rounded model already meets it (the bisection never raises bits).
  ``tolerance`` is the accepted overshoot: 0 (default) meets the target from below; the official
  code accepts ±1% (``tolerance=0.01``). The search range extends below −1 if needed; a target
  that even the minimum candidates cannot meet is a ``BudgetError``.
- ``solver``: the budget is met from below, within 1% where the candidate grid allows, with
  ``Σ (b − λ)²`` as the prior. Layer-wise: weight and activation widths together in one MILP
  (HiGHS) over (w, a) pairs per layer, ``0.99·target <= cost <= target`` (pairs make the BitOPs
  grid fine enough; layers reading one scale-sharing group share one width). Kernel-wise:
  activations ``rne(λ_a)``, weights by ``solve-bitwidths`` (multiple-choice knapsack, ``lambda``
  sensitivity).

Targets (offset-bisection, solver): ``target-bitops`` (GBitOPs) or ``target-size`` (MB), the
units of :func:`qpasses.algorithms.fracbits.penalty`.

What is written: ``QMeta.weight.bits`` (and ``bits_per_kernel`` for kernel-wise search; 0 means a
pruned kernel), ``QMeta.act.bits`` of searched inputs; pinned layers keep their pinned width.
Then the FracBits modules are removed: layers are restored to their float classes (same
Parameters: the trained weights are kept) and the activation quantizer nodes are removed, so the
standard passes apply unchanged (``insert-fake-quant{weight-scheme=dorefa act-scheme=pact}`` to
finetune, ``calibrate``, ``prune-zero-bit-channels``, ``lower-to-int-sim``). The learned values
are kept in the ``qpasses.fracbits.frozen`` graph record (``FrozenFracBitsRecord``: per layer
``lambda_w``, ``lambda_a``, ``w_bits``, ``a_bits``, ``alpha``); PACT α is not an annotation, but
``insert-fake-quant{act-scheme=pact}`` (without ``pact-alpha``) starts each PACT clip from it.
Establishes ``bits-annotated``.

Errors (typed): no FracBits quantizers in the graph (``AnnotationError``: run insert-fracbits);
BatchNorm modules in training mode (``AnnotationError``: call ``gm.eval()``; freezing is the
switch to finetuning and fold-batch-norm / calibration expect eval statistics); a missing or
unreachable target (``OptionError`` / ``BudgetError``).
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
from torch import nn

from passes_registry import (Pass, PassResult, PreservedAnalyses, pop_record, register_pass,
                             set_record)
from passes_registry.errors import OptionError

from qpasses.algorithms.cost_model import (FRACBITS, annotated_bits, cost_layers, model_bitops,
                                           model_size_bits)
from qpasses.errors import AnnotationError, BudgetError
from qpasses.ir.records import (FRACBITS_META, FROZEN_META, FracBitsRecord, FrozenFracBitsLayer,
                                FrozenFracBitsRecord)
from qpasses.algorithms.fracbits import fracbits_cost_layers, lambda_maps
from qpasses.modules.fracbits import fracbits_modules, fracbits_record, has_fracbits
from qpasses.algorithms.solver import solve_pairs
from qpasses.algorithms.search_layers import (remove_search_modules, restore_on_failure,
                                              write_input_widths)
from qpasses.algorithms.bit_allocation import SolveBitwidthsOptions, solve_bitwidths, write_bits
from qpasses.algorithms.pair_allocation import layer_pair_costs

__all__ = ["FreezeFracBits", "FreezeFracBitsOptions", "FROZEN_META", "offset_bisection",
           "layer_pair_costs", "remove_search_modules", "round_lambdas"]

PASS_NAME = "freeze-fracbits"


@dataclass(frozen=True)
class FreezeFracBitsOptions:
    rounding: Literal["nearest", "offset-bisection", "solver"] = field(default="nearest", metadata={
        "help": "nearest: rne(λ) (paper); offset-bisection: rne(λ+δ) with a global δ <= 0 "
                "bisected to meet the target (official code); solver: solve-bitwidths with λ as "
                "the prior (budget met from below, within 1%)"})
    target_bitops: float | None = field(default=None, metadata={
        "help": "BitOPs target in GBitOPs (offset-bisection, solver)"})
    target_size: float | None = field(default=None, metadata={
        "help": "model-size target in MB (offset-bisection, solver)"})
    tolerance: float = field(default=0.0, metadata={
        "help": "offset-bisection: accepted relative overshoot of the target (official: 0.01)"})
    max_trials: int = field(default=20, metadata={
        "help": "offset-bisection: bisection steps (official: 10)"})

    def __post_init__(self) -> None:
        if self.target_bitops is not None and self.target_size is not None:
            raise OptionError(PASS_NAME, "target-bitops",
                              "give one of target-bitops and target-size, not both")
        for opt, v in (("target-bitops", self.target_bitops), ("target-size", self.target_size)):
            if v is not None and (not math.isfinite(v) or v <= 0):
                raise OptionError(PASS_NAME, opt, f"{v} must be a positive finite number")
        if self.rounding != "nearest" and self.target_bitops is None and self.target_size is None:
            raise OptionError(PASS_NAME, "rounding",
                              f"rounding={self.rounding} needs a target: target-bitops=GBITOPS "
                              "or target-size=MB")
        if not 0 <= self.tolerance < 1:
            raise OptionError(PASS_NAME, "tolerance", f"{self.tolerance} must be in [0, 1)")
        if self.max_trials < 1:
            raise OptionError(PASS_NAME, "max-trials", f"{self.max_trials} must be >= 1")

    @property
    def metric(self) -> str:
        return "bitops" if self.target_bitops is not None else "size"

    @property
    def target(self) -> float | None:
        return self.target_bitops if self.target_bitops is not None else self.target_size


def _rounded(gm: torch.fx.GraphModule, delta: float, act_delta: float | None = None
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Integer (w, a) bit maps ``rne(λ + δ)`` clamped to each quantizer's range (activations
    shifted by ``act_delta`` when given, else by δ too)."""
    act_delta = delta if act_delta is None else act_delta
    w_bits, a_bits = {}, {}
    mods = fracbits_modules(gm)
    for name, (wq, aq) in mods.items():
        lam = wq.bits().detach().double()
        d = 0.0 if wq.pinned else delta
        b = torch.round(lam + d).clamp(wq.min_bits, wq.max_bits).to(torch.int64)
        w_bits[name] = tuple(b.tolist()) if b.dim() == 1 else int(b)
        if aq is not None:
            la = aq.bits().detach().double()
            a_bits[name] = int(torch.round(la + act_delta).clamp(aq.min_bits, aq.max_bits))
    # layers reading one scale-sharing group get one width (the max), as insert-fake-quant does
    for g in fracbits_record(gm).act_groups:
        members = [n for n in g.layers if n in a_bits]
        if len(members) > 1:
            top = max(a_bits[n] for n in members)
            for n in members:
                a_bits[n] = top
    return w_bits, a_bits


def _as_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def round_lambdas(gm: torch.fx.GraphModule, delta: float = 0.0
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Public: the bit maps ``rne(λ + delta)`` of a FracBits graph (weights per kernel tuples)."""
    return _rounded(gm, delta)


def _cost(gm: torch.fx.GraphModule, w: dict[str, Any], a: dict[str, Any], metric: str) -> float:
    w_map, a_map = lambda_maps(gm, detach=True)
    w_map.update(w)
    a_map.update(a)
    layers = fracbits_cost_layers(gm, FRACBITS)
    if metric == "bitops":
        return float(model_bitops(layers, w_map, a_map)) / 1e9
    return float(model_size_bits(layers, w_map)) / 8e6


def _check_reachable(gm: torch.fx.GraphModule, target: float, metric: str, limit: float,
                     weights_only: bool = False
                     ) -> tuple[float, dict[str, Any], dict[str, Any], float]:
    """``(δ, w_bits, a_bits, cost)`` with every searched weight (and activation unless
    ``weights_only``: activations then stay at ``rne(λ_a)``) at its minimum candidate; a
    ``BudgetError`` when even that costs more than ``limit``. Runs before anything is removed,
    so a failing freeze leaves the FracBits graph as it was."""
    span = max(max(wq.max_bits - wq.min_bits for wq, _ in fracbits_modules(gm).values()), 1)
    lo = -float(span) - 0.5            # everything at its minimum candidate
    w_lo, a_lo = _rounded(gm, lo, 0.0 if weights_only else None)
    c_lo = _cost(gm, w_lo, a_lo, metric)
    if c_lo > limit:
        unit = "GBitOPs" if metric == "bitops" else "MB"
        raise BudgetError(PASS_NAME, "target-bitops" if metric == "bitops" else "target-size",
                          f"{target:.6g} {unit} is below the cost with every searched layer at "
                          f"its minimum candidate ({c_lo:.6g} {unit}); nothing was changed, "
                          "retry with a larger target",
                          minimum=c_lo, maximum=None, unit=unit)
    return lo, w_lo, a_lo, c_lo


def offset_bisection(gm: torch.fx.GraphModule, target: float, metric: str = "bitops", *,
                     tolerance: float = 0.0, max_trials: int = 20
                     ) -> tuple[float, dict[str, Any], dict[str, Any], float]:
    """Official-code discretization: the largest δ <= 0 (bisected) whose ``rne(λ + δ)`` costs at
    most ``target * (1 + tolerance)``. Returns ``(δ, w_bits, a_bits, cost)``; δ = 0 when the
    plainly rounded model already meets the target."""
    limit = target * (1 + tolerance)
    w, a = _rounded(gm, 0.0)
    c = _cost(gm, w, a, metric)
    if c <= limit:
        return 0.0, w, a, c
    lo, w_lo, a_lo, c_lo = _check_reachable(gm, target, metric, limit)
    best = (lo, w_lo, a_lo, c_lo)
    hi = 0.0
    for _ in range(max_trials):        # invariant: cost(lo) <= limit < cost(hi)
        mid = (lo + hi) / 2
        wm, am = _rounded(gm, mid)
        cm = _cost(gm, wm, am, metric)
        if cm <= limit:
            lo, best = mid, (mid, wm, am, cm)
        else:
            hi = mid
    return best


def _annotated_cost(gm: torch.fx.GraphModule, metric: str) -> float:
    """Cost of the annotations as the bitops/model-size analyses count it (GBitOPs or MB)."""
    w, a = annotated_bits(gm)
    if metric == "bitops":
        return float(model_bitops(gm, w, a)) / 1e9
    return float(model_size_bits(gm, w)) / 8e6


class _Ctx(types.SimpleNamespace):
    pass


def _check_bn_eval(gm: torch.fx.GraphModule) -> None:
    for name, m in gm.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise AnnotationError(f"{PASS_NAME}: BatchNorm '{name}' is in training mode; call "
                                  "gm.eval() before freezing (finetuning starts from the frozen, "
                                  "eval-mode graph)")


@register_pass
class FreezeFracBits(Pass):
    """Round the learned FracBits λ to integer bit annotations and remove the FracBits modules.

    ``nearest``: ``rne(λ)``; ``offset-bisection``: ``rne(λ + δ)`` with one global δ <= 0 bisected
    so the rounded cost meets the target (``tolerance`` = accepted overshoot; δ = 0 when already
    met); ``solver``: budget met from below, within 1% where the grid allows, closest to λ
    (layer-wise: one MILP over (weight, activation) pairs; kernel-wise: activations ``rne(λ_a)``,
    weights by solve-bitwidths with the ``lambda`` sensitivity). Layers reading one
    scale-sharing group get one input width (the max). Writes ``QMeta.weight`` (per kernel for
    kernel-wise search, 0 = pruned kernel) and ``QMeta.act`` / join ``output`` bits, restores the
    float layer classes (trained weights kept) and removes the activation quantizer nodes, so
    insert-fake-quant, calibrate, prune-zero-bit-channels apply unchanged. Learned λ and PACT α
    are kept in the ``qpasses.fracbits.frozen`` graph record. Requires nothing statically (a graph
    without FracBits quantizers is an ``AnnotationError`` at run time, as is training-mode BN);
    establishes ``bits-annotated``; invalidates ``fracbits-inserted``.

    Stats: ``num_layers``, ``num_zero_bit_kernels``, ``delta_milli`` (offset-bisection δ × 1000),
    ``cost_ppm`` (rounded cost / target, parts per million, when a target is given).
    """
    name = PASS_NAME
    summary = "round FracBits λ to integer bit annotations (nearest, offset bisection or solver)"
    Options = FreezeFracBitsOptions
    establishes = frozenset({"bits-annotated"})
    invalidates = frozenset({"fracbits-inserted"})
    preserves = PreservedAnalyses.none()
    reads_records = frozenset({FRACBITS_META})
    writes_records = frozenset({FRACBITS_META, FROZEN_META})

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        opts: FreezeFracBitsOptions = self.options
        if not has_fracbits(gm):
            raise AnnotationError(f"{self.name}: the graph has no FracBits quantizers; run "
                                  "insert-fracbits (and train) before freezing")
        _check_bn_eval(gm)
        mods = fracbits_modules(gm)
        info = fracbits_record(gm)
        delta = 0.0
        if opts.rounding == "offset-bisection":
            delta, w_bits, a_bits, _ = offset_bisection(
                gm, opts.target, opts.metric, tolerance=opts.tolerance,
                max_trials=opts.max_trials)
        else:
            if opts.rounding == "solver":      # validate before removing anything
                _check_reachable(gm, opts.target, opts.metric, opts.target * (1 + 1e-9),
                                 weights_only=info.granularity != "layer")
            w_bits, a_bits = _rounded(gm, 0.0)
        lam_w = {n: wq.bits().detach().tolist() for n, (wq, _) in mods.items()}
        lam_a = {n: (float(aq.bits().detach()) if aq is not None else None)
                 for n, (_, aq) in mods.items()}
        alphas = {n: (float(aq.alpha.detach().abs()) if aq is not None else None)
                  for n, (_, aq) in mods.items()}

        # remove the FracBits modules first (float layers back, activation nodes out), so the
        # cost model sees the graph the standard passes will see; a failure after this point
        # (the solver) puts the FracBits graph back
        with restore_on_failure(gm):
            remove_search_modules(gm, [rec.module for rec in info.layers.values()],
                                  [rec.act for rec in info.layers.values() if rec.act])

            # activation bits (layers and their sharing joins), then weights
            write_input_widths(gm, a_bits, self.name)
            if opts.rounding == "solver" and info.granularity == "layer":
                solved = self._solve_joint(gm, opts, info, mods, w_bits, a_bits, lam_w, lam_a)
                if solved is not None:
                    w_bits, a_bits = solved
                    write_input_widths(gm, a_bits, self.name)
                else:
                    w_bits = self._solve(gm, opts, info, w_bits, lam_w, ctx)
            elif opts.rounding == "solver":
                w_bits = self._solve(gm, opts, info, w_bits, lam_w, ctx)
            self._write_weights(gm, w_bits, info)

        frozen = FrozenFracBitsRecord({
            n: FrozenFracBitsLayer(lambda_w=_as_tuple(lam_w[n]), lambda_a=lam_a[n],
                                   w_bits=_as_tuple(w_bits[n]), a_bits=a_bits.get(n),
                                   alpha=alphas[n]) for n in mods})
        pop_record(gm, FRACBITS_META)
        set_record(gm, FROZEN_META, frozen)
        stats = {"num_layers": len(mods),
                 "num_zero_bit_kernels": sum(
                     (sum(1 for v in b if v == 0) if isinstance(b, tuple) else 0)
                     for b in w_bits.values()),
                 "delta_milli": int(round(delta * 1000))}
        if opts.target is not None:
            stats["cost_ppm"] = int(round(1e6 * _annotated_cost(gm, opts.metric) / opts.target))
        return PassResult(modified=True, stats=stats)

    def _solve_joint(self, gm: torch.fx.GraphModule, opts: FreezeFracBitsOptions,
                     info: FracBitsRecord, mods: dict[str, Any], w_bits: dict[str, Any],
                     a_bits: dict[str, int], lam_w: dict[str, Any],
                     lam_a: dict[str, float | None]
                     ) -> tuple[dict[str, Any], dict[str, int]] | None:
        """Layer-wise ``solver``: weight AND activation widths in one MILP
        (:func:`~qpasses.algorithms.solver.solve_pairs`), minimizing ``Σ (w − λ_w)² + Σ (a − λ_a)²``
        with ``0.99·target <= cost <= target`` (else the best under the target). BitOPs cost
        ``MACs·w·a`` per layer, so (w, a) pairs land within 1% where weights alone (activations
        at ``rne(λ_a)``) often cannot. Layers reading one scale-sharing group share one
        activation width. None when infeasible (the caller falls back to solve-bitwidths on
        weights, which raises the budget error)."""
        cands = tuple(c for c in sorted(info.candidates) if c > 0)
        names = [n for n in mods if n in {c.name for c in cost_layers(gm, FRACBITS)}]
        if not names:
            return None
        pinned = {n for n in names if info.layers[n].pinned}
        w_choices = {n: ((w_bits[n],) if n in pinned else cands) for n in names}
        a_choices = {}
        for n in names:
            aq = mods[n][1]
            a_choices[n] = ((a_bits.get(n),) if lam_a.get(n) is None or n not in a_bits else
                            tuple(c for c in cands if aq.min_bits <= c <= aq.max_bits))
        costs, fixed = layer_pair_costs(gm, w_choices, a_choices, opts.metric)
        items = [[(w, a, costs[n][(w, a)],
                   (0.0 if n in pinned else (w - float(lam_w[n])) ** 2)
                   + ((a - lam_a[n]) ** 2 if len(a_choices[n]) > 1 else 0.0))
                  for w in w_choices[n] for a in a_choices[n]] for n in names]
        index = {n: i for i, n in enumerate(names)}
        groups = [[index[n] for n in g.layers if n in index and len(a_choices[n]) > 1]
                  for g in info.act_groups]
        scale = 1e9 if opts.metric == "bitops" else 8e6
        chosen = solve_pairs(items, [g for g in groups if len(g) > 1],
                             opts.target * scale - fixed,
                             lower=0.99 * opts.target * scale - fixed)
        if chosen is None:
            return None
        w_new, a_new = dict(w_bits), dict(a_bits)
        for n, (w, a) in zip(names, chosen):
            w_new[n] = w
            if n in a_new:
                a_new[n] = a
        return w_new, a_new

    def _solve(self, gm: torch.fx.GraphModule, opts: FreezeFracBitsOptions, info: FracBitsRecord,
               w_bits: dict[str, Any], lam_w: dict[str, Any], ctx: Any) -> dict[str, Any]:
        """solve-bitwidths with the λ prior. Its item costs are separable (no credit for input
        channels of consumers that 0-bit kernels kill), so the real cost can be lower: the budget
        is raised by the shortfall and re-solved (a few rounds) to land in [0.99, 1] x target."""
        pinned = {n for n, rec in info.layers.items() if rec.pinned}
        searched = [n for n in w_bits if n not in pinned]
        if not searched:
            return w_bits
        cands = tuple(sorted(info.candidates))
        gran = info.granularity
        if gran == "layer":
            cands = tuple(c for c in cands if c > 0) or (1,)
        self._write_weights(gm, {n: w_bits[n] for n in pinned}, info)
        sctx = _Ctx(config={"fracbits_lambda": {n: lam_w[n] for n in searched}},
                    example_inputs=getattr(ctx, "example_inputs", None))
        target = opts.target
        budget = target
        best: tuple[float, dict[str, Any]] | None = None
        for it in range(6):
            sopts = SolveBitwidthsOptions(
                target_bitops=budget if opts.metric == "bitops" else None,
                target_size=budget if opts.metric == "size" else None,
                candidates=cands, granularity=gran, sensitivity="lambda",
                pin_first_last=bool(pinned), time_limit=20.0)
            try:
                res = solve_bitwidths(gm, sopts, sctx)
            except BudgetError:
                if it == 0:
                    raise
                break
            trial = dict(w_bits)
            trial.update(res.bits)
            self._write_weights(gm, trial, info)
            actual = _annotated_cost(gm, opts.metric)
            if actual <= target * (1 + 1e-12) and (best is None or actual > best[0]):
                best = (actual, trial)
            if 0.99 * target <= actual <= target * (1 + 1e-12):
                break
            budget = budget + (target - actual)
        assert best is not None  # the first round is feasible: real cost <= separable estimate
        return best[1]

    def _write_weights(self, gm: torch.fx.GraphModule, w_bits: dict[str, Any],
                       info: FracBitsRecord) -> None:
        # write_bits needs a per-kernel tuple for kernel-wise layers and an int otherwise
        norm = {}
        for n, b in w_bits.items():
            norm[n] = tuple(int(v) for v in b) if isinstance(b, (tuple, list)) else int(b)
        write_bits(gm, norm, self.name)
