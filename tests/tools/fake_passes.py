"""test-* passes for tool tests (import registers them; also ``--load-plugin tests.tools.fake_passes``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from passes_registry import Pass, PassFailure, PassResult, PreservedAnalyses, register_pass


@register_pass
class ToolsReluToSigmoidPass(Pass):
    """Replace torch.relu calls by torch.sigmoid (a visible, verifiable rewrite)."""
    name = "test-tools-relu-to-sigmoid"
    summary = "Replace torch.relu by torch.sigmoid"

    @dataclass(frozen=True)
    class Options:
        limit: int = field(default=-1, metadata={"help": "rewrite at most this many (-1: all)"})

    def run(self, gm, ctx, am):
        n_done = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.relu:
                if 0 <= self.options.limit <= n_done:
                    break
                node.target = torch.sigmoid
                n_done += 1
        return PassResult(modified=n_done > 0, stats={"num_rewritten": n_done})


@register_pass
class ToolsNoopPass(Pass):
    """Does nothing."""
    name = "test-tools-noop"
    summary = "Does nothing"
    preserves = PreservedAnalyses.all()

    def run(self, gm, ctx, am):
        return PassResult(modified=False)


@register_pass
class ToolsFailPass(Pass):
    """Always fails with a typed PassFailure."""
    name = "test-tools-fail"
    summary = "Always fails"

    def run(self, gm, ctx, am):
        raise PassFailure("this pass always fails", node="x")


@register_pass
class ToolsDishonestPass(Pass):
    """Rewrites relu to sigmoid but reports modified=False (verify-each catches it)."""
    name = "test-tools-dishonest"
    summary = "Changes the graph, reports modified=False"

    def run(self, gm, ctx, am):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.relu:
                node.target = torch.sigmoid
        return PassResult(modified=False)
