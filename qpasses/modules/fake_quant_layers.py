"""Fake-quant layer wrappers and whole-model switches.

``FakeQuantConv1d/2d/3d`` and ``FakeQuantLinear`` are subclasses of the float layer whose forward
fake-quantizes the weight through their ``weight_fake_quant``; :func:`wrap_layer` /
:func:`unwrap_layer` convert between the two with the same parameters and buffers.
:func:`set_fake_quant` and :func:`set_observing` switch every quantizer of a model.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qpasses.errors import NumericsError
from qpasses.modules.fake_quant import FakeQuantize, WeightFakeQuant

__all__ = [
    "EMULATED_ACCUMULATORS", "FakeQuantConv1d", "FakeQuantConv2d", "FakeQuantConv3d", "FakeQuantLinear",
    "fake_quant_modules", "is_fake_quant_layer", "onednn_convolutions", "set_fake_quant",
    "set_observing", "unwrap_layer", "wrap_layer", "wrapper_class",
]


# ------------------------------------------------------------------------------------------------
# layer wrappers: subclasses of the float layer that fake-quantize their weight
# ------------------------------------------------------------------------------------------------

# The key of an emulation engine's values (``emulate-int-sim``) under which it hands each
# fake-quant layer (by module) the integer graph's accumulator of the same layer, float32 in real
# units: ``s_x·s_w·Σ (x − z_x)(w − z_w)``.
EMULATED_ACCUMULATORS = "__accumulators__"


_DIRECT_ONEDNN = threading.local()


@contextlib.contextmanager
def onednn_convolutions() -> Iterator[None]:
    """Within the block, a fake-quant 2-D convolution run without autograd on a channels-last
    float32 CPU input calls oneDNN directly (``torch.mkldnn_convolution``).

    torch's own dispatch sends a 1x1 stride-1 convolution of a batch under 16 on one thread to
    its GEMM path, which first copies a channels-last input to NCHW; oneDNN reads it in place.
    ResNet-50's 1x1 layers at batch 8, one thread: 15-35% faster (the calibration forward
    0.88 s -> 0.81 s). The values are a convolution's, in oneDNN's summation order."""
    before = getattr(_DIRECT_ONEDNN, "on", False)
    _DIRECT_ONEDNN.on = True
    try:
        yield
    finally:
        _DIRECT_ONEDNN.on = before


def _direct_onednn(layer: Any, x: Tensor, w: Tensor) -> bool:
    return (getattr(_DIRECT_ONEDNN, "on", False) and x.dim() == 4 and x.dtype == torch.float32
            and w.dtype == torch.float32 and x.device.type == "cpu"
            and layer.padding_mode == "zeros" and isinstance(layer.padding, tuple)
            and (layer.bias is None or layer.bias.dtype == torch.float32)
            and not torch.is_grad_enabled() and torch.backends.mkldnn.is_available()
            and x.is_contiguous(memory_format=torch.channels_last))


def _conv_forward(self: Any, input: Tensor, emulation: dict[str, Any] | None = None) -> Tensor:
    w = self.weight_fake_quant(self.weight)
    acc = _emulated_accumulator(self, emulation)
    if acc is not None and isinstance(self.padding, tuple) and \
            tuple(acc.shape) == _conv_out_shape(self, input):
        return _FromAccumulator.apply(input, w, self.bias, acc,
                                      (self.stride, self.padding, self.dilation, self.groups))
    if _direct_onednn(self, input, w):
        return torch.mkldnn_convolution(input, w, self.bias, self.padding, self.stride,
                                        self.dilation, self.groups)
    return self._conv_forward(input, w, self.bias)


def _linear_forward(self: Any, input: Tensor, emulation: dict[str, Any] | None = None) -> Tensor:
    w = self.weight_fake_quant(self.weight)
    acc = _emulated_accumulator(self, emulation)
    if acc is not None and tuple(acc.shape) == (*input.shape[:-1], w.shape[0]):
        return _FromAccumulator.apply(input, w, self.bias, acc, None)
    return F.linear(input, w, self.bias)


def _emulated_accumulator(layer: nn.Module, emulation: dict[str, Any] | None) -> Tensor | None:
    if not isinstance(emulation, dict):
        return None
    return emulation.get(EMULATED_ACCUMULATORS, {}).get(layer)


def _conv_out_shape(layer: Any, x: Tensor) -> tuple[int, ...]:
    nd = x.dim() - 2
    return (x.shape[0], layer.out_channels, *[
        (x.shape[2 + d] + 2 * layer.padding[d] - layer.dilation[d] * (layer.kernel_size[d] - 1)
         - 1) // layer.stride[d] + 1 for d in range(nd)])


class _FromAccumulator(torch.autograd.Function):
    """A conv/linear whose forward value is computed elsewhere: ``acc + bias`` with ``acc`` the
    integer graph's accumulator in real units (the exact value of the layer on the fake-quant
    input and weight), and whose backward is the layer's own (input, weight and bias gradients at
    the saved input and fake-quant weight). Saves the duplicate GEMM of an emulating graph."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, acc: Tensor,
                conv: tuple[Any, ...] | None) -> Tensor:  # noqa: D401
        ctx.save_for_backward(x, w)
        ctx.conv, ctx.has_bias = conv, b is not None
        if b is None:
            return acc.clone()
        axis = 1 if conv is not None else -1
        shape = [1] * acc.dim()
        shape[axis] = -1
        return acc + b.detach().to(acc.dtype).view(shape)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.conv is None:
            g2 = g.reshape(-1, g.shape[-1])
            gx = (g @ w.to(g.dtype)) if need_x else None
            gw = (g2.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)) if need_w else None
            gb = g2.sum(0) if need_b and ctx.has_bias else None
            return gx, gw, gb, None, None
        stride, padding, dilation, groups = ctx.conv
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, w, [w.shape[0]] if ctx.has_bias else None, list(stride), list(padding),
            list(dilation), False, [0] * len(stride), groups,
            [need_x, need_w, need_b and ctx.has_bias])
        return gx, gw, gb, None, None


