"""Lowering rules for shape-only ops and splits: the integer tensor passes through unchanged (a
per-channel accumulator is requantized first when the op would move its channels)."""
from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import Any

import torch
import torch.fx

from qpasses.algorithms.lowering.affine import moved_axis
from qpasses.algorithms.lowering.config import FloatIsland, Rep
from qpasses.ir.fx import node_arg, node_shape
from qpasses.ir import ops
__all__ = ["ShapeRules"]

Node = torch.fx.Node


class ShapeRules:
    """Lowers flatten/view/reshape/permute/... and split/chunk/unbind/tensor_split.

    Mixed into :class:`~qpasses.algorithms.lowering.builder.GraphLowering`, whose ``env``,
    ``options``, ``stats`` and emit helpers it uses.
    """

    def lower_split(self, n: Node) -> Rep:
        """split/chunk/unbind/tensor_split of an integer value: a tuple of slices on the same
        grid; a per-channel grid split along its channel dim gives each piece its channels."""
        src = self.materialize(self.env[n.args[0].name], n)
        qt = src.qt
        assert qt is not None
        pieces = None
        if qt.per_channel:
            tms = n.meta.get("tensor_meta")
            in_shape = node_shape(n.args[0])
            dim = node_arg(n, 2, "dim", 0) if n.target not in (torch.unbind, "unbind") else \
                node_arg(n, 1, "dim", 0)
            if not isinstance(tms, (tuple, list)) or in_shape is None or \
                    not all(hasattr(t, "shape") for t in tms):
                raise FloatIsland("split of a per-channel accumulator without traced shapes")
            ax = (qt.axis or 1) % len(in_shape)
            if int(dim) % len(in_shape) == ax:
                if n.target in (torch.unbind, "unbind"):
                    raise FloatIsland("unbind along the channels of a per-channel accumulator")
                pieces, off = [], 0
                for t in tms:
                    c = int(t.shape[ax])
                    sl = slice(off, off + c)
                    pieces.append(replace(qt, scale=qt.scale[sl], fbgemm=None if qt.fbgemm is None
                                          else (qt.fbgemm[0], qt.fbgemm[1][sl])))
                    off += c
            else:
                pieces = [qt] * len(tms)
        args, kwargs = self.map_args(n, lambda r, a: src.node if a is n.args[0] else r.node)
        node = self.emit(n.op, n.target, args, kwargs, name=n.name, like=n, is_int=False)
        return Rep(node, qt, value=True, pieces=pieces)      # a tuple of integer tensors

    def lower_passthrough(self, n: Node, mod: Any) -> Rep:
        """A shape-only op: the same codes on the same grid, moved around."""
        src_node = n.args[0] if n.args else None
        if not isinstance(src_node, Node):
            raise FloatIsland("shape op without a tensor input")
        src = self.env[src_node.name]
        if not src.is_int:
            raise FloatIsland("shape op on a float value")
        if src.pieces is not None and n.target is operator.getitem:
            idx = n.args[1]
            if not isinstance(idx, int):
                raise FloatIsland("indexing a split per-channel value by a non-constant")
            node = self.emit(n.op, n.target, (src.node, idx), name=n.name, like=n)
            return Rep(node, src.pieces[idx])
        qt = src.qt
        assert qt is not None
        if qt.per_channel:
            key = n.target if n.op != "call_module" else "flatten"
            ins, outs = node_shape(src_node), node_shape(n)
            ok = key in ops.SHAPE_ONLY_TARGETS and ins is not None and outs is not None
            if ok and qt.axis == 1:
                ok = len(outs) >= 2 and ins[:2] == outs[:2] and \
                    math.prod(ins[2:]) == math.prod(outs[2:])
            elif ok:
                ok = ins[-1] == outs[-1] and math.prod(ins[:-1]) == math.prod(outs[:-1])
            if not ok:
                # quantization is elementwise: put the value on the grid of the quantizer it
                # reaches first (the requantization then fuses into its layer), then move it
                # around; else track where the channels go (a permute moves the axis, a reshape
                # that keeps the channel dim whole keeps it)
                target = self.lookahead_target(n)
                new_axis = None if target is not None or ins is None or outs is None or \
                    qt.axis is None else moved_axis(n, qt.axis, ins, outs)
                if new_axis is not None and outs[new_axis] == len(qt.scale):
                    qt = replace(qt, axis=new_axis)
                elif target is None:
                    # the channels are split or merged and no quantizer follows: a lut-bits
                    # intermediate grid (calibrated range, else the proven bound) first
                    src = self.intermediate_grid(n, src_node, src, f"{n.name}_requant")
                    qt = src.qt
                    assert qt is not None
                else:
                    src = self.requantize_to(src, target, src_node, f"{n.name}_requant")
                    qt = src.qt
                    assert qt is not None
        args, kwargs = self.map_args(n, lambda r, a: src.node if a is src_node else r.node)
        node = self.emit(n.op, n.target, args, kwargs, name=n.name, like=n)
        return Rep(node, qt, src.lo, src.hi)
