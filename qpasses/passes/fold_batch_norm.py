"""fold-batch-norm: fold eval-mode BatchNorm into the preceding convolution or linear layer."""
from __future__ import annotations

from collections import Counter

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from passes_registry import (Pass, PassFailure, PassResult, PreservedAnalyses, register_pass,
                             register_property)

from qpasses.ir.fx import (add_tensor_attr, bind, get_attr_value, replace_tensor_attr, resolve_attr,
                           set_arg, node_shape, tensor_meta_for, tensor_use_counts)

# --------------------------------------------------------------------------------------------
# What counts as a BatchNorm and as a foldable producer

_BN_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward}
_BN_F_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
               "eps")
_BN_F_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
_BN_T_NAMES = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
               "eps", "cudnn_enabled")

# stock layer class -> kind (subclasses count only if they keep the stock forward)
_LAYER_MODULES: dict[type, str] = {
    nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv",
    nn.ConvTranspose1d: "conv_transpose", nn.ConvTranspose2d: "conv_transpose",
    nn.ConvTranspose3d: "conv_transpose", nn.Linear: "linear",
}
_CONV_F_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_F_NAMES = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
                  "dilation")
_LINEAR_F_NAMES = ("input", "weight", "bias")
_LAYER_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {
    F.conv1d: ("conv", _CONV_F_NAMES), F.conv2d: ("conv", _CONV_F_NAMES),
    F.conv3d: ("conv", _CONV_F_NAMES), torch.conv1d: ("conv", _CONV_F_NAMES),
    torch.conv2d: ("conv", _CONV_F_NAMES), torch.conv3d: ("conv", _CONV_F_NAMES),
    F.conv_transpose1d: ("conv_transpose", _CONVT_F_NAMES),
    F.conv_transpose2d: ("conv_transpose", _CONVT_F_NAMES),
    F.conv_transpose3d: ("conv_transpose", _CONVT_F_NAMES),
    torch.conv_transpose1d: ("conv_transpose", _CONVT_F_NAMES),
    torch.conv_transpose2d: ("conv_transpose", _CONVT_F_NAMES),
    torch.conv_transpose3d: ("conv_transpose", _CONVT_F_NAMES),
    F.linear: ("linear", _LINEAR_F_NAMES),
}


def _layer_module_kind(mod: nn.Module) -> str | None:
    """'conv' / 'conv_transpose' / 'linear' for a stock layer (forward not overridden)."""
    for base, kind in _LAYER_MODULES.items():
        if isinstance(mod, base):
            # A subclass that overrides forward (weight standardisation, QAT fake-quant...) may
            # not compute x @ W + b with the stored weight: folding into it would be wrong.
            cls = type(mod)
            if cls.forward is not base.forward:
                return None
            if hasattr(base, "_conv_forward") and cls._conv_forward is not base._conv_forward:
                return None
            return kind
    return None


@dataclass(frozen=True)
class _BatchNorm:
    node: torch.fx.Node
    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    training: bool
    tensors: tuple[torch.fx.Node, ...]   # get_attr inputs of a functional BN (cleanup)


@dataclass(frozen=True)
class _Layer:
    node: torch.fx.Node
    kind: str                            # conv / conv_transpose / linear
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    set_weight: Callable[[torch.Tensor], None]
    set_bias: Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class Candidate:
    """A BatchNorm the pass folds, and the layer it folds into."""
    bn: _BatchNorm
    layer: _Layer


def _is_bn(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        mod = _submodule(gm, node)
        return isinstance(mod, nn.modules.batchnorm._BatchNorm)
    return node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm)


