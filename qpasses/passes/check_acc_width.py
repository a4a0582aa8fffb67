"""``check-acc-width{target=16 bound=worst-case fail=false}``: flag layers whose accumulator
needs more than ``target`` bits, from the ``acc-width`` analysis."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from passes_registry import (OptionError, Pass, PassFailure, PassResult, PreservedAnalyses,
                             register_pass)

from qpasses.analyses.table import table

PASS_NAME = "check-acc-width"


@dataclass(frozen=True)
class CheckAccWidthOptions:
    target: int = field(default=16, metadata={
        "help": "accumulator width in bits (e.g. 16 or 32) that every layer must fit"})
    bound: Literal["worst-case", "data"] = field(default="worst-case", metadata={
        "help": "worst-case: bound over all codes of the grids; data: the data-aware bound from "
                "the integer weights (layers without weight scales fall back to worst-case)"})
    fail: bool = field(default=False, metadata={
        "help": "raise a PassFailure naming the offending layers instead of only reporting them"})

    def __post_init__(self) -> None:
        if isinstance(self.target, bool) or not 2 <= self.target <= 64:
            raise OptionError(PASS_NAME, "target", f"{self.target} is out of range: accumulator "
                                                   "widths are 2..64 bits")


@register_pass
class CheckAccWidth(Pass):
    """Report the layers whose accumulator exceeds ``target`` bits (``acc-width`` analysis).

    Prints a table of the offending layers (worst-case and data-aware widths) to the context's
    stream, returns stats ``num_layers_checked``, ``num_over_target``, ``max_acc_bits`` and, with
    ``fail=true``, raises :class:`PassFailure` naming every offending layer. Act x act products
    (attention's matmuls) are checked too, with their worst case. Never modifies the
    graph. Requires ``bits-annotated``.
    """
    name = PASS_NAME
    summary = "flag layers whose accumulator width exceeds a target (acc-width analysis)"
    Options = CheckAccWidthOptions
    requires = frozenset({"bits-annotated"})
    preserves = PreservedAnalyses.all()

    def run(self, gm, ctx, am):
        opts: CheckAccWidthOptions = self.options
        result = am.get("acc-width", gm)
        over, checked, widest = [], 0, 0
        for r in result.rows + result.products:      # layers, then act x act products
            width = r.acc_bits
            if opts.bound == "data" and r.acc_bits_data is not None:
                width = r.acc_bits_data
            if width is None:
                continue
            checked += 1
            widest = max(widest, width)
            if width > opts.target:
                over.append((r, width))
        if over:
            body = [[r.name, r.op, r.fan_in, r.w_bits, r.a_bits, r.acc_bits,
                     "-" if r.acc_bits_data is None else r.acc_bits_data] for r, _ in over]
            ctx.stream.write(f"// ----- check-acc-width: {len(over)} of {checked} layers need "
                             f"more than {opts.target} accumulator bits ({opts.bound}) -----\n"
                             + table(["layer", "op", "fan-in", "w", "a", "acc (worst)",
                                      "acc (data)"], body) + "\n")
        else:
            ctx.stream.write(f"// ----- check-acc-width: all {checked} quantized layers fit "
                             f"{opts.target} accumulator bits ({opts.bound}) -----\n")
        if over and opts.fail:
            names = ", ".join(f"'{r.name}' ({w} bits)" for r, w in over)
            raise PassFailure(f"{len(over)} layer(s) need more than target={opts.target} "
                              f"accumulator bits ({opts.bound} bound): {names}; lower their "
                              "weight/activation bits (solve-bitwidths{max-acc-bits=...}) or "
                              "raise the target")
        return PassResult(modified=False, stats={"num_layers_checked": checked,
                                                 "num_over_target": len(over),
                                                 "max_acc_bits": widest})
