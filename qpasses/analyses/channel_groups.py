"""``channel-groups``: which channels of which tensors and parameters must be pruned together.

Built on the FX graph itself (no autograd tracing, so fake-quant graphs work: Torch-Pruning's
DepGraph traces autograd and breaks on them). Every output channel of a conv/linear layer is an
*atom*; the walk over the graph records, for every tensor, which atom sits at each position of
its channel dimension, and unions atoms that must be removed together (union-find). A *channel
class* (the pruning unit) is one equivalence class of atoms; a *group* is a set of classes whose
producers are connected (networkx components), listed with every member that holds them.

Coupling rules (how a node maps or couples channels):

- conv / linear, groups = 1: producer of fresh atoms on its output (dim 0 of weight and bias);
  consumer of its input's atoms (dim 1 of weight). Several calls of one weight (shared modules,
  tied weights) couple their outputs and their inputs position by position.
- grouped and depthwise conv: input block ``k`` and output block ``k`` are one unit (a conv
  group is removed whole, so ``groups`` stays uniform); for depthwise convs that is channel ``j``
  in, channel ``j`` out.
- BatchNorm (all four statistics and the affine pair), PReLU with one slope per channel, and
  quantizer modules declaring per-channel state: per-channel parameters sliced with the channel.
- elementwise ops (activations, dropout, identity, dtype casts, per-tensor activation
  quantizers, contiguous/clone): pass-through.
- binary elementwise ops (add, sub, mul, div; residual adds, squeeze-and-excitation multiplies):
  all operands' channels are coupled position by position; a Python scalar or a size-1
  broadcast operand couples nothing; a ``get_attr`` operand with one value per channel becomes a
  member (sliced with the channel).
- concat along the channel dim: offset ranges; along another dim: operands coupled.
- split / chunk along the channel dim: offset ranges (the pruner rewrites the sizes); along
  another dim: every piece keeps the channels.
- view / reshape / flatten / squeeze / unsqueeze: row-major index mapping from shapes
  (``flatten -> linear`` maps channel ``c`` to the block ``[c*HW, (c+1)*HW)``). A view that splits
  the channel dim into several dims (channel shuffle) yields a multi-dim block; its channels are
  coupled along every axis but the last, so pruning keeps the block rectangular and the view's
  size arguments stay valid. transpose / permute move or permute the block (shuffle = view,
  transpose, view: a permutation mapping).
- pooling (max/avg/adaptive, modules or functions) and mean/sum over non-channel dims:
  pass-through.
- ``size()`` / ``.shape`` results may only feed integer arithmetic and view/reshape sizes.

Anything else that touches a channel (unknown modules and functions, slicing, a reduction over
the channel dim, graph outputs, graph inputs, constants concatenated in) makes the affected
classes unprunable, with the node named as the reason: never wrong, at worst conservative.
"""
from __future__ import annotations

import contextlib
import gc
import math
import operator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import networkx as nx
import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from passes_registry import Analysis, register_analysis

from qpasses.ir.layers import LayerInfo, layer_info

__all__ = ["ChannelGroups", "ChannelGroup", "Member", "TensorChannels", "ChannelGroupsAnalysis",
           "compute_channel_groups", "ELTWISE_MODULES", "POOL_MODULES"]

# ------------------------------------------------------------------------------------------------
# result


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


# ------------------------------------------------------------------------------------------------
# op tables

ELTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.GELU,
    nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Hardshrink, nn.Softshrink, nn.Threshold,
    nn.LogSigmoid)
POOL_MODULES: dict[type, int] = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
    nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}
_BN_FORWARD = nn.modules.batchnorm._BatchNorm.forward

ELTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.hardtanh, F.hardtanh_, F.hardswish,
    F.hardsigmoid, torch.sigmoid, F.sigmoid, F.silu, F.gelu, torch.tanh, F.tanh, F.leaky_relu,
    F.elu, F.selu, F.celu, F.mish, F.softplus, F.softsign, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, torch.clamp, torch.clip,
    torch.clamp_min, torch.clamp_max, operator.neg, torch.neg, torch.abs, torch.exp, torch.square,
    torch.sqrt, F.hardshrink, F.softshrink, F.threshold, F.logsigmoid, torch.clone, torch.detach}
ELTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_",
                   "clip", "clip_", "neg", "abs", "exp", "float", "half", "double", "to"}
SAME_METHODS = {"contiguous", "clone", "detach"}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      F.feature_alpha_dropout}

BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                    operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub,
                    torch.mul, torch.div, torch.subtract, torch.multiply}
BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
SPLIT_FUNCTIONS = {torch.split, torch.chunk}
SPLIT_METHODS = {"split", "chunk"}
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
PERMUTE_FUNCTIONS = {torch.transpose, torch.permute, torch.swapaxes, torch.swapdims}
PERMUTE_METHODS = {"transpose", "permute", "swapaxes", "swapdims"}
REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}
REDUCE_METHODS = {"mean": "mean", "sum": "sum", "amax": "amax", "amin": "amin"}
POOL_FUNCTIONS: dict[Any, int] = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
    F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3}
INT_FUNCTIONS = {operator.floordiv, operator.mul, operator.add, operator.sub, operator.truediv,
                 operator.mod, operator.neg, operator.getitem}


