"""Lowering rules for joins and products of integer tensors: residual adds (:class:`IntAdd`),
concatenations (:class:`IntCat`) and tensor products (:class:`IntMul`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.fx

from qpasses.ir.annotations import QMETA_KEY
from qpasses.modules.int_sim import Requantize
from qpasses.modules.int_sim_ops import IntAdd, IntCat, IntMul
from qpasses.algorithms.lowering.config import INT32_MAX, FloatIsland, QType, Rep
from qpasses.algorithms.lowering.nodes import f32
from qpasses.ir.fx import node_arg
from qpasses.ir.ops import target_name

__all__ = ["JoinRules"]

Node = torch.fx.Node


class JoinRules:
    """Lowers add, cat and mul of integer tensors onto the grid of the quantizer after them.

    Mixed into :class:`~qpasses.algorithms.lowering.builder.GraphLowering`, whose ``env``,
    ``options``, ``stats`` and emit helpers it uses.
    """

    def _int_inputs(self, n: Node, tensors: Sequence[Node]) -> list[Rep]:
        reps = []
        for a in tensors:
            r = self.env[a.name]
            if not r.is_int:
                raise FloatIsland(f"{target_name(n)} of a float and an integer value")
            reps.append(self.materialize(r, n))
        return reps

    def lower_add(self, n: Node, tensors: list[Node]) -> Rep:
        """A residual add: :class:`IntAdd` onto the quantizer grid after it (or an exact sum)."""
        if n.kwargs.get("alpha", 1) != 1 or (len(n.args) > 2):
            raise FloatIsland("add with alpha")
        reps = self._int_inputs(n, tensors)
        target = self.output_target(n)
        qts = [r.qt for r in reps]
        if any(q.per_channel for q in qts):  # type: ignore[union-attr]
            raise FloatIsland("add of a per-channel accumulator (no quantizer on the add's inputs)")
        if target is None:
            first = qts[0]
            if not all(q.same_grid(first) for q in qts):  # type: ignore[union-attr]
                raise FloatIsland("add of values on different grids with no quantizer after it")
            k = len(qts)
            target = QType(first.scale, first.zero_point * k, sum(q.qmin for q in qts),
                           sum(q.qmax for q in qts), kind="sum")
        mod = IntAdd([q.scale[0] for q in qts], [q.zero_point for q in qts],
                     [q.max_abs_centered for q in qts], target.scale[0], target.zero_point,
                     target.qmin, target.qmax, self.options.rounding, self.options.multiplier_bits)
        node = self.call_int(n.name, mod, tuple(r.node for r in reps), n, n.name)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        self.stats["num_int_adds"] += 1
        return Rep(node, target)

    def product_inputs(self, n: Node, tensors: Sequence[Node]) -> list[Rep]:
        """The integer operands of a product (mul, matmul), each on a per-tensor grid at most
        16 bits wide: per-channel or wider values go onto an intermediate grid first."""
        reps = []
        for a in tensors:
            r = self.env[a.name]
            if not r.is_int:
                raise FloatIsland(f"{target_name(n)} of a float and an integer value")
            if r.qt.per_channel or r.qt.span >= 2 ** 16:  # type: ignore[union-attr]
                r = self.intermediate_grid(n, a, r, f"{n.name}_{a.name}_grid")
            reps.append(self.materialize(r, n))
        return reps

    def lower_mul(self, n: Node, tensors: list[Node]) -> Rep:
        """A tensor product reaching a quantizer: :class:`IntMul` onto its grid."""
        reps = self.product_inputs(n, tensors)
        target = self.lookahead_target(n)
        if target is None:
            raise FloatIsland("tensor product whose value reaches no quantizer (no output grid)")
        a, b = (r.qt for r in reps)
        assert a is not None and b is not None
        if a.max_abs_centered * b.max_abs_centered > INT32_MAX:
            raise FloatIsland("tensor product of wide operands would leave int32")
        mod = IntMul((a.scale[0], a.zero_point), (b.scale[0], b.zero_point),
                     target.scale[0], target.zero_point, target.qmin, target.qmax,
                     self.options.rounding, self.options.multiplier_bits)
        mod.rq.prove(a.max_abs_centered * b.max_abs_centered)
        node = self.call_int(n.name, mod, tuple(r.node for r in reps), n, n.name)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        self.stats["num_int_muls"] += 1
        return Rep(node, target)

    def lower_cat(self, n: Node) -> Rep:
        """A concatenation: :class:`IntCat`, inputs requantized where their grid differs."""
        seq = node_arg(n, 0, "tensors", ())
        dim = node_arg(n, 1, "dim", 0)
        if not isinstance(seq, (list, tuple)) or not all(isinstance(a, Node) for a in seq):
            raise FloatIsland("cat of a non-list argument")
        reps = self._int_inputs(n, list(seq))
        qts = [r.qt for r in reps]
        if any(q.per_channel for q in qts):  # type: ignore[union-attr]
            raise FloatIsland("cat of a per-channel accumulator")
        target = self.output_target(n)
        if target is None:
            first = qts[0]
            if not all(q.same_grid(first) for q in qts):  # type: ignore[union-attr]
                raise FloatIsland("cat of values on different grids with no quantizer after it")
            target = replace(first, qmin=min(q.qmin for q in qts),  # type: ignore[union-attr]
                             qmax=max(q.qmax for q in qts))  # type: ignore[union-attr]
        rqs: list[Requantize | None] = []
        for q in qts:
            assert q is not None
            if q.within(target):
                rqs.append(None)
                continue
            rq = Requantize(q.scale[0] / target.scale[0], in_zero_point=q.zero_point,
                            out_zero_point=target.zero_point, qmin=target.qmin,
                            qmax=target.qmax, rounding=self.options.rounding,
                            multiplier_bits=self.options.multiplier_bits,
                            scale_f32=f32(q.scale[0]) / f32(target.scale[0]))
            rq.prove(q.max_abs_centered)
            rqs.append(rq)
        mod = IntCat(int(dim), rqs, target.qmin, target.qmax)
        node = self.call_int(n.name, mod, tuple(r.node for r in reps), n, n.name)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        self.stats["num_int_cats"] += 1
        return Rep(node, target)
