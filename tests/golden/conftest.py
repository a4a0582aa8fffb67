"""FileCheck-style golden tests (MLIR lit + FileCheck, without an LLVM toolchain).

Every ``tests/golden/<pass-name>/*.py`` file is collected. A file holds one or more cases separated
by a line ``# -----`` (MLIR's ``-split-input-file``). A case is Python code plus directives::

    # RUN: graph(fold-batch-norm)          the pipeline (exactly one per case)
    # CHECK: %conv1 = call_module[conv1]   FileCheck directives, matched in order against the
    # CHECK-NEXT: ...                      output; also CHECK-SAME, CHECK-NOT, CHECK-DAG,
    # CHECK-LABEL: ...                     CHECK-COUNT-<n>, CHECK-LABEL; CHECK, CHECK-NEXT and
    # CHECK-NEXT: {{^}}  ^{{$}}            CHECK-SAME may use {{regex}} and the line anchors
                                           {{^}} / {{$}} (leading blanks then count exactly)
    # CHECK-UNCHANGED                      every pass reported modified=False, fingerprint equal
    # EXPECT-ERROR: <substring>            the pipeline (parse, options, properties, trace or a
                                           pass) fails with a typed error containing <substring>
    # CASE: name                           optional name of the case in the test id
    # ASSUME: prop-a,prop-b                optional properties the input graph already has

    def build():                           -> (nn.Module, example_inputs); ``torch``, ``nn`` and
        return Model(), (torch.randn(...),)   ``F`` are predefined in each case's namespace

Output matched by CHECK lines:
- with ``build()``: whatever the pipeline printed (``print<...>``) followed by
  ``print_graph(gm)`` of the final graph (no header);
- without ``build()``: the canonical text of the parsed pipeline (``--dump-pipeline``);
- with ``EXPECT-ERROR``: the error message (so CHECK/CHECK-NEXT can pin the caret line).

The ``test-*`` passes, analysis and property that the ``errors/`` cases use are registered by
tests/fake_passes.py (imported here).
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import FileCheck

import qpasses
import tests.fake_passes  # noqa: F401  (registers the test-* passes the cases run)
from passes_registry import (Instrument, PassContext, PassesError, PassManager, fingerprint,
                             print_graph)

HERE = Path(__file__).parent

# ---------------------------------------------------------------------------------------------
# Parsing golden files

SPLIT_RE = re.compile(r"^\s*#\s*-{5,}\s*$")
DIRECTIVE_RE = re.compile(r"^\s*#\s*((?:RUN|CHECK|EXPECT|CASE|ASSUME)[A-Z0-9-]*)(:?)(.*)$")
CHECK_KINDS = {"CHECK", "CHECK-NEXT", "CHECK-SAME", "CHECK-NOT", "CHECK-DAG", "CHECK-LABEL"}
COUNT_RE = re.compile(r"^CHECK-COUNT-(\d+)$")


class GoldenError(Exception):
    """A golden case did not match; the message shows what was expected and the output."""


@dataclass
class Check:
    kind: str
    pattern: str
    line: int
    count: int = 0


@dataclass
class Case:
    path: Path
    index: int
    first_line: int
    source: str
    name: str | None = None
    run: str | None = None
    checks: list[Check] = field(default_factory=list)
    unchanged: bool = False
    errors: list[str] = field(default_factory=list)
    assume: frozenset[str] = frozenset()

    @property
    def test_name(self) -> str:
        return self.name or f"{self.index}"


def parse_golden(path: Path) -> list[Case]:
    """Split a golden file into cases and read their directives (raises GoldenError)."""
    lines = path.read_text().splitlines()
    chunks: list[tuple[int, list[str]]] = [(0, [])]
    for i, line in enumerate(lines):
        if SPLIT_RE.match(line):
            chunks.append((i + 1, []))
        else:
            chunks[-1][1].append(line)
    cases = []
    for idx, (start, chunk) in enumerate(chunks):
        case = Case(path, idx, start + 1, "\n" * start + "\n".join(chunk) + "\n")
        for off, line in enumerate(chunk):
            m = DIRECTIVE_RE.match(line)
            if not m:
                continue
            kind, colon, rest = m.group(1), m.group(2), m.group(3).strip()
            lineno = start + off + 1
            where = f"{path}:{lineno}"
            if kind == "CHECK-UNCHANGED":
                if rest:
                    raise GoldenError(f"{where}: CHECK-UNCHANGED takes no argument")
                case.unchanged = True
                continue
            if not colon:
                raise GoldenError(f"{where}: expected '{kind}:'")
            if kind == "RUN":
                if case.run is not None:
                    raise GoldenError(f"{where}: one RUN line per case (split cases with "
                                      "'# -----')")
                case.run = rest
            elif kind == "EXPECT-ERROR":
                if not rest:
                    raise GoldenError(f"{where}: EXPECT-ERROR needs a message substring")
                case.errors.append(rest)
            elif kind == "CASE":
                case.name = rest
            elif kind == "ASSUME":
                case.assume = frozenset(p.strip() for p in rest.split(",") if p.strip())
            elif kind in CHECK_KINDS:
                if not rest and kind != "CHECK-NOT":
                    raise GoldenError(f"{where}: empty {kind} pattern")
                case.checks.append(Check(kind, rest, lineno))
            elif COUNT_RE.match(kind):
                case.checks.append(Check("CHECK-COUNT", rest, lineno,
                                         int(COUNT_RE.match(kind).group(1))))
            else:
                raise GoldenError(f"{where}: unknown directive '{kind}' (known: RUN, "
                                  f"{', '.join(sorted(CHECK_KINDS))}, CHECK-COUNT-<n>, "
                                  "CHECK-UNCHANGED, EXPECT-ERROR, CASE, ASSUME)")
        if case.run is None:
            if any(DIRECTIVE_RE.match(line) for line in chunk) or "def build" in case.source:
                raise GoldenError(f"{path}:{start + 1}: case {idx} has no '# RUN: <pipeline>' line")
            continue  # a chunk with only comments/imports (e.g. a file header)
        cases.append(case)
    return cases


# ---------------------------------------------------------------------------------------------
# Running a case


_RE_SPECIAL = set("\\^$.|?*+()[]{}/")


def _re_literal(text: str) -> str:
    return "".join("\\" + c if c in _RE_SPECIAL else c for c in text)


def _to_regex(kind: str, pattern: str) -> str | None:
    """A FileCheck pattern with ``{{regex}}`` blocks as a regex for torch's ``check_regex``
    (ECMAScript, anchored at the current match position); None when it has no ``{{``.

    ``{{^}}`` and ``{{$}}`` anchor at the start and end of a line. CHECK-NEXT and CHECK-SAME are
    expressed through the anchoring: the rest of the current line, a newline, then the pattern.
    """
    if "{{" not in pattern:
        return None
    line_start = pattern.startswith("{{^}}")
    if line_start:
        pattern = pattern[len("{{^}}"):]
    out, pos = [], 0
    for m in re.finditer(r"\{\{(.*?)\}\}", pattern):
        out.append(_re_literal(pattern[pos:m.start()]))
        out.append("(?=\\n|$)" if m.group(1) == "$" else "(?:" + m.group(1) + ")")
        pos = m.end()
    out.append(_re_literal(pattern[pos:]))
    body = "".join(out)
    if kind == "CHECK":
        return ("(?:^|\\n)" if line_start else "") + body
    if kind == "CHECK-NEXT":
        return "^[^\\n]*\\n" + ("" if line_start else "[^\\n]*?") + body
    if kind == "CHECK-SAME":
        if line_start:
            raise GoldenError("{{^}} cannot start a CHECK-SAME pattern")
        return "^[^\\n]*?" + body
    raise GoldenError(f"{{{{regex}}}} is not supported in {kind}: (only CHECK, CHECK-NEXT, "
                      "CHECK-SAME)")


def _filecheck(checks: list[Check], text: str) -> None:
    if not checks:
        return
    fc = FileCheck()
    for c in checks:
        try:
            regex = _to_regex(c.kind, c.pattern)
        except GoldenError as e:
            raise GoldenError(f"line {c.line}: {e}") from None
        if regex is not None:
            fc = fc.check_regex(regex)
        elif c.kind == "CHECK":
            fc = fc.check(c.pattern)
        elif c.kind == "CHECK-NEXT":
            fc = fc.check_next(c.pattern)
        elif c.kind == "CHECK-SAME":
            fc = fc.check_same(c.pattern)
        elif c.kind == "CHECK-NOT":
            fc = fc.check_not(c.pattern)
        elif c.kind == "CHECK-DAG":
            fc = fc.check_dag(c.pattern)
        elif c.kind == "CHECK-COUNT":
            fc = fc.check_count(c.pattern, c.count)
    try:
        fc.run(text)
    except RuntimeError as e:
        raise GoldenError(str(e)) from None


def match_checks(checks: list[Check], text: str) -> None:
    """Run FileCheck directives over ``text``; CHECK-LABEL splits the text into blocks that the
    checks between labels must match within (LLVM semantics)."""
    labels = [i for i, c in enumerate(checks) if c.kind == "CHECK-LABEL"]
    if not labels:
        _filecheck(checks, text)
        return
    starts, pos = [], 0
    for i in labels:
        found = text.find(checks[i].pattern, pos)
        if found < 0:
            raise GoldenError(f"line {checks[i].line}: CHECK-LABEL: {checks[i].pattern!r} not "
                              "found (after the previous label)")
        starts.append(found)
        pos = found + len(checks[i].pattern)
    _filecheck(checks[:labels[0]], text[:starts[0]])
    for j, i in enumerate(labels):
        end = labels[j + 1] if j + 1 < len(labels) else len(checks)
        block = text[starts[j]: starts[j + 1] if j + 1 < len(starts) else len(text)]
        _filecheck([Check("CHECK", checks[i].pattern, checks[i].line)] + checks[i + 1:end], block)


class _Recorder(Instrument):
    def __init__(self) -> None:
        self.modified: list[tuple[str, bool]] = []

    def after_pass(self, p, gm, result):
        self.modified.append((p.display_name, result.modified))


def run_case(case: Case) -> str:
    """Run one case; returns the text the checks matched (raises GoldenError on mismatch)."""
    ns: dict[str, Any] = {"torch": torch, "nn": nn, "F": F, "__name__": f"golden_{case.index}",
                          "__file__": str(case.path)}
    exec(compile(case.source, str(case.path), "exec"), ns)
    build = ns.get("build")
    stream = io.StringIO()
    recorder = _Recorder()
    before = None
    try:
        if build is None:
            pm = PassManager.parse(case.run, assume=case.assume)  # type: ignore[arg-type]
            output = str(pm)
            gm = None
        else:
            model, inputs = build()
            gm = qpasses.trace(model, inputs)
            pm = PassManager.parse(case.run, assume=case.assume)  # type: ignore[arg-type]
            before = fingerprint(gm)
            with PassContext(example_inputs=inputs, print_stream=stream,
                             instruments=(recorder,)) as ctx:
                gm = pm.run(gm, ctx)
            output = stream.getvalue() + print_graph(gm)
    except PassesError as e:
        if not case.errors:
            raise GoldenError(f"unexpected {type(e).__name__}:\n{e}") from e
        message = str(e)
        missing = [s for s in case.errors if s not in message]
        if missing:
            raise GoldenError(f"expected the error to contain {missing[0]!r}; got "
                              f"{type(e).__name__}:\n{message}") from e
        match_checks(case.checks, message)
        return message
    if case.errors:
        raise GoldenError(f"expected an error containing {case.errors[0]!r}, but the pipeline "
                          f"succeeded; output:\n{output}")
    if case.unchanged:
        if build is None:
            raise GoldenError("CHECK-UNCHANGED needs a build() to run the pipeline on")
        changed = [name for name, mod in recorder.modified if mod]
        if changed:
            raise GoldenError(f"CHECK-UNCHANGED: {', '.join(changed)} reported modified=True")
        if fingerprint(gm) != before:  # type: ignore[arg-type]
            raise GoldenError("CHECK-UNCHANGED: the graph's fingerprint changed")
    try:
        match_checks(case.checks, output)
    except GoldenError as e:
        raise GoldenError(f"{e}\n--- output ---\n{output}") from None
    return output


# ---------------------------------------------------------------------------------------------
# pytest collection


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if (file_path.suffix == ".py" and file_path.parent != HERE
            and HERE in file_path.parents and not file_path.name.startswith(("_", "conftest"))
            and not file_path.name.startswith("test_")):
        return GoldenFile.from_parent(parent, path=file_path)
    return None


class GoldenFile(pytest.File):
    def collect(self):
        try:
            cases = parse_golden(self.path)
        except GoldenError as e:
            raise self.CollectError(str(e)) from None
        for case in cases:
            yield GoldenItem.from_parent(self, name=case.test_name, case=case)


class GoldenItem(pytest.Item):
    def __init__(self, *, case: Case, **kwargs: Any):
        super().__init__(**kwargs)
        self.case = case

    def runtest(self) -> None:
        run_case(self.case)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, GoldenError):
            return f"{self.case.path}:{self.case.first_line}: golden case " \
                   f"'{self.case.test_name}' failed\n  RUN: {self.case.run}\n{excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, self.case.first_line - 1, f"golden {self.path.parent.name}/" \
                                                     f"{self.path.name}::{self.case.test_name}"
