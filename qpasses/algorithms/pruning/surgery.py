"""Carrying out a PrunePlan: shrinking weights, biases (with folded constants), BatchNorm,
per-channel parameters, split sizes, view sizes, quantizer state, QMeta and ``tensor_meta``."""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import Tensor, nn

from qpasses.algorithms.pruning.index import ChannelIndex, PrunePlan
from qpasses.algorithms.pruning.tensors import (is_observing, numpy_view, set_tensor, take,
                                                tensor_meta_of, tensor_meta_shape, with_shape,
                                                zero_bit_kernels)
from qpasses.ir.fx import attr_value, resolve_attr
from qpasses.ir.annotations import QuantSpec, get_qmeta, update_qmeta
from qpasses.ir.layers import PRUNED_BIAS_BASE, PRUNED_BIAS_FOLD, LayerInfo, bias_parts

__all__ = ["ChannelSurgery"]


class ChannelSurgery:
    """Applies a PrunePlan to the graph module in place (``apply``).

    Constant folds are computed from the weights as the layers compute with them (through their
    weight quantizers, with 0-bit kernels zero) before anything is sliced. A weight quantizer
    that keeps observing would re-derive its ranges from the pruned weights; when that changes
    the kept kernels' quantized values it is frozen at its old ranges (``frozen`` lists those
    layers; ``inexact_quantizers`` the ones that could not be frozen). QMeta changes are
    recorded with ``origin``.
    """

    def __init__(self, index: ChannelIndex, origin: str):
        self.index, self.origin = index, origin
        # shortcuts into the index
        self.gm, self.cg, self.nodes = index.gm, index.cg, index.nodes
        self.kinds, self.tensors, self.consumers = index.kinds, index.tensors, index.consumers
        self.infos, self.cls_arr = index.infos, index.cls_arr
        self.frozen: list[str] = []
        self.inexact_quantizers: list[str] = []

    def effective_weight(self, layer: str, pos: np.ndarray) -> np.ndarray:
        """Input slices ``pos`` (dim 1) of the weight as the layer computes with it: through its
        weight fake-quantizer, with 0-bit kernels exactly zero; float64."""
        info = self.infos[layer]
        node = self.nodes[layer]
        w = attr_value(self.gm, info.weight_attr).detach()
        q = None
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            q = next((c for c in mod.children() if getattr(c, "is_weight_quantizer", False)), None)
        else:
            wn = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(wn, torch.fx.Node) and wn.op == "call_module":
                q = self.gm.get_submodule(str(wn.target))
        if q is not None:
            with torch.no_grad():
                w = copy.deepcopy(q)(w).detach()
        a = numpy_view(w)
        a = np.take(a, pos, axis=1) if a is not None else \
            take(w, 1, pos).cpu().numpy()
        a = a.astype(np.float64)
        zero = zero_bit_kernels(self.gm, node, info)
        if zero.any():
            a[zero] = 0
        return a

    def apply(self, plan: PrunePlan) -> None:
        """Carry out ``plan`` on the graph module, in place."""
        gm = self.gm
        rem = self.index.removed_mask(plan.removed)
        # constant folds, from the original weights
        deltas: dict[str, np.ndarray] = {}
        for layer, items in plan.folds.items():
            pos = np.asarray([p for p, _, _ in items], dtype=np.int64)
            val = np.asarray([v for _, v, _ in items], dtype=np.float64)
            ws = self.effective_weight(layer, pos)
            if ws.ndim > 2:
                ws = ws.reshape(ws.shape[0], ws.shape[1], -1).sum(-1)
            deltas[layer] = ws @ val
        done: set[int] = set()
        for name, info in self.infos.items():
            node = self.nodes[name]
            out_keep = self.index.keep_of((name, -1), rem)
            src = self.consumers.get(name)
            in_keep = self.index.keep_of((src, -1), rem) if src is not None else None
            if self.kinds[name] == "grouped":
                x = node.args[0] if node.args else node.kwargs.get("input")
                in_keep = self.index.keep_of((x.name, -1), rem)
            delta = deltas.get(name)
            w = attr_value(gm, info.weight_attr)
            if out_keep is not None:
                self.update_qmeta(node, info, out_keep)
            if id(w) in done or (out_keep is None and in_keep is None and delta is None):
                continue
            done.add(id(w))
            q = self.index.weight_quantizer(name)
            track = (q is not None and is_observing(q) and getattr(q, "fake_quant_on", True)
                     and (out_keep is not None or in_keep is not None))
            if track:
                with torch.no_grad():
                    q_old = q(w.detach()).detach()   # what the next forward would compute
            self.shrink_layer(node, info, out_keep, in_keep, delta)
            if track:
                self.keep_quantized_weights(name, info, q, q_old, out_keep,
                                            None if self.kinds[name] == "grouped" else in_keep)
        for node_name, kind in self.cg.kinds:
            node = self.nodes[node_name]
            if kind == "norm":
                keep = self.index.keep_of((node_name, -1), rem)
                mod = gm.get_submodule(str(node.target))
                if keep is None or id(mod) in done:
                    continue
                done.add(id(mod))
                old = mod.num_features
                for attr in ("running_mean", "running_var", "weight", "bias"):
                    t = getattr(mod, attr, None)
                    if isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == old:
                        set_tensor(mod, attr, take(t, 0, keep))
                mod.num_features = len(keep)
            elif kind == "split":
                x = node.args[0] if node.args else node.kwargs.get("input")
                keep = self.index.keep_of((x.name, -1), rem)
                if keep is None:
                    continue
                sizes = []
                item = 0
                while (node_name, item) in self.tensors:
                    t = self.tensors[(node_name, item)]
                    g = np.asarray(t.gather)
                    sizes.append(int(np.isin(g, keep).sum()))
                    item += 1
                dim = self.tensors[(node_name, 0)].dim
                node.op, node.target = "call_function", torch.split
                node.args, node.kwargs = (x, sizes), {"dim": dim}
            elif kind == "reshape":
                key = (node_name, -1)
                if not rem[self.cls_arr[key]].any():
                    continue
                new = self.index.new_shape(key, rem)
                old = tensor_meta_shape(node, -1)
                self.rewrite_shape_args(node, old, new)
        for node_name, attr, dim in self.cg.params:
            keep = self.index.keep_of((node_name, -1), rem)
            if keep is None:
                continue
            owner, a, _ = resolve_attr(gm, attr)
            t = getattr(owner, a)
            if id(t) in done:
                continue
            set_tensor(owner, a, take(t, dim, keep))
            done.add(id(getattr(owner, a)))
            if isinstance(owner, nn.PReLU):
                owner.num_parameters = len(keep)
            for n in gm.graph.nodes:
                if n.op == "get_attr" and n.target == attr:
                    n.meta["tensor_meta"] = tensor_meta_of(getattr(owner, a))
        self.update_shapes(rem)

    def keep_quantized_weights(self, name: str, info: LayerInfo, q: nn.Module,
                               q_old: torch.Tensor, out_keep: np.ndarray | None,
                               in_keep: np.ndarray | None) -> None:
        """A weight quantizer that keeps observing re-derives its ranges from the pruned weight;
        when that would change the kept kernels' quantized values, freeze it at the ranges it
        had (observer off) so the pruned graph computes exactly what the unpruned one did."""
        expect = q_old
        if out_keep is not None:
            expect = take(expect, 0, out_keep)
        if in_keep is not None:
            expect = take(expect, 1, in_keep)
        w_new = attr_value(self.gm, info.weight_attr).detach()
        with torch.no_grad():
            got = copy.deepcopy(q)(w_new)
        if torch.equal(got, expect):
            return
        if hasattr(q, "enable_observer"):
            q.enable_observer(False)
            with torch.no_grad():
                got = copy.deepcopy(q)(w_new)
            if torch.equal(got, expect):
                self.frozen.append(info.name)
                return
        self.inexact_quantizers.append(info.name)

    def rewrite_shape_args(self, node: torch.fx.Node, old: Any, new: Any) -> None:
        """Replace the literal sizes of a view/reshape by the pruned ones (-1 and size
        expressions stay)."""
        if old is None or new is None:
            return
        is_method = node.op == "call_method"
        args = list(node.args)
        if is_method:
            rest = args[1:]
            packed = len(rest) == 1 and isinstance(rest[0], (list, tuple))
            shape = list(rest[0]) if packed else rest
        else:
            shape_arg = args[1] if len(args) > 1 else node.kwargs.get("shape")
            if not isinstance(shape_arg, (list, tuple)):
                return
            packed, shape = True, list(shape_arg)
        if len(shape) != len(new):
            return
        out = [n if (isinstance(s, int) and not isinstance(s, bool) and s != -1) else s
               for s, n in zip(shape, new)]
        if is_method:
            node.args = (args[0], type(rest[0])(out)) if packed else (args[0], *out)
        elif len(args) > 1:
            node.args = (args[0], type(shape_arg)(out), *args[2:])
        else:
            node.kwargs = {**node.kwargs, "shape": type(shape_arg)(out)}

    def shrink_layer(self, node: torch.fx.Node, info: LayerInfo, out_keep: np.ndarray | None,
                     in_keep: np.ndarray | None, delta: np.ndarray | None) -> None:
        """Slice a layer's weight (outputs ``out_keep``, inputs ``in_keep``), add the folded
        constants ``delta`` to its bias, and update the module's sizes and weight quantizer."""
        gm = self.gm
        grouped = self.kinds[node.name] == "grouped"
        w = attr_value(gm, info.weight_attr)
        new_w = w.detach()
        old_out = info.out_channels
        if out_keep is not None:
            new_w = take(new_w, 0, out_keep)
        if in_keep is not None and not grouped:
            new_w = take(new_w, 1, in_keep)
        if new_w is w or new_w._base is w or new_w.data_ptr() == w.data_ptr():
            new_w = new_w.clone()
        bias = attr_value(gm, info.bias_attr) if info.bias_attr else None
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        new_b = None
        folds: tuple[Tensor, Tensor] | None = None      # (bias before folding, folded sum)
        if bias is not None or delta is not None:
            b = bias.detach().clone() if bias is not None else \
                torch.zeros(old_out, dtype=w.dtype, device=w.device)
            parts = bias_parts(mod) if mod is not None else None
            if parts is not None and hasattr(mod, PRUNED_BIAS_FOLD):
                folds = (parts[0].to(b.dtype), parts[1])
            if delta is not None:
                d = torch.from_numpy(delta).to(b.device)
                if mod is not None:
                    folds = (folds[0], folds[1] + d) if folds is not None else \
                        (b.clone(), d.clone())
                b = (b.to(torch.float64) + d).to(b.dtype)
            new_b = take(b, 0, out_keep) if out_keep is not None else b
            if folds is not None and out_keep is not None:
                folds = (take(folds[0], 0, out_keep), take(folds[1], 0, out_keep))
        new_groups = info.groups
        if grouped and out_keep is not None:
            ob = old_out // info.groups
            kept_groups = len(set((out_keep // ob).tolist()))
            new_groups = kept_groups
        owner, wattr, _ = resolve_attr(gm, info.weight_attr)
        set_tensor(owner, wattr, new_w)
        if mod is not None:
            if new_b is not None:
                if mod.bias is None:
                    mod.bias = nn.Parameter(new_b, requires_grad=mod.weight.requires_grad)
                else:
                    set_tensor(mod, "bias", new_b)
            if folds is not None:
                mod.register_buffer(PRUNED_BIAS_BASE, folds[0].detach().clone())
                mod.register_buffer(PRUNED_BIAS_FOLD, folds[1].detach().clone())
            elif out_keep is not None and hasattr(mod, PRUNED_BIAS_FOLD):
                delattr(mod, PRUNED_BIAS_BASE)      # stale (the bias changed since): drop
                delattr(mod, PRUNED_BIAS_FOLD)
            if info.op == "linear":
                mod.out_features, mod.in_features = new_w.shape[0], new_w.shape[1]
            else:
                mod.out_channels = new_w.shape[0]
                mod.in_channels = new_w.shape[1] * new_groups
                mod.groups = new_groups
            if out_keep is not None:
                for child in mod.children():
                    if getattr(child, "is_weight_quantizer", False) or \
                            hasattr(child, "prune_channels"):
                        _slice_quantizer(child, out_keep, old_out)
        else:
            wn = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(wn, torch.fx.Node) and wn.op == "call_module" and out_keep is not None:
                _slice_quantizer(gm.get_submodule(str(wn.target)), out_keep, old_out)
            if isinstance(wn, torch.fx.Node) and wn.op == "call_module":
                wn.meta["tensor_meta"] = tensor_meta_of(new_w)
                wn = wn.args[0]
            if isinstance(wn, torch.fx.Node):
                wn.meta["tensor_meta"] = tensor_meta_of(new_w)
            if new_b is not None:
                if info.bias_attr is not None:
                    bo, ba, _ = resolve_attr(gm, info.bias_attr)
                    set_tensor(bo, ba, new_b)
                    for n in gm.graph.nodes:
                        if n.op == "get_attr" and n.target == info.bias_attr:
                            n.meta["tensor_meta"] = tensor_meta_of(new_b)
                else:
                    self.add_functional_bias(node, info, new_b)
            if grouped and new_groups != info.groups:
                if len(node.args) > 6:
                    node.args = (*node.args[:6], new_groups, *node.args[7:])
                else:
                    node.kwargs = {**node.kwargs, "groups": new_groups}

    def add_functional_bias(self, node: torch.fx.Node, info: LayerInfo, b: torch.Tensor) -> None:
        """Give a functional layer without bias the bias ``b`` (a new parameter next to its
        weight, read through a new get_attr node)."""
        owner, wattr, _ = resolve_attr(self.gm, info.weight_attr)
        base = (wattr[: -len("weight")] + "bias") if wattr.endswith("weight") else wattr + "_bias"
        name, i = base, 0
        while hasattr(owner, name):
            i += 1
            name = f"{base}_{i}"
        requires_grad = attr_value(self.gm, info.weight_attr).requires_grad
        owner.register_parameter(name, nn.Parameter(b, requires_grad=requires_grad))
        prefix = info.weight_attr.rpartition(".")[0]
        qual = f"{prefix}.{name}" if prefix else name
        with self.gm.graph.inserting_before(node):
            bn = self.gm.graph.get_attr(qual)
        bn.meta["tensor_meta"] = tensor_meta_of(b)
        if len(node.args) > 2:
            node.args = (*node.args[:2], bn, *node.args[3:])
        else:
            node.kwargs = {**node.kwargs, "bias": bn}

    def update_qmeta(self, node: torch.fx.Node, info: LayerInfo, keep: np.ndarray) -> None:
        """Slice QMeta.weight to the kept output channels and record the removed ones in
        ``pruned_channels`` as original indices (so repeated runs compose)."""
        q = get_qmeta(node)
        old_c = info.out_channels
        orig_alive = sorted(set(range(old_c + len(q.pruned_channels))) - set(q.pruned_channels))
        removed_now = sorted(set(range(old_c)) - set(keep.tolist()))
        pruned = tuple(sorted(set(q.pruned_channels) | {orig_alive[k] for k in removed_now}))
        changes: dict[str, Any] = {"pruned_channels": pruned}
        if q.weight is not None:
            changes["weight"] = _slice_spec(q.weight, keep, old_c)
        update_qmeta(node, origin=self.origin, **changes)

    def update_shapes(self, rem: np.ndarray) -> None:
        """Rewrite ``tensor_meta`` of every tensor that lost channels."""
        for key, t in self.tensors.items():
            if not rem[self.cls_arr[key]].any():
                continue
            node = self.nodes[key[0]]
            new = self.index.new_shape(key, rem)
            tm = node.meta.get("tensor_meta")
            if new is None or tm is None:
                continue
            if key[1] >= 0:
                if isinstance(tm, (list, tuple)) and not hasattr(tm, "shape"):
                    items = list(tm)
                    items[key[1]] = with_shape(items[key[1]], new)
                    node.meta["tensor_meta"] = type(tm)(items) if isinstance(tm, tuple) else items
            else:
                node.meta["tensor_meta"] = with_shape(tm, new)
        # the transient nodes of view chains (transpose/contiguous of split blocks) are tracked
        # too, so every tensor whose channels changed gets its new shape


def _slice_spec(spec: QuantSpec, keep: np.ndarray, old_c: int) -> QuantSpec:
    """A weight QuantSpec restricted to the kept output channels."""
    k = keep.tolist()
    changes: dict[str, Any] = {}
    if spec.bits_per_kernel is not None and len(spec.bits_per_kernel) == old_c:
        bpk = tuple(spec.bits_per_kernel[i] for i in k)
        changes["bits_per_kernel"] = bpk
        changes["bits"] = max(bpk)
    for name in ("scale", "zero_point"):
        v = getattr(spec, name)
        if v is not None and len(v) == old_c and old_c > 1:
            changes[name] = tuple(v[i] for i in k)
    return spec.replace(**changes) if changes else spec


def _slice_quantizer(q: nn.Module, keep: np.ndarray, old_c: int) -> None:
    """Shrink a weight quantizer's per-output-channel state (duck typing, see the package
    docstring)."""
    idx = torch.as_tensor(keep, dtype=torch.long)
    if hasattr(q, "prune_channels"):
        q.prune_channels(idx)
        return
    for name, t in list(q.named_parameters(recurse=False)) + list(q.named_buffers(recurse=False)):
        if t.dim() >= 1 and t.shape[0] == old_c:
            set_tensor(q, name, take(t, 0, keep))
    for attr in ("num_channels", "num_features", "out_channels"):
        if getattr(q, attr, None) == old_c and not isinstance(getattr(q, attr), bool):
            setattr(q, attr, len(keep))
    q.load_state_dict(q.state_dict())   # runs the module's load hooks: refreshes derived caches
