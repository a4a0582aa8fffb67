"""GMPQ math (docs/algorithms.md, "GMPQ"): composite convolution, R_C and p, Grad-CAM, R_G,
and double backprop through every quantizer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager, get_record
from qpasses.errors import AnnotationError, InputError, NumericsError
from qpasses.modules.fake_quant_layers import wrap_layer
from qpasses.ir.layers import quantizable_layers
from qpasses.algorithms import gmpq
from qpasses.modules import gmpq as gmpq_modules

from ..conftest import DigitsCNN

X = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 3, 5, 9])


class ConvGapFC(nn.Module):
    """conv -> relu -> conv -> relu -> GAP -> linear: Grad-CAM has a closed form here."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1))


def _supernet(model: nn.Module, opts: str = "", annotate: str = "weight-bits=4 act-bits=4"):
    gm = qpasses.trace(model, (X,))
    pm = PassManager.parse(f"graph(annotate-bitwidths{{{annotate}}},"
                           f"insert-gmpq-supernet{{{opts}}})")
    with PassContext(example_inputs=(X,)):
        return pm.run(gm)


def _ref_weight(w: torch.Tensor, b: int) -> torch.Tensor:
    t = w.abs().max()
    step = t / (2 ** (b - 1) - 1)
    return torch.round(torch.clamp(w, -t, t) / step) * step


def _ref_act(x: torch.Tensor, alpha: float, b: int, signed: bool = False) -> torch.Tensor:
    step = alpha / (2 ** (b - 1) - 1 if signed else 2 ** b - 1)
    return torch.round(torch.clamp(x, -alpha if signed else 0, alpha) / step) * step


# -- (i) composite convolution ---------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(w_c=st.lists(st.integers(2, 8), min_size=1, max_size=4, unique=True),
       a_c=st.lists(st.integers(1, 8), min_size=1, max_size=4, unique=True),
       seed=st.integers(0, 2 ** 16), stride=st.sampled_from([1, 2]), signed=st.booleans())
def test_composite_conv_equals_double_sum_over_branches(w_c, a_c, seed, stride, signed):
    a_c = [b + 1 for b in a_c] if signed else a_c          # signed grids need >= 2 bits
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
    wm = gmpq_modules.GMPQWeightMixer(w_c).double()
    am = gmpq_modules.GMPQActMixer(a_c, alpha_init=1.5, signed=signed).double()
    with torch.no_grad():
        wm.logits.copy_(torch.randn(len(w_c), generator=g, dtype=torch.float64))
        am.logits.copy_(torch.randn(len(a_c), generator=g, dtype=torch.float64))
        am.alpha.copy_(0.5 + torch.rand(len(a_c), generator=g, dtype=torch.float64) * 2)
    layer = wrap_layer(conv, wm)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64) * 1.5
    out = layer(am(x))
    pw, pa = torch.softmax(wm.logits, 0), torch.softmax(am.logits, 0)
    explicit = sum(pw[i] * pa[j] * F.conv2d(_ref_act(x, am.alpha[j].item(), bj, signed),
                                            _ref_weight(conv.weight.detach(), bi), conv.bias,
                                            stride=stride, padding=1)
                   for i, bi in enumerate(w_c) for j, bj in enumerate(a_c))
    torch.testing.assert_close(out, explicit, rtol=1e-9, atol=1e-9)


def test_weight_threshold_frozen_and_plain_ste():
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    wm = gmpq_modules.GMPQWeightMixer((2, 3))
    wm(w)
    t0 = float(wm.threshold)
    assert t0 == pytest.approx(float(w.abs().max()))
    w2 = (w * 3).requires_grad_(True)     # beyond T: clamped in value, gradient still 1
    out = wm(w2)
    assert float(wm.threshold) == t0
    assert float(out.detach().abs().max()) <= t0 + 1e-6
    out.sum().backward()
    assert torch.equal(w2.grad, torch.ones_like(w2))
    # 3-bit branch: 7 symmetric levels including 0
    levels = torch.unique(wm.branches(w)[1])
    assert len(levels) <= 7 and torch.isclose(levels, torch.zeros(())).any()


