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

from .errors import PassesError, UsageError
from .suggest import did_you_mean

ALL = "all"

_STACK: contextvars.ContextVar[tuple["PassContext", ...]] = contextvars.ContextVar(
    "passes_registry_context", default=())


def _names(value: Any, what: str) -> frozenset[str] | str:
    if value == ALL or value is True:
        return ALL
    if value in (None, False):
        return frozenset()
    try:
        names = (frozenset(v.strip() for v in value.split(",") if v.strip())
                 if isinstance(value, str) else frozenset(value))
    except TypeError:
        raise UsageError(f"PassContext.{what} must be 'all', a pass name or a collection of "
                         f"pass names, got {value!r}", argument=what) from None
    for name in sorted(names, key=str):
        _check_pass_name(name, what)
    return names


def _check_pass_name(name: Any, what: str) -> None:
    """``name`` must select a registered pass: ``fold-batch-norm`` or ``print<bitops>``."""
    from . import registry  # registry imports pass_base, which must not import this module first

    if not isinstance(name, str):
        raise UsageError(f"PassContext.{what}: pass names are strings, got {name!r}",
                         argument=what)
    base, _, param = name.partition("<")
    try:
        cls = registry.lookup_pass(base)
    except PassesError:
        cls = None
    if cls is not None:
        from .pass_base import ParametricPass

        if not param or (issubclass(cls, ParametricPass) and param.endswith(">")
                         and param[:-1] in registry.analysis_names()):
            return
    known = [n for n in registry.pass_names() if not n.startswith("test-")
             or name.startswith("test-")]
    raise UsageError(f"PassContext.{what}: '{name}' is not a registered pass"
                     + did_you_mean(name, known), argument=what)


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
    # On failure, leave the input graph as it was before the run: the passes run on a deep copy
    # that is committed into the GraphModule only on success. Off by default for the Python API
    # (it costs one copy of the graph and its weights while the run lasts); the tools turn it on.
    rollback: bool = False
    seed: int = 0
    config: Mapping[str, Any] = field(default_factory=dict)
    _tokens: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.example_inputs is not None and not isinstance(self.example_inputs, tuple):
            ex = self.example_inputs
            object.__setattr__(self, "example_inputs", tuple(ex) if isinstance(ex, list) else (ex,))
        for i, x in enumerate(self.example_inputs or ()):
            if not (x is None or isinstance(x, (bool, int, float)) or _is_tensor(x)):
                raise UsageError(
                    f"PassContext.example_inputs must be a tensor or a tuple of tensors (one per "
                    f"graph input, e.g. (torch.randn(1, 3, 224, 224),)); input {i} is a "
                    f"{type(x).__name__}: {x!r:.60}", argument="example_inputs")
        object.__setattr__(self, "instruments", tuple(self.instruments))
        object.__setattr__(self, "print_before", _names(self.print_before, "print_before"))
        object.__setattr__(self, "print_after", _names(self.print_after, "print_after"))
        disabled = _names(self.disabled, "disabled")
        object.__setattr__(self, "disabled", frozenset() if disabled == ALL else disabled)
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))
        limit = self.bisect_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 0):
            raise UsageError(f"PassContext.bisect_limit must be None or an int >= 0, got "
                             f"{limit!r}", argument="bisect_limit")

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


def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)
