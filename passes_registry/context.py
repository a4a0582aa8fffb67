"""PassContext: what a pipeline run needs besides the graph (inputs, data, debugging flags).

A frozen dataclass and a context manager (TVM's PassContext stack, through contextvars)::

    with PassContext(example_inputs=(x,), calibration_data=loader, timing=True):
        gm = pm.run(gm)
"""
from __future__ import annotations

import contextvars
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TextIO

ALL = "all"

_STACK: contextvars.ContextVar[tuple["PassContext", ...]] = contextvars.ContextVar(
    "passes_registry_context", default=())


def _names(value: Any, what: str) -> frozenset[str] | str:
    if value == ALL or value is True:
        return ALL
    if value in (None, False):
        return frozenset()
    if isinstance(value, str):
        return frozenset(v for v in value.split(",") if v)
    try:
        return frozenset(value)
    except TypeError:
        raise TypeError(f"PassContext.{what} must be 'all', a pass name or a collection of "
                        f"pass names, got {value!r}") from None


@dataclass(frozen=True)
class PassContext:
    """Inputs and flags of one pipeline run. All fields are optional."""
    example_inputs: tuple | None = None
    calibration_data: Any = None
    instruments: tuple = ()
    verify_each: bool = True
    check_preservation: bool = False
    print_before: frozenset[str] | str = frozenset()
    print_after: frozenset[str] | str = frozenset()
    print_after_change: bool = False
    print_after_failure: bool = False
    print_stream: TextIO | None = None
    timing: bool = False
    statistics: bool = False
    disabled: frozenset[str] = frozenset()
    bisect_limit: int | None = None
    reproducer_dir: str | None = None
    progress: bool = False
    seed: int = 0
    config: Mapping[str, Any] = field(default_factory=dict)
    _tokens: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.example_inputs is not None and not isinstance(self.example_inputs, tuple):
            ex = self.example_inputs
            object.__setattr__(self, "example_inputs", tuple(ex) if isinstance(ex, list) else (ex,))
        object.__setattr__(self, "instruments", tuple(self.instruments))
        object.__setattr__(self, "print_before", _names(self.print_before, "print_before"))
        object.__setattr__(self, "print_after", _names(self.print_after, "print_after"))
        disabled = _names(self.disabled, "disabled")
        object.__setattr__(self, "disabled", frozenset() if disabled == ALL else disabled)
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))
        if self.bisect_limit is not None and self.bisect_limit < 0:
            raise ValueError("PassContext.bisect_limit must be >= 0")

    @property
    def stream(self) -> TextIO:
        return self.print_stream if self.print_stream is not None else sys.stdout

    @staticmethod
    def current() -> "PassContext":
        """The innermost active context, or a default one."""
        stack = _STACK.get()
        return stack[-1] if stack else PassContext()

    def __enter__(self) -> "PassContext":
        self._tokens.append(_STACK.set(_STACK.get() + (self,)))
        return self

    def __exit__(self, *exc: Any) -> None:
        _STACK.reset(self._tokens.pop())