def test_act_alpha_gradient_is_pact():
    x = torch.linspace(-1, 5, 101)
    am = gmpq_modules.GMPQActMixer((2, 4), alpha_init=2.0)
    with torch.no_grad():
        am.alpha.copy_(torch.tensor([1.0, 3.0]))
    am(x).sum().backward()
    pi = torch.softmax(am.logits.detach(), 0)
    expected = pi * torch.stack([(x > 1.0).sum(), (x > 3.0).sum()]).float()
    torch.testing.assert_close(am.alpha.grad, expected)


# -- (ii) R_C and p ------------------------------------------------------------------------------

def test_uniform_pi_closed_form_complexity_and_p():
    gm = _supernet(DigitsCNN().eval(), "w-candidates=[2,3,4,6] a-candidates=[2,3,4,6]")
    searched = list(gmpq_modules.supernet_modules(gm))
    macs = {i.name: i.macs for i in quantizable_layers(gm)}
    mean = (2 + 3 + 4 + 6) / 4
    expected = sum(macs[n] for n in searched) * mean * mean
    assert float(gmpq.complexity_loss(gm).detach()) == pytest.approx(expected / 1e9, rel=1e-12)
    normalized = gmpq.complexity_loss(gm, "first-layer")
    assert float(normalized.detach()) == pytest.approx(expected / macs[searched[0]], rel=1e-12)
    assert gmpq.capacity_p(gm) == pytest.approx(1.7067, abs=1e-4)
    assert gmpq.capacity_p(gm) == pytest.approx(24 / 14.0625, rel=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 16))
@example(seed=3978)   # a small component from a float32 cancellation (see the atol below)
def test_complexity_matches_expected_bits_and_gradient(seed):
    gm = _supernet(DigitsCNN().eval(), "pin-first-last=false")
    g = torch.Generator().manual_seed(seed)
    mods = gmpq_modules.supernet_modules(gm)
    with torch.no_grad():
        for wm, am in mods.values():
            wm.logits.copy_(torch.randn(3, generator=g) * 2)
            if am is not None:
                am.logits.copy_(torch.randn(3, generator=g) * 2)
    macs = {i.name: i.macs for i in quantizable_layers(gm)}
    e = {n: (float(wm.expected_bits().detach()), float(am.expected_bits().detach()) if am else 32.0)
         for n, (wm, am) in mods.items()}
    expected = sum(macs[n] * ew * ea for n, (ew, ea) in e.items()) / 1e9
    rc = gmpq.complexity_loss(gm)
    assert float(rc.detach()) == pytest.approx(expected, rel=1e-6)
    rc.backward()
    wm = mods["conv2"][0]
    pi = torch.softmax(wm.logits.detach(), 0)
    bits = torch.tensor([2.0, 3.0, 4.0])
    d_e = pi * (bits - (pi * bits).sum())                # dE[b]/dlogits
    scale = macs["conv2"] * e["conv2"][1] / 1e9
    want = d_e * scale
    # d_e = pi·(b − E[b]) cancels: float32 errors scale with the terms (b·scale, b <= 4), not
    # with the result, whose middle component can be far smaller than the others
    torch.testing.assert_close(wm.logits.grad, want, rtol=1e-4,
                               atol=1e-4 * float(bits.max()) * scale)


# -- (iii) Grad-CAM ------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["mean", "sum"])
def test_gradcam_of_linear_gap_head_is_closed_form(weights):
    torch.manual_seed(0)
    model = ConvGapFC().eval()
    gm = _supernet(model)
    teacher = gmpq.make_teacher(model, gm)
    logits, a = gmpq.forward_with_feature(teacher, X)
    cam = gmpq.grad_cam(logits, a, Y, weights=weights)
    hw = a.shape[2] * a.shape[3]
    w_t = model.fc.weight.detach()[Y]                      # (N, C)
    expected = torch.relu((w_t[:, :, None, None] * a.detach()).sum(1, keepdim=True)
                          / (hw if weights == "mean" else 1))
    torch.testing.assert_close(cam, expected, rtol=1e-5, atol=1e-6)
    # the student (classifier pinned in float): same closed form, with a graph to differentiate
    s_logits, s_a = gmpq.forward_with_feature(gm, X)
    s_cam = gmpq.grad_cam(s_logits, s_a, Y, weights=weights, create_graph=True)
    assert s_cam.requires_grad
    w_s = gm.fc.weight.detach()[Y]
    torch.testing.assert_close(s_cam.detach(), torch.relu(
        (w_s[:, :, None, None] * s_a.detach()).sum(1, keepdim=True)
        / (hw if weights == "mean" else 1)), rtol=1e-5, atol=1e-6)


