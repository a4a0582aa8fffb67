"""Pass instrumentation: hooks around passes and analyses, and the standard instruments.

Hooks are the union of MLIR's PassInstrumentation and TVM's (``should_run``). "before" hooks run
in registration order, "after" hooks in reverse (MLIR).
"""
from __future__ import annotations

import json
import os
import shlex
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import torch
import torch.fx

from . import registry
from .printing import fingerprint, print_graph

if TYPE_CHECKING:  # pragma: no cover
    from .pass_base import Pass, PassResult


class Instrument:
    """Base class: override the hooks you need."""

    def on_pipeline_start(self, pipeline: str, gm: torch.fx.GraphModule) -> None: ...
    def on_pipeline_end(self, pipeline: str, gm: torch.fx.GraphModule) -> None: ...
    def should_run(self, p: "Pass", gm: torch.fx.GraphModule) -> bool:
        return True
    def before_pass(self, p: "Pass", gm: torch.fx.GraphModule) -> None: ...
    def after_pass(self, p: "Pass", gm: torch.fx.GraphModule, result: "PassResult") -> None: ...
    def after_pass_failed(self, p: "Pass", gm: torch.fx.GraphModule, exc: BaseException) -> None: ...
    def before_analysis(self, name: str, gm: torch.fx.GraphModule) -> None: ...
    def after_analysis(self, name: str, gm: torch.fx.GraphModule) -> None: ...


@dataclass
class TimingRecord:
    name: str
    seconds: float
    kind: str = "pass"   # "pass" or "analysis"


class Timing(Instrument):
    """Wall-clock time of every pass and analysis, in execution order."""

    def __init__(self) -> None:
        self.records: list[TimingRecord] = []
        self._starts: list[float] = []

    def before_pass(self, p: "Pass", gm: torch.fx.GraphModule) -> None:
        self._starts.append(time.perf_counter())

    def after_pass(self, p: "Pass", gm: torch.fx.GraphModule, result: "PassResult") -> None:
        self.records.append(TimingRecord(p.display_name, time.perf_counter() - self._starts.pop()))

    def after_pass_failed(self, p: "Pass", gm: torch.fx.GraphModule, exc: BaseException) -> None:
        self.records.append(TimingRecord(p.display_name, time.perf_counter() - self._starts.pop()))

    def before_analysis(self, name: str, gm: torch.fx.GraphModule) -> None:
        self._starts.append(time.perf_counter())

    def after_analysis(self, name: str, gm: torch.fx.GraphModule) -> None:
        self.records.append(TimingRecord(name, time.perf_counter() - self._starts.pop(),
                                         "analysis"))

    def total(self) -> float:
        return sum(r.seconds for r in self.records if r.kind == "pass")

    def report(self) -> str:
        """MLIR-style list report; analyses are marked (A)."""
        total = self.total() or 1e-12
        lines = ["===" + "-" * 60 + "===", "  ... Pass execution timing report ...",
                 "===" + "-" * 60 + "===",
                 f"  Total Execution Time: {self.total():.4f} seconds", "",
                 "   ----Wall Time----  ----Name----"]
        for r in self.records:
            mark = " (A)" if r.kind == "analysis" else ""
            lines.append(f"   {r.seconds:8.4f} ({100 * r.seconds / total:5.1f}%)  {r.name}{mark}")
        lines.append(f"   {self.total():8.4f} (100.0%)  Total")
        return "\n".join(lines)


class IRPrinter(Instrument):
    """Prints the canonical dump before/after passes (all, named, only when changed, on failure)."""

    def __init__(self, stream: TextIO, before: frozenset[str] | str = frozenset(),
                 after: frozenset[str] | str = frozenset(), after_change: bool = False,
                 after_failure: bool = False):
        self.stream, self.before, self.after = stream, before, after
        self.after_change, self.after_failure = after_change, after_failure
        self._fp: list[dict[str, str]] = []

    @staticmethod
    def _match(sel: frozenset[str] | str, p: "Pass") -> bool:
        return sel == "all" or p.name in sel or p.display_name in sel

    def _dump(self, when: str, p: "Pass", gm: torch.fx.GraphModule) -> None:
        banner = f"// -----// IR Dump {when} {type(p).__name__} ({p.display_name}) //----- //"
        self.stream.write(banner + "\n" + print_graph(gm) + "\n\n")

    def before_pass(self, p: "Pass", gm: torch.fx.GraphModule) -> None:
        if self._match(self.before, p):
            self._dump("Before", p, gm)
        if self.after_change:
            self._fp.append(fingerprint(gm))

    def after_pass(self, p: "Pass", gm: torch.fx.GraphModule, result: "PassResult") -> None:
        changed = True
        if self.after_change:
            changed = self._fp.pop() != fingerprint(gm)
        if self._match(self.after, p) and (changed or not self.after_change):
            self._dump("After", p, gm)
        elif self.after_change and changed and not self.after:
            self._dump("After", p, gm)

    def after_pass_failed(self, p: "Pass", gm: torch.fx.GraphModule, exc: BaseException) -> None:
        if self.after_change:
            self._fp.pop()
        if self.after_failure:
            self._dump("After Failure", p, gm)


