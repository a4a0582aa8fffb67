"""Sign facts: which fx nodes provably produce non-negative tensors (so an unsigned grid fits).

Used by ``annotate-bitwidths`` (unsigned activation specs) and by the act x act product specs
(:mod:`qpasses.ir.act_products`); re-exported by :mod:`qpasses.passes.annotate_bitwidths`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from qpasses.ir import ops
from qpasses.ir.fx import node_arg, submodule_or_none

__all__ = ["nonnegative_nodes"]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, complex)


def _value_nonneg(v: Any, nonneg: set[str]) -> bool:
    if isinstance(v, torch.fx.Node):
        return v.name in nonneg
    if v is None:
        return True
    if _is_number(v):
        return v >= 0
    if isinstance(v, (list, tuple)):
        return all(_value_nonneg(x, nonneg) for x in v)
    return False


def _min_at_least_zero(v: Any) -> bool:
    return _is_number(v) and v >= 0


def _node_nonneg(gm: torch.fx.GraphModule, n: torch.fx.Node, nonneg: set[str]) -> bool:
    first = n.args[0] if n.args else None
    if n.op == "call_module":
        mod = submodule_or_none(gm, str(n.target))
        if mod is None:
            return False
        if isinstance(mod, nn.Hardtanh):  # includes ReLU6
            return _min_at_least_zero(mod.min_val)
        if isinstance(mod, ops.NONNEGATIVE_MODULES):
            return True
        if isinstance(mod, nn.Upsample):
            return mod.mode in ops.INTERPOLATION_CONVEX_MODES and _value_nonneg(first, nonneg)
        if isinstance(mod, ops.SIGN_PRESERVING_MODULES):
            return _value_nonneg(first, nonneg)
        return False
    if n.op == "call_function":
        t = n.target
        if t in ops.NONNEGATIVE_FUNCTIONS:
            return True
        if t in ops.HARDTANH_FUNCTIONS:
            return _min_at_least_zero(node_arg(n, 1, "min_val", -1.0))
        if t in ops.LOWER_CLAMP_FUNCTIONS:
            return _min_at_least_zero(node_arg(n, 1, "min", None))
        if t is F.threshold:
            return (_min_at_least_zero(node_arg(n, 1, "threshold", None))
                    and _min_at_least_zero(node_arg(n, 2, "value", None)))
        if t is F.interpolate:
            return (node_arg(n, 3, "mode", "nearest") in ops.INTERPOLATION_CONVEX_MODES
                    and _value_nonneg(first, nonneg))
        if t is F.pad:
            mode, value = node_arg(n, 2, "mode", "constant"), node_arg(n, 3, "value", None)
            fill_ok = mode != "constant" or value is None or _min_at_least_zero(value)
            return fill_ok and mode in ("constant", "reflect", "replicate", "circular") \
                and _value_nonneg(first, nonneg)
        if t in ops.SIGN_PRESERVING_FUNCTIONS:
            return _value_nonneg(first, nonneg)
        if t in ops.MIN_FUNCTIONS:
            return all(_value_nonneg(a, nonneg) for a in n.all_input_nodes)
        if t in ops.CAT_FUNCTIONS or t in ops.STACK_FUNCTIONS:
            return _value_nonneg(node_arg(n, 0, "tensors", None), nonneg)
        if t in ops.ADD_FUNCTIONS or t in ops.MUL_FUNCTIONS:
            return all(_value_nonneg(a, nonneg) for a in n.args) and \
                all(_value_nonneg(v, nonneg) for v in n.kwargs.values())
        return False
    if n.op == "call_method":
        t = str(n.target)
        if t in ops.NONNEGATIVE_METHODS:
            return True
        if t in ops.LOWER_CLAMP_METHODS:
            return _min_at_least_zero(node_arg(n, 1, "min", None))
        if t in ops.SIGN_PRESERVING_METHODS:
            return _value_nonneg(first, nonneg)
        if t in ops.MIN_METHODS:
            return all(_value_nonneg(a, nonneg) for a in n.all_input_nodes)
        if t in ops.ADD_METHODS or t in ops.MUL_METHODS:
            return all(_value_nonneg(a, nonneg) for a in n.args) and \
                all(_value_nonneg(v, nonneg) for v in n.kwargs.values())
        return False
    return False  # placeholders (network inputs), get_attr constants, outputs: signed


def nonnegative_nodes(gm: torch.fx.GraphModule) -> frozenset[str]:
    """Names of the nodes whose output is provably >= 0 (so an unsigned grid fits it).

    Sound and conservative: relu/relu6/hardtanh(min>=0)/clamp(min>=0)/sigmoid/softmax/... outputs
    are non-negative; pools, flatten/view/permute, dropout, getitem, safe interpolation keep the
    sign of their input; cat/stack/add/mul are non-negative when every operand is. Everything
    else (network inputs, conv/linear/batch-norm outputs, residual adds of signed tensors) is
    treated as possibly negative.
    """
    nonneg: set[str] = set()
    for n in gm.graph.nodes:
        if _node_nonneg(gm, n, nonneg):
            nonneg.add(n.name)
    return frozenset(nonneg)
