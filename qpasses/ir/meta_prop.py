"""Shape propagation without arithmetic: run a GraphModule on meta tensors.

``torch.fx``'s ShapeProp records each node's ``tensor_meta`` by running the graph on the example
inputs for real: for ResNet-50 that is a whole fp32 forward just to learn shapes. Shapes, dtypes
and strides do not need the numbers, so :func:`meta_propagate` runs the same interpreter with
every tensor on PyTorch's ``meta`` device (tensors with a shape, dtype and strides but no
storage): placeholders and ``get_attr`` values become meta tensors of the same size, strides,
dtype and ``requires_grad`` (parameters stay parameters), and each ``call_module`` runs the
module with its parameters and buffers swapped for meta twins (``torch.func.functional_call``).
What it records is ShapeProp's own record (``tensor_meta`` from ShapeProp's extractor, ``type``).

It refuses (raises :class:`MetaPropUnsupported`, having restored every node's record and every
module's attributes) whenever the meta run cannot be trusted to equal the real one: an op without
a meta kernel, a data-dependent op (``.item()``, ``nonzero``, boolean masks), a real tensor created
inside the graph mixing with meta ones, quantized/sparse/subclass or non-CPU tensors, a module in
training mode (dropout draws random numbers) or with forward hooks (user code), an op other than a pure view given a non-contiguous
tensor (CPU kernels choose their output layout themselves), attention modules whose fused CPU
path differs from the meta path, an input that does not fit. The caller then runs the real
ShapeProp, which also gives the user-facing error message (docs/annotations.md, "How the shapes
are recorded").
The meta run never writes the model's state: module attributes a forward sets (caches, counters,
observer flags) are restored afterwards, and buffers a forward updates in place are meta twins.
"""
from __future__ import annotations

import contextlib
import io
import operator
from typing import Any

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from qpasses.ir.fx import flat_values

__all__ = ["MetaPropUnsupported", "meta_propagate"]

_RECORD_KEYS = ("tensor_meta", "type")
_MISSING = object()


