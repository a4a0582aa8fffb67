"""External reference: with rounding=float-rne, 8-bit per-channel symmetric weights and the same
scales and zero points as torch.ao (x86/fbgemm, reduce_range activations = 7-bit codes), a lowered
conv / linear layer gives exactly the codes of PyTorch's own quantized engine (convert_fx).

The one explained difference: torch.ao's ``reduce_range`` computes 7-bit scales but its quantized
ops clamp their outputs to quint8's full [0, 255], whereas our 7-bit grid (like the fake-quant
graph) clamps at 127; codes above 127 in torch are 127 here, everything else is equal.

Whole ResNet-18: 8-bit grids carrying torch's (reduce_range) scales and zero points clamp where
torch clamps, so every conv, residual add (+ReLU) and pooling output equals torch's codes and the
logits land within one LSB of torch's quantized ``fc`` output (our last layer has no output
quantizer: its accumulator is dequantized, then put on torch's grid)."""
from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torchvision
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager, get_record
from qpasses.ir.records import INT_SIM_KEY
from qpasses.passes.verify_int_sim import record_run
from qpasses.modules.lookup import write_qmeta
from qpasses.modules.lookup import act_fq_module, layer_act_fq_node

from .int_sim_helpers import randomize

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
    make, relu, shape = CASES[case]
    torch.manual_seed(0)
    layer = make()
    linear = isinstance(layer, nn.Linear)
    out = layer.out_features if linear else layer.out_channels
    model = Layer(layer, relu, out, linear).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    cal = [torch.randn(*shape, generator=g) for _ in range(3)]
    q = _torch_ao(model, x, cal)
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
    top = fq_out.qmax + offset
    inside = theirs <= top
    assert torch.equal(ours[inside], theirs[inside]), \
        f"{int((ours[inside] != theirs[inside]).sum())} of {int(inside.sum())} codes differ"
    assert bool((ours[~inside] == top).all())


