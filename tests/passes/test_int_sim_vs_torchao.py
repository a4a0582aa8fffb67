"""External reference: with rounding=float-rne, 8-bit per-channel symmetric weights and the same
scales and zero points as torch.ao (x86/fbgemm, reduce_range activations = 7-bit codes), a lowered
conv / linear layer gives exactly the codes of PyTorch's own quantized engine (convert_fx).

The one explained difference: torch.ao's ``reduce_range`` computes 7-bit scales but its quantized
ops clamp their outputs to quint8's full [0, 255], whereas our 7-bit grid (like the fake-quant
graph) clamps at 127; codes above 127 in torch are 127 here, everything else is equal."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager
from qpasses.passes.lower.verify_int_sim import record_run
from qpasses.passes.quantize.calibrate import write_qmeta
from qpasses.passes.quantize.insert_fake_quant import act_fq_module, layer_act_fq_node

pytestmark = pytest.mark.filterwarnings("ignore")


class Layer(nn.Module):
    def __init__(self, layer: nn.Module, relu: bool, out: int, linear: bool) -> None:
        super().__init__()
        self.layer, self.relu = layer, relu
        self.tail = nn.Linear(out, 3) if linear else nn.Conv2d(out, 3, 1)

    def forward(self, x):
        y = self.layer(x)
        return self.tail(torch.relu(y) if self.relu else y)


CASES = {
    "conv+bias": (lambda: nn.Conv2d(8, 16, 3, padding=1), False, (4, 8, 12, 12)),
    "conv, no bias, stride 2": (lambda: nn.Conv2d(8, 16, 3, stride=2, bias=False), False,
                                (2, 8, 11, 11)),
    "conv+relu (fused)": (lambda: nn.Conv2d(8, 16, 3, padding=1), True, (4, 8, 12, 12)),
    "depthwise conv": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), False, (4, 8, 10, 10)),
    "linear+bias": (lambda: nn.Linear(40, 24), False, (16, 40)),
    "linear+relu": (lambda: nn.Linear(40, 24), True, (16, 40)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lowered_layer_equals_torch_ao_fbgemm(case):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    make, relu, shape = CASES[case]
    torch.manual_seed(0)
    layer = make()
    linear = isinstance(layer, nn.Linear)
    out = layer.out_features if linear else layer.out_channels
    model = Layer(layer, relu, out, linear).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    cal = [torch.randn(*shape, generator=g) for _ in range(3)]
    # torch.ao: x86 qconfig (per-channel symmetric qint8 weights, quint8 reduce_range acts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
        with torch.no_grad():
            for c in cal:
                prepared(c)
        q = convert_fx(prepared)
    tv = record_run(q, (x,))
    t_in = next(v for v in tv.values() if isinstance(v, torch.Tensor) and v.is_quantized)
    t_out = tv["layer"]          # fbgemm's output codes on the layer's output grid
    t_w = q.layer.weight()
    # ours: 7-bit signed activation grids are torch's [0, 127] codes minus 64
    gm = qpasses.trace(model, (x,))
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(canonicalize,annotate-bitwidths{weight-bits=8 act-bits=7 "
                          "first-last-bits=none},insert-fake-quant,calibrate)").run(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    fq_in = act_fq_module(gm, layer_act_fq_node(gm, nodes["layer"]))
    fq_out = act_fq_module(gm, layer_act_fq_node(gm, nodes["tail"]))
    offset = 64 if fq_out.signed else 0
    with torch.no_grad():
        fq_in.scale.fill_(t_in.q_scale())
        fq_in.zero_point.fill_(t_in.q_zero_point() - (64 if fq_in.signed else 0))
        fq_out.scale.fill_(t_out.q_scale())
        fq_out.zero_point.fill_(t_out.q_zero_point() - offset)
        gm.layer.weight_fake_quant.scale.copy_(t_w.q_per_channel_scales().float())
    write_qmeta(gm)
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(lower-to-int-sim{rounding=float-rne},verify-int-sim)",
                          assume=gm).run(gm)
    w_codes = gm.get_submodule("layer").w_q
    assert torch.equal(w_codes, t_w.int_repr().to(torch.int64))
    ours = record_run(gm, (x,))["layer"] + offset
    theirs = t_out.int_repr().to(torch.int64)
    if relu:    # a ReLU on that grid (torch.ao runs it in float here; on codes it is this clamp)
        theirs = theirs.clamp(min=t_out.q_zero_point())
    # torch.ao's reduce_range picks 7-bit scales but clamps op outputs to quint8's [0, 255];
    # our grid (and the fake-quant graph) clamps to the 7-bit range: only there may they differ
    top = fq_out._qmax + offset
    inside = theirs <= top
    assert torch.equal(ours[inside], theirs[inside]), \
        f"{int((ours[inside] != theirs[inside]).sum())} of {int(inside.sum())} codes differ"
    assert bool((ours[~inside] == top).all())
