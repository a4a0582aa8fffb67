"""An independent interpreter of lowered integer graphs (the oracle of ``verify-int-sim``).

It evaluates every integer-simulation node from the module's *parameters* with its own arithmetic,
written from the specification (docs/int-sim.md, "Integer arithmetic") rather than from the
library code it checks: numpy int64 and Python integers instead of torch; ``QuantizeMultiplier``
with exact rational arithmetic (``fractions``, vectorized exactly per channel in
:mod:`qpasses.algorithms.int_sim_reference_kernels`); gemmlowp's SRDHM/RDBPOT, single rounding and
HAWQ's round-half-even from the floor quotient and its remainder against half (not the library's
nudge formulas); convolution as a sum over kernel offsets of strided slices (no im2col; each
offset an exact matmul, float64 only under the 2^53 accumulator bound); pooling windows from
PyTorch's index formulas. Shape-only ops and float islands run through torch (they are not
integer arithmetic). Requantizations and exact adds first try a small C kernel written from the
same integer definitions (:mod:`qpasses.numerics.native_reference`; LayerNorm: ``native_norm_*``).

``run(inputs)`` returns every node's value; :func:`compare` finds the first node where two runs
differ.
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.fx

from qpasses.algorithms.int_sim_reference_kernels import (block_slices, channel_slice, code_dtype,
                                                          conv_exact, exact_add, exact_matmul,
                                                          quantize_multipliers_exact, requant_fixed)
from qpasses.algorithms.int_sim_reference_lut import lut_ref
from qpasses.modules.int_sim import Dequantize, Quantize, Requantize
from qpasses.modules.int_sim_affine import IntAffine, IntConstant
from qpasses.modules.int_sim_pad import IntPad
from qpasses.modules.int_sim_layers import IntLayer, IntLinear
from qpasses.modules.int_sim_ops import (IntAdd, IntAvgPoolSum, IntCat, IntClamp, IntLUT,
                                         IntMaxPool, IntMul)

__all__ = ["ReferenceInterpreter", "quantize_multiplier_exact", "requant_ref"]

_I64 = np.int64


# ------------------------------------------------------------------------------------------------
# arithmetic from the spec


def quantize_multiplier_exact(m: float, bits: int = 31) -> tuple[int, int]:
    """TFLite QuantizeMultiplier with exact rationals: ``m ≈ mult·2^(shift − bits)``."""
    if m <= 0:
        return 0, 0
    f, e = math.frexp(m)
    scaled = Fraction(f) * (1 << bits)
    mult = math.floor(scaled + Fraction(1, 2))       # rha of a positive number
    if mult == 1 << bits:
        mult //= 2
        e += 1
    if e < -31:
        return 0, 0
    return mult, e


def _pow2(e: np.ndarray) -> np.ndarray:
    return np.power(np.int64(2), e.astype(_I64))


def _div_round(v: np.ndarray, t: np.ndarray, mode: str) -> np.ndarray:
    """Round ``v / 2**t`` (t >= 0, broadcastable to v): rha, rhu or rne. The floor quotient is
    numpy's arithmetic ``>>`` on int64 (floor division by 2^t, whole arrays), the remainder
    ``v − q·2^t`` decides the rounding against half of 2^t."""
    t = np.asarray(t, dtype=_I64)
    p = _pow2(t)
    q = np.right_shift(v, t)
    rem = np.bitwise_and(v, p - 1)            # v − q·2^t in [0, 2^t) (two's complement)
    # half of 2^t; for t = 0 (rem = 0, exact) a bound never reached, so there is no tie
    half = np.where(t > 0, p // 2, np.int64(1) << 62)
    # up when rem > half, or rem == half and the tie goes up: rem + [tie goes up] > half
    if mode == "rhu":
        up = rem >= half
    elif mode == "rha":
        up = rem + (v >= 0) > half
    else:  # rne
        up = rem + (q & 1) > half
    return q + up


def _channel(a: np.ndarray, like: np.ndarray, axis: int | None) -> np.ndarray:
    if a.size == 1:
        return a.reshape(())
    shape = [1] * like.ndim
    shape[(axis if axis is not None else 1) % like.ndim] = a.size
    return a.reshape(shape)


def requant_ref(x: np.ndarray, reals: np.ndarray, rounding: str, bits: int, axis: int | None,
                out_zp: int, qmin: int, qmax: int, scale_f32: np.ndarray | None = None,
                bias_f: np.ndarray | None = None) -> np.ndarray:
    """``clamp(z + contract(x·M))`` with the multipliers re-derived from the real scales."""
    if rounding == "float-rne":
        xf = x.astype(np.float32)
        if bias_f is not None:
            xf = xf + _channel(bias_f.astype(np.float32), x, axis)
        y = np.rint(xf * _channel(scale_f32.astype(np.float32), x, axis)).astype(_I64)
        return np.clip(y + out_zp, qmin, qmax).astype(code_dtype(qmin, qmax), copy=False)
    amax = max(int(x.max()), -int(x.min())) if x.size else 0
    if amax > 2 ** 31 - 1:
        raise ValueError("requant input outside int32")
    mults, shifts = quantize_multipliers_exact(reals, bits)   # = quantize_multiplier_exact
    m = _channel(mults, x, axis)
    e = _channel(shifts, x, axis)
    y = requant_fixed(x, m, e, rounding, bits, amax, out_zp, qmin, qmax)   # compiled / float64
    if y is not None:
        return y
    # int64, a cache-sized block at a time (elementwise: the same values as whole arrays), the
    # codes stored in the narrowest type holding [qmin, qmax] (as requant_f64 stores them)
    out = np.empty(np.shape(x), dtype=code_dtype(qmin, qmax))
    for idx in block_slices(np.shape(x)):
        out[idx] = _requant_int64(np.asarray(x[idx]).astype(_I64, copy=False),
                                  m[channel_slice(idx, m)], e[channel_slice(idx, e)],
                                  rounding, bits, out_zp, qmin, qmax)
    return out


def _requant_int64(x: np.ndarray, m: np.ndarray, e: np.ndarray, rounding: str, bits: int,
                   out_zp: int, qmin: int, qmax: int) -> np.ndarray:
    """:func:`requant_ref` on int64 (``m``, ``e``: channel-shaped), clamped, still int64."""
    if rounding == "gemmlowp":
        left = np.maximum(e, 0)
        xl = x * _pow2(left) if np.any(left) else x
        if xl.size and max(int(xl.max()), -int(xl.min())) > 2 ** 31:
            raise ValueError("gemmlowp left shift leaves int32")
        m31 = m * (1 << (31 - bits))
        high = np.right_shift(xl * m31 + (1 << 30), 31)      # SRDHM (m31 >= 0): floor(/2^31)
        y = _div_round(high, np.maximum(-e, 0), "rha")   # RDBPOT (t per channel, broadcast)
    else:
        t = bits - e
        prod = x * m
        neg = t < 0
        if np.any(neg):
            prod = np.where(neg, prod * _pow2(np.maximum(-t, 0)), prod)
        y = _div_round(prod, np.maximum(t, 0),
                       "rhu" if rounding == "single" else "rne")
    return np.clip(y + out_zp, qmin, qmax)


def _round_float(v: np.ndarray, mode: str) -> np.ndarray:
    if mode == "rne":
        return np.rint(v)
    if mode == "floor":
        return np.floor(v)
    if mode == "trunc":
        return np.trunc(v)
    f = np.floor(v)
    if mode == "rhu":
        return f + (v - f >= 0.5)
    t = np.trunc(v)
    return t + np.sign(v) * (np.abs(v - t) >= 0.5)


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def conv_ref(x: np.ndarray, w: np.ndarray, stride: Any, padding: Any, dilation: Any, groups: int,
             x_zp: int, w_zp: np.ndarray, keep_float: bool = False) -> np.ndarray:
    """Σ over kernel offsets of strided slices of the zero-padded ``x − z_x`` times ``w − z_w``
    (``keep_float``: the exact float accumulator where the bound allowed float BLAS)."""
    nd = w.ndim - 2
    s, p, d = _tuple(stride, nd), _tuple(padding, nd), _tuple(dilation, nd)
    ks = w.shape[2:]
    # the codes padded with z_x (centred to 0 by conv_exact, in the type its bound picks)
    if x.dtype.kind not in "iu" or not np.iinfo(x.dtype).min <= x_zp <= np.iinfo(x.dtype).max:
        x = x.astype(_I64)
    xs = np.pad(x, [(0, 0), (0, 0)] + [(pi, pi) for pi in p], constant_values=x_zp) \
        if any(p) else x
    out = [(x.shape[2 + i] + 2 * p[i] - d[i] * (ks[i] - 1) - 1) // s[i] + 1 for i in range(nd)]
    wz = w.astype(_I64) - (w_zp.reshape((-1,) + (1,) * (w.ndim - 1)) if w_zp.size > 1
                           else w_zp.reshape(()))
    # one exact (batched) matmul per kernel offset (float64 only under the 2^53 bound)
    return conv_exact(xs, wz, s, d, out, groups, keep_float, x_zp)


def maxpool_ref(x: np.ndarray, k: Any, s: Any, p: Any, d: Any, ceil: bool) -> np.ndarray:
    nd = x.ndim - 2
    k, p, d = _tuple(k, nd), _tuple(p, nd), _tuple(d, nd)
    s = _tuple(s if s is not None else k, nd)
    pads, out = [(0, 0), (0, 0)], []
    for i in range(nd):
        size, span = x.shape[2 + i], d[i] * (k[i] - 1) + 1
        num = size + 2 * p[i] - span
        o = (-(-num // s[i]) if ceil else num // s[i]) + 1
        if ceil and (o - 1) * s[i] >= size + p[i]:
            o -= 1
        out.append(o)
        pads.append((p[i], max(p[i], (o - 1) * s[i] + span - size - p[i])))
    low = np.iinfo(_I64).min
    xp = np.pad(x.astype(_I64), pads, constant_values=low)
    res = None
    for off in itertools.product(*[range(kk) for kk in k]):
        idx = tuple(slice(off[i] * d[i], off[i] * d[i] + s[i] * (out[i] - 1) + 1, s[i])
                    for i in range(nd))
        v = xp[(slice(None), slice(None)) + idx]
        res = v if res is None else np.maximum(res, v)
    return res


def avgpool_sums_ref(x: np.ndarray, mod: IntAvgPoolSum) -> tuple[np.ndarray, np.ndarray]:
    if mod.mode == "adaptive":
        outs = mod.output_size
        nd = len(outs) if isinstance(outs, (tuple, list)) else x.ndim - 2
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs] * nd
        lead = x.ndim - nd
        sizes = x.shape[lead:]
        outs = [sizes[i] if outs[i] is None else int(outs[i]) for i in range(nd)]
        sums = np.zeros(x.shape[:lead] + tuple(outs), dtype=_I64)
        counts = np.zeros(tuple(outs), dtype=_I64)
        for pos in itertools.product(*[range(o) for o in outs]):
            win = tuple(slice((pos[i] * sizes[i]) // outs[i],
                              -((-(pos[i] + 1) * sizes[i]) // outs[i])) for i in range(nd))
            block = x[(Ellipsis,) + win].astype(_I64)
            sums[(Ellipsis,) + pos] = block.reshape(x.shape[:lead] + (-1,)).sum(-1)
            counts[pos] = block[(0,) * lead].size if lead else block.size
        return sums, counts.reshape((1,) * lead + tuple(outs))
    nd = x.ndim - 2
    k, p = _tuple(mod.kernel_size, nd), _tuple(mod.padding, nd)
    s = _tuple(mod.stride if mod.stride is not None else mod.kernel_size, nd)
    xp = np.pad(x.astype(_I64), [(0, 0), (0, 0)] + [(pi, pi) for pi in p])
    ones = np.pad(np.ones(x.shape[2:], dtype=_I64), [(pi, pi) for pi in p])
    out = [(x.shape[2 + i] + 2 * p[i] - k[i]) // s[i] + 1 for i in range(nd)]
    sums = np.zeros(x.shape[:2] + tuple(out), dtype=_I64)
    counts = np.zeros(tuple(out), dtype=_I64)
    for off in itertools.product(*[range(kk) for kk in k]):
        idx = tuple(slice(off[i], off[i] + s[i] * (out[i] - 1) + 1, s[i]) for i in range(nd))
        sums += xp[(slice(None), slice(None)) + idx]
        counts += ones[idx]
    present = counts
    if mod.divisor_override:
        counts = np.full_like(counts, int(mod.divisor_override))
    elif mod.count_include_pad:
        counts = np.full_like(counts, math.prod(k))
    # padding is the real value 0: the code z at every padded position the divisor counts
    sums = sums + (counts - present) * getattr(mod, "zero_point", 0)
    return sums, counts.reshape((1, 1) + tuple(out))


# ------------------------------------------------------------------------------------------------
# the interpreter


def _np(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return v


def _torch(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    return v


class ReferenceInterpreter:
    """Evaluate a lowered GraphModule node by node with the independent arithmetic above."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        # max |accumulator| (bias included) of every conv/linear/matmul node of the last run,
        # computed from this run's own inputs (verify-int-sim's width check)
        self.acc_absmax: dict[str, int] = {}

    def run(self, *inputs: torch.Tensor, trusted: dict[str, Any] | None = None,
            kinds: dict[str, str] | None = None,
            observe: Any = None) -> dict[str, Any]:
        """Every node's value. With ``trusted`` (values of another run) and ``kinds`` (from
        :func:`qpasses.algorithms.int_sim_check.classify_nodes`), float nodes outside the integer arithmetic
        (float islands, float ops before the input quantize) take the trusted value instead of
        being re-run: they are not what is checked, and re-running a float reduction on another
        memory layout may round differently. With ``observe``, ``observe(node, value)`` sees each
        value as it is computed and values are dropped after their last use (the returned
        environment then holds the output, ``"__output__"``, and what nothing consumed)."""
        env: dict[str, Any] = {}
        free_after: dict[str, list[str]] = {}
        if observe is not None:
            last: dict[str, str] = {}
            for n in self.gm.graph.nodes:
                for a in n.all_input_nodes:
                    last[a.name] = n.name
            for name, user in last.items():
                free_after.setdefault(user, []).append(name)
        it = iter(inputs)
        for n in self.gm.graph.nodes:
            self._eval(n, env, it, trusted, kinds)
            if observe is not None and n.op != "output":
                observe(n, env[n.name])
                for name in free_after.get(n.name, ()):
                    env.pop(name, None)
        return env

    def _eval(self, n: torch.fx.Node, env: dict[str, Any], it: Any,
              trusted: dict[str, Any] | None, kinds: dict[str, str] | None) -> None:
        """``env[n.name]`` (see :meth:`run`)."""
        mod = self.modules.get(str(n.target)) if n.op == "call_module" else None
        if trusted is not None and kinds is not None and n.name in trusted and \
                n.op in ("call_module", "call_function", "call_method") and \
                kinds.get(n.name) in ("float", "island") and \
                not isinstance(mod, _INT_SIM_TYPES):
            env[n.name] = torch.fx.node.map_aggregate(trusted[n.name], _np)
            return
        if n.op == "placeholder":
            env[n.name] = _np(next(it))
        elif n.op == "output":
            env["__output__"] = torch.fx.node.map_arg(n.args[0], lambda a: env[a.name])
        elif n.op == "get_attr":
            obj: Any = self.gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            env[n.name] = _np(obj)
        else:
            env[n.name] = self._node(n, env)

    def _node(self, n: torch.fx.Node, env: dict[str, Any]) -> Any:
        args = torch.fx.node.map_arg(n.args, lambda a: env[a.name])
        kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a.name])
        if n.op == "call_module":
            mod = self.modules[str(n.target)]
            fn = _IMPLS.get(type(mod))
            if fn is None:
                for cls, impl in _IMPLS.items():
                    if isinstance(mod, cls):
                        fn = impl
                        break
            if isinstance(mod, IntLayer):
                out, self.acc_absmax[n.name] = layer_forward(mod, *args)
                return out
            if isinstance(mod, IntMatMul):
                acc = matmul_acc(mod, *args, keep_float=mod.requant is not None)
                self.acc_absmax[n.name] = _absmax_small(acc)
                return acc if mod.requant is None else requant_of(mod.requant, acc)
            if fn is not None:
                return fn(mod, *args)
            out = mod(*torch.fx.node.map_aggregate(args, _torch),
                      **torch.fx.node.map_aggregate(kwargs, _torch))
            return torch.fx.node.map_aggregate(out, _np)
        targs = torch.fx.node.map_aggregate(args, _torch)
        tkw = torch.fx.node.map_aggregate(kwargs, _torch)
        if n.op == "call_method":
            self_obj, *rest = targs
            out = getattr(self_obj, str(n.target))(*rest, **tkw)
        else:
            out = n.target(*targs, **tkw)
        return torch.fx.node.map_aggregate(out, _np)


