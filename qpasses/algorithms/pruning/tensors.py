"""Tensor and fx-metadata helpers of the channel pruner: 0-bit kernel masks, attribute access,
slicing tensors along a dim, and ``tensor_meta`` rewrites.

The pruner does its tensor work in numpy: it is small, memory-bound slicing, and numpy never
spins up a thread pool (torch's parallel regions cost milliseconds each on a busy machine).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from qpasses.errors import AnnotationError
from qpasses.ir.annotations import get_qmeta
from qpasses.ir.layers import LayerInfo

__all__ = ["zero_bit_kernels", "set_tensor", "numpy_view", "take",
           "tensor_meta_shape", "float_dtype", "with_shape", "tensor_meta_of",
           "sees_full_windows", "shape_args", "is_observing"]


def zero_bit_kernels(gm: torch.fx.GraphModule, node: torch.fx.Node,
                     info: LayerInfo) -> np.ndarray:
    """Boolean mask of the layer's output kernels that have 0 weight bits."""
    w = get_qmeta(node).weight
    if w is None:
        return np.zeros(info.out_channels, dtype=bool)
    try:
        bits = w.kernel_bits(info.out_channels)
    except AnnotationError as e:
        raise AnnotationError(f"layer '{info.name}': QMeta.weight does not fit the layer: {e} "
                              "(re-run annotate-bitwidths after changing the model)") from None
    return np.asarray(bits, dtype=np.int64) == 0


def set_tensor(owner: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Replace a parameter/buffer/plain tensor attribute by ``value`` (a fresh tensor, owned by
    the caller), keeping its kind (parameter with its requires_grad, buffer, plain attribute)."""
    old = getattr(owner, attr)
    value = value.detach()
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def numpy_view(t: torch.Tensor) -> np.ndarray | None:
    """A numpy view of a CPU tensor numpy can hold, else None."""
    t = t.detach()
    if t.device.type != "cpu" or t.dtype in (torch.bfloat16,) or t.is_quantized \
            or t.dtype.is_complex or not t.is_contiguous() and t.dim() > 4:
        return None
    try:
        return t.numpy()
    except (TypeError, RuntimeError):
        return None


def take(t: torch.Tensor, dim: int, keep: np.ndarray) -> torch.Tensor:
    """A new tensor: ``t`` restricted to indices ``keep`` along ``dim``."""
    a = numpy_view(t)
    if a is not None:
        return torch.from_numpy(np.ascontiguousarray(np.take(a, keep, axis=dim)))
    return t.detach().index_select(dim, torch.as_tensor(keep, dtype=torch.long,
                                                        device=t.device)).clone()


def tensor_meta_shape(node: torch.fx.Node, item: int) -> tuple[int, ...] | None:
    """The recorded shape of a node's output (``item`` >= 0: of that tuple item)."""
    tm = node.meta.get("tensor_meta")
    if tm is None:
        return None
    if item >= 0:
        if isinstance(tm, (list, tuple)) and not hasattr(tm, "shape") and item < len(tm):
            tm = tm[item]
        else:
            return None
    return tuple(int(s) for s in tm.shape) if hasattr(tm, "shape") else None


def float_dtype(node: torch.fx.Node) -> torch.dtype:
    """The node's recorded floating dtype (float32 when it has none)."""
    tm = node.meta.get("tensor_meta")
    if isinstance(tm, (list, tuple)) and not hasattr(tm, "dtype") and tm:
        tm = tm[0]
    dt = getattr(tm, "dtype", None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def _strides_like(old_shape: tuple[int, ...], old_stride: Any,
                  new_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Contiguous strides for ``new_shape`` in the dim order of ``old_stride``."""
    n = len(new_shape)
    order = list(range(n))
    if old_stride is not None and len(old_stride) == n:
        order = sorted(range(n), key=lambda d: (-old_stride[d], d))
    stride = [0] * n
    acc = 1
    for d in reversed(order):
        stride[d] = acc
        acc *= max(new_shape[d], 1)
    return tuple(stride)


def with_shape(tm: Any, shape: tuple[int, ...]) -> Any:
    """``tensor_meta`` with a new shape (and the strides of the same dim order)."""
    if not hasattr(tm, "_replace"):
        return tm
    return tm._replace(shape=torch.Size(shape),
                       stride=_strides_like(tuple(tm.shape), getattr(tm, "stride", None), shape))


def tensor_meta_of(t: torch.Tensor) -> Any:
    """The ``tensor_meta`` shape propagation would record for ``t``."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata
    return _extract_tensor_metadata(t)


def sees_full_windows(info: LayerInfo, mod: Any) -> bool:
    """A constant input channel folds exactly into the layer's bias: every output position of
    the conv sees a full window of real inputs (or the padding repeats the input, so a uniform
    channel stays uniform). Always true for linear layers."""
    if not info.is_conv:
        return True
    if mod is not None and getattr(mod, "padding_mode", "zeros") != "zeros":
        return True
    pad = info.padding
    if isinstance(pad, str):
        return pad == "valid" or all(k == 1 for k in info.kernel_size)
    return all(int(p) == 0 for p in pad)



def shape_args(node: torch.fx.Node) -> list[Any] | None:
    """The size arguments of a view/reshape node (None: not one, or not a literal list)."""
    if node.op == "call_method" and node.target in ("view", "reshape"):
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            return list(rest[0])
        return rest
    if node.op == "call_function" and node.target is torch.reshape:
        s = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
        return list(s) if isinstance(s, (list, tuple)) else None
    return None


def is_observing(mod: nn.Module) -> bool:
    """The quantizer or observer module still records ranges from what it sees."""
    if hasattr(mod, "observing"):
        return bool(mod.observing)
    obs = getattr(mod, "observer_enabled", None)
    if isinstance(obs, torch.Tensor):
        return bool(obs.reshape(-1)[0])
    return False
