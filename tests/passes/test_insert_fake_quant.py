"""insert-fake-quant: module swap at stable paths, one activation node per tensor (scale sharing),
joins, float islands, functional layers, per-kernel/0-bit weights, every scheme runs forward and
backward, idempotence, the fake-quant-inserted checker, and the user's model is untouched."""
from __future__ import annotations

import copy
import json
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import qpasses
from passes_registry import (PassContext, PassManager, PropertyError, graph_properties,
                             parse_pipeline)
from qpasses import get_qmeta
from qpasses.modules.fake_quant import (ActFakeQuant, AffineActFakeQuant, LSQActFakeQuant,
                                        PACTActFakeQuant, WeightFakeQuant)
from qpasses.modules.fake_quant_layers import FakeQuantConv2d, FakeQuantLinear
from qpasses.modules.lookup import (is_act_fq_node, join_output_fq_node, layer_act_fq_node,
                                    layer_weight_quantizer)
from qpasses.analyses.properties import check_fake_quant_inserted
from tests.models import TinyCNN


def run(gm, text, ctx=None):
    with ctx or PassContext():
        return PassManager.parse(f"graph({text})", assume=gm).run(gm)


ANNOTATE = "annotate-bitwidths{weight-bits=4 act-bits=4 first-last-bits=8}"


def nodes_of(gm):
    return {n.name: n for n in gm.graph.nodes}


@pytest.fixture(scope="module")
def resnet_model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture
def resnet(resnet_model):
    return qpasses.trace(resnet_model, torch.randn(1, 3, 32, 32))


class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.lw = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):
        y = torch.relu(F.conv2d(x, self.w, padding=1))
        return F.linear(y.mean((2, 3)), self.lw)


class StdConv(nn.Conv2d):
    """Weight-standardised conv: overrides forward."""

    def forward(self, x):
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return self._conv_forward(x, w, self.bias)


class WithStdConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.std = StdConv(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.std(x)).mean((2, 3)))


def test_layer_paths_and_layer_info_unchanged(resnet):
    run(resnet, ANNOTATE)
    before = qpasses.quantizable_layers(resnet)
    names_before = [r["name"] for r in qpasses.report(resnet)["layers"]]
    run(resnet, "insert-fake-quant")
    assert qpasses.quantizable_layers(resnet) == before
    assert [r["name"] for r in qpasses.report(resnet)["layers"]] == names_before
    conv = resnet.get_submodule("layer1.0.conv1")
    assert type(conv) is FakeQuantConv2d and isinstance(conv.weight_fake_quant, WeightFakeQuant)
    assert type(resnet.get_submodule("fc")) is FakeQuantLinear
    assert "fake-quant-inserted" in graph_properties(resnet)
    assert check_fake_quant_inserted(resnet) == []
    # first/last pinning carried into the quantizers
    assert resnet.get_submodule("conv1").weight_fake_quant.bits.unique().tolist() == [8]
    assert resnet.get_submodule("layer1.0.conv1").weight_fake_quant.bits.unique().tolist() == [4]


def test_one_node_per_tensor_shared_by_its_quantized_consumers(resnet):
    run(resnet, f"{ANNOTATE},insert-fake-quant")
    nodes = nodes_of(resnet)
    infos = {i.name: i for i in qpasses.quantizable_layers(resnet)}
    a = layer_act_fq_node(resnet, nodes[infos["layer2.0.conv1"].node])
    b = layer_act_fq_node(resnet, nodes[infos["layer2.0.downsample.0"].node])
    assert a is not None and a is b
    sources = [n.args[0].name for n in resnet.graph.nodes if is_act_fq_node(resnet, n)]
    assert len(sources) == len(set(sources))  # one node per quantized tensor


@pytest.mark.parametrize("mode", ["shared", "per-tensor"])
def test_add_joins_quantize_inputs_and_output(resnet, mode):
    run(resnet, f"{ANNOTATE},insert-fake-quant{{join-scales={mode}}}")
    adds = [n for n in resnet.graph.nodes if n.target is operator.add]
    assert len(adds) == 8
    for add in adds:
        ins = [a for a in add.args if isinstance(a, torch.fx.Node)]
        assert all(is_act_fq_node(resnet, a) for a in ins)
        out = join_output_fq_node(resnet, add)
        assert out is not None and list(add.users) == [out]
        targets = {a.target for a in ins} | {out.target}
        assert len(targets) == (1 if mode == "shared" else 3)
        assert get_qmeta(add).output.scheme == "asymmetric"


