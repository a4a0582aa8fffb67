"""Robustness of the pass infrastructure (issue 18, part A): rollback on failure, properties
inferred from a graph's recorded history, typed errors for API misuse, linear pipeline building."""
from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpasses  # noqa: F401  (registers passes)
from passes_registry import (OptionError, PassContext, PassesError, PassFailure, PassManager,
                             PipelineParseError, PropertyError, UsageError, fingerprint,
                             function_pass, graph_history, graph_properties, parse_pipeline)
from passes_registry.options import build_options
from passes_registry.pipeline import MAX_ITERATIONS, MAX_NESTING

from tests import fake_passes
from tests.models import relu_graph


@function_pass("test-robust-unmark", invalidates=frozenset({"test-infra-marked"}),
               register=False)
def _unmark(gm, ctx, am):
    """Invalidates test-infra-marked."""
    return False


@function_pass("test-robust-option-error", register=False)
def _raises_option_error(gm, ctx, am):
    """Raises a typed (non-PassFailure) error from inside run()."""
    raise OptionError("test-robust-option-error", "x", "bad value")


@function_pass("test-robust-exit", register=False)
def _exits(gm, ctx, am):
    """Raises SystemExit (as a user's data iterator might)."""
    raise SystemExit(7)


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None:
        assert id(exc) not in seen, "cause chain loops"
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__
    return chain


# ---------------------------------------------------------------------------------------------
# 1. rollback


def test_rollback_leaves_the_input_graph_untouched_on_failure():
    gm = relu_graph()
    x = torch.randn(5)
    expected, before, code = gm(x), fingerprint(gm), gm.code
    pm = PassManager.parse("graph(test-relu-to-sigmoid,test-infra-mark,test-fail)")
    with pytest.raises(PassFailure, match="always fails"):
        pm.run(gm, PassContext(rollback=True))
    assert fingerprint(gm) == before and gm.code == code
    assert torch.equal(gm(x), expected)
    assert "marked" not in gm.meta and graph_history(gm)["pipeline"] == []
    assert all(n.graph is gm.graph for n in gm.graph.nodes)
    # The restored graph is a working GraphModule: the next pipeline runs on it.
    PassManager.parse("graph(test-relu-to-sigmoid{limit=1})").run(gm)
    assert torch.equal(gm(x), torch.relu(torch.sigmoid(x) + 1))


def test_without_rollback_the_earlier_passes_changes_stay():
    gm = relu_graph()
    before = fingerprint(gm)
    with pytest.raises(PassFailure):
        PassManager.parse("graph(test-relu-to-sigmoid,test-fail)").run(gm, PassContext())
    assert fingerprint(gm) != before  # the Python API's default: no copy is taken


def test_rollback_on_success_keeps_the_result():
    gm = relu_graph()
    out = PassManager.parse("graph(test-relu-to-sigmoid)").run(gm, PassContext(rollback=True))
    assert out is gm and graph_history(gm)["passes"][0]["name"] == "test-relu-to-sigmoid"


# ---------------------------------------------------------------------------------------------
# 2. properties inferred from the graph's recorded history


def test_continued_graph_needs_no_assume():
    gm = PassManager.parse("graph(test-infra-mark)").run(relu_graph())
    pm = PassManager.parse("graph(test-infra-needs-mark)")  # graph unknown: check deferred
    assert pm.input_requires == {"test-infra-marked"}
    pm.run(gm)
    assert "test-infra-marked" in graph_properties(gm)


def test_deferred_requirement_fails_before_any_pass_runs_on_a_fresh_graph():
    gm = relu_graph()
    before = fingerprint(gm)
    pm = PassManager.parse("graph(test-relu-to-sigmoid,test-infra-needs-mark)")
    with pytest.raises(PropertyError) as info:
        pm.run(gm)
    msg = str(info.value)
    assert "pass 'test-infra-needs-mark' (element 1 of the pipeline) requires property " \
           "'test-infra-marked'" in msg
    assert "input graph's recorded history does not establish (" in msg and "add 'test-infra-" in msg
    assert fingerprint(gm) == before


