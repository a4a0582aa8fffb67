"""The canonical graph dump ("fxir") and graph fingerprints.

One printer serves print-ir instruments, the dump tool and golden tests (MLIR's single printer).
Lines are deterministic: no ids, no addresses; annotations come from the printers registered for
their ``node.meta`` keys, sorted by key, and graph records from the printers registered for their
``gm.meta`` keys.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.fx

from . import registry
from .records import format_records, record_digests

_DTYPE_SHORT = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32",
    torch.int64: "i64", torch.bool: "i1",
}


def dtype_short(dtype: Any) -> str:
    return _DTYPE_SHORT.get(dtype, str(dtype).replace("torch.", ""))


_NAMESPACES = ("torch", "torch.nn.functional", "torch.special", "torch.linalg", "operator",
               "math", "builtins")
_PUBLIC_NAMES: dict[int, str] | None = None


def _public_names() -> dict[int, str]:
    """id(callable) -> its shortest public spelling (``torch.relu``, ``torch.nn.functional.relu``).

    Needed because torch's builtins report internal qualnames (``_VariableFunctionsClass.relu``,
    ``boolean_dispatch.<locals>.fn``) that would make dumps unreadable and unstable.
    """
    global _PUBLIC_NAMES
    if _PUBLIC_NAMES is None:
        import importlib
        names: dict[int, str] = {}
        for ns in _NAMESPACES:
            mod = importlib.import_module(ns)
            for attr in dir(mod):
                if attr.startswith("_"):
                    continue
                obj = getattr(mod, attr, None)
                if callable(obj) and not isinstance(obj, type):
                    names.setdefault(id(obj), f"{ns}.{attr}")
        _PUBLIC_NAMES = names
    return _PUBLIC_NAMES


def target_name(node: torch.fx.Node) -> str:
    """A stable, readable name for a node's target."""
    t = node.target
    if isinstance(t, str):
        return t
    public = _public_names().get(id(t))
    if public is not None:
        return public
    module = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)
    return f"{module}.{name}" if module else name


def _format_arg(a: Any) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_format_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_format_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, float):
        return format(a, ".6g")
    if isinstance(a, torch.dtype):
        return dtype_short(a)
    if isinstance(a, slice):
        return f"{_format_arg(a.start)}:{_format_arg(a.stop)}:{_format_arg(a.step)}"
    if isinstance(a, torch.Tensor):
        return f"tensor<{dtype_short(a.dtype)}{list(a.shape)}>"
    return repr(a)


def format_type(node: torch.fx.Node) -> str:
    """``f32[1,3,8,8]`` from fx's tensor_meta / val, tuples as ``(f32[..], ...)``; '' if unknown."""
    tm = node.meta.get("tensor_meta")
    if tm is None:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return f"{dtype_short(val.dtype)}[{','.join(map(str, val.shape))}]"
        return ""
    return _format_tm(tm)


def _format_tm(tm: Any) -> str:
    if hasattr(tm, "shape") and hasattr(tm, "dtype"):
        return f"{dtype_short(tm.dtype)}[{','.join(map(str, tm.shape))}]"
    if isinstance(tm, (list, tuple)):
        return "(" + ", ".join(_format_tm(t) for t in tm) + ")"
    if isinstance(tm, dict):
        return "{" + ", ".join(f"{k}: {_format_tm(v)}" for k, v in tm.items()) + "}"
    return "?"


def format_annotations(node: torch.fx.Node) -> str:
    parts = []
    for key, kdef in sorted(registry.annotation_keys().items()):
        if key in node.meta and kdef.format is not None:
            text = kdef.format(node.meta[key])
            if text:
                parts.append(text)
    return " ".join(parts)


def format_node(node: torch.fx.Node) -> str:
    args = [_format_arg(a) for a in node.args]
    args += [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()]
    if node.op == "placeholder":
        head = f"%{node.name} = placeholder"
    elif node.op == "output":
        head = f"output({', '.join(args)})"
    elif node.op == "get_attr":
        head = f"%{node.name} = get_attr[{node.target}]"
    else:
        head = f"%{node.name} = {node.op}[{target_name(node)}]({', '.join(args)})"
    ty = format_type(node)
    if ty and node.op != "output":
        head += f" : {ty}"
    ann = format_annotations(node)
    if ann:
        head += f" {{{ann}}}"
    return head


def print_graph(gm: torch.fx.GraphModule, header: str | None = None) -> str:
    """Canonical one-line-per-node dump of a GraphModule, after one ``// record <key>: ...``
    line per printable graph record."""
    lines = [f"// {line}" for line in (header.splitlines() if header else [])]
    lines += [f"// {line}" for line in format_records(gm)]
    lines.append("graph {")
    lines += ["  " + format_node(n) for n in gm.graph.nodes]
    lines.append("}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Fingerprints: cheap hashes of one aspect of a GraphModule, used to catch dishonest passes and
# stale analyses. "weights" uses tensor identity and version counters, so it costs no data read.


def _structure_text(gm: torch.fx.GraphModule) -> str:
    parts = []
    for n in gm.graph.nodes:
        args = [_format_arg(a) for a in n.args] + [f"{k}={_format_arg(v)}" for k, v in n.kwargs.items()]
        tgt = target_name(n) if n.op not in ("placeholder", "output") else str(n.target)
        parts.append(f"{n.name}|{n.op}|{tgt}|{','.join(args)}")
    for name, mod in gm.named_modules():
        parts.append(f"module {name}:{type(mod).__qualname__}:{mod.extra_repr()}")
    return "\n".join(parts)


def _annotations_text(gm: torch.fx.GraphModule) -> str:
    keys = sorted(registry.annotation_keys())
    return "\n".join(f"{n.name}|{k}|{n.meta[k]!r}" for n in gm.graph.nodes for k in keys
                     if k in n.meta)


def _weights_text(gm: torch.fx.GraphModule) -> str:
    parts = []
    for kind, items in (("p", gm.named_parameters(remove_duplicate=False)),
                        ("b", gm.named_buffers(remove_duplicate=False))):
        for name, t in items:
            parts.append(f"{kind}{name}:{tuple(t.shape)}:{t.dtype}:{id(t)}:{t._version}:"
                         f"{t.data_ptr() if t.device.type != 'meta' else 0}")
    return "\n".join(parts)


def _records_text(gm: torch.fx.GraphModule) -> str:
    return "\n".join(f"{key}|{digest}" for key, digest in record_digests(gm).items())


_ASPECT_TEXT = {"structure": _structure_text, "annotations": _annotations_text,
                "weights": _weights_text, "records": _records_text}


def fingerprint(gm: torch.fx.GraphModule, aspects: frozenset[str] | None = None) -> dict[str, str]:
    """aspect -> hash. ``aspects=None`` means all of structure, annotations, weights and
    records."""
    out = {}
    for aspect in sorted(aspects if aspects is not None else _ASPECT_TEXT):
        out[aspect] = hashlib.sha1(_ASPECT_TEXT[aspect](gm).encode()).hexdigest()
    return out