def _torch_ao(model: nn.Module, x: torch.Tensor, cal: list[torch.Tensor]) -> torch.fx.GraphModule:
    """torch.ao convert_fx with the x86 qconfig (per-channel symmetric qint8 weights, quint8
    reduce_range activations), calibrated on ``cal``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
        with torch.no_grad():
            for c in cal:
                prepared(c)
        return convert_fx(prepared)


def _adopt_torch_qparams(gm: torch.fx.GraphModule, q: torch.fx.GraphModule
                         ) -> dict[str, tuple[int, str | None]]:
    """Give ``gm`` (calibrated fake-quant, join-scales=per-tensor) torch.ao's integer weights, float
    biases and every quantization point's scale and zero point. Returns per activation quantizer
    the offset of its codes to torch's quint8 codes (128 for a signed grid) and the torch.ao node
    holding the same codes (None for the sum before a fused add+ReLU, which torch never forms)."""
    mods = dict(gm.named_modules())
    for name, m in mods.items():
        if hasattr(m, "weight_fake_quant"):
            tm = q.get_submodule(name)
            tw = tm.weight()
            m.weight_fake_quant.enable_observer(False)     # torch's scales, not max|w|/127
            with torch.no_grad():
                m.weight.copy_(tw.dequantize())
                m.bias.copy_(tm.bias())
                m.weight_fake_quant.scale.copy_(tw.q_per_channel_scales().float().reshape(
                    m.weight_fake_quant.scale.shape))
                m.weight_fake_quant.zero_point.zero_()

    def attr(n: torch.fx.Node) -> float:
        return float(getattr(q, str(n.target)))
    t_adds = [n for n in q.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    t_in = next(n for n in q.graph.nodes if n.target is torch.quantize_per_tensor)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == len(t_adds)

    def qparams(n: torch.fx.Node) -> tuple[float, int]:
        # walk back through ops that keep torch's quantization parameters (relu, pools, flatten,
        # our own quantizers) to the conv/linear, residual add or input that set them
        while True:
            if n.op == "placeholder":
                return attr(t_in.args[1]), int(attr(t_in.args[2]))
            if n in adds:
                t = t_adds[adds.index(n)]
                return attr(t.args[2]), int(attr(t.args[3]))
            if n.op == "call_module" and hasattr(mods[str(n.target)], "weight_fake_quant"):
                tm = q.get_submodule(str(n.target))
                return float(tm.scale), int(tm.zero_point)
            n = n.args[0]
    def torch_node(n: torch.fx.Node) -> str | None:
        if n in adds:
            return None
        while n.op == "call_function" and n.target is torch.relu or (
                n.op == "call_module" and str(n.target).startswith("activation_fake_quant")):
            n = n.args[0]
        return t_adds[adds.index(n)].name if n in adds else n.name

    points = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and str(n.target).startswith("activation_fake_quant"):
            fq = mods[str(n.target)]
            s, z = qparams(n.args[0])
            assert fq.qmax - fq.qmin == 255
            off = 128 if fq.signed else 0
            points[n.name] = (off, torch_node(n.args[0]))
            with torch.no_grad():
                fq.scale.fill_(s)
                fq.zero_point.fill_(z - off)
    write_qmeta(gm)
    return points


def test_whole_resnet18_matches_torch_ao_within_one_lsb(record_property):
    """ResNet-18 (random He weights, BN statistics), 2 images at 64x64: every intermediate
    quantization point equals torch.ao's fbgemm codes, the logits are within one LSB of torch's
    quantized output on >= 99.9% of values."""
    model = randomize(torchvision.models.resnet18(), seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=g)
    cal = [torch.randn(2, 3, 64, 64, generator=g) for _ in range(2)]
    q = _torch_ao(model, x, cal)
    tv = record_run(q, (x,))
    gm = qpasses.trace(model, (x,))
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(canonicalize,fold-batch-norm,annotate-bitwidths{weight-bits=8 "
                          "act-bits=8 first-last-bits=none},insert-fake-quant{"
                          "join-scales=per-tensor},calibrate)").run(gm)
    at = _adopt_torch_qparams(gm, q)
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(lower-to-int-sim{rounding=float-rne})", assume=gm).run(gm)
    for name, m in gm.named_modules():
        if hasattr(m, "w_q"):
            assert torch.equal(m.w_q, q.get_submodule(name).weight().int_repr().to(torch.int64))
    iv = record_run(gm, (x,))
    rec = get_record(gm, INT_SIM_KEY)
    assert rec.float_islands == ()
    # every quantization point whose torch tensor has the same shape: equal codes
    t_quant = {k: v.int_repr().to(torch.int64) for k, v in tv.items()
               if isinstance(v, torch.Tensor) and v.is_quantized}
    points = equal = total = 0
    for k, m in rec.fq_map.items():
        off, name = at[k]
        if name not in t_quant:
            continue
        ours, theirs = iv[m["node"]].to(torch.int64) + off, t_quant[name]
        points += 1
        equal += int((ours == theirs).sum())
        total += ours.numel()
    assert points >= 20 and equal >= 0.999 * total, (points, equal, total)
    # the logits on torch's output grid
    t_out = tv["fc"]
    with torch.no_grad():
        y = gm(x)
    inv = 1.0 / torch.tensor(t_out.q_scale(), dtype=torch.float32)
    ours = (torch.round(y * inv) + t_out.q_zero_point()).clamp(0, 255).to(torch.int64)
    d = (ours - t_out.int_repr().to(torch.int64)).abs()
    within = float((d <= 1).double().mean())
    line = (f"ResNet-18 vs torch.ao fbgemm: {points} quantization points, {equal} of {total} "
            f"codes equal; logits within 1 LSB {100 * within:.3f}%, equal "
            f"{100 * float((d == 0).double().mean()):.3f}%, max {int(d.max())} LSB")
    print(line)
    record_property("resnet18_vs_torchao", line)
    assert within >= 0.999