class MetaPropUnsupported(Exception):
    """The graph cannot be shape-propagated on meta tensors; run the real ShapeProp instead."""


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with ``t``'s size, strides, dtype and ``requires_grad`` (a Parameter for a
    Parameter); MetaPropUnsupported for what the meta device cannot mirror exactly."""
    kind = type(t)
    if kind not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided \
            or t.is_quantized or t.is_nested or t.device.type != "cpu":
        raise MetaPropUnsupported(f"{kind.__name__} with layout {t.layout} on {t.device}")
    m = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="meta")
    if kind is torch.nn.Parameter:
        return torch.nn.Parameter(m, requires_grad=t.requires_grad)
    if t.requires_grad:
        m.requires_grad_(True)
    return m


class _MetaShapeProp(ShapeProp):
    """ShapeProp whose values are meta tensors (its ``run_node`` records ``tensor_meta``)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm, fake_mode=None)
        self._meta: dict[int, torch.Tensor] = {}    # id(real tensor) -> its meta twin
        self._keep: list[torch.Tensor] = []         # keeps the ids above unique

    def meta_of(self, t: torch.Tensor) -> torch.Tensor:
        m = self._meta.get(id(t))
        if m is None:
            m = self._meta[id(t)] = _to_meta(t)
            self._keep.append(t)
        return m

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        _check_meta_outputs(result)
        return result

    def placeholder(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().placeholder(target, args, kwargs)
        return self.meta_of(value) if isinstance(value, torch.Tensor) else value

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return self.meta_of(value) if isinstance(value, torch.Tensor) else value

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if not _is_view_function(target, args):
            _require_contiguous(args, kwargs, target)
        return super().call_function(target, args, kwargs)

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target not in _VIEW_METHODS:
            _require_contiguous(args, kwargs, target)
        return super().call_method(target, args, kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        _require_contiguous(args, kwargs, target)
        mod = self.fetch_attr(target)
        kind = type(mod)
        if kind in _REAL_ONLY:
            raise MetaPropUnsupported(f"{kind.__name__} takes another path on meta tensors")
        if kind in _SAME_SHAPE and len(args) == 1 and not kwargs:
            out = _same_shape(mod, args[0])
            if out is not None:
                return out
        tensors = [(name, t) for name, t in list(mod.named_parameters(remove_duplicate=False))
                   + list(mod.named_buffers(remove_duplicate=False)) if t is not None]
        _require_contiguous([t for _, t in tensors], {}, target)
        state = {name: self.meta_of(t) for name, t in tensors}
        if not state:
            return mod(*args, **kwargs)
        return torch.func.functional_call(mod, state, args, kwargs, tie_weights=False)


# Modules whose forward picks another kernel for meta tensors than for CPU tensors (the fused
# fast path of attention checks the device), so that the outputs' strides could differ.
_REAL_ONLY = frozenset({torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer,
                        torch.nn.TransformerEncoder, torch.nn.TransformerDecoderLayer,
                        torch.nn.TransformerDecoder, torch.nn.Transformer})

# Modules (exact types: a subclass may override forward) whose output, for one floating-point
# contiguous input, is a new contiguous tensor of the input's shape and dtype (with ``inplace``
# set: the input itself). Their meta kernels are Python decompositions (milliseconds each), so
# the output is made directly.
_BATCH_NORMS = {torch.nn.BatchNorm1d: (2, 3), torch.nn.BatchNorm2d: (4,),
                torch.nn.BatchNorm3d: (5,)}
_SAME_SHAPE = frozenset(set(_BATCH_NORMS) | {
    torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Hardtanh, torch.nn.LeakyReLU, torch.nn.ELU,
    torch.nn.SiLU, torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.Sigmoid, torch.nn.Tanh,
    torch.nn.GELU, torch.nn.Mish})


def _same_shape(mod: torch.nn.Module, x: Any) -> torch.Tensor | None:
    """The meta output of a :data:`_SAME_SHAPE` module on ``x``, or None (run it for real on
    meta tensors) when ``x`` is not a contiguous floating-point meta tensor or does not fit."""
    if type(x) is not torch.Tensor or not x.is_meta or not x.is_floating_point() \
            or not x.is_contiguous():
        return None
    dims = _BATCH_NORMS.get(type(mod))
    if dims is not None:
        bn: Any = mod
        tensors = [t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)
                   if t is not None]
        if x.dim() not in dims or x.shape[1] != bn.num_features or bn.training \
                or bn.running_mean is None \
                or any(t.dtype != x.dtype or t.shape != (bn.num_features,) for t in tensors):
            return None
    if getattr(mod, "inplace", False) is True:
        return x
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


# Ops that only compute a view or a copy's layout (stride arithmetic shared by every device):
# the one place a non-contiguous tensor may enter. Every other op gets contiguous tensors only:
# for a permuted or channels-last input a CPU kernel chooses its output layout itself (a CPU
# convolution of a permuted input answers in channels-last, its meta kernel contiguously).
_VIEW_FUNCTIONS = frozenset({torch.permute, torch.transpose, torch.flatten, torch.reshape,
                             torch.squeeze, torch.unsqueeze, torch.narrow, torch.chunk,
                             torch.split, torch.t, torch.movedim, torch.unflatten, getattr})
_VIEW_METHODS = frozenset({"permute", "transpose", "view", "reshape", "flatten", "contiguous",
                           "size", "dim", "squeeze", "unsqueeze", "chunk", "split", "expand",
                           "narrow", "t", "unbind", "movedim", "unflatten"})


def _is_view_function(target: Any, args: tuple) -> bool:
    if target is operator.getitem:        # basic indexing only: no tensor in the index
        return not any(isinstance(a, torch.Tensor) for a in flat_values(args[1:]))
    return target in _VIEW_FUNCTIONS


def _require_contiguous(args: Any, kwargs: dict, where: Any) -> None:
    for v in flat_values(args) + (flat_values(kwargs) if kwargs else []):
        if isinstance(v, torch.Tensor) and not v.is_contiguous():
            raise MetaPropUnsupported(f"'{getattr(where, '__name__', where)}' gets a "
                                      "non-contiguous tensor: its CPU kernel may choose "
                                      "another output layout than its meta kernel")


def _check_meta_outputs(value: Any) -> None:
    """Every tensor a node produced must be of a plain type (a real tensor made inside the graph,
    e.g. ``torch.arange``, is fine: its record is the real one, and mixing it with meta tensors
    fails, which refuses the meta run)."""
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise MetaPropUnsupported(f"tensor subclass {type(value).__name__}")
    elif isinstance(value, (tuple, list)):
        for v in value:
            _check_meta_outputs(v)
    elif isinstance(value, dict):
        for v in value.values():
            _check_meta_outputs(v)


def _refusal(gm: torch.fx.GraphModule) -> str | None:
    """Why the modules the graph calls rule out a meta run (None: they do not). Training mode: a
    forward may draw random numbers (dropout) or update statistics; hooks: user code would see
    meta tensors where the real run shows it values. Only called modules count: fx's path
    containers and the GraphModule's own flag do nothing (traced functional calls carry their
    training arguments)."""
    mm = torch.nn.modules.module
    if any(getattr(mm, name, None) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks",
            "_global_module_registration_hooks", "_global_parameter_registration_hooks",
            "_global_buffer_registration_hooks")):
        return "global module hooks are registered"
    try:
        called = [gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    except AttributeError as e:         # a missing module: the real run reports it
        return str(e)
    for mod in called:
        for m in mod.modules():
            if m.training:
                return f"module {type(m).__name__} is in training mode"
            if m._forward_hooks or m._forward_pre_hooks:
                return f"module {type(m).__name__} has forward hooks"
    return None


def meta_propagate(gm: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Record ShapeProp's ``tensor_meta``/``type`` on every node of ``gm`` from a run on meta
    tensors, under ``torch.no_grad``. Raises MetaPropUnsupported (records and module attributes
    restored) when the run fails or produces anything the meta device does not mirror exactly."""
    reason = _refusal(gm)
    if reason is not None:
        raise MetaPropUnsupported(reason)
    saved_meta = {n: tuple(n.meta.get(k, _MISSING) for k in _RECORD_KEYS) for n in gm.graph.nodes}
    saved_attrs = [(m, dict(m.__dict__)) for m in gm.modules()]
    prop = _MetaShapeProp(gm)
    ok = False
    try:
        # ShapeProp prints a traceback before re-raising; a refusal here is not the user's error
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            prop.run(*inputs)
        ok = True
    except MetaPropUnsupported:
        raise
    except Exception as e:  # noqa: BLE001 - any failure means: use the real run instead
        raise MetaPropUnsupported(f"{type(e).__name__}: {e}") from e
    finally:
        for m, attrs in saved_attrs:
            if m.__dict__.keys() != attrs.keys() or any(m.__dict__[k] is not v
                                                        for k, v in attrs.items()):
                m.__dict__.clear()
                m.__dict__.update(attrs)
        if not ok:
            for n, values in saved_meta.items():
                for k, v in zip(_RECORD_KEYS, values):
                    if v is _MISSING:
                        n.meta.pop(k, None)
                    else:
                        n.meta[k] = v
