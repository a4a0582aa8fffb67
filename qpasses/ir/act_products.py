"""Activation x activation products and parameter-owning leaves with no integer kernel.

- An *act x act product* is a ``matmul``/``bmm`` node (``ops.MATMUL_TARGETS``, any spelling) whose
  two operands are both tensors computed by the graph (attention's Q·Kᵀ and attention·V after
  ``canonicalize`` decomposed ``nn.MultiheadAttention``). It has no weight: both operands are
  activations, quantized with one shared activation spec (``QMeta.act`` on the product node,
  written by ``annotate-bitwidths``); ``insert-fake-quant`` puts a quantizer before each operand.
  Products are named by their node name (the report's row name).
- :func:`leaf_float_island_reason`: why a ``call_module`` leaf that owns parameters stays in float
  (it is neither a quantizable conv/linear nor an op of the op table with an integer form), so
  ``annotate-bitwidths`` reports it instead of leaving a silent hole.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from qpasses.ir import ops
from qpasses.ir.annotations import QuantSpec
from qpasses.ir.attention_rules import undecomposed_reason
from qpasses.ir.einsum_rules import einsum_island_reason
from qpasses.ir.fx import node_shape, submodule_or_none
from qpasses.ir.layers import module_op

__all__ = ["KNOWN_PARAM_MODULES", "act_products", "leaf_float_island_reason",
           "leaf_float_islands", "product_act_specs", "product_operands"]

Node = torch.fx.Node

#: Modules with parameters that are known ops (the lowering has an integer form for them, or a
#: pass folds them away), besides the quantizable conv/linear layers.
KNOWN_PARAM_MODULES: tuple[type, ...] = (ops.LAYER_NORM_MODULES + ops.BATCH_NORM_MODULES
                                         + ops.CHANNELWISE_MODULES)


def product_operands(node: Node) -> tuple[Node, Node] | None:
    """``(a, b)`` when ``node`` is a matmul/bmm of two tensor nodes with traced shapes."""
    if node.op == "call_function" and node.target in ops.MATMUL_FUNCTIONS:
        names = ("input", "other") if node.target is not torch.bmm else ("input", "mat2")
    elif node.op == "call_method" and node.target in ops.MATMUL_METHODS:
        names = ("self", "other") if node.target == "matmul" else ("self", "mat2")
    else:
        return None
    if len(node.args) + len(node.kwargs) != 2:
        return None
    args = list(node.args) + [node.kwargs.get(k) for k in names[len(node.args):]]
    a, b = args
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return None
    if node_shape(a) is None or node_shape(b) is None or node_shape(node) is None:
        return None
    return a, b


def act_products(gm: torch.fx.GraphModule) -> list[Node]:
    """Every act x act product node, in graph order."""
    return [n for n in gm.graph.nodes if product_operands(n) is not None]


def _owns_parameters(mod: nn.Module) -> bool:
    return next(iter(mod.parameters()), None) is not None


def leaf_float_island_reason(gm: torch.fx.GraphModule, node: Node) -> str | None:
    """The float-island reason of a ``call_module`` leaf that owns parameters but is neither a
    quantizable layer nor a known op, or of a ``torch.einsum`` (no integer kernel: the
    ``canonicalize`` rule ``einsum`` turns matrix-product einsums into ``torch.matmul``); None for
    every other node (qpasses' own modules, e.g. search supernets, are not the user's layers and
    are left alone)."""
    if node.op == "call_function":
        return einsum_island_reason(node)
    if node.op != "call_module":
        return None
    mod = submodule_or_none(gm, str(node.target))
    if mod is None or not _owns_parameters(mod) or module_op(mod) is not None \
            or isinstance(mod, KNOWN_PARAM_MODULES) \
            or type(mod).__module__.startswith("qpasses."):
        return None
    if isinstance(mod, nn.MultiheadAttention):
        why = undecomposed_reason(gm, node)
        return why or "nn.MultiheadAttention not decomposed: run canonicalize first"
    return f"no integer kernel for {type(mod).__name__}"


def leaf_float_islands(gm: torch.fx.GraphModule) -> dict[Node, str]:
    """``{node: reason}`` of every leaf :func:`leaf_float_island_reason` reports."""
    out: dict[Node, Any] = {}
    for n in gm.graph.nodes:
        why = leaf_float_island_reason(gm, n)
        if why is not None:
            out[n] = why
    return out



def product_act_specs(gm: torch.fx.GraphModule, act_bits: int, entries: Sequence[Any] = (),
                      nonneg: frozenset[str] = frozenset()) -> dict[Node, QuantSpec]:
    """The activation spec of every act x act product, shared by its two operands: ``act_bits``,
    or the ``act_bits`` of the last config entry (``ConfigEntry``: ``glob``, ``act_bits``) whose
    glob matches the product's node name; unsigned only when both operands are provably
    non-negative (``nonneg``: names from :func:`qpasses.ir.signs.nonnegative_nodes`)."""
    out = {}
    for n in act_products(gm):
        bits = act_bits
        for e in entries:
            if e.act_bits is not None and fnmatch.fnmatchcase(n.name, e.glob):
                bits = e.act_bits
        signed = not all(x.name in nonneg for x in product_operands(n))
        out[n] = QuantSpec(bits=bits, signed=signed, scheme="symmetric" if signed else "unsigned")
    return out
