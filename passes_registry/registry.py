"""The global registry of passes, pipelines, analyses, IR properties, annotation keys and graph
records.

One namespace for passes and pipelines (MLIR). Re-registering a name with the same class is a no-op
(module re-imports); with a different class it is a RegistryError.
"""
from __future__ import annotations

import builtins
import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .errors import RegistryError
from .options import NoOptions, OptionInfo, option_infos
from .pass_base import ASPECTS, Pass
from .suggest import did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from .analysis_manager import Analysis

NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")

_PASSES: dict[str, type[Pass]] = {}
_PIPELINES: dict[str, "PipelineDef"] = {}
_ANALYSES: dict[str, type["Analysis"]] = {}
_PROPERTIES: dict[str, "PropertyDef"] = {}
_ANNOTATION_KEYS: dict[str, "AnnotationKeyDef"] = {}
_GRAPH_RECORDS: dict[str, "GraphRecordDef"] = {}


@dataclass(frozen=True)
class PipelineDef:
    """A named pipeline: ``builder(options) -> pipeline text or list of elements``.

    ``keep_name``: the pipeline stays one element, printed as ``name{options}``, instead of being
    replaced by its expansion (its passes still run, print, time and verify one by one)."""
    name: str
    summary: str
    Options: type
    builder: Callable[[Any], Any]
    keep_name: bool = False


@dataclass(frozen=True)
class PropertyDef:
    """An IR property (``bn-folded``) and its checker: ``checker(gm) -> list of problems``."""
    name: str
    summary: str
    checker: Callable[[Any], list[str]] | None


@dataclass(frozen=True)
class AnnotationKeyDef:
    """A ``node.meta`` key holding typed annotations: how to validate, print and (de)serialize
    its values (reproducers save annotations as JSON next to the graph)."""
    key: str
    validate: Callable[[Any], list[str]] | None
    format: Callable[[Any], str] | None
    to_json: Callable[[Any], Any] | None = None
    from_json: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class GraphRecordDef:
    """A ``gm.meta`` key holding one typed, graph-level record (a search supernet's layer table,
    a log, a lowering's contract). ``type``: the class (or tuple of classes) a value must be an
    instance of; ``validate(value) -> problems`` checks more; ``format(value) -> str`` is the
    summary printed in the graph dump (None: not printed); ``fingerprinted=False`` for logs and
    findings, which passes may append to without reporting a change."""
    key: str
    type: type | tuple[type, ...]
    summary: str = ""
    validate: Callable[[Any], list[str]] | None = None
    format: Callable[[Any], str] | None = None
    fingerprinted: bool = True


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(f"{kind} name {name!r} must match {NAME_RE.pattern} (kebab-case)")


def _same(a: Any, b: Any) -> bool:
    # A re-imported module defines a new class object with the same qualified name.
    return a is b or (getattr(a, "__module__", None) == getattr(b, "__module__", None)
                      and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None))


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: register a Pass subclass under ``cls.name``. Returns the class."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise RegistryError(f"register_pass expects a Pass subclass, got {cls!r}")
    _check_name("pass", cls.name)
    option_infos(cls.Options)  # validates the options dataclass now, not at first use
    for prop in cls.requires | cls.establishes | cls.invalidates:
        _check_name("property", prop)
    for attr in ("requires_records", "reads_records", "writes_records"):
        keys = getattr(cls, attr)
        if not isinstance(keys, frozenset) or not all(isinstance(k, str) for k in keys):
            raise RegistryError(f"pass '{cls.name}': {attr} must be a frozenset of record keys, "
                                f"got {keys!r}")
    existing = _PASSES.get(cls.name)
    if existing is not None and not _same(existing, cls):
        raise RegistryError(f"pass name '{cls.name}' is already registered by "
                            f"{existing.__module__}.{existing.__qualname__}")
    if cls.name in _PIPELINES:
        raise RegistryError(f"'{cls.name}' is already registered as a pipeline")
    _PASSES[cls.name] = cls
    return cls


def register_pipeline(name: str, builder: Callable[[Any], Any], *, summary: str = "",
                      options: type = NoOptions, keep_name: bool = False) -> None:
    """Register a named pipeline. ``builder(opts)`` returns pipeline text or a list of elements;
    with ``keep_name`` printed pipelines show ``name{options}`` rather than the expansion."""
    _check_name("pipeline", name)
    option_infos(options)
    if name in _PASSES:
        raise RegistryError(f"'{name}' is already registered as a pass")
    existing = _PIPELINES.get(name)
    if existing is not None and not _same(existing.builder, builder):
        raise RegistryError(f"pipeline name '{name}' is already registered")
    _PIPELINES[name] = PipelineDef(name, summary, options, builder, keep_name)


def register_analysis(cls: type["Analysis"]) -> type["Analysis"]:
    """Class decorator: register an Analysis (usable as ``print<name>`` / ``require<name>``)."""
    _check_name("analysis", cls.name)
    bad = set(cls.depends_on) - ASPECTS
    if bad:
        raise RegistryError(f"analysis '{cls.name}' depends on unknown aspects {sorted(bad)}")
    existing = _ANALYSES.get(cls.name)
    if existing is not None and not _same(existing, cls):
        raise RegistryError(f"analysis name '{cls.name}' is already registered")
    _ANALYSES[cls.name] = cls
    return cls


