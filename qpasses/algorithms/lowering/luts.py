"""Lowering rules for elementwise nonlinearities and arithmetic with a constant: a lookup table
(:class:`IntLUT`) over every input code, producing the next quantizer's codes directly."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.fx
from torch import Tensor

from qpasses.ir.annotations import QMETA_KEY
from qpasses.modules.int_sim_ops import IntLUT
from qpasses.numerics.int_sim_math import build_lut_f32
from qpasses.algorithms.lowering.config import FloatIsland, QType, Rep
from qpasses.algorithms.lowering.nodes import f32
from qpasses.ir import ops

__all__ = ["LutRules"]

Node = torch.fx.Node


class LutRules:
    """Lowers hardswish, sigmoid, SiLU, GELU, tanh, ... to tables, with intermediate grids for
    accumulator inputs (``lut-bits``) and gate outputs (``gate-bits``).

    Mixed into :class:`~qpasses.algorithms.lowering.builder.GraphLowering`, whose ``env``,
    ``options``, ``stats`` and emit helpers it uses.
    """

    def elementwise_fn(self, n: Node, mod: Any) -> tuple[Callable[[Tensor], Tensor], str] | None:
        """(float function, name) of an elementwise op of one tensor, None for other ops."""
        t = n.target
        if mod is not None:
            for cls, name in ops.UNARY_MODULES.items():
                if type(mod) is cls:
                    return mod, name
            return None
        tensors = self.tensor_inputs(n)
        scalar_left = n.op == "call_function" and t in ops.SCALAR_ARITH_FUNCTIONS and \
            len(n.args) == 2 and isinstance(n.args[0], (int, float)) and \
            len(tensors) == 1 and n.args[1] is tensors[0]          # 16 * x (Swin V2's bias)
        if len(tensors) != 1 or not n.args or (n.args[0] is not tensors[0] and not scalar_left):
            return None
        rest_args = n.args[1:]
        if any(a is not tensors[0] for a in n.all_input_nodes):
            return None
        kwargs = dict(n.kwargs)
        if kwargs.get("inplace"):
            kwargs["inplace"] = False
        if n.op == "call_function" and t in ops.UNARY_FUNCTIONS:
            return (lambda x, t=t, a=rest_args, k=kwargs: t(x, *a, **k)), ops.UNARY_FUNCTIONS[t]
        if n.op == "call_method" and t in ops.UNARY_METHODS:
            return (lambda x, t=t, a=rest_args, k=kwargs: getattr(x, t)(*a, **k)), ops.UNARY_METHODS[t]
        if n.op == "call_function" and t in ops.SCALAR_ARITH_FUNCTIONS and len(rest_args) == 1 and \
                isinstance(rest_args[0], (int, float)) and not kwargs:
            c = rest_args[0]
            return (lambda x, t=t, c=c: t(x, c)), f"{ops.SCALAR_ARITH_FUNCTIONS[t]}({c})"
        if n.op == "call_method" and t in ops.SCALAR_ARITH_METHODS and len(rest_args) == 1 and \
                isinstance(rest_args[0], (int, float)) and not kwargs:
            c = rest_args[0]
            return (lambda x, t=t, c=c: getattr(x, t)(c)), f"{ops.SCALAR_ARITH_METHODS[t]}({c})"
        # scalar on the left: 1.0 - x, 2 * x ...
        if n.op == "call_function" and t in ops.SCALAR_ARITH_FUNCTIONS and len(n.args) == 2 and \
                isinstance(n.args[0], (int, float)) and n.args[1] is tensors[0]:
            c = n.args[0]
            return (lambda x, t=t, c=c: t(c, x)), f"r{ops.SCALAR_ARITH_FUNCTIONS[t]}({c})"
        return None

    def lower_lut(self, n: Node, fn: Callable[[Tensor], Tensor], name: str) -> Rep:
        """An elementwise function as an :class:`IntLUT` over every input code."""
        x_node = self.tensor_inputs(n)[0]
        src = self.env[x_node.name]
        if not src.is_int:
            raise FloatIsland("elementwise op on a float value")
        lo, hi = src.lo, src.hi
        if src.qt.per_channel or src.qt.span >= 2 ** 16:  # type: ignore[union-attr]
            src = self.intermediate_grid(n, x_node, src, f"{n.name}_lut_in")
            lo = hi = None                       # folded into the grid's range
        qt = src.qt
        assert qt is not None
        if lo is not None or hi is not None:
            inner = fn

            def fn(x: Tensor, inner: Callable = inner, lo: Any = lo, hi: Any = hi) -> Tensor:
                return inner(torch.clamp(x, lo, hi))
        target = self.lookahead_target(n)
        if target is None:
            target = self._lut_output_grid(fn, qt, name)
        table = build_lut_f32(fn, qt.scale[0], qt.zero_point, qt.qmin, qt.qmax, target.scale[0],
                              target.zero_point, target.qmin, target.qmax)
        mod = IntLUT(table, qt.qmin, name, in_scale=qt.scale[0], in_zero_point=qt.zero_point,
                     out_scale=target.scale[0], out_zero_point=target.zero_point,
                     qmin=int(table.min()), qmax=int(table.max()), out_qmin=target.qmin,
                     out_qmax=target.qmax)
        mod.fn = fn                # the float function, for verify-int-sim's reference rebuild
        node = self.call_int(n.name, mod, (src.node,), n, n.name)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        self.stats["num_luts"] += 1
        return Rep(node, replace(target, qmin=int(table.min()), qmax=int(table.max())))

    def _lut_output_grid(self, fn: Callable[[Tensor], Tensor], qt: QType, name: str) -> QType:
        """The grid of a table whose value reaches no quantizer: exactly the range of ``fn`` over
        the input codes, ``gate-bits`` wide for bounded functions (gates), else ``lut-bits``."""
        codes = torch.arange(qt.qmin, qt.qmax + 1, dtype=torch.int64)
        with torch.no_grad():
            v = fn((codes - qt.zero_point).to(torch.float32) * f32(qt.scale[0]))
        if not bool(torch.isfinite(v).all()):
            raise FloatIsland(f"{name} is not finite on its input grid")
        mn, mx = float(v.min()), float(v.max())
        bits = self.options.gate_bits if name in ops.BOUNDED_RANGES else self.options.lut_bits
        if mn >= 0:
            levels = 2 ** bits - 1
            return QType((float(f32(max(mx, 1e-12) / levels)),), 0, 0, levels, kind="codes")
        half = 2 ** (bits - 1) - 1
        return QType((float(f32(max(abs(mn), abs(mx)) / half)),), 0, -half, half, kind="codes")

    def intermediate_grid(self, n: Node, x_node: Node, src: Rep, name: str) -> Rep:
        """Requantize a wide value (accumulator, window sum) onto a ``lut-bits`` signed grid whose
        range is the value's observed range (calibration data) or else its proven bound; a
        pending clamp is folded into the requantization."""
        qt = src.qt
        assert qt is not None
        bound = max(abs(s) for s in qt.scale) * qt.max_abs_centered
        if x_node.name in self.ranges:
            mn, mx = self.ranges[x_node.name]
            how = "observed"
        else:
            mn, mx, how = -bound, bound, "proven bound"
        if src.lo is not None:
            mn, mx = max(mn, src.lo), max(mx, src.lo)
        if src.hi is not None:
            mn, mx = min(mn, src.hi), min(mx, src.hi)
        amax = min(max(abs(mn), abs(mx)), bound) if bound > 0 else max(abs(mn), abs(mx))
        # a power-of-two range (at most one bit of the grid) keeps the grid when a channel that
        # did not set the range's leading bit goes away (prune-zero-bit-channels stays bit-exact)
        amax = 2.0 ** math.ceil(math.log2(amax)) if amax > 0 else 1.0
        half = 2 ** (self.options.lut_bits - 1) - 1
        grid = QType((float(f32(amax / half)),), 0, -half, half, kind="codes")
        # like=x_node: the requantized value has the shape of the value, not of its consumer
        rep = self.requantize_to(src, grid, x_node, name)
        rep.node.meta["qpasses.int_sim.note"] = f"intermediate grid: {how} range ±{amax:.4g}"
        return rep
