"""PassManager, PassContext, AnalysisManager and instruments, with test-infra-* passes."""
from __future__ import annotations

import io
import os

import pytest
import torch

import qpasses  # noqa: F401
from passes_registry import (ALL, Instrument, PassContext, PassFailure, PassManager,
                             PipelineParseError, PropertyError, StaleAnalysisError,
                             VerificationError, graph_history, graph_properties)
from qpasses.errors import AnnotationError

from tests import fake_passes
from tests.fake_passes import relu_nodes
from tests.models import relu_graph


def test_requires_checked_statically_names_the_establishing_pass():
    with pytest.raises(PropertyError) as info:
        PassManager.parse("graph(test-infra-all-types,test-infra-needs-mark)", assume=())
    msg = str(info.value)
    assert "pass 'test-infra-needs-mark' (element 1 of the pipeline) requires property " \
           "'test-infra-marked'" in msg
    assert "add 'test-infra-lying-mark' or 'test-infra-mark' before it" in msg


def test_requires_satisfied_by_earlier_pass_assume_or_graph_history():
    PassManager.parse("graph(test-infra-mark,test-infra-needs-mark)")
    PassManager.parse("graph(test-infra-needs-mark)", assume={"test-infra-marked"})
    gm = PassManager.parse("graph(test-infra-mark)").run(relu_graph())
    assert "test-infra-marked" in graph_properties(gm)
    PassManager.parse("graph(test-infra-needs-mark)", assume=gm).run(gm)
    with pytest.raises(PropertyError, match="unknown property 'nope'"):
        PassManager(assume={"nope"})


def test_add_checks_requires_too():
    pm = PassManager(assume=())
    with pytest.raises(PropertyError):
        pm.add("test-infra-needs-mark")
    pm.add("test-infra-mark").add("test-infra-needs-mark")
    assert len(pm) == 2


def test_run_modifies_in_place_and_records_history():
    gm = relu_graph()
    pm = PassManager.parse("graph(test-relu-to-sigmoid{limit=1})")
    out = pm.run(gm)
    assert out is gm
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(torch.sigmoid) == 1
    x = torch.randn(4)
    assert torch.equal(gm(x), torch.relu(torch.sigmoid(x) + 1))  # recompiled by the manager
    hist = graph_history(gm)
    assert hist["pipeline"] == [str(pm)]
    assert [p["name"] for p in hist["passes"]] == ["test-relu-to-sigmoid"]


def test_fixpoint_converges_and_reports_nonconvergence_and_cycles():
    gm = relu_graph()
    PassManager.parse("graph(fixpoint{max-iterations=5}(test-relu-to-sigmoid{limit=1}))").run(gm)
    assert not relu_nodes(gm)
    with pytest.raises(VerificationError, match="did not converge in 1 iterations"):
        PassManager.parse("graph(fixpoint{max-iterations=1}(test-relu-to-sigmoid{limit=1}))").run(
            relu_graph())
    with pytest.warns(RuntimeWarning, match="did not converge"):
        PassManager.parse("graph(fixpoint{max-iterations=1}(test-relu-to-sigmoid{limit=1}))").run(
            relu_graph(), PassContext(verify_each=False))
    with pytest.raises(VerificationError, match="cycles"):
        PassManager.parse("graph(fixpoint{max-iterations=50}(test-infra-flip-flop))").run(
            relu_graph())


def test_repeat_runs_body_count_times():
    gm = relu_graph()
    PassManager.parse("graph(repeat{count=3}(test-infra-required))").run(gm)
    assert gm.meta["required_ran"] == 3


def test_dishonest_and_fake_change_passes_are_caught():
    with pytest.raises(VerificationError, match="reported modified=False but changed"):
        PassManager.parse("graph(test-dishonest)").run(relu_graph())
    with pytest.raises(VerificationError, match="reported modified=True but"):
        PassManager.parse("graph(test-infra-fake-change)").run(relu_graph())
    # With verification off, the manager trusts the pass.
    PassManager.parse("graph(test-dishonest)").run(relu_graph(),
                                                          PassContext(verify_each=False))


def test_property_checker_runs_under_verify_each():
    with pytest.raises(VerificationError, match="claims to establish 'test-infra-marked'"):
        PassManager.parse("graph(test-infra-lying-mark)").run(relu_graph())


def test_failures_are_typed_with_pass_position_and_pipeline():
    pm = PassManager.parse("graph(test-infra-mark,test-fail)")
    with pytest.raises(PassFailure) as info:
        pm.run(relu_graph())
    err = info.value
    assert err.pass_name == "test-fail" and err.position == 1
    assert err.pipeline == str(pm) and err.node == "x"
    assert "pass 'test-fail' (element 1 of the pipeline) failed: at node 'x': " \
           "this pass always fails" in str(err)


