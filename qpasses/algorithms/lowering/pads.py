"""Lowering rule for constant zero padding (``F.pad(x, pad)``, ``mode='constant'``, value 0):
on a grid with a zero point, the real 0.0 is the zero-point code, so the codes are padded with
that code (:class:`~qpasses.modules.int_sim_pad.IntPad`), never with the integer 0."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx
import torch.nn.functional as F

from qpasses.algorithms.lowering.config import FloatIsland, Rep
from qpasses.ir.fx import node_arg, node_shape
from qpasses.modules.int_sim_pad import IntPad

__all__ = ["PAD_FUNCTIONS", "PadRules", "zero_pad_reason"]

Node = torch.fx.Node
PAD_FUNCTIONS = frozenset({F.pad, torch.nn.functional.pad})


def zero_pad_reason(n: Node) -> str | None:
    """Why ``n`` is not a constant zero padding by non-negative literal sizes (None when it is:
    such a padding commutes with an affine quantizer, whose zero point codes the real 0.0
    exactly)."""
    if not (n.op == "call_function" and n.target in PAD_FUNCTIONS):
        return "not F.pad"
    pad = node_arg(n, 1, "pad")
    mode = node_arg(n, 2, "mode", "constant")
    value = node_arg(n, 3, "value", None)
    if not isinstance(n.args[0] if n.args else None, Node) or \
            not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad):
        return "F.pad with non-constant pad sizes"
    if mode != "constant" or value not in (None, 0, 0.0):
        return f"F.pad mode={mode!r} value={value!r} (only zero padding is lowered)"
    if any(p < 0 for p in pad):
        return "F.pad with negative pad sizes (cropping)"
    return None


def _pads_dim(pad: tuple[int, ...] | list[int], rank: int, dim: int) -> bool:
    """Whether F.pad's ``pad`` (last dim first) adds entries along ``dim``."""
    k = rank - 1 - dim
    return 2 * k + 1 < len(pad) + 1 and any(pad[2 * k:2 * k + 2])


class PadRules:
    """Mixed into :class:`~qpasses.algorithms.lowering.builder.GraphLowering`."""

    def lower_pad(self, n: Node) -> Rep:
        why = zero_pad_reason(n)
        if why is not None:
            raise FloatIsland(why)
        x, pad = n.args[0], node_arg(n, 1, "pad")
        src = self.env[x.name]
        if not src.is_int:
            raise FloatIsland("pad of a float value")
        src = self.materialize(src, n)            # a pending clamp applies before the padding
        qt = src.qt
        assert qt is not None
        shape = node_shape(x)
        if qt.per_channel and (shape is None or qt.axis is None or
                               _pads_dim(pad, len(shape), qt.axis % len(shape))):
            # padding the channels of a per-channel value: one grid first (the quantizer it
            # reaches, else a lut-bits intermediate grid)
            target = self.lookahead_target(n)
            src = self.requantize_to(src, target, x, f"{n.name}_requant") if target is not None \
                else self.intermediate_grid(n, x, src, f"{n.name}_requant")
            qt = src.qt
            assert qt is not None
        mod = IntPad(tuple(pad), qt.zero_point, qt.qmin, qt.qmax)
        node = self.call_int(n.name, mod, (src.node,), n, n.name)
        self.stats["num_pads"] = self.stats.get("num_pads", 0) + 1
        return Rep(node, replace(qt, qmin=mod.qmin, qmax=mod.qmax))
