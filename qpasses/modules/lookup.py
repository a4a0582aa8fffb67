"""Finding the quantizers of a graph (which fake-quant module quantizes a layer's weight, its
input, a join's output), exporting their state into QMeta, and building activation observers by
option name.

Used by the passes that insert, calibrate, lower or check fake quantizers, so every pass reads the
quantizer structure the same way.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from passes_registry.errors import OptionError

from qpasses.errors import CalibrationError
from qpasses.ir.annotations import QuantSpec, get_qmeta, update_qmeta
from qpasses.ir.fx import submodule_or_none
from qpasses.ir.joins import is_join, layer_input
from qpasses.ir.layers import quantizable_layers
from qpasses.modules.fake_quant import ActFakeQuant, FakeQuantize, WeightFakeQuant
from qpasses.modules.fake_quant_layers import is_fake_quant_layer
from qpasses.numerics.observers import ACIQ_LAPLACE, Observer, make_observer

__all__ = ["OBSERVER_METHODS", "act_fq_module", "is_act_fq_node", "join_output_fq_node",
           "layer_act_fq_node", "layer_weight_quantizer", "make_act_observer",
           "is_activation_quantizer", "quantizer_modules", "submodule_or_none", "write_qmeta"]

# Option spelling (kebab-case) -> numerics observer name.
OBSERVER_METHODS = {"minmax": "minmax", "moving-average": "moving_average", "avg": "avg",
                    "percentile": "percentile", "mse": "mse", "aciq": "aciq", "kl": "kl"}


def quantizer_modules(gm: torch.fx.GraphModule) -> dict[str, FakeQuantize]:
    """Every fake-quant module of ``gm`` by qualified name."""
    return {n: m for n, m in gm.named_modules() if isinstance(m, FakeQuantize)}


def make_act_observer(method: str, signed: bool, *, percentile: float = 99.99,
                      bits: int | None = None, where: str = "") -> Observer:
    """A per-tensor observer by option name; ACIQ uses its half-range table for unsigned tensors."""
    name = OBSERVER_METHODS.get(method, method)
    if name == "aciq":
        if bits is not None and bits > max(ACIQ_LAPLACE):
            raise OptionError("insert-fake-quant", "observer",
                              f"the aciq tables cover 1..{max(ACIQ_LAPLACE)} bits but {where} is "
                              f"quantized to {bits} bits; use another observer for it")
        return make_observer("aciq", dist="laplace", half_range=not signed)
    if name == "percentile":
        return make_observer("percentile", percentile=percentile)
    return make_observer(name)


def is_act_fq_node(gm: torch.fx.GraphModule, node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_module" and \
        isinstance(submodule_or_none(gm, str(node.target)), ActFakeQuant)


def act_fq_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> ActFakeQuant:
    return gm.get_submodule(str(node.target))  # type: ignore[return-value]


def layer_act_fq_node(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """The activation fake-quant node feeding a layer node, or None."""
    x = layer_input(node)
    return x if is_act_fq_node(gm, x) else None


def join_output_fq_node(gm: torch.fx.GraphModule, join: torch.fx.Node) -> torch.fx.Node | None:
    for u in join.users:
        if is_act_fq_node(gm, u) and u.args and u.args[0] is join:
            return u
    return None


def layer_weight_quantizer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> WeightFakeQuant | None:
    """The weight quantizer of a layer node (module wrapper or functional weight node), or None."""
    if node.op == "call_module":
        mod = submodule_or_none(gm, str(node.target))
        return mod.weight_fake_quant if mod is not None and is_fake_quant_layer(mod) else None
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if isinstance(w, torch.fx.Node) and w.op == "call_module":
        mod = submodule_or_none(gm, str(w.target))
        if isinstance(mod, WeightFakeQuant):
            return mod
    return None


def _floats(t: torch.Tensor) -> tuple[float, ...]:
    return tuple(map(float, t.detach().reshape(-1).tolist()))


def _ints(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(map(int, t.detach().reshape(-1).tolist()))


def _with_qparams(spec: QuantSpec, scale: torch.Tensor, zp: torch.Tensor | None) -> QuantSpec:
    s = _floats(scale)
    z = _ints(zp) if zp is not None else None
    if spec.axis is None and len(set(s)) <= 1 and (z is None or len(set(z)) <= 1):
        s, z = s[:1], (z[:1] if z is not None else None)
    return spec.replace(scale=s, zero_point=z)


def write_qmeta(gm: torch.fx.GraphModule, origin: str = "calibrate") -> int:
    """Export the quantizers' current scales/zero points into QMeta (layers, joins and activation
    nodes). Quantizers without a usable scale are skipped. Returns the number of nodes updated."""
    count = 0
    nodes = {n.name: n for n in gm.graph.nodes}

    def act_qparams(node: torch.fx.Node | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if node is None:
            return None
        q = act_fq_module(gm, node)
        try:
            scale, zp = q.qparams()
        except CalibrationError:
            return None
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            return None
        return scale, zp

    for info in quantizable_layers(gm):
        node = nodes[info.node]
        q = get_qmeta(node)
        if q.float_island is not None:
            continue
        changes: dict[str, Any] = {}
        wq = layer_weight_quantizer(gm, node)
        if q.weight is not None and wq is not None:
            try:
                scale, zp = wq.qparams()
            except CalibrationError:
                scale = zp = None  # type: ignore[assignment]
            if scale is not None and bool(torch.isfinite(scale).all()):
                changes["weight"] = _with_qparams(q.weight, scale,
                                                  None if wq.scheme == "dorefa" else zp)
        qp = act_qparams(layer_act_fq_node(gm, node))
        if q.act is not None and qp is not None:
            changes["act"] = _with_qparams(q.act, *qp)
        if changes:
            update_qmeta(node, origin=origin, **changes)
            count += 1
    for n in list(gm.graph.nodes):
        q = get_qmeta(n)
        if q.output is None:
            continue
        if is_act_fq_node(gm, n):
            qp = act_qparams(n)
        elif is_join(n) or any(is_act_fq_node(gm, u) for u in n.users):
            qp = act_qparams(join_output_fq_node(gm, n))
        else:
            qp = None
        if qp is not None:
            update_qmeta(n, origin=origin, output=_with_qparams(q.output, *qp))
            count += 1
    return count


def is_activation_quantizer(mod: nn.Module) -> bool:
    """An activation quantizer: a module declaring ``is_weight_quantizer = False`` (qpasses'
    fake-quant modules), or a per-tensor torch.ao fake-quant or observer."""
    if getattr(mod, "is_weight_quantizer", None) is False:        # qpasses FakeQuantize
        return True
    ao = torch.ao.quantization
    if isinstance(mod, (ao.FakeQuantizeBase, ao.ObserverBase)):
        qscheme = getattr(mod, "qscheme", torch.per_tensor_affine)
        return qscheme in (torch.per_tensor_affine, torch.per_tensor_symmetric)
    return False
