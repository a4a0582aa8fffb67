"""Lowering rule for conv/linear layers with fake-quant weights: :class:`IntLayer` with integer
weights, an int32 bias and the fastest kernel its accumulator bound proves exact."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
from torch import nn

from qpasses.ir.annotations import QMETA_KEY, get_qmeta
from qpasses.ir.layers import bias_parts, layer_info
from qpasses.modules.fake_quant import WeightFakeQuant
from qpasses.modules.int_sim_layers import make_int_layer
from qpasses.numerics.int_ops import choose_kernel
from qpasses.numerics.weight_codes import weight_codes
from qpasses.algorithms.lowering.biases import remember_zero_kernels, round_bias
from qpasses.algorithms.lowering.config import INT32_MAX, FloatIsland, QType, Rep
from qpasses.algorithms.lowering.memory import (LAYER_BYTES_PER_WEIGHT, check_layer_memory,
                                                layer_memory_guard)
from qpasses.algorithms.lowering.nodes import f32

__all__ = ["LayerRules"]

Node = torch.fx.Node
# DoReFa weights: largest |fake-quant value − code·scale/2| accepted (float32 evaluation
# error of 2·(k/L) − 1, measured <= 2^-24 for 1..16 bits)
_DOREFA_TOL = 2.0 ** -22


class LayerRules:
    """Lowers conv (1-3d, stride, padding, dilation, groups) and linear layers.

    Mixed into :class:`~qpasses.algorithms.lowering.builder.GraphLowering`, whose ``env``,
    ``options``, ``stats`` and emit helpers it uses.
    """

    def lower_layer(self, n: Node, mod: nn.Module) -> Rep:
        """A conv/linear with fake-quant weights on a quantized input: an :class:`IntLayer`
        whose output is the accumulator (float island when a precondition fails)."""
        q = get_qmeta(n)
        if q.float_island is not None:
            return self.float_op(n, q.float_island)
        info = layer_info(self.gm, n)
        if info is None:
            return self.float_op(n, "layer without traced shapes")
        x = self.env[n.args[0].name] if n.args and isinstance(n.args[0], Node) else None
        if x is None or not x.is_int:
            return self.float_op(n, "layer input is not quantized (no activation fake quantizer)")
        x = self.materialize(x, n)
        xq = x.qt
        assert xq is not None
        if xq.per_channel:
            return self.float_op(n, "layer input is an unrequantized accumulator")
        if len(n.args) != 1 or n.kwargs:
            return self.float_op(n, "layer called with extra arguments")
        if getattr(mod, "padding_mode", "zeros") != "zeros":
            return self.float_op(n, f"padding_mode={mod.padding_mode!r} (only zeros is lowered)")
        path, num_weights = str(n.target), mod.weight.numel()
        check_layer_memory(path, num_weights, n.name,
                           mod.weight_fake_quant.integer_codes_bytes(mod.weight)
                           or LAYER_BYTES_PER_WEIGHT)
        try:
            with layer_memory_guard(path, num_weights, n.name):
                params = self._layer_params(n, mod, info, xq)
        except FloatIsland as e:
            return self.float_op(n, str(e))
        int_layer = make_int_layer(mod, **params["init"])
        remember_zero_kernels(int_layer, params["zero_kernels"])
        int_layer.register_buffer("acc_scale", torch.tensor(params["qtype"].scale,
                                                            dtype=torch.float64))
        parts = bias_parts(mod)
        int_layer.register_buffer("bias_base", None if parts is None else parts[0])
        int_layer.register_buffer("bias_fold", None if parts is None else parts[1])
        self.layer_swaps[str(n.target)] = int_layer
        self.modules[str(n.target)] = int_layer
        node = self.emit("call_module", str(n.target), (x.node,), name=n.name, like=n)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        self.stats["num_int_layers"] += 1
        k = params["init"]["kernel"]
        self.kernels[k] = self.kernels.get(k, 0) + 1
        return Rep(node, params["qtype"])

    def _layer_params(self, n: Node, mod: nn.Module, info: Any, xq: QType) -> dict[str, Any]:
        """The integer layer's constructor arguments and accumulator grid: integer weights
        checked to lie on the grid, int32 bias, exactness bound and kernel. The codes come from the
        quantizer where its fast path defines them
        (:meth:`~qpasses.modules.fake_quant.WeightFakeQuant.integer_codes`: no fake-quantized
        copy, on the grid by construction), else from the fake-quantized weight, checked
        (:func:`~qpasses.numerics.weight_codes.weight_codes`). Holds one layer's temporaries at
        a time (float32 blocks, no float64 copy of the weight)."""
        wfq: WeightFakeQuant = mod.weight_fake_quant
        weight = mod.weight
        with torch.no_grad():
            wc = wfq.integer_codes(weight)        # the quantizer's own codes, where it knows them
            w_hat = wfq(weight).detach() if wc is None else None
        scale = wfq.scale.detach().to(torch.float64).reshape(-1)
        zp = wfq.zero_point.detach().to(torch.int64).reshape(-1)
        c_out = weight.shape[0]
        if scale.numel() == 1:
            scale, zp = scale.expand(c_out).clone(), zp.expand(c_out).clone()
        dorefa = wfq.scheme == "dorefa"
        s_eff = scale / 2 if dorefa else scale
        zp_eff = torch.zeros_like(zp) if dorefa else zp
        # DoReFa's quantizer evaluates 2·(k/L) − 1 in float32, up to one float32 ulp
        # (<= 2^-24) off the grid point (2k − L)/L = code·scale/2 that the integer layer uses;
        # the codes are unambiguous (a step is >= 2/(2^16 − 1)) and the difference can only
        # move an exact rounding tie downstream (at most 1 LSB). Without the tolerance no
        # DoReFa layer of >= 2 bits lowers (they all became float islands).
        if wc is None:
            wc = weight_codes(w_hat, s_eff, zp_eff, _DOREFA_TOL if dorefa else None)
        del w_hat
        if wc.num_off:
            raise FloatIsland(f"{wc.num_off} fake-quantized weights are not exactly scale·(code "
                              "− zero point): cannot take integer weights")
        codes = wc.codes
        assert codes is not None
        w_lo, w_hi = wc.lo, wc.hi
        s_x, z_x = xq.scale[0], xq.zero_point
        x_absmax = xq.max_abs_centered
        bound = (int(wc.l1.max()) if wc.l1.numel() else 0) * int(x_absmax)   # exactness bound
        zero_mask = wc.l1 == 0
        del wc
        # bias
        bias = mod.bias
        bias_q = bias_f = None
        if bias is not None:
            sxw = s_x * s_eff                           # float64 of float32 scales
            bq = round_bias(bias_parts(mod), sxw)
            if bool((bq.abs() + bound > INT32_MAX).any()):
                raise FloatIsland("bias / (s_x·s_w) does not fit the int32 accumulator (a kernel "
                                  "with a tiny weight scale?)")
            bias_q = bq.to(torch.int64)
            if self.options.rounding == "float-rne" and self.options.bias == "float":
                act_w = f32(s_x) * s_eff.to(torch.float32)
                bias_f = bias.detach().to(torch.float32) / act_w
        if bound > INT32_MAX:
            raise FloatIsland(f"accumulator bound {bound} exceeds int32")
        x_bits = max(xq.span, 1).bit_length()
        w_bits = 8 if (-128 <= w_lo and w_hi <= 127) else 16
        # torch._int_mm runs once per group: grouped/depthwise convs take the float GEMM path
        fast = choose_kernel(bound, x_bits, w_bits, allow_int8=info.groups <= 4)
        reason = (f"bound {bound} (2^{math.log2(bound + 1):.1f}); x span {x_bits} bits, w "
                  f"{w_bits if w_bits > 8 else 8}-bit" + (" -> int8 GEMM (int32 partial sums)"
                                                          if fast == "int8-mm" else
                                                          " -> float32 GEMM (< 2^24)"
                                                          if fast == "float32" else
                                                          " -> float64 GEMM (< 2^53)"
                                                          if fast == "float64" else
                                                          " -> int64 reference"))
        kernel = "reference" if self.options.backend == "reference" else fast
        init: dict[str, Any] = dict(
            w_q=codes,
            w_zp=zp_eff if bool((zp_eff != 0).any()) else torch.zeros((), dtype=torch.int64),
            x_zero_point=z_x, bias_q=bias_q, bias_f=bias_f, acc_bound=bound, x_bits=x_bits,
            w_bits=w_bits, fast_kernel=fast, kernel=kernel, kernel_reason=reason,
            x_qmin=xq.qmin, x_qmax=xq.qmax)
        if info.is_conv:
            pad = info.padding
            nd = weight.dim() - 2
            if isinstance(pad, str):
                if pad == "valid":
                    pad = (0,) * nd
                else:  # "same"
                    total = [info.dilation[i] * (info.kernel_size[i] - 1) for i in range(nd)]
                    if any(t % 2 for t in total):
                        raise FloatIsland("padding='same' with an asymmetric split")
                    pad = tuple(t // 2 for t in total)
            init["int_padding"] = tuple(int(p) for p in pad)
        bias_max = int(bias_q.abs().max()) if bias_q is not None else 0
        # s_x·s_w per channel: one float64 product each, as Python's float multiply gives
        qt = QType(tuple((s_eff * float(s_x)).tolist()), 0,
                   -(bound + bias_max), bound + bias_max, axis=1 if info.is_conv else -1,
                   fbgemm=(s_x, tuple(s_eff.tolist())), kind="acc")
        return {"init": init, "qtype": qt, "zero_kernels": zero_mask}
