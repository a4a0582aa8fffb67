"""PassManager: builds a pipeline (text or Python), checks properties statically, runs it.

Checks happen when the pipeline is built: every pass's ``requires`` must be established by an
earlier element or assumed (the manager never inserts or reorders passes). While running, with
verify-each on (the default), after each modifying pass it lints and recompiles the graph, validates
annotations and graph records, runs the checkers of newly established properties, and compares
fingerprints with the pass's ``modified`` claim (XLA) and changed records with its
``writes_records``; a pass's ``requires_records`` are checked just before it runs. Failures come
out typed, naming the pass, its position and the canonical pipeline, optionally with a reproducer
written to disk.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch.fx

from . import registry
from .analysis_manager import AnalysisManager
from .context import PassContext
from .errors import (OptionError, PassesError, PassFailure, PipelineParseError, PropertyError,
                     RecordError, UsageError, VerificationError)
from .instrument import IRPrinter, Reproducer, Statistics, Timing
from .pass_base import ParametricPass, Pass, PassResult
from .options import build_options
from .pipeline import (Element, NamedPipeline, Nested, Pipeline, expand_pipeline, parse_pipeline,
                       pipeline_elements)
from .printing import fingerprint
from .records import has_record, record_digests, record_problems
from .suggest import did_you_mean

HISTORY_KEY = "passes_registry"


def graph_properties(gm: torch.fx.GraphModule) -> frozenset[str]:
    """Properties established on ``gm`` by earlier pipeline runs."""
    return frozenset(gm.meta.get(HISTORY_KEY, {}).get("properties", ()))


def graph_history(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """``{"pipeline": [texts], "passes": [{"name", "seconds"}], "properties": [...]}``."""
    return gm.meta.get(HISTORY_KEY, {"pipeline": [], "passes": [], "properties": []})


class PassManager:
    """An ordered pipeline of passes with static property checking.

    ``assume`` lists properties the input graph already has; it may also be a GraphModule, whose
    recorded properties (from earlier runs) are assumed. Left out (``None``), the input graph is
    not known when the pipeline is built: a requirement that no earlier element establishes (and
    no earlier element invalidates) is then checked when :meth:`run` starts, against the
    properties the graph's recorded history establishes, each verified by its checker. Anything
    else is checked as the pipeline is built.
    """

    def __init__(self, elements: Pipeline | list | tuple = (), *, assume: Any = None):
        self._infer = assume is None
        self.assume = _assume_set(assume)
        # The running property state, so appending an element costs O(its size) (building is
        # linear): what holds after the last element, what an element invalidated and none
        # re-established since, and what the input graph must provide (prop -> first user).
        self._props: set[str] = set(self.assume)
        self._lost: set[str] = set()
        self._input_requires: dict[str, tuple[str, int]] = {}
        self._elements: list[Element] = []
        if not isinstance(elements, Pipeline) and (isinstance(elements, (str, bytes))
                                                   or not hasattr(elements, "__iter__")):
            raise UsageError(f"PassManager(...) takes a Pipeline or a list of passes, got "
                             f"{type(elements).__name__} (use PassManager.parse(text) for "
                             "pipeline text)", argument="elements")
        elems = elements.elements if isinstance(elements, Pipeline) else elements
        for e in elems:
            self._append(e)

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, *, assume: Any = None) -> "PassManager":
        """Build from pipeline text; raises PipelineParseError / PropertyError before running."""
        return cls(parse_pipeline(text), assume=assume)

    def add(self, element: str | Pass | Nested | type[Pass], **options: Any) -> "PassManager":
        """Append a pass by name (``pm.add("annotate-bitwidths", weight_bits=4)``) or instance."""
        if isinstance(element, str):
            name, param = element, None
            if "<" in element and element.endswith(">"):
                name, param = element[:-1].split("<", 1)
            if registry.lookup_pipeline(name) is not None and param is None:
                pdef = registry.lookup_pipeline(name)
                opts = build_options(name, pdef.Options, options)
                for e in pipeline_elements(pdef, opts):
                    self._append(e)
                return self
            try:
                pass_cls = registry.lookup_pass(name)
            except PassesError as e:
                raise PipelineParseError(str(e)) from None
            if issubclass(pass_cls, ParametricPass):
                if param is None:
                    raise PipelineParseError(f"'{name}' needs an analysis: {name}<NAME>")
                registry.lookup_analysis(param)
                element = pass_cls(param, **options)
            else:
                element = pass_cls(**options)
        elif isinstance(element, type) and issubclass(element, Pass):
            element = element(**options)
        elif options:
            raise OptionError(getattr(element, "name", "?"), None,
                              "options can only be given with a pass name or class")
        if not isinstance(element, (Pass, Nested)):
            raise UsageError(f"cannot add {element!r:.80} to a pipeline: expected a pass name, "
                             "a Pass instance or a nested combinator", argument="element")
        self._append(element)
        return self

    def _append(self, element: Element) -> None:
        if not isinstance(element, (Pass, Nested)):
            raise UsageError(f"a pipeline element must be a Pass or a nested combinator, got "
                             f"{element!r:.80}", argument="elements")
        deferred: dict[str, tuple[str, int]] = {}
        props, lost = self._check_requires([element], set(self._props), set(self._lost),
                                           len(self._elements), deferred)
        self._elements.append(element)
        self._props, self._lost = props, lost
        for prop, where in deferred.items():
            self._input_requires.setdefault(prop, where)

    def _check_requires(self, elements: Any, props: set[str], lost: set[str], top: int,
                        deferred: dict[str, tuple[str, int]], nested: bool = False) -> tuple[set[str], set[str]]:
        """Check ``elements`` (top-level ones from index ``top``, or one body at element
        ``top`` when ``nested``); returns the properties after them."""
        for i, e in enumerate(elements):
            pos = top if nested else top + i
            if isinstance(e, Nested):
                # A body runs at least once; its first sweep sees the properties before it.
                self._check_requires(e.body, set(props), set(lost), pos, deferred, nested=True)
                props, lost = _apply_properties(e, props, lost)
                continue
            for prop in sorted(e.requires - props):
                if self._infer and prop not in lost:
                    deferred.setdefault(prop, (e.display_name, pos))
                    continue
                raise PropertyError(_missing_message(e.display_name, pos, prop, explicit=True))
            props, lost = _apply_properties(e, props, lost)
        return props, lost

    @property
    def pipeline(self) -> Pipeline:
        return Pipeline(tuple(self._elements))

    @property
    def input_requires(self) -> frozenset[str]:
        """Properties the input graph must have (checked when :meth:`run` starts): those some
        element requires and no earlier element establishes, when ``assume`` was left out."""
        return frozenset(self._input_requires)

    def __str__(self) -> str:
        return self.pipeline.to_text()

    def __repr__(self) -> str:
        return f"PassManager({self.pipeline.to_text()!r})"

    def __len__(self) -> int:
        return len(self._elements)

    # -- running -------------------------------------------------------------------------------

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> torch.fx.GraphModule:
        """Run the pipeline on ``gm`` in place and return it.

        With ``ctx.rollback`` the passes run on a deep copy that replaces ``gm``'s contents only
        when the whole pipeline succeeds: a failing run leaves ``gm`` untouched."""
        if not isinstance(gm, torch.fx.GraphModule):
            hint = (" (trace the model first, e.g. gm = qpasses.trace(model, example_inputs))"
                    if isinstance(gm, torch.nn.Module) else "")
            raise UsageError(f"PassManager.run expects a torch.fx.GraphModule, got "
                             f"{type(gm).__name__}{hint}", argument="gm")
        if ctx is not None and not isinstance(ctx, PassContext):
            raise UsageError(f"PassManager.run(gm, ctx): ctx must be a PassContext or None, got "
                             f"{type(ctx).__name__}", argument="ctx")
        if not self._elements:
            raise PipelineParseError("empty pipeline: add at least one pass before running")
        ctx = ctx if ctx is not None else PassContext.current()
        recorded, problems = verified_properties(gm)
        have = set(self.assume) | recorded
        for prop, (name, pos) in self._input_requires.items():
            if prop not in have:
                raise PropertyError(_missing_message(name, pos, prop, explicit=False,
                                                     problems=problems.get(prop)))
        if not ctx.rollback:
            return _Run(self, gm, ctx, have).execute()
        # Rollback: run on a deep copy and commit it into gm only on success, so a failure
        # leaves gm exactly as it was (same tensors, same versions).
        work = _deep_copy(gm)
        _Run(self, work, ctx, have).execute()
        _commit(gm, work)
        return gm


def code_signature(gm: torch.fx.GraphModule) -> tuple:
    """What ``gm``'s generated code depends on: the graph object and each node with its name,
    opcode, target, arguments and type, in order (the nodes compare by identity, fx's argument
    containers are immutable). Equal signatures give the same code."""
    return (id(gm.graph), tuple((n, n.name, n.op, n.target, n.args, n.kwargs, n.type)
                                for n in gm.graph.nodes))


def verified_properties(gm: torch.fx.GraphModule) -> tuple[set[str], dict[str, list[str]]]:
    """The properties ``gm``'s recorded history establishes that still hold: each recorded,
    registered property whose checker (if any) finds no problem; and the problems of the others."""
    held: set[str] = set()
    problems: dict[str, list[str]] = {}
    for prop in sorted(graph_properties(gm)):
        pdef = registry.lookup_property(prop)
        if pdef is None:
            problems[prop] = ["the property is not registered"]
            continue
        found = pdef.checker(gm) if pdef.checker is not None else []
        if found:
            problems[prop] = list(found)
        else:
            held.add(prop)
    return held, problems


def _assume_set(assume: Any) -> frozenset[str]:
    if assume is None:
        return frozenset()
    if isinstance(assume, torch.fx.GraphModule):
        return graph_properties(assume)
    if isinstance(assume, str):
        assume = {a.strip() for a in assume.split(",") if a.strip()}
    elif isinstance(assume, (torch.nn.Module, bytes, dict)) or not hasattr(assume, "__iter__"):
        raise UsageError(f"assume= takes IR property names (a string or a collection of "
                         f"strings) or a GraphModule whose recorded properties to assume, got "
                         f"{type(assume).__name__}", argument="assume")
    assume = list(assume)
    for prop in assume:
        if not isinstance(prop, str):
            raise UsageError(f"assume= takes IR property names, got {prop!r:.60} "
                             f"({type(prop).__name__})", argument="assume")
        if registry.lookup_property(prop) is None:
            raise PropertyError(f"unknown property '{prop}' in assume="
                                + did_you_mean(prop, registry.property_names()))
    return frozenset(assume)


def _missing_message(name: str, pos: int, prop: str, *, explicit: bool,
                     problems: list[str] | None = None) -> str:
    # A pass that itself requires the property cannot be what first provides it.
    providers = _providers(prop)
    hint = (f"add {' or '.join(repr(p) for p in providers)} before it"
            if providers else "no registered pass establishes it")
    where = "no earlier element establishes"
    if not explicit:
        where += " and the input graph's recorded history does not establish"
        if problems:
            where += f" (it records it, but its checker found: {'; '.join(problems[:3])})"
    return (f"pass '{name}' (element {pos} of the pipeline) requires property '{prop}', which "
            f"{where} ({hint}; or pass assume={{'{prop}'}} if the input graph already has it)")


def _deep_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    try:
        return copy.deepcopy(gm)
    except Exception as e:  # noqa: BLE001 - any attribute may refuse to be copied
        raise UsageError(f"rollback needs a deep copy of the graph, which failed: "
                         f"{type(e).__name__}: {e} (run with PassContext(rollback=False))",
                         argument="rollback") from None


def _commit(gm: torch.fx.GraphModule, work: torch.fx.GraphModule) -> None:
    """Move ``work``'s state (graph, submodules, weights, meta) into ``gm`` in place."""
    state = dict(work.__dict__)
    gm.__dict__.clear()
    gm.__dict__.update(state)
    gm.graph = state["_graph"]  # re-owns the graph and recompiles gm's forward