def test_cat_join_and_scale_sharing():
    gm = qpasses.trace(CatNet(), torch.randn(1, 3, 4, 4))
    run(gm, f"{ANNOTATE},insert-fake-quant")
    cat = next(n for n in gm.graph.nodes if n.target is torch.cat)
    ins = cat.args[0]
    out = join_output_fq_node(gm, cat)
    assert all(is_act_fq_node(gm, a) for a in ins) and out is not None
    assert {a.target for a in ins} == {out.target}  # one shared quantizer module
    c = next(n for n in gm.graph.nodes if n.target == "c")
    assert c.args[0] is out  # the layer reads the quantized join output, not a second quantizer
    assert not get_qmeta(cat).output.signed  # cat of relus: unsigned (from annotate-bitwidths)
    gm(torch.randn(2, 3, 4, 4)).sum().backward()


def test_float_islands_get_nothing(resnet):
    run(resnet, f"annotate-bitwidths{{skip={{fc,layer4.1.conv2}}}},insert-fake-quant")
    assert type(resnet.get_submodule("fc")) is nn.Linear
    assert type(resnet.get_submodule("layer4.1.conv2")) is nn.Conv2d
    nodes = nodes_of(resnet)
    infos = {i.name: i for i in qpasses.quantizable_layers(resnet)}
    assert layer_act_fq_node(resnet, nodes[infos["fc"].node]) is None
    assert layer_act_fq_node(resnet, nodes[infos["layer4.1.conv2"].node]) is None
    assert check_fake_quant_inserted(resnet) == []


def test_functional_layers_get_weight_nodes_and_keep_layer_info():
    gm = qpasses.trace(FunctionalNet(), torch.randn(1, 3, 6, 6))
    run(gm, "annotate-bitwidths{first-last-bits=none weight-bits=3}")
    before = qpasses.quantizable_layers(gm)
    run(gm, "insert-fake-quant")
    assert qpasses.quantizable_layers(gm) == before
    nodes = nodes_of(gm)
    for info in before:
        wq = layer_weight_quantizer(gm, nodes[info.node])
        assert isinstance(wq, WeightFakeQuant) and wq.bits.unique().tolist() == [3]
    assert sorted(gm.weight_fake_quant.keys()) == ["lw", "w"]
    x = torch.randn(2, 3, 6, 6)
    gm(x).sum().backward()
    assert gm.w.grad is not None and gm.lw.grad is not None


def test_layer_overriding_forward_becomes_a_visible_float_island():
    # traced through by default (then it is not a layer); kept as a leaf it is a Conv2d layer
    gm = qpasses.trace(WithStdConv(), torch.randn(1, 3, 6, 6), leaf_modules=[StdConv])
    run(gm, "annotate-bitwidths")
    with pytest.warns(UserWarning, match="'std' stays in float"):
        run(gm, "insert-fake-quant")
    assert type(gm.get_submodule("std")) is StdConv
    row = {r["name"]: r for r in qpasses.report(gm)["layers"]}
    assert "std" in row  # still reported (graph.py looks up layers by isinstance)
    std_node = next(n for n in gm.graph.nodes if n.target == "std")
    assert "overrides forward" in get_qmeta(std_node).float_island


def test_per_kernel_and_zero_bit_kernels(tmp_path):
    torch.manual_seed(0)
    cfg = tmp_path / "bits.json"
    cfg.write_text(json.dumps({"conv2": {"weight_bits": [0, 2, 4, 8, 0, 3, 3, 3]}}))
    gm = qpasses.trace(TinyCNN(), torch.randn(1, 3, 8, 8))
    run(gm, f"canonicalize,fold-batch-norm,annotate-bitwidths{{config={cfg}}},insert-fake-quant")
    conv2 = gm.get_submodule("conv2")
    wq = conv2.weight_fake_quant
    assert wq.bits.tolist() == [0, 2, 4, 8, 0, 3, 3, 3] and wq.per_kernel
    qw = wq(conv2.weight)
    assert torch.equal(qw[0], torch.zeros_like(qw[0])) and torch.equal(qw[4], torch.zeros_like(qw[4]))
    assert (qw[1].unique().numel() <= 4) and (qw[5].unique().numel() <= 8)
    spec = get_qmeta(next(n for n in gm.graph.nodes if n.target == "conv2")).weight
    assert spec.bits_per_kernel == (0, 2, 4, 8, 0, 3, 3, 3) and spec.axis == 0
    gm(torch.randn(2, 3, 8, 8)).sum().backward()
    assert torch.equal(conv2.weight.grad[0], torch.zeros_like(conv2.weight.grad[0]))


