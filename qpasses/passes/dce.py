"""dce: remove dead nodes, unused submodules and unused parameters/buffers."""
from __future__ import annotations

import builtins
import functools
import inspect
import operator
from typing import Any

import torch
import torch.fx
from torch import nn

from passes_registry import Pass, PassResult, PreservedAnalyses, register_pass

from qpasses.ir.fx import resolve_attr

# In-place Python operators (x += y on a tensor mutates x).
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                      operator.imatmul, operator.setitem, operator.delitem}
_IMPURE_BUILTINS = {builtins.print, builtins.setattr, builtins.delattr, builtins.exec}
# Containers fx creates on the path to a copied attribute: they hold no code that reads their
# own parameters, so an unused parameter on them can be deleted outright.
_PLAIN_CONTAINERS = (torch.fx.GraphModule, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _name_of(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "")


@functools.lru_cache(maxsize=None)
def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a Python signature
        return None


def _inplace_arg(node: torch.fx.Node) -> bool:
    """``inplace=True`` given by keyword or by position (``F.relu(x, True)``)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op != "call_function" or not node.args:
        return False
    try:
        sig = _signature(node.target)
    except TypeError:  # unhashable target
        sig = None
    if sig is None or "inplace" not in sig.parameters:
        return False
    try:
        bound = sig.bind(*node.args, **node.kwargs)
    except TypeError:
        return False
    return bound.arguments.get("inplace") is True


def _is_inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__") and not name.startswith("_")


def is_impure(node: torch.fx.Node) -> bool:
    """fx's notion of impurity, plus the side effects fx misses on non-aten graphs.

    Also impure: in-place tensor methods and functions (``x.add_()``, ``torch.relu_``), calls
    with ``inplace=True`` or ``out=``, in-place operators (``operator.iadd``), ``print``, and
    modules that mutate state when called: ``inplace=True`` activations and modules in training
    mode that own buffers (BatchNorm updating its running statistics).
    """
    if node.is_impure():
        return True
    if _inplace_arg(node) or "out" in node.kwargs:
        return True
    if node.op == "call_method":
        return _is_inplace_name(str(node.target))
    if node.op == "call_function":
        t = node.target
        if t in _INPLACE_OPERATORS or t in _IMPURE_BUILTINS:
            return True
        return _is_inplace_name(_name_of(t))
    if node.op == "call_module":
        mod = node.graph.owning_module.get_submodule(str(node.target))
        if getattr(mod, "inplace", False) is True:
            return True
        if mod.training and any(True for _ in mod.buffers()):
            return True
    return False


def _used_tensor_slots(gm: torch.fx.GraphModule) -> set[tuple[int, str]]:
    """(id(owner module), attribute name) of every parameter/buffer some node can read."""
    used: set[tuple[int, str]] = set()

    def mark_module(mod: nn.Module) -> None:
        for m in mod.modules():
            for name in list(m._parameters) + list(m._buffers):
                used.add((id(m), name))

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner, attr, value = resolve_attr(gm, str(node.target))
            if isinstance(value, nn.Module):
                mark_module(value)
            elif owner is not None:
                used.add((id(owner), attr))
        elif node.op == "call_module":
            mark_module(gm.get_submodule(str(node.target)))
    return used


def _delete_unused_tensors(gm: torch.fx.GraphModule) -> int:
    used = _used_tensor_slots(gm)
    removed = 0
    for _, mod in gm.named_modules():
        if not (type(mod) is nn.Module or isinstance(mod, _PLAIN_CONTAINERS)):
            continue  # a layer's own code reads its parameters: leave layers whole
        for store in (mod._parameters, mod._buffers):
            for name in list(store):
                if store[name] is not None and (id(mod), name) not in used:
                    del store[name]
                    removed += 1
    return removed


@register_pass
class DCE(Pass):
    """Remove dead nodes, unused submodules and unused parameters/buffers.

    Nodes whose value is never used are erased (torch.fx ``eliminate_dead_code``) unless they
    are placeholders, the output, or impure: fx's impure calls, in-place methods and functions,
    ``inplace=True``/``out=`` calls, in-place operators, ``print``, and modules that mutate state
    (in-place activations, training-mode modules with buffers). Then submodules no node refers
    to are deleted (``delete_all_unused_submodules``), and parameters/buffers no node reads are
    deleted from the root and from plain container modules.

    Requires: -. Establishes: -. Preserves: nothing.

    Statistics: ``num_nodes_removed``, ``num_submodules_removed``, ``num_tensors_removed``.

    Example: graph(fold-batch-norm,dce)

    Rationale:
    - Placeholders are kept even when unused: the graph's calling convention must not change.
    - Parameters of a layer module (Conv2d, BatchNorm...) are never deleted one by one: its own
      code may read them; the layer is deleted whole when unused.
    """
    name = "dce"
    summary = "Remove dead nodes, unused submodules and unused parameters/buffers"
    preserves = PreservedAnalyses.none()

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        n_nodes = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code(is_impure_node=is_impure)
        nodes_removed = n_nodes - len(gm.graph.nodes)
        n_mods = sum(1 for _ in gm.named_modules(remove_duplicate=False))
        gm.delete_all_unused_submodules()
        mods_removed = n_mods - sum(1 for _ in gm.named_modules(remove_duplicate=False))
        tensors_removed = _delete_unused_tensors(gm)
        modified = bool(nodes_removed or mods_removed or tensors_removed)
        return PassResult(modified=modified, stats={
            "num_nodes_removed": nodes_removed, "num_submodules_removed": mods_removed,
            "num_tensors_removed": tensors_removed})


__all__ = ["DCE", "is_impure"]