def test_internal_errors_are_wrapped_not_bare():
    with pytest.raises(PassFailure, match=r"internal error: KeyError: 'missing'") as info:
        PassManager.parse("graph(test-infra-crashing)").run(relu_graph())
    assert isinstance(info.value.__cause__, KeyError)


def test_typed_user_errors_keep_their_type_and_gain_context():
    from passes_registry import Pass, PassResult, register_pass

    @register_pass
    class BadConfigPass(Pass):
        name = "test-infra-bad-config"

        def run(self, gm, ctx, am):
            raise AnnotationError("bits must be in 0..32")

    with pytest.raises(AnnotationError, match=r"pass 'test-infra-bad-config' \(element 0 of "
                                              r"graph\(test-infra-bad-config\)\): bits must"):
        PassManager.parse("graph(test-infra-bad-config)").run(relu_graph())


def test_reproducer_written_on_failure(tmp_path):
    d = tmp_path / "repro"
    with pytest.raises(PassFailure) as info:
        PassManager.parse("graph(test-relu-to-sigmoid{limit=1},test-fail)").run(
            relu_graph(), PassContext(reproducer_dir=str(d)))
    assert info.value.reproducer == str(d)
    assert (d / "pipeline.txt").read_text().startswith("graph(test-relu-to-sigmoid{limit=1}")
    code = (d / "graph.py").read_text()
    assert "sigmoid" in code  # the graph just before the failing pass
    assert (d / "state_dict.pt").exists() and "qpass_opt" in (d / "command.txt").read_text()


class Recorder(Instrument):
    def __init__(self, tag, log):
        self.tag, self.log = tag, log

    def before_pass(self, p, gm):
        self.log.append(f"{self.tag}:before:{p.name}")

    def after_pass(self, p, gm, result):
        self.log.append(f"{self.tag}:after:{p.name}")

    def before_analysis(self, name, gm):
        self.log.append(f"{self.tag}:analysis:{name}")


def test_instruments_before_in_order_after_in_reverse():
    log = []
    ctx = PassContext(instruments=(Recorder("a", log), Recorder("b", log)))
    PassManager.parse("graph(test-infra-mark)").run(relu_graph(), ctx)
    assert log == ["a:before:test-infra-mark", "b:before:test-infra-mark",
                   "b:after:test-infra-mark", "a:after:test-infra-mark"]


class SkipMarks(Instrument):
    def should_run(self, p, gm):
        return p.name != "test-relu-to-sigmoid"


def test_should_run_disabled_and_bisect_but_required_always_runs():
    gm = relu_graph()
    PassManager.parse("graph(test-relu-to-sigmoid{limit=1})").run(
        gm, PassContext(instruments=(SkipMarks(),)))
    assert len(relu_nodes(gm)) == 2
    PassManager.parse("graph(test-relu-to-sigmoid{limit=1})").run(
        gm, PassContext(disabled={"test-relu-to-sigmoid"}))
    assert len(relu_nodes(gm)) == 2
    pm = PassManager.parse("graph(test-relu-to-sigmoid{limit=1},test-infra-required,"
                           "test-relu-to-sigmoid{limit=1})")
    pm.run(gm, PassContext(bisect_limit=1, disabled={"test-infra-required"}))
    assert len(relu_nodes(gm)) == 1 and gm.meta["required_ran"] == 1


def test_print_ir_after_all_change_and_failure():
    buf = io.StringIO()
    PassManager.parse("graph(test-infra-mark,test-relu-to-sigmoid{limit=1})").run(
        relu_graph(), PassContext(print_after=ALL, print_stream=buf))
    text = buf.getvalue()
    assert text.count("IR Dump After") == 2
    assert "// -----// IR Dump After ReluToSigmoid (test-relu-to-sigmoid) //----- //" in text
    buf = io.StringIO()
    PassManager.parse("graph(test-infra-mark,test-relu-to-sigmoid{limit=1})").run(
        relu_graph(), PassContext(print_after_change=True, print_stream=buf))
    assert buf.getvalue().count("IR Dump After") == 1
    buf = io.StringIO()
    with pytest.raises(PassFailure):
        PassManager.parse("graph(test-fail)").run(
            relu_graph(), PassContext(print_after_failure=True, print_stream=buf))
    assert "IR Dump After Failure" in buf.getvalue()


def test_timing_and_statistics_reports():
    buf = io.StringIO()
    PassManager.parse("graph(fixpoint(test-relu-to-sigmoid{limit=1}),print<test-infra-relu-share>)").run(
        relu_graph(), PassContext(timing=True, statistics=True, print_stream=buf))
    text = buf.getvalue()
    assert "Pass execution timing report" in text and "test-infra-relu-share (A)" in text
    assert "(2) num_rewritten" in text
    assert "// ----- test-infra-relu-share -----\n0.0" in text


