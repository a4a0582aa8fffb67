"""Helpers for the channel-groups / prune-zero-bit-channels tests: models, 0-bit masks, MACs.

0-bit kernels are marked directly in QMeta (``weight=QuantSpec(bits=max, bits_per_kernel=...)``)
on a float graph, and their float weights are zeroed: that is what weight quantization to 0 bits
computes, so the unpruned float graph is the reference the pruned graph must equal.
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager
from qpasses.ir.layers import layer_weight, quantizable_layers
from qpasses.ir.annotations import QuantSpec, get_qmeta, update_qmeta
from qpasses.analyses.channel_groups import ChannelGroups, compute_channel_groups


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics (fresh torchvision models have mean 0, var 1, identity
    affine, which would hide every constant-channel case)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.normal_(0, 0.5, generator=g)
    return model


def trace_folded(model: nn.Module, x: torch.Tensor, fold: bool = True) -> torch.fx.GraphModule:
    gm = qpasses.trace(model.eval(), (x,))
    if fold:
        from passes_registry import pass_names
        if "fold-batch-norm" in pass_names():
            gm = PassManager.parse("graph(fold-batch-norm)").run(
                gm, PassContext(example_inputs=(x,)))
    return gm


def layer_nodes(gm: torch.fx.GraphModule) -> dict[str, Any]:
    nodes = {n.name: n for n in gm.graph.nodes}
    return {info.node: (nodes[info.node], info) for info in quantizable_layers(gm)}


def set_bits(gm: torch.fx.GraphModule, bits: dict[str, np.ndarray], zero_weights: bool = True
             ) -> None:
    """Write per-kernel weight bits into QMeta (and zero the 0-bit kernels' float weights)."""
    for name, (node, info) in layer_nodes(gm).items():
        b = bits.get(name)
        if b is None:
            continue
        b = [int(v) for v in b]
        old = get_qmeta(node).weight
        spec = old.replace(bits=max(b), bits_per_kernel=tuple(b)) if old is not None else \
            QuantSpec(bits=max(b), bits_per_kernel=tuple(b))
        update_qmeta(node, weight=spec)
        if zero_weights:
            w = layer_weight(gm, info)
            with torch.no_grad():
                w[torch.as_tensor(np.asarray(b) == 0)] = 0


def random_bits(gm: torch.fx.GraphModule, rng: np.random.Generator, frac_classes: float,
                noise: float, whole_layer: float = 0.0, high: int = 4,
                cg: ChannelGroups | None = None) -> dict[str, np.ndarray]:
    """Per-kernel bits: a fraction of the prunable channel classes get 0 bits in every producer
    (removable), ``noise`` zeros single kernels (mostly partial groups), ``whole_layer`` zeros
    whole layers (the keep-one guard)."""
    cg = compute_channel_groups(gm) if cg is None else cg
    bits = {name: rng.integers(1, high + 1, size=info.out_channels)
            for name, (_, info) in layer_nodes(gm).items()}
    for g in cg.groups:
        for k, c in enumerate(g.classes):
            if g.reasons[k] is None and rng.random() < frac_classes:
                for n, j in cg.class_producers[c]:
                    bits[n][j] = 0
    for name, b in bits.items():
        b[rng.random(len(b)) < noise] = 0
        if rng.random() < whole_layer:
            b[:] = 0
    return bits


def run(gm: torch.fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return gm(x)


def assert_same(y: torch.Tensor, y0: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal up to float rounding: rtol 1e-5 plus an atol of 1e-5 of the output's scale (folding
    a constant into a bias reorders a float sum)."""
    scale = float(y0.abs().max()) or 1.0
    torch.testing.assert_close(y, y0, rtol=rtol, atol=rtol * scale)


class MacsCounter:
    """Measured MACs: forward hooks on every conv/linear module, from the runtime shapes."""

    def __init__(self, model: nn.Module):
        self.total = 0
        self.handles = [m.register_forward_hook(self.hook) for m in model.modules()
                        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]

    def hook(self, mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Linear):
            self.total += out.numel() // out.shape[0] * mod.in_features
        else:
            k = int(np.prod(mod.kernel_size))
            self.total += out.numel() // out.shape[0] * (mod.in_channels // mod.groups) * k

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def measured_macs(gm: torch.fx.GraphModule, x: torch.Tensor) -> int:
    c = MacsCounter(gm)
    try:
        with torch.no_grad():
            gm(x[:1])
    finally:
        c.close()
    return c.total


@contextlib.contextmanager
def single_thread() -> Any:
    """torch on one thread: these tests run many small ops on a shared 2-core machine, where
    every parallel region waits for a descheduled worker thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