def test_teacher_is_a_frozen_copy_and_checks_architecture():
    torch.manual_seed(0)
    model = ConvGapFC().train()
    gm = _supernet(model)
    teacher = gmpq.make_teacher(model, gm)
    assert all(p.requires_grad for p in model.parameters()) and model.training
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert teacher.conv1.weight.data_ptr() != model.conv1.weight.data_ptr()
    with pytest.raises(InputError, match="differs .* layer 'conv1'"):
        gmpq.make_teacher(ConvGapFC(c=8), gm)
    with pytest.raises(InputError, match="not a GMPQ supernet"):
        gmpq.make_teacher(gm, gm)
    with pytest.raises(InputError, match="mode"):
        gmpq.make_teacher(model, gm, mode="bogus")
    train_teacher = gmpq.make_teacher(model, gm, mode="train")
    before = train_teacher.get_submodule("conv1").weight.clone()
    gmpq.teacher_attribution(train_teacher, X, Y)
    assert train_teacher.training and torch.equal(before, train_teacher.conv1.weight)


# -- double backprop -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["weight", "act", "act-signed"])
def test_double_backprop_through_every_quantizer(kind):
    """gradcheck of ``(v, logits) -> ∂(Q(x)·v)/∂x`` built with create_graph: the backward of each
    quantizer's backward is correct (STE and PACT masks, softmax mixing)."""
    g = torch.Generator().manual_seed(3)
    if kind == "weight":
        q = gmpq_modules.GMPQWeightMixer((2, 3, 4)).double()
        x = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    else:
        q = gmpq_modules.GMPQActMixer((2, 3, 4) if kind == "act-signed" else (1, 2, 4),
                              signed=kind == "act-signed").double()
        with torch.no_grad():   # distinct clips: distinct masks per branch
            q.alpha.copy_(torch.tensor([0.8, 1.3, 2.0]))
        x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    x.requires_grad_(True)
    q(x)   # fixes the weight threshold

    def input_grad(v, logits):
        out = torch.func.functional_call(q, {"logits": logits}, (x,))
        return torch.autograd.grad((out * v).sum(), x, create_graph=True)[0]

    v = torch.randn(x.shape, generator=g, dtype=torch.float64, requires_grad=True)
    lg = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(input_grad, (v, lg), eps=1e-6, atol=1e-6)
    (g1,) = torch.autograd.grad((q(x) * v.detach()).sum(), x, create_graph=True)
    if kind == "weight":   # plain STE: ∂/∂W is the identity whatever π is
        assert torch.equal(g1, v.detach())
        return
    # a second-order loss reaches the module's logits through the first gradient
    g1.pow(2).sum().backward()
    assert q.logits.grad is not None and float(q.logits.grad.abs().sum()) > 0


