"""The one cost model: BitOPs and model size of a graph under explicit conventions.

Every consumer of costs goes through this module: the ``bitops`` / ``model-size`` analyses (and so
``qpasses.report`` and ``print<bitops>``), ``solve-bitwidths`` (candidate costs and budgets) and
the search penalties (FracBits, GMPQ), which call :func:`model_bitops` / :func:`model_size_bits`
with real-valued, trainable bit-widths λ and get a differentiable torch scalar. The per-layer
arithmetic is :mod:`qpasses.numerics.costs`; this module adds the graph (which layers, which
shapes, which channels are pruned) and the model-level conventions (docs/algorithms.md,
"Cost accounting"), all of them explicit fields of :class:`CostConventions`:

* BitOPs of a layer: ``Σ_k MACs_k · w_k · a`` over output kernels k (FracBits Eq. 4-5), where
  ``MACs_k`` counts only *alive* input channels (below) and ``w_k = 0`` for pruned kernels.
* The first layers' input counts as ``first_input_bits`` (8, FracBits: the image is not quantized
  but counted as 8-bit) whenever the layer is quantized at all. The last layer needs no special
  rule: annotate-bitwidths pins its *weights* to 8 and leaves its input searched, which is what
  reproduces FracBits' published numbers (counting the FC at 8×8 would not).
* Layers without a bit annotation (and float islands) are counted at ``float_bits`` (32) for both
  weights and input (HAWQ's fp32 convention), so a float model has a comparable total.
* Size: ``Σ_k params_k · w_k + #bias · bias_bits`` (fp32 biases, BN not counted; bytes = bits/8,
  MB = 1e6 bytes).
* ``exclude_first_last`` switches to GMPQ/EdMIPS accounting (stem and classifier excluded from
  BitOPs).

Pruned channels. A producer's output channel is *dead* when its weight bit-width is 0 (a
0-bit kernel: pruning planned but not yet done). A dead channel is a constant (its bias, through
the following activation), which ``prune-zero-bit-channels`` removes or folds into the consumers'
biases, so a consumer's MACs and weights for that input channel are not counted
(``costs.kernel_macs_pruned``). Channels already removed by that pass are gone from the shapes;
``QMeta.pruned_channels`` records their *original* indices and does not enter the costs. Dead
masks are propagated from producer to consumer through channel-wise ops (activations,
batch-norm, pooling, dropout, identity), residual adds (a channel is dead only when it is dead
in every addend) and channel concatenation. Propagation stops (conservatively: everything alive)
at reshapes such as ``flatten`` and at anything else; mapping
channels through reshapes is the ``channel-groups`` analysis' business.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.fx

from passes_registry.suggest import did_you_mean

from qpasses.errors import NumericsError
from qpasses.ir import ops
from qpasses.ir.fx import node_shape
from qpasses.ir.layers import LayerInfo, first_last_layers, quantizable_layers
from qpasses.ir.annotations import QMeta, get_qmeta
from qpasses.numerics import costs

__all__ = [
    "CostConventions", "FRACBITS", "GMPQ", "LayerCost", "BitsMap", "cost_layers",
    "dead_channel_masks", "annotated_bits", "kernel_bitops", "layer_bitops", "kernel_size_bits",
    "layer_size_bits", "model_bitops", "model_size_bits", "has_bit_annotations",
]

#: ``{layer name: bits}``; bits is a number, a 0-d tensor or one entry per output kernel
#: (list/tuple/1-d tensor), real-valued (λ) or integral. A missing name or ``None`` means float.
BitsMap = Mapping[str, Union[int, float, Sequence[Union[int, float]], torch.Tensor, None]]


@dataclass(frozen=True)
class CostConventions:
    """Model-level accounting rules (docs/algorithms.md, "Cost accounting"). The default is FracBits'."""
    first_input_bits: float | None = field(default=8, metadata={
        "help": "bits the first layers' input counts as when the layer is quantized (FracBits: "
                "8, the image is unquantized but counted as 8-bit); None uses the annotation"})
    float_bits: int = field(default=32, metadata={
        "help": "bits of weights and inputs of layers without a bit annotation (fp32)"})
    bias_bits: int = field(default=32, metadata={"help": "bits per stored bias element"})
    exclude_first_last: bool = field(default=False, metadata={
        "help": "GMPQ/EdMIPS: the first and last layers are left out of BitOPs"})
    prune_inputs: bool = field(default=True, metadata={
        "help": "dead (0-bit / pruned) producer channels remove the consumers' input channels"})

    def __post_init__(self) -> None:
        if self.first_input_bits is not None and not self.first_input_bits >= 0:
            raise NumericsError(f"first_input_bits must be >= 0, got {self.first_input_bits}")
        if self.float_bits < 0 or self.bias_bits < 0:
            raise NumericsError("float_bits and bias_bits must be >= 0")


