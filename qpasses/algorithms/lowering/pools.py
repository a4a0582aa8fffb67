"""Lowering rules for clamps (ReLU, ReLU6, hardtanh, clamp: a pending clamp, free), max pools,
average pools and ``mean`` over trailing dims (exact window sums)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from qpasses.ir.annotations import QMETA_KEY
from qpasses.modules.int_sim_ops import IntAvgPoolSum, IntMaxPool
from qpasses.numerics.int_ops import int_avg_pool_sum
from qpasses.numerics.int_sim_math import adaptive_avg_pool_sum, uniform_count_factor
from qpasses.algorithms.lowering.config import INT32_MAX, FloatIsland, QType, Rep
from qpasses.ir.fx import node_arg, node_shape
from qpasses.ir import ops
__all__ = ["ClampPoolRules"]

Node = torch.fx.Node


class ClampPoolRules:
    """Lowers clamps, max pools (:class:`IntMaxPool`), average pools and means
    (:class:`IntAvgPoolSum`).

    Mixed into :class:`~qpasses.algorithms.lowering.builder.GraphLowering`, whose ``env``,
    ``options``, ``stats`` and emit helpers it uses.
    """

    def clamp_bounds(self, n: Node, mod: Any) -> tuple[float | None, float | None] | None:
        """(lo, hi) of a ReLU/ReLU6/hardtanh/clamp in real units, None for other ops."""
        t = n.target
        if isinstance(mod, nn.ReLU):
            return 0.0, None
        if isinstance(mod, nn.Hardtanh):   # includes ReLU6
            return float(mod.min_val), float(mod.max_val)
        if n.op == "call_function":
            if t in ops.RELU_FUNCTIONS:
                return 0.0, None
            if t is F.relu6:
                return 0.0, 6.0
            if t in (F.hardtanh, F.hardtanh_):
                return float(node_arg(n, 1, "min_val", -1.0)), float(node_arg(n, 2, "max_val", 1.0))
            if t in ops.CLAMP_FUNCTIONS:
                lo, hi = node_arg(n, 1, "min", None), node_arg(n, 2, "max", None)
                if t is torch.clamp_max:
                    lo, hi = None, node_arg(n, 1, "max", None)
                if all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
                    return (None if lo is None else float(lo)), (None if hi is None else float(hi))
        if n.op == "call_method" and t in ops.CLAMP_OR_RELU_METHODS:
            if t in ("relu", "relu_"):
                return 0.0, None
            lo, hi = node_arg(n, 1, "min", None), node_arg(n, 2, "max", None)
            if t.startswith("clamp_max"):
                lo, hi = None, node_arg(n, 1, "max", None)
            if all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
                return (None if lo is None else float(lo)), (None if hi is None else float(hi))
        return None

    def lower_clamp(self, n: Node, lo: float | None, hi: float | None) -> Rep:
        """A clamp stays pending on the value (applied by the next requantization or clamp)."""
        src = self.env[n.args[0].name]
        if not src.is_int:
            raise FloatIsland("clamp of a float value")
        new_lo = lo if src.lo is None else (src.lo if lo is None else max(lo, src.lo))
        new_hi = hi if src.hi is None else (src.hi if hi is None else min(hi, src.hi))
        return Rep(src.node, src.qt, new_lo, new_hi)

    # -- pools ------------------------------------------------------------------------------------

    def lower_maxpool(self, n: Node, k: Any, s: Any, p: Any, d: Any, ceil: bool,
                      indices: bool) -> Rep:
        """A max pool: :class:`IntMaxPool` on codes (an accumulator is requantized first)."""
        if indices:
            raise FloatIsland("max pool returning indices")
        src = self.env[n.args[0].name]
        qt = src.qt
        assert qt is not None
        target = self.lookahead_target(n) if qt.per_channel else None
        if target is not None:
            # requantization is monotone, so it commutes with max: requantize the accumulator
            # first (the requant then fuses into its layer, and the pool runs on narrow codes)
            src = self.requantize_to(src, target, n.args[0], f"{n.name}_requant")
            qt = src.qt
            assert qt is not None
        if qt.per_channel and qt.axis not in (1,):
            raise FloatIsland("max pool over a per-channel value whose channels are not dim 1")
        mod = IntMaxPool(k, s, p, d, ceil, qt.qmin, qt.qmax)
        node = self.call_int(n.name, mod, (src.node,), n, n.name)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        self.stats["num_pools"] += 1
        return Rep(node, qt, src.lo, src.hi)

    def lower_avgpool(self, n: Node, mode: str, **kw: Any) -> Rep:
        """An average / adaptive-average pool: :class:`IntAvgPoolSum` (exact window sums)."""
        src = self.env[n.args[0].name]
        in_shape = node_shape(n.args[0])
        if in_shape is None:
            raise FloatIsland("average pool input without a traced shape")
        if mode == "avg" and kw.get("ceil_mode"):
            raise FloatIsland("average pool with ceil_mode=True")
        src = self.materialize(src, n)
        qt = src.qt
        assert qt is not None
        if qt.per_channel and qt.axis != 1:
            raise FloatIsland("average pool over a per-channel value whose channels are not dim 1")
        nd = (len(kw["output_size"]) if mode == "adaptive" and isinstance(kw["output_size"],
                                                                            (tuple, list))
              else (len(in_shape) - 2))
        probe = torch.ones((1, 1, *in_shape[-nd:]), dtype=torch.int64)
        if mode == "adaptive":
            out = kw["output_size"]
            out = tuple(out) if isinstance(out, (tuple, list)) else (out,) * nd
            _, counts = adaptive_avg_pool_sum(probe, out)
            params = dict(output_size=out)
        else:
            k, st, p = kw["kernel_size"], kw["stride"], kw["padding"]
            _, counts = int_avg_pool_sum(probe, k, st, p)
            if kw.get("divisor_override"):
                counts = torch.full_like(counts, int(kw["divisor_override"]))
            elif kw.get("count_include_pad", True):
                kk = k if isinstance(k, (tuple, list)) else (k,) * nd
                counts = torch.full_like(counts, math.prod(kk))
            params = dict(kernel_size=k, stride=st, padding=p,
                          count_include_pad=kw.get("count_include_pad", True),
                          divisor_override=kw.get("divisor_override"))
        uf = uniform_count_factor(counts)
        if uf is None:
            raise FloatIsland("average pool window counts have no small common multiple")
        lcm, factor = uf
        frac = self._pool_frac_bits(n, qt, lcm)
        if frac:
            lcm, factor = lcm << frac, factor * 2 ** frac
        lo, hi = qt.qmin * lcm, qt.qmax * lcm
        if max(abs(lo - qt.zero_point * lcm), abs(hi - qt.zero_point * lcm)) > INT32_MAX:
            raise FloatIsland("average-pool sum would leave int32 (requantize the input first)")
        mod = IntAvgPoolSum(mode, lcm=lcm, factor=factor, qmin=lo, qmax=hi,
                            zero_point=qt.zero_point, **params)
        node = self.call_int(n.name, mod, (src.node,), n, n.name)
        self.stats["num_pools"] += 1
        new_qt = QType(tuple(s / lcm for s in qt.scale), qt.zero_point * lcm, lo, hi, qt.axis,
                       None, "sum")
        return Rep(node, new_qt)

    def _pool_frac_bits(self, n: Node, qt: QType, lcm: int) -> int:
        """Fractional bits ``k`` of an average pool's window sum (the pool multiplies by
        ``L·2^k / count``: the mean at scale ``s/(L·2^k)``, the next requantization divides by
        ``2^k``), the analogue of a layer's bias fractional bits. gemmlowp's SRDHM rounds
        ``Σ·M·2^r`` to an integer before the rounding shift ``r``, up to ``2^-(r+1)`` output LSB
        off the exact mean; a global pool onto a coarse grid has ``M`` around ``2^-2`` (up to
        1/8 LSB: at 3 bits ~10% of the pooled codes were 1 LSB off the fake-quant mean). ``k``:
        ``bias-frac-bits`` when set, else ``ceil(log2 M) + 5`` where positive (so ``M·2^-k <=
        2^-5``, as for layers), within int32. 0 for an accumulator (its layer's bias bits
        handle it), a value reaching no quantizer, ``M >= 1/2`` (a single rounding already) and
        the single-rounding contracts."""
        want = self.options.bias_frac_bits
        if self.options.rounding != "gemmlowp" or want == 0 or qt.kind == "acc":
            return 0
        target = self.lookahead_target(n)
        if target is None:
            return 0
        m = max(qt.scale) / lcm / target.scale[0]
        if not 0 < m < 0.5:
            return 0
        k = want if want is not None else max(0, math.ceil(math.log2(m)) + 5)
        while k > 0 and (qt.max_abs_centered * lcm) << k > INT32_MAX:
            k -= 1
        return k

    def lower_mean(self, n: Node) -> Rep:
        """``mean`` over trailing spatial dims: an adaptive-average pool to size 1."""
        shape = node_shape(n.args[0])
        dims = node_arg(n, 1, "dim", None)
        keep = bool(node_arg(n, 2, "keepdim", False))
        if shape is None or dims is None or node_arg(n, 3, "dtype", None) is not None:
            raise FloatIsland("mean without explicit trailing dims")
        dims = tuple(sorted(d % len(shape) for d in (dims if isinstance(dims, (tuple, list))
                                                     else (dims,))))
        if dims != tuple(range(len(shape) - len(dims), len(shape))) or dims[0] < 1:
            raise FloatIsland(f"mean over dims {dims}: only trailing spatial dims are lowered")
        rep = self.lower_avgpool(n, "adaptive", output_size=(1,) * len(dims))
        if keep:
            return rep
        node = self.emit("call_method", "squeeze", (rep.node, dims), name=f"{n.name}_squeeze",
                         like=n)
        return Rep(node, rep.qt)
