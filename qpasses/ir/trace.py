"""trace(model, example_inputs) -> GraphModule with shapes and dtypes on every node.

The user's model is never touched: tracing works on a deep copy put in eval mode. Failures are
typed: a non-module gets InputError, an untraceable model TraceError naming the submodule and the
line of Python that failed, example inputs that do not fit InputError naming the node.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import os
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from passes_registry import get_record, set_record
from passes_registry.suggest import did_you_mean

from qpasses.errors import InputError, TraceError
from qpasses.ir.meta_prop import MetaPropUnsupported, meta_propagate
from qpasses.ir.records import MODEL_KEY
_TORCH_DIR = os.path.dirname(torch.__file__)


class _Tracer(torch.fx.Tracer):
    def __init__(self, leaf_modules: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset()):
        super().__init__()
        self._leaf_types = leaf_modules
        self._leaf_names = leaf_names

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or qualname in self._leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def normalize_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """A tensor or a sequence of tensors as a tuple; anything else is an InputError."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, (str, bytes)):
        out = tuple(example_inputs)
        if out and all(isinstance(t, torch.Tensor) for t in out):
            return out
    raise InputError("example_inputs must be a tensor or a tuple of tensors, e.g. "
                     f"(torch.randn(1, 3, 224, 224),); got {type(example_inputs).__name__}")


def _user_frame(exc: BaseException) -> str | None:
    """'file:line: code' of the innermost frame outside torch: the user's line that failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if not fr.filename.startswith(_TORCH_DIR) and "qpasses" + os.sep + "trace.py" not in fr.filename:
            return f"{fr.filename}:{fr.lineno}: {(fr.line or '').strip()}"
    return None


def trace(model: torch.nn.Module, example_inputs: Any,
          leaf_modules: Iterable[type | str] | None = None,
          concrete_args: dict[str, Any] | None = None) -> torch.fx.GraphModule:
    """Symbolically trace a deep copy of ``model`` (eval mode) and propagate shapes.

    ``leaf_modules``: module classes or qualified names to keep as opaque ``call_module`` nodes.
    ``concrete_args``: forwarded to torch.fx for arguments that control Python flow.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"qpasses.trace expects a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    leaf_types, leaf_names = _leaf_modules(model, leaf_modules)
    _check_concrete_args(model, concrete_args)
    root = copy.deepcopy(model).eval()
    tracer = _Tracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(root, concrete_args)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds; re-raised typed
        stack = [qualname for qualname, _ in tracer.module_stack.values()]
        where = stack[-1] if stack and stack[-1] else ""
        mod_type = type(root.get_submodule(where)).__name__ if where else type(root).__name__
        line = _user_frame(e)
        msg = (f"cannot trace {type(model).__name__}: in module '{where or '<root>'}' "
               f"({mod_type}): {type(e).__name__}: {e}")
        if line:
            msg += f"\n  at {line}"
        msg += ("\n  hint: make that module a leaf (trace(..., leaf_modules=[...])) or pass "
                "concrete_args for arguments that steer Python control flow")
        err = TraceError(msg)
        err.module, err.line = where, line  # type: ignore[attr-defined]
        raise err from e
    name = type(model).__name__
    gm = torch.fx.GraphModule(tracer.root, graph, class_name=name)
    set_record(gm, MODEL_KEY, name)
    propagate_shapes(gm, inputs)
    return gm


def _leaf_modules(model: torch.nn.Module, leaf_modules: Any
                  ) -> tuple[tuple[type, ...], frozenset[str]]:
    """``leaf_modules`` split into module classes and qualified names, each checked."""
    if leaf_modules is None:
        return (), frozenset()
    if isinstance(leaf_modules, (str, type)) or not isinstance(leaf_modules, Iterable):
        raise InputError(f"leaf_modules must be a list of module classes or qualified names, "
                         f"got {leaf_modules!r:.60}; write leaf_modules=[{leaf_modules!r:.40}]")
    items = list(leaf_modules)
    bad = [x for x in items if not (isinstance(x, str) or (isinstance(x, type)
                                                           and issubclass(x, torch.nn.Module)))]
    if bad:
        raise InputError(f"leaf_modules must be module classes or qualified names, got {bad!r}")
    names = dict(model.named_modules())
    for x in items:
        if isinstance(x, str) and x not in names:
            raise InputError(f"leaf_modules: {type(model).__name__} has no submodule '{x}'"
                             + did_you_mean(x, [n for n in names if n]))
    return (tuple(x for x in items if isinstance(x, type)),
            frozenset(x for x in items if isinstance(x, str)))


def _check_concrete_args(model: torch.nn.Module, concrete_args: Any) -> None:
    """``concrete_args`` must map names of ``model.forward``'s parameters to values."""
    if concrete_args is None:
        return
    if not isinstance(concrete_args, dict):
        raise InputError(f"concrete_args must be a dict from forward() argument names to "
                         f"values, got {type(concrete_args).__name__}")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no inspectable signature: let torch.fx decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in concrete_args:
        if key not in params:
            raise InputError(f"concrete_args: {type(model).__name__}.forward has no argument "
                             f"{key!r} (its arguments: {', '.join(params) or 'none'})"
                             + did_you_mean(str(key), list(params)))


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Any, fast: bool = True) -> None:
    """Record ``tensor_meta`` (shape, dtype) on every node by running ``gm`` once, no grad.

    ``fast``: run it on meta tensors (no arithmetic, the same records; see
    :mod:`qpasses.ir.meta_prop`), falling back to the real run on example inputs where the meta
    run is refused. ``fast=False`` always runs for real."""
    inputs = normalize_inputs(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) > len(placeholders):
        raise InputError(f"{len(inputs)} example inputs given but the model takes "
                         f"{len(placeholders)} ({', '.join(n.name for n in placeholders)})")
    if fast:
        try:
            meta_propagate(gm, inputs)
            return
        except MetaPropUnsupported:
            pass        # an op the meta device cannot run: the real run below decides
    prop = ShapeProp(gm)
    # ShapeProp prints a traceback to stderr before re-raising; the typed error below says it all.
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(*inputs)
    except Exception as e:  # noqa: BLE001 - user-input error, re-raised typed
        failing = _failing_node(gm, e)
        cause = e.__cause__ if e.__cause__ is not None else e
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise InputError(
            f"running {get_record(gm, MODEL_KEY, type(gm).__name__)} on example inputs of shape "
            f"{shapes} failed at node '{failing}': {type(cause).__name__}: {cause}\n  hint: check "
            "the example input shape (batch, channels, height, width) and dtype") from e


def _failing_node(gm: torch.fx.GraphModule, e: BaseException) -> str:
    # ShapeProp wraps the error in a RuntimeError that names the node in its message.
    text = str(e)
    for n in gm.graph.nodes:
        if f"node {n.name}" in text or f"'{n.name}'" in text:
            return n.name
    for n in gm.graph.nodes:
        if n.op != "placeholder" and "tensor_meta" not in n.meta:
            return n.name
    return "?"
