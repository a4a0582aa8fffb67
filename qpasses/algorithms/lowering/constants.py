"""Lowering rules for constant operands: a value computed from parameters and buffers only (a class
token, a position embedding, a relative-position bias gathered from its table) is evaluated at
lowering and quantized once into an :class:`IntConstant`; the shape ops after it that read a runtime
shape (``class_token.expand(x.shape[0], -1, -1)``) are replayed on the integer codes."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import Tensor

from qpasses.ir import ops
from qpasses.ir.annotations import QMETA_KEY
from qpasses.ir.fx import is_tensor_node
from qpasses.modules.fake_quant import ActFakeQuant
from qpasses.modules.int_sim_affine import IntConstant
from qpasses.numerics.int_sim_math import quantize_codes
from qpasses.algorithms.lowering.config import FloatIsland, QType, Rep

__all__ = ["ConstRules"]

Node = torch.fx.Node

# shape ops replayed on the codes of a constant (their other arguments may be runtime shapes)
_REPLAY_FUNCTIONS = ops.PASSTHROUGH_FUNCTIONS | ops.BROADCAST_FUNCTIONS
_REPLAY_METHODS = ops.PASSTHROUGH_METHODS | ops.BROADCAST_METHODS
# a constant wider than this many codes stays float (a huge table is no longer a "constant")
_MAX_CONST_ELEMENTS = 2 ** 24


class ConstRules:
    """Turns constant operands into integer constants on a chosen grid.

    Mixed into :class:`~qpasses.algorithms.lowering.builder.GraphLowering` (with
    :class:`~qpasses.algorithms.lowering.affine.AffineRules`, whose ``const_value`` it uses).
    """

    def const_chain(self, node: Any) -> tuple[Node, Tensor, list[Node]] | None:
        """(root, its value, shape ops after it) when ``node`` is a constant computed now
        (``root``) moved by shape ops whose other arguments are shapes or literals; None when it
        depends on an input's values."""
        chain: list[Node] = []
        cur = node
        for _ in range(32):
            if not isinstance(cur, Node):
                return None
            v = self.const_value(cur)
            if v is not None:
                if not v.is_floating_point() or v.numel() > _MAX_CONST_ELEMENTS:
                    return None
                return cur, v, chain[::-1]
            replay = (cur.op == "call_function" and cur.target in _REPLAY_FUNCTIONS) or \
                (cur.op == "call_method" and cur.target in _REPLAY_METHODS)
            if not replay or not cur.args or not isinstance(cur.args[0], Node):
                return None
            for a in cur.all_input_nodes:
                if a is cur.args[0]:
                    continue
                r = self.env.get(a.name)
                if r is None or not (r.value or (cur.target == "expand_as" and r.is_int)):
                    return None            # a value-dependent argument
            chain.append(cur)
            cur = cur.args[0]
        return None

    def const_codes(self, node: Node, grid: QType, rounding: str, name: str) -> Rep | None:
        """The constant ``node`` quantized onto ``grid`` (as a fake quantizer with ``rounding``
        would, codes clamped to the grid's range) as an :class:`IntConstant` plus the replayed
        shape ops; None when ``node`` is not a constant."""
        found = self.const_chain(node)
        if found is None:
            return None
        root, value, chain = found
        codes = quantize_codes(value.to(torch.float32), grid.scale[0], grid.zero_point,
                               grid.qmin, grid.qmax, rounding, where=f"constant '{root.name}'",
                               dtype=torch.int64)
        lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (grid.qmin, grid.qmin)
        mod = IntConstant(codes, lo, hi, root.name)
        cur = self.call_int(f"{name}_const", mod, (), root, f"{name}_const")   # root's shape
        self.stats["num_int_constants"] = self.stats.get("num_int_constants", 0) + 1
        prev = root
        for c in chain:
            def arg(a: Node, c: Node = c, prev: Node = prev, cur: Node = cur) -> Any:
                return cur if a is prev else self.env[a.name].node
            args = torch.fx.node.map_arg(c.args, arg)
            kwargs = torch.fx.node.map_arg(c.kwargs, arg)
            cur = self.emit(c.op, c.target, args, kwargs, name=f"{c.name}_codes", like=c)
            prev = c
        return Rep(cur, QType(grid.scale, grid.zero_point, lo, hi))

    def lower_const_fake_quant(self, n: Node, mod: ActFakeQuant, target: QType) -> Rep | None:
        """An activation quantizer on a constant: its codes, computed at lowering."""
        src = n.args[0] if n.args else None
        if not isinstance(src, Node) or not is_tensor_node(src):
            return None
        rep = self.const_codes(src, target, getattr(mod, "rounding", "rne"), n.name)
        if rep is not None and QMETA_KEY in n.meta:
            rep.node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        return rep

    def const_join_operands(self, n: Node) -> None:
        """For an add or a cat with an integer operand and a float constant operand that nothing
        else reads: put the constant on the join's grid (the quantizer after the join, else the
        integer operand's grid) so that the join lowers (:class:`IntAdd` / :class:`IntCat`)."""
        t = n.target
        is_cat = n.op == "call_function" and t in ops.CAT_FUNCTIONS
        is_add = (n.op == "call_function" and t in ops.ADD_FUNCTIONS) or \
            (n.op == "call_method" and t in ops.ADD_METHODS)
        if not (is_cat or is_add):
            return
        operands = list(n.args[0]) if is_cat and isinstance(n.args[0], (list, tuple)) else \
            [a for a in n.args[:2]]
        nodes = [a for a in operands if isinstance(a, Node)]
        ints = [self.env[a.name] for a in nodes if self.env[a.name].is_int]
        floats = [a for a in nodes if not self.env[a.name].is_int]
        if not ints or not floats:
            return
        grid = self.output_target(n)
        if grid is None:
            per_tensor = [r.qt for r in ints if r.qt is not None and not r.qt.per_channel]
            if not per_tensor:
                return
            grid = per_tensor[0]
        for a in floats:
            if len(a.users) != 1:
                continue
            if is_add:
                # a wide grid at the join's scale: the constant is not clamped to the output range
                wide = QType(grid.scale, 0, -(2 ** 30), 2 ** 30)
                rep = self.const_codes(a, wide, "rne", f"{n.name}_{a.name}")
            else:
                rep = self.const_codes(a, grid, "rne", f"{n.name}_{a.name}")
            if rep is None:
                continue
            if rep.qt is not None and rep.qt.max_abs_centered >= 2 ** 30:
                raise FloatIsland(f"constant '{a.name}' is far outside the grid of "
                                  f"'{n.name}'")
            self.env[a.name] = rep
