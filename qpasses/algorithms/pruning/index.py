"""What the channel pruner looks up: the graph's nodes and layers by name, the channel classes of
every tracked tensor, and the plan the planner hands to the surgery."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
from torch import nn

from qpasses.algorithms.channels import ChannelGroups
from qpasses.algorithms.pruning.tensors import tensor_meta_shape
from qpasses.ir.layers import LayerInfo, layer_info

__all__ = ["ChannelIndex", "PrunePlan"]


@dataclass
class PrunePlan:
    """What to remove: the channel classes ``removed``, why each kept class with 0-bit producers
    stays (``kept_reason``, and its category in ``kept_kind``: ``partial``, ``unsupported``,
    ``inexact``, ``last``, ``shape`` or ``quantizer``), and the constants folded into consumer
    biases (``folds``: consumer node -> (input position, value, exact)). ``zero``: the 0-bit
    kernel mask of every producer layer, ``n_zero`` their count."""
    cg: ChannelGroups
    mode: str
    removed: set[int]
    kept_reason: dict[int, str]
    folds: dict[str, list[tuple[int, float, bool]]]
    n_zero: int
    zero: dict[str, np.ndarray]
    kept_kind: dict[int, str]


class ChannelIndex:
    """Lookup tables shared by the planner and the surgery, built once from the graph and its
    ``channel-groups`` result: ``nodes`` by name, ``infos`` of the producer layers, ``kinds``
    (how each node maps channels), ``tensors`` and ``cls_arr`` (the channel classes of every
    tracked tensor, keyed ``(node, item)``) and ``consumers`` (layer node -> input node)."""

    def __init__(self, gm: torch.fx.GraphModule, cg: ChannelGroups):
        self.gm, self.cg = gm, cg
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.kinds = cg.kind_of
        self.tensors = cg.tensor_of
        self.consumers = dict(cg.consumers)
        self.infos: dict[str, LayerInfo] = {}
        for name, kind in cg.kinds:
            if kind in ("producer", "grouped"):
                info = layer_info(gm, self.nodes[name])
                if info is not None:
                    self.infos[name] = info
        self.ncls = cg.num_classes
        self.cls_arr = {key: np.asarray(t.classes, dtype=np.int64)
                        for key, t in self.tensors.items()}

    def removed_mask(self, removed: set[int]) -> np.ndarray:
        """Boolean mask over channel classes: True for the ``removed`` ones."""
        rem = np.zeros(self.ncls, dtype=bool)
        if removed:
            rem[list(removed)] = True
        return rem

    def weight_quantizer(self, layer: str) -> nn.Module | None:
        """The layer's weight quantizer (a child with ``is_weight_quantizer``, or the module a
        functional layer's weight goes through), if any."""
        node = self.nodes[layer]
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            return next((c for c in mod.children() if getattr(c, "is_weight_quantizer", False)),
                        None)
        wn = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(wn, torch.fx.Node) and wn.op == "call_module":
            q = self.gm.get_submodule(str(wn.target))
            return q if getattr(q, "is_weight_quantizer", False) else None
        return None

    def new_shape(self, key: tuple[str, int], rem: np.ndarray) -> tuple[int, ...] | None:
        """The shape of tensor ``key`` once the classes in mask ``rem`` are removed."""
        node = self.nodes[key[0]]
        old = tensor_meta_shape(node, key[1])
        t = self.tensors.get(key)
        if old is None or t is None:
            return old
        r = rem[self.cls_arr[key]]
        if not r.any():
            return old
        keep = ~r.reshape(t.block)
        sizes = []
        for a in range(len(t.block)):
            other = tuple(x for x in range(len(t.block)) if x != a)
            sizes.append(int(keep.any(axis=other).sum()) if other else int(keep.sum()))
        return old[:t.dim] + tuple(sizes) + old[t.dim + len(t.block):]

    def rectangular(self, key: tuple[str, int], rem: np.ndarray) -> bool:
        """Removing ``rem`` leaves a multi-dim channel block a rectangle (whole slices)."""
        t = self.tensors[key]
        if len(t.block) == 1:
            return True
        keep = ~rem[self.cls_arr[key]].reshape(t.block)
        outer = np.ones(t.block, dtype=bool)
        for a in range(len(t.block)):
            other = tuple(x for x in range(len(t.block)) if x != a)
            ind = keep.any(axis=other)
            shape = [1] * len(t.block)
            shape[a] = t.block[a]
            outer = outer & ind.reshape(shape)
        return bool((outer == keep).all())

    def keep_of(self, key: tuple[str, int], removed_arr: np.ndarray) -> np.ndarray | None:
        """The kept channel positions of tensor ``key`` (None: untracked or nothing removed)."""
        if key not in self.cls_arr:
            return None
        r = removed_arr[self.cls_arr[key]]
        if not r.any():
            return None
        return np.flatnonzero(~r)
