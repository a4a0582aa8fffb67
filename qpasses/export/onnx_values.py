"""The ONNX graph under construction and the values it carries (see :mod:`qpasses.export`).

:class:`Val` is one value of the lowered graph as the ONNX graph holds it: float, integer codes on
a grid (``scale``, ``zero_point``, declared ``[qmin, qmax]``, the 8-bit or 16-bit container), an
accumulator (int32 in the QOperator format, already dequantized float in the QDQ format), or a
pending average-pool window sum (emitted where its consumer decides how). :class:`OnnxGraph`
collects nodes and initializers and names them after the fx nodes they come from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qpasses.errors import ExportError

__all__ = ["OnnxGraph", "Val", "container", "np_dtype", "onnx_grid"]


def container(qmin: int, qmax: int, where: str) -> str:
    """The narrowest ONNX integer container of codes in ``[qmin, qmax]``."""
    for name, (lo, hi) in (("uint8", (0, 255)), ("int8", (-128, 127)), ("uint16", (0, 65535)),
                           ("int16", (-32768, 32767))):
        if lo <= qmin and qmax <= hi:
            return name
    raise ExportError(f"{where}: codes span [{qmin}, {qmax}], wider than a 16-bit container; "
                      "export a narrower grid or use format=qonnx")


def onnx_grid(qmin: int, qmax: int, where: str) -> tuple[str, int]:
    """(container, shift) of activation codes in ``[qmin, qmax]``: every 8-bit grid goes to uint8
    (an int8 grid ``(z, [qmin, qmax])`` is the same grid as uint8 ``(z + 128, [qmin + 128, qmax +
    128])``), because onnxruntime's integer kernels want one activation type end to end."""
    dtype = container(qmin, qmax, where)
    return ("uint8", 128) if dtype == "int8" else (dtype, 0)


def np_dtype(name: str) -> Any:
    return {"uint8": np.uint8, "int8": np.int8, "uint16": np.uint16, "int16": np.int16,
            "int32": np.int32, "int64": np.int64, "float32": np.float32}[name]


@dataclass
class Val:
    """One value of the lowered graph in the ONNX graph.

    ``zero_point``, ``qmin``, ``qmax`` are the int-sim's codes; the ONNX tensor holds them plus
    ``shift`` (see :func:`onnx_grid`). ``kind``: ``float``; ``codes`` (integer codes, ``dtype`` the
    container); ``acc`` (a conv /
    linear accumulator at per-channel ``scale`` along ``axis``; int32 when ``dtype`` is
    ``int32``, already dequantized when it is ``float32``); ``accf`` (the float32 values of an
    int32 accumulator, see :mod:`qpasses.export.onnx_acc`); ``pool`` (an average pool's window
    sums on ``src``, emitted by the consumer, ``post`` the shape ops applied since)."""

    name: str
    kind: str
    dtype: str = "float32"
    scale: Any = None              # float (codes, pool) or float64 array (acc)
    zero_point: int = 0
    qmin: int = 0
    qmax: int = 0
    axis: int | None = None
    src: Val | None = None         # pool: the pooled codes
    pool: Any = None               # pool: the IntAvgPoolSum module
    post: list[tuple[str, Any]] = field(default_factory=list)   # pool: pending shape ops
    shift: int = 0                 # ONNX code = int-sim code + shift
    rank: int = 0                  # accf: rank of the tensor (per-channel constants' shape)

    @property
    def onnx_zp(self) -> int:
        return self.zero_point + self.shift

    @property
    def is_codes(self) -> bool:
        return self.kind == "codes"


