"""Textual pipelines: two-phase parse (structure, then resolution) and canonical printing.

Grammar (MLIR's, plus options on nested combinators)::

    pipeline ::= 'graph' '(' elements ')' | elements
    elements ::= element (',' element)*
    element  ::= name ('<' name '>')? options? ('(' elements ')')?
    options  ::= '{' (key ('=' value)?)* '}'          # separated by spaces; a bare key means true
    value    ::= quoted | '[' values ']' | '{' values '}' | atom (',' atom)*

Phase 1 builds a tree of raw elements with source positions; phase 2 resolves names (pipelines,
then passes, then combinators) and converts option values through the pass's options dataclass.
Every error is a PipelineParseError with line:column and a caret. ``parse(print(p)) == p``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from . import registry
from .errors import OptionError, PipelineParseError, RegistryError
from .options import QuotedStr, RawValue, build_options, format_options
from .pass_base import ParametricPass, Pass
from .suggest import did_you_mean

_NAME_RE = re.compile(r"[a-z][a-z0-9-]*")
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_ATOM_STOP = set(" \t\r\n{}[](),=\"'")
_BARE = object()  # a bare option key: means true for bools
# Bounds that keep a typo from building a pipeline that recurses or runs forever.
MAX_NESTING = 64        # nested bodies / option lists inside one another
MAX_ITERATIONS = 1000   # repeat{count}, fixpoint{max-iterations}


class OptionParseError(PipelineParseError, OptionError):
    """An option in pipeline text is unknown or has a bad value: both a parse and an option error."""

    def __init__(self, err: OptionError, text: str, pos: int | None):
        PipelineParseError.__init__(self, str(err), text, pos)
        self.pass_name, self.option = err.pass_name, err.option


# ---------------------------------------------------------------------------------------------
# Combinators: elements with a nested pipeline body


@dataclass(frozen=True)
class FixpointOptions:
    max_iterations: int = field(default=8, metadata={
        "help": "run the body at most this many times; not reaching a fixpoint is an error "
                "under verify-each and a warning otherwise"})

    def __post_init__(self) -> None:
        if self.max_iterations < 1:
            raise ValueError("max-iterations must be >= 1")
        if self.max_iterations > MAX_ITERATIONS:
            raise ValueError(f"max-iterations must be <= {MAX_ITERATIONS}, got "
                             f"{self.max_iterations}")


@dataclass(frozen=True)
class RepeatOptions:
    count: int = field(default=2, metadata={"help": "how many times to run the body"})

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("count must be >= 1")
        if self.count > MAX_ITERATIONS:
            raise ValueError(f"count must be <= {MAX_ITERATIONS}, got {self.count} (for more, "
                             "nest repeats or loop over PassManager.run in Python)")


COMBINATORS: dict[str, type] = {"fixpoint": FixpointOptions, "repeat": RepeatOptions}


@dataclass(frozen=True)
class Nested:
    """A combinator element: ``fixpoint{max-iterations=4}(a,b)``."""
    combinator: str
    options: Any
    body: tuple["Element", ...]

    def to_text(self) -> str:
        return (self.combinator + format_options(self.options)
                + "(" + ",".join(e.to_text() for e in self.body) + ")")


@dataclass(frozen=True)
class NamedPipeline(Nested):
    """A registered ``keep_name`` pipeline as one element: ``body`` is its expansion, run once;
    it prints as ``name{options}`` so that ``parse(print(p)) == p``."""

    @property
    def name(self) -> str:
        return self.combinator

    def to_text(self) -> str:
        return self.combinator + format_options(self.options)


Element = Pass | Nested


@dataclass(frozen=True)
class Pipeline:
    """A resolved pipeline: a tuple of configured passes and combinators."""
    elements: tuple[Element, ...]

    def to_text(self) -> str:
        return "graph(" + ",".join(e.to_text() for e in self.elements) + ")"

    def __str__(self) -> str:
        return self.to_text()

    def flat_passes(self) -> list[Pass]:
        """Every pass in execution order of one sweep (combinator bodies inlined once)."""
        out: list[Pass] = []

        def walk(elems: tuple[Element, ...]) -> None:
            for e in elems:
                if isinstance(e, Nested):
                    walk(e.body)
                else:
                    out.append(e)
        walk(self.elements)
        return out


# ---------------------------------------------------------------------------------------------
# Phase 1: structure


@dataclass
class _RawOption:
    key: str
    key_pos: int
    value: Any          # RawValue or _BARE
    value_pos: int


@dataclass
class _RawElement:
    name: str
    pos: int
    param: str | None = None
    param_pos: int = 0
    options: list[_RawOption] | None = None
    options_pos: int = 0
    body: list["_RawElement"] | None = None
    body_pos: int = 0


class _Parser:
    """Phase 1 of parsing: a recursive-descent parser from pipeline text to the structure (names,
    raw options, nesting) with source positions for error carets; name resolution and typed
    options come after."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.depth = 0  # open '(' bodies and option lists

    def enter(self, open_pos: int) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(f"nesting deeper than {MAX_NESTING} levels", open_pos)

    def error(self, message: str, pos: int | None = None) -> PipelineParseError:
        return PipelineParseError(message, self.text, self.pos if pos is None else pos)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def parse(self) -> list[_RawElement]:
        self.skip_ws()
        if self.pos >= len(self.text):
            raise self.error("empty pipeline: expected at least one pass, e.g. graph(dce)", 0)
        elements = self.elements(closing="")
        self.skip_ws()
        if self.pos < len(self.text):
            c = self.peek()
            if c == ")":
                raise self.error("unbalanced ')': no matching '('")
            if c == "}":
                raise self.error("unbalanced '}': no matching '{'")
            raise self.error(f"expected ',' between pipeline elements, found '{c}'")
        # The 'graph(...)' anchor is the canonical spelling of a top-level pipeline.
        if len(elements) == 1 and elements[0].name == "graph" and elements[0].body is not None:
            anchor = elements[0]
            if anchor.param is not None or anchor.options is not None:
                raise self.error("the 'graph' anchor takes neither options nor parameters",
                                 anchor.pos)
            if not anchor.body:
                raise self.error("empty pipeline: expected at least one pass inside graph(...)",
                                 anchor.body_pos)
            return anchor.body
        return elements

    def elements(self, closing: str) -> list[_RawElement]:
        out = [self.element()]
        while True:
            self.skip_ws()
            if self.peek() != ",":
                return out
            self.pos += 1
            self.skip_ws()
            if self.peek() in (")", ""):
                raise self.error("expected a pass name after ','")
            out.append(self.element())

    def element(self) -> _RawElement:
        self.skip_ws()
        m = _NAME_RE.match(self.text, self.pos)
        if not m:
            c = self.peek()
            if c == "":
                raise self.error("unexpected end of pipeline: expected a pass name")
            if c.isupper():
                raise self.error(f"pass names are lower-case kebab-case, found '{c}'")
            raise self.error(f"expected a pass name, found '{c}'")
        el = _RawElement(name=m.group(0), pos=self.pos)
        self.pos = m.end()
        if self.peek() == "<":
            start = self.pos
            self.pos += 1
            pm = _NAME_RE.match(self.text, self.pos)
            if not pm:
                raise self.error(f"expected an analysis name after '<' in '{el.name}<...>'")
            el.param, el.param_pos = pm.group(0), self.pos
            self.pos = pm.end()
            if self.peek() != ">":
                raise self.error("unbalanced '<': missing '>'", start)
            self.pos += 1
        self.skip_ws()
        if self.peek() == "{":
            el.options_pos = self.pos
            el.options = self.options()
            self.skip_ws()
        if self.peek() == "(":
            el.body_pos = self.pos
            self.enter(self.pos)
            self.pos += 1
            self.skip_ws()
            if self.peek() == ")":
                el.body = []
            else:
                el.body = self.elements(closing=")")
                self.skip_ws()
            if self.peek() != ")":
                if self.peek() == "":
                    raise self.error("unbalanced '(': missing ')'", el.body_pos)
                if self.peek() == "}":
                    raise self.error("unbalanced '}': no matching '{'")
                raise self.error(f"expected ',' or ')', found '{self.peek()}'")
            self.pos += 1
            self.depth -= 1
        return el

    def options(self) -> list[_RawOption]:
        open_pos = self.pos
        self.pos += 1
        out: list[_RawOption] = []
        while True:
            self.skip_ws()
            c = self.peek()
            if c == "}":
                self.pos += 1
                return out
            if c == "":
                raise self.error("unbalanced '{': missing '}'", open_pos)
            m = _KEY_RE.match(self.text, self.pos)
            if not m:
                if c in "),":
                    raise self.error(f"unbalanced '{{': missing '}}' before '{c}'", open_pos)
                raise self.error(f"expected an option name, found '{c}'")
            key_pos = self.pos
            self.pos = m.end()
            if self.peek() == "=":
                self.pos += 1
                value_pos = self.pos
                value = self.value(top=True)
            else:
                if self.peek() not in ("}", "") and not self.peek().isspace():
                    raise self.error(f"expected '=', a space or '}}' after option "
                                     f"'{m.group(0)}', found '{self.peek()}'")
                value_pos, value = key_pos, _BARE
            out.append(_RawOption(m.group(0), key_pos, value, value_pos))

    def value(self, top: bool) -> RawValue:
        c = self.peek()
        if c in ('"', "'"):
            return self.quoted()
        if c in ("[", "{"):
            close = "]" if c == "[" else "}"
            open_pos = self.pos
            self.enter(open_pos)
            self.pos += 1
            items: list[RawValue] = []
            self.skip_ws()
            if self.peek() == close:
                self.pos += 1
                self.depth -= 1
                return items
            while True:
                self.skip_ws()
                items.append(self.value(top=False))
                self.skip_ws()
                if self.peek() == ",":
                    self.pos += 1
                    continue
                if self.peek() == close:
                    self.pos += 1
                    self.depth -= 1
                    return items
                if self.peek() == "":
                    raise self.error(f"unbalanced '{c}': missing '{close}'", open_pos)
                raise self.error(f"expected ',' or '{close}' in list, found '{self.peek()}'")
        atom = self.atom()
        if top and self.peek() == ",":  # k=1,2,3 is a list
            items = [atom]
            while self.peek() == ",":
                self.pos += 1
                items.append(self.atom())
            return items
        return atom

    def atom(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _ATOM_STOP:
            self.pos += 1
        if self.pos == start:
            c = self.peek()
            raise self.error("missing option value" + (f", found '{c}'" if c.strip() else ""))
        return self.text[start:self.pos]

    def quoted(self) -> QuotedStr:
        quote, start = self.peek(), self.pos
        self.pos += 1
        out = []
        while True:
            if self.pos >= len(self.text):
                raise self.error(f"unterminated string: missing closing {quote}", start)
            c = self.text[self.pos]
            if c == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            self.pos += 1
            if c == quote:
                return QuotedStr("".join(out))
            out.append(c)


# ---------------------------------------------------------------------------------------------
# Phase 2: resolution


def _build(owner: str, options_cls: type, raw: _RawElement, text: str) -> Any:
    values: dict[str, Any] = {}
    positions: dict[str, _RawOption] = {}
    for opt in raw.options or ():
        key = opt.key.replace("_", "-")
        if key in values:
            raise PipelineParseError(f"option '{key}' of '{owner}' given more than once",
                                     text, opt.key_pos)
        positions[key] = opt
        values[key] = opt.value
    # A bare key means true; for a non-bool option report a missing value, not a bad bool.
    for key, opt in positions.items():
        if opt.value is _BARE:
            values[key] = "true"
    try:
        return build_options(owner, options_cls, values, from_text=True)
    except OptionError as err:
        opt = positions.get(err.option or "")
        if opt is None:
            pos = raw.options_pos if raw.options is not None else raw.pos
        elif opt.value is _BARE and "expected bool" not in str(err):
            raise OptionParseError(OptionError(owner, opt.key, "needs a value (bare keys are "
                                               "only for bool options)"), text, opt.key_pos)
        elif "no such option" in err.reason:
            pos = opt.key_pos
        else:
            pos = opt.value_pos
        raise OptionParseError(err, text, pos) from None


def _resolve(raws: list[_RawElement], text: str, depth: int = 0) -> tuple[Element, ...]:
    out: list[Element] = []
    for raw in raws:
        if raw.body is not None:
            if raw.name not in COMBINATORS:
                raise PipelineParseError(
                    f"'{raw.name}' does not take a nested pipeline (only "
                    f"{', '.join(sorted(COMBINATORS))} do)", text, raw.body_pos)
            if not raw.body:
                raise PipelineParseError(f"'{raw.name}' needs at least one element in its body",
                                         text, raw.body_pos)
            opts = _build(raw.name, COMBINATORS[raw.name], raw, text)
            out.append(Nested(raw.name, opts, _resolve(raw.body, text, depth + 1)))
            continue
        if raw.name in COMBINATORS:
            raise PipelineParseError(f"'{raw.name}' needs a nested pipeline: "
                                     f"{raw.name}(pass-a,pass-b)", text, raw.pos)
        pipe = registry.lookup_pipeline(raw.name)
        if pipe is not None and raw.param is None:
            opts = _build(raw.name, pipe.Options, raw, text)
            out.extend(pipeline_elements(pipe, opts))
            continue
        try:
            cls = registry.lookup_pass(raw.name)
        except RegistryError:
            known = registry.pass_names() + registry.pipeline_names() + sorted(COMBINATORS)
            if not raw.name.startswith("test-"):  # test-only passes are not suggested to users
                known = [k for k in known if not k.startswith("test-")]
            raise PipelineParseError(f"'{raw.name}' does not refer to a registered pass or "
                                     f"pipeline" + did_you_mean(raw.name, known),
                                     text, raw.pos) from None
        is_param = issubclass(cls, ParametricPass)
        if is_param and raw.param is None:
            raise PipelineParseError(f"'{raw.name}' needs an analysis: {raw.name}<NAME> "
                                     f"(analyses: {', '.join(registry.analysis_names())})",
                                     text, raw.pos)
        if not is_param and raw.param is not None:
            raise PipelineParseError(f"pass '{raw.name}' takes no <parameter>", text,
                                     raw.param_pos)
        opts = _build(raw.name, cls.Options, raw, text)
        if is_param:
            if raw.param not in registry.analysis_names():
                raise PipelineParseError(
                    f"'{raw.param}' does not refer to a registered analysis"
                    + did_you_mean(raw.param, registry.analysis_names()), text, raw.param_pos)
            out.append(cls(raw.param, opts))
        else:
            out.append(cls(opts))
    return tuple(out)


def expand_pipeline(pipe: registry.PipelineDef, opts: Any) -> tuple[Element, ...]:
    """The elements a registered pipeline builds for ``opts``."""
    built = pipe.builder(opts)
    if isinstance(built, str):
        return parse_pipeline(built).elements
    if isinstance(built, Pipeline):
        return built.elements
    return tuple(built)


def pipeline_elements(pipe: registry.PipelineDef, opts: Any) -> tuple[Element, ...]:
    """What a use of a registered pipeline contributes to a pipeline: its expansion, or one
    :class:`NamedPipeline` holding it (``keep_name``)."""
    body = expand_pipeline(pipe, opts)
    return (NamedPipeline(pipe.name, opts, body),) if pipe.keep_name else body


def parse_pipeline(text: str) -> Pipeline:
    """Parse pipeline text into a resolved :class:`Pipeline` (raises PipelineParseError)."""
    if not isinstance(text, str):
        raise PipelineParseError(f"a pipeline must be a string, got {type(text).__name__}")
    parser = _Parser(text)
    try:
        raws = parser.parse()
        return Pipeline(_resolve(raws, text))
    except RecursionError:  # a safety net: MAX_NESTING normally stops deep text first
        raise PipelineParseError("pipeline nested too deeply", text,
                                 min(parser.pos, len(text) - 1)) from None


def print_pipeline(pipeline: Pipeline) -> str:
    """Canonical text: ``graph(...)``, no spaces between elements, all options sorted."""
    return pipeline.to_text()