@pytest.mark.parametrize("wscheme", ["symmetric", "asymmetric", "dorefa"])
@pytest.mark.parametrize("ascheme", ["affine", "symmetric", "pact", "lsq"])
def test_every_scheme_runs_forward_and_backward(wscheme, ascheme):
    torch.manual_seed(0)
    gm = qpasses.trace(TinyCNN(), torch.randn(1, 3, 8, 8))
    run(gm, f"canonicalize,fold-batch-norm,{ANNOTATE},"
            f"insert-fake-quant{{weight-scheme={wscheme} act-scheme={ascheme} per-channel=false}}")
    gm.train()
    x = torch.randn(4, 3, 8, 8)
    out = gm(x)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in gm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    acts = [m for m in gm.modules() if isinstance(m, ActFakeQuant)]
    kind = {"affine": AffineActFakeQuant, "symmetric": AffineActFakeQuant,
            "pact": PACTActFakeQuant, "lsq": LSQActFakeQuant}[ascheme]
    assert acts and all(type(m) is kind for m in acts)
    # the implemented scheme is recorded in QMeta
    conv2 = next(n for n in gm.graph.nodes if n.target == "conv2")
    q = get_qmeta(conv2)
    assert q.weight.scheme == wscheme and q.weight.axis is None
    expected_act = {"affine": "asymmetric", "symmetric": "symmetric", "pact": "pact",
                    "lsq": "lsq"}[ascheme]
    # conv2 reads relu(...), but that tensor is also an addend of the residual add with conv2's
    # (signed) output: one sharing group, so signed
    assert q.act.scheme == expected_act and q.act.signed


def test_signed_inputs_get_signed_quantizers(resnet):
    run(resnet, f"{ANNOTATE},insert-fake-quant{{act-scheme=pact}}")
    x_node = layer_act_fq_node(resnet, next(n for n in resnet.graph.nodes if n.target == "conv1"))
    assert resnet.get_submodule(x_node.target).signed  # the image
    relu_q = layer_act_fq_node(resnet, next(n for n in resnet.graph.nodes
                                            if n.target == "layer1.0.conv2"))
    assert not resnet.get_submodule(relu_q.target).signed


def test_idempotent_and_checker_finds_bypassed_quantizer():
    gm = qpasses.trace(TinyCNN(), torch.randn(1, 3, 8, 8))
    run(gm, f"{ANNOTATE},insert-fake-quant")
    code = gm.code
    out = PassManager.parse("graph(insert-fake-quant)", assume=gm).run(gm)
    assert out.code == code
    assert check_fake_quant_inserted(gm) == []
    fc = next(n for n in gm.graph.nodes if n.target == "fc")
    fq = fc.args[0]
    fc.replace_input_with(fq, fq.args[0])
    problems = check_fake_quant_inserted(gm)
    assert problems == ["layer 'fc' has an act spec but its input is not fake-quantized"]


def test_requires_bits_annotated_and_pipeline_text_round_trips():
    with pytest.raises(PropertyError, match="requires property 'bits-annotated'"):
        PassManager.parse("graph(insert-fake-quant)", assume=())
    text = ("graph(annotate-bitwidths,insert-fake-quant{act-scheme=lsq join-scales=per-tensor "
            "observer=moving-average weight-scheme=dorefa},calibrate{method=kl num-batches=2})")
    p = parse_pipeline(text)
    assert parse_pipeline(p.to_text()) == p
    p = parse_pipeline("graph(ptq-int8{clip=percentile})")
    assert parse_pipeline(p.to_text()) == p
    assert "observer=percentile" in p.to_text() and "method=percentile" in p.to_text()


def test_bad_options_are_typed():
    from passes_registry import OptionError, PipelineParseError
    with pytest.raises((OptionError, PipelineParseError), match="act-scheme"):
        PassManager.parse("graph(annotate-bitwidths,insert-fake-quant{act-scheme=log2})")
    with pytest.raises((OptionError, PipelineParseError), match="pact-alpha"):
        PassManager.parse("graph(annotate-bitwidths,insert-fake-quant{pact-alpha=-1.0})")
    gm = qpasses.trace(TinyCNN(), torch.randn(1, 3, 8, 8))
    with pytest.raises(OptionError, match=r"aciq tables cover 1\.\.8 bits.*16 bits"):
        run(gm, "annotate-bitwidths{act-bits=16},insert-fake-quant{observer=aciq}")


def test_users_model_is_never_mutated(resnet_model):
    before = copy.deepcopy(resnet_model.state_dict())
    types = [type(m) for m in resnet_model.modules()]
    gm = qpasses.trace(resnet_model, torch.randn(1, 3, 32, 32))
    run(gm, f"canonicalize,fold-batch-norm,{ANNOTATE},insert-fake-quant")
    gm(torch.randn(2, 3, 32, 32)).sum().backward()
    assert [type(m) for m in resnet_model.modules()] == types
    after = resnet_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in resnet_model.parameters())


def test_fake_quant_graph_trains_under_verify_each_with_resnet(resnet):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no surprise warnings from the pipeline
        run(resnet, f"canonicalize,fold-batch-norm,{ANNOTATE},insert-fake-quant,dce")
    resnet.train()
    opt = torch.optim.SGD(resnet.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(resnet(x), y)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
