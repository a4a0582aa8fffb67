"""One hierarchy for every error the pass infrastructure raises.

Each error is a user-facing message: it names the pass, option, node or position involved and says
what to do. qpasses derives its own errors from :class:`PassesError` so callers can catch one base.
"""
from __future__ import annotations


class PassesError(Exception):
    """Base of every error raised by passes_registry and qpasses."""


class RegistryError(PassesError):
    """A pass, analysis, pipeline or property was registered twice or looked up under a bad name."""


class PipelineParseError(PassesError):
    """A textual pipeline is malformed; the message carries line:column and a caret."""

    def __init__(self, message: str, text: str = "", pos: int | None = None):
        self.text = text
        self.pos = pos
        self.reason = message
        if pos is not None and text:
            line_no = text.count("\n", 0, pos) + 1
            line_start = text.rfind("\n", 0, pos) + 1
            line_end = text.find("\n", pos)
            line = text[line_start: None if line_end < 0 else line_end]
            col = pos - line_start + 1
            self.line, self.column = line_no, col
            message = f"pipeline:{line_no}:{col}: error: {message}\n  {line}\n  {' ' * (col - 1)}^"
        else:
            self.line = self.column = None
            message = f"pipeline: error: {message}"
        Exception.__init__(self, message)


class OptionError(PassesError, ValueError):
    """An option name, type or value is invalid for a pass."""

    def __init__(self, pass_name: str, option: str | None, reason: str):
        self.pass_name, self.option, self.reason = pass_name, option, reason
        where = f"option '{option}' of pass '{pass_name}'" if option else f"pass '{pass_name}'"
        Exception.__init__(self, f"{where}: {reason}")


class UsageError(PassesError, TypeError, ValueError):
    """An API was called with an argument of the wrong kind or value (``PassManager.run`` given an
    ``nn.Module``, a bad ``assume=``, an unknown pass name in ``PassContext(disabled=...)``). The
    message names the argument and says what to pass; ``argument`` holds its name."""

    def __init__(self, message: str, *, argument: str | None = None):
        self.argument, self.reason = argument, message
        Exception.__init__(self, message)


class PropertyError(PassesError):
    """A pass requires an IR property that no earlier pipeline element establishes, or a checker failed."""


class RecordError(PassesError):
    """A graph record is unregistered, of the wrong type, invalid, or missing for a pass that
    requires it (the message names the pass, the record and what to run first)."""

    def __init__(self, message: str, *, record: str | None = None, pass_name: str | None = None):
        self.record, self.pass_name = record, pass_name
        Exception.__init__(self, message)


class PassFailure(PassesError):
    """A pass failed. Raised by passes; the manager re-raises it with pass name, position and pipeline."""

    def __init__(self, message: str, node: str | None = None, *, pass_name: str | None = None,
                 position: int | None = None, pipeline: str | None = None,
                 reproducer: str | None = None):
        self.reason = message
        self.node, self.pass_name, self.position = node, pass_name, position
        self.pipeline, self.reproducer = pipeline, reproducer
        Exception.__init__(self, self._format())

    def _format(self) -> str:
        msg = self.reason
        if self.node is not None:
            msg = f"at node '{self.node}': {msg}"
        if self.pass_name is not None:
            where = f"pass '{self.pass_name}'"
            if self.position is not None:
                where += f" (element {self.position} of the pipeline)"
            msg = f"{where} failed: {msg}"
        if self.pipeline is not None:
            msg += f"\n  pipeline: {self.pipeline}"
        if self.reproducer is not None:
            msg += f"\n  reproducer: {self.reproducer}"
        return msg

    def with_context(self, *, pass_name: str, position: int, pipeline: str,
                     reproducer: str | None = None) -> "PassFailure":
        """A copy of this failure that also names where in the pipeline it happened."""
        err = type(self).__new__(type(self))
        PassFailure.__init__(err, self.reason, self.node, pass_name=pass_name, position=position,
                             pipeline=pipeline, reproducer=reproducer)
        return err


class VerificationError(PassFailure):
    """verify-each found a broken graph, annotation or property after a pass."""


class AnalysisError(PassesError):
    """An analysis is unknown or failed to compute."""


class StaleAnalysisError(AnalysisError):
    """A cached analysis no longer matches the graph: something mutated it outside the pass manager."""