FRACBITS = CostConventions()
GMPQ = CostConventions(first_input_bits=None, exclude_first_last=True)


@dataclass(frozen=True)
class LayerCost:
    """Cost-relevant facts of one quantizable layer: shapes plus which channels are dead."""
    name: str
    node: str
    op: str                                  # LayerInfo.kind: conv2d, conv2d-dw, linear...
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, ...]
    out_spatial: tuple[int, ...]
    has_bias: bool
    first: bool
    last: bool
    in_alive: tuple[bool, ...] | None = None  # None: every input channel alive

    @property
    def fan_in(self) -> int:
        return self.in_channels // self.groups * math.prod(self.kernel_size)

    @property
    def dense_kernel_macs(self) -> int:
        return costs.kernel_macs(self.in_channels, self.groups, self.kernel_size, self.out_spatial)

    @property
    def macs(self) -> int:
        return self.out_channels * self.dense_kernel_macs

    @property
    def params(self) -> int:
        return self.out_channels * self.fan_in + (self.out_channels if self.has_bias else 0)

    @property
    def bias_count(self) -> int:
        return self.out_channels if self.has_bias else 0

    def kernel_macs(self) -> torch.Tensor:
        """MACs of each output kernel counting alive input channels only (int64, ``(C_out,)``)."""
        if self.in_alive is None:
            return torch.full((self.out_channels,), self.dense_kernel_macs, dtype=torch.int64)
        return costs.kernel_macs_pruned(self.in_alive, self.out_channels, self.groups,
                                        self.kernel_size, self.out_spatial)

    def kernel_params(self) -> torch.Tensor:
        """Weights of each output kernel on alive input channels (int64, ``(C_out,)``)."""
        if self.in_alive is None:
            return torch.full((self.out_channels,), self.fan_in, dtype=torch.int64)
        return costs.kernel_macs_pruned(self.in_alive, self.out_channels, self.groups,
                                        self.kernel_size, ())


# ---------------------------------------------------------------------------------------------
# Dead-channel propagation

def _channels(node: Any) -> int | None:
    s = node_shape(node)
    return s[1] if s is not None and len(s) >= 2 else None


def _layer_dead(info: LayerInfo, q: QMeta) -> torch.Tensor | None:
    dead = torch.zeros(info.out_channels, dtype=torch.bool)
    w = q.weight
    if w is not None:
        if w.per_kernel and len(w.bits_per_kernel) == info.out_channels:
            dead |= torch.tensor(w.bits_per_kernel) == 0
        elif w.bits == 0:
            dead[:] = True
    return dead if bool(dead.any()) else None


def _intersect(dead: dict[str, torch.Tensor], n: torch.fx.Node) -> torch.Tensor | None:
    """A residual add's dead channels: dead in every tensor operand."""
    operands = [a for a in list(n.args) + list(n.kwargs.values()) if isinstance(a, torch.fx.Node)]
    masks = [dead.get(a.name) for a in operands]
    if not masks or any(m is None for m in masks) or len({m.numel() for m in masks}) != 1:
        return None
    mask = masks[0]
    for m in masks[1:]:
        mask = mask & m
    return mask if bool(mask.any()) else None


def dead_channel_masks(gm: torch.fx.GraphModule, layers: Sequence[LayerInfo] | None = None
                       ) -> dict[str, torch.Tensor]:
    """``{node name: bool mask over dim 1}`` of provably dead channels (see the module doc)."""
    layers = quantizable_layers(gm) if layers is None else layers
    by_node = {info.node: info for info in layers}
    dead: dict[str, torch.Tensor] = {}
    for n in gm.graph.nodes:
        mask: torch.Tensor | None = None
        first = n.args[0] if n.args else None
        if n.name in by_node:
            info = by_node[n.name]
            if info.is_conv or len(info.out_shape) == 2:
                mask = _layer_dead(info, get_qmeta(n))
        elif n.op == "call_module":
            try:
                mod = gm.get_submodule(str(n.target))
            except AttributeError:
                mod = None
            if isinstance(mod, ops.CHANNELWISE_MODULES) and isinstance(first, torch.fx.Node):
                mask = dead.get(first.name)
        elif n.op == "call_function":
            if n.target in ops.CHANNELWISE_FUNCTIONS and isinstance(first, torch.fx.Node):
                mask = dead.get(first.name)
            elif n.target in ops.ADD_FUNCTIONS:
                mask = _intersect(dead, n)
            elif n.target in ops.CAT_FUNCTIONS:
                tensors = n.args[0] if n.args else n.kwargs.get("tensors", ())
                dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
                out_shape = node_shape(n)
                if out_shape is not None and isinstance(tensors, (list, tuple)) and \
                        isinstance(dim, int) and dim in (1, 1 - len(out_shape)):
                    parts = []
                    for t in tensors:
                        c = _channels(t)
                        if c is None:
                            parts = None
                            break
                        m = dead.get(t.name)
                        parts.append(m if m is not None else torch.zeros(c, dtype=torch.bool))
                    if parts:
                        cat = torch.cat(parts)
                        mask = cat if bool(cat.any()) else None
        elif n.op == "call_method":
            if str(n.target) in ops.CHANNELWISE_METHODS and isinstance(first, torch.fx.Node):
                mask = dead.get(first.name)
            elif str(n.target) in ops.ADD_METHODS:
                mask = _intersect(dead, n)
        if mask is not None and _channels(n) == mask.numel():
            dead[n.name] = mask
    return dead