class OnnxGraph:
    """Nodes, initializers, inputs and outputs of the model being written."""

    def __init__(self) -> None:
        from onnx import helper
        self.helper = helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.used: set[str] = set()          # tensor names
        self.node_names: set[str] = set()
        self.domains: set[str] = set()
        self.min_opset = 0

    def fresh(self, base: str, names: set[str] | None = None) -> str:
        """A tensor (or node, with ``names=self.node_names``) name not used yet, ``base`` when
        free."""
        names = self.used if names is None else names
        name, i = base, 1
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.add(name)
        return name

    def const(self, base: str, value: Any, dtype: str) -> str:
        """An initializer holding ``value`` as ``dtype``."""
        from onnx import numpy_helper
        arr = np.asarray(value).astype(np_dtype(dtype))
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, *, out: str | None = None,
             domain: str = "", **attrs: Any) -> str:
        """Append ``op`` (node named ``name``) and return its output tensor name."""
        out = self.fresh(out or name)
        if domain:
            self.domains.add(domain)
        self.nodes.append(self.helper.make_node(op, inputs, [out],
                                                name=self.fresh(name, self.node_names),
                                                domain=domain or None, **attrs))
        return out

    # -- quantize / dequantize helpers -----------------------------------------------------------

    def scale_zp(self, base: str, scale: Any, zero_point: Any, dtype: str) -> tuple[str, str]:
        s = self.const(f"{base}.scale", np.asarray(scale, dtype=np.float64).astype(np.float32),
                       "float32")
        z = self.const(f"{base}.zero_point", zero_point, dtype)
        return s, z

    def dequantize(self, v: Val, name: str) -> str:
        """A float tensor holding ``v`` (DequantizeLinear for codes and int32 accumulators)."""
        if v.kind == "float" or (v.kind == "acc" and v.dtype == "float32"):
            return v.name
        if v.kind == "codes":
            s, z = self.scale_zp(f"{name}.dq", v.scale, v.onnx_zp, v.dtype)
            return self.node("DequantizeLinear", [v.name, s, z], f"{name}/dequantize")
        if v.kind == "accf":            # float32 accumulator values (onnx_acc): times the scale
            scale = np.asarray(v.scale, dtype=np.float64).reshape(-1)
            shape = [-1] + [1] * (v.rank - 2) if v.axis == 1 and v.rank > 2 else [-1]
            s = self.const(f"{name}.dq.scale", scale.reshape(shape), "float32")
            return self.node("Mul", [v.name, s], f"{name}/dequantize")
        if v.kind == "acc":
            s, z = self.scale_zp(f"{name}.dq", np.asarray(v.scale), np.zeros(len(v.scale)),
                                 "int32")
            return self.node("DequantizeLinear", [v.name, s, z], f"{name}/dequantize",
                             axis=int(v.axis if v.axis is not None else 1))
        raise ExportError(f"internal: cannot dequantize a {v.kind} value ({name})")

    def quantize(self, x: str, name: str, scale: float, zero_point: int, qmin: int, qmax: int,
                 out: str | None = None) -> Val:
        """QuantizeLinear onto a grid, then a Clip on the codes when the declared range is
        narrower than the container (sub-8-bit widths, fused ReLU ranges)."""
        dtype, shift = onnx_grid(qmin, qmax, name)
        if dtype.endswith("16"):
            self.min_opset = max(self.min_opset, 21)
        s, z = self.scale_zp(f"{name}.q", scale, zero_point + shift, dtype)
        y = self.node("QuantizeLinear", [x, s, z], name if not self.narrow(dtype, shift, qmin, qmax)
                      else f"{name}/quantize",
                      out=None if self.narrow(dtype, shift, qmin, qmax) else out)
        return self.with_range(Val(y, "codes", dtype, float(scale), int(zero_point), shift=shift),
                               qmin, qmax, name, out)

    @staticmethod
    def narrow(dtype: str, shift: int, qmin: int, qmax: int) -> bool:
        """Whether ``[qmin, qmax]`` (int-sim codes) is narrower than the container."""
        info = np.iinfo(np_dtype(dtype))
        return qmin + shift > info.min or qmax + shift < info.max

    def with_range(self, v: Val, qmin: int, qmax: int, name: str, out: str | None = None) -> Val:
        """``v`` (codes filling its container) declared ``[qmin, qmax]``: a Clip when narrower."""
        if self.narrow(v.dtype, v.shift, qmin, qmax):
            return self.clip_codes(v, qmin, qmax, name, out)
        info = np.iinfo(np_dtype(v.dtype))
        return Val(v.name, "codes", v.dtype, v.scale, v.zero_point, int(info.min) - v.shift,
                   int(info.max) - v.shift, shift=v.shift)

    def clip_codes(self, v: Val, qmin: int, qmax: int, name: str, out: str | None = None) -> Val:
        """Clip codes to ``[qmin, qmax]`` (int-sim codes) on the integers."""
        lo = self.const(f"{name}.min", qmin + v.shift, v.dtype)
        hi = self.const(f"{name}.max", qmax + v.shift, v.dtype)
        y = self.node("Clip", [v.name, lo, hi], name, out=out)
        return Val(y, "codes", v.dtype, v.scale, v.zero_point, int(qmin), int(qmax),
                   shift=v.shift)
