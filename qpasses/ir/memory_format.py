"""Whether a graph may run on channels-last activations, node by node.

Memory format changes how a tensor is laid out, never its values: every ATen op, every
``torch.nn`` module and every qpasses module reads its inputs through their strides. What does
not is small and known: ``view`` / ``view_as`` raise on a channels-last tensor whose spatial dims
would have to merge with the channel dim, and a handful of methods (``stride``,
``is_contiguous``, ``data_ptr``, ...) expose the layout itself. Code the library cannot see into
(a user's leaf module, a wrapped Python function, an op of a custom extension) might assume a
contiguous input, so it blocks the switch as well. A view the check lets through (its input not
4-D, or a single pixel per channel) that still fails raises rather than computing anything
wrong; ``calibrate`` then reruns its batch as given.

On CPU, oneDNN's convolutions and torch's pooling run faster on channels-last (NHWC) activations
than on NCHW ones, which they reorder on every call (ResNet-50, batch 8, one thread: the forward
0.88 s -> 0.79 s, max-pooling 48 ms -> 3 ms). Float results differ from an NCHW run by summation
order only (a few ulps).
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from qpasses.ir.fx import node_shape

__all__ = ["channels_last_blocker", "to_channels_last"]

# tensor methods that see the layout (a different answer on channels-last), or that fail on it
_LAYOUT_METHODS = frozenset({"stride", "is_contiguous", "data_ptr", "storage", "untyped_storage",
                             "storage_offset", "set_", "as_strided", "as_strided_"})
_VIEW_METHODS = frozenset({"view", "view_as"})
_FUNCTION_MODULES = ("torch", "torchvision", "qpasses", "_operator", "operator", "math", "builtins")
_MODULE_PACKAGES = ("torch.nn.", "torchvision.", "qpasses.")


def _single_pixel(node: torch.fx.Node) -> bool:
    """A view of a 4-D value whose spatial size is 1 (e.g. ``x.view(n, -1)`` after global
    pooling) is valid whatever the layout: channel is then the only non-trivial inner dim."""
    shape = node_shape(node.args[0]) if node.args else None
    return shape is not None and (len(shape) != 4 or shape[2] * shape[3] == 1)


def _function_ok(target: object) -> bool:
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return target.namespace in ("aten", "prims")
    if target in (torch.Tensor.view, torch.Tensor.view_as, torch.as_strided):
        return False
    mod = getattr(target, "__module__", None) or ""
    return target is getattr(operator, getattr(target, "__name__", ""), None) or any(
        mod == m or mod.startswith(m + ".") for m in _FUNCTION_MODULES)


def channels_last_blocker(gm: torch.fx.GraphModule) -> str | None:
    """The first node that keeps ``gm`` from running on channels-last activations (in words), or
    None when every node reads its inputs through their strides (module docstring)."""
    for node in gm.graph.nodes:
        if node.op == "call_method":
            name = str(node.target)
            if name in _LAYOUT_METHODS or (name in _VIEW_METHODS and not _single_pixel(node)):
                return f"node '{node.name}' calls .{name}()"
        elif node.op == "call_function":
            if node.target in (torch.Tensor.view, torch.Tensor.view_as) and _single_pixel(node):
                continue
            if not _function_ok(node.target):
                return f"node '{node.name}' calls {getattr(node.target, '__name__', node.target)}"
        elif node.op == "call_module":
            cls = type(gm.get_submodule(str(node.target)))
            if not cls.__module__.startswith(_MODULE_PACKAGES):
                return f"node '{node.name}' calls module {cls.__module__}.{cls.__qualname__}"
    return None


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` in channels-last memory format when it is a 4-D floating-point CPU tensor, else
    ``t`` itself."""
    if t.dim() == 4 and t.is_floating_point() and t.device.type == "cpu":
        return t.contiguous(memory_format=torch.channels_last)
    return t
