"""Graph records: typed values that describe a whole GraphModule, kept in ``gm.meta``.

Node annotations say something about one node; a graph record says something about the graph (a
search supernet's table of layers, a log of what a pass removed, the contract a lowering
implemented). Each record key is registered with :func:`register_graph_record` and a type; the
accessors here validate on write, and the pass manager validates, fingerprints and prints every
registered record, so a pass that changes one must report ``modified=True`` and declare it in
``writes_records``.

Records are immutable values by convention (frozen dataclasses): replace a record with
:func:`set_record`, never mutate it in place. A dataclass field declared ``compare=False`` is not
part of the record's value (a memo, a finding of a read-only check): it is left out of the
fingerprint and of :func:`record_to_json`. A ``compare=False`` field whose metadata has
``fingerprint="identity"`` is fingerprinted by object identity instead (a large object, such as a
kept copy of a GraphModule: replacing it is a change, hashing its contents would be too slow).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch.fx

from . import registry
from .errors import RecordError
from .registry import GraphRecordDef, register_graph_record

__all__ = ["get_record", "has_record", "pop_record", "record_problems", "record_text",
           "record_to_json", "register_graph_record", "set_record"]

_MISSING = object()


def _registered(key: str) -> GraphRecordDef:
    try:
        return registry.lookup_graph_record(key)
    except Exception as e:  # noqa: BLE001 - RegistryError, re-raised as a record error
        raise RecordError(str(e), record=key) from None


def record_problems(key: str, value: Any) -> list[str]:
    """What is wrong with ``value`` as the record ``key`` (wrong type, then its validator)."""
    rdef = _registered(key)
    if not isinstance(value, rdef.type):
        names = " | ".join(t.__qualname__ for t in
                           (rdef.type if isinstance(rdef.type, tuple) else (rdef.type,)))
        return [f"graph record '{key}' must be a {names}, got {type(value).__name__}"]
    return list(rdef.validate(value)) if rdef.validate is not None else []


def has_record(gm: torch.fx.GraphModule, key: str) -> bool:
    _registered(key)
    return getattr(gm, "meta", {}).get(key) is not None


def get_record(gm: torch.fx.GraphModule, key: str, default: Any = None) -> Any:
    """The record ``key`` of ``gm``, or ``default`` when it has none."""
    _registered(key)
    value = getattr(gm, "meta", {}).get(key)
    return default if value is None else value


def set_record(gm: torch.fx.GraphModule, key: str, value: Any) -> None:
    """Store ``value`` as the record ``key`` of ``gm`` after validating it (RecordError)."""
    problems = record_problems(key, value)
    if problems:
        raise RecordError("; ".join(problems), record=key)
    gm.meta[key] = value


def pop_record(gm: torch.fx.GraphModule, key: str, default: Any = None) -> Any:
    """Remove the record ``key`` from ``gm`` and return it (``default`` when absent)."""
    _registered(key)
    value = gm.meta.pop(key, _MISSING)
    return default if value is _MISSING or value is None else value


def record_text(value: Any) -> str:
    """The text a record's fingerprint hashes: a dataclass's value fields (``compare=True``)
    recursively plus the identity of ``fingerprint="identity"`` fields, ``repr`` otherwise."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        parts = []
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.metadata.get("fingerprint") == "identity":
                text = "None" if v is None else f"<{type(v).__qualname__} at {id(v):#x}>"
            elif f.compare:
                text = record_text(v)
            else:
                continue
            parts.append(f"{f.name}={text}")
        return f"{type(value).__qualname__}({', '.join(parts)})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {record_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(record_text(v) for v in value)
        if isinstance(value, list):
            return f"[{inner}]"
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def record_to_json(value: Any) -> Any:
    """A JSON-able copy of a record: dataclasses become dicts of their value fields (``compare``
    fields only), tuples become lists, mapping keys become strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: record_to_json(getattr(value, f.name))
                for f in dataclasses.fields(value) if f.compare}
    if isinstance(value, dict):
        return {str(k): record_to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [record_to_json(v) for v in value]
    return value


def record_digests(gm: torch.fx.GraphModule) -> dict[str, str]:
    """``{key: hash of its fingerprint text}`` for every fingerprinted record present on ``gm``."""
    meta = getattr(gm, "meta", {})
    return {key: hashlib.sha1(record_text(meta[key]).encode()).hexdigest()
            for key, rdef in sorted(registry.graph_records().items())
            if rdef.fingerprinted and meta.get(key) is not None}


def format_records(gm: torch.fx.GraphModule) -> list[str]:
    """``record <key>: <summary>`` for every present record that has a printer, sorted by key."""
    meta = getattr(gm, "meta", {})
    lines = []
    for key, rdef in sorted(registry.graph_records().items()):
        if rdef.format is None or meta.get(key) is None:
            continue
        text = rdef.format(meta[key])
        if text:
            lines.append(f"record {key}: {text}")
    return lines
