"""The benchmark harness of tools/bench.py: sections register with :func:`benchmark`, run, and
print as tables.

A section is a function ``fn(config) -> Section`` (rows of measurements plus notes) registered
under a name; :func:`run_sections` runs the selected ones and :func:`format_sections` prints them.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tabulate import tabulate


@dataclass
class Row:
    """One measured quantity: all run times (seconds) and their median."""
    section: str
    what: str
    times: list[float]
    ratio: float | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["median_s"] = self.median
        d["min_s"] = min(self.times) if self.times else None
        return d


@dataclass
class Section:
    name: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    ratio_label: str = "ratio vs torch.ao"


BENCHMARKS: dict[str, tuple[str, Callable[[argparse.Namespace], Section]]] = {}


def benchmark(name: str, description: str) -> Callable:
    """Register a benchmark section ``fn(config) -> Section`` under ``name``."""
    def wrap(fn: Callable[[argparse.Namespace], Section]) -> Callable:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark '{name}' registered twice")
        BENCHMARKS[name] = (description, fn)
        return fn
    return wrap



def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def format_sections(sections: Sequence[Section]) -> str:
    out = []
    for sec in sections:
        desc = BENCHMARKS.get(sec.name, ("", None))[0]
        out.append(f"== {sec.name}: {desc}")
        if sec.skipped:
            out.append(f"   skipped: {sec.skipped}")
            continue
        rows = [[r.what, f"{r.median:.4f}", f"{min(r.times):.4f}",
                 "" if r.ratio is None else f"{r.ratio:.2f}"] for r in sec.rows]
        out.append(tabulate(rows, headers=["measure", "median s", "min s", sec.ratio_label],
                            disable_numparse=True, colalign=("left", "right", "right", "right")))
        out += [f"   {n}" for n in sec.notes]
    return "\n".join(out)


def run_sections(cfg: argparse.Namespace) -> list[Section]:
    names = cfg.only or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; available: {', '.join(BENCHMARKS)}")
    return [BENCHMARKS[n][1](cfg) for n in names]

