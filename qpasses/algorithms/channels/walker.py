"""The channel walk behind ``channel-groups`` and ``prune-zero-bit-channels``."""
from __future__ import annotations

import contextlib
import gc
import operator
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from qpasses.algorithms.channels import index_maps
from qpasses.algorithms.channels.atoms import ChannelAtoms
from qpasses.algorithms.channels.groups import ChannelGroups, TensorChannels, build_groups
from qpasses.ir import ops
from qpasses.modules.lookup import is_activation_quantizer
from qpasses.algorithms.channels.state import (IntState, TensorState, TupleState, flat_nodes,
                                               has_node, module_forward_is, target_name,
                                               tuple_shapes)
from qpasses.ir.fx import node_arg, node_shape
from qpasses.ir.layers import LayerInfo, layer_info

__all__ = ["ChannelWalker", "no_gc"]


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


class ChannelWalker:
    """One pass over an FX graph in topological order that maps every tensor's channel dim to
    channel atoms and couples (unions) the atoms that must be removed together.

    ``run()`` visits every node (the coupling rules are in the package docstring), then couples
    the calls of shared weights; ``result()`` turns what it recorded into ``ChannelGroups``.
    Recorded per node: ``state`` (a TensorState, TupleState, IntState or None), ``kinds`` (how
    the node maps channels), the layers met, their input nodes (``consumers`` for groups = 1,
    ``grouped_in`` for grouped convs, ``chparam_in`` for BatchNorm and per-channel parameter
    modules) and the per-channel parameters ``(node, attribute, dim)`` sliced with a node's
    channels.
    """

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.atoms = ChannelAtoms()
        self.state: dict[str, Any] = {}
        self.kinds: dict[str, str] = {}
        self.params: list[tuple[str, str, int]] = []
        self.shared: dict[Any, list[np.ndarray]] = {}
        self.layers: dict[str, LayerInfo] = {}
        self.consumers: dict[str, str] = {}              # layer node -> input node (groups == 1)
        self.grouped_in: dict[str, str] = {}             # grouped layer node -> input node
        self.chparam_in: dict[str, str] = {}             # norm/chparam node -> input node

    # -- helpers -------------------------------------------------------------------------------
    def t(self, a: Any) -> TensorState | None:
        """The TensorState of ``a`` (None: not a node, or no tracked tensor)."""
        if isinstance(a, torch.fx.Node):
            st = self.state.get(a.name)
            if isinstance(st, TensorState):
                return st
        return None

    def opaque_state(self, node: torch.fx.Node, reason: str) -> Any:
        """Fresh unprunable atoms for the output of a node whose channel mapping is unknown
        (dim 1, or dim 0 for rank-1 tensors)."""
        shape = node_shape(node)
        if shape is not None:
            if len(shape) == 0:
                return None
            dim = 1 if len(shape) >= 2 else 0
            atoms = self.atoms.new(shape[dim], "opaque", node.name)
            self.atoms.mark(atoms, reason)
            return TensorState(dim, atoms, len(shape))
        shapes = tuple_shapes(node)
        if shapes is not None:
            items: list[TensorState | None] = []
            for s in shapes:
                if s is None or len(s) == 0:
                    items.append(None)
                    continue
                dim = 1 if len(s) >= 2 else 0
                atoms = self.atoms.new(s[dim], "opaque", node.name)
                self.atoms.mark(atoms, reason)
                items.append(TensorState(dim, atoms, len(s)))
            return TupleState(items)
        return None

    def opaque(self, node: torch.fx.Node, why: str) -> Any:
        """Make ``node`` opaque: its inputs' channels and its output's are unprunable."""
        reason = f"'{node.name}' ({why})"
        self.kinds[node.name] = "opaque"
        for a in flat_nodes((node.args, node.kwargs)):
            st = self.state.get(a.name)
            self.mark_state(st, reason)
        return self.opaque_state(node, reason)

    def mark_state(self, st: Any, reason: str) -> None:
        """Mark every atom of a state unprunable (an IntState: the tensors its sizes came from)."""
        if isinstance(st, TensorState):
            self.atoms.mark(st, reason)
        elif isinstance(st, TupleState):
            for it in st.items:
                if it is not None:
                    self.atoms.mark(it, reason)
        elif isinstance(st, IntState):
            for src in st.sources:
                self.mark_state(self.state.get(src), reason)

    def const_state(self, node: torch.fx.Node) -> TensorState | None:
        """Channel state for a get_attr tensor used where a tracked tensor is needed."""
        shape = node_shape(node)
        if shape is None:
            val = self._attr(str(node.target))
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
        if not shape:
            return None
        dim = 1 if len(shape) >= 2 else 0
        atoms = self.atoms.new(shape[dim], "opaque", node.name)
        self.atoms.mark(atoms, f"'{node.name}' (constant tensor '{node.target}')")
        return TensorState(dim, atoms, len(shape))

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
            if isinstance(st, IntState):
                srcs.update(st.sources)
            else:
                ok = False
            return x
        torch.fx.node.map_arg(a, visit)
        return frozenset(srcs) if ok else None

    # -- the walk ------------------------------------------------------------------------------
    def run(self) -> None:
        """Visit every node in graph order, then couple the calls of shared weights."""
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
                    self.atoms.union_arrays(first, other)
                else:
                    why = f"shared parameter {key[1]} is used with different channel counts"
                    self.atoms.mark(first, why)
                    self.atoms.mark(other, why)

    def visit(self, node: torch.fx.Node) -> Any:
        """The channel state of ``node``'s output (recording its kind and couplings)."""
        op = node.op
        if op == "placeholder":
            self.kinds[node.name] = "input"
            shape = node_shape(node)
            if shape is None or len(shape) == 0:
                return None
            dim = 1 if len(shape) >= 2 else 0
            atoms = self.atoms.new(shape[dim], "input", node.name)
            self.atoms.mark(atoms, f"graph input '{node.name}'")
            return TensorState(dim, atoms, len(shape))
        if op == "get_attr":
            self.kinds[node.name] = "const"
            return None
        if op == "output":
            self.kinds[node.name] = "output"
            for a in flat_nodes(node.args):
                self.mark_state(self.state.get(a.name), f"reaches the graph output ('{a.name}')")
            return None
        # int arithmetic on sizes
        if op in ("call_function", "call_method"):
            st = self.visit_int(node)
            if st is not None:
                return st
        # any other use of a size-derived int: the sizes it came from are frozen
        for a in flat_nodes((node.args, node.kwargs)):
            ist = self.state.get(a.name)
            if isinstance(ist, IntState) and not self.allowed_int_use(node, a):
                self.mark_state(ist, f"'{node.name}' ({target_name(node.target)}) uses the size "
                                "of a tensor")
        if op == "call_module":
            return self.visit_module(node)
        if op == "call_function":
            return self.visit_function(node)
        if op == "call_method":
            return self.visit_method(node)
        return self.opaque(node, f"unsupported node op {op}")

    def allowed_int_use(self, node: torch.fx.Node, a: torch.fx.Node) -> bool:
        """A size-derived int may be a size argument of a view/reshape (the pruner rewrites or
        checks those)."""
        is_reshape = (node.op == "call_method" and node.target in ("view", "reshape")) or \
            (node.op == "call_function" and node.target is torch.reshape)
        return is_reshape and node.args and node.args[0] is not a

    def visit_int(self, node: torch.fx.Node) -> IntState | None:
        """``size()``/``.shape``/``dim()`` and int arithmetic on them (None: not an int node)."""
        tgt = node.target
        if node.op == "call_method" and tgt in ("size", "dim", "numel") or \
                (node.op == "call_function" and tgt is getattr and len(node.args) == 2
                 and node.args[1] in ("shape", "ndim")):
            x = node.args[0]
            self.kinds[node.name] = "int"
            if tgt == "dim" or (tgt is getattr and node.args[1] == "ndim"):
                return IntState(frozenset())
            if isinstance(x, torch.fx.Node) and \
                    isinstance(self.state.get(x.name), (TensorState, TupleState)):
                return IntState(frozenset({x.name}))
            return IntState(frozenset())
        if node.op == "call_function" and tgt in ops.INT_FUNCTIONS:
            srcs = self.int_sources((node.args, node.kwargs))
            nodes = flat_nodes((node.args, node.kwargs))
            if srcs is not None and nodes:
                self.kinds[node.name] = "int"
                return IntState(srcs)
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
        if isinstance(mod, ops.BATCH_NORM_BASE):
            if type(mod).forward is not ops.BATCH_NORM_FORWARD and not isinstance(mod, nn.SyncBatchNorm):
                return self.opaque(node, f"{type(mod).__name__} overrides forward")
            if mod.training or mod.running_mean is None:
                return self.opaque(node, "BatchNorm using batch statistics")
            if st.m != 1 or st.dim != 1 or st.size != mod.num_features:
                return self.opaque(node, "BatchNorm over a dim that is not the channel dim")
            self.kinds[node.name] = "norm"
            self.chparam_in[node.name] = x.name
            self.shared.setdefault(("norm", str(node.target)), []).append(st.atoms)
            return TensorState(st.dim, st.atoms, st.rank)
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
            return TensorState(st.dim, st.atoms, st.rank)
        if module_forward_is(mod, ops.VALUEWISE_MODULES):
            return self.passthrough(node, st, "eltwise")
        for cls, nd in ops.POOL_MODULES.items():
            if isinstance(mod, cls):
                if type(mod).forward is not cls.forward or getattr(mod, "return_indices", False):
                    return self.opaque(node, f"{type(mod).__name__} returning indices/overridden")
                return index_maps.pool(self, node, st, nd)
        if isinstance(mod, nn.Flatten) and type(mod).forward is nn.Flatten.forward:
            return index_maps.reshape(self, node, x, st)
        if isinstance(mod, nn.Unflatten) and type(mod).forward is nn.Unflatten.forward:
            return index_maps.reshape(self, node, x, st)
        if is_activation_quantizer(mod):
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
                return TensorState(st.dim, st.atoms, st.rank)
            return self.passthrough(node, st, "eltwise")
        return self.opaque(node, f"{type(mod).__name__} module")

    def passthrough(self, node: torch.fx.Node, st: TensorState, kind: str) -> TensorState:
        """An elementwise node: the output holds the input's channels (``same``: as a view)."""
        self.kinds[node.name] = kind
        if kind != "same" and st.m != 1:
            self.opaque(node, "elementwise op on a channel dim split by a view")
            return self.opaque_state(node, f"'{node.name}' (channel dim split by a view)")
        shape = node_shape(node)
        if shape is not None and len(shape) != st.rank:
            return self.opaque(node, "changes the rank")
        if kind == "same":
            return TensorState(st.dim, st.atoms, st.rank, (node.args[0].name,),
                               np.arange(st.size, dtype=np.int64))
        return TensorState(st.dim, st.atoms, st.rank)

    # -- layers --------------------------------------------------------------------------------
    def layer(self, node: torch.fx.Node, info: LayerInfo,
              key: tuple[str, str]) -> TensorState | None:
        """A conv/linear: fresh producer atoms for its outputs; its input is a consumer
        (groups = 1) or coupled block by block with the outputs (grouped convs)."""
        x = node.args[0] if node.args else node.kwargs.get("input")
        st = self.t(x)
        if st is None and self.is_tensor_attr(x):
            st = self.const_state(x)
        if has_node(node.args[1:]) and node.op == "call_module" or \
                any(self.t(a) is not None for a in flat_nodes((node.args[1:], node.kwargs))):
            return self.opaque(node, "layer with tensor arguments besides its input")
        self.layers[node.name] = info
        nd = len(info.kernel_size) if info.is_conv else 0
        in_dim = len(info.in_shape) - nd - 1
        out_dim = len(info.out_shape) - nd - 1
        weight = self._attr(info.weight_attr)
        wkey = ("weight", f"{id(weight)}")
        out = self.atoms.new(info.out_channels, "producer", node.name)
        ok = (st is not None and st.m == 1 and st.dim == in_dim
              and st.size == info.in_channels)
        if st is not None and not ok:
            self.atoms.mark(st, f"'{node.name}' reads channels on a dim other than the tracked one")
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
                        self.atoms.union(first, a)
            else:
                self.atoms.mark(out, f"grouped conv '{node.name}' whose input channels cannot be "
                                "mapped")
        self.shared.setdefault(wkey + ("out",), []).append(out)
        return TensorState(out_dim, out, len(info.out_shape))

    # -- functions and methods -----------------------------------------------------------------
    def visit_function(self, node: torch.fx.Node) -> Any:
        tgt = node.target
        info = layer_info(self.gm, node)
        if info is not None:
            return self.layer(node, info, ("function", info.weight_attr))
        if tgt in ops.BINARY_FUNCTIONS:
            return self.binary(node)
        if tgt in ops.CAT_FUNCTIONS:
            return index_maps.cat(self, node)
        if tgt in ops.RANGE_SPLIT_FUNCTIONS:
            return index_maps.split(self, node)
        if tgt is operator.getitem:
            return index_maps.getitem(self, node)
        if tgt in ops.VALUEWISE_FUNCTIONS:
            return self.eltwise_call(node)
        if ops.is_stochastic_depth(tgt):
            training = node_arg(node, 3, "training", True)
            if training is not False:
                return self.opaque(node, "stochastic depth in training mode")
            return self.eltwise_call(node)
        if tgt in ops.RESHAPE_FUNCTIONS:
            x = node.args[0] if node.args else node.kwargs.get("input")
            return index_maps.reshape(self, node, x, self.t(x))
        if tgt in ops.PERMUTE_FUNCTIONS:
            return index_maps.permute(self, node)
        if tgt in ops.REDUCE_FUNCTIONS:
            return index_maps.reduce(self, node, ops.REDUCE_FUNCTIONS[tgt])
        if tgt in ops.POOL_FUNCTIONS:
            x = node.args[0] if node.args else node.kwargs.get("input")
            st = self.t(x)
            if st is None or has_node((node.args[1:], node.kwargs)):
                return self.opaque(node, target_name(tgt))
            if node.kwargs.get("return_indices") or (tgt in ops.MAX_POOL_FUNCTIONS
                                                     and len(node.args) > 6 and node.args[6]):
                return self.opaque(node, "pool returning indices")
            return index_maps.pool(self, node, st, ops.POOL_FUNCTIONS[tgt])
        return self.opaque(node, f"unsupported function {target_name(tgt)}")

    def visit_method(self, node: torch.fx.Node) -> Any:
        name = str(node.target)
        x = node.args[0] if node.args else None
        if name in ops.BINARY_METHODS:
            return self.binary(node)
        if name in ops.RANGE_SPLIT_METHODS:
            return index_maps.split(self, node)
        if name in ops.COPY_METHODS:
            st = self.t(x)
            if st is None or len(node.args) != 1:
                return self.opaque(node, f"method {name}")
            return self.passthrough(node, st, "same")
        if name in ops.VALUEWISE_METHODS:
            return self.eltwise_call(node)
        if name in ops.RESHAPE_METHODS:
            return index_maps.reshape(self, node, x, self.t(x))
        if name in ops.PERMUTE_METHODS:
            return index_maps.permute(self, node)
        if name in ops.REDUCE_METHODS:
            return index_maps.reduce(self, node, ops.REDUCE_METHODS[name])
        return self.opaque(node, f"unsupported method {name}")

    def eltwise_call(self, node: torch.fx.Node) -> Any:
        """An elementwise function or method whose other arguments are not tensors."""
        x = node.args[0] if node.args else node.kwargs.get("input")
        st = self.t(x)
        if st is None or has_node((node.args[1:], node.kwargs)):
            return self.opaque(node, f"{target_name(node.target)} with tensor arguments")
        return self.passthrough(node, st, "eltwise")

    def binary(self, node: torch.fx.Node) -> Any:
        """add/sub/mul/div: operands with the full channel count are coupled position by position;
        size-1 broadcasts and scalars couple nothing; a per-channel ``get_attr`` is a member."""
        a = node_arg(node, 0, "input")
        b = node_arg(node, 1, "other")
        if has_node({k: v for k, v in node.kwargs.items() if k not in ("input", "other")}) or \
                has_node(node.args[2:]):
            return self.opaque(node, "binary op with extra tensor arguments")
        out_shape = node_shape(node)
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
            self.atoms.union_arrays(ref, st.atoms)
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
            vshape = node_shape(v)
            if vshape is None:
                st = self.state.get(v.name)
                if isinstance(st, IntState):
                    continue
                return self.opaque(node, f"operand '{v.name}' has no shape information")
            q = p - (ro - len(vshape))
            if q >= 0 and vshape[q] != 1:
                return self.opaque(node, f"operand '{v.name}' is not tracked")
        self.kinds[node.name] = "binary"
        return TensorState(p, ref, ro)

    # -- result --------------------------------------------------------------------------------
    def result(self) -> ChannelGroups:
        """The channel classes (atoms merged by the union-find) and groups of this walk."""
        find = self.atoms.find
        n_atoms = len(self.atoms)
        root_of = np.fromiter((find(a) for a in range(n_atoms)), dtype=np.int64, count=n_atoms)
        _, cls_of = np.unique(root_of, return_inverse=True)   # classes numbered by first atom
        cls_list = cls_of.tolist()
        ncls = int(cls_of.max()) + 1 if cls_of.size else 0
        reasons: dict[int, str] = {}
        # a class is reported with the first reason met in graph order
        for a, (_, why) in sorted(self.atoms.bad.items(), key=lambda kv: kv[1][0]):
            reasons.setdefault(cls_list[a], why)
        producers: list[list[tuple[str, int]]] = [[] for _ in range(ncls)]
        for a, (kind, node, idx) in enumerate(self.atoms.owner):
            if kind == "producer":
                producers[cls_list[a]].append((node, idx))
        tensors: list[TensorChannels] = []
        for name, st in self.state.items():
            items = [(-1, st)] if isinstance(st, TensorState) else \
                list(enumerate(st.items)) if isinstance(st, TupleState) else []
            for item, t in items:
                if t is None:
                    continue
                classes = tuple(cls_of[t.atoms.reshape(-1)].tolist())
                gather = tuple(t.gather.tolist()) if t.gather is not None else None
                tensors.append(TensorChannels(name, item, t.dim, tuple(t.atoms.shape), classes,
                                              t.sources, gather))
        groups = build_groups(self.gm.graph, tensors, producers, reasons, kinds=self.kinds,
                              layer_infos=self.layers, consumers=self.consumers,
                              grouped_in=self.grouped_in, chparam_in=self.chparam_in,
                              params=self.params)
        return ChannelGroups(groups=groups, tensors=tuple(tensors),
                             kinds=tuple(self.kinds.items()),
                             class_producers=tuple(tuple(p) for p in producers),
                             class_reasons=tuple(sorted(reasons.items())),
                             params=tuple(self.params),
                             consumers=tuple(self.consumers.items()))
