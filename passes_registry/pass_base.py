"""The Pass protocol: stateless classes with declared options, properties and preserved analyses.

Modelled on MLIR's ``OperationPass`` (stateless, declared options, ``markAnalysesPreserved``) and
LLVM's new pass manager (``run`` returns what it preserved). Passes mutate the GraphModule in place
(torch.fx convention) and report whether they did; the manager lints, recompiles and invalidates.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from .errors import OptionError
from .options import NoOptions, build_options, format_options

if TYPE_CHECKING:  # pragma: no cover
    import torch.fx

    from .analysis_manager import AnalysisManager
    from .context import PassContext

# What an analysis may depend on. A pass that touches only some aspects preserves every analysis
# that depends on none of them (LLVM's CFGAnalyses set, generalised). "records": the registered
# graph records in ``gm.meta``.
ASPECTS = frozenset({"structure", "annotations", "weights", "records"})


@dataclass(frozen=True)
class PreservedAnalyses:
    """Which cached analyses stay valid after a pass.

    ``all()``: everything; ``none()``: nothing; ``of("bitops", ...)``: the named analyses;
    ``unaffected_by("annotations")``: every analysis whose ``depends_on`` avoids those aspects.
    Sets combine with ``|``.
    """
    everything: bool = False
    names: frozenset[str] = frozenset()
    touched_aspects: frozenset[str] | None = None

    @staticmethod
    def all() -> "PreservedAnalyses":
        return PreservedAnalyses(everything=True)

    @staticmethod
    def none() -> "PreservedAnalyses":
        return PreservedAnalyses()

    @staticmethod
    def of(*names: str) -> "PreservedAnalyses":
        return PreservedAnalyses(names=frozenset(names))

    @staticmethod
    def unaffected_by(*aspects: str) -> "PreservedAnalyses":
        unknown = set(aspects) - ASPECTS
        if unknown:
            raise ValueError(f"unknown aspects {sorted(unknown)}; valid: {sorted(ASPECTS)}")
        return PreservedAnalyses(touched_aspects=frozenset(aspects))

    def __or__(self, other: "PreservedAnalyses") -> "PreservedAnalyses":
        if self.everything or other.everything:
            return PreservedAnalyses.all()
        if self.touched_aspects is None:
            touched = other.touched_aspects
        elif other.touched_aspects is None:
            touched = self.touched_aspects
        else:  # an analysis survives if either set keeps it: it must avoid the smaller touch set
            touched = self.touched_aspects & other.touched_aspects
        return PreservedAnalyses(names=self.names | other.names, touched_aspects=touched)

    def preserves(self, name: str, depends_on: frozenset[str]) -> bool:
        if self.everything or name in self.names:
            return True
        return self.touched_aspects is not None and not (depends_on & self.touched_aspects)


@dataclass(frozen=True)
class PassResult:
    """What a pass did. ``preserved=None`` means the pass class's ``preserves`` claim."""
    modified: bool
    preserved: PreservedAnalyses | None = None
    stats: Mapping[str, int] = field(default_factory=dict)


class Pass:
    """Base class of every pass. Subclasses set the class attributes and implement :meth:`run`.

    Instances are immutable: they hold only their options, so one instance may run on many graphs.

    Graph records (registered ``gm.meta`` keys) a pass touches are declared like properties:
    ``requires_records`` must be present when it runs (checked by the manager at run time),
    ``reads_records`` change what it does when present, ``writes_records`` are the only records
    it may set or remove (checked under verify-each).
    """
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[frozenset[str]] = frozenset()
    establishes: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    preserves: ClassVar[PreservedAnalyses] = PreservedAnalyses.none()
    requires_records: ClassVar[frozenset[str]] = frozenset()
    reads_records: ClassVar[frozenset[str]] = frozenset()
    writes_records: ClassVar[frozenset[str]] = frozenset()
    # A required pass is never skipped by --disable-pass or bisection (LLVM's isRequired).
    required: ClassVar[bool] = False

    __slots__ = ("options",)

    def __init__(self, options: Any = None, **kwargs: Any):
        if options is None:
            options = build_options(self.name, self.Options, kwargs)
        elif kwargs:
            raise OptionError(self.name, None, "pass either an Options instance or keywords, not both")
        elif not isinstance(options, self.Options):
            raise OptionError(self.name, None, f"options must be {self.Options.__qualname__}, "
                                               f"got {type(options).__name__}")
        object.__setattr__(self, "options", options)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"pass '{self.name}' is stateless: it cannot set attribute '{key}'")

    def run(self, gm: "torch.fx.GraphModule", ctx: "PassContext",
            am: "AnalysisManager") -> PassResult:
        raise NotImplementedError(f"pass '{self.name}' does not implement run()")

    @property
    def display_name(self) -> str:
        return self.name

    def to_text(self) -> str:
        """Canonical pipeline text of this pass with all its options."""
        return self.display_name + format_options(self.options)

    def replace(self, **changes: Any) -> "Pass":
        return type(self)(dataclasses.replace(self.options, **changes))

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options == other.options  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.options))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.to_text()}>"


class ParametricPass(Pass):
    """A pass whose textual name carries a parameter: ``print<bitops>``, ``require<acc-width>``."""
    __slots__ = ("param",)

    def __init__(self, param: str, options: Any = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        object.__setattr__(self, "param", param)

    @property
    def display_name(self) -> str:
        return f"{self.name}<{self.param}>"

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other) and self.param == other.param  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.param, self.options))


def function_pass(name: str, *, summary: str = "", requires: frozenset[str] = frozenset(),
                  establishes: frozenset[str] = frozenset(),
                  invalidates: frozenset[str] = frozenset(),
                  preserves: PreservedAnalyses = PreservedAnalyses.none(),
                  register: bool = True) -> Callable[[Callable[..., Any]], type[Pass]]:
    """Turn ``fn(gm, ctx, am) -> bool | PassResult`` into a registered, option-less Pass class."""
    def wrap(fn: Callable[..., Any]) -> type[Pass]:
        def run(self: Pass, gm: Any, ctx: Any, am: Any) -> PassResult:
            out = fn(gm, ctx, am)
            return out if isinstance(out, PassResult) else PassResult(modified=bool(out))

        doc = fn.__doc__ or summary
        cls = type(_class_name(name), (Pass,), {
            "name": name, "summary": summary or (doc.strip().splitlines()[0] if doc else ""),
            "requires": frozenset(requires), "establishes": frozenset(establishes),
            "invalidates": frozenset(invalidates), "preserves": preserves, "run": run,
            "__doc__": doc, "__module__": fn.__module__, "__slots__": (),
        })
        if register:
            from .registry import register_pass
            register_pass(cls)
        return cls
    return wrap


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-")) + "Pass"