def test_recorded_property_is_verified_by_its_checker():
    gm = PassManager.parse("graph(test-infra-mark)").run(relu_graph())
    gm.meta["marked"] = False  # changed behind the manager's back: the checker disagrees
    with pytest.raises(PropertyError, match="its checker found: not marked"):
        PassManager.parse("graph(test-infra-needs-mark)").run(gm)
    # the property the checker rejects is not carried into the new history either
    PassManager.parse("graph(test-noop)").run(gm)
    assert "test-infra-marked" not in graph_properties(gm)


def test_static_checks_stay_when_assume_is_given_or_a_property_was_invalidated():
    with pytest.raises(PropertyError, match="no earlier element establishes"):
        PassManager.parse("graph(test-infra-needs-mark)", assume=())
    # invalidated earlier in the same pipeline: the input graph cannot provide it
    with pytest.raises(PropertyError, match="test-infra-needs-mark"):
        PassManager([fake_passes.MarkPass(), _unmark(),
                     fake_passes.NeedsMarkPass()])
    with pytest.raises(PropertyError):
        PassManager.parse("graph(repeat(test-infra-needs-mark),test-infra-mark)", assume=())


# ---------------------------------------------------------------------------------------------
# 3. typed errors


@pytest.mark.parametrize("pipeline", [[fake_passes.Fail()], [_raises_option_error()]])
def test_typed_errors_from_a_pass_are_not_their_own_cause(pipeline):
    with pytest.raises(PassesError) as info:
        PassManager(pipeline).run(relu_graph())
    chain = _cause_chain(info.value)
    assert chain[0].__cause__ is not chain[0]
    assert "pass 'test-" in str(info.value)


def test_internal_error_keeps_the_original_as_cause():
    with pytest.raises(PassFailure, match="internal error") as info:
        PassManager.parse("graph(test-infra-crashing)").run(relu_graph())
    chain = _cause_chain(info.value)
    assert len(chain) == 2 and not isinstance(chain[1], PassesError)


def test_system_exit_from_a_pass_is_not_relabelled():
    with pytest.raises(SystemExit) as info:
        PassManager([_exits()]).run(relu_graph())
    assert info.value.code == 7


def test_pass_manager_given_text_says_to_parse():
    with pytest.raises(UsageError, match="PassManager.parse"):
        PassManager("graph(test-noop)")


@pytest.mark.parametrize("text,where", [
    ("graph(" + "repeat(" * 200 + "test-noop" + ")" * 200 + ")", "nesting deeper than"),
    ("graph(test-golden-options{sizes=" + "[" * 5000 + "1" + "]" * 5000 + "})", "nesting"),
])
def test_deep_nesting_is_a_parse_error_with_a_position(text, where):
    with pytest.raises(PipelineParseError, match=where) as info:
        parse_pipeline(text)
    assert info.value.line == 1 and info.value.column is not None


def test_nesting_up_to_the_limit_parses_and_runs():
    depth = MAX_NESTING - 1  # graph( is one level
    text = "graph(" + "repeat{count=1}(" * depth + "test-noop" + ")" * depth + ")"
    PassManager.parse(text).run(relu_graph())


def test_repeat_count_is_bounded():
    parse_pipeline(f"graph(repeat{{count={MAX_ITERATIONS}}}(test-noop))")
    with pytest.raises(PipelineParseError, match=f"count must be <= {MAX_ITERATIONS}"):
        parse_pipeline("graph(repeat{count=100000000000}(test-noop))")
    with pytest.raises(PipelineParseError, match="max-iterations must be <="):
        parse_pipeline("graph(fixpoint{max-iterations=99999}(test-noop))")