def _is_stochastic_depth(t: Any) -> bool:
    """torchvision.ops.stochastic_depth (identity when ``training=False``)."""
    return getattr(t, "__name__", None) == "stochastic_depth" and \
        str(getattr(t, "__module__", "")).startswith("torchvision.ops")


def _tname(t: Any) -> str:
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


# ------------------------------------------------------------------------------------------------
# walker state


@dataclass
class _T:
    """Channel state of a tensor: atoms over the block of channel dims starting at ``dim``."""
    dim: int
    atoms: np.ndarray
    rank: int
    sources: tuple[str, ...] = ()
    gather: np.ndarray | None = None

    @property
    def m(self) -> int:
        return self.atoms.ndim

    @property
    def size(self) -> int:
        return int(self.atoms.size)


@dataclass
class _Tup:
    items: list[_T | None]
    # for a split along the channel dim: the input node and each item's offset
    split_src: str | None = None
    offsets: list[int] | None = None


@dataclass
class _Int:
    """An int (or tuple of ints) derived from tensor sizes."""
    sources: frozenset[str]


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, torch.fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(int(s) for s in tm.shape)
    return None


def _tuple_shapes(node: torch.fx.Node) -> list[tuple[int, ...] | None] | None:
    tm = node.meta.get("tensor_meta")
    if isinstance(tm, (list, tuple)) and not hasattr(tm, "shape"):
        return [tuple(int(s) for s in t.shape) if hasattr(t, "shape") else None for t in tm]
    return None


def _flat_nodes(a: Any) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg(a, lambda n: out.append(n) or n)
    return out


def _has_node(a: Any) -> bool:
    return bool(_flat_nodes(a))


def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _norm_dim(d: Any, rank: int) -> int | None:
    if not isinstance(d, int) or isinstance(d, bool) or rank == 0:
        return None
    if -rank <= d < rank:
        return d % rank
    return None


def _module_forward_is(mod: nn.Module, bases: tuple[type, ...]) -> bool:
    """``mod`` is an instance of one of ``bases`` and keeps that base's forward."""
    for base in bases:
        if isinstance(mod, base):
            return type(mod).forward is base.forward
    return False


def reshape_mapping(in_shape: tuple[int, ...], dim: int, block: tuple[int, ...],
                    out_shape: tuple[int, ...]) -> tuple[int, tuple[int, ...], np.ndarray] | None:
    """Row-major mapping of a channel block through a reshape.

    Returns ``(new_dim, new_block, gather)``: the output's channel block starts at ``new_dim``
    with sizes ``new_block`` and its flat position ``o`` holds input block position
    ``gather[o]``. ``None`` when the channels do not stay a block of whole dims (e.g. merged with
    the batch dim).
    """
    m = len(block)
    prefix = math.prod(in_shape[:dim])
    inner_s = math.prod(in_shape[dim + m:])
    n = math.prod(block)
    cands = [k for k in range(len(out_shape) + 1) if math.prod(out_shape[:k]) == prefix]
    if not cands or inner_s == 0 or n == 0:
        return None
    d2 = max(k for k in cands if k < len(out_shape)) if any(k < len(out_shape) for k in cands) \
        else None
    if d2 is None:
        return None
    for m2 in range(1, len(out_shape) - d2 + 1):
        inner_t = math.prod(out_shape[d2 + m2:])
        if inner_t and inner_s % inner_t == 0:
            break
    else:
        return None
    new_block = tuple(out_shape[d2:d2 + m2])
    n_out = math.prod(new_block)
    if n_out * inner_t != n * inner_s:
        return None
    gather = (np.arange(n_out, dtype=np.int64) * inner_t) // inner_s
    if gather.size and gather.max() >= n:
        return None
    return d2, new_block, gather


# ------------------------------------------------------------------------------------------------
# the walk


