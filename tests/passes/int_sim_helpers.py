"""Shared helpers of the integer-simulation tests: healthy random weights, calibrated fake-quant
graphs, lowering, and per-node comparisons."""
from __future__ import annotations

import copy
import json
import os
import tempfile
from typing import Any

import torch
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager, get_record
from qpasses.modules.int_sim import set_backend
from qpasses.ir.records import INT_SIM_KEY
from qpasses.passes.verify_int_sim import record_run


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-initialised conv/linear weights, small biases and non-trivial BatchNorm statistics, so
    random-weight zoo models produce healthy (non-vanishing) activations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                fan = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
    return model.eval()


def calibrated(model: nn.Module, shape: tuple[int, ...], *, bits: str = "weight-bits=8 act-bits=8",
               fq: str = "", config: dict[str, Any] | None = None, seed: int = 0,
               batches: int = 3) -> tuple[torch.fx.GraphModule, torch.Tensor, list[torch.Tensor]]:
    """Trace, fold BN, annotate, insert fake-quant and calibrate on random batches."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    cal = [torch.randn(*shape, generator=g) for _ in range(batches)]
    gm = qpasses.trace(model, (x,))
    path = None
    if config is not None:
        fd, path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        bits += f" config={path}"
    try:
        with PassContext(example_inputs=(x,), calibration_data=cal):
            PassManager.parse(f"graph(canonicalize,fold-batch-norm,annotate-bitwidths{{{bits}}},"
                              f"insert-fake-quant{{{fq}}},calibrate)").run(gm)
    finally:
        if path is not None:
            os.unlink(path)
    return gm, x, cal


def lower(gm: torch.fx.GraphModule, x: torch.Tensor, cal: list[torch.Tensor], opts: str = "",
          verify: str | None = None) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """(fake-quant copy, lowered graph); ``verify``: options of a verify-int-sim run after it."""
    fq = copy.deepcopy(gm)
    text = f"lower-to-int-sim{{{opts}}}"
    if verify is not None:
        text += f",verify-int-sim{{{verify}}}"
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse(f"graph({text})", assume=gm).run(gm)
    return fq, gm


def assert_backends_bit_exact(gm: torch.fx.GraphModule, x: torch.Tensor) -> dict[str, Any]:
    """Run the lowered graph on both backends and compare every node's value exactly."""
    before = get_record(gm, INT_SIM_KEY).backend
    try:
        set_backend(gm, "fast")
        fast = record_run(gm, (x,))
        set_backend(gm, "reference")
        ref = record_run(gm, (x,))
    finally:
        set_backend(gm, before)
    compared = 0
    for name, v in ref.items():
        if isinstance(v, torch.Tensor):
            w = fast[name]
            assert v.shape == w.shape, name
            # the fast backend keeps integer codes in the narrowest dtype of their declared range
            assert v.dtype == w.dtype or (v.dtype == torch.int64 and not w.dtype.is_floating_point
                                          and w.dtype != torch.bool), (name, v.dtype, w.dtype)
            assert torch.equal(v, w.to(v.dtype)), (f"node {name}: fast and reference differ in "
                                                   f"{int((v != w.to(v.dtype)).sum())} values")
            compared += 1
    assert compared > 0
    return fast


def codes_at(fq_gm: torch.fx.GraphModule, gm: torch.fx.GraphModule, x: torch.Tensor
             ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(fake-quant node, fake-quant codes, int-sim codes) at every activation quantizer."""
    rec = get_record(gm, INT_SIM_KEY)
    fv = record_run(fq_gm, (x,))
    iv = record_run(gm, (x,))
    out = []
    for k, m in rec.fq_map.items():
        c = torch.round(fv[k].double() / m["scale"]).to(torch.int64) + m["zero_point"]
        out.append((k, c, iv[m["node"]]))
    return out
