"""search-mixquant: per-layer weight bit-widths from round-off error (MixQuant; docs/algorithms.md,
"MixQuant").

See :mod:`qpasses.algorithms.mixquant` for the rule, what is reconstructed and why.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch.fx

from passes_registry import OptionError, Pass, PassResult, PreservedAnalyses, register_pass
from passes_registry.suggest import did_you_mean

from qpasses.algorithms.cost_model import cost_layers
from qpasses.analyses.properties import refuse_realized_widths
from qpasses.errors import PassFailure
from qpasses.ir.layers import layer_weight, quantizable_layers
from qpasses.ir.annotations import get_qmeta
from qpasses.algorithms.mixquant import (MixQuantLayer, qe_metric_names, quantization_errors,
                                         select_bits)
from qpasses.algorithms.bit_allocation import check_candidates, write_bits

__all__ = ["SearchMixQuant", "SearchMixQuantOptions", "mixquant"]

PASS_NAME = "search-mixquant"


@dataclass(frozen=True)
class SearchMixQuantOptions:
    qem: float = field(metadata={
        "help": "quantization-error multiplier (>= 1): a layer gets the smallest candidate whose "
                "round-off error is <= qem x the error at reference-bits (no default: the paper's "
                "values are unverified)"})
    candidates: tuple[int, ...] = field(default=(2, 3, 4, 5, 6, 7, 8), metadata={
        "help": "weight bit-widths to choose from (1..32)"})
    metric: str = field(default="mse", metadata={
        "help": "round-off error metric: mse (default), mae, rel-l2, or one registered with "
                "qpasses.algorithms.mixquant.register_qe_metric"})
    reference_bits: int = field(default=8, metadata={
        "help": "the width whose error is multiplied by qem (the paper's int8)"})
    scheme: Literal["asymmetric", "symmetric"] = field(default="asymmetric", metadata={
        "help": "quantizer the error is measured with (min/max range; MixQuant: asymmetric)"})
    per_channel: bool = field(default=False, metadata={
        "help": "measure with per-output-channel ranges instead of one per tensor (the paper)"})
    pin_first_last: bool = field(default=False, metadata={
        "help": "keep the first and last layers' annotated weight bits (MixQuant searches all)"})

    def __post_init__(self) -> None:
        if not math.isfinite(self.qem) or self.qem < 1:
            raise OptionError(PASS_NAME, "qem", f"{self.qem} is not valid: the multiplier must "
                                                "be a finite number >= 1 (1 = int8 error)")
        check_candidates(PASS_NAME, self.candidates, allow_zero=False)
        if self.metric not in qe_metric_names():
            raise OptionError(PASS_NAME, "metric",
                              f"unknown metric '{self.metric}' (valid: "
                              f"{', '.join(qe_metric_names())})"
                              + did_you_mean(self.metric, qe_metric_names()))
        if isinstance(self.reference_bits, bool) or not 1 <= self.reference_bits <= 32:
            raise OptionError(PASS_NAME, "reference-bits",
                              f"{self.reference_bits} is out of range 1..32")


def mixquant(gm: torch.fx.GraphModule, options: SearchMixQuantOptions) -> list[MixQuantLayer]:
    """The per-layer decisions for the annotated, non-pinned layers (does not write them)."""
    opts = options
    nodes = {n.name: n for n in gm.graph.nodes}
    pinned: set[str] = set()
    if opts.pin_first_last:
        pinned = {c.name for c in cost_layers(gm) if c.first or c.last}
    cands = tuple(sorted(opts.candidates))
    measured = tuple(sorted(set(cands) | {opts.reference_bits}))
    ref_idx = measured.index(opts.reference_bits)
    out = []
    for info in quantizable_layers(gm):
        q = get_qmeta(nodes[info.node])
        if q.weight is None or q.float_island is not None or info.name in pinned:
            continue
        qe = quantization_errors(layer_weight(gm, info), measured, opts.metric,
                                 scheme=opts.scheme, per_channel=opts.per_channel).tolist()
        errs = tuple(qe[measured.index(b)] for b in cands)
        ref = qe[ref_idx]
        out.append(MixQuantLayer(info.name, cands, errs, ref,
                                 select_bits(errs, cands, ref, opts.qem)))
    return out


@register_pass
class SearchMixQuant(Pass):
    """MixQuant: give every layer the smallest weight bit-width whose round-off error is within
    ``qem`` times its int8 error (weight-only, per layer; docs/algorithms.md, "MixQuant", says
    which choices the paper leaves open and how each is an option).

    Writes ``QMeta.weight.bits`` of every annotated layer (not float islands; not the first/last
    layers with ``pin-first-last``); per-kernel bit vectors are replaced by the layer width and
    calibrated weight scales of layers whose width changes are cleared. Activation specs are not
    touched. Stats: ``num_layers``, ``mean_bits_x100``, ``num_<b>bit`` per chosen width, ``ms``.
    """
    name = PASS_NAME
    summary = "MixQuant: per-layer weight bits from round-off error within qem x int8 error"
    Options = SearchMixQuantOptions
    requires = frozenset({"bits-annotated"})
    establishes = frozenset({"bits-annotated"})
    preserves = PreservedAnalyses.unaffected_by("annotations")

    def run(self, gm, ctx, am):
        t0 = time.perf_counter()
        refuse_realized_widths(gm, self.name)
        decisions = mixquant(gm, self.options)
        if not decisions:
            raise PassFailure("no layer to search: every quantizable layer is pinned, a float "
                              "island or unannotated")
        modified, dropped = write_bits(gm, {d.name: d.bits for d in decisions}, self.name)
        stats: dict[str, Any] = {"num_layers": len(decisions), "scales_dropped": dropped,
                                 "mean_bits_x100": round(100 * sum(d.bits for d in decisions)
                                                         / len(decisions)),
                                 "ms": int(round(1000 * (time.perf_counter() - t0)))}
        for d in decisions:
            stats[f"num_{d.bits}bit"] = stats.get(f"num_{d.bits}bit", 0) + 1
        return PassResult(modified=modified, stats=stats)
