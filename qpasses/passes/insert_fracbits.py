"""insert-fracbits: install FracBits fractional-bit quantizers (docs/algorithms.md, "FracBits").

Requires ``bits-annotated`` (run ``annotate-bitwidths`` first: it decides which layers are
quantized, which inputs are provably non-negative and which layers are first/last); the annotated
widths are only the fallback for layers the pass leaves alone. Establishes ``fracbits-inserted``
and invalidates ``bits-annotated`` (the annotations no longer describe what the graph computes
until ``freeze-fracbits`` writes the rounded widths back), so ``insert-fake-quant`` cannot run on a
FracBits graph by mistake.

Graph surgery (the same conventions as ``insert-fake-quant``):

- **Weights.** Every annotated call_module conv/linear is swapped, at the same module path, for
  the fake-quant subclass of its class (``qpasses.modules.fake_quant_layers.wrap_layer``, same Parameters) whose
  ``weight_fake_quant`` is a :class:`~qpasses.modules.fracbits.FracBitsWeightQuant` (DoReFa,
  learnable λ_w: a scalar for ``granularity=layer``, one per output kernel for ``kernel``).
  Functional layers and float islands are left as annotated (fixed cost, warned).
- **Activations.** Each searched layer's input gets its own PACT quantizer node
  (``fracbits_act.<layer path with _>``, a :class:`~qpasses.modules.fracbits.FracBitsActQuant`
  with learnable λ_a and α) inserted right before the layer, as in the official code (one PACT per
  conv input; joins are not quantized). Signed inputs use double-sided PACT. ``act-scheme=none``:
  no activation quantizers (weight-only search, e.g. under a size target); inputs keep their
  annotated bits.
- **Pinning** (``pin-first-last=B``; ``none`` disables it): first layers get B-bit
  weights and no input quantizer (the image stays float, counted as 8-bit by the cost model);
  last layers get B-bit weights and a searched input. Pinned λ are fixed (not trainable).
- Candidates must be contiguous integers (λ interpolates between neighbours); 0 is allowed only
  with ``allow-zero`` (and then must be in the list) and only for weights; activation candidates
  are the list without 0.

After the pass the GraphModule trains with any loop; add
``qpasses.algorithms.fracbits.penalty(gm, target_bitops=...)`` to the loss and call
``clamp_lambdas(gm)`` after each optimizer step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
from torch import nn

from passes_registry import (Pass, PassResult, PreservedAnalyses, register_pass,
                             register_property, set_record)
from passes_registry.errors import OptionError

from qpasses.modules.fake_quant_layers import wrap_layer
from qpasses.ir.layers import first_last_layers, quantizable_layers
from qpasses.ir.annotations import get_qmeta
from qpasses.ir.records import FRACBITS_META, ActGroup, FracBitsLayer, FracBitsRecord
from qpasses.modules.fracbits import (ACT_CONTAINER, FracBitsActQuant, FracBitsWeightQuant,
                                      fracbits_record, has_fracbits)
from qpasses.algorithms.search_layers import searchable_layers
from qpasses.ir.joins import is_join, layer_input, scale_sharing_groups
from qpasses.ir.fx import insert_module_before

__all__ = ["InsertFracBits", "InsertFracBitsOptions", "check_fracbits_candidates"]

PASS_NAME = "insert-fracbits"


def check_fracbits_candidates(pass_name: str, candidates: Any, allow_zero: bool) -> None:
    if not isinstance(candidates, tuple) or not candidates:
        raise OptionError(pass_name, "candidates", "give at least two contiguous bit-widths, "
                                                   "e.g. [1,2,3,4,5,6,7,8]")
    for b in candidates:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= 32:
            raise OptionError(pass_name, "candidates", f"{b!r} is not a bit-width in 0..32")
    cs = sorted(set(candidates))
    if cs != list(range(cs[0], cs[-1] + 1)):
        raise OptionError(pass_name, "candidates",
                          f"{list(candidates)} is not a contiguous range: λ interpolates "
                          "between neighbouring integers, give e.g. [2,3,4,5,6,7,8]")
    if allow_zero and cs[0] != 0:
        raise OptionError(pass_name, "candidates",
                          "allow-zero needs 0 in the candidates (e.g. [0,1,2,...,8])")
    if not allow_zero and cs[0] == 0:
        raise OptionError(pass_name, "candidates",
                          "0 bits (pruned kernels) needs allow-zero=true")
    if cs[-1] < 1 or (cs[0] == 0 and len(cs) < 2):
        raise OptionError(pass_name, "candidates", "activations need at least one candidate "
                                                   ">= 1")


def check_fracbits_inserted(gm: torch.fx.GraphModule) -> list[str]:
    """The FracBits record names existing layers with FracBits weight quantizers."""
    if not has_fracbits(gm):
        return ["the graph has no FracBits quantizers (no 'qpasses.fracbits' record)"]
    out = []
    for name, rec in fracbits_record(gm).layers.items():
        try:
            wq = gm.get_submodule(rec.module).weight_fake_quant
        except AttributeError:
            out.append(f"layer '{name}' lost its FracBits weight quantizer")
            continue
        if not isinstance(wq, FracBitsWeightQuant):
            out.append(f"layer '{name}' has a {type(wq).__name__}, not a FracBits quantizer")
    return out


register_property("fracbits-inserted", check_fracbits_inserted,
                  summary="FracBits fractional-bit quantizers are installed (learnable λ)")


@dataclass(frozen=True)
class InsertFracBitsOptions:
    granularity: Literal["layer", "kernel"] = field(default="layer", metadata={
        "help": "layer: one λ_w per layer; kernel: one λ_w per output kernel (λ_a stays per "
                "layer)"})
    candidates: tuple[int, ...] = field(default=(1, 2, 3, 4, 5, 6, 7, 8), metadata={
        "help": "contiguous candidate bit-widths; λ is clamped to [min, max] (0 only with "
                "allow-zero, weights only)"})
    init_bits: float = field(default=3.5, metadata={
        "help": "initial λ_w and λ_a (FracBits: b_t + 0.5 for a uniform b_t-bit target)"})
    weight_scheme: Literal["dorefa"] = field(default="dorefa", metadata={
        "help": "weight quantizer (DoReFa tanh normalisation, as FracBits)"})
    act_scheme: Literal["pact", "none"] = field(default="pact", metadata={
        "help": "activation quantizer (PACT with FracBits' alpha gradient); none: weight-only "
                "search, activations stay float while searching and keep their annotated bits"})
    allow_zero: bool = field(default=False, metadata={
        "help": "add the 0-bit weight candidate (Eq. 8): 0-bit kernels are exactly zero and can "
                "be removed by prune-zero-bit-channels after freeze-fracbits"})
    pin_first_last: int | None = field(default=8, metadata={
        "help": "first layers: weights at this width, input not quantized; last layers: weights "
                "at this width, input searched (FracBits); none disables pinning"})
    pact_alpha: float | None = field(default=None, metadata={
        "help": "initial PACT clip (default 8.0, 10.0 for linear-layer inputs)"})

    def __post_init__(self) -> None:
        check_fracbits_candidates(PASS_NAME, self.candidates, self.allow_zero)
        lo, hi = min(self.candidates), max(self.candidates)
        if not lo <= self.init_bits <= hi:
            raise OptionError(PASS_NAME, "init-bits", f"{self.init_bits} is outside the "
                                                      f"candidate range [{lo}, {hi}]")
        if self.pin_first_last is not None and not 1 <= self.pin_first_last <= 32:
            raise OptionError(PASS_NAME, "pin-first-last",
                              f"{self.pin_first_last} is not a bit-width in 1..32")
        if self.pact_alpha is not None and not self.pact_alpha > 0:
            raise OptionError(PASS_NAME, "pact-alpha", f"must be > 0, got {self.pact_alpha}")


@register_pass
class InsertFracBits(Pass):
    """Install FracBits quantizers with learnable fractional bit-widths λ (docs/algorithms.md,
    "FracBits").

    Every annotated call_module conv/linear is swapped at the same path for its fake-quant
    subclass with a DoReFa :class:`~qpasses.modules.fracbits.FracBitsWeightQuant` (λ_w per layer,
    or per output kernel with ``granularity=kernel``; Eq. 1 interpolation, Eq. 2 gradient, 0-bit
    kernels exactly zero with ``allow-zero``); each searched layer's input gets its own PACT
    :class:`~qpasses.modules.fracbits.FracBitsActQuant` node (learnable λ_a and α;
    ``fracbits_act.<layer>``). First layers: weights pinned at ``pin-first-last`` bits, input not
    quantized; last layers: weights pinned, input searched. Train with any loop, adding
    ``qpasses.algorithms.fracbits.penalty(gm, target_bitops=...)`` to the loss and calling
    ``clamp_lambdas(gm)`` after each step; then run ``freeze-fracbits``. Requires
    ``bits-annotated``; establishes ``fracbits-inserted``; invalidates ``bits-annotated``,
    ``fake-quant-inserted`` and ``calibrated``.

    Stats: ``num_layers`` (searched), ``num_pinned``, ``num_act_quantizers``, ``num_lambdas``
    (trainable λ entries), ``num_skipped`` (functional layers / float islands left as annotated).
    Errors: bad candidates / init-bits / pin (``OptionError``); a graph that already has FracBits
    quantizers or fake-quant layers (``AnnotationError``).
    """
    name = PASS_NAME
    summary = "install FracBits fractional-bit weight/activation quantizers (learnable λ)"
    Options = InsertFracBitsOptions
    requires = frozenset({"bits-annotated"})
    establishes = frozenset({"fracbits-inserted"})
    invalidates = frozenset({"bits-annotated", "fake-quant-inserted", "calibrated"})
    preserves = PreservedAnalyses.none()
    writes_records = frozenset({FRACBITS_META})

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        from qpasses.errors import AnnotationError
        opts: InsertFracBitsOptions = self.options
        if has_fracbits(gm):
            raise AnnotationError(f"{self.name}: the graph already has FracBits quantizers; "
                                  "run freeze-fracbits before inserting again")
        layers = quantizable_layers(gm)
        first, last = first_last_layers(gm, layers)
        nodes = {n.name: n for n in gm.graph.nodes}
        cands = sorted(opts.candidates)
        w_lo, hi = cands[0], cands[-1]
        a_lo = max(1, w_lo)
        stats = {"num_layers": 0, "num_pinned": 0, "num_act_quantizers": 0, "num_lambdas": 0,
                 "num_skipped": 0}
        # scale-sharing groups of the annotated graph (before surgery): freeze-fracbits gives every
        # layer reading a group the same (max) input width, as insert-fake-quant will implement
        groups = scale_sharing_groups(gm)
        layer_of_input: dict[str, list[str]] = {}
        for info in layers:
            x = layer_input(nodes[info.node])
            if x is not None and get_qmeta(nodes[info.node]).act is not None:
                layer_of_input.setdefault(x.name, []).append(info.name)
        act_groups = []
        for g in groups:
            names = [ln for t in g for ln in layer_of_input.get(t, [])]
            joins = [t for t in g if is_join(nodes[t]) and get_qmeta(nodes[t]).output is not None]
            if names or joins:
                act_groups.append(ActGroup(tuple(names), tuple(joins)))
        records: dict[str, FracBitsLayer] = {}
        for info, node, mod, q in searchable_layers(gm, self.name, layers, stats):
            pin = opts.pin_first_last
            is_first, is_last = info.name in first, info.name in last
            pinned_w = pin is not None and (is_first or is_last)
            if pinned_w:
                wq = FracBitsWeightQuant(info.out_channels, pin, pin, pin, per_kernel=False,
                                         pinned=True, name=info.name)
                stats["num_pinned"] += 1
            else:
                wq = FracBitsWeightQuant(info.out_channels, opts.init_bits, w_lo, hi,
                                         per_kernel=opts.granularity == "kernel", name=info.name)
                stats["num_lambdas"] += wq.lam.numel()
            wq = wq.to(mod.weight.device)
            gm.set_submodule(str(node.target), wrap_layer(mod, wq))
            stats["num_layers"] += 1
            x = layer_input(node)
            act = None
            quantize_input = q.act is not None and x is not None and \
                not (pin is not None and is_first) and opts.act_scheme != "none"
            if quantize_input:
                alpha = opts.pact_alpha if opts.pact_alpha is not None else \
                    (10.0 if info.op == "linear" else 8.0)
                bits0 = opts.init_bits if opts.init_bits >= a_lo else a_lo

                def make(target: str, bits0: int = bits0, alpha: float = alpha,
                         signed: bool = q.act.signed, consumer: str = info.name) -> nn.Module:
                    return FracBitsActQuant(bits0, a_lo, hi, signed=signed, alpha_init=alpha,
                                            name=target, consumer=consumer).to(mod.weight.device)

                fq = insert_module_before(gm, node, x, ACT_CONTAINER, info.name, make)
                act = str(fq.target)
                stats["num_act_quantizers"] += 1
                stats["num_lambdas"] += 1
            records[info.name] = FracBitsLayer(module=str(node.target), node=node.name, act=act,
                                               first=is_first, last=is_last, pinned=pinned_w)
        if not records:
            raise AnnotationError(f"{self.name}: no annotated call_module conv/linear layer to "
                                  "search (run annotate-bitwidths first)")
        gm.graph.lint()
        gm.recompile()
        set_record(gm, FRACBITS_META, FracBitsRecord(
            layers=records, granularity=opts.granularity, candidates=tuple(cands),
            allow_zero=opts.allow_zero, pin_first_last=opts.pin_first_last,
            act_groups=tuple(act_groups)))
        return PassResult(modified=True, stats=stats)