def test_attribution_loss_gradient_through_gradcam_is_exact():
    """R_G depends on the classifier's logits only through G = ∂f/∂A: gradcheck of the double
    backprop path (the classifier is searched: weight mixer and input mixer)."""
    torch.manual_seed(1)
    model = ConvGapFC().eval()
    x = X.double()
    gm = _supernet(model, "pin-first-last=false").double().eval()
    teacher = gmpq.make_teacher(model, gm).double()
    m_f = gmpq.teacher_attribution(teacher, x, Y)
    act = gmpq_modules.supernet_modules(gm)["fc"][1]
    with torch.no_grad():   # distinct clips, so G depends on π_a (equal clips: equal masks)
        act.alpha.copy_(torch.tensor([0.05, 0.1, 0.3]))
    tap = gm.get_submodule(get_record(gm, gmpq_modules.GMPQ_META).tap)
    gm(x)  # fixes the weight thresholds

    def r_g(lw, la):
        tap.armed = True
        try:
            logits = torch.func.functional_call(
                gm, {"fc.weight_fake_quant.logits": lw, f"{act.qname}.logits": la}, (x,))
            a = tap.feature
        finally:
            tap.armed, tap.feature = False, None
        m_q = gmpq.grad_cam(logits, a, Y, create_graph=True)
        return gmpq.attribution_loss(m_q, m_f, 2.0, form="paper", topk=20)

    lw = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    la = torch.tensor([-0.1, 0.4, 0.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(r_g, (lw, la), eps=1e-6, atol=1e-7)
    grads = torch.autograd.grad(r_g(lw, la), (lw, la))
    assert all(float(gr.abs().sum()) > 0 for gr in grads)


# -- R_G and Eq. 6 -------------------------------------------------------------------------------

def test_attribution_loss_forms():
    g = torch.Generator().manual_seed(5)
    m_q = torch.rand(2, 1, 3, 3, generator=g, requires_grad=True)
    m_f = torch.rand(2, 1, 3, 3, generator=g)
    p = 1.7
    tgt = m_f.flatten(1) ** p
    tgt = tgt / tgt.sum(1, keepdim=True)
    idx = m_f.flatten(1).argsort(1, descending=True)[:, :4]
    want = ((m_q.flatten(1).gather(1, idx) - tgt.gather(1, idx)) ** 2).sum(1).mean()
    got = gmpq.attribution_loss(m_q, m_f, p, topk=4)
    torch.testing.assert_close(got, want)
    # k larger than H·W: every pixel
    full = ((m_q.flatten(1) - tgt) ** 2).sum(1).mean()
    torch.testing.assert_close(gmpq.attribution_loss(m_q, m_f, p, topk=1000), full)
    code = gmpq.attribution_loss(m_q, m_f, 3.0, form="code")
    a = F.normalize(m_f.flatten(1) ** 3, dim=1)
    b = F.normalize(m_q.flatten(1), dim=1)
    torch.testing.assert_close(code, ((a - b) ** 2).mean())
    code.backward()
    assert m_q.grad is not None
    with pytest.raises(NumericsError, match="shape"):
        gmpq.attribution_loss(m_q, m_f[:, :, :2], p)


def test_search_loss_terms_and_errors():
    torch.manual_seed(0)
    model = ConvGapFC().eval()
    gm = _supernet(model).train()
    teacher = gmpq.make_teacher(model, gm)
    ed = gmpq.search_loss(gm, X, Y, zeta=0.5)            # EdMIPS: no teacher needed
    assert float(ed.attribution.detach()) == 0 and ed.p is None
    torch.testing.assert_close(ed.total, ed.task + 0.5 * ed.complexity)
    full = gmpq.search_loss(gm, X, Y, teacher=teacher, zeta=0.5, eta=2.0)
    torch.testing.assert_close(full.total, full.task + 0.5 * full.complexity
                               + 2.0 * full.attribution)
    assert full.p == pytest.approx(gmpq.capacity_p(gm))
    code = gmpq.search_loss(gm, X, Y, teacher=teacher, zeta=3e-4, eta=20.0,
                            options=gmpq.OFFICIAL_CODE)
    assert code.p == 3.0
    assert float(code.complexity.detach()) == pytest.approx(
        float(gmpq.complexity_loss(gm, "first-layer").detach()))
    full.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in gmpq_modules.arch_parameters(gm))
    with pytest.raises(InputError, match="teacher"):
        gmpq.search_loss(gm, X, Y, eta=1.0)
    with pytest.raises(NumericsError, match="eta"):
        gmpq.search_loss(gm, X, Y, eta=-1.0)
    with pytest.raises(NumericsError, match="p must be"):
        gmpq.GMPQLossOptions(p=0.0)
    with pytest.raises(NumericsError, match="form"):
        gmpq.GMPQLossOptions(form="other")
    none = _supernet(ConvGapFC().eval(), "feature-node=none")
    with pytest.raises(AnnotationError, match="feature tap"):
        gmpq.search_loss(none, X, Y, teacher=teacher, eta=1.0)
    assert math.isfinite(float(gmpq.search_loss(none, X, Y, zeta=1.0).total.detach()))