def _providers(prop: str) -> list[str]:
    """Names to suggest for establishing ``prop``: the passes that establish it without requiring
    it, where a ``keep_name`` pipeline establishing it runs such a pass, the pipeline instead."""
    passes = [n for n in registry.pass_names()
              if prop in registry.lookup_pass(n).establishes
              and prop not in registry.lookup_pass(n).requires]
    pipelines = []
    for name in registry.pipeline_names():
        pdef = registry.lookup_pipeline(name)
        if pdef is None or not pdef.keep_name:
            continue
        try:
            body = expand_pipeline(pdef, build_options(name, pdef.Options, {}))
        except PassesError:
            continue
        inner = {p.name for p in Pipeline(body).flat_passes()}
        established: set[str] = set()
        for e in body:
            established, _ = _apply_properties(e, established)
        if prop in established and inner & set(passes):
            pipelines.append(name)
            passes = [p for p in passes if p not in inner]
    return pipelines + passes


def _apply_properties(e: Element, props: set[str],
                      lost: set[str] | None = None) -> tuple[set[str], set[str]]:
    """Properties (and invalidated-not-re-established ones) after ``e`` runs."""
    lost = set() if lost is None else lost
    if isinstance(e, Nested):
        for sub in e.body:
            props, lost = _apply_properties(sub, props, lost)
        return props, lost
    return (props - e.invalidates) | e.establishes, (lost | e.invalidates) - e.establishes


