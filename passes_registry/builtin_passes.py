"""Passes every pipeline can use: ``print<analysis>``, ``require<analysis>``, ``invalidate<analysis>``."""
from __future__ import annotations

from .pass_base import ParametricPass, PassResult, PreservedAnalyses
from .registry import lookup_analysis, register_pass


@register_pass
class PrintAnalysisPass(ParametricPass):
    """Print an analysis of the current graph to the context's stream (``print<bitops>``)."""
    name = "print"
    summary = "Print an analysis result: print<ANALYSIS>"
    preserves = PreservedAnalyses.all()

    def run(self, gm, ctx, am):
        analysis = lookup_analysis(self.param)
        result = am.get(analysis, gm)
        ctx.stream.write(f"// ----- {self.param} -----\n{analysis().format(result, gm)}\n")
        return PassResult(modified=False)


@register_pass
class RequireAnalysisPass(ParametricPass):
    """Compute an analysis now so it is cached for later passes (``require<acc-width>``)."""
    name = "require"
    summary = "Compute and cache an analysis: require<ANALYSIS>"
    preserves = PreservedAnalyses.all()

    def run(self, gm, ctx, am):
        am.get(lookup_analysis(self.param), gm)
        return PassResult(modified=False)


@register_pass
class InvalidateAnalysisPass(ParametricPass):
    """Drop a cached analysis and everything computed from it (``invalidate<bitops>``)."""
    name = "invalidate"
    summary = "Drop a cached analysis: invalidate<ANALYSIS>"
    preserves = PreservedAnalyses.all()

    def run(self, gm, ctx, am):
        am.forget(self.param)
        return PassResult(modified=False)