def test_analysis_cache_hits_invalidation_and_cascade():
    fake_passes.COMPUTE_COUNT.update(nodes=0, relus=0)
    log = []
    gm = relu_graph()
    pm = PassManager.parse(
        "graph(require<test-infra-relu-share>,require<test-infra-relu-share>,"
        "test-infra-annotate-only,require<test-infra-relu-share>,"
        "test-relu-to-sigmoid{limit=1},require<test-infra-relu-share>,"
        "invalidate<test-infra-node-count>,require<test-infra-relu-share>)")
    pm.run(gm, PassContext(instruments=(Recorder("r", log),)))
    # computed: once at start, kept across the annotation-only pass, recomputed after the
    # structural rewrite, and again after invalidating the analysis it was computed from.
    assert fake_passes.COMPUTE_COUNT == {"nodes": 3, "relus": 3}
    assert log.count("r:analysis:test-infra-relu-share") == 3


def test_stale_analysis_detected_when_graph_mutated_behind_the_manager():
    from passes_registry import AnalysisManager
    gm = relu_graph()
    am = AnalysisManager(verify=True)
    am.get("test-infra-node-count", gm)
    next(n for n in gm.graph.nodes if n.op == "call_function").target = torch.sigmoid
    with pytest.raises(StaleAnalysisError, match="structure changed"):
        am.get("test-infra-node-count", gm)


def test_false_preservation_claim_caught_by_preservation_checker():
    pm = PassManager.parse("graph(require<test-infra-node-count>,test-infra-false-preserve)")
    with pytest.raises(VerificationError, match="claims to preserve analysis 'test-infra-node-count'"):
        pm.run(relu_graph(), PassContext(check_preservation=True))


def test_function_pass_and_run_input_errors():
    gm = relu_graph()
    PassManager.parse("graph(test-infra-function-pass)").run(gm)
    assert torch.equal(gm(torch.ones(2)), -(torch.relu(torch.relu(torch.ones(2)) + 1)))
    with pytest.raises(TypeError, match="expects a torch.fx.GraphModule"):
        PassManager.parse("graph(test-infra-mark)").run(torch.nn.Linear(2, 2))  # type: ignore
    with pytest.raises(PipelineParseError, match="empty pipeline"):
        PassManager().run(relu_graph())


def test_context_stack_and_current():
    assert PassContext.current() == PassContext()
    with PassContext(seed=3) as outer:
        with PassContext(seed=4):
            assert PassContext.current().seed == 4
        assert PassContext.current() is outer
    assert PassContext.current().seed == 0
    ctx = PassContext(example_inputs=torch.zeros(1))
    assert isinstance(ctx.example_inputs, tuple)


def test_passes_are_stateless():
    p = fake_passes.AllTypesPass()
    with pytest.raises(AttributeError, match="stateless"):
        p.cache = {}  # type: ignore[attr-defined]


def test_property_hint_skips_passes_that_require_the_property_themselves():
    from passes_registry import Pass, register_pass

    @register_pass
    class RefinesMark(Pass):
        name = "test-infra-refines-mark"
        requires = frozenset({"test-infra-marked"})
        establishes = frozenset({"test-infra-marked"})

    with pytest.raises(PropertyError) as info:
        PassManager.parse("graph(test-infra-needs-mark)", assume=())
    assert "test-infra-refines-mark" not in str(info.value)
    assert "'test-infra-mark'" in str(info.value)


def test_code_is_regenerated_only_when_the_graph_changed(monkeypatch):
    """A modifying pass that leaves the graph as it was (weights, meta: test-infra-fake-change)
    does not regenerate the code; one that rewrites nodes does, and the module runs the new
    graph; a graph mutated by hand before the run is regenerated by its first modifying pass."""
    gm = relu_graph()
    calls = []
    recompile = type(gm).recompile
    monkeypatch.setattr(type(gm), "recompile", lambda self: calls.append(1) or recompile(self))
    ctx = PassContext(verify_each=False)
    PassManager.parse("graph(test-infra-fake-change,test-infra-fake-change)").run(gm, ctx)
    assert len(calls) == 1              # the first modifying pass of a run: no signature yet
    calls.clear()
    PassManager.parse("graph(test-infra-fake-change,test-relu-to-sigmoid{limit=1},"
                      "test-infra-fake-change)").run(gm, ctx)
    assert len(calls) == 2
    x = torch.randn(4)
    assert torch.equal(gm(x), torch.relu(torch.sigmoid(x) + 1))
    for n in gm.graph.nodes:            # by hand, no recompile: the next run's first pass does it
        if n.op == "call_function" and n.target is torch.relu:
            n.target = torch.tanh
    calls.clear()
    PassManager.parse("graph(test-infra-fake-change)").run(gm, ctx)
    assert len(calls) == 1 and torch.equal(gm(x), torch.tanh(torch.sigmoid(x) + 1))
