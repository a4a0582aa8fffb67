"""fast == reference, bit for bit, on random conv / linear / residual-add / pool stacks
(hypothesis): shapes, groups (incl. depthwise), strides, padding, dilation, bits 2–8 per layer and
per kernel, every rounding contract, both join-scale modes; the graph also passes
``verify-int-sim`` against the independent oracle."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from passes_registry import get_record

from qpasses.algorithms.int_sim_check import check_int_sim
from qpasses.ir.records import INT_SIM_KEY

from .int_sim_helpers import assert_backends_bit_exact, calibrated, lower

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Stack(nn.Module):
    """A sequence of blocks from a spec list: conv (+ReLU/ReLU6), residual block, max/avg pool;
    then adaptive average pool, flatten and a linear head."""

    def __init__(self, specs: list[dict], channels: int, pooled: int, classes: int) -> None:
        super().__init__()
        self.specs = specs
        self.layers = nn.ModuleList()
        for s in specs:
            if s["kind"] == "conv":
                self.layers.append(nn.Conv2d(s["cin"], s["cout"], s["k"], stride=s["stride"],
                                             padding=s["pad"], dilation=s["dil"],
                                             groups=s["groups"], bias=s["bias"]))
            elif s["kind"] == "res":
                c = s["c"]
                self.layers.append(nn.ModuleList([
                    nn.Conv2d(c, c, 3, padding=s["dil"], dilation=s["dil"], groups=s["groups"]),
                    nn.Conv2d(c, c, 1, bias=s["bias"])]))
            elif s["kind"] == "maxpool":
                self.layers.append(nn.MaxPool2d(s["k"], s["stride"], s["pad"],
                                                ceil_mode=s["ceil"]))
            else:
                self.layers.append(nn.AvgPool2d(s["k"], s["stride"], s["pad"],
                                                count_include_pad=s["incl"]))
        self.pooled = pooled
        self.head = nn.Linear(channels * pooled * pooled, classes)

    def forward(self, x):
        for s, m in zip(self.specs, self.layers):
            if s["kind"] == "res":
                y = self.layers_res(m, x)
                x = F.relu(x + y) if s["act"] == "relu" else x + y
            else:
                x = m(x)
                if s.get("act") == "relu":
                    x = F.relu(x)
                elif s.get("act") == "relu6":
                    x = F.relu6(x)
        x = F.adaptive_avg_pool2d(x, self.pooled)
        return self.head(torch.flatten(x, 1))

    @staticmethod
    def layers_res(m, x):
        return m[1](F.relu(m[0](x)))


def _out(size: int, k: int, stride: int, pad: int, dil: int = 1, ceil: bool = False) -> int:
    num = size + 2 * pad - dil * (k - 1) - 1
    out = (num + (stride - 1 if ceil else 0)) // stride + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@st.composite
def stacks(draw):
    c = c0 = draw(st.integers(1, 6))       # depthwise with > 4 groups runs the float kernel
    size = size0 = draw(st.integers(4, 9))
    specs: list[dict] = []
    bits: dict[str, dict] = {}
    n_blocks = draw(st.integers(1, 4))

    def layer_bits(name: str, cout: int) -> None:
        wb: int | list[int] = draw(st.integers(2, 8))
        if draw(st.booleans()):           # per-kernel bits, 0 (pruned kernel) allowed
            wb = [draw(st.sampled_from([0, 2, 3, 4, 5, 6, 7, 8])) for _ in range(cout)]
            if max(wb) == 0:
                wb[0] = 4
        bits[name] = {"weight_bits": wb, "act_bits": draw(st.integers(2, 8))}

    for i in range(n_blocks):
        kind = draw(st.sampled_from(["conv", "conv", "res", "maxpool", "avgpool"]))
        if kind == "conv":
            cout = draw(st.integers(1, 6))
            groups = draw(st.sampled_from(["1", "2", "dw"]))
            if groups == "dw":
                cout, g = c, c
            elif groups == "2" and c % 2 == 0 and cout % 2 == 0:
                g = 2
            else:
                g = 1
            k, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2))
            dil = draw(st.integers(1, 2))
            pad = draw(st.integers(0, dil * (k - 1) // 2 + 1))
            if _out(size, k, stride, pad, dil) < 1:
                continue
            specs.append(dict(kind="conv", cin=c, cout=cout, k=k, stride=stride, pad=pad, dil=dil,
                              groups=g, bias=draw(st.booleans()),
                              act=draw(st.sampled_from(["none", "relu", "relu6"]))))
            layer_bits(f"layers.{len(specs) - 1}", cout)
            c, size = cout, _out(size, k, stride, pad, dil)
        elif kind == "res":
            g = draw(st.sampled_from([1, c]))
            specs.append(dict(kind="res", c=c, dil=draw(st.integers(1, 2)), groups=g,
                              bias=draw(st.booleans()),
                              act=draw(st.sampled_from(["none", "relu"]))))
            layer_bits(f"layers.{len(specs) - 1}.0", c)
            layer_bits(f"layers.{len(specs) - 1}.1", c)
        else:
            k, stride = draw(st.integers(2, 3)), draw(st.integers(1, 2))
            pad = draw(st.integers(0, k // 2))
            ceil = kind == "maxpool" and draw(st.booleans())
            if _out(size, k, stride, pad, 1, ceil) < 1:
                continue
            specs.append(dict(kind=kind, k=k, stride=stride, pad=pad, ceil=ceil,
                              incl=draw(st.booleans())))
            size = _out(size, k, stride, pad, 1, ceil)
    pooled = draw(st.integers(1, min(2, size)))
    classes = draw(st.integers(1, 5))
    head = [draw(st.integers(2, 8)) for _ in range(classes)] if draw(st.booleans()) \
        else draw(st.integers(2, 8))
    bits["head"] = {"weight_bits": head, "act_bits": draw(st.integers(2, 8))}
    model = Stack(specs, c, pooled, classes)
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g)
                               * (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    batch = draw(st.integers(1, 2))
    fq = " ".join([draw(st.sampled_from(["act-scheme=affine", "act-scheme=symmetric"])),
                   draw(st.sampled_from(["join-scales=shared", "join-scales=per-tensor"]))])
    rounding = draw(st.sampled_from(["gemmlowp", "single", "float-rne", "hawq"]))
    mult_bits = draw(st.sampled_from([31, 31, 15, 8]))
    return model.eval(), (batch, c0, size0, size0), bits, fq, rounding, mult_bits, seed


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(stacks())
def test_fast_equals_reference_on_random_stacks(case):
    model, shape, bits, fq, rounding, mult_bits, seed = case
    gm, x, cal = calibrated(model, shape, bits="first-last-bits=none", config=bits, fq=fq,
                            seed=seed, batches=2)
    _, gm = lower(gm, x, cal, f"rounding={rounding} multiplier-bits={mult_bits}",
                  verify="samples=2 oracle=independent")
    rec = get_record(gm, INT_SIM_KEY)
    assert check_int_sim(gm) == []
    assert rec.float_islands == (), rec.float_islands
    assert_backends_bit_exact(gm, x)