def _quantize(mod: Quantize, x: np.ndarray) -> np.ndarray:
    inv = np.float32(1.0) / np.float32(mod.scale)
    v = _round_float(x.astype(np.float32) * inv, mod.rounding)
    return np.clip(v + mod.zero_point, mod.qmin, mod.qmax).astype(_I64)


def _dequantize(mod: Dequantize, q: np.ndarray) -> np.ndarray:
    s = _channel(mod.scale.numpy(), q, mod.axis)
    return ((q.astype(np.float64) - mod.zero_point) * s).astype(np.float32)


def _requantize(mod: Requantize, q: np.ndarray, bias_f: np.ndarray | None = None) -> np.ndarray:
    if mod.rounding != "float-rne" and q.dtype.kind in "iu" and q.size:
        # the narrow codes with −z_in as requant_f64's bias: no int64 copy of the codes
        z = int(mod.in_zero_point)
        amax = max(abs(int(q.max()) - z), abs(int(q.min()) - z))
        if amax <= 2 ** 31 - 1:
            mults, shifts = quantize_multipliers_exact(mod.real.numpy(), mod.multiplier_bits)
            y = requant_fixed(q, _channel(mults, q, mod.axis), _channel(shifts, q, mod.axis),
                              mod.rounding, mod.multiplier_bits, amax, mod.out_zero_point,
                              mod.qmin, mod.qmax, bias=np.array(float(-z)))
            if y is not None:
                return y
    x = q.astype(_I64) - mod.in_zero_point
    return requant_ref(x, mod.real.numpy(), mod.rounding, mod.multiplier_bits, mod.axis,
                       mod.out_zero_point, mod.qmin, mod.qmax, mod.scale_f32.numpy(), bias_f)


