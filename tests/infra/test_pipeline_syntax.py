"""Pipeline grammar: round-trip laws (hypothesis), canonical printing, located errors."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qpasses  # noqa: F401  (registers the real passes too)
from passes_registry import (Nested, OptionError, PassManager, Pipeline, PipelineParseError,
                             lookup_pass, parse_pipeline, print_pipeline)
from passes_registry.pipeline import FixpointOptions, RepeatOptions

from tests.fake_passes import AllTypesOptions, AllTypesPass, Mode

_atoms = st.text(alphabet="abcxyz019_-./", min_size=1, max_size=6)
_strings = st.one_of(_atoms, st.text(alphabet='ab c"\\,{}()=\'', min_size=0, max_size=6))

all_types_options = st.builds(
    AllTypesOptions,
    flag=st.booleans(), count=st.integers(0, 10**6),
    ratio=st.floats(allow_nan=False, allow_infinity=False, width=64),
    label=_strings, mode=st.sampled_from(list(Mode)),
    bits=st.lists(st.integers(-8, 32), max_size=4).map(tuple),
    names=st.lists(_strings, max_size=3).map(tuple),
    limit=st.one_of(st.none(), st.integers(-5, 5)),
)
leaf = st.one_of(
    all_types_options.map(AllTypesPass),
    st.sampled_from(["test-infra-mark", "test-relu-to-sigmoid"]).map(lambda n: lookup_pass(n)()),
    st.sampled_from(["test-infra-node-count", "test-infra-relu-share"]).map(
        lambda a: lookup_pass("print")(a)),
)
element = st.recursive(
    leaf,
    lambda children: st.one_of(
        st.builds(lambda n, body: Nested("fixpoint", FixpointOptions(n), tuple(body)),
                  st.integers(1, 9), st.lists(children, min_size=1, max_size=3)),
        st.builds(lambda n, body: Nested("repeat", RepeatOptions(n), tuple(body)),
                  st.integers(1, 3), st.lists(children, min_size=1, max_size=3)),
    ),
    max_leaves=6,
)
pipelines = st.lists(element, min_size=1, max_size=4).map(lambda es: Pipeline(tuple(es)))


@settings(max_examples=150, deadline=None)
@given(pipelines)
def test_parse_print_round_trip(p):
    text = print_pipeline(p)
    again = parse_pipeline(text)
    assert again == p
    assert print_pipeline(again) == text  # printing is idempotent


def test_canonical_print_sorts_options_and_includes_defaults():
    p = parse_pipeline("test-infra-all-types{mode=exact count=7 flag}")
    assert print_pipeline(p) == (
        'graph(test-infra-all-types{bits={2,4} count=7 flag=true label=x limit=none '
        'mode=exact names={} ratio=0.5})')


def test_whitespace_newlines_and_list_spellings_are_equivalent():
    a = parse_pipeline("graph(test-infra-all-types{bits=[1,2,3] names={a,b}})")
    b = parse_pipeline("graph(\n  test-infra-all-types{ bits=1,2,3   names=[a, b] }\n)")
    c = parse_pipeline("test-infra-all-types{bits={1,2,3} names=a,b}")
    assert a == b == c


def test_quoted_strings_keep_special_characters():
    p = parse_pipeline('test-infra-all-types{label="a b,{c}" names=["x y",z]}')
    opts = p.elements[0].options
    assert opts.label == "a b,{c}" and opts.names == ("x y", "z")
    assert parse_pipeline(print_pipeline(p)) == p


def test_python_api_builds_the_same_pipeline_as_text():
    pm = PassManager()
    pm.add("test-infra-all-types", count=5, mode="exact", bits=[1, 2])
    pm.add("print<test-infra-node-count>")
    text = PassManager.parse("graph(test-infra-all-types{count=5 mode=exact bits=[1,2]},"
                             "print<test-infra-node-count>)")
    assert pm.pipeline == text.pipeline
    assert str(pm) == str(text)


def test_nested_fixpoint_and_repeat():
    p = parse_pipeline("graph(fixpoint{max-iterations=4}(test-infra-mark,repeat{count=3}"
                       "(test-infra-mark)))")
    fix = p.elements[0]
    assert isinstance(fix, Nested) and fix.options.max_iterations == 4
    assert fix.body[1].combinator == "repeat" and fix.body[1].options.count == 3
    assert print_pipeline(p) == ("graph(fixpoint{max-iterations=4}(test-infra-mark,"
                                 "repeat{count=3}(test-infra-mark)))")


ERROR_CASES = [
    ("graph(test-infra-mrak)", 1, 7,
     "'test-infra-mrak' does not refer to a registered pass or pipeline (did you mean "
     "'test-infra-mark'"),
    ("graph(test-infra-all-types{cout=1})", 1, 28,
     "no such option (valid options: bits, count, flag, label, limit, mode, names, ratio) "
     "(did you mean 'count'?)"),
    ("graph(test-infra-all-types{count=x})", 1, 34, "'x' is not a valid int"),
    ("graph(test-infra-all-types{count=-1})", 1, 27, "count must be >= 0"),
    ("graph(test-infra-all-types{mode=fats})", 1, 33, "did you mean 'fast'?"),
    ("graph(test-infra-all-types{count})", 1, 28, "needs a value"),
    ("graph(test-infra-all-types{count=1 count=2})", 1, 36, "given more than once"),
    ("graph(test-infra-mark", 1, 6, "unbalanced '(': missing ')'"),
    ("graph(test-infra-mark))", 1, 23, "unbalanced ')'"),
    ("graph(test-infra-all-types{count=1)", 1, 27, "unbalanced '{'"),
    ("graph(test-infra-all-types{bits=[1,2)})", 1, 37, "expected ',' or ']'"),
    ("graph(test-infra-mark test-infra-mark)", 1, 23, "expected ',' or ')'"),
    ("graph(test-infra-mark,)", 1, 23, "expected a pass name after ','"),
    ("graph()", 1, 6, "empty pipeline"),
    ("   ", 1, 1, "empty pipeline"),
    ("graph(Fold-batch-norm)", 1, 7, "lower-case kebab-case"),
    ("graph(print)", 1, 7, "needs an analysis"),
    ("graph(print<test-infra-node-cont>)", 1, 13, "did you mean 'test-infra-node-count'"),
    ("graph(test-infra-mark<x>)", 1, 23, "takes no <parameter>"),
    ("graph(fixpoint)", 1, 7, "needs a nested pipeline"),
    ("graph(test-infra-mark(test-infra-mark))", 1, 22, "does not take a nested pipeline"),
    ('graph(test-infra-all-types{label="abc})', 1, 34, "unterminated string"),
    ("graph(\n  test-infra-mark,\n  test-infra-mrak)", 3, 3, "did you mean 'test-infra-mark'"),
]


@pytest.mark.parametrize("text,line,col,message", ERROR_CASES)
def test_parse_errors_are_located(text, line, col, message):
    with pytest.raises(PipelineParseError) as info:
        parse_pipeline(text)
    err = info.value
    assert message in str(err)
    assert (err.line, err.column) == (line, col), str(err)
    if line is not None:
        first = str(err).splitlines()[0]
        assert first.startswith(f"pipeline:{line}:{col}: error: ")
        source_line, caret_line = str(err).splitlines()[1:3]
        assert caret_line.index("^") == col + 1  # two spaces of indent before the source
        assert source_line.strip() == text.splitlines()[line - 1].strip()


def test_option_errors_are_both_option_and_parse_errors():
    with pytest.raises(OptionError) as info:
        parse_pipeline("test-infra-all-types{nope=1}")
    assert info.value.pass_name == "test-infra-all-types" and info.value.option == "nope"
    with pytest.raises(OptionError, match="no such option"):
        PassManager().add("test-infra-all-types", nope=1)
    with pytest.raises(OptionError, match="expected int"):
        PassManager().add("test-infra-all-types", count="many")
    with pytest.raises(PipelineParseError, match="does not refer to a registered pass"):
        PassManager().add("test-infra-nope")


def test_non_string_pipeline_is_a_typed_error():
    with pytest.raises(PipelineParseError, match="must be a string"):
        parse_pipeline(42)  # type: ignore[arg-type]
