"""Test-only passes and analyses for the infrastructure tests (names start with 'test-infra-')."""
from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from passes_registry import (Analysis, Pass, PassFailure, PassResult, PreservedAnalyses,
                             function_pass, register_analysis, register_pass, register_property)


class Mode(enum.Enum):
    FAST = "fast"
    EXACT = "exact"


@dataclass(frozen=True)
class AllTypesOptions:
    flag: bool = field(default=False, metadata={"help": "a bool"})
    count: int = field(default=3, metadata={"help": "an int"})
    ratio: float = field(default=0.5, metadata={"help": "a float"})
    label: str = field(default="x", metadata={"help": "a string"})
    mode: Mode = field(default=Mode.FAST, metadata={"help": "an enum"})
    bits: tuple[int, ...] = field(default=(2, 4), metadata={"help": "a list of ints"})
    names: tuple[str, ...] = field(default=(), metadata={"help": "a list of strings"})
    limit: int | None = field(default=None, metadata={"help": "an optional int"})

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must be >= 0")


@register_pass
class AllTypesPass(Pass):
    """Does nothing; has one option of every supported type."""
    name = "test-infra-all-types"
    summary = "no-op with options of every type"
    Options = AllTypesOptions
    preserves = PreservedAnalyses.all()

    def run(self, gm, ctx, am):
        return PassResult(modified=False)


register_property("test-infra-marked", lambda gm: [] if gm.meta.get("marked") else ["not marked"])


@register_pass
class MarkPass(Pass):
    """Marks the graph (establishes test-infra-marked) by adding an identity-free annotation."""
    name = "test-infra-mark"
    establishes = frozenset({"test-infra-marked"})
    preserves = PreservedAnalyses.all()

    def run(self, gm, ctx, am):
        gm.meta["marked"] = True
        return PassResult(modified=False)


@register_pass
class NeedsMarkPass(Pass):
    """Requires test-infra-marked."""
    name = "test-infra-needs-mark"
    requires = frozenset({"test-infra-marked"})
    preserves = PreservedAnalyses.all()

    def run(self, gm, ctx, am):
        return PassResult(modified=False)


@register_pass
class LyingMarkPass(Pass):
    """Claims to establish test-infra-marked but does not."""
    name = "test-infra-lying-mark"
    establishes = frozenset({"test-infra-marked"})
    preserves = PreservedAnalyses.all()

    def run(self, gm, ctx, am):
        gm.meta["marked"] = False
        return PassResult(modified=False)


def _relu_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.relu]


@register_pass
class ReluToSigmoidOnce(Pass):
    """Rewrites one torch.relu into torch.sigmoid per run (for fixpoint tests)."""
    name = "test-infra-relu-to-sigmoid"
    preserves = PreservedAnalyses.none()

    def run(self, gm, ctx, am):
        nodes = _relu_nodes(gm)
        if not nodes:
            return PassResult(modified=False)
        nodes[0].target = torch.sigmoid
        return PassResult(modified=True, stats={"num_rewritten": 1})


@register_pass
class DishonestPass(Pass):
    """Changes the graph but reports modified=False."""
    name = "test-infra-dishonest"

    def run(self, gm, ctx, am):
        for n in _relu_nodes(gm):
            n.target = torch.sigmoid
        return PassResult(modified=False)


@register_pass
class FakeChangePass(Pass):
    """Reports modified=True without changing anything."""
    name = "test-infra-fake-change"

    def run(self, gm, ctx, am):
        return PassResult(modified=True)


@register_pass
class FlipFlopPass(Pass):
    """Toggles relu <-> sigmoid forever (never converges; cycles)."""
    name = "test-infra-flip-flop"

    def run(self, gm, ctx, am):
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target in (torch.relu, torch.sigmoid):
                n.target = torch.sigmoid if n.target is torch.relu else torch.relu
                return PassResult(modified=True)
        return PassResult(modified=False)


@register_pass
class FailingPass(Pass):
    """Always fails with a PassFailure naming a node."""
    name = "test-infra-failing"

    def run(self, gm, ctx, am):
        node = next(iter(gm.graph.nodes))
        raise PassFailure("this pass always fails", node=node.name)


@register_pass
class CrashingPass(Pass):
    """Has a bug: raises a bare KeyError."""
    name = "test-infra-crashing"

    def run(self, gm, ctx, am):
        return {}["missing"]


@register_pass
class RequiredPass(Pass):
    """A required pass: never disabled or bisected."""
    name = "test-infra-required"
    required = True
    preserves = PreservedAnalyses.all()

    def run(self, gm, ctx, am):
        gm.meta["required_ran"] = gm.meta.get("required_ran", 0) + 1
        return PassResult(modified=False)


COMPUTE_COUNT = {"nodes": 0, "relus": 0}


@register_analysis
class NodeCountAnalysis(Analysis):
    """Number of nodes (depends on structure only)."""
    name = "test-infra-node-count"
    depends_on = frozenset({"structure"})

    def compute(self, gm, am):
        COMPUTE_COUNT["nodes"] += 1
        return len(gm.graph.nodes)


@register_analysis
class ReluShareAnalysis(Analysis):
    """Fraction of relu nodes; computed from test-infra-node-count (dependency cascade)."""
    name = "test-infra-relu-share"
    depends_on = frozenset({"structure"})

    def compute(self, gm, am):
        COMPUTE_COUNT["relus"] += 1
        return len(_relu_nodes(gm)) / am.get("test-infra-node-count", gm)


@register_pass
class AnnotateOnlyPass(Pass):
    """Writes node annotations only; preserves structure-only analyses."""
    name = "test-infra-annotate-only"
    preserves = PreservedAnalyses.unaffected_by("annotations")

    def run(self, gm, ctx, am):
        from qpasses.ir.annotations import QuantSpec, update_qmeta
        for n in gm.graph.nodes:
            if n.op == "call_function":
                update_qmeta(n, origin=self.name, output=QuantSpec(bits=8, signed=False,
                                                                   scheme="unsigned"))
        return PassResult(modified=True)


@register_pass
class FalsePreservePass(Pass):
    """Adds a node but claims to preserve every analysis."""
    name = "test-infra-false-preserve"
    preserves = PreservedAnalyses.all()

    def run(self, gm, ctx, am):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(torch.relu, (out.args[0],))
        out.args = (new,)
        return PassResult(modified=True)


@function_pass("test-infra-function-pass", summary="adds a neg node")
def add_neg(gm, ctx, am):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        new = gm.graph.call_function(operator.neg, (out.args[0],))
    out.args = (new,)
    return True


class ReluModel(torch.nn.Module):
    def forward(self, x):
        return torch.relu(torch.relu(x) + 1)


def relu_graph() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(ReluModel())
