"""Deciding what ``prune-zero-bit-channels`` removes: which channel classes carry only 0-bit
kernels, the constant each such channel carries to its consumers (propagated through the nodes
that compute it), and the guards that keep a channel (partial groups, unsupported nodes, inexact
constants, last channels, view sizes, whole-tensor weight normalization)."""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.fx

from qpasses.algorithms.channels import TensorChannels
from qpasses.ir import ops
from qpasses.modules.lookup import is_activation_quantizer
from qpasses.algorithms.pruning.index import ChannelIndex, PrunePlan
from qpasses.algorithms.pruning.tensors import (float_dtype, is_observing, sees_full_windows,
                                                shape_args, tensor_meta_shape, zero_bit_kernels)
from qpasses.ir.fx import attr_value, node_arg

__all__ = ["ChannelPruner"]


class _NoEval(Exception):
    """A value the planner cannot evaluate (a probe or a size expression)."""


class ChannelPruner:
    """Plans the removal of 0-bit channels: ``plan()`` returns a PrunePlan.

    A channel class is a candidate when every producer kernel of it has 0 bits and the analysis
    found nothing unsupported on the way. ``propagate`` computes the constant each candidate
    carries at every tracked tensor (the producers' biases, evaluated through BatchNorm,
    activations, adds... on probe tensors) and checks it at every consumer layer: zero, folded
    exactly into the consumer's bias, folded approximately (``mode="fold-constant"``, padded
    convs) or kept. ``guard_and_shapes`` then keeps what would break shapes or quantizers.
    """

    def __init__(self, index: ChannelIndex, mode: str):
        self.index, self.mode = index, mode
        # shortcuts into the index
        self.gm, self.cg, self.nodes = index.gm, index.cg, index.nodes
        self.kinds, self.tensors, self.consumers = index.kinds, index.tensors, index.consumers
        self.infos, self.ncls, self.cls_arr = index.infos, index.ncls, index.cls_arr
        self.kept_kind: dict[int, str] = {}     # kept class -> category (for the statistics)

    # -- deciding ------------------------------------------------------------------------------
    def plan(self) -> PrunePlan:
        """Decide which 0-bit channel classes go, which stay and why, and what folds where."""
        zero = {name: zero_bit_kernels(self.gm, self.nodes[name], info)
                for name, info in self.infos.items()}
        n_zero = int(sum(int(z.sum()) for z in zero.values()))
        kept: dict[int, str] = {}
        cand = np.zeros(self.ncls, dtype=bool)
        reasons = self.cg.reason_of
        for c, prods in enumerate(self.cg.class_producers):
            if not prods:
                continue
            zs = [bool(zero[n][i]) if n in zero else False for n, i in prods]
            if not any(zs):
                continue
            if not all(zs):
                live = sorted({n for (n, _), z in zip(prods, zs) if not z})
                names = ", ".join(f"'{self.infos[n].name}'" if n in self.infos else f"'{n}'"
                                  for n in live[:3])
                self.kept_kind[c] = "partial"
                kept[c] = (f"partially 0-bit: coupled producer(s) {names}"
                           f"{' ...' if len(live) > 3 else ''} still have bits for this channel")
                continue
            if c in reasons:
                self.kept_kind[c] = "unsupported"
                kept[c] = f"coupled through an unsupported node: {reasons[c]}"
                continue
            cand[c] = True
        folds: dict[str, list[tuple[int, float, bool]]] = {}
        if cand.any():
            folds = self.propagate(cand, kept)
        removed = set(np.flatnonzero(cand).tolist()) - set(kept)
        self.guard_and_shapes(removed, kept)
        folds = {k: [f for f in v if self.cls_arr[(self.consumers[k], -1)][f[0]] in removed]
                 for k, v in folds.items()}
        folds = {k: v for k, v in folds.items() if v}
        return PrunePlan(self.cg, self.mode, removed, kept, folds, n_zero, zero,
                         self.kept_kind)

    def propagate(self, cand: np.ndarray, kept: dict[int, str]) -> dict[str, list]:
        """Constant values of candidate channels at every tensor, then the consumer checks."""
        vals: dict[tuple[str, int], np.ndarray] = {}
        exact: dict[tuple[str, int], np.ndarray] = {}
        for key, t in self.tensors.items():
            cls = self.cls_arr[key]
            mask = cand[cls]
            if not mask.any():
                continue
            v, e = self.values(t, mask, vals, exact)
            v = np.where(mask, v, np.nan)
            vals[key], exact[key] = v, e & mask | ~mask
        folds: dict[str, list[tuple[int, float, bool]]] = {}
        weight_users: dict[int, int] = {}
        for name, info in self.infos.items():
            w = attr_value(self.gm, info.weight_attr)
            weight_users[id(w)] = weight_users.get(id(w), 0) + 1
        for layer, src in self.consumers.items():
            key = (src, -1)
            if key not in vals:
                continue
            info = self.infos[layer]
            node = self.nodes[layer]
            mod = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            no_pad = sees_full_windows(info, mod)
            shared = weight_users.get(id(attr_value(self.gm, info.weight_attr)), 0) > 1
            cls = self.cls_arr[key]
            v, e = vals[key], exact[key]
            for p in np.flatnonzero(cand[cls]).tolist():
                c = int(cls[p])
                if c in kept:
                    continue
                x = float(v[p])
                where = f"layer '{info.name}' (input '{src}', position {p})"
                if math.isnan(x):
                    self.kept_kind[c] = "inexact"
                    kept[c] = f"its value is not constant where {where} reads it"
                elif x == 0.0:
                    continue
                elif shared:
                    self.kept_kind[c] = "inexact"
                    kept[c] = f"constant {x:.4g} reaches {where}, whose weights are shared"
                elif no_pad and bool(e[p]):
                    folds.setdefault(layer, []).append((p, x, True))
                elif self.mode == "fold-constant":
                    folds.setdefault(layer, []).append((p, x, False))
                else:
                    why = ("zero padding makes its borders differ" if not no_pad
                           else "an average pool with padding made it non-uniform")
                    self.kept_kind[c] = "inexact"
                    kept[c] = (f"constant {x:.4g} reaches {where}: {why} (mode=exact keeps it; "
                               "fold-constant folds it approximately)")
        return folds

    def values(self, t: TensorChannels, mask: np.ndarray,
               vals: dict[tuple[str, int], np.ndarray],
               exact: dict[tuple[str, int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(value, exact) per position of tensor ``t`` for the candidate positions in ``mask``,
        from the values already computed at its inputs (NaN: not a known constant)."""
        n = len(t.classes)
        nan = np.full(n, np.nan)
        true = np.ones(n, dtype=bool)
        node = self.nodes[t.node]
        kind = self.kinds.get(t.node)

        def src(name: str) -> tuple[np.ndarray, np.ndarray]:
            key = (name, -1)
            m = len(self.tensors[key].classes) if key in self.tensors else 0
            return vals.get(key, np.full(m, np.nan)), exact.get(key, np.ones(m, dtype=bool))

        if kind in ("producer", "grouped"):
            info = self.infos[t.node]
            bias = attr_value(self.gm, info.bias_attr) if info.bias_attr else None
            if bias is None:
                return np.zeros(n), true
            return bias.detach().cpu().to(torch.float64).numpy().reshape(-1)[:n].copy(), true
        if t.gather is not None:
            parts = [src(s) for s in t.sources]
            v = np.concatenate([p[0] for p in parts]) if parts else nan
            e = np.concatenate([p[1] for p in parts]) if parts else true
            g = np.asarray(t.gather, dtype=np.int64)
            return v[g], e[g]
        if kind == "cat-other":
            xs = [a for a in node.args[0]]
            parts = [src(a.name) for a in xs]
            v = parts[0][0].copy()
            e = np.logical_and.reduce([p[1] for p in parts])
            for p in parts[1:]:
                v = np.where(p[0] == v, v, np.nan)
            return v, e
        if kind in ("pool", "reduce"):
            x = node.args[0] if node.args else node.kwargs.get("input")
            v, e = src(x.name)
            v, e = v.copy(), e.copy()
            if kind == "reduce":
                if str(getattr(node.target, "__name__", node.target)) == "sum":
                    in_shape = tensor_meta_shape(x, -1)
                    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                    dims = [dims] if isinstance(dims, int) else list(dims)
                    v = v * math.prod(in_shape[d] for d in dims)
                return v, e
            approx, nonuniform = self.pool_effect(node)
            if nonuniform:
                v = np.where(v == 0, 0.0, np.nan)
            elif approx:
                e = e & (v == 0)
            return v, e
        if kind in ("norm", "chparam", "eltwise", "binary"):
            return self.probe(node, t, src)
        return nan, true

    def pool_effect(self, node: torch.fx.Node) -> tuple[bool, bool]:
        """(border values differ from the interior, values are not uniform at all)."""
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            if isinstance(mod, tuple(ops.AVG_POOL_MODULES)):
                if getattr(mod, "divisor_override", None):
                    return False, True
                pad = mod.padding if isinstance(mod.padding, (tuple, list)) else (mod.padding,)
                return bool(mod.count_include_pad and any(int(p) for p in pad)), False
            return False, False
        if node.target in ops.AVG_POOL_FUNCTIONS:
            if node_arg(node, 6, "divisor_override", None):
                return False, True
            pad = node_arg(node, 3, "padding", 0)
            pad = pad if isinstance(pad, (tuple, list)) else (pad,)
            return bool(node_arg(node, 5, "count_include_pad", True)
                        and any(int(p) for p in pad)), False
        return False, False

    def probe(self, node: torch.fx.Node, t: TensorChannels, src: Any) -> tuple[np.ndarray,
                                                                               np.ndarray]:
        """Evaluate the node on per-channel probe tensors of its inputs' constants."""
        n = len(t.classes)
        nan = np.full(n, np.nan)
        out_shape = tensor_meta_shape(node, -1)
        if out_shape is None:
            return nan, np.ones(n, dtype=bool)
        dtype = float_dtype(node)
        exact_all = np.ones(n, dtype=bool)
        unknown_operand = False
        full_vals: list[np.ndarray] = []

        def arg_value(a: torch.fx.Node) -> Any:
            nonlocal exact_all, unknown_operand
            key = (a.name, -1)
            if key in self.tensors:
                at = self.tensors[key]
                shape = tensor_meta_shape(a, -1)
                if shape is None or len(at.block) != 1:
                    raise _NoEval
                if at.block[0] != n:          # a size-1 broadcast operand: not a constant
                    unknown_operand = True
                    return None
                v, e = src(a.name)
                exact_all = exact_all & e
                full_vals.append(v)
                probe_shape = [1] * len(shape)
                probe_shape[at.dim] = n
                return torch.as_tensor(np.nan_to_num(v, nan=0.0), dtype=dtype).reshape(probe_shape)
            if a.op == "get_attr":
                val = attr_value(self.gm, str(a.target))
                if isinstance(val, torch.Tensor):
                    return val.detach()
            unknown_operand = True
            return None

        try:
            args = torch.fx.node.map_arg(node.args, arg_value)
            kwargs = torch.fx.node.map_arg(node.kwargs, arg_value)
            if unknown_operand:
                # x * y with x exactly 0 stays 0 whatever y is; anything else is unknown
                if node.target in ops.MUL_TARGETS and full_vals:
                    zero = np.logical_or.reduce([fv == 0 for fv in full_vals])
                    return np.where(zero, 0.0, np.nan), exact_all
                return nan, exact_all
            with torch.no_grad():
                if node.op == "call_module":
                    mod = self.gm.get_submodule(str(node.target))
                    if is_activation_quantizer(mod):
                        if is_observing(mod):
                            return nan, exact_all
                        mod = copy.deepcopy(mod)
                    elif getattr(mod, "training", False) and "Dropout" in type(mod).__name__:
                        return nan, exact_all
                    r = mod(*args, **kwargs)
                elif node.op == "call_method":
                    r = getattr(args[0], str(node.target))(*args[1:], **kwargs)
                else:
                    if node.target in ops.DROPOUT_FUNCTIONS and \
                            (node.kwargs.get("training") or
                             (len(node.args) > 2 and node.args[2] is True)):
                        return nan, exact_all
                    r = node.target(*args, **kwargs)
        except _NoEval:
            return nan, exact_all
        except Exception:  # noqa: BLE001 - a node we cannot probe: its value is unknown
            return nan, exact_all
        if not isinstance(r, torch.Tensor) or r.dim() != len(out_shape):
            return nan, exact_all
        r2 = np.moveaxis(r.detach().to(torch.float64).cpu().numpy(), t.dim, 0)
        if r2.shape[0] != n:
            return nan, exact_all
        r2 = r2.reshape(n, -1)
        uniform = r2.max(axis=1) == r2.min(axis=1)
        return np.where(uniform, r2[:, 0], np.nan), exact_all

    # -- zero-channel guard and view sizes ------------------------------------------------------
    def guard_and_shapes(self, removed: set[int], kept: dict[int, str]) -> None:
        """Move classes from ``removed`` to ``kept`` until no tensor loses all its channels, every
        view keeps valid sizes and no whole-tensor-normalized weight loses its largest value."""
        for _ in range(len(self.tensors) + 1):
            changed = False
            rem = self.index.removed_mask(removed)
            for key, t in self.tensors.items():
                cls = self.cls_arr[key]
                r = rem[cls]
                if not r.any():
                    continue
                blk = r.reshape(t.block)
                last = blk.reshape(-1, t.block[-1]).all(axis=0)
                if last.all():
                    c = int(cls.reshape(-1, t.block[-1])[0, 0]) if len(t.block) > 1 \
                        else int(cls[0])
                    removed.discard(c)
                    rem[c] = False
                    self.kept_kind[c] = "last"
                    kept[c] = (f"kept as the last channel: pruning would leave '{t.node}' with no "
                               "channels (a layer never loses all its channels)")
                    changed = True
            if changed:
                continue
            bad = self.check_views(rem)
            for node_name, why in bad:
                for key, t in self.tensors.items():
                    if t.node != node_name:
                        continue
                    for c in set(self.cls_arr[key].tolist()) & removed:
                        removed.discard(c)
                        self.kept_kind[c] = "shape"
                        kept[c] = why
                        changed = True
            for c, why in self.check_whole_tensor_quantizers(rem):
                if c in removed:
                    removed.discard(c)
                    self.kept_kind[c] = "quantizer"
                    kept[c] = why
                    changed = True
            if not changed:
                return


    def check_whole_tensor_quantizers(self, rem: np.ndarray) -> list[tuple[int, str]]:
        """DoReFa weights are normalized by the largest |w| of the whole tensor: removing the
        channel that holds it changes every other kernel, so that channel stays."""
        out: list[tuple[int, str]] = []
        for name, info in self.infos.items():
            q = self.index.weight_quantizer(name)
            if q is None or getattr(q, "scheme", None) != "dorefa":
                continue
            if q is not None and hasattr(q, "fake_quant_on") and not q.fake_quant_on:
                continue
            w = attr_value(self.gm, info.weight_attr).detach()
            flat = int(w.abs().reshape(-1).argmax())
            idx = np.unravel_index(flat, tuple(w.shape))
            k, j = int(idx[0]), int(idx[1])
            why = (f"the weights of '{info.name}' are DoReFa-normalized by their largest "
                   "magnitude, which this channel holds (removing it would change every kernel)")
            ocls = self.cls_arr.get((name, -1))
            if ocls is not None and rem[ocls[k]]:
                out.append((int(ocls[k]), why))
            x = self.nodes[name].args[0] if self.nodes[name].args else None
            icls = self.cls_arr.get((x.name, -1)) if isinstance(x, torch.fx.Node) else None
            if icls is not None and len(icls) == info.in_channels:
                jj = j if info.groups == 1 else (k // (info.out_channels // info.groups)) * \
                    (info.in_channels // info.groups) + j
                if rem[icls[jj]]:
                    out.append((int(icls[jj]), why))
        return out


    def check_views(self, rem: np.ndarray) -> list[tuple[str, str]]:
        """``(node, reason)`` for views whose size arguments would not follow the pruning."""
        bad = []
        for key, t in self.tensors.items():
            if not rem[self.cls_arr[key]].any():
                continue
            if not self.index.rectangular(key, rem):
                bad.append((t.node, f"'{t.node}' would need a non-rectangular pruning of a view"))
                continue
            node = self.nodes[t.node]
            if self.kinds.get(t.node) != "reshape":
                continue
            sizes = shape_args(node)
            if sizes is None:
                continue
            new = self.index.new_shape(key, rem)
            if new is None or len(sizes) != len(new):
                bad.append((t.node, f"'{t.node}' has shape arguments that cannot be remapped"))
                continue
            for a, want in zip(sizes, new):
                if isinstance(a, torch.fx.Node):
                    try:
                        got = self.eval_int(a, rem)
                    except _NoEval:
                        got = None
                    if got != want and got != -1:
                        bad.append((t.node, f"'{t.node}' computes its shape from sizes that "
                                    "would not follow the pruning"))
                        break
        return bad

    def eval_int(self, a: Any, rem: np.ndarray) -> Any:
        """The value a size expression takes after pruning (raises _NoEval when unknown)."""
        if not isinstance(a, torch.fx.Node):
            if isinstance(a, (list, tuple)):
                return type(a)(self.eval_int(x, rem) for x in a)
            return a
        if a.op == "call_method" and a.target in ("size", "dim", "numel"):
            x = a.args[0]
            shape = self.index.new_shape((x.name, -1), rem) if isinstance(x, torch.fx.Node) \
                else None
            if shape is None:
                raise _NoEval
            if a.target == "dim":
                return len(shape)
            if a.target == "numel":
                return math.prod(shape)
            d = a.args[1] if len(a.args) > 1 else a.kwargs.get("dim")
            return torch.Size(shape) if d is None else shape[d]
        if a.op == "call_function" and a.target is getattr:
            x = a.args[0]
            shape = self.index.new_shape((x.name, -1), rem)
            if shape is None:
                raise _NoEval
            return torch.Size(shape) if a.args[1] == "shape" else len(shape)
        if a.op == "call_function" and a.target in ops.INT_FUNCTIONS:
            args = [self.eval_int(x, rem) for x in a.args]
            return a.target(*args)
        raise _NoEval
