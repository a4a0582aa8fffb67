"""Issue 14 part 3: per-channel affine ops (BatchNorm after a concatenation, ``x * param``,
``x + param``, ``x - c``, ``x / c``), channel-moving shape ops on accumulators and constant
operands lower to integers (no float islands) and the oracle agrees bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from passes_registry import get_record
from qpasses.ir.records import INT_SIM_KEY
from qpasses.algorithms.lowering.affine import moved_axis
from qpasses.modules.int_sim_affine import IntAffine, IntConstant

from .int_sim_helpers import calibrated, lower

torch.set_num_threads(1)
CONTRACTS = ("gemmlowp", "single", "float-rne", "hawq")


class CatBN(nn.Module):
    """DenseNet's pre-activation block: cat -> BN (negative gammas) -> ReLU -> conv, and a final
    BN -> ReLU -> global pool that reaches no quantizer directly."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        y = torch.relu(self.bn2(torch.cat([self.conv(y)], 1)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _init_bn(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.weight.copy_(torch.randn(c, generator=g))        # about half negative
                bn.weight[0] = 0.0                                   # a dead channel
                bn.bias.copy_(torch.randn(c, generator=g) * 0.3)
                bn.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return m.eval()


class LayerScale(nn.Module):
    """ConvNeXt's tail: linear on channels-last, permute back, ``layer_scale * x``, add."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4, 4)
        self.layer_scale = nn.Parameter(torch.tensor([0.5, -1.5, 2.0, 0.25]).reshape(4, 1, 1))
        self.shift = nn.Parameter(torch.tensor([0.1, -0.2, 0.3, 0.0]).reshape(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)          # per-channel accumulator, channels last
        y = self.fc(y).permute(0, 3, 1, 2)           # linear accumulator, channels back to dim 1
        y = self.layer_scale * y
        y = (y - self.shift) / 2.0
        return x + y


def _islands(gm) -> list[dict[str, str]]:
    return list(get_record(gm, INT_SIM_KEY).float_islands)


@pytest.mark.parametrize("rounding", CONTRACTS)
def test_bn_after_cat_lowers_bit_exact(rounding: str) -> None:
    gm, x, cal = calibrated(_init_bn(CatBN()), (2, 3, 8, 8))
    fq, gm = lower(gm, x, cal, f"rounding={rounding}", verify="samples=2")
    assert _islands(gm) == []
    mods = [m for m in gm.modules() if isinstance(m, IntAffine)]
    assert len(mods) == 2 and int((mods[0].sign < 0).sum()) > 0 and int((mods[0].sign == 0).sum()) == 1
    # each integer op fed the fake-quant graph's own input codes: at most 1 LSB off (near ties)
    v = get_record(gm, INT_SIM_KEY).verify
    assert v["local_max_lsb_diff"] <= 1 and v["oracle"] == "independent", v


@pytest.mark.parametrize("rounding", CONTRACTS)
def test_layer_scale_after_permute_lowers(rounding: str) -> None:
    gm, x, cal = calibrated(LayerScale().eval(), (2, 4, 6, 6))
    fq, gm = lower(gm, x, cal, f"rounding={rounding}", verify="samples=2")
    assert _islands(gm) == []
    assert sum(isinstance(m, IntAffine) for m in gm.modules()) >= 1


class TinyViT(nn.Module):
    """ViT's stem: patch conv, flatten + permute of its accumulator, a class token expanded to the
    batch, a position embedding added, a linear per token, the class token's row."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, 8))
        self.pos_embedding = nn.Parameter(torch.randn(1, 5, 8) * 0.5)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        y = self.proj(x).reshape(n, 8, -1).permute(0, 2, 1)
        y = torch.cat([self.class_token.expand(n, -1, -1), y], dim=1)
        y = y + self.pos_embedding
        y = torch.relu(self.fc(y))
        return self.head(y[:, 0])


@pytest.mark.parametrize("rounding", ["gemmlowp", "float-rne"])
def test_class_token_and_position_embedding_are_integer_constants(rounding: str) -> None:
    gm, x, cal = calibrated(TinyViT().eval(), (2, 3, 8, 8))
    fq, gm = lower(gm, x, cal, f"rounding={rounding}", verify="samples=2")
    assert _islands(gm) == []
    consts = [m for m in gm.modules() if isinstance(m, IntConstant)]
    assert {tuple(m.codes.shape) for m in consts} == {(1, 1, 8), (1, 5, 8)}
    # nothing float before the first quantize but the input itself: the constants are codes
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)
    # another batch size: the class token's expand reads the runtime batch
    x3 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert gm(x3).shape == (3, 3)


