"""Lowering rules for transformer ops on integer activations: the product of two activations
(:class:`IntMatMul`), softmax (:class:`IntSoftmax`) and LayerNorm (:class:`IntLayerNorm`); see
docs/int-sim.md, "Transformer kernels"."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import Tensor

from qpasses.errors import NumericsError
from qpasses.ir import ops
from qpasses.ir.annotations import QMETA_KEY
from qpasses.ir.fx import attr_value, node_arg, node_shape
from qpasses.ir.ops import target_name
from qpasses.modules.int_sim import Requantize
from qpasses.modules.int_sim_transformer import (IntL2Normalize, IntLayerNorm, IntMatMul,
                                                 IntSoftmax)
from qpasses.numerics.fixed_point import fbgemm_scale
from qpasses.numerics.int_attention import (SOFTMAX_FRAC_BITS, matmul_bound, softmax_exp_table)
from qpasses.numerics.int_norm import layer_norm_constants
from qpasses.algorithms.lowering.config import INT32_MAX, FloatIsland, QType, Rep
from qpasses.algorithms.lowering.nodes import f32

__all__ = ["TransformerRules"]

Node = torch.fx.Node

# widest input grid softmax and LayerNorm read directly (wider values go through an
# intermediate lut-bits grid first)
MAX_SPAN = 2 ** 16


class TransformerRules:
    """Lowers matmul of two integer activations, softmax and LayerNorm.

    Mixed into :class:`~qpasses.algorithms.lowering.builder.GraphLowering`, whose ``env``,
    ``options``, ``stats``, emit helpers, :meth:`lookahead_target` and
    :meth:`intermediate_grid` it uses.
    """

    def transformer_rule(self, n: Node, mod: Any) -> Callable[[], Rep] | None:
        """The rule lowering ``n`` when it is a matmul, softmax or LayerNorm, else None."""
        t = n.target
        if (n.op == "call_function" and t in ops.MATMUL_FUNCTIONS) or \
                (n.op == "call_method" and t in ops.MATMUL_METHODS):
            return lambda: self.lower_matmul(n)
        if isinstance(mod, ops.SOFTMAX_MODULES) or \
                (n.op == "call_function" and t in ops.SOFTMAX_FUNCTIONS) or \
                (n.op == "call_method" and t in ops.SOFTMAX_METHODS):
            return lambda: self.lower_softmax(n, mod)
        if isinstance(mod, ops.LAYER_NORM_MODULES) or \
                (n.op == "call_function" and t in ops.LAYER_NORM_FUNCTIONS):
            return lambda: self.lower_layer_norm(n, mod)
        if n.op == "call_function" and t in ops.NORMALIZE_FUNCTIONS:
            return lambda: self.lower_normalize(n)
        return None

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def _narrow_input(self, n: Node, x_node: Node, what: str) -> Rep:
        """The integer input of ``n`` on a per-tensor grid of at most 2^16 codes (an intermediate
        grid for accumulators and per-channel values), pending clamps applied."""
        r = self.env[x_node.name]
        if not r.is_int:
            raise FloatIsland(f"{what} of a float value")
        if r.qt.per_channel or r.qt.span > MAX_SPAN:  # type: ignore[union-attr]
            return self.intermediate_grid(n, x_node, r, f"{n.name}_{x_node.name}_grid")
        return self.materialize(r, n)

    def _finish(self, n: Node, node: Node) -> None:
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]

    # -- matmul ----------------------------------------------------------------------------------

    def lower_matmul(self, n: Node) -> Rep:
        """``a @ b`` of two integer activations: :class:`IntMatMul` requantized onto the quantizer
        it reaches, or the exact accumulator (scale ``s_a·s_b``, zero point 0)."""
        if n.kwargs or len(n.args) != 2 or not all(isinstance(a, Node) for a in n.args):
            raise FloatIsland(f"{target_name(n)} with other than two tensor arguments")
        x_nodes = list(n.args)
        reps = self.product_inputs(n, x_nodes)
        sa, sb = node_shape(x_nodes[0]), node_shape(x_nodes[1])
        if not sa or not sb:
            raise FloatIsland(f"{target_name(n)} of operands without traced shapes")
        k = sa[-1]
        qa, qb = reps[0].qt, reps[1].qt
        assert qa is not None and qb is not None
        bound = matmul_bound(k, qa.max_abs_centered, qb.max_abs_centered)
        target = self.lookahead_target(n)
        rq = None
        if target is not None:
            if bound > INT32_MAX:
                raise FloatIsland(f"matmul accumulator bound {bound} (K={k}) exceeds the int32 "
                                  "input of requantization")
            s_a, s_b = qa.scale[0], qb.scale[0]
            rq = Requantize(s_a * s_b / target.scale[0], out_zero_point=target.zero_point,
                            qmin=target.qmin, qmax=target.qmax, rounding=self.options.rounding,
                            multiplier_bits=self.options.multiplier_bits,
                            scale_f32=fbgemm_scale(s_a, s_b, target.scale[0]))
            rq.prove(bound)
            out = target
        else:
            if bound >= 2 ** 62:
                raise FloatIsland(f"matmul accumulator bound {bound} leaves int64")
            out = QType((qa.scale[0] * qb.scale[0],), 0, -bound, bound, kind="acc")
        mod = IntMatMul((qa.scale[0], qa.zero_point, qa.max_abs_centered),
                        (qb.scale[0], qb.zero_point, qb.max_abs_centered), k, rq)
        node = self.call_int(n.name, mod, (reps[0].node, reps[1].node), n, n.name)
        self._finish(n, node)
        self._count("num_int_matmuls")
        return Rep(node, out)

    # -- softmax ---------------------------------------------------------------------------------

    def _softmax_dim(self, n: Node, mod: Any) -> Any:
        if mod is not None:
            return mod.dim, None
        if n.op == "call_method":
            return node_arg(n, 1, "dim"), node_arg(n, 2, "dtype")
        if n.target is torch.softmax:
            return node_arg(n, 1, "dim"), node_arg(n, 2, "dtype")
        return node_arg(n, 1, "dim"), node_arg(n, 3, "dtype")        # F.softmax

    def lower_softmax(self, n: Node, mod: Any) -> Rep:
        """Softmax of integer codes: :class:`IntSoftmax` onto the quantizer it reaches, or onto
        an unsigned ``gate-bits`` grid of [0, 1]."""
        dim, dtype = self._softmax_dim(n, mod)
        if dtype not in (None, torch.float32):
            raise FloatIsland(f"softmax with dtype={dtype} (only float32 has an integer kernel)")
        if not isinstance(dim, int):
            raise FloatIsland("softmax with an implicit (None) or non-constant dim")
        x_node = n.args[0]
        if not isinstance(x_node, Node):
            raise FloatIsland("softmax of a non-tensor argument")
        src = self._narrow_input(n, x_node, "softmax")
        qt = src.qt
        assert qt is not None
        target = self.lookahead_target(n)
        if target is None:
            levels = 2 ** self.options.gate_bits - 1
            target = QType((float(f32(1.0 / levels)),), 0, 0, levels, kind="codes")
        try:
            table = softmax_exp_table(qt.scale[0], qt.span)
        except NumericsError as e:
            raise FloatIsland(str(e)) from None
        s_y = target.scale[0]
        rq = Requantize(2.0 ** -SOFTMAX_FRAC_BITS / s_y, out_zero_point=target.zero_point,
                        qmin=target.qmin, qmax=target.qmax, rounding=self.options.rounding,
                        multiplier_bits=self.options.multiplier_bits,
                        scale_f32=torch.tensor(2.0 ** -SOFTMAX_FRAC_BITS / s_y,
                                               dtype=torch.float32))
        rq.prove(2 ** SOFTMAX_FRAC_BITS)
        m = IntSoftmax(dim, table, qt.scale[0], qt.zero_point, rq, s_y)
        node = self.call_int(n.name, m, (src.node,), n, n.name)
        self._finish(n, node)
        self._count("num_int_softmax")
        return Rep(node, target)

    # -- layer norm ------------------------------------------------------------------------------

    def _constant(self, n: Node, v: Any, what: str) -> Tensor | None:
        if v is None or isinstance(v, Tensor):
            return v
        if isinstance(v, Node) and v.op == "get_attr":
            t = attr_value(self.gm, str(v.target))
            if isinstance(t, Tensor):
                return t
        raise FloatIsland(f"layer_norm {what} is not a constant tensor")

    def lower_layer_norm(self, n: Node, mod: Any) -> Rep:
        """LayerNorm over the trailing dims: :class:`IntLayerNorm` onto the quantizer it reaches,
        or onto a ``lut-bits`` grid over its proven range ``max_j |γ_j|·√N + |β_j|``."""
        if mod is not None:
            shape, eps = tuple(mod.normalized_shape), float(mod.eps)
            gamma, beta = mod.weight, getattr(mod, "bias", None)
        else:
            shape = node_arg(n, 1, "normalized_shape")
            shape = (shape,) if isinstance(shape, int) else tuple(shape or ())
            gamma = self._constant(n, node_arg(n, 2, "weight"), "weight")
            beta = self._constant(n, node_arg(n, 3, "bias"), "bias")
            eps = float(node_arg(n, 4, "eps", 1e-5))
        x_node = n.args[0]
        if not isinstance(x_node, Node):
            raise FloatIsland("layer_norm of a non-tensor argument")
        if shape and not all(isinstance(s, int) for s in shape):
            # sizes read from the input (x.shape[-1]): they equal its trailing traced dims
            traced = node_shape(x_node)
            if traced is None or len(traced) < len(shape):
                raise FloatIsland("layer_norm with a non-constant normalized_shape")
            shape = tuple(traced[len(traced) - len(shape):])
        if not shape:
            raise FloatIsland("layer_norm with an empty normalized_shape")
        src = self._narrow_input(n, x_node, "layer_norm")
        qt = src.qt
        assert qt is not None
        count = math.prod(shape)
        g = None if gamma is None else gamma.detach().double().reshape(-1)
        b = None if beta is None else beta.detach().double().reshape(-1)
        target = self.lookahead_target(n)
        if target is None:
            gmax = float(g.abs().max()) if g is not None else 1.0
            bmax = float(b.abs().max()) if b is not None else 0.0
            amax = gmax * math.sqrt(count) + bmax
            amax = 2.0 ** math.ceil(math.log2(amax)) if amax > 0 else 1.0
            half = 2 ** (self.options.lut_bits - 1) - 1
            target = QType((float(f32(amax / half)),), 0, -half, half, kind="codes")
        try:
            consts = layer_norm_constants(count, qt.span, qt.max_abs_centered, qt.scale[0], eps,
                                          g, b, target.scale[0])
        except NumericsError as e:
            raise FloatIsland(str(e)) from None
        m = IntLayerNorm(len(shape), consts, in_scale=qt.scale[0], in_zero_point=qt.zero_point,
                         out_scale=target.scale[0], out_zero_point=target.zero_point,
                         qmin=target.qmin, qmax=target.qmax, rounding=self.options.rounding,
                         eps=eps)
        node = self.call_int(n.name, m, (src.node,), n, n.name)
        self._finish(n, node)
        self._count("num_int_layer_norms")
        return Rep(node, target)

    # -- L2 normalize ----------------------------------------------------------------------------

    def lower_normalize(self, n: Node) -> Rep:
        """``F.normalize(x, p=2, dim, eps)``: :class:`IntL2Normalize` (LayerNorm's integer
        arithmetic without mean and affine) onto the quantizer it reaches, or onto a signed
        ``lut-bits`` grid of [−1, 1]."""
        p = node_arg(n, 1, "p", 2.0)
        dim = node_arg(n, 2, "dim", 1)
        eps = node_arg(n, 3, "eps", 1e-12)
        if node_arg(n, 4, "out", None) is not None:
            raise FloatIsland("normalize with out=")
        if not isinstance(p, (int, float)) or float(p) != 2.0:
            raise FloatIsland(f"normalize with p={p} (only p=2 has an integer kernel)")
        if not isinstance(dim, int):
            raise FloatIsland("normalize with a non-constant dim")
        if not isinstance(eps, (int, float)) or not eps >= 0:
            raise FloatIsland(f"normalize with eps={eps} (a constant >= 0 is needed)")
        x_node = n.args[0]
        shape = node_shape(x_node) if isinstance(x_node, Node) else None
        if not shape or not -len(shape) <= dim < len(shape):
            raise FloatIsland("normalize of an input without a traced shape containing dim")
        src = self._narrow_input(n, x_node, "normalize")
        qt = src.qt
        assert qt is not None
        target = self.lookahead_target(n)
        if target is None:
            half = 2 ** (self.options.lut_bits - 1) - 1
            target = QType((float(f32(1.0 / half)),), 0, -half, half, kind="codes")
        try:
            consts = layer_norm_constants(shape[dim], qt.span, qt.max_abs_centered, qt.scale[0],
                                          float(eps), None, None, target.scale[0], center=False)
        except NumericsError as e:
            raise FloatIsland(str(e)) from None
        m = IntL2Normalize(dim, consts, in_scale=qt.scale[0], in_zero_point=qt.zero_point,
                           out_scale=target.scale[0], out_zero_point=target.zero_point,
                           qmin=target.qmin, qmax=target.qmax, rounding=self.options.rounding,
                           eps=float(eps))
        node = self.call_int(n.name, m, (src.node,), n, n.name)
        self._finish(n, node)
        self._count("num_int_l2_normalizes")
        return Rep(node, target)
