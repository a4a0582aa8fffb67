"""prune-zero-bit-channels: physically remove channels whose weights have 0 bits (FracBits §3.5).

A 0-bit kernel quantizes to exactly zero, so its output channel carries only the layer's bias: a
constant. The pass removes a channel class (see ``channel-groups``) when

1. every producer kernel of the class has 0 bits (``QMeta.weight.bits_per_kernel``, or a whole
   layer at 0 bits); classes where only some producers are 0-bit are kept and reported;
2. the analysis found no unsupported node on the way (the node is reported);
3. the constant the class carries is accounted for exactly at every consumer: it is 0 where a
   conv/linear reads it (e.g. bias <= 0 followed by ReLU), or it is folded into the consumer's
   bias: ``b' = b + sum_k W_eff[:, j, k] * c`` where ``W_eff`` is the weight as the layer computes
   with it (after its weight fake-quantizer, with 0-bit kernels zero). Folding is exact for
   linear layers and for convolutions without zero padding (1x1 included); a padded conv sees
   fewer terms on the border, so ``mode=exact`` keeps such channels and ``mode=fold-constant``
   folds them anyway and reports the largest output deviation measured on
   ``PassContext.example_inputs``. Constants are propagated through BatchNorm, activations,
   quantizers, pooling, residual adds, SE multiplies, concat/split/shuffle/flatten exactly as
   those nodes compute them (each node is evaluated on a probe tensor);
4. removing it does not leave any tensor or layer without channels (one channel is kept and the
   reason logged).

What is shrunk: conv/linear weights (dim 0 for removed outputs, dim 1 for removed inputs, whole
groups for grouped/depthwise convs with ``groups`` updated), biases, BatchNorm statistics and
affine, per-channel parameters (PReLU, elementwise ``get_attr`` operands), split sizes (chunk
becomes split), literal view sizes, ``QMeta.weight`` (``bits_per_kernel``, per-channel
``scale``/``zero_point``), ``QMeta.pruned_channels`` (the ORIGINAL indices, so repeated runs
compose), ``tensor_meta`` (arithmetically, then by shape propagation when
``PassContext.example_inputs`` is given) and quantizer state.

Quantizer modules (duck typing, so any quantizer library works): a child module of a layer with
``is_weight_quantizer = True`` is the layer's weight quantizer: if it has ``prune_channels(keep)``
that is called with the kept output-channel indices (a LongTensor); otherwise every direct
parameter/buffer whose leading dim equals the layer's old output-channel count is sliced, the
attributes ``num_channels``/``num_features``/``out_channels`` are updated when they held that
count, and the module's ``load_state_dict`` hooks run (qpasses' fake-quant modules refresh their
caches there). Activation quantizers in the channel path must be per-tensor, or declare their
per-channel tensors in ``per_channel_tensors`` (names of direct parameters/buffers sliced along
dim 0); otherwise the analysis keeps their channels; an activation quantizer that is still
observing makes the constants through it unknown (kept). A weight quantizer that keeps observing
(qpasses' weight fake-quant tracks the weights) would re-derive its ranges from the pruned
weights; when that changes the kept kernels' quantized values, the pass freezes it at its
pre-pruning ranges (``enable_observer(False)``; listed in the run record) so outputs stay equal.
DoReFa weights are normalized by the largest magnitude of the whole tensor: the channel holding
it is kept (``num_kept_quantizer``).

Semantics on a float graph: a 0-bit kernel is treated as computing with zero weights (what any
weight quantizer makes of it); the float graph itself still multiplies by the float weights until
quantizers are inserted, so compare a pruned float graph with the unpruned one whose 0-bit
kernels are zeroed.

Outputs: statistics (``num_zero_bit_kernels``, ``num_channels_removed``, ``num_layers_pruned``,
``num_kept_partial``, ``num_kept_unsupported``, ``num_kept_inexact``, ``num_kept_last``,
``num_kept_shape``, ``num_kept_quantizer``, ``num_constants_folded``, ``num_approx_folds``) and
``gm.meta["qpasses.prune_log"]``: one dict per producer layer with removed or kept 0-bit
channels (``layer``, ``node``, ``mode``, ``removed`` original indices, ``kept``: list of
``{"channel", "reason"}``), plus one ``{"layer": None, ...}`` run record with notes and
``max_deviation``. With ``PassContext(statistics=True)`` a readable summary is printed.

A graph without 0-bit kernels is left unchanged (a warning says so): pruning is a no-op, not an
error.
"""
from __future__ import annotations

import copy
import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from passes_registry import Pass, PassResult, PreservedAnalyses, register_pass

from qpasses.errors import AnnotationError, InputError
from qpasses.ir.layers import PRUNED_BIAS_BASE, PRUNED_BIAS_FOLD, LayerInfo, bias_parts, layer_info
from qpasses.ir.annotations import QuantSpec, get_qmeta, update_qmeta
from qpasses.ir.trace import propagate_shapes
from qpasses.analyses.channel_groups import (INT_FUNCTIONS, ChannelGroups, TensorChannels, _Walker,
                                       no_gc)

