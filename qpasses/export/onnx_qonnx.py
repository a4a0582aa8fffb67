"""The QONNX flavour of the exported graph (``export_onnx(format="qonnx")``, docs/export.md).

QONNX (the format of FINN and hls4ml) has no integer tensors: a ``Quant`` node (domain
``qonnx.custom_op.general``) fake-quantizes a float tensor,
``(clip(round(x/s + z), min_int, max_int) − z)·s`` with ``[min_int, max_int]`` given by the
node's ``bitwidth`` input and its ``signed`` / ``narrow`` attributes. :class:`QonnxGraph` keeps the
QDQ walk of :mod:`qpasses.export.onnx_export` and changes what a quantization point is:

- every activation grid ``(s, z, [qmin, qmax])`` becomes one ``Quant`` with the real bit-width
  (``signed`` when ``qmin < 0``, ``narrow`` for ``[−2^(b−1)+1, 2^(b−1)−1]``), then a float
  ``Clip`` when the declared range is narrower than the bit-width's (e.g. a fused ReLU); a
  signed 1-bit grid ``{−1, 0}`` is written unsigned with the zero point moved by one (QONNX reads
  a signed 1-bit ``Quant`` as bipolar ±1, which is not our grid);
- "codes" are the fake-quantized float values, so dequantizing is the identity and integer ops
  on codes (Clip, MaxPool, Reshape) run on them unchanged;
- weights are float initializers behind a ``Quant`` with per-channel scales. ``bitwidth`` must be
  a scalar (QONNX spec; qonnx's executor and datatype inference assume it), so per-kernel widths
  are one ``Quant`` per width over the kernels of that width, concatenated and put back in order
  by a ``Gather`` along the output channels; 0-bit kernels are exact zeros (a pruned graph,
  ``prune-zero-bit-channels``, has them physically removed already);
- biases are the layer's float biases, as in the fake-quant graph (QONNX reproduces the
  fake-quant graph; Brevitas exports unquantized biases the same way);
- lookup tables (``IntLUT``) index a float table with the codes recovered from the grid.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx

from qpasses.ir.annotations import get_qmeta, has_qmeta

from qpasses.export.onnx_values import OnnxGraph, Val

__all__ = ["QONNX_DOMAIN", "QonnxGraph", "quant_range", "weight_grid"]

QONNX_DOMAIN = "qonnx.custom_op.general"
INT32 = 6      # onnx.TensorProto.INT32


def quant_range(qmin: int, qmax: int) -> tuple[int, bool, bool, int]:
    """``(bitwidth, signed, narrow, zero-point offset)`` of the QONNX ``Quant`` whose code range
    covers ``[qmin, qmax]`` most tightly (codes shifted by the offset, see the module doc)."""
    if qmin >= 0:
        b = max(1, int(qmax).bit_length())
        return b, False, qmax == 2 ** b - 2 and b > 1, 0
    b = max(int(-qmin - 1).bit_length(), int(qmax).bit_length()) + 1
    if b == 1:
        return 1, False, False, -int(qmin)        # {-1, 0}: unsigned 1-bit, zero point + 1
    return b, True, qmin == -(2 ** (b - 1)) + 1, 0


def weight_grid(n: torch.fx.Node, mod: Any, w: np.ndarray) -> tuple[np.ndarray, bool, bool]:
    """``(per-kernel bits, signed, narrow)`` of the weights of the lowered layer ``n``: the real
    widths of its annotation (``bits_per_kernel``, else ``bits``), else the layer's ``w_bits``."""
    spec = get_qmeta(n).weight if has_qmeta(n) else None
    c = int(w.shape[0])
    if spec is None:
        return np.full(c, int(mod.w_bits)), bool(w.min(initial=0) < 0), False
    per_kernel = spec.bits_per_kernel
    bits = np.asarray(per_kernel) if per_kernel is not None and len(per_kernel) == c \
        else np.full(c, int(spec.bits))
    return bits, bool(spec.signed), bool(spec.narrow_range)


def _bounds(b: int, signed: bool, narrow: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (b - 1)) + int(narrow), 2 ** (b - 1) - 1
    return 0, 2 ** b - 1 - int(narrow)