class PermutedAcc(nn.Module):
    """A conv accumulator moved channels-last, scaled per channel there, moved back and pooled:
    the channel axis follows both permutes, nothing is requantized before the scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.gamma = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0, -0.25]))
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1)
        y = (y * self.gamma).transpose(1, 3).transpose(2, 3)
        return self.fc(torch.relu(y).mean((2, 3)))


@pytest.mark.parametrize("rounding", CONTRACTS)
def test_channel_axis_follows_permutes(rounding: str) -> None:
    gm, x, cal = calibrated(PermutedAcc().eval(), (2, 3, 6, 6))
    fq, gm = lower(gm, x, cal, f"rounding={rounding}", verify="samples=2")
    assert _islands(gm) == []
    aff = [m for m in gm.modules() if isinstance(m, IntAffine)]
    assert len(aff) == 1 and aff[0].axis == 3 and aff[0].sign.tolist() == [1, -1, 1, 1, -1]
    names = [n.name for n in gm.graph.nodes]
    assert not any("requant" in nm for nm in names[:names.index("mul")])


def test_moved_axis() -> None:
    g = torch.fx.Graph()
    x = g.placeholder("x")
    p = g.call_method("permute", (x, 0, 2, 3, 1))
    t = g.call_method("transpose", (x, 1, 3))
    r = g.call_method("reshape", (x, 2, 5, -1))
    m = g.call_function(torch.movedim, (x, 1, -1))
    assert moved_axis(p, 1, (2, 5, 4, 4), (2, 4, 4, 5)) == 3
    assert moved_axis(p, -1, (2, 4, 4, 5), (2, 4, 5, 4)) == 2
    assert moved_axis(t, 1, (2, 5, 4, 4), (2, 4, 4, 5)) == 3
    assert moved_axis(r, 1, (2, 5, 4, 4), (2, 5, 16)) == 1
    assert moved_axis(r, 2, (2, 5, 4, 4), (2, 5, 16)) is None       # merged with dim 3
    assert moved_axis(m, 1, (2, 5, 4, 4), (2, 4, 4, 5)) == 3


def test_float_constant_operand_of_a_join_goes_onto_its_grid() -> None:
    """A constant add/cat operand without its own quantizer (removed here by hand) is quantized
    onto the join's grid at lowering; the error vs the fake-quant graph stays within 1 LSB."""
    gm, x, cal = calibrated(TinyViT().eval(), (2, 3, 8, 8))
    mods = dict(gm.named_modules())
    for n in list(gm.graph.nodes):
        src = n.args[0] if n.op == "call_module" and n.args else None
        if isinstance(src, torch.fx.Node) and src.op == "get_attr" and \
                type(mods[str(n.target)]).__name__.endswith("ActFakeQuant"):
            n.replace_all_uses_with(src)
            gm.graph.erase_node(n)
    gm.recompile()
    fq, gm = lower(gm, x, cal, verify="samples=2")
    assert _islands(gm) == []
    consts = {tuple(m.codes.shape) for m in gm.modules() if isinstance(m, IntConstant)}
    assert (1, 5, 8) in consts
    v = get_record(gm, INT_SIM_KEY).verify
    assert v["max_lsb_diff"] <= 1, v


class ScalarGain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.alpha = nn.Parameter(torch.tensor(-0.75))
        self.conv2 = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.clamp(self.alpha * self.conv(x), -1.0, 2.0))


@pytest.mark.parametrize("rounding", CONTRACTS)
def test_scalar_parameter_gain_on_an_accumulator(rounding: str) -> None:
    """One gain for every channel of a conv accumulator: per-channel multipliers on the
    accumulator grid, the clamp folded into the range of the quantizer it reaches."""
    gm, x, cal = calibrated(ScalarGain().eval(), (2, 3, 6, 6))
    fq, gm = lower(gm, x, cal, f"rounding={rounding}", verify="samples=2")
    assert _islands(gm) == []
    (aff,) = [m for m in gm.modules() if isinstance(m, IntAffine)]
    assert aff.axis == 1 and aff.sign.tolist() == [-1] * 4 and aff.rq.real.numel() == 4
    assert get_record(gm, INT_SIM_KEY).verify["local_max_lsb_diff"] <= 1
    assert not any("clamp" in n.name for n in gm.graph.nodes)


def test_onnx_export_names_the_affine_node() -> None:
    """export-onnx has no mapping for IntAffine yet: a typed ExportError naming the node."""
    pytest.importorskip("onnx")
    from qpasses.errors import ExportError
    from qpasses.export import export_onnx
    gm, x, cal = calibrated(_init_bn(CatBN()), (2, 3, 8, 8))
    _, gm = lower(gm, x, cal, "rounding=float-rne bias=int32")
    with pytest.raises(ExportError, match="IntAffine.*'bn'"):
        export_onnx(gm)
