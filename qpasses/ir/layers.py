"""Read-only views of a traced graph: quantizable layers, their shapes, and a networkx DAG.

Quantizable layers are convolutions (1-3d, grouped, depthwise) and linear layers, as modules or in
functional form with a parameter weight. Every analysis and pass that asks "which layers, with
which shapes?" uses :func:`quantizable_layers`, so they all agree.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from qpasses.ir.fx import attr_value, node_arg, node_shape, rows_per_sample

CONV_MODULES: dict[type, str] = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}
LINEAR_MODULES: dict[type, str] = {nn.Linear: "linear"}
CONV_FUNCTIONS: dict[Any, str] = {F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d",
                                  torch.conv1d: "conv1d", torch.conv2d: "conv2d",
                                  torch.conv3d: "conv3d"}
LINEAR_FUNCTIONS: dict[Any, str] = {F.linear: "linear"}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LINEAR_ARGS = ("input", "weight", "bias")


@dataclass(frozen=True)
class LayerInfo:
    """Shape facts of one quantizable layer (read from the graph; never stored in meta)."""
    name: str              # module path of the layer ("layer1.0.conv1"); the report's key
    node: str              # fx node name
    op: str                # conv1d / conv2d / conv3d / linear
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Any           # tuple of ints, or "same"/"valid"
    dilation: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight_attr: str       # qualified name of the weight parameter
    bias_attr: str | None
    rows_per_sample: int = 1   # leading-dim rows of one sample (Swin windows; ir.fx)

    @property
    def is_conv(self) -> bool:
        return self.op.startswith("conv")

    @property
    def depthwise(self) -> bool:
        return self.is_conv and self.groups == self.in_channels and self.groups > 1

    @property
    def out_spatial(self) -> tuple[int, ...]:
        """Output positions per sample each kernel is applied at (tokens for linear layers),
        with the leading-dim rows of one sample first when there are several."""
        rows = (self.rows_per_sample,) if self.rows_per_sample > 1 else ()
        if self.is_conv:
            return rows + tuple(self.out_shape[2:])
        return rows + tuple(self.out_shape[1:-1])

    @property
    def fan_in(self) -> int:
        """Products summed into one accumulator."""
        return self.in_channels // self.groups * math.prod(self.kernel_size)

    @property
    def has_bias(self) -> bool:
        return self.bias_attr is not None

    @property
    def macs(self) -> int:
        return self.out_channels * self.fan_in * math.prod(self.out_spatial)

    @property
    def params(self) -> int:
        return self.out_channels * self.fan_in + (self.out_channels if self.has_bias else 0)

    @property
    def kind(self) -> str:
        return f"{self.op}-dw" if self.depthwise else self.op


def module_op(mod: Any) -> str | None:
    """The layer op of a module: ``conv1d``/``conv2d``/``conv3d``/``linear``, or None.

    isinstance-based (the closest registered base class in the MRO), so fake-quant wrappers such
    as ``FakeQuantConv2d(nn.Conv2d)`` keep the op, and the LayerInfo, of the layer they replace.
    """
    for cls in type(mod).__mro__:
        op = CONV_MODULES.get(cls) or LINEAR_MODULES.get(cls)
        if op is not None:
            return op
    return None


def _unwrap_weight(gm: torch.fx.GraphModule, w: Any) -> Any:
    """Look through a weight fake-quant node (``call_module`` on a module flagged
    ``is_weight_quantizer``) to the ``get_attr`` it quantizes."""
    if isinstance(w, torch.fx.Node) and w.op == "call_module" and w.args:
        mod = attr_value(gm, str(w.target))
        if getattr(mod, "is_weight_quantizer", False):
            return w.args[0]
    return w


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        return tuple(int(x) for x in v)
    return (int(v),) * n


def _arg(node: torch.fx.Node, names: tuple[str, ...], name: str, default: Any) -> Any:
    return node_arg(node, names.index(name), name, default)


def layer_info(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LayerInfo | None:
    """LayerInfo of a conv/linear node, or None when the node is not a quantizable layer."""
    info = _layer_info(gm, node)
    if info is None or len(info.out_shape) < 2:      # rank <= 1: no sample dim
        return info
    rows = rows_per_sample(gm, info.out_shape)
    return info if rows == 1 else dataclasses.replace(info, rows_per_sample=rows)


def _layer_info(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LayerInfo | None:
    in_shape = node_shape(node.args[0]) if node.args else None
    out_shape = node_shape(node)
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        op = module_op(mod)
        if op is None or in_shape is None or out_shape is None:
            return None
        prefix = str(node.target)
        bias_attr = f"{prefix}.bias" if getattr(mod, "bias", None) is not None else None
        if op == "linear":
            return LayerInfo(prefix, node.name, op, mod.in_features, mod.out_features, 1, (), (),
                             (), (), in_shape, out_shape, f"{prefix}.weight", bias_attr)
        pad = mod.padding if isinstance(mod.padding, str) else _tuple(mod.padding, mod.weight.dim() - 2)
        return LayerInfo(prefix, node.name, op, mod.in_channels, mod.out_channels, mod.groups,
                         tuple(mod.kernel_size), tuple(mod.stride), pad, tuple(mod.dilation),
                         in_shape, out_shape, f"{prefix}.weight", bias_attr)
    if node.op == "call_function" and (node.target in CONV_FUNCTIONS or node.target in LINEAR_FUNCTIONS):
        names = _CONV_ARGS if node.target in CONV_FUNCTIONS else _LINEAR_ARGS
        w = _unwrap_weight(gm, _arg(node, names, "weight", None))
        b = _arg(node, names, "bias", None)
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
            return None
        if b is not None and not (isinstance(b, torch.fx.Node) and b.op == "get_attr"):
            return None
        weight = attr_value(gm, str(w.target))
        if not isinstance(weight, torch.Tensor) or in_shape is None or out_shape is None:
            return None
        attr = str(w.target)
        name = attr[: -len(".weight")] if attr.endswith(".weight") else attr
        bias_attr = str(b.target) if b is not None else None
        if node.target in LINEAR_FUNCTIONS:
            return LayerInfo(name, node.name, "linear", weight.shape[1], weight.shape[0], 1, (), (),
                             (), (), in_shape, out_shape, attr, bias_attr)
        op = CONV_FUNCTIONS[node.target]
        nd = weight.dim() - 2
        groups = int(_arg(node, names, "groups", 1))
        pad = _arg(node, names, "padding", 0)
        return LayerInfo(name, node.name, op, weight.shape[1] * groups, weight.shape[0], groups,
                         tuple(weight.shape[2:]), _tuple(_arg(node, names, "stride", 1), nd),
                         pad if isinstance(pad, str) else _tuple(pad, nd),
                         _tuple(_arg(node, names, "dilation", 1), nd), in_shape, out_shape,
                         attr, bias_attr)
    return None


def quantizable_layers(gm: torch.fx.GraphModule) -> list[LayerInfo]:
    """Every conv/linear layer of the graph, in graph (topological) order."""
    out = []
    for node in gm.graph.nodes:
        info = layer_info(gm, node)
        if info is not None:
            out.append(info)
    return out


def layer_weight(gm: torch.fx.GraphModule, info: LayerInfo) -> torch.Tensor:
    return attr_value(gm, info.weight_attr)


def layer_bias(gm: torch.fx.GraphModule, info: LayerInfo) -> torch.Tensor | None:
    return attr_value(gm, info.bias_attr) if info.bias_attr else None


# prune-zero-bit-channels folds the constants of removed channels into consumer biases in
# float32; these buffers on the consumer module keep the bias before folding and the folded sum
# (float64), so integer lowering can round the bias as the unpruned graph did (bit-exact).
PRUNED_BIAS_BASE = "pruned_bias_base"
PRUNED_BIAS_FOLD = "pruned_bias_fold"


def bias_parts(mod: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A layer module's bias as float64 ``(base, fold)``: the bias before pruning folds and the
    folded constants, kept apart while they still agree with the float32 bias (not finetuned
    since); ``(bias, 0)`` otherwise. Integer lowering rounds the two separately: a fold is an
    integer number of accumulator units, so this rounds the bias as the unpruned graph did."""
    bias = getattr(mod, "bias", None)
    if bias is None:
        return None
    b = bias.detach().to(torch.float64)
    base, fold = getattr(mod, PRUNED_BIAS_BASE, None), getattr(mod, PRUNED_BIAS_FOLD, None)
    if isinstance(base, torch.Tensor) and isinstance(fold, torch.Tensor) and \
            base.shape == bias.shape == fold.shape:
        base, fold = base.detach().to(torch.float64), fold.detach().to(torch.float64)
        if torch.equal((base + fold).to(bias.dtype), bias.detach()):
            return base, fold
    return b, torch.zeros_like(b)