@pytest.mark.parametrize("bad", [torch.nn.ReLU(), "not a graph", None])
def test_run_on_something_else_than_a_graph_module(bad):
    with pytest.raises(UsageError, match="expects a torch.fx.GraphModule") as info:
        PassManager.parse("graph(test-noop)").run(bad)
    assert isinstance(info.value, TypeError)
    if isinstance(bad, torch.nn.Module):
        assert "trace the model first" in str(info.value)


def test_run_with_a_bad_context():
    with pytest.raises(UsageError, match="ctx must be a PassContext"):
        PassManager.parse("graph(test-noop)").run(relu_graph(), {"verify_each": True})


@pytest.mark.parametrize("assume,match", [
    (5, "assume= takes IR property names"),
    (torch.nn.ReLU(), "assume= takes IR property names"),
    ([1, 2], "assume= takes IR property names"),
    ({"test-infra-markd"}, "unknown property 'test-infra-markd'.*did you mean"),
])
def test_bad_assume(assume, match):
    with pytest.raises(PassesError, match=match):
        PassManager.parse("graph(test-noop)", assume=assume)


def test_assume_as_comma_separated_text():
    pm = PassManager.parse("graph(test-infra-needs-mark)", assume="test-infra-marked")
    assert pm.assume == {"test-infra-marked"} and not pm.input_requires


@pytest.mark.parametrize("field", ["disabled", "print_before", "print_after"])
def test_unknown_pass_names_in_the_context(field):
    with pytest.raises(UsageError, match="'test-noopp' is not a registered pass.*did you mean "
                                         "'test-noop'") as info:
        PassContext(**{field: "test-noopp"})
    assert info.value.argument == field
    PassContext(**{field: "test-noop,print<macs>"})  # real names, parametric ones included
    with pytest.raises(UsageError, match="print<nope>"):
        PassContext(**{field: ["print<nope>"]})


@pytest.mark.parametrize("inputs", ["abc", ("abc",), [object()], {"x": 1}])
def test_example_inputs_must_be_tensors(inputs):
    with pytest.raises(UsageError, match="example_inputs must be a tensor"):
        PassContext(example_inputs=inputs)


def test_bisect_limit_is_checked():
    for bad in (-1, 1.5, "3"):
        with pytest.raises(UsageError, match="bisect_limit"):
            PassContext(bisect_limit=bad)


@pytest.mark.parametrize("text", ["4_", "4__0", "_4", "0x_", "4.0", "1e3", "04"])
def test_malformed_int_options_are_rejected_in_text(text):
    with pytest.raises(PipelineParseError, match="not a valid int"):
        parse_pipeline(f"graph(test-golden-options{{count={text}}})")


@pytest.mark.parametrize("value", [4.0, True, "4", float("nan")])
def test_python_options_agree_with_the_text(value):
    with pytest.raises(OptionError):
        build_options("p", fake_passes.GoldenOptionsPass.Options, {"count": value})


def test_python_float_option_rejects_nan_like_the_text():
    with pytest.raises(OptionError, match="nan"):
        build_options("p", fake_passes.GoldenOptionsPass.Options, {"ratio": float("nan")})
    with pytest.raises(PipelineParseError, match="nan"):
        parse_pipeline("graph(test-golden-options{ratio=nan})")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789_+-x", min_size=1, max_size=8))
def test_int_text_follows_python_int_literals(text):
    try:
        got = build_options("p", fake_passes.GoldenOptionsPass.Options, {"count": text},
                            from_text=True).count
    except OptionError:
        got = None
    if got is not None:
        assert got == int(text, 0)
        assert "__" not in text and not text.endswith("_") and "_" != text.lstrip("+-")[:1]


# ---------------------------------------------------------------------------------------------
# 5. building is linear


def test_building_a_long_pipeline_is_linear():
    n = 5000
    text = "graph(" + ",".join(["test-golden-options{count=3},test-noop"] * (n // 2)) + ")"
    start = time.perf_counter()
    pm = PassManager.parse(text)
    pm.add("test-noop")
    str(pm)
    assert time.perf_counter() - start < 2.0
    assert len(pm) == n + 1
