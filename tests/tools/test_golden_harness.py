"""The golden-test harness itself must fail when a golden is wrong."""
from __future__ import annotations

import textwrap

import pytest

from tests.golden.conftest import GoldenError, match_checks, parse_golden, run_case

MODEL = '''
def build():
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (torch.randn(2, 4),)
'''


def cases(tmp_path, text):
    path = tmp_path / "case.py"
    path.write_text(textwrap.dedent(text))
    return parse_golden(path)


def test_split_and_directives(tmp_path):
    cs = cases(tmp_path, """\
        # header comment only
        # -----
        # CASE: first
        # RUN: graph(test-golden-options)
        # CHECK-UNCHANGED
        # CHECK: graph {
        # -----
        # RUN: graph(test-golden-options{count=3})
        # EXPECT-ERROR: nope
        """ + MODEL)
    assert [c.test_name for c in cs] == ["first", "2"]
    assert cs[0].unchanged and cs[0].checks[0].kind == "CHECK"
    assert cs[1].errors == ["nope"] and cs[1].first_line == 8
    assert "def build" in cs[1].source


def test_passing_case_and_unchanged(tmp_path):
    (c,) = cases(tmp_path, """\
        # RUN: graph(test-golden-options)
        # CHECK-UNCHANGED
        # CHECK-LABEL: graph {
        # CHECK-NEXT: %input_1 = placeholder : f32[2,4]
        # CHECK-NEXT: call_module[0](%input_1) : f32[2,3]
        # CHECK-NOT: sigmoid
        # CHECK: output(
        """ + MODEL)
    assert "graph {" in run_case(c)


@pytest.mark.parametrize("checks", [
    "# CHECK: call_module[7]",
    "# CHECK: output(\n# CHECK-NOT: placeholder\n# CHECK: call_module",
    "# CHECK: %input_1 = placeholder\n# CHECK-NEXT: output(",
    "# CHECK-LABEL: no such label",
    "# CHECK-COUNT-3: call_module",
])
def test_wrong_checks_fail(tmp_path, checks):
    (c,) = cases(tmp_path, "# RUN: graph(test-golden-options)\n" + checks + "\n" + MODEL)
    with pytest.raises(GoldenError):
        run_case(c)


def test_check_unchanged_fails_when_a_pass_changes_the_graph(tmp_path):
    (c,) = cases(tmp_path, "# RUN: graph(test-dishonest)\n# CHECK-UNCHANGED\n" + '''
class M(nn.Module):
    def forward(self, x):
        return torch.relu(x)


def build():
    return M(), (torch.randn(2),)
''')
    with pytest.raises(GoldenError):  # verify-each raises: the pass lies about modified
        run_case(c)


def test_expect_error_must_happen_and_match(tmp_path):
    ok, wrong, absent = cases(tmp_path, """\
        # RUN: graph(test-golden-options{count=x})
        # EXPECT-ERROR: 'x' is not a valid int
        # -----
        # RUN: graph(test-golden-options{count=x})
        # EXPECT-ERROR: something else
        # -----
        # RUN: graph(test-golden-options)
        # EXPECT-ERROR: 'x' is not a valid int
        """)
    run_case(ok)
    with pytest.raises(GoldenError, match="expected the error to contain"):
        run_case(wrong)
    with pytest.raises(GoldenError, match="pipeline succeeded"):
        run_case(absent)


def test_caret_column_is_exact():
    msg = "pipeline:1:7: error: x\n  graph(fold-bn)\n        ^"
    match_checks(parse_checks("# CHECK: error:\n# CHECK-NEXT: graph(fold-bn)\n"
                              "# CHECK-NEXT: {{^}}        ^{{$}}"), msg)
    with pytest.raises(GoldenError):
        match_checks(parse_checks("# CHECK: error:\n# CHECK-NEXT: graph(fold-bn)\n"
                                  "# CHECK-NEXT: {{^}}       ^{{$}}"), msg)


def parse_checks(text):
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.py"
        p.write_text("# RUN: graph(test-golden-options)\n" + text + "\n")
        return parse_golden(p)[0].checks


@pytest.mark.parametrize("text,message", [
    ("# CHECK: x\n", "has no '# RUN"),
    ("# RUN: graph(a)\n# RUN: graph(b)\n", "one RUN line per case"),
    ("# RUN: graph(a)\n# CHECK-NXT: y\n", "unknown directive 'CHECK-NXT'"),
    ("# RUN: graph(a)\n# CHECK-UNCHANGED: y\n", "takes no argument"),
])
def test_malformed_golden_files(tmp_path, text, message):
    with pytest.raises(GoldenError, match=message):
        cases(tmp_path, text)
