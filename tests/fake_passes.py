"""Test-only passes, analyses and properties (names start with ``test-``); importing this module
registers them, once (``--load-plugin tests.fake_passes`` does the same for the tools).

The four generic ones (``test-relu-to-sigmoid``, ``test-noop``, ``test-fail``, ``test-dishonest``)
serve every test; ``test-golden-*`` serve the golden error cases and ``test-infra-*`` the pass
manager and pipeline-syntax tests. Registering the same class again is a no-op, so importing this
module from several test packages is safe.
"""
from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F

from passes_registry import (Analysis, Pass, PassFailure, PassResult, PreservedAnalyses,
                             function_pass, register_analysis, register_pass, register_property)


def relu_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target in (torch.relu, F.relu)]


# ---------------------------------------------------------------------------------------------
# generic test passes


@register_pass
class ReluToSigmoid(Pass):
    """Replace torch.relu calls by torch.sigmoid (a visible, verifiable rewrite)."""
    name = "test-relu-to-sigmoid"
    summary = "Replace torch.relu by torch.sigmoid"

    @dataclass(frozen=True)
    class Options:
        limit: int = field(default=-1, metadata={"help": "rewrite at most this many (-1: all)"})

    def run(self, gm, ctx, am):
        n_done = 0
        for node in relu_nodes(gm):
            if 0 <= self.options.limit <= n_done:
                break
            node.target = torch.sigmoid
            n_done += 1
        return PassResult(modified=n_done > 0, stats={"num_rewritten": n_done})


@register_pass
class Noop(Pass):
    """Does nothing."""
    name = "test-noop"
    summary = "Does nothing"
    preserves = PreservedAnalyses.all()

    def run(self, gm, ctx, am):
        return PassResult(modified=False)


@register_pass
class Fail(Pass):
    """Always fails with a typed PassFailure naming the first node."""
    name = "test-fail"
    summary = "Always fails"

    def run(self, gm, ctx, am):
        first = next(iter(gm.graph.nodes))
        raise PassFailure("this pass always fails", node=first.name)


@register_pass
class Dishonest(Pass):
    """Rewrites relu to sigmoid but reports modified=False (verify-each catches it)."""
    name = "test-dishonest"
    summary = "Changes the graph, reports modified=False"

    def run(self, gm, ctx, am):
        for node in relu_nodes(gm):
            node.target = torch.sigmoid
        return PassResult(modified=False)


# ---------------------------------------------------------------------------------------------
# test-golden-*: option, property and analysis errors in tests/golden/errors/


class GoldenMode(enum.Enum):
    A = "a"
    B = "b"


@register_pass
class GoldenOptionsPass(Pass):
    """Does nothing; has one option of each kind for option-error goldens."""
    name = "test-golden-options"
    summary = "No-op pass with int/float/bool/enum/list options"
    preserves = PreservedAnalyses.all()

    @dataclass(frozen=True)
    class Options:
        count: int = field(default=1, metadata={"help": "an int"})
        ratio: float = field(default=0.5, metadata={"help": "a float"})
        flag: bool = field(default=False, metadata={"help": "a bool"})
        mode: GoldenMode = field(default=GoldenMode.A, metadata={"help": "an enum"})
        sizes: tuple[int, ...] = field(default=(), metadata={"help": "a list of ints"})

        def __post_init__(self) -> None:
            if self.count < 0:
                raise ValueError("count must be >= 0")

    def run(self, gm, ctx, am):
        return PassResult(modified=False)


register_property("test-golden-prop", summary="set by test-golden-makes-prop")


@register_pass
class GoldenMakesPropPass(Pass):
    """Establishes test-golden-prop (without changing the graph)."""
    name = "test-golden-makes-prop"
    summary = "Establishes test-golden-prop"
    establishes = frozenset({"test-golden-prop"})
    preserves = PreservedAnalyses.all()

    def run(self, gm, ctx, am):
        return PassResult(modified=False)


@register_pass
class GoldenNeedsPropPass(Pass):
    """Requires test-golden-prop."""
    name = "test-golden-needs-prop"
    summary = "Requires test-golden-prop"
    requires = frozenset({"test-golden-prop"})
    preserves = PreservedAnalyses.all()

    def run(self, gm, ctx, am):
        return PassResult(modified=False)


@register_analysis
class GoldenNodeCount(Analysis):
    """Number of nodes per fx op kind."""
    name = "test-golden-node-count"
    summary = "Nodes per op kind"
    depends_on = frozenset({"structure"})

    def compute(self, gm, am):
        counts: dict[str, int] = {}
        for n in gm.graph.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return tuple(sorted(counts.items()))

    def format(self, result, gm):
        return "\n".join(f"{op}: {k}" for op, k in result)


# ---------------------------------------------------------------------------------------------
# test-infra-*: pass manager, registry and pipeline syntax tests in tests/infra/


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
        return len(relu_nodes(gm)) / am.get("test-infra-node-count", gm)


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