def _submodule(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    try:
        return gm.get_submodule(str(node.target))
    except AttributeError:
        return None


def _bn_params(gm: torch.fx.GraphModule, node: torch.fx.Node) -> _BatchNorm | str:
    """The statistics of a BatchNorm node, or why they cannot be read as constants."""
    if node.op == "call_module":
        mod = _submodule(gm, node)
        if type(mod).forward not in _BN_FORWARDS:
            return f"{type(mod).__name__} overrides forward"
        if mod.running_mean is None or mod.running_var is None:
            return "it has no running statistics (track_running_stats=False): it always " \
                   "normalizes with batch statistics"
        if len(node.args) != 1 or node.kwargs:
            return "unexpected call arguments"
        return _BatchNorm(node, mod.running_mean, mod.running_var, mod.weight, mod.bias,
                          float(mod.eps), bool(mod.training), ())
    if node.target is F.batch_norm:
        a = bind(node, _BN_F_NAMES, _BN_F_DEFAULTS)
    else:
        a = bind(node, _BN_T_NAMES)
    if a is None:
        return "unexpected call arguments"
    vals = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        if a[key] is None and key in ("weight", "bias"):
            vals[key] = None
            continue
        v = get_attr_value(gm, a[key])
        if not isinstance(v, torch.Tensor):
            return f"its {key} is not a constant tensor attribute"
        vals[key] = v
    if not isinstance(a["training"], bool) or not isinstance(a["eps"], (int, float)):
        return "its training flag or eps is not a constant"
    tensors = tuple(a[k] for k in ("running_mean", "running_var", "weight", "bias")
                    if isinstance(a[k], torch.fx.Node))
    return _BatchNorm(node, vals["running_mean"], vals["running_var"], vals["weight"],
                      vals["bias"], float(a["eps"]), a["training"], tensors)


def _layer(gm: torch.fx.GraphModule, node: Any, counts: dict[int, int]) -> _Layer | str:
    """The conv/linear producing a BatchNorm's input, or why it cannot absorb the BatchNorm."""
    if not isinstance(node, torch.fx.Node):
        return "its input is not a graph value"
    if node.op == "call_module":
        mod = _submodule(gm, node)
        kind = _layer_module_kind(mod) if mod is not None else None
        if kind is None:
            return f"its input '{node.name}' is not a convolution or linear layer"
        weight, bias, groups = mod.weight, mod.bias, int(getattr(mod, "groups", 1))

        def set_weight(t: torch.Tensor) -> None:
            replace_tensor_attr(mod, "weight", t)

        def set_bias(t: torch.Tensor) -> None:
            if mod.bias is None:
                mod.bias = nn.Parameter(t, requires_grad=mod.weight.requires_grad)
            else:
                replace_tensor_attr(mod, "bias", t)
    elif node.op == "call_function" and node.target in _LAYER_FUNCTIONS:
        kind, names = _LAYER_FUNCTIONS[node.target]
        a = bind(node, names, {k: None for k in names[2:]})
        if a is None:
            return f"its input '{node.name}' has unexpected call arguments"
        weight = get_attr_value(gm, a["weight"])
        if not isinstance(weight, torch.Tensor):
            return f"the weight of '{node.name}' is not a constant tensor attribute"
        bias = None
        if a["bias"] is not None:
            bias = get_attr_value(gm, a["bias"])
            if not isinstance(bias, torch.Tensor):
                return f"the bias of '{node.name}' is not a constant tensor attribute"
        groups = a.get("groups")
        groups = 1 if groups is None else groups
        if not isinstance(groups, int):
            return f"the groups of '{node.name}' is not a constant"
        wnode, bnode = a["weight"], a["bias"]

        def set_weight(t: torch.Tensor) -> None:
            owner, attr, _ = resolve_attr(gm, str(wnode.target))
            replace_tensor_attr(owner, attr, t)

        def set_bias(t: torch.Tensor) -> None:
            if bnode is not None:
                owner, attr, _ = resolve_attr(gm, str(bnode.target))
                replace_tensor_attr(owner, attr, t)
                return
            owner, wattr, _ = resolve_attr(gm, str(wnode.target))
            base = wattr[: -len("weight")] + "bias" if wattr.endswith("weight") else wattr + "_bias"
            attr = add_tensor_attr(owner, base, t, like=wattr)
            prefix = str(wnode.target).rpartition(".")[0]
            qual = f"{prefix}.{attr}" if prefix else attr
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr(qual)
            tm = tensor_meta_for(t)
            if tm is not None:
                new.meta["tensor_meta"] = tm
            set_arg(node, names, "bias", new)
    else:
        return f"its input '{node.name}' is not a convolution or linear layer"
    if len(node.users) != 1:
        return f"the output of '{node.name}' has other users besides the BatchNorm"
    if counts.get(id(weight), 0) != 1 or (bias is not None and counts.get(id(bias), 0) != 1):
        return f"the weights of '{node.name}' are shared with another part of the graph"
    shape = node_shape(node)
    if shape is None:
        return f"'{node.name}' has no shape information (trace the model with qpasses.trace)"
    # BatchNorm normalizes dim 1: that must be the layer's output-feature dimension.
    want_rank = 2 if kind == "linear" else weight.dim()
    if len(shape) != want_rank:
        return (f"the output of '{node.name}' has shape {list(shape)}: BatchNorm's channel "
                "dimension (1) is not the layer's output-feature dimension")
    if weight.dim() < 2 or not weight.is_floating_point():
        return f"the weight of '{node.name}' is not a floating-point matrix/kernel"
    return _Layer(node, kind, weight, bias, groups, set_weight, set_bias)


def analyze(gm: torch.fx.GraphModule) -> tuple[list[Candidate], dict[str, str]]:
    """BatchNorms that can be folded, and every other BatchNorm node with the reason it cannot.

    Training-mode BatchNorms are included as candidates; the pass decides what to do with them.
    """
    counts = tensor_use_counts(gm)
    candidates: list[Candidate] = []
    unfoldable: dict[str, str] = {}
    for node in gm.graph.nodes:
        if not _is_bn(gm, node):
            continue
        bn = _bn_params(gm, node)
        if isinstance(bn, str):
            unfoldable[node.name] = bn
            continue
        layer = _layer(gm, node.args[0] if node.args else node.kwargs.get("input"), counts)
        if isinstance(layer, str):
            unfoldable[node.name] = layer
            continue
        n_out = layer.weight.shape[1] * layer.groups if layer.kind == "conv_transpose" \
            else layer.weight.shape[0]
        if bn.mean.numel() != n_out or bn.var.numel() != n_out:
            unfoldable[node.name] = (f"its {bn.mean.numel()} channels do not match the "
                                     f"{n_out} outputs of '{layer.node.name}'")
            continue
        candidates.append(Candidate(bn, layer))
    return candidates, unfoldable


# --------------------------------------------------------------------------------------------
# The arithmetic (vectorized, float64)

_BLOCK_ELEMENTS = 1 << 16  # float64 working set per step: 512 KiB


def fold_weights(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor,
                 var: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                 eps: float, kind: str = "conv", groups: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') with ``layer(x; W', b') == bn(layer(x; W, b))`` for eval-mode BatchNorm.

    ``s = gamma / sqrt(var + eps)``; ``W' = W * s`` per output channel (dim 0, or dim 1 per group
    for transposed convolutions); ``b' = (b - mean) * s + beta``. Computed in float64, returned
    in the weight's dtype (the bias in the bias's dtype, or the weight's when it had none).
    """
    f64 = dict(dtype=torch.float64, device="cpu")
    c = mean.numel()
    s = torch.rsqrt(var.detach().to(**f64).reshape(c) + eps)
    if gamma is not None:
        s = s * gamma.detach().to(**f64).reshape(c)
    b = bias.detach().to(**f64).reshape(c) if bias is not None else torch.zeros(c, **f64)
    new_b = (b - mean.detach().to(**f64).reshape(c)) * s
    if beta is not None:
        new_b = new_b + beta.detach().to(**f64).reshape(c)
    b_dtype = bias.dtype if bias is not None else weight.dtype
    new_b = new_b.to(dtype=b_dtype, device=weight.device)
    src = weight.detach().to(device="cpu").contiguous()
    if kind == "conv_transpose":
        # weight: (in, out/groups, *k); output channel g*(out/groups)+j sits at [g-th block, j]
        cin, cpg, k = src.shape[0], src.shape[1], src.shape[2:]
        w = src.to(torch.float64, copy=True).view(groups, cin // groups, cpg, *k)
        w.mul_(s.view(groups, 1, cpg, *([1] * len(k))))
        return w.view(src.shape).to(dtype=weight.dtype, device=weight.device), new_b
    # W' = W * s per output channel (dim 0), in float64, over blocks of whole output channels
    # so the float64 temporaries stay in cache (the weights of big models are GBs).
    out = torch.empty_like(src)
    w2, o2 = src.view(c, -1), out.view(c, -1)
    if src.dtype in (torch.float32, torch.float64):
        # numpy's mixed-type loop: each product in float64, rounded once into the output's
        # dtype, through small cast buffers; the same values as the blocks below, 2-3x faster
        np.multiply(w2.numpy(), s.numpy()[:, None], out=o2.numpy(), casting="same_kind")
        return out.to(device=weight.device), new_b
    rows = max(1, _BLOCK_ELEMENTS // max(1, w2.shape[1]))
    for i in range(0, c, rows):
        o2[i:i + rows] = w2[i:i + rows].to(torch.float64) * s[i:i + rows, None]
    return out.to(device=weight.device), new_b


# --------------------------------------------------------------------------------------------


@register_pass
class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the preceding conv/linear.

    A BatchNorm1d/2d/3d (module, ``F.batch_norm`` or ``torch.batch_norm`` with constant
    statistics) whose input is the only use of a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear
    (module, or ``F.conv*``/``F.conv_transpose*``/``F.linear`` with constant weights) is removed
    and its affine transform is folded into that layer's weight and bias (a bias is created when
    the layer had none). New parameter objects are assigned; the old tensors are never written.
    BatchNorms that cannot be folded stay in the graph and are counted in ``num_unfolded``.

    Requires: -. Establishes: bn-folded. Preserves: nothing.

    Statistics: ``num_folded``, ``num_unfolded``, ``num_bias_created``.

    Example: graph(fold-batch-norm)

    Rationale:
    - A training-mode BatchNorm normalizes with batch statistics; folding its running statistics
      changes the model, so it is refused unless ``use-running-stats`` says that is intended.
    - The layer's output must have no other user: the other user needs the un-normalized value.
    - The layer's weights must not be shared (module called twice, tied or re-read weights):
      rewriting them would change the other uses.
    - Only stock layers are folded: a subclass overriding forward may not compute x·W + b.
    - A Linear is folded only when its output is 2-D, where BatchNorm's channel dimension (1)
      is the feature dimension; a conv only when its output is batched.
    - BatchNorm with ``track_running_stats=False`` always uses batch statistics: never folded.
    """
    name = "fold-batch-norm"
    summary = "Fold eval-mode BatchNorm into the preceding conv/linear"

    @dataclass(frozen=True)
    class Options:
        use_running_stats: bool = field(default=False, metadata={
            "help": "also fold training-mode BatchNorms, using their running statistics "
                    "(otherwise a training-mode BatchNorm that could be folded is an error)"})

    establishes = frozenset({"bn-folded"})
    preserves = PreservedAnalyses.none()

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        candidates, unfoldable = analyze(gm)
        if not self.options.use_running_stats:
            for cand in candidates:
                if cand.bn.training:
                    raise PassFailure(
                        "BatchNorm is in training mode: it normalizes with batch statistics, so "
                        "folding its running statistics would change the model's outputs. Put "
                        "the model in eval mode before tracing (model.eval()), or pass "
                        "use-running-stats=true to fold the running statistics anyway",
                        node=cand.bn.node.name)
        graph = gm.graph
        bias_created = 0
        # modules and attributes the graph references (kept current as nodes are erased), so
        # that each unreferenced-BatchNorm check does not walk the whole graph
        refs = Counter(str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr"))
        for cand in candidates:
            bn, layer = cand.bn, cand.layer
            w, b = fold_weights(layer.weight, layer.bias, bn.mean, bn.var, bn.weight, bn.bias,
                                bn.eps, layer.kind, layer.groups)
            layer.set_weight(w)
            layer.set_bias(b)
            bias_created += layer.bias is None
            bn.node.replace_all_uses_with(layer.node)
            _erase(graph, bn.node, refs)
            for t in bn.tensors:
                if not t.users:
                    _erase(graph, t, refs)
            if bn.node.op == "call_module":
                _delete_if_unreferenced(gm, str(bn.node.target), refs)
        return PassResult(modified=bool(candidates),
                          stats={"num_folded": len(candidates),
                                 "num_unfolded": len(unfoldable),
                                 "num_bias_created": int(bias_created)})


def _erase(graph: torch.fx.Graph, node: torch.fx.Node, refs: Counter) -> None:
    graph.erase_node(node)
    if node.op in ("call_module", "get_attr"):
        refs[str(node.target)] -= 1


def _delete_if_unreferenced(gm: torch.fx.GraphModule, target: str, refs: Counter) -> None:
    """Delete submodule ``target`` unless a node still references it, a part of it or a module
    containing it (``refs``: how many nodes reference each target)."""
    for t, count in refs.items():
        if count > 0 and (t == target or t.startswith(target + ".")
                          or target.startswith(t + ".")):
            return
    gm.delete_submodule(target)


def check_bn_folded(gm: torch.fx.GraphModule) -> list[str]:
    """Checker of ``bn-folded``: every BatchNorm that directly follows a foldable layer."""
    candidates, _ = analyze(gm)
    return [f"BatchNorm '{c.bn.node.name}' directly follows '{c.layer.node.name}' and can be "
            "folded into it" for c in candidates]


__all__ = ["Candidate", "FoldBatchNorm", "analyze", "check_bn_folded", "fold_weights"]


register_property("bn-folded", check_bn_folded,
                  summary="no BatchNorm directly follows a conv/linear it could be folded into")