def to_networkx(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """DAG of node names; edges producer -> consumer; node attributes op/target."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name, op=n.op, target=str(n.target))
        for inp in n.all_input_nodes:
            g.add_edge(inp.name, n.name)
    return g


def first_last_layers(gm: torch.fx.GraphModule,
                      layers: list[LayerInfo] | None = None) -> tuple[set[str], set[str]]:
    """Names of the first layers (no quantizable layer upstream) and the last layers (none
    downstream). For a plain CNN: the stem conv and the classifier. One forward and one backward
    sweep over the graph, linear in its size."""
    layers = quantizable_layers(gm) if layers is None else layers
    by_node = {info.node: info.name for info in layers}
    nodes = list(gm.graph.nodes)
    layer_upstream: dict[str, bool] = {}    # a layer is at or above this node
    for n in nodes:
        layer_upstream[n.name] = any(layer_upstream[i.name] or i.name in by_node
                                     for i in n.all_input_nodes)
    layer_downstream: dict[str, bool] = {}
    for n in reversed(nodes):
        layer_downstream[n.name] = any(layer_downstream[u.name] or u.name in by_node
                                       for u in n.users)
    first = {name for node, name in by_node.items() if not layer_upstream[node]}
    last = {name for node, name in by_node.items() if not layer_downstream[node]}
    return first, last


def users_by_name(gm: torch.fx.GraphModule) -> dict[str, list[str]]:
    return {n.name: [u.name for u in n.users] for n in gm.graph.nodes}