def layer_acc(mod: IntLayer, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(A, A + b_q)``: the accumulator ``Σ(x − z_x)(w − z_w)·2^shift`` and with the bias."""
    acc, biased, _ = layer_acc_max(mod, x)
    return acc, biased


def layer_forward(mod: IntLayer, x: np.ndarray) -> tuple[np.ndarray, int]:
    """The layer's output and ``max|A·2^shift + b_q|``; where the products ran on float BLAS and
    the requantization is fixed-point, shift and bias are applied inside the requantization's
    blocks (the maximum from the per-channel min and max of ``A``)."""
    acc = _layer_products(mod, x)
    rq = mod.requant
    bias = None if mod.bias_q is None else mod.bias_q.numpy()
    if acc.dtype.kind == "f" and acc.size and rq is not None and \
            rq.rounding != "float-rne" and (bias is None or _absmax_small(bias) < 2 ** 52):
        ax = (mod.channel_axis if mod.channel_axis is not None else 1) % acc.ndim
        rest = tuple(i for i in range(acc.ndim) if i != ax)
        up = float(1 << mod.acc_shift)                 # ·2^shift: exact in binary floating point
        lo = acc.min(axis=rest).astype(np.float64) * up
        hi = acc.max(axis=rest).astype(np.float64) * up
        if bias is not None and bias.size > 1:
            lo, hi = lo + bias.astype(np.float64), hi + bias.astype(np.float64)
        elif bias is not None:
            lo, hi = lo + float(bias.reshape(-1)[0]), hi + float(bias.reshape(-1)[0])
        amax = int(max(float(hi.max()), -float(lo.min())))       # integers below 2^53: exact
        if amax <= 2 ** 31 - 1:
            mults, shifts = quantize_multipliers_exact(rq.real.numpy(), rq.multiplier_bits)
            axis = mod.channel_axis if rq.real.numel() > 1 else None
            b = None if bias is None else _channel(bias.astype(np.float64), acc, mod.channel_axis)
            y = requant_fixed(acc, _channel(mults, acc, axis), _channel(shifts, acc, axis),
                              rq.rounding, rq.multiplier_bits, amax, rq.out_zero_point,
                              rq.qmin, rq.qmax, bias=b, shift=mod.acc_shift)
            if y is not None:
                return y, amax
    acc, biased, amax = _layer_bias(mod, acc)
    if mod.requant is None and amax < 2 ** 31:       # the accumulator's values, as int32
        return biased.astype(np.int32), amax
    return _layer_out(mod, acc, biased), amax


def layer_acc_max(mod: IntLayer, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`layer_acc` and ``max|A + b_q|``. Where the products ran on float BLAS the
    accumulator stays float64 (exact integers): ``·2^shift`` is exact in binary floating point,
    and ``A + b_q`` is exact when its computed magnitude is below 2^53 (rounding is monotone, so
    an exact sum at or beyond 2^53 could not round below it); else int64."""
    return _layer_bias(mod, _layer_products(mod, x))


def _layer_products(mod: IntLayer, x: np.ndarray) -> np.ndarray:
    """``Σ(x − z_x)(w − z_w)``: exact float32/float64 where the bound allowed BLAS, else int64."""
    wzp = mod.w_zp.numpy().reshape(-1)
    if isinstance(mod, IntLinear):
        w = mod.w_q.numpy()
        if np.any(wzp):
            w = w.astype(_I64) - (wzp.reshape(-1, 1) if wzp.size > 1 else wzp[0])
        acc = exact_matmul(x, w.T, keep_float=True, zero_points=(mod.x_zero_point, 0))
    else:
        acc = conv_ref(x, mod.w_q.numpy(), mod.stride, mod.int_padding, mod.dilation,
                       mod.groups, mod.x_zero_point, wzp, keep_float=True)
    return acc


def _layer_bias(mod: IntLayer, acc: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(A·2^shift, A·2^shift + b_q, max|A·2^shift + b_q|)`` (see :func:`layer_acc_max`)."""
    bias = None if mod.bias_q is None else mod.bias_q.numpy()
    if acc.dtype.kind == "f" and (bias is None or _absmax_small(bias) < 2 ** 53):
        if mod.acc_shift:
            acc = np.multiply(acc, float(1 << mod.acc_shift), dtype=np.float64)
        biased = acc if bias is None else \
            np.add(acc, _channel(bias.astype(np.float64), acc, mod.channel_axis),
                   dtype=np.float64)
        amax = max(float(biased.max()), -float(biased.min())) if biased.size else 0.0
        if amax < 2.0 ** 53:
            return acc, biased, int(amax)
        acc = acc.astype(_I64)         # exact: an integer times a power of two (shifted)
    else:
        acc = acc.astype(_I64, copy=False) * (1 << mod.acc_shift)
    biased = acc if bias is None else acc + _channel(bias.astype(_I64), acc, mod.channel_axis)
    return acc, biased, int(np.abs(biased).max(initial=0))


def _absmax_small(a: np.ndarray) -> int:
    return max(int(a.max()), -int(a.min())) if a.size else 0


def _layer(mod: IntLayer, x: np.ndarray) -> np.ndarray:
    return _layer_out(mod, *layer_acc(mod, x))


def _layer_out(mod: IntLayer, acc: np.ndarray, biased: np.ndarray) -> np.ndarray:
    fused_float = mod.requant is not None and mod.requant.rounding == "float-rne" and \
        mod.bias_f is not None
    if not fused_float:
        acc = biased
    if mod.requant is None:
        return acc.astype(_I64, copy=False)     # (a float accumulator holds exact integers)
    rq = mod.requant
    return requant_ref(acc, rq.real.numpy(), rq.rounding, rq.multiplier_bits,
                       mod.channel_axis if rq.real.numel() > 1 else None, rq.out_zero_point,
                       rq.qmin, rq.qmax, rq.scale_f32.numpy(),
                       mod.bias_f.numpy() if fused_float else None)


def _add(mod: IntAdd, *qs: np.ndarray) -> np.ndarray:
    if mod.mode == "exact":          # clamp(Σ(q_i − z_i) + z_y): compiled for two inputs
        return exact_add(qs, mod.in_zero_points, mod.out_zero_point, mod.qmin, mod.qmax)
    centred = [q.astype(_I64) - z for q, z in zip(qs, mod.in_zero_points)]
    if mod.mode == "float":
        v = None
        for c, s in zip(centred, mod.in_scales):
            t = c.astype(np.float32) * np.float32(s)
            v = t if v is None else v + t
        y = np.rint(v * (np.float32(1.0) / np.float32(mod.out_scale))).astype(_I64)
        return np.clip(y + mod.out_zero_point, mod.qmin, mod.qmax)
    widest = max(mod.in_max_abs)
    left = min(20, 30 - max(widest, 1).bit_length())
    assert left == mod.left_shift, "left shift disagrees with TFLite's rule"
    twice = 2.0 * max(mod.in_scales)
    acc = None
    for c, s in zip(centred, mod.in_scales):
        t = requant_ref(c * (1 << left), np.array([s / twice]), mod.rounding,
                        mod.multiplier_bits, None, 0, -(2 ** 62), 2 ** 62)
        acc = t if acc is None else acc + t
    return requant_ref(acc, np.array([twice / (2.0 ** left * mod.out_scale)]), mod.rounding,
                       mod.multiplier_bits, None, mod.out_zero_point, mod.qmin, mod.qmax)


def _mul(mod: IntMul, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if mod.rounding == "float-rne":
        xa = (a.astype(_I64) - mod.a_zero_point).astype(np.float32) * np.float32(mod.a_scale)
        xb = (b.astype(_I64) - mod.b_zero_point).astype(np.float32) * np.float32(mod.b_scale)
        y = np.rint((xa * xb) * (np.float32(1.0) / np.float32(mod.out_scale))).astype(_I64)
        return np.clip(y + mod.out_zero_point, mod.qmin, mod.qmax)
    prod = (a.astype(_I64) - mod.a_zero_point) * (b.astype(_I64) - mod.b_zero_point)
    return requant_ref(prod, np.array([mod.a_scale * mod.b_scale / mod.out_scale]),
                       mod.rq.rounding, mod.rq.multiplier_bits, None, mod.out_zero_point,
                       mod.qmin, mod.qmax)


def _cat(mod: IntCat, *qs: np.ndarray) -> np.ndarray:
    parts = []
    for r, q in zip(mod.requants, qs):
        parts.append(_requantize(r, q) if isinstance(r, Requantize) else q)
    return np.concatenate(parts, axis=mod.dim)


def _maxpool(mod: IntMaxPool, x: np.ndarray) -> np.ndarray:
    return maxpool_ref(x, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)


def _avgpool(mod: IntAvgPoolSum, x: np.ndarray) -> np.ndarray:
    sums, counts = avgpool_sums_ref(x, mod)
    lcm = 1
    for c in np.unique(counts):
        lcm = lcm * int(c) // math.gcd(lcm, int(c))
    # the module may keep k fractional bits of the mean, L·2^k (qpasses.algorithms.lowering.pools)
    ratio = mod.lcm // lcm if mod.lcm % lcm == 0 else 0
    assert ratio > 0 and ratio & (ratio - 1) == 0, \
        f"window counts give L={lcm}, the module uses {mod.lcm} (not L·2^k)"
    return sums * (mod.lcm // counts)


def _clamp(mod: IntClamp, q: np.ndarray) -> np.ndarray:
    lo = _channel(mod.lo.numpy(), q, mod.axis)
    hi = _channel(mod.hi.numpy(), q, mod.axis)
    return np.minimum(np.maximum(q, lo), hi)


def _lut(mod: IntLUT, q: np.ndarray) -> np.ndarray:
    """``table[q − in_qmin]``, the table rebuilt from the module's float function
    (:mod:`qpasses.algorithms.int_sim_reference_lut`)."""
    return lut_ref(mod, q)


def _affine(mod: IntAffine, q: np.ndarray) -> np.ndarray:
    """``A = σ·(q − z_in)·2^k + B`` in int64, then the requantization of its real multipliers."""
    x = q.astype(_I64) - mod.in_zero_point
    acc = x * _channel(mod.sign.numpy(), x, mod.axis) * (1 << mod.frac_bits) \
        + _channel(mod.bias_q.numpy(), x, mod.axis)
    rq = mod.rq
    return requant_ref(acc, rq.real.numpy(), rq.rounding, rq.multiplier_bits, mod.axis,
                       rq.out_zero_point, rq.qmin, rq.qmax, rq.scale_f32.numpy(),
                       None if mod.bias_f is None else mod.bias_f.numpy())


def _constant(mod: IntConstant) -> np.ndarray:
    return mod.codes.numpy().astype(_I64)


_IMPLS: dict[type, Any] = {Quantize: _quantize, Dequantize: _dequantize, Requantize: _requantize,
                           IntAdd: _add, IntMul: _mul, IntCat: _cat, IntMaxPool: _maxpool,
                           IntAvgPoolSum: _avgpool, IntClamp: _clamp, IntLUT: _lut,
                           IntLayer: _layer, IntAffine: _affine,
                           IntConstant: _constant}


# matmul of activations, softmax, LayerNorm: qpasses/algorithms/int_sim_reference_transformer.py
from qpasses.algorithms.int_sim_reference_transformer import (  # noqa: E402
    TRANSFORMER_IMPLS, matmul_acc, requant_of)
from qpasses.modules.int_sim_transformer import IntMatMul  # noqa: E402

_IMPLS.update(TRANSFORMER_IMPLS)


def _pad(mod: IntPad, q: np.ndarray) -> np.ndarray:
    """Constant padding with the zero-point code (F.pad's tuple lists the last dim first)."""
    p = list(mod.pad) + [0] * (2 * q.ndim - len(mod.pad))
    widths = [(p[2 * i], p[2 * i + 1]) for i in range(q.ndim)][::-1]
    return np.pad(q.astype(_I64), widths, mode="constant", constant_values=mod.code)


_IMPLS[IntPad] = _pad
_INT_SIM_TYPES = tuple(_IMPLS)
