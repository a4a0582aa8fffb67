"""torch.fx helpers of the canonicalize family: argument binding, attributes, shapes."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

_MISSING = object()


def bind(node: torch.fx.Node, names: tuple[str, ...], defaults: dict[str, Any] | None = None
         ) -> dict[str, Any] | None:
    """Map a call's positional and keyword arguments onto ``names``.

    Returns None when the call does not fit the signature (too many arguments, unknown keyword,
    a required argument missing): callers then leave the node alone.
    """
    defaults = defaults or {}
    if len(node.args) > len(names):
        return None
    out = dict(zip(names, node.args))
    for k, v in node.kwargs.items():
        if k not in names or k in out:
            return None
        out[k] = v
    for name in names:
        if name not in out:
            if name not in defaults:
                return None
            out[name] = defaults[name]
    return out


def set_arg(node: torch.fx.Node, names: tuple[str, ...], name: str, value: Any) -> None:
    """Set one argument of a call, positionally if it is given positionally, else as keyword."""
    i = names.index(name)
    if len(node.args) > i:
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The traced shape of a node's value (``tensor_meta`` from ShapeProp, or ``val``)."""
    if not isinstance(node, torch.fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(int(s) for s in tm.shape)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def dtype_of(node: Any) -> torch.dtype | None:
    if not isinstance(node, torch.fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "dtype"):
        return tm.dtype
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    return None


def resolve_attr(gm: torch.nn.Module, target: str) -> tuple[Any, str, Any]:
    """``(owner, attribute name, value)`` of a dotted ``get_attr`` target; value may be _MISSING."""
    *path, attr = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return None, attr, _MISSING
    return owner, attr, getattr(owner, attr, _MISSING)


def get_attr_value(gm: torch.nn.Module, node: Any) -> Any:
    """The object a ``get_attr`` node reads, or _MISSING when ``node`` is not one."""
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        return _MISSING
    return resolve_attr(gm, str(node.target))[2]


def replace_tensor_attr(owner: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Rebind ``owner.attr`` to a new tensor of the same kind (parameter, buffer or plain).

    Always a new object: never writes into the existing tensor, so aliases elsewhere (the user's
    model, tied weights) keep their values, and weight fingerprints see the change. ``value``
    must be a tensor the caller owns (it is stored, not copied).
    """
    old = owner._parameters.get(attr, _MISSING) if hasattr(owner, "_parameters") else _MISSING
    if old is not _MISSING:
        rg = old.requires_grad if old is not None else True
        owner._parameters[attr] = nn.Parameter(value.detach(), requires_grad=rg)
        return
    if hasattr(owner, "_buffers") and attr in owner._buffers:
        owner._buffers[attr] = value.detach()
        return
    setattr(owner, attr, value.detach())


def add_tensor_attr(owner: nn.Module, base: str, value: torch.Tensor, like: str) -> str:
    """Register a new tensor on ``owner`` under a fresh name derived from ``base``.

    It becomes a parameter when ``owner.like`` is one, else a buffer (``value`` is stored, not
    copied). Returns the attribute name.
    """
    name, i = base, 0
    while hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    if like in owner._parameters:
        rg = owner._parameters[like].requires_grad if owner._parameters[like] is not None else True
        owner.register_parameter(name, nn.Parameter(value.detach(), requires_grad=rg))
    else:
        owner.register_buffer(name, value.detach())
    return name


def module_tensors(mod: nn.Module) -> list[torch.Tensor]:
    out = [p for _, p in mod.named_parameters(remove_duplicate=False)]
    out += [b for _, b in mod.named_buffers(remove_duplicate=False)]
    return out


def tensor_use_counts(gm: torch.fx.GraphModule) -> dict[int, int]:
    """id(tensor) -> how many graph sites read it (get_attr users, call_module calls).

    A tensor read at exactly one site can be replaced for that site alone; anything shared
    (a module called twice, tied weights, a weight also read by get_attr) counts more than once.
    """
    counts: dict[int, int] = {}

    def add(t: Any, n: int = 1) -> None:
        if isinstance(t, torch.Tensor):
            counts[id(t)] = counts.get(id(t), 0) + n

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = resolve_attr(gm, str(node.target))[2]
            if isinstance(obj, nn.Module):
                for t in module_tensors(obj):
                    add(t, max(1, len(node.users)))
            else:
                add(obj, max(1, len(node.users)))
        elif node.op == "call_module":
            try:
                mod = gm.get_submodule(str(node.target))
            except AttributeError:
                continue
            for t in module_tensors(mod):
                add(t)
    return counts


def tensor_meta_for(t: torch.Tensor) -> Any:
    """ShapeProp's TensorMetadata for a concrete tensor (for new get_attr nodes)."""
    try:
        from torch.fx.passes.shape_prop import _extract_tensor_metadata
        return _extract_tensor_metadata(t)
    except Exception:  # noqa: BLE001 - private helper; shape metadata is optional
        return None