class FakeQuantConv1d(nn.Conv1d):
    """``nn.Conv1d`` whose weight goes through ``weight_fake_quant`` (same parameters and path)."""
    _FLOAT_MODULE = nn.Conv1d
    weight_fake_quant: WeightFakeQuant
    forward = _conv_forward


class FakeQuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight goes through ``weight_fake_quant`` (same parameters and path)."""
    _FLOAT_MODULE = nn.Conv2d
    weight_fake_quant: WeightFakeQuant
    forward = _conv_forward


class FakeQuantConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose weight goes through ``weight_fake_quant`` (same parameters and path)."""
    _FLOAT_MODULE = nn.Conv3d
    weight_fake_quant: WeightFakeQuant
    forward = _conv_forward


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose weight goes through ``weight_fake_quant`` (same parameters and path)."""
    _FLOAT_MODULE = nn.Linear
    weight_fake_quant: WeightFakeQuant
    forward = _linear_forward


_STATIC_WRAPPERS: dict[type, type] = {nn.Conv1d: FakeQuantConv1d, nn.Conv2d: FakeQuantConv2d,
                                      nn.Conv3d: FakeQuantConv3d, nn.Linear: FakeQuantLinear}
_DYNAMIC_WRAPPERS: dict[type, type] = {}


def is_fake_quant_layer(mod: nn.Module) -> bool:
    return isinstance(getattr(mod, "weight_fake_quant", None), WeightFakeQuant) and \
        hasattr(type(mod), "_FLOAT_MODULE")


def _float_base(cls: type) -> type | None:
    for base in cls.__mro__:
        if base in _STATIC_WRAPPERS:
            return base
    return None


def wrapper_class(cls: type) -> type | None:
    """The fake-quant subclass for a float layer class, or None when it cannot be wrapped (not a
    conv/linear, or a subclass with its own ``forward`` that we cannot see into)."""
    if cls in _STATIC_WRAPPERS:
        return _STATIC_WRAPPERS[cls]
    base = _float_base(cls)
    if base is None or cls.forward is not base.forward:
        return None
    if cls not in _DYNAMIC_WRAPPERS:
        fwd = _linear_forward if base is nn.Linear else _conv_forward
        _DYNAMIC_WRAPPERS[cls] = type(f"FakeQuant{cls.__name__}", (cls,),
                                      {"_FLOAT_MODULE": cls, "forward": fwd,
                                       "__module__": __name__,
                                       "__doc__": f"Fake-quant {cls.__qualname__}."})
    return _DYNAMIC_WRAPPERS[cls]


def wrap_layer(mod: nn.Module, weight_fake_quant: WeightFakeQuant) -> nn.Module:
    """A fake-quant copy of ``mod`` sharing its parameters, buffers, submodules and hooks, with
    ``weight_fake_quant`` attached. Raises NumericsError when the class cannot be wrapped."""
    cls = wrapper_class(type(mod))
    if cls is None:
        raise NumericsError(f"cannot fake-quantize {type(mod).__qualname__}: not a conv/linear "
                            "layer, or it overrides forward()")
    new = _same_state_as(mod, cls)
    new.weight_fake_quant = weight_fake_quant
    return new


def _same_state_as(mod: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance sharing ``mod``'s parameters, buffers, submodules and hooks (shallow
    copies of the containers, same tensors)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, (dict, OrderedDict)) else v)
                         for k, v in mod.__dict__.items()})
    return new


def unwrap_layer(mod: nn.Module) -> nn.Module:
    """The inverse of :func:`wrap_layer`: a copy of a fake-quant layer as its float class (same
    parameters, buffers, hooks), without ``weight_fake_quant``; other modules as they are."""
    base = getattr(type(mod), "_FLOAT_MODULE", None)
    if base is None:
        return mod
    new = _same_state_as(mod, base)
    new._modules.pop("weight_fake_quant", None)
    return new


# ------------------------------------------------------------------------------------------------
# whole-model helpers
# ------------------------------------------------------------------------------------------------

def fake_quant_modules(model: nn.Module) -> "OrderedDict[str, FakeQuantize]":
    """Every fake-quant module of ``model`` by qualified name, in module order."""
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantize))


def _select(model: nn.Module, weights: bool, activations: bool) -> Iterable[FakeQuantize]:
    for m in fake_quant_modules(model).values():
        if (m.is_weight_quantizer and weights) or (not m.is_weight_quantizer and activations):
            yield m


def set_fake_quant(model: nn.Module, enabled: bool = True, *, weights: bool = True,
                   activations: bool = True) -> None:
    """Switch fake quantization on/off for the selected quantizers of ``model``."""
    for m in _select(model, weights, activations):
        m.enable_fake_quant(enabled)


def set_observing(model: nn.Module, enabled: bool = True, *, weights: bool = True,
                  activations: bool = True) -> None:
    """Switch range observation on/off (e.g. ``set_observing(gm, True, weights=False)`` to let
    activation ranges follow the data again during QAT)."""
    for m in _select(model, weights, activations):
        m.enable_observer(enabled)
