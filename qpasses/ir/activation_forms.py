"""Activation forms: what an activation node computes, whatever its spelling.

``nn.ReLU()``, ``F.relu``, ``x.relu_()`` and ``clamp(min=0)`` all have the form
``ActivationForm("relu", torch.relu, x)``; the canonicalization rules
(:mod:`qpasses.ir.canonical_rules`) rewrite a node to its form's canonical target.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from qpasses.ir.fx import bind, dtype_of

__all__ = ["ActivationForm", "activation_form", "is_float"]

Node = torch.fx.Node


@dataclass(frozen=True)
class ActivationForm:
    """What an activation node computes: its rule, canonical target, input, extra args,
    keyword arguments and whether it writes its input in place."""
    rule: str
    target: Any
    x: Any
    extra: tuple = ()
    kwargs: tuple = ()           # sorted (key, value) pairs
    inplace: bool = False

    def is_node_canonical(self, node: Node) -> bool:
        return (node.op == "call_function" and node.target is self.target and not self.inplace
                and node.args == (self.x, *self.extra) and dict(node.kwargs) == dict(self.kwargs))


def is_float(node: Any) -> bool:
    dt = dtype_of(node)
    return dt is not None and dt.is_floating_point


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _clamp_form(x: Any, lo: Any, hi: Any, inplace: bool) -> ActivationForm | None:
    """clamp(x, 0) -> relu, clamp(x, 0, 6) -> relu6 (floating-point tensors only)."""
    if not is_float(x) or _num(lo) != 0.0:
        return None
    if hi is None:
        return ActivationForm("relu", torch.relu, x, inplace=inplace)
    if _num(hi) == 6.0:
        return ActivationForm("relu6", F.relu6, x, inplace=inplace)
    return None


def _hardtanh_form(x: Any, lo: Any, hi: Any, inplace: bool) -> ActivationForm | None:
    lo, hi = _num(lo), _num(hi)
    if lo is None or hi is None:
        return None
    if (lo, hi) == (0.0, 6.0):
        return ActivationForm("relu6", F.relu6, x, inplace=inplace)
    return ActivationForm("hardtanh", F.hardtanh, x, (lo, hi), inplace=inplace)


def _gelu_form(x: Any, approximate: Any) -> ActivationForm | None:
    if approximate == "none":
        return ActivationForm("gelu", F.gelu, x)
    if approximate == "tanh":
        return ActivationForm("gelu", F.gelu, x, kwargs=(("approximate", "tanh"),))
    return None


def _module_activation(mod: nn.Module, x: Any) -> ActivationForm | None:
    t = type(mod)
    inplace = getattr(mod, "inplace", False) is True
    if t is nn.ReLU:
        return ActivationForm("relu", torch.relu, x, inplace=inplace)
    if t is nn.ReLU6 or t is nn.Hardtanh:
        return _hardtanh_form(x, mod.min_val, mod.max_val, inplace)
    if t is nn.Sigmoid:
        return ActivationForm("sigmoid", torch.sigmoid, x)
    if t is nn.Tanh:
        return ActivationForm("tanh", torch.tanh, x)
    if t is nn.Hardsigmoid:
        return ActivationForm("hardsigmoid", F.hardsigmoid, x, inplace=inplace)
    if t is nn.Hardswish:
        return ActivationForm("hardswish", F.hardswish, x, inplace=inplace)
    if t is nn.SiLU:
        return ActivationForm("silu", F.silu, x, inplace=inplace)
    if t is nn.GELU:
        return _gelu_form(x, mod.approximate)
    if t is nn.LeakyReLU:
        return ActivationForm("leaky-relu", F.leaky_relu, x, (float(mod.negative_slope),), inplace=inplace)
    return None


_IN = ("input",)
_IN_INPLACE = ("input", "inplace")
_NO_INPLACE = {"inplace": False}


def _function_activation(node: Node) -> ActivationForm | None:
    t = node.target
    if t in (torch.relu, torch.relu_) or t is F.relu:
        a = bind(node, _IN_INPLACE, _NO_INPLACE) if t is F.relu else bind(node, _IN)
        if a is None:
            return None
        return ActivationForm("relu", torch.relu, a["input"],
                     inplace=t is torch.relu_ or a.get("inplace") is True)
    if t is F.relu6:
        a = bind(node, _IN_INPLACE, _NO_INPLACE)
        return a and ActivationForm("relu6", F.relu6, a["input"], inplace=a["inplace"] is True)
    if t in (F.hardtanh, F.hardtanh_):
        names = ("input", "min_val", "max_val", "inplace")
        a = bind(node, names, {"min_val": -1.0, "max_val": 1.0, "inplace": False})
        if a is None:
            return None
        return _hardtanh_form(a["input"], a["min_val"], a["max_val"],
                              t is F.hardtanh_ or a["inplace"] is True)
    for fns, rule, canon in (((torch.sigmoid, torch.sigmoid_, F.sigmoid), "sigmoid",
                              torch.sigmoid),
                             ((torch.tanh, torch.tanh_, F.tanh), "tanh", torch.tanh)):
        if t in fns:
            a = bind(node, _IN)
            return a and ActivationForm(rule, canon, a["input"], inplace=t is fns[1])
    for fn, rule in ((F.hardsigmoid, "hardsigmoid"), (F.hardswish, "hardswish"),
                     (F.silu, "silu")):
        if t is fn:
            a = bind(node, _IN_INPLACE, _NO_INPLACE)
            return a and ActivationForm(rule, fn, a["input"], inplace=a["inplace"] is True)
    if t is F.gelu:
        a = bind(node, ("input", "approximate"), {"approximate": "none"})
        return a and _gelu_form(a["input"], a["approximate"])
    if t in (F.leaky_relu, F.leaky_relu_):
        a = bind(node, ("input", "negative_slope", "inplace"),
                 {"negative_slope": 0.01, "inplace": False})
        if a is None or _num(a["negative_slope"]) is None:
            return None
        return ActivationForm("leaky-relu", F.leaky_relu, a["input"], (_num(a["negative_slope"]),),
                     inplace=t is F.leaky_relu_ or a["inplace"] is True)
    if t in (torch.clamp, torch.clip, torch.clamp_, torch.clip_):
        a = bind(node, ("input", "min", "max"), {"min": None, "max": None})
        return a and _clamp_form(a["input"], a["min"], a["max"], t in (torch.clamp_, torch.clip_))
    if t in (torch.clamp_min, torch.clamp_min_):
        a = bind(node, ("input", "min"))
        return a and _clamp_form(a["input"], a["min"], None, t is torch.clamp_min_)
    return None


def _method_activation(node: Node) -> ActivationForm | None:
    name = str(node.target)
    base, inplace = (name[:-1], True) if name.endswith("_") else (name, False)
    if base in ("relu", "sigmoid", "tanh"):
        a = bind(node, ("self",))
        canon = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[base]
        return a and ActivationForm(base, canon, a["self"], inplace=inplace)
    if base in ("clamp", "clip"):
        a = bind(node, ("self", "min", "max"), {"min": None, "max": None})
        return a and _clamp_form(a["self"], a["min"], a["max"], inplace)
    if base == "clamp_min":
        a = bind(node, ("self", "min"))
        return a and _clamp_form(a["self"], a["min"], None, inplace)
    return None


def activation_form(modules: Mapping[str, nn.Module], node: Node) -> ActivationForm | None:
    """The activation ``node`` computes, in canonical terms; None when it is not one.
    ``modules`` maps qualified names to the graph's submodules (for ``call_module`` nodes)."""
    if node.op == "call_module":
        if len(node.args) != 1 or node.kwargs:
            return None
        mod = modules.get(str(node.target))
        if mod is None:
            return None
        return _module_activation(mod, node.args[0])
    if node.op == "call_function":
        return _function_activation(node)
    if node.op == "call_method":
        return _method_activation(node)
    return None
