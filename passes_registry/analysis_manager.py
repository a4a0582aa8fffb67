"""Lazily computed, cached analyses, invalidated through a graph version the manager owns.

fx has no public mutation counter, so the manager keeps ``version``: it is bumped whenever a pass
reports ``modified=True``, and every cached result the pass did not preserve is dropped together
with every result that was computed from it (LLVM's Invalidator). Under verify-each each cache hit
is checked against a fingerprint of the aspects the analysis depends on, which catches graphs
mutated behind the manager's back (StaleAnalysisError).
"""
from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx

from . import registry
from .errors import AnalysisError, StaleAnalysisError
from .pass_base import ASPECTS, PreservedAnalyses
from .printing import fingerprint


class Analysis:
    """Base class of analyses: a pure ``compute(gm, am)`` whose result is cached by the manager.

    ``depends_on`` names the aspects of the graph the result is derived from (``structure``,
    ``annotations``, ``weights``); passes that touch none of them preserve it. Results should be
    immutable and comparable with ``==`` (the preservation checker compares them).
    """
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    depends_on: ClassVar[frozenset[str]] = ASPECTS

    def compute(self, gm: torch.fx.GraphModule, am: "AnalysisManager") -> Any:
        raise NotImplementedError

    def format(self, result: Any, gm: torch.fx.GraphModule) -> str:
        """Text shown by ``print<name>``."""
        return str(result)


@dataclass
class _Entry:
    result: Any
    version: int
    fingerprint: dict[str, str] | None
    uses: set[str] = field(default_factory=set)   # analyses this result was computed from


class AnalysisManager:
    """Caches analysis results for one GraphModule at a time."""

    def __init__(self, instruments: tuple = (), verify: bool = False):
        self.instruments = tuple(instruments)
        self.verify = verify
        self.version = 0
        self.stats: Counter[str] = Counter()
        self._cache: dict[str, _Entry] = {}
        self._gm_ref: weakref.ref | None = None
        self._computing: list[str] = []

    def _bind(self, gm: torch.fx.GraphModule) -> None:
        if self._gm_ref is None or self._gm_ref() is not gm:
            self._cache.clear()
            self._gm_ref = weakref.ref(gm)

    def get(self, analysis: str | type[Analysis], gm: torch.fx.GraphModule) -> Any:
        """The analysis result for ``gm``: cached if still valid, else computed now."""
        cls = registry.lookup_analysis(analysis) if isinstance(analysis, str) else analysis
        name = cls.name
        self._bind(gm)
        if self._computing:
            self._cache_uses(self._computing[-1]).add(name)
        if name in self._computing:
            raise AnalysisError(f"analysis '{name}' depends on itself: "
                                f"{' -> '.join(self._computing + [name])}")
        entry = self._cache.get(name)
        if entry is not None and entry.version == self.version:
            if self.verify and entry.fingerprint is not None:
                now = fingerprint(gm, cls.depends_on)
                if now != entry.fingerprint:
                    changed = sorted(k for k in now if now[k] != entry.fingerprint.get(k))
                    raise StaleAnalysisError(
                        f"cached analysis '{name}' is stale: the graph's {', '.join(changed)} "
                        "changed without the pass manager being told (a pass mutated the graph "
                        "and then queried an analysis, or returned modified=False after a change)")
            self.stats[f"{name}.hit"] += 1
            return entry.result
        self.stats[f"{name}.miss"] += 1
        for inst in self.instruments:
            inst.before_analysis(name, gm)
        self._computing.append(name)
        pending = self._cache.pop(name, None)
        self._cache[name] = _Entry(None, -1, None)  # placeholder collects dependencies
        try:
            result = cls().compute(gm, self)
        except BaseException:
            self._cache.pop(name, None)
            if pending is not None:
                self._cache[name] = pending
            raise
        finally:
            self._computing.pop()
        uses = self._cache[name].uses
        fp = fingerprint(gm, cls.depends_on) if self.verify else None
        self._cache[name] = _Entry(result, self.version, fp, uses)
        for inst in reversed(self.instruments):
            inst.after_analysis(name, gm)
        return result

    def _cache_uses(self, name: str) -> set[str]:
        return self._cache[name].uses

    def cached(self, analysis: str | type[Analysis]) -> Any | None:
        """The cached, still-valid result or None (never computes)."""
        name = analysis if isinstance(analysis, str) else analysis.name
        entry = self._cache.get(name)
        return entry.result if entry is not None and entry.version == self.version else None

    def cached_names(self) -> list[str]:
        return sorted(k for k, e in self._cache.items() if e.version == self.version)

    def invalidate(self, preserved: PreservedAnalyses, gm: torch.fx.GraphModule | None = None) -> None:
        """A pass modified the graph: bump the version, keep only what is (transitively) preserved."""
        self.version += 1
        keep: dict[str, bool] = {}

        def kept(name: str) -> bool:
            if name not in keep:
                keep[name] = False  # breaks cycles conservatively
                entry = self._cache.get(name)
                if entry is None:
                    keep[name] = False
                else:
                    cls = registry.lookup_analysis(name)
                    keep[name] = (preserved.preserves(name, frozenset(cls.depends_on))
                                  and all(kept(u) for u in entry.uses))
            return keep[name]

        for name in list(self._cache):
            if kept(name):
                entry = self._cache[name]
                entry.version = self.version
                if self.verify and gm is not None:
                    cls = registry.lookup_analysis(name)
                    entry.fingerprint = fingerprint(gm, cls.depends_on)
            else:
                del self._cache[name]

    def invalidate_all(self) -> None:
        self.invalidate(PreservedAnalyses.none())

    def forget(self, name: str) -> None:
        """Drop one analysis and everything computed from it (``invalidate<name>``)."""
        self.invalidate(PreservedAnalyses.of(*(n for n in self._cache if n != name)))