class Statistics(Instrument):
    """Collects the ``stats`` every pass returns, summed per pass name."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def after_pass(self, p: "Pass", gm: torch.fx.GraphModule, result: "PassResult") -> None:
        for k, v in result.stats.items():
            self.stats[p.display_name][k] += v

    def report(self) -> str:
        lines = ["===" + "-" * 60 + "===", "  ... Pass statistics report ...",
                 "===" + "-" * 60 + "==="]
        for name, stats in self.stats.items():
            lines.append(f"'{name}'")
            for k in sorted(stats):
                lines.append(f"  ({stats[k]}) {k}")
        return "\n".join(lines)


def save_annotations(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """``{node name: {meta key: json}}`` for every registered, serializable annotation key."""
    keys = {k: d for k, d in registry.annotation_keys().items() if d.to_json is not None}
    out: dict[str, Any] = {}
    for n in gm.graph.nodes:
        entry = {k: d.to_json(n.meta[k]) for k, d in keys.items() if n.meta.get(k) is not None}
        if entry:
            out[n.name] = entry
    return out


def load_annotations(gm: torch.fx.GraphModule, data: dict[str, Any]) -> int:
    """Restore annotations written by :func:`save_annotations`; returns how many nodes got some."""
    keys = registry.annotation_keys()
    nodes = {n.name: n for n in gm.graph.nodes}
    count = 0
    for name, entry in data.items():
        node = nodes.get(name)
        if node is None:
            continue
        for k, v in entry.items():
            kdef = keys.get(k)
            if kdef is not None and kdef.from_json is not None:
                node.meta[k] = kdef.from_json(v)
        count += 1
    return count


@dataclass
class Reproducer:
    """Writes what is needed to replay a failing pass: the graph just before it (code, weights,
    annotations), the properties it held, the input shapes, and a qpass_opt command line that
    runs only the failing pass on it (MLIR's local reproducer)."""
    directory: str
    written: list[str] = field(default_factory=list)

    def write(self, pipeline: str, failing_pass: str, gm: torch.fx.GraphModule,
              properties: frozenset[str] | set[str] = frozenset(),
              input_shapes: list[tuple[int, ...]] | None = None) -> str:
        os.makedirs(self.directory, exist_ok=True)
        path = lambda name: os.path.join(self.directory, name)  # noqa: E731
        with open(path("pipeline.txt"), "w") as f:
            f.write(pipeline + "\n")
        with open(path("graph.py"), "w") as f:
            f.write(f"# graph before the failing pass '{failing_pass}'\n" + gm.code)
        with open(path("graph.fxir"), "w") as f:
            f.write(print_graph(gm, header=pipeline) + "\n")
        with open(path("annotations.json"), "w") as f:
            json.dump({"annotations": save_annotations(gm), "properties": sorted(properties),
                       "input_shapes": [list(s) for s in input_shapes or []]}, f, indent=1)
        torch.save(gm.state_dict(), path("state_dict.pt"))
        args = ["python", "-m", "tools.qpass_opt",
                "--graph", path("graph.pt"), f"--pass-pipeline=graph({failing_pass})"]
        if input_shapes:
            args.append("--input-shape=" + ",".join(map(str, input_shapes[0])))
        if properties:
            args.append("--assume=" + ",".join(sorted(properties)))
        with open(path("command.txt"), "w") as f:
            f.write(" ".join(shlex.quote(a) for a in args) + "\n")
        try:  # the whole module, when picklable, so the command above replays it directly
            torch.save(gm, path("graph.pt"))
        except Exception:  # noqa: BLE001 - a best-effort extra; the code and weights are written
            pass
        self.written.append(self.directory)
        return self.directory


def describe(exc: Any) -> str:
    return f"{type(exc).__name__}: {exc}"