def register_property(name: str, checker: Callable[[Any], list[str]] | None = None, *,
                      summary: str = "") -> None:
    """Register an IR property; its checker runs under verify-each after a pass establishes it."""
    _check_name("property", name)
    existing = _PROPERTIES.get(name)
    if existing is not None and existing.checker is not None and checker is not None \
            and not _same(existing.checker, checker):
        raise RegistryError(f"property '{name}' is already registered with another checker")
    _PROPERTIES[name] = PropertyDef(name, summary, checker)


def register_annotation_key(key: str, *, validate: Callable[[Any], list[str]] | None = None,
                            format: Callable[[Any], str] | None = None,
                            to_json: Callable[[Any], Any] | None = None,
                            from_json: Callable[[Any], Any] | None = None) -> None:
    """Declare a ``node.meta`` key that holds annotations (validated, printed and serialized by
    the infra)."""
    _ANNOTATION_KEYS[key] = AnnotationKeyDef(key, validate, format, to_json, from_json)


def register_graph_record(key: str, type: type | tuple[type, ...], *, summary: str = "",
                          validate: Callable[[Any], list[str]] | None = None,
                          format: Callable[[Any], str] | None = None,
                          fingerprinted: bool = True) -> None:
    """Declare a ``gm.meta`` key that holds a typed graph record (validated on ``set_record`` and
    under verify-each, printed in the graph dump, part of the ``records`` fingerprint)."""
    if not isinstance(key, str) or not key:
        raise RegistryError(f"graph record key must be a non-empty string, got {key!r}")
    types = type if isinstance(type, tuple) else (type,)
    # ``builtins.type``: the parameter shadows the builtin
    if not types or not all(isinstance(t, builtins.type) for t in types):
        raise RegistryError(f"graph record '{key}': type must be a class or a tuple of classes, "
                            f"got {type!r}")
    existing = _GRAPH_RECORDS.get(key)
    if existing is not None:
        old = existing.type if isinstance(existing.type, tuple) else (existing.type,)
        if len(old) != len(types) or not all(_same(a, b) for a, b in zip(old, types)):
            raise RegistryError(f"graph record '{key}' is already registered with type "
                                f"{_type_names(existing.type)}")
    _GRAPH_RECORDS[key] = GraphRecordDef(key, type, summary, validate, format, fingerprinted)


def _type_names(t: type | tuple[type, ...]) -> str:
    return " | ".join(x.__qualname__ for x in (t if isinstance(t, tuple) else (t,)))


def lookup_graph_record(key: str) -> GraphRecordDef:
    try:
        return _GRAPH_RECORDS[key]
    except KeyError:
        raise RegistryError(f"'{key}' is not a registered graph record"
                            + did_you_mean(key, _GRAPH_RECORDS)) from None


def graph_records() -> dict[str, GraphRecordDef]:
    return dict(_GRAPH_RECORDS)


def lookup_pass(name: str) -> type[Pass]:
    try:
        return _PASSES[name]
    except KeyError:
        raise RegistryError(f"'{name}' does not refer to a registered pass"
                            + did_you_mean(name, _PASSES)) from None


def lookup_analysis(name: str) -> type["Analysis"]:
    try:
        return _ANALYSES[name]
    except KeyError:
        raise RegistryError(f"'{name}' does not refer to a registered analysis"
                            + did_you_mean(name, _ANALYSES)) from None


def lookup_pipeline(name: str) -> PipelineDef | None:
    return _PIPELINES.get(name)


def lookup_property(name: str) -> PropertyDef | None:
    return _PROPERTIES.get(name)


def pass_names() -> list[str]:
    return sorted(_PASSES)


def pipeline_names() -> list[str]:
    return sorted(_PIPELINES)


def analysis_names() -> list[str]:
    return sorted(_ANALYSES)


def property_names() -> list[str]:
    return sorted(_PROPERTIES)


def annotation_keys() -> dict[str, AnnotationKeyDef]:
    return dict(_ANNOTATION_KEYS)


@dataclass(frozen=True)
class PassListing:
    """One row of ``list_passes()``: what ``--list-passes`` and the generated docs show."""
    name: str
    kind: str                  # "pass", "pipeline" or "analysis"
    summary: str
    options: tuple[OptionInfo, ...]
    requires: tuple[str, ...] = ()
    establishes: tuple[str, ...] = ()
    invalidates: tuple[str, ...] = ()
    doc: str = ""


def list_passes() -> list[PassListing]:
    """Every registered pass, pipeline and analysis, sorted by kind then name."""
    rows = []
    for name in sorted(_PASSES):
        cls = _PASSES[name]
        rows.append(PassListing(name, "pass", cls.summary, tuple(option_infos(cls.Options)),
                                tuple(sorted(cls.requires)), tuple(sorted(cls.establishes)),
                                tuple(sorted(cls.invalidates)), inspect.cleandoc(cls.__doc__ or "")))
    for name in sorted(_PIPELINES):
        p = _PIPELINES[name]
        rows.append(PassListing(name, "pipeline", p.summary, tuple(option_infos(p.Options)),
                                doc=inspect.cleandoc(p.builder.__doc__ or "")))
    for name in sorted(_ANALYSES):
        a = _ANALYSES[name]
        rows.append(PassListing(name, "analysis", a.summary, (), doc=inspect.cleandoc(a.__doc__ or "")))
    return rows