class _Run:
    """State of one pipeline execution (kept off the PassManager so it stays reusable)."""

    def __init__(self, pm: PassManager, gm: torch.fx.GraphModule, ctx: PassContext,
                 properties: set[str]):
        self.pm, self.gm, self.ctx = pm, gm, ctx
        self.text = pm.pipeline.to_text()
        self.timing = Timing()
        self.statistics = Statistics() if ctx.statistics else None
        instruments: list[Any] = [self.timing]
        if self.statistics is not None:
            instruments.append(self.statistics)
        if ctx.print_before or ctx.print_after or ctx.print_after_change or ctx.print_after_failure:
            instruments.append(IRPrinter(ctx.stream, ctx.print_before, ctx.print_after,
                                         ctx.print_after_change, ctx.print_after_failure))
        instruments.extend(ctx.instruments)
        self.instruments = tuple(instruments)
        self.am = AnalysisManager(self.instruments, verify=ctx.verify_each)
        self.properties = set(properties)
        self.position = 0
        self.bisect_count = 0
        self.code_signature: tuple | None = None   # of the graph gm.code was last generated for

    def execute(self) -> torch.fx.GraphModule:
        for inst in self.instruments:
            inst.on_pipeline_start(self.text, self.gm)
        self._run_elements(self.pm._elements, path="")
        for inst in reversed(self.instruments):
            inst.on_pipeline_end(self.text, self.gm)
        hist = self.gm.meta.setdefault(HISTORY_KEY, {"pipeline": [], "passes": [], "properties": []})
        hist["pipeline"].append(self.text)
        hist["passes"].extend({"name": r.name, "seconds": r.seconds}
                              for r in self.timing.records if r.kind == "pass")
        hist["properties"] = sorted(self.properties)
        if self.ctx.timing:
            self.ctx.stream.write(self.timing.report() + "\n")
        if self.statistics is not None:
            self.ctx.stream.write(self.statistics.report() + "\n")
        return self.gm

    def _run_elements(self, elements: Any, path: str) -> bool:
        any_modified = False
        for i, e in enumerate(elements):
            pos = f"{path}{i}"
            if isinstance(e, Nested):
                any_modified |= self._run_nested(e, pos)
            else:
                any_modified |= self._run_pass(e, pos)
        return any_modified

    def _run_nested(self, e: Nested, pos: str) -> bool:
        if isinstance(e, NamedPipeline):
            return self._run_elements(e.body, pos + ".")
        if e.combinator == "repeat":
            modified = False
            for _ in range(e.options.count):
                modified |= self._run_elements(e.body, pos + ".")
            return modified
        # fixpoint: rerun until nothing changes; detect cycles by fingerprint (XLA HloPassFix).
        seen = {_fp_key(fingerprint(self.gm))}
        modified_any = False
        for _ in range(e.options.max_iterations):
            if not self._run_elements(e.body, pos + "."):
                return modified_any
            modified_any = True
            key = _fp_key(fingerprint(self.gm))
            if key in seen:
                raise VerificationError(
                    f"fixpoint at element {pos} cycles: the graph returned to an earlier state "
                    "while its passes keep reporting changes", pass_name="fixpoint",
                    position=None, pipeline=self.text)
            seen.add(key)
        msg = (f"fixpoint at element {pos} did not converge in "
               f"{e.options.max_iterations} iterations")
        if self.ctx.verify_each:
            raise VerificationError(msg + " (raise max-iterations or fix the non-converging "
                                          "pass)", pass_name="fixpoint", pipeline=self.text)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return modified_any

    def _should_run(self, p: Pass) -> bool:
        if not p.required:
            if p.name in self.ctx.disabled or p.display_name in self.ctx.disabled:
                return False
            if self.ctx.bisect_limit is not None:
                self.bisect_count += 1
                if self.bisect_count > self.ctx.bisect_limit:
                    return False
        return all(inst.should_run(p, self.gm) for inst in self.instruments)

    def _run_pass(self, p: Pass, pos: str) -> bool:
        gm, ctx = self.gm, self.ctx
        if not self._should_run(p):
            return False
        self._check_required_records(p, pos)
        before = fingerprint(gm) if ctx.verify_each else None
        records_before = record_digests(gm) if ctx.verify_each else {}
        snapshot = copy.deepcopy(gm) if ctx.reproducer_dir else None
        for inst in self.instruments:
            inst.before_pass(p, gm)
        try:
            result = p.run(gm, ctx, self.am)
            if isinstance(result, bool):
                result = PassResult(modified=result)
            if not isinstance(result, PassResult):
                raise PassFailure(f"run() returned {type(result).__name__}, expected PassResult")
            if result.modified:
                try:
                    gm.graph.lint()
                except Exception as e:  # noqa: BLE001 - fx raises bare RuntimeError
                    raise VerificationError(f"graph.lint() failed after the pass: {e}") from e
                self._recompile_if_changed()
            if ctx.verify_each:
                self._verify(p, result, before, records_before)
            if ctx.check_preservation and result.modified:
                preserved_results = {n: self.am.cached(n) for n in self.am.cached_names()}
            else:
                preserved_results = {}
            if result.modified:
                preserved = result.preserved if result.preserved is not None else p.preserves
                self.am.invalidate(preserved, gm)
                self._check_preservation(p, preserved_results)
        except BaseException as exc:  # noqa: BLE001 - re-raised typed, below
            for inst in reversed(self.instruments):
                inst.after_pass_failed(p, gm, exc)
            typed = self._typed_failure(p, pos, exc, snapshot)
            if typed is exc:  # already typed: re-raise as is (never its own __cause__)
                raise
            raise typed from exc
        self.properties = (self.properties - set(p.invalidates)) | set(p.establishes)
        for inst in reversed(self.instruments):
            inst.after_pass(p, gm, result)
        return result.modified

    def _recompile_if_changed(self) -> None:
        """Regenerate ``gm``'s code unless this run already generated it for the same graph: a
        pass that changes only weights, buffers, submodules or ``meta`` (calibration, bit-width
        annotation) leaves the code as it was, and code generation costs milliseconds."""
        signature = code_signature(self.gm)
        try:
            same = signature == self.code_signature
        except Exception:  # noqa: BLE001 - an argument whose == is not a bool: regenerate
            same = False
        if not same:
            self.gm.recompile()
        self.code_signature = signature

    def _check_required_records(self, p: Pass, pos: str) -> None:
        for key in sorted(p.requires_records):
            if has_record(self.gm, key):
                continue
            writers = [n for n in registry.pass_names()
                       if key in registry.lookup_pass(n).writes_records
                       and key not in registry.lookup_pass(n).requires_records]
            hint = (f"run {' or '.join(repr(w) for w in writers)} first" if writers
                    else "no registered pass writes it")
            raise RecordError(f"pass '{p.display_name}' (element {pos} of {self.text}) requires "
                              f"graph record '{key}', which the graph does not have ({hint})",
                              record=key, pass_name=p.display_name)

    def _verify(self, p: Pass, result: PassResult, before: dict[str, str] | None,
                records_before: dict[str, str]) -> None:
        gm = self.gm
        after = fingerprint(gm)
        changed = sorted(k for k in after if before is not None and after[k] != before[k])
        if not result.modified and changed:
            raise VerificationError(f"pass reported modified=False but changed the graph's "
                                    f"{', '.join(changed)}")
        if result.modified and not changed:
            raise VerificationError("pass reported modified=True but the graph, its "
                                    "annotations, weights and records are unchanged")
        records_after = record_digests(gm)
        undeclared = sorted(k for k in records_before.keys() | records_after.keys()
                            if records_before.get(k) != records_after.get(k)
                            and k not in p.writes_records)
        if undeclared:
            raise VerificationError(f"pass changed graph record '{undeclared[0]}' but does not "
                                    "declare it in writes_records")
        for prop in sorted(p.establishes):
            pdef = registry.lookup_property(prop)
            if pdef is not None and pdef.checker is not None:
                problems = pdef.checker(gm)
                if problems:
                    raise VerificationError(f"claims to establish '{prop}' but its checker "
                                            f"found: {'; '.join(problems[:5])}")
        if not result.modified:
            return
        for key in sorted(registry.graph_records()):
            if gm.meta.get(key) is not None:
                problems = record_problems(key, gm.meta[key])
                if problems:
                    raise VerificationError(f"invalid graph record: {'; '.join(problems)}")
        keys = registry.annotation_keys()
        for node in gm.graph.nodes:
            for key, kdef in keys.items():
                if key in node.meta and kdef.validate is not None:
                    problems = kdef.validate(node.meta[key])
                    if problems:
                        raise VerificationError(f"invalid '{key}' annotation: "
                                                f"{'; '.join(problems)}", node=node.name)

    def _check_preservation(self, p: Pass, cached: dict[str, Any]) -> None:
        for name in self.am.cached_names():
            if name not in cached:
                continue
            old = cached[name]
            self.am.forget(name)
            new = self.am.get(name, self.gm)
            if not _results_equal(old, new):
                raise VerificationError(f"claims to preserve analysis '{name}' but recomputing "
                                        "it gives a different result")

    def _typed_failure(self, p: Pass, pos: str, exc: BaseException,
                       snapshot: torch.fx.GraphModule | None) -> BaseException:
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not a failure
            return exc
        repro = None
        if snapshot is not None:
            shapes = [tuple(t.shape) for t in self.ctx.example_inputs or ()
                      if hasattr(t, "shape")]
            try:
                repro = Reproducer(self.ctx.reproducer_dir).write(
                    self.text, p.to_text(), snapshot, self.properties, shapes)
            except Exception as e:  # noqa: BLE001 - keep the pass's failure; say why none
                repro = f"not written: cannot write to {self.ctx.reproducer_dir!r}: {e}"
        if isinstance(exc, PassFailure):
            if exc.pass_name is not None:  # raised by a nested pipeline: already has context
                return exc
            return exc.with_context(pass_name=p.display_name, position=_pos_int(pos),
                                    pipeline=self.text, reproducer=repro)
        if isinstance(exc, PassesError):
            # A typed user error (bad annotation config...): keep its type, add the context.
            where = f"pass '{p.display_name}' (element {pos} of {self.text})"
            exc.args = (f"{where}: {exc}",) + tuple(exc.args[1:])
            for k, v in (("pass_name", p.display_name), ("pipeline", self.text),
                         ("reproducer", repro)):
                if getattr(exc, k, None) is None:
                    try:
                        setattr(exc, k, v)
                    except AttributeError:
                        pass
            return exc
        return PassFailure(f"internal error: {type(exc).__name__}: {exc}",
                           pass_name=p.display_name, position=_pos_int(pos), pipeline=self.text,
                           reproducer=repro)


def _pos_int(pos: str) -> int:
    return int(pos.split(".")[0])


def _fp_key(fp: dict[str, str]) -> str:
    return "|".join(fp[k] for k in sorted(fp))


def _results_equal(a: Any, b: Any) -> bool:
    try:
        eq = a == b
        return bool(eq) if not hasattr(eq, "all") else bool(eq.all())
    except Exception:  # noqa: BLE001 - uncomparable results count as equal (cannot check)
        return True