class QonnxGraph(OnnxGraph):
    """An :class:`OnnxGraph` whose quantization points are QONNX ``Quant`` nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.domains.add(QONNX_DOMAIN)

    def quant(self, x: str, name: str, scale: Any, zero_point: Any, qmin: int, qmax: int,
              out: str | None = None) -> str:
        """One ``Quant`` of ``x`` onto codes ``[qmin, qmax]`` (+ zero point), no range clip."""
        b, signed, narrow, off = quant_range(qmin, qmax)
        s = self.const(f"{name}.scale", np.asarray(scale, dtype=np.float64).astype(np.float32),
                       "float32")
        z = self.const(f"{name}.zeropt", np.asarray(zero_point, dtype=np.float64) + off,
                       "float32")
        bw = self.const(f"{name}.bitwidth", float(b), "float32")
        return self.node("Quant", [x, s, z, bw], name, out=out, domain=QONNX_DOMAIN,
                         signed=int(signed), narrow=int(narrow), rounding_mode="ROUND")

    def quantize(self, x: str, name: str, scale: float, zero_point: int, qmin: int, qmax: int,
                 out: str | None = None) -> Val:
        b, signed, narrow, off = quant_range(qmin, qmax)
        lo, hi = _bounds(b, signed, narrow)
        clip = (qmin + off, qmax + off) != (lo, hi)
        y = self.quant(x, name if not clip else f"{name}/quant", scale, zero_point, qmin, qmax,
                       out=None if clip else out)
        v = Val(y, "codes", "float32", float(scale), int(zero_point), int(qmin), int(qmax))
        return self.clip_codes(v, qmin, qmax, name, out) if clip else v

    def dequantize(self, v: Val, name: str) -> str:
        if v.kind == "codes":
            return v.name                     # already the fake-quantized float values
        return super().dequantize(v, name)

    def clip_codes(self, v: Val, qmin: int, qmax: int, name: str, out: str | None = None) -> Val:
        """Clip the fake-quantized values to the codes ``[qmin, qmax]`` (float bounds)."""
        s, z = float(v.scale), v.zero_point
        lo = self.const(f"{name}.min", np.float32((qmin - z) * np.float32(s)), "float32")
        hi = self.const(f"{name}.max", np.float32((qmax - z) * np.float32(s)), "float32")
        y = self.node("Clip", [v.name, lo, hi], name, out=out)
        return Val(y, "codes", "float32", v.scale, v.zero_point, int(qmin), int(qmax))

    def with_range(self, v: Val, qmin: int, qmax: int, name: str, out: str | None = None) -> Val:
        return self.clip_codes(v, qmin, qmax, name, out)

    def weights(self, name: str, w: np.ndarray, s_w: np.ndarray, w_zp: np.ndarray,
                bits: np.ndarray, signed: bool, narrow: bool) -> str:
        """The float weights (output channels along 0) of integer codes ``w`` behind ``Quant``
        nodes with the real (per-kernel) bit-widths ``bits``; ``signed`` / ``narrow``: the
        weight grid (``QuantSpec``)."""
        c = w.shape[0]
        shape = [-1] + [1] * (w.ndim - 1)
        s32 = np.asarray(s_w, dtype=np.float64).astype(np.float32)
        wf = ((w.astype(np.float64) - w_zp.reshape(shape)) * s32.astype(np.float64).reshape(
            shape)).astype(np.float32)
        widths = sorted({int(b) for b in bits})
        parts, order = [], []
        for b in widths:
            idx = np.nonzero(bits == b)[0]
            order += idx.tolist()
            tag = f"{name}.weight" if len(widths) == 1 else f"{name}.weight.{b}bit"
            if b == 0:
                parts.append(self.const(tag, np.zeros((len(idx),) + w.shape[1:]), "float32"))
                continue
            lo, hi = _bounds(b, signed, narrow and b > 1)
            src = self.const(f"{tag}_float", wf[idx], "float32")
            node = f"{name}/weight_quant" if len(widths) == 1 else f"{name}/weight_quant_{b}bit"
            parts.append(self.quant(src, node, s32[idx].reshape(shape),
                                    w_zp[idx].reshape(shape), lo, hi))
        y = parts[0] if len(parts) == 1 else self.node("Concat", parts, f"{name}/weight_concat",
                                                       axis=0)
        if order != list(range(c)):
            inv = np.argsort(np.asarray(order))
            y = self.node("Gather", [y, self.const(f"{name}.weight_order", inv, "int64")],
                          f"{name}/weight_order", axis=0)
        return y

    def bias(self, name: str, mod: Any, bias_q: np.ndarray, acc_scale: np.ndarray) -> str:
        """The layer's float bias, as the fake-quant graph adds it (the int-sim's ``bias=int32``
        rounds it onto the accumulator grid first: at most 1 LSB after requantization, see
        docs/export.md); ``bias_q·s_x·s_w`` when the layer has no float bias."""
        b = getattr(mod, "bias", None)
        bf = (b.detach().double().numpy() if b is not None
              else bias_q.astype(np.float64) * np.asarray(acc_scale, dtype=np.float64))
        return self.const(f"{name}.bias", bf.reshape(-1), "float32")

    def lut(self, v: Val, mod: Any, name: str) -> Val:
        """``IntLUT``: the input codes ``round(x/s) + z`` index a table of output values."""
        sx = self.const(f"{name}.in_scale", np.float32(v.scale), "float32")
        q = self.node("Div", [v.name, sx], f"{name}/codes_scaled")
        q = self.node("Round", [q], f"{name}/codes")
        q = self.node("Cast", [q], f"{name}/index_cast", to=INT32)
        off = self.const(f"{name}.in_offset", int(mod.in_qmin) - v.zero_point, "int32")
        idx = self.node("Sub", [q, off], f"{name}/index")
        table = (mod.table.detach().double().numpy() - mod.out_zero_point) * np.float32(
            mod.out_scale)
        y = self.node("Gather", [self.const(f"{name}.table", table, "float32"), idx], name,
                      out=name, axis=0)
        return Val(y, "codes", "float32", float(mod.out_scale), int(mod.out_zero_point),
                   int(mod.qmin), int(mod.qmax))
