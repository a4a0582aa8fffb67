"""The result of a channel walk: channel classes, groups of coupled producers and their members.

A *channel class* (the pruning unit) is one equivalence class of atoms; a *group* is a set of
classes whose producers are connected (networkx components), listed with every member that holds
them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import torch
import torch.fx

from qpasses.algorithms.channels.state import target_name
from qpasses.ir.layers import LayerInfo

__all__ = ["Member", "ChannelGroup", "TensorChannels", "ChannelGroups", "build_groups"]




@dataclass(frozen=True)
class Member:
    """One tensor or parameter holding channels of a group.

    ``role``: ``producer`` (weight dim 0 / bias of a layer), ``consumer`` (weight dim 1 of a
    layer), ``grouped-in`` (input blocks of a grouped/depthwise conv), ``norm`` (BatchNorm
    statistics and affine), ``param`` (a per-channel parameter or buffer: PReLU slopes, declared
    quantizer state, an elementwise ``get_attr`` operand) or ``tensor`` (a node's output).
    ``index_map[k]``: the positions along ``dim`` that hold group channel ``k``.
    """
    node: str
    role: str
    target: str
    dim: int
    index_map: tuple[tuple[int, ...], ...]

    def mapping_text(self) -> str:
        """``index_map`` in short: a range ``[a:b]``, a permutation or ``blocks[nxk]``."""
        flat = [p for ps in self.index_map for p in ps]
        if all(len(ps) == 1 for ps in self.index_map):
            if not flat:
                return "[]"
            if flat == list(range(flat[0], flat[0] + len(flat))):
                return f"[{flat[0]}:{flat[0] + len(flat)}]"
            return "perm[" + ",".join(map(str, flat[:8])) + (",..." if len(flat) > 8 else "") + "]"
        sizes = {len(ps) for ps in self.index_map}
        size = f"{sizes.pop()}" if len(sizes) == 1 else "var"
        return f"blocks[{len(self.index_map)}x{size}]"


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels of a set of producers. Group channel ``k`` is channel class ``classes[k]``
    (the pruning unit); ``reasons[k]`` says why it can never be pruned (``None``: prunable)."""
    index: int
    classes: tuple[int, ...]
    producers: tuple[str, ...]          # fx node names of the producing layers
    members: tuple[Member, ...]
    reasons: tuple[str | None, ...]

    @property
    def num_channels(self) -> int:
        return len(self.classes)

    @property
    def num_prunable(self) -> int:
        return sum(r is None for r in self.reasons)

    def __str__(self) -> str:
        head = (f"group {self.index}: {self.num_channels} channels, {self.num_prunable} prunable; "
                f"producers: {', '.join(self.producers)}")
        lines = [head]
        for m in self.members:
            lines.append(f"  {m.role:<10} {m.node} ({m.target}) dim {m.dim} {m.mapping_text()}")
        why = sorted({r for r in self.reasons if r is not None})
        for r in why[:5]:
            lines.append(f"  unprunable: {r}")
        if len(why) > 5:
            lines.append(f"  unprunable: ... {len(why) - 5} more reasons")
        return "\n".join(lines)


@dataclass(frozen=True)
class TensorChannels:
    """The channel classes of one node's output (``item`` indexes a tuple output, else -1).

    ``dim`` is the first channel dim and ``block`` the sizes of the channel dims (one entry, or
    several after a view split the channel dim); ``classes`` is row-major over ``block``.
    ``sources``/``gather``: for pure index-mapping nodes (cat, split, reshape, permute...), the
    output position ``p`` holds the value at ``gather[p]`` of the concatenated sources' positions.
    """
    node: str
    item: int
    dim: int
    block: tuple[int, ...]
    classes: tuple[int, ...]
    sources: tuple[str, ...] = ()
    gather: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ChannelGroups:
    """Result of ``channel-groups``.

    ``groups``: coupled producer channels with members; ``tensors``: the classes at every tracked
    tensor; ``kinds``: how each node maps channels (``producer``, ``grouped``, ``norm``,
    ``chparam``, ``eltwise``, ``binary``, ``cat``, ``cat-other``, ``split``, ``split-other``,
    ``getitem``, ``reshape``, ``permute``, ``same``, ``pool``, ``reduce``, ``input``, ``const``,
    ``int``, ``weight-quant``, ``output``, ``opaque``); ``class_producers[c]``: the (layer node,
    output channel) atoms of class ``c``; ``class_reasons``: unprunable classes and why;
    ``params``: per-channel parameter members ``(node, attribute, dim)`` sliced with the node's
    channels; ``consumers``: ``(layer node, input node)`` for every groups=1 layer whose input
    channels are tracked (its weight's dim 1 is sliced with them).
    """
    groups: tuple[ChannelGroup, ...]
    tensors: tuple[TensorChannels, ...]
    kinds: tuple[tuple[str, str], ...]
    class_producers: tuple[tuple[tuple[str, int], ...], ...]
    class_reasons: tuple[tuple[int, str], ...]
    params: tuple[tuple[str, str, int], ...]
    consumers: tuple[tuple[str, str], ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_producers)

    @cached_property
    def reason_of(self) -> dict[int, str]:
        return dict(self.class_reasons)

    @cached_property
    def kind_of(self) -> dict[str, str]:
        return dict(self.kinds)

    @cached_property
    def tensor_of(self) -> dict[tuple[str, int], TensorChannels]:
        return {(t.node, t.item): t for t in self.tensors}

    @cached_property
    def group_of_class(self) -> dict[int, int]:
        return {c: g.index for g in self.groups for c in g.classes}

    def groups_of(self, node: str) -> list[ChannelGroup]:
        """Groups with a member at ``node`` (producer, consumer, norm, param or tensor)."""
        return [g for g in self.groups if any(m.node == node for m in g.members)]

    def group_of_layer(self, node: str) -> ChannelGroup | None:
        """The group holding the output channels of layer node ``node``."""
        for g in self.groups:
            if node in g.producers:
                return g
        return None

    @property
    def num_prunable_classes(self) -> int:
        return sum(g.num_prunable for g in self.groups)

    def summary(self) -> str:
        n_ch = sum(g.num_channels for g in self.groups)
        return (f"{len(self.groups)} channel groups, {n_ch} channel classes, "
                f"{self.num_prunable_classes} prunable")

    def __str__(self) -> str:
        return "\n".join([self.summary()] + [str(g) for g in self.groups])


def build_groups(graph: torch.fx.Graph, tensors: list[TensorChannels],
                 producers: list[list[tuple[str, int]]], reasons: dict[int, str], *,
                 kinds: dict[str, str], layer_infos: dict[str, LayerInfo],
                 consumers: dict[str, str], grouped_in: dict[str, str], chparam_in: dict[str, str],
                 params: list[tuple[str, str, int]]) -> tuple[ChannelGroup, ...]:
    """Channel groups: classes linked through shared producer layers (networkx components), in
    graph order, each listed with every member (producer, consumer, norm, param, tensor) holding
    its channels. The arguments are what a ChannelWalker recorded."""
    g = nx.Graph()
    for c, prods in enumerate(producers):
        for node, _ in prods:
            g.add_edge(("class", c), ("layer", node))
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    by_node: dict[str, list[TensorChannels]] = {}
    for t in tensors:
        by_node.setdefault(t.node, []).append(t)
    comps = []
    for comp in nx.connected_components(g):
        classes = [c for kind, c in comp if kind == "class"]
        layers = sorted((n for kind, n in comp if kind == "layer"), key=order.__getitem__)
        # group channel order: the first producer's channel order
        rank = {}
        for t in by_node.get(layers[0], []):
            for p, c in enumerate(t.classes):
                rank.setdefault(c, p)
        classes.sort(key=lambda c: (rank.get(c, 1 << 30), c))
        comps.append((order[layers[0]], classes, layers))
    comps.sort(key=lambda t: (t[0], t[1][:1]))
    where: dict[int, tuple[int, int]] = {}      # class -> (group, group channel)
    for gi, (_, classes, _) in enumerate(comps):
        for k, c in enumerate(classes):
            where[c] = (gi, k)
    members: list[list[Member]] = [[] for _ in comps]
    sizes = [len(c) for _, c, _ in comps]

    def add(t: TensorChannels, node: str, role: str, target: str, dim: int) -> None:
        buckets: dict[int, list[list[int]]] = {}
        for p, c in enumerate(t.classes):
            w = where.get(c)
            if w is None:
                continue
            gi, k = w
            b = buckets.get(gi)
            if b is None:
                b = buckets[gi] = [[] for _ in range(sizes[gi])]
            b[k].append(p)
        for gi, b in buckets.items():
            members[gi].append(Member(node, role, target, dim, tuple(tuple(x) for x in b)))

    params_by_node: dict[str, list[tuple[str, int]]] = {}
    for node, attr, dim in params:
        params_by_node.setdefault(node, []).append((attr, dim))
    for n in graph.nodes:
        kind = kinds.get(n.name)
        own = by_node.get(n.name, [])
        for t in own:
            if kind in ("producer", "grouped"):
                add(t, n.name, "producer", layer_infos[n.name].weight_attr, 0)
            else:
                add(t, n.name, "tensor", str(n.target) if n.op != "call_function"
                    else target_name(n.target), t.dim)
        if n.name in consumers or n.name in grouped_in or n.name in chparam_in:
            src = consumers.get(n.name) or grouped_in.get(n.name) \
                or chparam_in[n.name]
            for t in by_node.get(src, []):
                if t.item != -1:
                    continue
                if n.name in consumers:
                    add(t, n.name, "consumer", layer_infos[n.name].weight_attr, 1)
                elif n.name in grouped_in:
                    add(t, n.name, "grouped-in",
                        f"{layer_infos[n.name].weight_attr} (whole groups)", 1)
                elif kind == "norm":
                    add(t, n.name, "norm", str(n.target), 0)
        if n.name in params_by_node and own:
            for attr, dim in params_by_node[n.name]:
                add(own[0], n.name, "param", attr, dim)
    return tuple(ChannelGroup(gi, tuple(classes), tuple(layers), tuple(members[gi]),
                              tuple(reasons.get(c) for c in classes))
                 for gi, (_, classes, layers) in enumerate(comps))