def cost_layers(gm: torch.fx.GraphModule, conventions: CostConventions = FRACBITS
                ) -> tuple[LayerCost, ...]:
    """The :class:`LayerCost` of every quantizable layer, in graph order."""
    layers = quantizable_layers(gm)
    first, last = first_last_layers(gm, layers)
    dead = dead_channel_masks(gm, layers) if conventions.prune_inputs else {}
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for info in layers:
        node = nodes[info.node]
        x = node.args[0] if node.args else node.kwargs.get("input")
        in_alive = None
        if isinstance(x, torch.fx.Node) and x.name in dead and len(info.in_shape) >= 2 \
                and (info.is_conv or len(info.in_shape) == 2):
            m = dead[x.name]
            if m.numel() == info.in_channels:
                in_alive = tuple(bool(v) for v in (~m).tolist())
        out.append(LayerCost(info.name, info.node, info.kind, info.in_channels, info.out_channels,
                             info.groups, tuple(info.kernel_size), tuple(info.out_spatial),
                             info.has_bias, info.name in first, info.name in last, in_alive))
    return tuple(out)


def has_bit_annotations(gm: torch.fx.GraphModule) -> bool:
    """True when at least one quantizable layer carries a weight/act spec or is a float island."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for info in quantizable_layers(gm):
        q = get_qmeta(nodes[info.node])
        if q.weight is not None or q.act is not None or q.float_island is not None:
            return True
    return False


def annotated_bits(gm: torch.fx.GraphModule) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(w_bits, a_bits)`` maps read from the annotations: per-kernel tuples where the weight
    spec has ``bits_per_kernel``; layers without a spec are left out (float)."""
    w, a = {}, {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for info in quantizable_layers(gm):
        q = get_qmeta(nodes[info.node])
        if q.weight is not None:
            w[info.name] = (q.weight.kernel_bits(info.out_channels) if q.weight.per_kernel
                            else q.weight.bits)
        if q.act is not None:
            a[info.name] = q.act.bits
    return w, a


# ---------------------------------------------------------------------------------------------
# Cost functions (differentiable in real-valued bits)

def _as_bits(v: Any, what: str) -> torch.Tensor:
    t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    if t.dim() > 1:
        raise NumericsError(f"{what} must be a scalar or one entry per output kernel, got shape "
                            f"{tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise NumericsError(f"{what} must be real-valued")
    if not torch.is_floating_point(t):
        t = t.to(torch.int64)
    if bool((t.detach() < 0).any()):
        raise NumericsError(f"{what} must be >= 0 (0 means pruned)")
    return t


def _promote(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(torch.is_floating_point(t) for t in ts) else torch.int64


def _layer_bits(layer: LayerCost, w_bits: BitsMap, a_bits: BitsMap,
                conv: CostConventions) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(per-kernel w (C_out,), scalar a, quantized?) for one layer under the conventions."""
    w = w_bits.get(layer.name)
    a = a_bits.get(layer.name)
    quantized = w is not None or a is not None
    wt = _as_bits(conv.float_bits if w is None else w, f"w_bits['{layer.name}']")
    if wt.dim() == 1 and wt.numel() != layer.out_channels:
        raise NumericsError(f"w_bits['{layer.name}'] has {wt.numel()} entries for "
                            f"{layer.out_channels} output kernels")
    at = _as_bits(conv.float_bits if a is None else a, f"a_bits['{layer.name}']")
    if at.dim() != 0:
        if at.numel() != 1:
            raise NumericsError(f"a_bits['{layer.name}'] must be a scalar (one input bit-width "
                                "per layer)")
        at = at.reshape(())
    if quantized and layer.first and conv.first_input_bits is not None:
        fib = conv.first_input_bits
        at = torch.tensor(fib, dtype=torch.float64 if isinstance(fib, float)
                          and not float(fib).is_integer() else torch.int64)
    wt = wt.expand(layer.out_channels) if wt.dim() == 0 else wt
    return wt, at, quantized


def kernel_bitops(layer: LayerCost, w_bits: BitsMap, a_bits: BitsMap,
                  conventions: CostConventions = FRACBITS) -> torch.Tensor:
    """BitOPs of each output kernel of ``layer`` (``(C_out,)``; int64 for integer bits, float64
    otherwise; differentiable): the terms of ``costs.layer_bitops``."""
    if conventions.exclude_first_last and (layer.first or layer.last):
        return torch.zeros(layer.out_channels, dtype=torch.int64)
    w, a, _ = _layer_bits(layer, w_bits, a_bits, conventions)
    dt = _promote(w, a)
    return layer.kernel_macs().to(dt) * w.to(dt) * a.to(dt)


def layer_bitops(layer: LayerCost, w_bits: BitsMap, a_bits: BitsMap,
                 conventions: CostConventions = FRACBITS) -> torch.Tensor:
    """BitOPs of one layer: ``costs.layer_bitops(alive MACs per kernel, w per kernel, a)``."""
    if conventions.exclude_first_last and (layer.first or layer.last):
        return torch.zeros((), dtype=torch.int64)
    w, a, _ = _layer_bits(layer, w_bits, a_bits, conventions)
    return costs.layer_bitops(layer.kernel_macs(), w, a)


def kernel_size_bits(layer: LayerCost, w_bits: BitsMap,
                     conventions: CostConventions = FRACBITS) -> torch.Tensor:
    """Weight storage of each output kernel in bits (biases not included), ``(C_out,)``."""
    w, _, _ = _layer_bits(layer, w_bits, {}, conventions)
    dt = _promote(w)
    return layer.kernel_params().to(dt) * w.to(dt)


def layer_size_bits(layer: LayerCost, w_bits: BitsMap,
                    conventions: CostConventions = FRACBITS) -> torch.Tensor:
    """Storage of one layer in bits: ``costs.layer_size_bits`` (weights + fp32 biases)."""
    w, _, _ = _layer_bits(layer, w_bits, {}, conventions)
    return torch.as_tensor(costs.layer_size_bits(layer.kernel_params(), w,
                                                 bias_count=layer.bias_count,
                                                 bias_bits=conventions.bias_bits))


def _layers_of(gm_or_layers: Any, conventions: CostConventions) -> Sequence[LayerCost]:
    if isinstance(gm_or_layers, torch.fx.GraphModule):
        return cost_layers(gm_or_layers, conventions)
    return gm_or_layers


def _check_names(layers: Sequence[LayerCost], *maps: BitsMap) -> None:
    names = {layer.name for layer in layers}
    for m in maps:
        unknown = sorted(set(m) - names)
        if unknown:
            raise NumericsError(f"unknown layer name '{unknown[0]}' in a bit map (layers are "
                                f"named by module path)" + did_you_mean(unknown[0], names))


def model_bitops(gm_or_layers: torch.fx.GraphModule | Sequence[LayerCost], w_bits: BitsMap,
                 a_bits: BitsMap, conventions: CostConventions = FRACBITS, *,
                 per_layer: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total BitOPs of the model for the given bit maps (differentiable in real-valued bits).

    ``gm_or_layers``: a traced graph or :func:`cost_layers` of it (pass the latter in a training
    loop: it is computed once). ``w_bits``/``a_bits`` map layer names to bits (scalars or
    per-kernel vectors, ints or trainable λ tensors); layers missing from a map count as float.
    Returns a 0-d tensor (int64 for integer bits, float64 otherwise; divide by 1e9 for
    GBitOPs), plus ``{name: layer BitOPs}`` when ``per_layer``.
    """
    layers = _layers_of(gm_or_layers, conventions)
    _check_names(layers, w_bits, a_bits)
    parts = {layer.name: layer_bitops(layer, w_bits, a_bits, conventions) for layer in layers}
    total = _sum(parts.values())
    return (total, parts) if per_layer else total


def model_size_bits(gm_or_layers: torch.fx.GraphModule | Sequence[LayerCost], w_bits: BitsMap,
                    conventions: CostConventions = FRACBITS, *,
                    per_layer: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total model size in bits (weights at their bits, biases at ``bias_bits``); differentiable.
    MB = bits / 8e6 (:func:`qpasses.numerics.costs.bits_to_mb`)."""
    layers = _layers_of(gm_or_layers, conventions)
    _check_names(layers, w_bits)
    parts = {layer.name: layer_size_bits(layer, w_bits, conventions) for layer in layers}
    total = _sum(parts.values())
    return (total, parts) if per_layer else total


def _sum(values: Any) -> torch.Tensor:
    vals = list(values)
    if not vals:
        return torch.zeros((), dtype=torch.int64)
    dt = _promote(*vals)
    total = vals[0].to(dt)
    for v in vals[1:]:
        total = total + v.to(dt)
    return total
