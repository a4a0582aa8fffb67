"""Integer conv/linear layers of the integer simulation (see :mod:`qpasses.modules.int_sim`).

:class:`IntLayer` computes ``Σ(x − z_x)(w − z_w) + b_q`` on the reference int64 kernel or the fast
kernel its accumulator bound proves exact, then an optional fused :class:`Requantize`. The weight
codes ``w_q`` are stored in the narrowest signed integer dtype that holds them (int8 for 8-bit
codes, int16, int32, else int64: :func:`~qpasses.numerics.int_ops.narrow_int`); every kernel widens
them to int64 (or its own operand type) where it computes, so the storage changes no result. The
subclasses :class:`IntConv1d`/``2d``/``3d`` and :class:`IntLinear` are also subclasses of the
float layer classes, so the report and the cost analyses see the layer at its module path.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from qpasses.errors import NumericsError
from qpasses.numerics.fixed_point import channel_view
from qpasses.numerics.int_conv_fast import (RowBlocks, conv_blocks, fast_conv, fast_linear,
                                            linear_blocks, prepare_conv, prepare_linear,
                                            rows_to_output)
from qpasses.numerics.int_conv_onednn import (PreparedOnednnConv, onednn_conv_blocks,
                                              prepare_onednn_conv, window_fits_float32)
from qpasses.numerics.int_ops import codes_dtype, int_conv, int_linear, narrow_int
from qpasses.numerics import int_conv_onednn
from qpasses.numerics.fast_requant import RequantPlan
from qpasses.numerics.native_requant import native_apply
from qpasses.numerics.quant_utils import is_compiling
from qpasses.modules.tensor_keys import tensor_versions
from qpasses.modules.int_sim import IntSimModule, Requantize

__all__ = ["INT_LAYER_CLASSES", "IntConv1d", "IntConv2d", "IntConv3d", "IntLayer", "IntLinear",
           "kernel_table", "make_int_layer"]

_I64 = torch.int64


class IntLayer(IntSimModule):
    """Mixin of the integer conv/linear layers (subclasses of the float layer classes, so the
    report, cost and accumulator-width analyses still see the layer at its module path; the float
    ``weight``/``bias`` Parameters are kept, shared with the original model)."""

    w_q: Tensor
    w_zp: Tensor
    bias_q: Tensor | None
    bias_f: Tensor | None
    channel_axis: int = 1
    # Called as ``acc_sink(layer, acc)`` after each fast forward with the layer's accumulator
    # ``Σ (x − z_x)(w − z_w)`` (no bias) as float32 in the output's shape: set by the emulation
    # engine (``emulate-int-sim``) so the fake-quant layer takes its value instead of
    # convolving again. Not state: never saved or copied.
    acc_sink: Callable[["IntLayer", Tensor], None] | None = None

    def _init_int(self, w_q: Tensor, w_zp: Tensor, x_zero_point: int, bias_q: Tensor | None,
                  bias_f: Tensor | None, acc_bound: int, x_bits: int, w_bits: int,
                  fast_kernel: str, kernel: str, kernel_reason: str, x_qmin: int,
                  x_qmax: int) -> None:
        # narrow storage (int8 for 8-bit codes: 1/8 of int64); the kernels widen
        self.register_buffer("w_q", narrow_int(w_q if not (w_q.dtype.is_floating_point or
                                                           w_q.dtype == torch.bool)
                                               else w_q.to(_I64)))
        self.register_buffer("w_zp", w_zp.to(_I64))
        self.register_buffer("bias_q", None if bias_q is None else bias_q.to(_I64))
        self.register_buffer("bias_f", None if bias_f is None else bias_f.to(torch.float32))
        self.x_zero_point = int(x_zero_point)
        self.x_qmin, self.x_qmax = int(x_qmin), int(x_qmax)   # declared input range
        self._prepared: tuple[Any, Any] | None = None          # (key, prepared weights)
        self.acc_bound = int(acc_bound)          # |Σ (x − z)(w − z_w)| of every partial sum
        self.x_bits, self.w_bits = int(x_bits), int(w_bits)
        self.fast_kernel, self.kernel, self.kernel_reason = fast_kernel, kernel, kernel_reason
        self.requant: Requantize | None = None
        self.acc_shift = 0       # bias fractional bits: acc = (Σ << acc_shift) + b_q
        self._declare()

    @property
    def acc_max(self) -> int:
        """Largest |acc| the layer can produce: ``(bound << acc_shift) + max |b_q|``."""
        bias_max = int(self.bias_q.abs().max()) if self.bias_q is not None and \
            self.bias_q.numel() else 0
        return (self.acc_bound << self.acc_shift) + bias_max

    def _declare(self) -> None:
        self.acc_bits = self.acc_max.bit_length() + 1
        if self.requant is not None:
            self.qmin, self.qmax = self.requant.qmin, self.requant.qmax
        else:
            self.qmin, self.qmax = -self.acc_max, self.acc_max

    def set_requant(self, rq: Requantize | None) -> None:
        """Fuse an output requantization (None: output the accumulator)."""
        self.requant = rq
        self._declare()

    def set_acc_shift(self, shift: int, bias_q: Tensor | None) -> None:
        """Keep ``shift`` fractional bits of the bias: the accumulator becomes
        ``(Σ << shift) + b_q`` at scale ``s_x·s_w / 2^shift`` (the caller rescales the requant)."""
        self.acc_shift = int(shift)
        if bias_q is not None:
            self.bias_q = bias_q.to(_I64)
        self._declare()

    @property
    def float_bias_fused(self) -> bool:
        """The fused requantization adds fbgemm's float bias (``float-rne``) instead of ``b_q``."""
        return (self.requant is not None and self.requant.rounding == "float-rne"
                and self.bias_f is not None)

    def set_backend(self, backend: str) -> bool:
        """Also switch the kernel: ``reference``, or on ``fast`` the kernel the bound proved."""
        k = "reference" if backend == "reference" else self.fast_kernel
        changed = self.kernel != k
        self.kernel = k
        return super().set_backend(backend) or changed

    @property
    def kernel_now(self) -> str:
        """``kernel``, except ``reference`` while tracing (see :attr:`IntSimModule.fast`)."""
        return "reference" if is_compiling() else self.kernel

    def accumulate(self, x: Tensor, kernel: str | None = None, with_bias: bool = True) -> Tensor:
        """``Σ (x − z_x)(w − z_w) [+ b_q]`` as int64 on ``kernel`` (default: ``self.kernel``)."""
        k = kernel or self.kernel_now
        bias = self.bias_q if with_bias else None
        if k == "reference":
            acc = self._reference_acc(x, with_bias=False)
        else:
            # without a shift the bias joins the int8 kernel's offset correction (one pass)
            acc = self._fast_acc(x, self._prepare(k), None if self.acc_shift else bias)
            if not self.acc_shift:
                return acc
        if self.acc_shift:
            acc = acc << self.acc_shift
        if bias is not None:
            acc = acc + channel_view(bias, acc, self.channel_axis, "bias")
        return acc

    def _w_zero_point(self) -> Tensor:
        """``w_zp``, a 0-d tensor when it is per tensor (never a Python int: no data-dependent
        branch while tracing)."""
        return self.w_zp.reshape(()) if self.w_zp.numel() == 1 else self.w_zp

    def _prepare(self, kernel: str) -> Any:
        key = (kernel, id(self.w_q), self.w_q._version, id(self.w_zp), self.w_zp._version)
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, self._prepare_weights(kernel))
        return self._prepared[1]

    def _prepare_weights(self, kernel: str) -> Any:
        raise NotImplementedError

    def _fast_acc(self, x: Tensor, prepared: Any, add: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def _reference_acc(self, x: Tensor, with_bias: bool) -> Tensor:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # Loaded codes keep their values whatever dtype they were saved in (int64 by older
        # versions, or codes wider than this layer's): the buffer takes their narrowest dtype.
        w = state_dict.get(prefix + "w_q")
        if isinstance(w, Tensor) and not w.dtype.is_floating_point and w.dtype != torch.bool \
                and self.w_q is not None:
            dt = codes_dtype(w.detach())
            if dt != self.w_q.dtype:
                self._buffers["w_q"] = self.w_q.to(dt)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_prepared"] = None          # derived, rebuilt on first use
        state.pop("acc_sink", None)        # the emulation engine's, not the layer's
        return state

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if self.kernel_now != "reference":
            return self._fast_forward(x)
        if self.requant is None:
            return self.accumulate(x)
        if self.float_bias_fused:
            return self.requant(self.accumulate(x, with_bias=False), bias_f=self.bias_f)
        return self.requant(self.accumulate(x), owned=True)

    def _fast_forward(self, x: Tensor) -> Tensor:
        """Accumulator rows from the fast kernel, then one fused pass per chunk: the kernel's
        offset, the bias and its fractional bits, and the requantization (:class:`RequantPlan`)
        straight into narrow output codes."""
        # a direct int8 convolution where it is exact (then the GEMM weights are never prepared)
        p = self._direct(x) or self._prepare(self.kernel)
        run, rebuild = self._blocks(x, p)
        if self.acc_sink is not None:
            run = _tee_rows(self, run, rebuild, self.acc_sink)
        plan, add = self._epilogue(p)
        rq = self.requant
        # no plan: the accumulator itself (e.g. logits), or a requantization whose int32
        # preconditions the lowering could not prove for every accumulator (checked per value)
        dt = self.out_dtype if plan is not None or rq is None else _I64
        out = torch.empty((run.rows, int(self.w_q.shape[0])), dtype=dt)
        for r0, r1, acc in run.blocks:
            if plan is not None:
                if not native_apply(plan, acc, out[r0:r1]):     # one compiled pass, or eager
                    plan.apply(acc, out[r0:r1], owned=True)
                continue
            a = acc.round().to(_I64) if acc.is_floating_point() else acc.to(_I64)
            if self.acc_shift:
                a <<= self.acc_shift
            out[r0:r1] = a if add is None else a.add_(add)
        if plan is None and rq is not None:
            return rq.reference(rebuild(out), self.bias_f if self.float_bias_fused
                                else None).to(self.out_dtype)
        return rebuild(out)

    def _epilogue(self, p: Any) -> tuple[RequantPlan | None, Tensor | None]:
        """(plan, A − acc·2^k per channel): the int8 kernel's offset and the integer bias folded
        into one int64 vector; cached until the weights or the requantization change."""
        rq = self.requant
        key = (self.kernel, type(p).__name__, self.x_zero_point) + tensor_versions(
            self.w_q, self.w_zp, self.bias_q, self.bias_f) + (self.acc_shift, id(rq)) + (
            rq.cache_key() if rq is not None else ())

        def build() -> tuple[RequantPlan | None, Tensor | None]:
            k = self.acc_shift
            offset = (p.x_offset - self.x_zero_point) * p.w_colsum \
                if getattr(p, "kernel", "") == "int8-mm" and p.x_offset != self.x_zero_point \
                else None
            add = None if offset is None else offset << k
            float_bias = self.float_bias_fused
            if self.bias_q is not None and not float_bias:
                add = self.bias_q.clone() if add is None else add + self.bias_q
            if rq is None or not rq.proven:
                return None, add
            return rq.plan(self.acc_max, bias_f=self.bias_f if float_bias else None,
                           pre_shift=k, pre_add=add), add
        return self._cached("epilogue-" + type(p).__name__, key, build)   # one per kernel

    def _blocks(self, x: Tensor, p: Any) -> tuple[RowBlocks, Any]:
        """(the fast kernel's accumulator as blocks of rows (pixels, out channels), the function
        from the (rows, out channels) result to the output tensor)."""
        raise NotImplementedError

    def _direct(self, x: Tensor) -> Any:
        """Prepared weights of a direct kernel that replaces ``_int_mm`` for this input, or None
        (:class:`_IntConv`: oneDNN's int8 convolution)."""
        return None

    def cpu_engine(self) -> str:
        """What computes this layer's accumulators for a CPU input now: ``reference`` (the int64
        kernels), ``onednn-conv`` (oneDNN's direct u8 × s8 convolution, chosen where it is exact:
        ``int_conv_onednn``) or ``kernel`` (the fast GEMM kernel the bound proved)."""
        if self.kernel == "reference":
            return "reference"
        return "onednn-conv" if self._direct_cpu() is not None else self.kernel

    def _direct_cpu(self) -> Any:
        """:meth:`_direct` for a CPU input of the layer's usual rank."""
        return None

    def _int_repr(self) -> str:
        out = f"kernel={self.kernel} (fast={self.fast_kernel}), acc_bits={self.acc_bits}"
        if self.acc_shift:
            out += f", bias_frac_bits={self.acc_shift}"
        if self.requant is not None:
            out += f", requant=({self.requant.extra_repr()})"
        return out


def _tee_rows(layer: IntLayer, run: RowBlocks, rebuild: Any,
              sink: Callable[[IntLayer, Tensor], None]) -> RowBlocks:
    """``run`` whose blocks are also copied (before the epilogue may overwrite them) into one
    float32 (rows, O) tensor, handed to ``sink`` in the output's shape once every block passed."""
    rows = torch.empty((run.rows, int(layer.w_q.shape[0])), dtype=torch.float32,
                       device=layer.w_q.device)

    def blocks() -> Any:
        for r0, r1, acc in run.blocks:
            rows[r0:r1] = acc
            yield r0, r1, acc
        if run.offset is not None:
            rows.add_(run.offset.to(torch.float32))
        sink(layer, rebuild(rows))
    return RowBlocks(run.rows, run.offset, run.out_sizes, blocks())


class _IntConv(IntLayer):
    """What the integer convolutions of every dimension share: the reference accumulator with
    integer padding, and the fast kernels' weight preparation and row blocks; ``IntConv1d/2d/3d``
    add the float base class."""
    int_padding: tuple[int, ...]

    def _reference_acc(self, x: Tensor, with_bias: bool) -> Tensor:
        return int_conv(x, self.w_q, self.bias_q if with_bias else None, stride=self.stride,
                        padding=self.int_padding, dilation=self.dilation, groups=self.groups,
                        x_zero_point=self.x_zero_point,
                        w_zero_point=self._w_zero_point(),
                        kernel="reference")

    def _prepare_weights(self, kernel: str) -> Any:
        return prepare_conv(self.w_q, self.w_zp, kernel=kernel, stride=self.stride,
                            padding=self.int_padding, dilation=self.dilation, groups=self.groups,
                            x_qmin=self.x_qmin, x_qmax=self.x_qmax)

    def _fast_acc(self, x: Tensor, prepared: Any, add: Tensor | None = None) -> Tensor:
        return fast_conv(x, prepared, self.x_zero_point, add)

    def _direct(self, x: Tensor) -> PreparedOnednnConv | None:
        """oneDNN's u8 × s8 convolution (no im2col) for an ``int8-mm`` 2-d layer on CPU, where
        its float32 accumulators are exact for this layer: a bound within 2^24, or a fused
        requantization whose window they cannot cross (``int_conv_onednn``; else None)."""
        if x.dim() != 4 or x.is_cuda:
            return None
        return self._direct_cpu(tuple(x.shape[1:]))

    def _direct_cpu(self, image: tuple[int, ...] | None = None) -> PreparedOnednnConv | None:
        """``image``: the input's (C, H, W), for which the weights are packed in the layout
        oneDNN's kernel reads (another size still runs, reordering the weights on every call)."""
        if self.kernel != "int8-mm" or self.w_q.dim() != 4 or not int_conv_onednn.ENABLED:
            return None
        rq = self.requant
        base = (self.x_zero_point, self.x_qmin, self.x_qmax, self.acc_shift, id(rq)) + \
            tensor_versions(self.w_q, self.w_zp, self.bias_q, self.bias_f) + (
                rq.cache_key() if rq is not None else ())

        def build() -> PreparedOnednnConv | None:
            wz = self.w_zp.reshape(-1, 1, 1, 1) if self.w_zp.numel() > 1 else self.w_zp.reshape(())
            od = prepare_onednn_conv(self.w_q.to(_I64) - wz, stride=self.stride,
                                     padding=self.int_padding, dilation=self.dilation,
                                     groups=self.groups, x_qmin=self.x_qmin, x_qmax=self.x_qmax,
                                     x_zero_point=self.x_zero_point, image=image)
            if od is None or self.acc_max <= 2 ** 24:
                return od
            plan, _ = self._epilogue(od)
            return od if plan is not None and window_fits_float32(*plan.window,
                                                                  plan.pre_shift) else None
        # without an input size (cpu_engine), whatever a forward packed answers as well
        return self._cached("onednn", base + (image,), build,
                            reuse=(lambda kept: kept[:-1] == base) if image is None else None)

    def _blocks(self, x: Tensor, p: Any) -> tuple[RowBlocks, Any]:
        run = onednn_conv_blocks(x, p, self.x_zero_point) if isinstance(p, PreparedOnednnConv) \
            else conv_blocks(x, p, self.x_zero_point)
        n = x.shape[0]
        return run, lambda rows: rows_to_output(rows, n, run.out_sizes)

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + ", " + self._int_repr()  # type: ignore[arg-type]


class IntConv1d(_IntConv, nn.Conv1d):
    """Integer Conv1d (see :class:`IntLayer`)."""


class IntConv2d(_IntConv, nn.Conv2d):
    """Integer Conv2d (see :class:`IntLayer`)."""


class IntConv3d(_IntConv, nn.Conv3d):
    """Integer Conv3d (see :class:`IntLayer`)."""


class IntLinear(IntLayer, nn.Linear):
    """Integer Linear (see :class:`IntLayer`); per-channel parameters along the last dim."""

    channel_axis = -1

    def _reference_acc(self, x: Tensor, with_bias: bool) -> Tensor:
        return int_linear(x, self.w_q, self.bias_q if with_bias else None,
                          x_zero_point=self.x_zero_point,
                          w_zero_point=self._w_zero_point(),
                          kernel="reference")

    def _prepare_weights(self, kernel: str) -> Any:
        return prepare_linear(self.w_q, self.w_zp, kernel=kernel, x_qmin=self.x_qmin,
                              x_qmax=self.x_qmax)

    def _fast_acc(self, x: Tensor, prepared: Any, add: Tensor | None = None) -> Tensor:
        return fast_linear(x, prepared, self.x_zero_point, add)

    def _blocks(self, x: Tensor, p: Any) -> tuple[RowBlocks, Any]:
        lead = x.shape[:-1]
        return (linear_blocks(x, p, self.x_zero_point),
                lambda rows: rows.reshape(*lead, rows.shape[-1]))

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + ", " + self._int_repr()


INT_LAYER_CLASSES: dict[type, type] = {nn.Conv1d: IntConv1d, nn.Conv2d: IntConv2d,
                                       nn.Conv3d: IntConv3d, nn.Linear: IntLinear}


def make_int_layer(layer: nn.Module, **int_params: Any) -> IntLayer:
    """An integer copy of a (fake-quant) conv/linear module sharing its Parameters; the weight
    fake quantizer is dropped."""
    base = next((b for b in type(layer).__mro__ if b in INT_LAYER_CLASSES), None)
    if base is None:
        raise NumericsError(f"{type(layer).__qualname__} is not a conv/linear layer")
    cls = INT_LAYER_CLASSES[base]
    new = cls.__new__(cls)
    state = {}
    for k, v in layer.__dict__.items():
        state[k] = dict(v) if k in ("_parameters", "_buffers", "_modules") else v
    state["_modules"].pop("weight_fake_quant", None)
    for k in [k for k in state if "hook" in k and isinstance(state[k], dict)]:
        state[k] = type(state[k])()
    new.__dict__.update(state)
    new.__dict__.pop("weight_fake_quant", None)
    padding = int_params.pop("int_padding", None)
    new._init_int(**int_params)
    if padding is not None:
        new.int_padding = padding
    return new


def kernel_table(gm: torch.fx.GraphModule) -> list[dict[str, Any]]:
    """One row per integer layer: module path, kernel in use, fast kernel, what runs it on CPU
    (:meth:`IntLayer.cpu_engine`), bound, widths, why."""
    rows = []
    for name, m in gm.named_modules():
        if isinstance(m, IntLayer):
            rows.append({"layer": name, "kernel": m.kernel, "fast_kernel": m.fast_kernel,
                         "cpu_engine": m.cpu_engine(),
                         "acc_bound": m.acc_bound, "acc_bits": m.acc_bits, "x_bits": m.x_bits,
                         "acc_shift": m.acc_shift,
                         "w_bits": m.w_bits, "reason": m.kernel_reason})
    return rows
