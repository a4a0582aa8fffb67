"""Joins and scale-sharing groups.

A *join* is an add of two tensors or a concatenation: in the integer graph its inputs and its
output must share one scale (an integer add or cat only works on one grid), so every tensor that
meets at a join, and every tensor read by several layers, belongs to one *scale-sharing group*
with one activation spec. annotate-bitwidths writes one spec per group; insert-fake-quant gives
each group one quantizer; the search passes give each group one width.
"""
from __future__ import annotations

from collections.abc import Iterable

import networkx as nx
import torch
import torch.fx

from qpasses.ir import ops
from qpasses.ir.annotations import get_qmeta
from qpasses.ir.fx import is_tensor_node, node_arg
from qpasses.ir.layers import quantizable_layers

__all__ = ["is_join", "join_inputs", "layer_input", "scale_sharing_groups", "share_components"]


def join_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The tensor inputs of an add/cat join, in argument order, without duplicates."""
    if node.op == "call_function" and node.target in ops.CAT_FUNCTIONS:
        tensors = node_arg(node, 0, "tensors", ())
        cand = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
    else:
        cand = list(node.args[:2]) + [node.kwargs.get("other")]
    out = []
    for c in cand:
        if is_tensor_node(c) and c not in out:
            out.append(c)
    return out


def is_join(node: torch.fx.Node) -> bool:
    """operator.add / torch.add / Tensor.add of two tensors, or torch.cat (concat) of tensors.

    Adds with a scalar operand are elementwise ops, not joins.
    """
    if not is_tensor_node(node):
        return False
    if node.op == "call_function" and node.target in ops.CAT_FUNCTIONS:
        return len(join_inputs(node)) >= 1
    if (node.op == "call_function" and node.target in ops.ADD_FUNCTIONS) or \
            (node.op == "call_method" and node.target in ops.ADD_METHODS):
        args = list(node.args[:2]) + ([node.kwargs["other"]] if "other" in node.kwargs else [])
        return sum(is_tensor_node(a) for a in args) >= 2
    return False


def layer_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input activation of a conv/linear node (module or functional form)."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    return x if isinstance(x, torch.fx.Node) else None


def share_components(gm: torch.fx.GraphModule, layer_inputs: Iterable[torch.fx.Node],
                      joins: Iterable[torch.fx.Node]) -> list[tuple[str, ...]]:
    """Connected components over tensors: a join is connected to each of its inputs."""
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    g = nx.Graph()
    for x in layer_inputs:
        g.add_node(x.name)
    for j in joins:
        g.add_node(j.name)
        for x in join_inputs(j):
            g.add_edge(j.name, x.name)
    comps = [tuple(sorted(c, key=order.__getitem__)) for c in nx.connected_components(g)]
    return sorted(comps, key=lambda c: order[c[0]])


def scale_sharing_groups(gm: torch.fx.GraphModule) -> list[tuple[str, ...]]:
    """Groups of node names whose output tensors share one activation spec (and so one scale).

    Read from an annotated graph: the inputs of layers that carry an ``act`` spec, and every join
    with its tensor inputs. Tensors read by several layers, and the inputs and output of an add/cat
    join, land in one group. Groups are sorted by graph position (members too). annotate-bitwidths
    writes identical specs for all members: ``act`` on the layers reading a member, ``output`` on
    the joins; a join's inputs are quantized with the join's ``output`` spec. Call it on the graph
    as annotate-bitwidths left it: fake-quant nodes inserted later are not looked through, so
    afterwards each quantizer node is its own tensor.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    inputs = []
    for info in quantizable_layers(gm):
        node = nodes[info.node]
        x = layer_input(node)
        if x is not None and get_qmeta(node).act is not None:
            inputs.append(x)
    joins = [n for n in gm.graph.nodes if is_join(n)]
    return share_components(gm, inputs, joins)
