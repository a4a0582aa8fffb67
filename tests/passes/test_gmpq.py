"""GMPQ passes: insert-gmpq-supernet / select-gmpq-policy (docs/algorithms.md, "GMPQ")."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager, get_record
from passes_registry.errors import OptionError, PropertyError
from qpasses.errors import AnnotationError, BudgetError, QpassesWarning
from qpasses.algorithms import gmpq
from qpasses.modules import gmpq as gmpq_modules

from ..conftest import DigitsCNN

X = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([1, 2, 3, 4])


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _run(gm, text, assume=None):
    pm = PassManager.parse(text, assume=assume if assume is not None else frozenset())
    with PassContext(example_inputs=(X,), calibration_data=[X]):
        return pm.run(gm)


def _supernet(opts: str = "", model: nn.Module | None = None,
              annotate: str = "weight-bits=4 act-bits=4"):
    torch.manual_seed(0)
    gm = qpasses.trace((model or DigitsCNN()).eval(), (X,))
    return _run(gm, f"graph(annotate-bitwidths{{{annotate}}},insert-gmpq-supernet{{{opts}}})")


def _select(gm, opts: str = ""):
    gm.eval()
    return _run(gm, f"graph(select-gmpq-policy{{{opts}}})", assume=gm)


def _set_logits(gm, choice: dict[str, tuple[int, int]]):
    """Make (w_bits, a_bits) the argmax of the named layers."""
    with torch.no_grad():
        for name, (wb, ab) in choice.items():
            wm, am = gmpq_modules.supernet_modules(gm)[name]
            wm.logits.copy_(torch.tensor([3.0 if b == wb else 0.0 for b in wm.candidates]))
            am.logits.copy_(torch.tensor([3.0 if b == ab else 0.0 for b in am.candidates]))


# -- insert-gmpq-supernet ---------------------------------------------------------------------------

def test_insert_builds_composite_layers_and_pins_first_last():
    gm = _supernet("w-candidates=[2,3,4,6] a-candidates=[2,4]")
    mods = gmpq_modules.supernet_modules(gm)
    assert list(mods) == ["conv2", "conv3"]
    assert type(gm.get_submodule("conv1")) is nn.Conv2d     # stem and classifier stay float
    assert type(gm.get_submodule("fc")) is nn.Linear
    wm, am = mods["conv2"]
    assert wm.candidates == (2, 3, 4, 6) and am.candidates == (2, 4)
    assert torch.allclose(wm.probs(), torch.full((4,), 0.25))
    assert mods["conv3"][1].signed          # its input also feeds the residual add (signed)
    assert not am.signed
    tap = get_record(gm, gmpq_modules.GMPQ_META).tap
    tap_node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == tap)
    assert tap_node.args[0].name == "relu_2" and [u.name for u in tap_node.users] == ["pool"]
    assert gm(X).shape == (4, 10)
    all_searched = _supernet("pin-first-last=false")
    assert list(gmpq_modules.supernet_modules(all_searched)) == ["conv1", "conv2", "conv3", "fc"]


def test_user_model_never_modified():
    model = DigitsCNN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = _supernet(model=model)
    teacher = gmpq.make_teacher(model, gm)
    gm.train()
    loss = gmpq.search_loss(gm, X, Y, teacher=teacher, zeta=1.0, eta=1.0)
    loss.total.backward()
    torch.optim.SGD(gm.parameters(), lr=0.5).step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.conv2) is nn.Conv2d and not hasattr(model.conv2, "weight_fake_quant")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("opt, match", [
    ("w-candidates=[]", "empty"),
    ("a-candidates={}", "empty"),
    ("w-candidates=[1,2]", "needs >= 2 bits"),
    ("a-candidates=[2,2,4]", "twice"),
    ("a-candidates=[0,2]", "1..32"),
    ("pact-alpha=0", "> 0"),
])
def test_bad_options_typed(opt, match):
    with pytest.raises(OptionError, match=match):
        PassManager.parse(f"graph(annotate-bitwidths,insert-gmpq-supernet{{{opt}}})")


def test_signed_input_needs_two_bits():
    with pytest.raises(OptionError, match="'conv3' reads a signed input"):
        _supernet("a-candidates=[1,2,4]")


def test_requires_annotations_and_rejects_double_insertion():
    with pytest.raises(PropertyError):
        PassManager.parse("graph(insert-gmpq-supernet)", assume=())
    with pytest.raises(PropertyError):
        PassManager.parse("graph(select-gmpq-policy)", assume=())
    gm = _supernet()
    with pytest.raises(AnnotationError, match="already has a GMPQ supernet"):
        _run(gm, "graph(annotate-bitwidths,insert-gmpq-supernet)")
    fq = qpasses.trace(DigitsCNN().eval(), (X,))
    with pytest.raises(AnnotationError, match="already has a weight quantizer"):
        _run(fq, "graph(annotate-bitwidths,insert-fake-quant,insert-gmpq-supernet)")


def test_model_without_conv_feature_map():
    with pytest.raises(AnnotationError, match=r"feature-node=NODE.*feature-node=none"):
        _supernet(model=MLP())
    gm = _supernet("feature-node=none", model=MLP())    # EdMIPS-style search still works
    assert list(gmpq_modules.supernet_modules(gm)) == ["fc2"]
    assert float(gmpq.search_loss(gm, X, Y, zeta=1.0).total.detach()) > 0
    with pytest.raises(AnnotationError, match="make_teacher needs a supernet with a feature tap"):
        gmpq.make_teacher(MLP(), gm)


def test_feature_node_option_picks_the_layer():
    gm = _supernet("feature-node=relu_1")
    assert get_record(gm, gmpq_modules.GMPQ_META).feature == "relu_1"
    assert tuple(get_record(gm, gmpq_modules.GMPQ_META).feature_shape) == (4, 32, 4, 4)
    by_module = _supernet("feature-node=bn3")                 # a module path works too
    assert get_record(by_module, gmpq_modules.GMPQ_META).feature == "bn3"
    with pytest.raises(AnnotationError, match="did you mean.*relu_1"):
        _supernet("feature-node=relu_11")


@pytest.mark.parametrize("node", ["flatten", "pool"])   # pool's output is N×C×1×1
def test_feature_node_must_be_a_map(node):
    with pytest.raises(AnnotationError, match="H·W > 1"):
        _supernet(f"feature-node={node}")


# -- select-gmpq-policy -----------------------------------------------------------------------------

def test_select_before_training_warns_uniform_pi():
    gm = _supernet()
    with pytest.warns(QpassesWarning, match="uniform"):
        out = _select(gm)
    rep = {r["name"]: r for r in qpasses.report(out)["layers"]}
    assert rep["conv2"]["w_bits"] == 2 and rep["conv2"]["a_bits"] == 2   # first candidate
    assert rep["conv1"]["w_bits"] == 8 and rep["fc"]["w_bits"] == 8     # pinned: annotations
    # in one pipeline too (statically valid), still warned
    torch.manual_seed(0)
    gm2 = qpasses.trace(DigitsCNN().eval(), (X,))
    with pytest.warns(QpassesWarning, match="uniform"):
        _run(gm2, "graph(annotate-bitwidths,insert-gmpq-supernet,select-gmpq-policy)")


def test_select_weights_and_activations_independently():
    gm = _supernet("w-candidates=[2,3,4] a-candidates=[2,3,4]")
    _set_logits(gm, {"conv2": (4, 2), "conv3": (2, 3)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", QpassesWarning)
        out = _select(gm)
    rep = {r["name"]: r for r in qpasses.report(out)["layers"]}
    assert (rep["conv2"]["w_bits"], rep["conv2"]["a_bits"]) == (4, 2)
    assert (rep["conv3"]["w_bits"], rep["conv3"]["a_bits"]) == (2, 3)
    # the join sharing conv3's input got the same width
    add = next(n for n in out.graph.nodes if n.name == "add")
    assert add.meta["qpasses"].output.bits == 3
    # the supernet is gone, the trained weights and learned values are kept
    assert type(out.get_submodule("conv2")) is nn.Conv2d
    assert "gmpq_act" not in out._modules and not any("gmpq" in n.name for n in out.graph.nodes)
    sel = get_record(out, gmpq_modules.SELECTED_META).layers
    assert sel["conv2"].w_bits == 4 and sel["conv2"].a_bits == 2
    assert sel["conv2"].pi_w[2] > 0.8 and sel["conv2"].alpha == pytest.approx(6.0)
    # ordinary annotations: the standard passes apply
    q = _run(out, "graph(insert-fake-quant{act-scheme=pact},calibrate)", assume=out)
    assert q(X).shape == (4, 10)


def test_select_projects_onto_exact_budget():
    gm = _supernet("w-candidates=[2,3,4,5,6,7,8]")
    _set_logits(gm, {"conv2": (8, 4), "conv3": (8, 4)})
    argmax = qpasses.report(_select(_copy(gm)))["totals"]["bitops"] / 1e9
    target = argmax * 0.8
    out = _select(gm, f"target-bitops={target!r}")
    got = qpasses.report(out)["totals"]["bitops"] / 1e9
    assert got <= target * (1 + 1e-9) and got >= 0.9 * target
    rep = {r["name"]: r for r in qpasses.report(out)["layers"]}
    assert rep["conv2"]["a_bits"] == 4 and rep["conv3"]["a_bits"] == 4   # activations stay
    assert rep["conv2"]["w_bits"] < 8 or rep["conv3"]["w_bits"] < 8
    # argmax under the budget: the projection spends it (raises bits), still from below
    low = _supernet("w-candidates=[2,3,4,5,6,7,8]")
    _set_logits(low, {"conv2": (2, 4), "conv3": (2, 4)})
    cheap = qpasses.report(_select(_copy(low)))["totals"]["bitops"] / 1e9
    out = _select(low, f"target-bitops={cheap * 1.3!r}")
    got = qpasses.report(out)["totals"]["bitops"] / 1e9
    assert cheap * 1.2 < got <= cheap * 1.3 * (1 + 1e-9)
    gm2 = _supernet()
    _set_logits(gm2, {"conv2": (4, 4), "conv3": (4, 4)})
    with pytest.raises(BudgetError, match="select-gmpq-policy.*target-bitops"):
        _select(gm2, "target-bitops=1e-9")
    with pytest.raises(OptionError, match="positive"):
        PassManager.parse("graph(select-gmpq-policy{target-bitops=-1})")


def _copy(gm):
    import copy
    return copy.deepcopy(gm)


def test_search_moves_pi_toward_cheaper_bits_with_large_zeta():
    model = DigitsCNN().eval()
    gm = _supernet(model=model).train()
    teacher = gmpq.make_teacher(model, gm)
    arch = gmpq_modules.arch_parameters(gm)
    ids = {id(p) for p in arch}
    opt_w = torch.optim.SGD([p for p in gm.parameters() if id(p) not in ids], lr=0.01)
    opt_a = torch.optim.SGD(arch, lr=0.5, momentum=0.9, weight_decay=1e-4)
    start = float(gmpq.expected_bitops(gm, detach=True))
    for _ in range(5):
        loss = gmpq.search_loss(gm, X, Y, teacher=teacher, zeta=1e4, eta=1.0)
        opt_w.zero_grad()
        opt_a.zero_grad()
        loss.total.backward()
        opt_w.step()
        opt_a.step()
    assert float(gmpq.expected_bitops(gm, detach=True)) < 0.9 * start
    out = _select(gm)
    rep = {r["name"]: r for r in qpasses.report(out)["layers"]}
    assert rep["conv2"]["w_bits"] == 2 and rep["conv2"]["a_bits"] == 2


def test_pipeline_text_round_trips():
    t = ("graph(annotate-bitwidths,insert-gmpq-supernet{w-candidates=[2,3,4,6] "
         "a-candidates=[2,3,4,6] pin-first-last=false feature-node=none},"
         "select-gmpq-policy{target-bitops=0.5})")
    once = str(PassManager.parse(t))
    assert str(PassManager.parse(once)) == once
    assert "feature-node=none" in once and "a-candidates={2,3,4,6}" in once


def test_unreachable_budget_keeps_the_supernet_and_retry_works():
    from passes_registry.printing import fingerprint
    gm = _supernet("w-candidates=[2,3,4,5,6,7,8]")
    _set_logits(gm, {"conv2": (8, 4), "conv3": (8, 4)})
    params = {n: p for n, p in gm.named_parameters()}
    before = fingerprint(gm)
    with pytest.raises(BudgetError, match="select-gmpq-policy.*target-bitops"):
        _select(gm, "target-bitops=1e-9")
    assert fingerprint(gm) == before
    assert all(p is params[n] for n, p in gm.named_parameters())
    assert get_record(gm, "qpasses.gmpq") is not None
    argmax = qpasses.report(_select(_copy(gm)))["totals"]["bitops"] / 1e9
    out = _select(gm, f"target-bitops={argmax * 0.8!r}")
    assert qpasses.report(out)["totals"]["bitops"] / 1e9 <= argmax * 0.8 * (1 + 1e-9)