__all__ = ["PruneZeroBitChannels", "PruneOptions", "PRUNE_LOG_KEY", "zero_bit_kernels"]

PASS_NAME = "prune-zero-bit-channels"
PRUNE_LOG_KEY = "qpasses.prune_log"
_MUL_TARGETS = {operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_"}


@dataclass(frozen=True)
class PruneOptions:
    mode: Literal["exact", "fold-constant"] = field(default="exact", metadata={
        "help": "exact: remove a constant channel only when it is provably zero at its consumers "
                "or folds exactly into their biases; fold-constant: also fold it into padded "
                "convolutions (approximate on the border; the deviation is reported)"})


class _NoEval(Exception):
    pass


def zero_bit_kernels(gm: torch.fx.GraphModule, node: torch.fx.Node,
                     info: LayerInfo) -> np.ndarray:
    """Boolean mask of the layer's output kernels that have 0 weight bits."""
    w = get_qmeta(node).weight
    if w is None:
        return np.zeros(info.out_channels, dtype=bool)
    try:
        bits = w.kernel_bits(info.out_channels)
    except AnnotationError as e:
        raise AnnotationError(f"layer '{info.name}': QMeta.weight does not fit the layer: {e} "
                              "(re-run annotate-bitwidths after changing the model)") from None
    return np.asarray(bits, dtype=np.int64) == 0


def _resolve(gm: nn.Module, target: str) -> tuple[nn.Module, str]:
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return owner, attr


def _get(gm: nn.Module, target: str) -> Any:
    owner, attr = _resolve(gm, target)
    return getattr(owner, attr)


def _set_tensor(owner: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Replace a parameter/buffer/plain tensor attribute by ``value`` (a fresh tensor, owned by
    the caller), keeping its kind (parameter with its requires_grad, buffer, plain attribute)."""
    old = getattr(owner, attr)
    value = value.detach()
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def _np(t: torch.Tensor) -> np.ndarray | None:
    """A numpy view of a CPU tensor numpy can hold, else None. The pass does its tensor work in
    numpy: it is small, memory-bound slicing, and numpy never spins up a thread pool (torch's
    parallel regions cost milliseconds each on a busy machine)."""
    t = t.detach()
    if t.device.type != "cpu" or t.dtype in (torch.bfloat16,) or t.is_quantized \
            or t.dtype.is_complex or not t.is_contiguous() and t.dim() > 4:
        return None
    try:
        return t.numpy()
    except (TypeError, RuntimeError):
        return None


def _take(t: torch.Tensor, dim: int, keep: np.ndarray) -> torch.Tensor:
    """A new tensor: ``t`` restricted to indices ``keep`` along ``dim``."""
    a = _np(t)
    if a is not None:
        return torch.from_numpy(np.ascontiguousarray(np.take(a, keep, axis=dim)))
    return t.detach().index_select(dim, torch.as_tensor(keep, dtype=torch.long,
                                                        device=t.device)).clone()


def _tensor_meta_shape(node: torch.fx.Node, item: int) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    if tm is None:
        return None
    if item >= 0:
        if isinstance(tm, (list, tuple)) and not hasattr(tm, "shape") and item < len(tm):
            tm = tm[item]
        else:
            return None
    return tuple(int(s) for s in tm.shape) if hasattr(tm, "shape") else None


def _dtype(node: torch.fx.Node) -> torch.dtype:
    tm = node.meta.get("tensor_meta")
    if isinstance(tm, (list, tuple)) and not hasattr(tm, "dtype") and tm:
        tm = tm[0]
    dt = getattr(tm, "dtype", None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def _strides_like(old_shape: tuple[int, ...], old_stride: Any,
                  new_shape: tuple[int, ...]) -> tuple[int, ...]:
    n = len(new_shape)
    order = list(range(n))
    if old_stride is not None and len(old_stride) == n:
        order = sorted(range(n), key=lambda d: (-old_stride[d], d))
    stride = [0] * n
    acc = 1
    for d in reversed(order):
        stride[d] = acc
        acc *= max(new_shape[d], 1)
    return tuple(stride)


def _with_shape(tm: Any, shape: tuple[int, ...]) -> Any:
    if not hasattr(tm, "_replace"):
        return tm
    return tm._replace(shape=torch.Size(shape),
                       stride=_strides_like(tuple(tm.shape), getattr(tm, "stride", None), shape))


def _tensor_meta_of(t: torch.Tensor) -> Any:
    from torch.fx.passes.shape_prop import _extract_tensor_metadata
    return _extract_tensor_metadata(t)


def _zero_padding(info: LayerInfo, mod: Any) -> bool:
    """True when every output position of the conv sees a full window of real inputs (or the
    padding repeats the input: a uniform channel stays uniform)."""
    if not info.is_conv:
        return True
    if mod is not None and getattr(mod, "padding_mode", "zeros") != "zeros":
        return True
    pad = info.padding
    if isinstance(pad, str):
        return pad == "valid" or all(k == 1 for k in info.kernel_size)
    return all(int(p) == 0 for p in pad)


# ------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    cg: ChannelGroups
    mode: str
    removed: set[int]
    kept_reason: dict[int, str]
    folds: dict[str, list[tuple[int, float, bool]]]     # consumer node -> (position, value, exact)
    n_zero: int
    zero: dict[str, np.ndarray]


class _Pruner:
    def __init__(self, gm: torch.fx.GraphModule, cg: ChannelGroups, mode: str, ctx: Any):
        self.gm, self.cg, self.mode, self.ctx = gm, cg, mode, ctx
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
        self.frozen: list[str] = []
        self.why_kind: dict[int, str] = {}     # kept class -> category (for the statistics)
        self.inexact_quantizers: list[str] = []
        self.cls_arr = {key: np.asarray(t.classes, dtype=np.int64)
                        for key, t in self.tensors.items()}

    # -- deciding ------------------------------------------------------------------------------
    def plan(self) -> _Plan:
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
                self.why_kind[c] = "partial"
                kept[c] = (f"partially 0-bit: coupled producer(s) {names}"
                           f"{' ...' if len(live) > 3 else ''} still have bits for this channel")
                continue
            if c in reasons:
                self.why_kind[c] = "unsupported"
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
        return _Plan(self.cg, self.mode, removed, kept, folds, n_zero, zero)

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
            w = _get(self.gm, info.weight_attr)
            weight_users[id(w)] = weight_users.get(id(w), 0) + 1
        for layer, src in self.consumers.items():
            key = (src, -1)
            if key not in vals:
                continue
            info = self.infos[layer]
            node = self.nodes[layer]
            mod = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            no_pad = _zero_padding(info, mod)
            shared = weight_users.get(id(_get(self.gm, info.weight_attr)), 0) > 1
            cls = self.cls_arr[key]
            v, e = vals[key], exact[key]
            for p in np.flatnonzero(cand[cls]).tolist():
                c = int(cls[p])
                if c in kept:
                    continue
                x = float(v[p])
                where = f"layer '{info.name}' (input '{src}', position {p})"
                if math.isnan(x):
                    self.why_kind[c] = "inexact"
                    kept[c] = f"its value is not constant where {where} reads it"
                elif x == 0.0:
                    continue
                elif shared:
                    self.why_kind[c] = "inexact"
                    kept[c] = f"constant {x:.4g} reaches {where}, whose weights are shared"
                elif no_pad and bool(e[p]):
                    folds.setdefault(layer, []).append((p, x, True))
                elif self.mode == "fold-constant":
                    folds.setdefault(layer, []).append((p, x, False))
                else:
                    why = ("zero padding makes its borders differ" if not no_pad
                           else "an average pool with padding made it non-uniform")
                    self.why_kind[c] = "inexact"
                    kept[c] = (f"constant {x:.4g} reaches {where}: {why} (mode=exact keeps it; "
                               "fold-constant folds it approximately)")
        return folds

    def values(self, t: TensorChannels, mask: np.ndarray,
               vals: dict[tuple[str, int], np.ndarray],
               exact: dict[tuple[str, int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
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
            bias = _get(self.gm, info.bias_attr) if info.bias_attr else None
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
                    in_shape = _tensor_meta_shape(x, -1)
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
            if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
                if getattr(mod, "divisor_override", None):
                    return False, True
                pad = mod.padding if isinstance(mod.padding, (tuple, list)) else (mod.padding,)
                return bool(mod.count_include_pad and any(int(p) for p in pad)), False
            return False, False
        if node.target in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
            def arg(i: int, name: str, default: Any) -> Any:
                return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)
            if arg(6, "divisor_override", None):
                return False, True
            pad = arg(3, "padding", 0)
            pad = pad if isinstance(pad, (tuple, list)) else (pad,)
            return bool(arg(5, "count_include_pad", True) and any(int(p) for p in pad)), False
        return False, False

    def probe(self, node: torch.fx.Node, t: TensorChannels, src: Any) -> tuple[np.ndarray,
                                                                               np.ndarray]:
        """Evaluate the node on per-channel probe tensors of its inputs' constants."""
        n = len(t.classes)
        nan = np.full(n, np.nan)
        out_shape = _tensor_meta_shape(node, -1)
        if out_shape is None:
            return nan, np.ones(n, dtype=bool)
        dtype = _dtype(node)
        exact_all = np.ones(n, dtype=bool)
        unknown_operand = False
        full_vals: list[np.ndarray] = []

        def arg_value(a: torch.fx.Node) -> Any:
            nonlocal exact_all, unknown_operand
            key = (a.name, -1)
            if key in self.tensors:
                at = self.tensors[key]
                shape = _tensor_meta_shape(a, -1)
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
                val = _get(self.gm, str(a.target))
                if isinstance(val, torch.Tensor):
                    return val.detach()
            unknown_operand = True
            return None

        try:
            args = torch.fx.node.map_arg(node.args, arg_value)
            kwargs = torch.fx.node.map_arg(node.kwargs, arg_value)
            if unknown_operand:
                # x * y with x exactly 0 stays 0 whatever y is; anything else is unknown
                if node.target in _MUL_TARGETS and full_vals:
                    zero = np.logical_or.reduce([fv == 0 for fv in full_vals])
                    return np.where(zero, 0.0, np.nan), exact_all
                return nan, exact_all
            with torch.no_grad():
                if node.op == "call_module":
                    mod = self.gm.get_submodule(str(node.target))
                    if _Walker.is_act_quantizer(mod):
                        if _observing(mod):
                            return nan, exact_all
                        mod = copy.deepcopy(mod)
                    elif getattr(mod, "training", False) and "Dropout" in type(mod).__name__:
                        return nan, exact_all
                    r = mod(*args, **kwargs)
                elif node.op == "call_method":
                    r = getattr(args[0], str(node.target))(*args[1:], **kwargs)
                else:
                    if node.target in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                                       F.alpha_dropout, F.feature_alpha_dropout) and \
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
        for _ in range(len(self.tensors) + 1):
            changed = False
            rem = np.zeros(self.ncls, dtype=bool)
            if removed:
                rem[list(removed)] = True
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
                    self.why_kind[c] = "last"
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
                        self.why_kind[c] = "shape"
                        kept[c] = why
                        changed = True
            for c, why in self.check_whole_tensor_quantizers(rem):
                if c in removed:
                    removed.discard(c)
                    self.why_kind[c] = "quantizer"
                    kept[c] = why
                    changed = True
            if not changed:
                return

    def weight_quantizer(self, layer: str) -> nn.Module | None:
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

    def check_whole_tensor_quantizers(self, rem: np.ndarray) -> list[tuple[int, str]]:
        """DoReFa weights are normalized by the largest |w| of the whole tensor: removing the
        channel that holds it changes every other kernel, so that channel stays."""
        out: list[tuple[int, str]] = []
        for name, info in self.infos.items():
            q = self.weight_quantizer(name)
            if q is None or getattr(q, "scheme", None) != "dorefa":
                continue
            if q is not None and hasattr(q, "fake_quant_on") and not q.fake_quant_on:
                continue
            w = _get(self.gm, info.weight_attr).detach()
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

    def new_shape(self, key: tuple[str, int], rem: np.ndarray) -> tuple[int, ...] | None:
        node = self.nodes[key[0]]
        old = _tensor_meta_shape(node, key[1])
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

    def check_views(self, rem: np.ndarray) -> list[tuple[str, str]]:
        bad = []
        for key, t in self.tensors.items():
            if not rem[self.cls_arr[key]].any():
                continue
            if not self.rectangular(key, rem):
                bad.append((t.node, f"'{t.node}' would need a non-rectangular pruning of a view"))
                continue
            node = self.nodes[t.node]
            if self.kinds.get(t.node) != "reshape":
                continue
            shape_args = _shape_args(node)
            if shape_args is None:
                continue
            new = self.new_shape(key, rem)
            if new is None or len(shape_args) != len(new):
                bad.append((t.node, f"'{t.node}' has shape arguments that cannot be remapped"))
                continue
            for a, want in zip(shape_args, new):
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
        if not isinstance(a, torch.fx.Node):
            if isinstance(a, (list, tuple)):
                return type(a)(self.eval_int(x, rem) for x in a)
            return a
        if a.op == "call_method" and a.target in ("size", "dim", "numel"):
            x = a.args[0]
            shape = self.new_shape((x.name, -1), rem) if isinstance(x, torch.fx.Node) else None
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
            shape = self.new_shape((x.name, -1), rem)
            if shape is None:
                raise _NoEval
            return torch.Size(shape) if a.args[1] == "shape" else len(shape)
        if a.op == "call_function" and a.target in INT_FUNCTIONS:
            args = [self.eval_int(x, rem) for x in a.args]
            return a.target(*args)
        raise _NoEval

    # -- applying ------------------------------------------------------------------------------
    def keep_of(self, key: tuple[str, int], removed_arr: np.ndarray) -> np.ndarray | None:
        if key not in self.cls_arr:
            return None
        r = removed_arr[self.cls_arr[key]]
        if not r.any():
            return None
        return np.flatnonzero(~r)

    def effective_weight(self, layer: str, pos: np.ndarray) -> np.ndarray:
        """Input slices ``pos`` (dim 1) of the weight as the layer computes with it: through its
        weight fake-quantizer, with 0-bit kernels exactly zero; float64."""
        info = self.infos[layer]
        node = self.nodes[layer]
        w = _get(self.gm, info.weight_attr).detach()
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
        a = _np(w)
        a = np.take(a, pos, axis=1) if a is not None else \
            _take(w, 1, pos).cpu().numpy()
        a = a.astype(np.float64)
        zero = zero_bit_kernels(self.gm, node, info)
        if zero.any():
            a[zero] = 0
        return a

    def apply(self, plan: _Plan) -> None:
        gm = self.gm
        rem = np.zeros(self.ncls, dtype=bool)
        if plan.removed:
            rem[list(plan.removed)] = True
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
            out_keep = self.keep_of((name, -1), rem)
            src = self.consumers.get(name)
            in_keep = self.keep_of((src, -1), rem) if src is not None else None
            if self.kinds[name] == "grouped":
                x = node.args[0] if node.args else node.kwargs.get("input")
                in_keep = self.keep_of((x.name, -1), rem)
            delta = deltas.get(name)
            w = _get(gm, info.weight_attr)
            if out_keep is not None:
                self.update_qmeta(node, info, out_keep)
            if id(w) in done or (out_keep is None and in_keep is None and delta is None):
                continue
            done.add(id(w))
            q = self.weight_quantizer(name)
            track = (q is not None and _observing(q) and getattr(q, "fake_quant_on", True)
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
                keep = self.keep_of((node_name, -1), rem)
                mod = gm.get_submodule(str(node.target))
                if keep is None or id(mod) in done:
                    continue
                done.add(id(mod))
                old = mod.num_features
                for attr in ("running_mean", "running_var", "weight", "bias"):
                    t = getattr(mod, attr, None)
                    if isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == old:
                        _set_tensor(mod, attr, _take(t, 0, keep))
                mod.num_features = len(keep)
            elif kind == "split":
                x = node.args[0] if node.args else node.kwargs.get("input")
                keep = self.keep_of((x.name, -1), rem)
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
                new = self.new_shape(key, rem)
                old = _tensor_meta_shape(node, -1)
                self.rewrite_shape_args(node, old, new)
        for node_name, attr, dim in self.cg.params:
            keep = self.keep_of((node_name, -1), rem)
            if keep is None:
                continue
            owner, a = _resolve(gm, attr)
            t = getattr(owner, a)
            if id(t) in done:
                continue
            _set_tensor(owner, a, _take(t, dim, keep))
            done.add(id(getattr(owner, a)))
            if isinstance(owner, nn.PReLU):
                owner.num_parameters = len(keep)
            for n in gm.graph.nodes:
                if n.op == "get_attr" and n.target == attr:
                    n.meta["tensor_meta"] = _tensor_meta_of(getattr(owner, a))
        self.update_shapes(rem)

    def keep_quantized_weights(self, name: str, info: LayerInfo, q: nn.Module,
                               q_old: torch.Tensor, out_keep: np.ndarray | None,
                               in_keep: np.ndarray | None) -> None:
        """A weight quantizer that keeps observing re-derives its ranges from the pruned weight;
        when that would change the kept kernels' quantized values, freeze it at the ranges it
        had (observer off) so the pruned graph computes exactly what the unpruned one did."""
        expect = q_old
        if out_keep is not None:
            expect = _take(expect, 0, out_keep)
        if in_keep is not None:
            expect = _take(expect, 1, in_keep)
        w_new = _get(self.gm, info.weight_attr).detach()
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
        gm = self.gm
        grouped = self.kinds[node.name] == "grouped"
        w = _get(gm, info.weight_attr)
        new_w = w.detach()
        old_out = info.out_channels
        if out_keep is not None:
            new_w = _take(new_w, 0, out_keep)
        if in_keep is not None and not grouped:
            new_w = _take(new_w, 1, in_keep)
        if new_w is w or new_w._base is w or new_w.data_ptr() == w.data_ptr():
            new_w = new_w.clone()
        bias = _get(gm, info.bias_attr) if info.bias_attr else None
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
            new_b = _take(b, 0, out_keep) if out_keep is not None else b
            if folds is not None and out_keep is not None:
                folds = (_take(folds[0], 0, out_keep), _take(folds[1], 0, out_keep))
        new_groups = info.groups
        if grouped and out_keep is not None:
            ob = old_out // info.groups
            kept_groups = len(set((out_keep // ob).tolist()))
            new_groups = kept_groups
        owner, wattr = _resolve(gm, info.weight_attr)
        _set_tensor(owner, wattr, new_w)
        if mod is not None:
            if new_b is not None:
                if mod.bias is None:
                    mod.bias = nn.Parameter(new_b, requires_grad=mod.weight.requires_grad)
                else:
                    _set_tensor(mod, "bias", new_b)
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
                wn.meta["tensor_meta"] = _tensor_meta_of(new_w)
                wn = wn.args[0]
            if isinstance(wn, torch.fx.Node):
                wn.meta["tensor_meta"] = _tensor_meta_of(new_w)
            if new_b is not None:
                if info.bias_attr is not None:
                    bo, ba = _resolve(gm, info.bias_attr)
                    _set_tensor(bo, ba, new_b)
                    for n in gm.graph.nodes:
                        if n.op == "get_attr" and n.target == info.bias_attr:
                            n.meta["tensor_meta"] = _tensor_meta_of(new_b)
                else:
                    self.add_functional_bias(node, info, new_b)
            if grouped and new_groups != info.groups:
                if len(node.args) > 6:
                    node.args = (*node.args[:6], new_groups, *node.args[7:])
                else:
                    node.kwargs = {**node.kwargs, "groups": new_groups}

    def add_functional_bias(self, node: torch.fx.Node, info: LayerInfo, b: torch.Tensor) -> None:
        owner, wattr = _resolve(self.gm, info.weight_attr)
        base = (wattr[: -len("weight")] + "bias") if wattr.endswith("weight") else wattr + "_bias"
        name, i = base, 0
        while hasattr(owner, name):
            i += 1
            name = f"{base}_{i}"
        owner.register_parameter(name, nn.Parameter(b,
                                                    requires_grad=_get(self.gm, info.weight_attr)
                                                    .requires_grad))
        prefix = info.weight_attr.rpartition(".")[0]
        qual = f"{prefix}.{name}" if prefix else name
        with self.gm.graph.inserting_before(node):
            bn = self.gm.graph.get_attr(qual)
        bn.meta["tensor_meta"] = _tensor_meta_of(b)
        if len(node.args) > 2:
            node.args = (*node.args[:2], bn, *node.args[3:])
        else:
            node.kwargs = {**node.kwargs, "bias": bn}

    def update_qmeta(self, node: torch.fx.Node, info: LayerInfo, keep: np.ndarray) -> None:
        q = get_qmeta(node)
        old_c = info.out_channels
        orig_alive = sorted(set(range(old_c + len(q.pruned_channels))) - set(q.pruned_channels))
        removed_now = sorted(set(range(old_c)) - set(keep.tolist()))
        pruned = tuple(sorted(set(q.pruned_channels) | {orig_alive[k] for k in removed_now}))
        changes: dict[str, Any] = {"pruned_channels": pruned}
        if q.weight is not None:
            changes["weight"] = _slice_spec(q.weight, keep, old_c)
        update_qmeta(node, origin=PASS_NAME, **changes)

    def update_shapes(self, rem: np.ndarray) -> None:
        for key, t in self.tensors.items():
            if not rem[self.cls_arr[key]].any():
                continue
            node = self.nodes[key[0]]
            new = self.new_shape(key, rem)
            tm = node.meta.get("tensor_meta")
            if new is None or tm is None:
                continue
            if key[1] >= 0:
                if isinstance(tm, (list, tuple)) and not hasattr(tm, "shape"):
                    items = list(tm)
                    items[key[1]] = _with_shape(items[key[1]], new)
                    node.meta["tensor_meta"] = type(tm)(items) if isinstance(tm, tuple) else items
            else:
                node.meta["tensor_meta"] = _with_shape(tm, new)
        # the transient nodes of view chains (transpose/contiguous of split blocks) are tracked
        # too, so every tensor whose channels changed has its new shape now


def _shape_args(node: torch.fx.Node) -> list[Any] | None:
    if node.op == "call_method" and node.target in ("view", "reshape"):
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            return list(rest[0])
        return rest
    if node.op == "call_function" and node.target is torch.reshape:
        s = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
        return list(s) if isinstance(s, (list, tuple)) else None
    return None


def _observing(mod: nn.Module) -> bool:
    if hasattr(mod, "observing"):
        return bool(mod.observing)
    obs = getattr(mod, "observer_enabled", None)
    if isinstance(obs, torch.Tensor):
        return bool(obs.reshape(-1)[0])
    return False


def _slice_spec(spec: QuantSpec, keep: np.ndarray, old_c: int) -> QuantSpec:
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
    """Shrink a weight quantizer's per-output-channel state (duck typing, see module doc)."""
    idx = torch.as_tensor(keep, dtype=torch.long)
    if hasattr(q, "prune_channels"):
        q.prune_channels(idx)
        return
    for name, t in list(q.named_parameters(recurse=False)) + list(q.named_buffers(recurse=False)):
        if t.dim() >= 1 and t.shape[0] == old_c:
            _set_tensor(q, name, _take(t, 0, keep))
    for attr in ("num_channels", "num_features", "out_channels"):
        if getattr(q, attr, None) == old_c and not isinstance(getattr(q, attr), bool):
            setattr(q, attr, len(keep))
    q.load_state_dict(q.state_dict())   # runs the module's load hooks: refreshes derived caches


# ------------------------------------------------------------------------------------------------


@register_pass
class PruneZeroBitChannels(Pass):
    """Physically remove channels whose weight bit-width is 0 in every coupled producer.

    Uses the ``channel-groups`` analysis. A channel class is removed when all its producer
    kernels have 0 bits, nothing unsupported touches it, the constant it carries (the producers'
    biases through BN/activations/adds...) is zero at its consumers or folds into their biases
    exactly (``mode=exact``: linear and unpadded conv consumers; ``mode=fold-constant``: padded
    convs too, with the measured deviation reported), and no tensor is left without channels.
    Shrinks weights, biases, BatchNorm, quantizer state, QMeta (per-kernel bits, scales,
    ``pruned_channels`` as original indices) and shapes.

    Requires: -. Establishes: -. Preserves: nothing.

    Statistics: ``num_zero_bit_kernels``, ``num_channels_removed``, ``num_layers_pruned``,
    ``num_kept_partial``, ``num_kept_unsupported``, ``num_kept_inexact``, ``num_kept_last``,
    ``num_kept_shape``, ``num_kept_quantizer``, ``num_constants_folded``, ``num_approx_folds``
    (kernels counted; a kept channel's 0-bit kernels go to the first reason found).

    Example: graph(fold-batch-norm,annotate-bitwidths{granularity=kernel},prune-zero-bit-channels)

    Rationale:
    - Only channels that are 0-bit in every coupled producer are removed: a residual add or a
      concat couples producers, and one live producer keeps the channel alive.
    - A 0-bit kernel still adds its bias; removing the channel is only exact when that constant
      is accounted for, so kept channels are listed with the reason in
      ``gm.meta["qpasses.prune_log"]``.
    - A graph without 0-bit kernels is left unchanged with a warning, not an error.
    """
    name = PASS_NAME
    summary = "remove channels whose weights have 0 bits in every coupled producer"
    Options = PruneOptions
    preserves = PreservedAnalyses.none()

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        inputs = getattr(ctx, "example_inputs", None)
        if not any("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "placeholder"):
            if not inputs:
                raise InputError(f"{PASS_NAME}: the graph has no shape information (tensor_meta):"
                                 " trace the model with qpasses.trace(model, example_inputs), or "
                                 "pass PassContext(example_inputs=...) to propagate shapes")
            _propagate(gm, inputs)
        with no_gc():
            cg: ChannelGroups = am.get("channel-groups", gm)
            pruner = _Pruner(gm, cg, self.options.mode, ctx)
            plan = pruner.plan()
        stats = _stats(plan, pruner.why_kind)
        log = gm.meta.setdefault(PRUNE_LOG_KEY, [])
        if plan.n_zero == 0:
            note = ("no layer has 0-bit kernels (no per-kernel weight bit-widths with zeros): "
                    "nothing to prune. Annotate per-kernel bits first, e.g. "
                    "annotate-bitwidths{granularity=kernel} with 0 in a per-kernel list, or a "
                    "search pass that can choose 0 bits")
            warnings.warn(f"{PASS_NAME}: {note}", UserWarning, stacklevel=2)
            log.append({"layer": None, "mode": self.options.mode, "note": note,
                        "max_deviation": None})
            return PassResult(modified=False, stats=stats)
        reference = None
        approx = any(not ex for items in plan.folds.values() for _, _, ex in items)
        if inputs and plan.removed:
            _check_inputs(gm, inputs)       # before anything changes
        if plan.removed and approx and inputs:
            reference = copy.deepcopy(gm)
        entries = _log_entries(pruner, plan, self.options.mode)
        if plan.removed:
            with no_gc():
                pruner.apply(plan)
            gm.graph.lint()
            gm.recompile()
            if inputs:
                _propagate(gm, inputs)
        max_dev = _deviation(reference, gm, inputs) if reference is not None else None
        log.extend(entries)
        run_rec: dict[str, Any] = {"layer": None, "mode": self.options.mode,
                                   "max_deviation": max_dev,
                                   "note": None if plan.removed else
                                   "0-bit kernels found but no channel could be removed (see "
                                   "the kept reasons)"}
        if pruner.frozen:
            run_rec["frozen_weight_quantizers"] = list(pruner.frozen)
            run_rec["note"] = (f"weight quantizers of {len(pruner.frozen)} layer(s) lost input "
                               "channels holding their range: frozen at their pre-pruning "
                               "ranges (observer off) so outputs are unchanged; "
                               "qpasses.modules.fake_quant.set_observing(gm, True, activations=False) "
                               "lets them track the weights again")
        if pruner.inexact_quantizers:
            run_rec["inexact_weight_quantizers"] = list(pruner.inexact_quantizers)
            warnings.warn(f"{PASS_NAME}: the weight quantizers of "
                          f"{', '.join(pruner.inexact_quantizers[:5])} quantize the pruned "
                          "weights differently and could not be frozen", UserWarning,
                          stacklevel=2)
        if approx and max_dev is None and plan.removed:
            run_rec["note"] = ("approximate folds into padded convolutions; pass "
                               "PassContext(example_inputs=...) to measure the deviation")
        log.append(run_rec)
        if getattr(ctx, "statistics", False):
            ctx.stream.write(format_prune_log(entries + [run_rec]) + "\n")
        return PassResult(modified=bool(plan.removed), stats=stats)


def _check_inputs(gm: torch.fx.GraphModule, inputs: Any) -> None:
    """Example inputs must fit the graph's placeholders (any batch size)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) > len(placeholders):
        raise InputError(f"{PASS_NAME}: PassContext.example_inputs has {len(inputs)} tensors but "
                         f"the graph takes {len(placeholders)} inputs")
    for x, ph in zip(inputs, placeholders):
        tm = ph.meta.get("tensor_meta")
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{PASS_NAME}: example input for '{ph.name}' is a "
                             f"{type(x).__name__}, expected a tensor")
        if hasattr(tm, "shape") and (x.dim() != len(tm.shape)
                                     or tuple(x.shape[1:]) != tuple(tm.shape[1:])):
            raise InputError(f"{PASS_NAME}: example input for '{ph.name}' has shape "
                             f"{list(x.shape)}, the graph was traced with {list(tm.shape)} (only "
                             "the batch size may differ); pass inputs of the traced shape")


def _propagate(gm: torch.fx.GraphModule, inputs: Any) -> None:
    """Shape propagation on example inputs, on a copy when quantizers/observers would record
    the run (so pruning never calibrates anything)."""
    stateful = any(_observing(m) for m in gm.modules())
    if not stateful:
        propagate_shapes(gm, inputs)
        return
    twin = copy.deepcopy(gm)
    propagate_shapes(twin, inputs)
    metas = {n.name: n.meta.get("tensor_meta") for n in twin.graph.nodes}
    for n in gm.graph.nodes:
        if metas.get(n.name) is not None:
            n.meta["tensor_meta"] = metas[n.name]


def _deviation(reference: torch.fx.GraphModule, gm: torch.fx.GraphModule, inputs: Any) -> float:
    def run(m: torch.fx.GraphModule) -> list[torch.Tensor]:
        m = copy.deepcopy(m)
        with torch.no_grad():
            out = m(*inputs)
        flat: list[torch.Tensor] = []
        torch.utils._pytree.tree_map(lambda t: flat.append(t) if isinstance(t, torch.Tensor)
                                     else None, out)
        return flat
    try:
        a, b = run(reference), run(gm)
    except Exception as e:  # noqa: BLE001 - inputs that do not fit are the user's mistake
        raise InputError(f"{PASS_NAME}: running the graph on PassContext.example_inputs to "
                         f"measure the fold-constant deviation failed: {type(e).__name__}: {e}")
    return float(max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))) \
        if a else 0.0


def _stats(plan: _Plan, why_kind: dict[int, str]) -> dict[str, int]:
    cg = plan.cg
    kinds = dict.fromkeys(("partial", "unsupported", "inexact", "last", "shape", "quantizer"), 0)
    for c in plan.kept_reason:
        n = sum(1 for n, i in cg.class_producers[c] if n in plan.zero and plan.zero[n][i])
        kinds[why_kind.get(c, "inexact")] += n
    removed = sum(len(cg.class_producers[c]) for c in plan.removed)
    layers = {n for c in plan.removed for n, _ in cg.class_producers[c]}
    folds = sum(len(v) for v in plan.folds.values())
    approx = sum(1 for v in plan.folds.values() for _, _, ex in v if not ex)
    return {"num_zero_bit_kernels": plan.n_zero, "num_channels_removed": removed,
            "num_layers_pruned": len(layers), "num_kept_partial": kinds["partial"],
            "num_kept_unsupported": kinds["unsupported"], "num_kept_inexact": kinds["inexact"],
            "num_kept_last": kinds["last"], "num_kept_shape": kinds["shape"],
            "num_kept_quantizer": kinds["quantizer"], "num_constants_folded": folds,
            "num_approx_folds": approx}


def _log_entries(pruner: _Pruner, plan: _Plan, mode: str) -> list[dict[str, Any]]:
    """Per producer layer: removed and kept 0-bit channels as ORIGINAL indices (call before
    apply: QMeta.pruned_channels still holds only earlier runs' removals)."""
    out = []
    for name, info in pruner.infos.items():
        zero = plan.zero.get(name)
        key = (name, -1)
        if zero is None or key not in pruner.cls_arr:
            continue
        cls = pruner.cls_arr[key]
        removed_now = [j for j in range(len(cls)) if int(cls[j]) in plan.removed]
        kept = [(j, plan.kept_reason.get(int(cls[j]), "kept")) for j in np.flatnonzero(zero)
                if int(cls[j]) not in plan.removed]
        if not removed_now and not kept:
            continue
        pruned = get_qmeta(pruner.nodes[name]).pruned_channels
        alive = sorted(set(range(len(cls) + len(pruned))) - set(pruned))
        out.append({"layer": info.name, "node": name, "mode": mode,
                    "removed": [alive[j] for j in removed_now],
                    "kept": [{"channel": alive[int(j)], "reason": r} for j, r in kept]})
    return out


def format_prune_log(entries: list[dict[str, Any]]) -> str:
    lines = [f"{PASS_NAME}:"]
    for e in entries:
        if e.get("layer") is None:
            if e.get("max_deviation") is not None:
                lines.append(f"  max deviation on example inputs (fold-constant): "
                             f"{e['max_deviation']:.3g}")
            if e.get("note"):
                lines.append(f"  note: {e['note']}")
            continue
        lines.append(f"  {e['layer']}: removed {len(e['removed'])}, kept {len(e['kept'])} "
                     "0-bit")
        for k in e["kept"][:3]:
            lines.append(f"    kept channel {k['channel']}: {k['reason']}")
        if len(e["kept"]) > 3:
            lines.append(f"    ... {len(e['kept']) - 3} more kept")
    return "\n".join(lines)