class _Walker:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.parent: list[int] = []
        self.owner: list[tuple[str, str, int]] = []     # (kind, node, index) per atom
        self.bad: dict[int, tuple[int, str]] = {}        # atom -> (order marked, reason)
        self.state: dict[str, Any] = {}
        self.kinds: dict[str, str] = {}
        self.params: list[tuple[str, str, int]] = []
        self.shared: dict[Any, list[np.ndarray]] = {}
        self.layers: dict[str, LayerInfo] = {}
        self.consumers: dict[str, str] = {}              # layer node -> input node (groups == 1)
        self.grouped_in: dict[str, str] = {}             # grouped layer node -> input node
        self.chparam_in: dict[str, str] = {}             # norm/chparam node -> input node

    # -- union-find ---------------------------------------------------------------------------
    def new(self, n: int, kind: str, node: str) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.owner.extend((kind, node, i) for i in range(n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist()):
            self.union(x, y)

    def mark(self, atoms: Any, reason: str) -> None:
        if isinstance(atoms, _T):
            atoms = atoms.atoms
        seq = len(self.bad)
        for a in np.asarray(atoms).reshape(-1).tolist():
            if a not in self.bad:
                self.bad[a] = (seq, reason)

    # -- helpers -------------------------------------------------------------------------------
    def t(self, a: Any) -> _T | None:
        if isinstance(a, torch.fx.Node):
            st = self.state.get(a.name)
            if isinstance(st, _T):
                return st
        return None

    def opaque_state(self, node: torch.fx.Node, reason: str) -> Any:
        shape = _shape(node)
        if shape is not None:
            if len(shape) == 0:
                return None
            dim = 1 if len(shape) >= 2 else 0
            atoms = self.new(shape[dim], "opaque", node.name)
            self.mark(atoms, reason)
            return _T(dim, atoms, len(shape))
        shapes = _tuple_shapes(node)
        if shapes is not None:
            items: list[_T | None] = []
            for s in shapes:
                if s is None or len(s) == 0:
                    items.append(None)
                    continue
                dim = 1 if len(s) >= 2 else 0
                atoms = self.new(s[dim], "opaque", node.name)
                self.mark(atoms, reason)
                items.append(_T(dim, atoms, len(s)))
            return _Tup(items)
        return None

    def opaque(self, node: torch.fx.Node, why: str) -> Any:
        reason = f"'{node.name}' ({why})"
        self.kinds[node.name] = "opaque"
        for a in _flat_nodes((node.args, node.kwargs)):
            st = self.state.get(a.name)
            self.mark_state(st, reason)
        return self.opaque_state(node, reason)

    def mark_state(self, st: Any, reason: str) -> None:
        if isinstance(st, _T):
            self.mark(st, reason)
        elif isinstance(st, _Tup):
            for it in st.items:
                if it is not None:
                    self.mark(it, reason)
        elif isinstance(st, _Int):
            for src in st.sources:
                self.mark_state(self.state.get(src), reason)

    def const_state(self, node: torch.fx.Node) -> _T | None:
        """Channel state for a get_attr tensor used where a tracked tensor is needed."""
        shape = _shape(node)
        if shape is None:
            val = self._attr(str(node.target))
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
        if not shape:
            return None
        dim = 1 if len(shape) >= 2 else 0
        atoms = self.new(shape[dim], "opaque", node.name)
        self.mark(atoms, f"'{node.name}' (constant tensor '{node.target}')")
        return _T(dim, atoms, len(shape))

    def _attr(self, target: str) -> Any:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj

    def is_tensor_attr(self, a: Any) -> bool:
        return (isinstance(a, torch.fx.Node) and a.op == "get_attr"
                and isinstance(self._attr(str(a.target)), torch.Tensor))

    def int_sources(self, a: Any) -> frozenset[str] | None:
        """Sources of an int-valued arg (None when it is not int-like)."""
        srcs: set[str] = set()
        ok = True

        def visit(x: Any) -> Any:
            nonlocal ok
            st = self.state.get(x.name)
            if isinstance(st, _Int):
                srcs.update(st.sources)
            else:
                ok = False
            return x
        torch.fx.node.map_arg(a, visit)
        return frozenset(srcs) if ok else None

    # -- the walk ------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                st = self.visit(node)
            except (ValueError, TypeError, IndexError, KeyError, AttributeError,
                    RuntimeError) as e:  # a node we misread: conservative, never wrong
                st = self.opaque(node, f"cannot map channels: {type(e).__name__}: {e}")
            self.state[node.name] = st
            self.kinds.setdefault(node.name, "opaque")
        # shared weights / modules: their calls are coupled position by position
        for key, lists in self.shared.items():
            first = lists[0]
            for other in lists[1:]:
                if other.shape == first.shape:
                    self.union_arrays(first, other)
                else:
                    self.mark(first, f"shared parameter {key[1]} is used with different channel "
                              "counts")
                    self.mark(other, f"shared parameter {key[1]} is used with different channel "
                              "counts")

    def visit(self, node: torch.fx.Node) -> Any:
        op = node.op
        if op == "placeholder":
            self.kinds[node.name] = "input"
            shape = _shape(node)
            if shape is None or len(shape) == 0:
                return None
            dim = 1 if len(shape) >= 2 else 0
            atoms = self.new(shape[dim], "input", node.name)
            self.mark(atoms, f"graph input '{node.name}'")
            return _T(dim, atoms, len(shape))
        if op == "get_attr":
            self.kinds[node.name] = "const"
            return None
        if op == "output":
            self.kinds[node.name] = "output"
            for a in _flat_nodes(node.args):
                self.mark_state(self.state.get(a.name), f"reaches the graph output ('{a.name}')")
            return None
        # int arithmetic on sizes
        if op in ("call_function", "call_method"):
            st = self.visit_int(node)
            if st is not None:
                return st
        # any other use of a size-derived int: the sizes it came from are frozen
        for a in _flat_nodes((node.args, node.kwargs)):
            ist = self.state.get(a.name)
            if isinstance(ist, _Int) and not self.allowed_int_use(node, a):
                self.mark_state(ist, f"'{node.name}' ({_tname(node.target)}) uses the size of a "
                                "tensor")
        if op == "call_module":
            return self.visit_module(node)
        if op == "call_function":
            return self.visit_function(node)
        if op == "call_method":
            return self.visit_method(node)
        return self.opaque(node, f"unsupported node op {op}")

    def allowed_int_use(self, node: torch.fx.Node, a: torch.fx.Node) -> bool:
        is_reshape = (node.op == "call_method" and node.target in ("view", "reshape")) or \
            (node.op == "call_function" and node.target is torch.reshape)
        return is_reshape and node.args and node.args[0] is not a

    def visit_int(self, node: torch.fx.Node) -> _Int | None:
        tgt = node.target
        if node.op == "call_method" and tgt in ("size", "dim", "numel") or \
                (node.op == "call_function" and tgt is getattr and len(node.args) == 2
                 and node.args[1] in ("shape", "ndim")):
            x = node.args[0]
            self.kinds[node.name] = "int"
            if tgt == "dim" or (tgt is getattr and node.args[1] == "ndim"):
                return _Int(frozenset())
            if isinstance(x, torch.fx.Node) and isinstance(self.state.get(x.name), (_T, _Tup)):
                return _Int(frozenset({x.name}))
            return _Int(frozenset())
        if node.op == "call_function" and tgt in INT_FUNCTIONS:
            srcs = self.int_sources((node.args, node.kwargs))
            nodes = _flat_nodes((node.args, node.kwargs))
            if srcs is not None and nodes:
                self.kinds[node.name] = "int"
                return _Int(srcs)
        return None

    # -- modules -------------------------------------------------------------------------------
    def visit_module(self, node: torch.fx.Node) -> Any:
        mod = self.gm.get_submodule(str(node.target))
        info = layer_info(self.gm, node)
        if info is not None:
            return self.layer(node, info, ("module", str(node.target)))
        if getattr(mod, "is_weight_quantizer", False):
            if any(self.t(a) is not None for a in node.args):
                return self.opaque(node, "weight quantizer applied to an activation")
            self.kinds[node.name] = "weight-quant"
            return None
        x = node.args[0] if node.args else None
        st = self.t(x)
        if st is None or len(node.args) != 1 or node.kwargs:
            return self.opaque(node, f"{type(mod).__name__} module")
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if type(mod).forward is not _BN_FORWARD and not isinstance(mod, nn.SyncBatchNorm):
                return self.opaque(node, f"{type(mod).__name__} overrides forward")
            if mod.training or mod.running_mean is None:
                return self.opaque(node, "BatchNorm using batch statistics")
            if st.m != 1 or st.dim != 1 or st.size != mod.num_features:
                return self.opaque(node, "BatchNorm over a dim that is not the channel dim")
            self.kinds[node.name] = "norm"
            self.chparam_in[node.name] = x.name
            self.shared.setdefault(("norm", str(node.target)), []).append(st.atoms)
            return _T(st.dim, st.atoms, st.rank)
        if isinstance(mod, nn.PReLU):
            if type(mod).forward is not nn.PReLU.forward:
                return self.opaque(node, "PReLU overrides forward")
            if mod.num_parameters == 1:
                return self.passthrough(node, st, "eltwise")
            if st.m != 1 or st.dim != 1 or st.size != mod.num_parameters:
                return self.opaque(node, "PReLU slopes do not match the channel dim")
            self.kinds[node.name] = "chparam"
            self.chparam_in[node.name] = x.name
            self.params.append((node.name, f"{node.target}.weight", 0))
            self.shared.setdefault(("param", f"{node.target}.weight"), []).append(st.atoms)
            return _T(st.dim, st.atoms, st.rank)
        if _module_forward_is(mod, ELTWISE_MODULES):
            return self.passthrough(node, st, "eltwise")
        for cls, nd in POOL_MODULES.items():
            if isinstance(mod, cls):
                if type(mod).forward is not cls.forward or getattr(mod, "return_indices", False):
                    return self.opaque(node, f"{type(mod).__name__} returning indices/overridden")
                return self.pool(node, st, nd)
        if isinstance(mod, nn.Flatten) and type(mod).forward is nn.Flatten.forward:
            return self.reshape(node, x, st)
        if isinstance(mod, nn.Unflatten) and type(mod).forward is nn.Unflatten.forward:
            return self.reshape(node, x, st)
        if self.is_act_quantizer(mod):
            declared = tuple(getattr(mod, "per_channel_tensors", ()) or ())
            undeclared = [n for n, t in list(mod.named_parameters(recurse=False))
                          + list(mod.named_buffers(recurse=False))
                          if t.dim() >= 1 and t.shape[0] == st.size and st.size > 1
                          and n not in declared]
            if undeclared:
                return self.opaque(node, f"quantizer state {undeclared} has one entry per "
                                   "channel but the module does not declare per_channel_tensors")
            if declared:
                if st.m != 1 or st.dim != 1:
                    return self.opaque(node, "per-channel quantizer over a non-channel dim")
                self.kinds[node.name] = "chparam"
                self.chparam_in[node.name] = x.name
                for pname in declared:
                    self.params.append((node.name, f"{node.target}.{pname}", 0))
                self.shared.setdefault(("param", str(node.target)), []).append(st.atoms)
                return _T(st.dim, st.atoms, st.rank)
            return self.passthrough(node, st, "eltwise")
        return self.opaque(node, f"{type(mod).__name__} module")

    @staticmethod
    def is_act_quantizer(mod: nn.Module) -> bool:
        if getattr(mod, "is_weight_quantizer", None) is False:        # qpasses FakeQuantize
            return True
        ao = torch.ao.quantization
        if isinstance(mod, (ao.FakeQuantizeBase, ao.ObserverBase)):
            qscheme = getattr(mod, "qscheme", torch.per_tensor_affine)
            return qscheme in (torch.per_tensor_affine, torch.per_tensor_symmetric)
        return False

    def passthrough(self, node: torch.fx.Node, st: _T, kind: str) -> _T:
        self.kinds[node.name] = kind
        if kind != "same" and st.m != 1:
            self.opaque(node, "elementwise op on a channel dim split by a view")
            return self.opaque_state(node, f"'{node.name}' (channel dim split by a view)")
        shape = _shape(node)
        if shape is not None and len(shape) != st.rank:
            return self.opaque(node, "changes the rank")
        if kind == "same":
            return _T(st.dim, st.atoms, st.rank, (node.args[0].name,),
                      np.arange(st.size, dtype=np.int64))
        return _T(st.dim, st.atoms, st.rank)

    # -- layers --------------------------------------------------------------------------------
    def layer(self, node: torch.fx.Node, info: LayerInfo, key: tuple[str, str]) -> _T | None:
        x = node.args[0] if node.args else node.kwargs.get("input")
        st = self.t(x)
        if st is None and self.is_tensor_attr(x):
            st = self.const_state(x)
        if _has_node(node.args[1:]) and node.op == "call_module" or \
                any(self.t(a) is not None for a in _flat_nodes((node.args[1:], node.kwargs))):
            return self.opaque(node, "layer with tensor arguments besides its input")
        self.layers[node.name] = info
        nd = len(info.kernel_size) if info.is_conv else 0
        in_dim = len(info.in_shape) - nd - 1
        out_dim = len(info.out_shape) - nd - 1
        weight = self._attr(info.weight_attr)
        wkey = ("weight", f"{id(weight)}")
        out = self.new(info.out_channels, "producer", node.name)
        ok = (st is not None and st.m == 1 and st.dim == in_dim
              and st.size == info.in_channels)
        if st is not None and not ok:
            self.mark(st, f"'{node.name}' reads channels on a dim other than the tracked one")
        if info.groups == 1:
            self.kinds[node.name] = "producer"
            if ok:
                self.consumers[node.name] = x.name
                self.shared.setdefault(wkey + ("in",), []).append(st.atoms)
        else:
            self.kinds[node.name] = "grouped"
            g = info.groups
            ib, ob = info.in_channels // g, info.out_channels // g
            if ok:
                self.grouped_in[node.name] = x.name
                for k in range(g):
                    atoms = np.concatenate([st.atoms[k * ib:(k + 1) * ib],
                                            out[k * ob:(k + 1) * ob]])
                    first = int(atoms[0])
                    for a in atoms[1:].tolist():
                        self.union(first, a)
            else:
                self.mark(out, f"grouped conv '{node.name}' whose input channels cannot be mapped")
        self.shared.setdefault(wkey + ("out",), []).append(out)
        return _T(out_dim, out, len(info.out_shape))

    # -- functions and methods -----------------------------------------------------------------
    def visit_function(self, node: torch.fx.Node) -> Any:
        tgt = node.target
        info = layer_info(self.gm, node)
        if info is not None:
            return self.layer(node, info, ("function", info.weight_attr))
        if tgt in BINARY_FUNCTIONS:
            return self.binary(node)
        if tgt in CAT_FUNCTIONS:
            return self.cat(node)
        if tgt in SPLIT_FUNCTIONS:
            return self.split(node)
        if tgt is operator.getitem:
            return self.getitem(node)
        if tgt in ELTWISE_FUNCTIONS:
            return self.eltwise_call(node)
        if _is_stochastic_depth(tgt):
            training = _arg(node, 3, "training", True)
            if training is not False:
                return self.opaque(node, "stochastic depth in training mode")
            return self.eltwise_call(node)
        if tgt in RESHAPE_FUNCTIONS:
            x = node.args[0] if node.args else node.kwargs.get("input")
            return self.reshape(node, x, self.t(x))
        if tgt in PERMUTE_FUNCTIONS:
            return self.permute(node)
        if tgt in REDUCE_FUNCTIONS:
            return self.reduce(node, REDUCE_FUNCTIONS[tgt])
        if tgt in POOL_FUNCTIONS:
            x = node.args[0] if node.args else node.kwargs.get("input")
            st = self.t(x)
            if st is None or _has_node((node.args[1:], node.kwargs)):
                return self.opaque(node, _tname(tgt))
            if node.kwargs.get("return_indices") or (tgt in (F.max_pool1d, F.max_pool2d,
                                                               F.max_pool3d)
                                                     and len(node.args) > 6 and node.args[6]):
                return self.opaque(node, "pool returning indices")
            return self.pool(node, st, POOL_FUNCTIONS[tgt])
        return self.opaque(node, f"unsupported function {_tname(tgt)}")

    def visit_method(self, node: torch.fx.Node) -> Any:
        name = str(node.target)
        x = node.args[0] if node.args else None
        if name in BINARY_METHODS:
            return self.binary(node)
        if name in SPLIT_METHODS:
            return self.split(node)
        if name in SAME_METHODS:
            st = self.t(x)
            if st is None or len(node.args) != 1:
                return self.opaque(node, f"method {name}")
            return self.passthrough(node, st, "same")
        if name in ELTWISE_METHODS:
            return self.eltwise_call(node)
        if name in RESHAPE_METHODS:
            return self.reshape(node, x, self.t(x))
        if name in PERMUTE_METHODS:
            return self.permute(node)
        if name in REDUCE_METHODS:
            return self.reduce(node, REDUCE_METHODS[name])
        return self.opaque(node, f"unsupported method {name}")

    def eltwise_call(self, node: torch.fx.Node) -> Any:
        x = node.args[0] if node.args else node.kwargs.get("input")
        st = self.t(x)
        if st is None or _has_node((node.args[1:], node.kwargs)):
            return self.opaque(node, f"{_tname(node.target)} with tensor arguments")
        return self.passthrough(node, st, "eltwise")

    def binary(self, node: torch.fx.Node) -> Any:
        a = _arg(node, 0, "input")
        b = _arg(node, 1, "other")
        if _has_node({k: v for k, v in node.kwargs.items() if k not in ("input", "other")}) or \
                _has_node(node.args[2:]):
            return self.opaque(node, "binary op with extra tensor arguments")
        out_shape = _shape(node)
        if out_shape is None:
            return self.opaque(node, "no shape information")
        ro = len(out_shape)
        tracked = [(i, v, self.t(v)) for i, v in enumerate((a, b)) if self.t(v) is not None]
        if not tracked:
            if any(isinstance(v, torch.fx.Node) and v.op != "get_attr" for v in (a, b)):
                return self.opaque(node, "binary op on untracked tensors")
            self.kinds[node.name] = "const"
            return self.opaque_state(node, f"'{node.name}' (constant expression)")
        if any(st.m != 1 for _, _, st in tracked):
            return self.opaque(node, "binary op on a channel dim split by a view")
        # aligned output position of each tracked operand's channel dim
        pos = {i: st.dim + (ro - st.rank) for i, _, st in tracked}
        if len(set(pos.values())) != 1:
            return self.opaque(node, "operands' channel dims do not line up")
        p = next(iter(pos.values()))
        full = [(i, v, st) for i, v, st in tracked if st.size == out_shape[p]]
        bcast = [(i, v, st) for i, v, st in tracked if st.size != out_shape[p]]
        if not full or any(st.size != 1 for _, _, st in bcast):
            return self.opaque(node, "operands' channel counts do not broadcast")
        ref = full[0][2].atoms
        for _, _, st in full[1:]:
            self.union_arrays(ref, st.atoms)
        # the other operand: scalar, get_attr parameter or an untracked tensor
        for i, v in enumerate((a, b)):
            if self.t(v) is not None or not isinstance(v, torch.fx.Node):
                continue
            if v.op == "get_attr":
                val = self._attr(str(v.target))
                if not isinstance(val, torch.Tensor):
                    return self.opaque(node, f"operand '{v.name}' is not a tensor")
                q = p - (ro - val.dim())
                if q < 0 or val.shape[q] == 1:
                    continue
                if val.shape[q] != out_shape[p]:
                    return self.opaque(node, f"operand '{v.name}' does not broadcast")
                self.params.append((node.name, str(v.target), q))
                self.shared.setdefault(("param", str(v.target)), []).append(ref)
                continue
            vshape = _shape(v)
            if vshape is None:
                st = self.state.get(v.name)
                if isinstance(st, _Int):
                    continue
                return self.opaque(node, f"operand '{v.name}' has no shape information")
            q = p - (ro - len(vshape))
            if q >= 0 and vshape[q] != 1:
                return self.opaque(node, f"operand '{v.name}' is not tracked")
        self.kinds[node.name] = "binary"
        return _T(p, ref, ro)

    def cat(self, node: torch.fx.Node) -> Any:
        xs = _arg(node, 0, "tensors")
        if not isinstance(xs, (list, tuple)) or not xs:
            return self.opaque(node, "cat of a non-list")
        out_shape = _shape(node)
        if out_shape is None:
            return self.opaque(node, "no shape information")
        d = _norm_dim(_arg(node, 1, "dim", 0), len(out_shape))
        if d is None:
            return self.opaque(node, "cat with a non-constant dim")
        sts = []
        for x in xs:
            st = self.t(x)
            if st is None and self.is_tensor_attr(x):
                st = self.const_state(x)
            if st is None:
                return self.opaque(node, f"cat of an untracked value '{x}'")
            sts.append(st)
        if any(st.m != 1 or st.rank != len(out_shape) for st in sts):
            return self.opaque(node, "cat of a channel dim split by a view")
        dims = {st.dim for st in sts}
        if dims == {d}:
            self.kinds[node.name] = "cat"
            atoms = np.concatenate([st.atoms for st in sts])
            return _T(d, atoms, len(out_shape), tuple(x.name for x in xs),
                      np.arange(atoms.size, dtype=np.int64))
        if len(dims) == 1 and len({st.size for st in sts}) == 1:
            self.kinds[node.name] = "cat-other"
            for st in sts[1:]:
                self.union_arrays(sts[0].atoms, st.atoms)
            return _T(sts[0].dim, sts[0].atoms, len(out_shape))
        return self.opaque(node, "cat of operands with different channel dims")

    def split(self, node: torch.fx.Node) -> Any:
        x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("tensor"))
        st = self.t(x)
        shapes = _tuple_shapes(node)
        in_shape = _shape(x)
        if st is None or shapes is None or in_shape is None or any(s is None for s in shapes):
            return self.opaque(node, "split of an untracked tensor")
        if _has_node((node.args[1:], node.kwargs)):
            return self.opaque(node, "split with tensor arguments")
        d = _norm_dim(_arg(node, 2, "dim", 0), len(in_shape))
        if d is None:
            return self.opaque(node, "split with a non-constant dim")
        if st.m != 1:
            return self.opaque(node, "split of a channel dim split by a view")
        if d == st.dim:
            self.kinds[node.name] = "split"
            items: list[_T | None] = []
            offsets = []
            off = 0
            for s in shapes:
                n = s[d]
                items.append(_T(d, st.atoms[off:off + n], st.rank, (x.name,),
                                np.arange(off, off + n, dtype=np.int64)))
                offsets.append(off)
                off += n
            return _Tup(items, x.name, offsets)
        self.kinds[node.name] = "split-other"
        return _Tup([_T(st.dim, st.atoms, st.rank, (x.name,), np.arange(st.size, dtype=np.int64))
                     for _ in shapes], x.name, None)

    def getitem(self, node: torch.fx.Node) -> Any:
        src, idx = node.args[0], node.args[1]
        sst = self.state.get(src.name) if isinstance(src, torch.fx.Node) else None
        if isinstance(sst, _Tup) and isinstance(idx, int):
            self.kinds[node.name] = "getitem"
            it = sst.items[idx]
            if it is None:
                return None
            return _T(it.dim, it.atoms, it.rank, it.sources, it.gather)
        return self.opaque(node, "indexing/slicing a tensor")

    def reshape(self, node: torch.fx.Node, x: Any, st: _T | None) -> Any:
        in_shape, out_shape = _shape(x), _shape(node)
        if st is None or in_shape is None or out_shape is None:
            return self.opaque(node, "reshape of an untracked tensor or without shapes")
        mp = reshape_mapping(in_shape, st.dim, tuple(st.atoms.shape), out_shape)
        if mp is None:
            return self.opaque(node, f"reshape {list(in_shape)} -> {list(out_shape)} mixes the "
                               "channel dim with others")
        d2, block, gather = mp
        atoms = st.atoms.reshape(-1)[gather].reshape(block)
        if len(block) > 1:
            # a view splitting the channel dim: keep pruning rectangular (whole slices along the
            # last axis), so the view's size arguments stay valid after pruning
            flat = atoms.reshape(-1, block[-1])
            for col in range(block[-1]):
                first = int(flat[0, col])
                for a in flat[1:, col].tolist():
                    self.union(first, a)
        self.kinds[node.name] = "reshape"
        return _T(d2, atoms, len(out_shape), (x.name,), gather)

    def permute(self, node: torch.fx.Node) -> Any:
        x = node.args[0] if node.args else node.kwargs.get("input")
        st = self.t(x)
        out_shape = _shape(node)
        if st is None or out_shape is None:
            return self.opaque(node, "permute of an untracked tensor")
        r = st.rank
        name = _tname(node.target)
        if name in ("transpose", "swapaxes", "swapdims"):
            a0 = _norm_dim(_arg(node, 1, "dim0"), r)
            a1 = _norm_dim(_arg(node, 2, "dim1"), r)
            if a0 is None or a1 is None:
                return self.opaque(node, "transpose with non-constant dims")
            perm = list(range(r))
            perm[a0], perm[a1] = perm[a1], perm[a0]
        else:
            dims = node.args[1:] if node.op == "call_method" else (_arg(node, 1, "dims"),)
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = tuple(dims[0])
            perm = [_norm_dim(d, r) for d in dims]
            if None in perm or sorted(perm) != list(range(r)):
                return self.opaque(node, "permute with non-constant dims")
        block_dims = list(range(st.dim, st.dim + st.m))
        newpos = [perm.index(d) for d in block_dims]
        lo = min(newpos)
        if sorted(newpos) != list(range(lo, lo + st.m)):
            return self.opaque(node, "permute splits the channel dims apart")
        order = [block_dims.index(perm[p]) for p in range(lo, lo + st.m)]
        atoms = st.atoms.transpose(order)
        gather = np.arange(st.size, dtype=np.int64).reshape(st.atoms.shape).transpose(order)
        self.kinds[node.name] = "permute"
        return _T(lo, np.ascontiguousarray(atoms), r, (x.name,), gather.reshape(-1))

    def reduce(self, node: torch.fx.Node, how: str) -> Any:
        x = node.args[0] if node.args else node.kwargs.get("input")
        st = self.t(x)
        if st is None or st.m != 1:
            return self.opaque(node, f"{how} of an untracked tensor")
        dims = _arg(node, 1, "dim")
        keep = _arg(node, 2, "keepdim", False)
        if dims is None or _has_node((dims, keep)) or not isinstance(keep, bool):
            return self.opaque(node, f"{how} over all dims")
        dims = [dims] if isinstance(dims, int) else list(dims)
        nd = [_norm_dim(d, st.rank) for d in dims]
        if None in nd or st.dim in nd:
            return self.opaque(node, f"{how} over the channel dim")
        if set(node.kwargs) - {"dim", "keepdim", "input"} or len(node.args) > 3:
            return self.opaque(node, f"{how} with extra arguments")
        self.kinds[node.name] = "reduce"
        new_dim = st.dim if keep else st.dim - sum(d < st.dim for d in nd)
        return _T(new_dim, st.atoms, st.rank if keep else st.rank - len(set(nd)))

    def pool(self, node: torch.fx.Node, st: _T, nd: int) -> Any:
        out_shape = _shape(node)
        if st.m != 1 or st.dim != st.rank - nd - 1 or out_shape is None \
                or len(out_shape) != st.rank:
            return self.opaque(node, "pooling over the channel dim")
        self.kinds[node.name] = "pool"
        return _T(st.dim, st.atoms, st.rank)

    # -- result --------------------------------------------------------------------------------
    def result(self) -> ChannelGroups:
        find = self.find
        root_of = np.fromiter((find(a) for a in range(len(self.parent))), dtype=np.int64,
                              count=len(self.parent))
        _, cls_of = np.unique(root_of, return_inverse=True)   # classes numbered by first atom
        cls_list = cls_of.tolist()
        ncls = int(cls_of.max()) + 1 if cls_of.size else 0
        reasons: dict[int, str] = {}
        # a class is reported with the first reason met in graph order
        for a, (_, why) in sorted(self.bad.items(), key=lambda kv: kv[1][0]):
            reasons.setdefault(cls_list[a], why)
        producers: list[list[tuple[str, int]]] = [[] for _ in range(ncls)]
        for a, (kind, node, idx) in enumerate(self.owner):
            if kind == "producer":
                producers[cls_list[a]].append((node, idx))
        tensors: list[TensorChannels] = []
        for name, st in self.state.items():
            items = [(-1, st)] if isinstance(st, _T) else \
                list(enumerate(st.items)) if isinstance(st, _Tup) else []
            for item, t in items:
                if t is None:
                    continue
                classes = tuple(cls_of[t.atoms.reshape(-1)].tolist())
                gather = tuple(t.gather.tolist()) if t.gather is not None else None
                tensors.append(TensorChannels(name, item, t.dim, tuple(t.atoms.shape), classes,
                                              t.sources, gather))
        groups = self.build_groups(tensors, producers, reasons)
        return ChannelGroups(groups=groups, tensors=tuple(tensors),
                             kinds=tuple(self.kinds.items()),
                             class_producers=tuple(tuple(p) for p in producers),
                             class_reasons=tuple(sorted(reasons.items())),
                             params=tuple(self.params),
                             consumers=tuple(self.consumers.items()))

    def build_groups(self, tensors: list[TensorChannels], producers: list[list[tuple[str, int]]],
                     reasons: dict[int, str]) -> tuple[ChannelGroup, ...]:
        # groups: classes linked through shared producer layers (networkx components)
        g = nx.Graph()
        for c, prods in enumerate(producers):
            for node, _ in prods:
                g.add_edge(("class", c), ("layer", node))
        order = {n.name: i for i, n in enumerate(self.gm.graph.nodes)}
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
        for node, attr, dim in self.params:
            params_by_node.setdefault(node, []).append((attr, dim))
        for n in self.gm.graph.nodes:
            kind = self.kinds.get(n.name)
            own = by_node.get(n.name, [])
            for t in own:
                if kind in ("producer", "grouped"):
                    add(t, n.name, "producer", self.layers[n.name].weight_attr, 0)
                else:
                    add(t, n.name, "tensor", str(n.target) if n.op != "call_function"
                        else _tname(n.target), t.dim)
            if n.name in self.consumers or n.name in self.grouped_in or n.name in self.chparam_in:
                src = self.consumers.get(n.name) or self.grouped_in.get(n.name) \
                    or self.chparam_in[n.name]
                for t in by_node.get(src, []):
                    if t.item != -1:
                        continue
                    if n.name in self.consumers:
                        add(t, n.name, "consumer", self.layers[n.name].weight_attr, 1)
                    elif n.name in self.grouped_in:
                        add(t, n.name, "grouped-in",
                            f"{self.layers[n.name].weight_attr} (whole groups)", 1)
                    elif kind == "norm":
                        add(t, n.name, "norm", str(n.target), 0)
            if n.name in params_by_node and own:
                for attr, dim in params_by_node[n.name]:
                    add(own[0], n.name, "param", attr, dim)
        return tuple(ChannelGroup(gi, tuple(classes), tuple(layers), tuple(members[gi]),
                                  tuple(reasons.get(c) for c in classes))
                     for gi, (_, classes, layers) in enumerate(comps))


def compute_channel_groups(gm: torch.fx.GraphModule) -> ChannelGroups:
    """The channel-groups result for ``gm`` (what the analysis caches)."""
    with no_gc():
        w = _Walker(gm)
        w.run()
        return w.result()


@contextlib.contextmanager
def no_gc() -> Any:
    """Pause the cyclic garbage collector: the walk allocates many small containers and each
    collection traverses the whole (large) heap of a loaded model; nothing here makes cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@register_analysis
class ChannelGroupsAnalysis(Analysis):
    """Coupled output channels: for every conv/linear output channel, the tensors and parameter
    slices that must be pruned with it (DepGraph-style groups on the FX graph), and why a channel
    can never be pruned (the node that blocks it)."""
    name = "channel-groups"
    summary = "coupled channel groups for pruning (producers, consumers, BN, concat, split, ...)"
    depends_on = frozenset({"structure"})

    def compute(self, gm: torch.fx.GraphModule, am: Any) -> ChannelGroups:
        return compute_channel_groups(gm)

    def format(self, result: ChannelGroups, gm: torch.fx.GraphModule) -> str:
        return str(result)
