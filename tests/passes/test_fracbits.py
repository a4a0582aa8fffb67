"""FracBits: insert-fracbits / penalty / freeze-fracbits (docs/algorithms.md, "FracBits")."""
from __future__ import annotations

import pytest
import torch
import torchvision

import qpasses
from passes_registry import PassManager, PassContext, get_record
from passes_registry.errors import OptionError, PropertyError
from qpasses.algorithms.cost_model import annotated_bits, model_bitops
from qpasses.errors import AnnotationError, BudgetError, NumericsError
from qpasses.numerics.quantizers import dorefa_normalize, fracbits_interp, unit_quantize
from qpasses.modules import fracbits as fb
from qpasses.algorithms import fracbits as fb_cost
from qpasses.modules.fake_quant import PACTActFakeQuant
from qpasses.passes.freeze_fracbits import FROZEN_META, offset_bisection

from ..conftest import DigitsCNN

X = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _graph(opts: str = "", annotate: str = "weight-bits=3 act-bits=3") -> torch.fx.GraphModule:
    torch.manual_seed(0)
    gm = qpasses.trace(DigitsCNN().eval(), (X,))
    pm = PassManager.parse(f"graph(annotate-bitwidths{{{annotate}}},insert-fracbits{{{opts}}})")
    with PassContext(example_inputs=(X,)):
        return pm.run(gm)


def _freeze(gm: torch.fx.GraphModule, opts: str) -> torch.fx.GraphModule:
    gm.eval()
    pm = PassManager.parse(f"graph(freeze-fracbits{{{opts}}})", assume=gm)
    with PassContext(example_inputs=(X,)):
        return pm.run(gm)


def _set_lambdas(gm, value_w=None, value_a=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for wq, aq in fb.fracbits_modules(gm).values():
            if not wq.pinned:
                wq.lam.copy_(value_w if value_w is not None else
                             wq.min_bits + (wq.max_bits - wq.min_bits) *
                             torch.rand(wq.lam.shape, generator=g))
            if aq is not None:
                aq.lam.copy_(value_a if value_a is not None else
                             aq.min_bits + (aq.max_bits - aq.min_bits) *
                             torch.rand((), generator=g))


# -- Eq. 1 / 2 / 8 --------------------------------------------------------------------------------

def test_half_bit_is_mean_of_neighbours():
    u = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    q = fracbits_interp(u, torch.tensor(2.5))
    assert torch.allclose(q, (unit_quantize(u, 2) + unit_quantize(u, 3)) / 2)


@pytest.mark.parametrize("lam", [2.0, 2.3, 5.0, 7.9])
def test_lambda_gradient_is_difference(lam):
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    wq = fb.FracBitsWeightQuant(8, lam, 1, 8)
    out = wq(w)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * g).sum().backward()
    u = dorefa_normalize(w)
    lo = int(lam)
    q_lo, q_hi = unit_quantize(u, lo), unit_quantize(u, min(lo + 1, 8))
    expected = (g * 2 * (q_hi - q_lo)).sum()
    assert torch.allclose(wq.lam.grad, expected, rtol=1e-4, atol=1e-4)
    if float(lam).is_integer():  # at an integer λ the forward is plain quantization
        assert torch.allclose(out.detach(), 2 * unit_quantize(u, lo) - 1)


def test_zero_bit_kernel_is_zero_and_kernel_lambdas_vector():
    w = torch.randn(4, 3, 3, 3)
    wq = fb.FracBitsWeightQuant(4, 3.0, 0, 8, per_kernel=True)
    with torch.no_grad():
        wq.lam.copy_(torch.tensor([0.0, 3.0, 0.0, 5.5]))
    out = wq(w)
    assert wq.lam.shape == (4,)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], out[2] * 0)
    assert out[1].abs().sum() > 0


# -- insert-fracbits ------------------------------------------------------------------------------

def test_insert_pins_first_last_and_trains():
    gm = _graph("granularity=kernel init-bits=3.5")
    mods = fb.fracbits_modules(gm)
    assert set(mods) == {"conv1", "conv2", "conv3", "fc"}
    conv1, fc = mods["conv1"], mods["fc"]
    assert conv1[0].pinned and conv1[1] is None          # image input not quantized
    assert fc[0].pinned and fc[1] is not None            # FC input searched
    assert float(conv1[0].bits()) == 8 and float(fc[0].bits()) == 8
    assert mods["conv2"][0].lam.shape == (32,) and not mods["conv2"][0].pinned
    assert mods["conv3"][1].signed is False or mods["conv3"][1].signed is True
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.5)
    before = mods["conv2"][0].lam.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        loss = gm(X).pow(2).mean() + fb_cost.penalty(gm, target_bitops=0.001, kappa=10.0)
        loss.backward()
        opt.step()
        fb.clamp_lambdas(gm)
    after = mods["conv2"][0].lam.detach()
    assert not torch.equal(before, after)
    assert float(after.min()) >= 1 and float(after.max()) <= 8
    assert fb.fracbits_modules(gm)["conv1"][0].lam.grad is None  # pinned: not trainable


def test_pinning_can_be_disabled():
    gm = _graph("pin-first-last=none")
    mods = fb.fracbits_modules(gm)
    assert not mods["conv1"][0].pinned and mods["conv1"][1] is not None


def test_bad_options_typed():
    with pytest.raises(OptionError, match="outside|0..32"):
        PassManager.parse("graph(annotate-bitwidths,insert-fracbits{candidates=[2,3,40]})")
    with pytest.raises(OptionError, match="allow-zero"):
        PassManager.parse("graph(annotate-bitwidths,insert-fracbits{candidates=[1,2,3] "
                          "allow-zero=true})")
    with pytest.raises(OptionError, match="allow-zero"):
        PassManager.parse("graph(annotate-bitwidths,insert-fracbits{candidates=[0,1,2,3]})")
    with pytest.raises(OptionError, match="contiguous"):
        PassManager.parse("graph(annotate-bitwidths,insert-fracbits{candidates=[2,4,8]})")
    with pytest.raises(OptionError, match="init-bits"):
        PassManager.parse("graph(annotate-bitwidths,insert-fracbits{candidates=[2,3] "
                          "init-bits=5.5})")
    with pytest.raises(PropertyError):
        PassManager.parse("graph(insert-fracbits)", assume=())       # needs bits-annotated
    with pytest.raises(OptionError, match="target"):
        PassManager.parse("graph(freeze-fracbits{rounding=solver})")


# -- penalty --------------------------------------------------------------------------------------

def test_penalty_matches_bitops_analysis_at_integer_lambda():
    gm = _graph("granularity=kernel candidates=[0,1,2,3,4,5,6,7,8] allow-zero=true")
    _set_lambdas(gm, value_w=3.0, value_a=5.0)
    cost = fb_cost.model_cost(gm, detach=True)
    # the bitops analysis on the same bits, frozen with nearest rounding
    frozen = _freeze(gm, "rounding=nearest")
    rep = qpasses.report(frozen)
    assert abs(float(cost) * 1e9 - rep["totals"]["bitops"]) < 1e-3
    w, a = annotated_bits(frozen)
    assert int(model_bitops(frozen, w, a)) == rep["totals"]["bitops"]


def test_penalty_gradient_sign_flips_at_target():
    gm = _graph()
    cost = float(fb_cost.model_cost(gm, detach=True))
    lam = fb.fracbits_modules(gm)["conv2"][0].lam
    grads = []
    for target in (cost * 0.9, cost * 1.1):
        lam.grad = None
        fb_cost.penalty(gm, target_bitops=target, kappa=1.0).backward()
        grads.append(float(lam.grad))
    assert grads[0] > 0 > grads[1]
    sz = fb_cost.penalty(gm, target_size=1.0, kappa=1.0)
    assert sz.requires_grad
    with pytest.raises(NumericsError, match="exactly one"):
        fb_cost.penalty(gm)
    with pytest.raises(NumericsError, match="exactly one"):
        fb_cost.penalty(gm, target_bitops=1.0, target_size=1.0)
    with pytest.raises(NumericsError, match="positive"):
        fb_cost.penalty(gm, target_bitops=-1.0)


# -- freeze-fracbits ------------------------------------------------------------------------------

def test_freeze_nearest_writes_rounded_bits_and_restores_float_layers():
    gm = _graph("granularity=layer")
    _set_lambdas(gm, seed=4)
    mods = fb.fracbits_modules(gm)
    with torch.no_grad():                       # distinct "learned" clips, not the 8.0 init
        for i, (_, aq) in enumerate(m for m in mods.values() if m[1] is not None):
            aq.alpha.fill_(2.5 + i)
    lam = {n: (float(w.bits().detach()), None if a is None else float(a.bits().detach()))
           for n, (w, a) in mods.items()}
    out = _freeze(gm, "rounding=nearest")
    rep = {r["name"]: r for r in qpasses.report(out)["layers"]}
    for n, (lw, la) in lam.items():
        assert rep[n]["w_bits"] == round(lw)
        if la is not None:
            assert rep[n]["a_bits"] == round(la)
    assert type(out.get_submodule("conv2")) is torch.nn.Conv2d
    assert "fracbits_act" not in out._modules and get_record(out, FROZEN_META) is not None
    # the standard passes apply unchanged; PACT clips start from the learned α
    alphas = {n: rec.alpha for n, rec in get_record(out, FROZEN_META).layers.items() if rec.alpha}
    assert alphas
    pm = PassManager.parse("graph(insert-fake-quant{weight-scheme=dorefa act-scheme=pact})",
                           assume=out)
    with PassContext(example_inputs=(X,)):
        q = pm.run(out)
    assert q(X).shape == (4, 10)
    pacts = [m for m in q.modules() if isinstance(m, PACTActFakeQuant)]
    for n, a in alphas.items():
        mod = next(m for m in pacts if f"layer '{n}'" in m.consumers)
        assert float(mod.alpha.detach()) == pytest.approx(a)


@pytest.mark.parametrize("rounding", ["offset-bisection", "solver"])
@pytest.mark.parametrize("granularity", ["layer", "kernel"])
def test_freeze_meets_target_from_below(rounding, granularity):
    gm = _graph(f"granularity={granularity}")
    _set_lambdas(gm, value_w=4.6, value_a=4.4)
    full = float(fb_cost.model_cost(gm, detach=True))
    target = full * 0.8
    out = _freeze(gm, f"rounding={rounding} target-bitops={target}")
    got = qpasses.report(out)["totals"]["bitops"] / 1e9
    assert got <= target * (1 + 1e-9)
    if rounding == "solver":       # layer-wise: (w, a) pairs make the grid fine enough
        assert got >= 0.99 * target


def test_solver_with_zero_bit_kernels_lands_within_one_percent():
    gm = _graph("granularity=kernel candidates=[0,1,2,3,4,5,6,7,8] allow-zero=true")
    _set_lambdas(gm, seed=5)
    with torch.no_grad():
        fb.fracbits_modules(gm)["conv2"][0].lam[:6] = 0.0
    target = float(fb_cost.model_cost(gm, detach=True)) * 0.7
    out = _freeze(gm, f"rounding=solver target-bitops={target}")
    got = qpasses.report(out)["totals"]["bitops"] / 1e9
    assert 0.99 * target <= got <= target


def test_offset_bisection_noop_when_under_budget():
    gm = _graph()
    _set_lambdas(gm, value_w=3.0, value_a=3.0)
    cost = float(fb_cost.model_cost(gm, detach=True))
    delta, _, _, c = offset_bisection(gm, cost * 1.005, tolerance=0.01)
    assert delta == 0.0 and abs(c - cost) < 1e-12
    with pytest.raises(BudgetError):
        offset_bisection(gm, cost * 1e-3)


def test_freeze_errors_typed():
    gm = qpasses.trace(DigitsCNN().eval(), (X,))
    pm = PassManager.parse("graph(annotate-bitwidths,freeze-fracbits)")
    with pytest.raises(AnnotationError, match="insert-fracbits"):
        pm.run(gm)
    gm2 = _graph()
    gm2.train()
    pm2 = PassManager.parse("graph(freeze-fracbits)", assume=gm2)
    with pytest.raises(AnnotationError, match="training mode"):
        pm2.run(gm2)
    gm2.eval()
    pm3 = PassManager.parse("graph(freeze-fracbits{rounding=solver target-bitops=1e-9})",
                            assume=gm2)
    with pytest.raises(BudgetError):
        pm3.run(gm2)


def test_zero_bit_kernels_feed_prune():
    gm = _graph("granularity=kernel candidates=[0,1,2,3,4,5,6,7,8] allow-zero=true")
    with torch.no_grad():
        for layer in ("conv2", "conv3"):   # the residual add joins their channels
            lam = fb.fracbits_modules(gm)[layer][0].lam
            lam.fill_(4.0)
            lam[:5] = 0.0
    out = _freeze(gm, "rounding=nearest")
    rep = {r["name"]: r for r in qpasses.report(out)["layers"]}
    assert rep["conv2"]["w_bits_per_kernel"][:5] == [0] * 5
    pm = PassManager.parse("graph(insert-fake-quant{weight-scheme=dorefa act-scheme=pact},"
                           "prune-zero-bit-channels)", assume=out)
    with PassContext(example_inputs=(X,)):
        pruned = pm.run(out)
    rep2 = {r["name"]: r for r in qpasses.report(pruned)["layers"]}
    log = [r for r in get_record(pruned, "qpasses.prune_log").entries if r.get("layer")]
    assert rep2["conv2"]["pruned_channels"] > 0, log


def test_pipeline_text_round_trips():
    t = ("graph(annotate-bitwidths,insert-fracbits{granularity=kernel candidates=[0,1,2,3] "
         "allow-zero=true init-bits=1.5 pin-first-last=none},freeze-fracbits{rounding="
         "offset-bisection target-size=0.5 tolerance=0.01})")
    once = str(PassManager.parse(t))
    assert str(PassManager.parse(once)) == once and "init-bits=1.5" in once


@pytest.mark.parametrize("fraction,seed", [(0.6, 0), (0.8, 1), (0.95, 2)])
def test_layerwise_solver_lands_within_one_percent_on_resnet18(fraction, seed):
    """Residual blocks share activation quantizers (one width per scale-sharing group)."""
    torch.manual_seed(seed)
    x = torch.randn(1, 3, 32, 32)
    gm = qpasses.trace(torchvision.models.resnet18().eval(), (x,))
    pm = PassManager.parse("graph(fold-batch-norm,annotate-bitwidths{weight-bits=4 act-bits=4},"
                           "insert-fracbits{granularity=layer})")
    with PassContext(example_inputs=(x,)):
        gm = pm.run(gm)
    _set_lambdas(gm, seed=seed)
    target = float(fb_cost.model_cost(gm, detach=True)) * fraction
    gm.eval()
    with PassContext(example_inputs=(x,)):
        out = PassManager.parse(f"graph(freeze-fracbits{{rounding=solver target-bitops={target}}})",
                                assume=gm).run(gm)
    got = qpasses.report(out)["totals"]["bitops"] / 1e9
    assert 0.99 * target <= got <= target * (1 + 1e-9)
    rep = {r["name"]: r for r in qpasses.report(out)["layers"]}
    for block in ("layer2.0", "layer3.0", "layer4.0"):      # one input, one width
        assert rep[f"{block}.conv1"]["a_bits"] == rep[f"{block}.downsample.0"]["a_bits"]


def test_weight_only_search_meets_a_size_target():
    gm = _graph("granularity=kernel act-scheme=none", annotate="weight-bits=3 act-bits=8")
    assert not any(aq is not None for _, aq in fb.fracbits_modules(gm).values())
    _set_lambdas(gm, seed=3)
    full = float(fb_cost.model_cost(gm, "size", detach=True))
    fb_cost.penalty(gm, target_size=full * 0.8, kappa=1.0).backward()     # differentiable in λ_w
    target = full * 0.8
    out = _freeze(gm, f"rounding=solver target-size={target}")
    rep = qpasses.report(out)
    got = rep["totals"]["size_bits"] / 8e6
    assert 0.99 * target <= got <= target * (1 + 1e-9)
    assert {r["a_bits"] for r in rep["layers"] if r["a_bits"] is not None} <= {8}


@pytest.mark.parametrize("granularity", ["layer", "kernel"])
def test_unreachable_solver_target_keeps_the_fracbits_graph(granularity):
    """An unreachable target is a BudgetError raised before anything is removed: the λ stay, the
    graph is unchanged and a retry with a reachable target works."""
    from passes_registry.printing import fingerprint as graph_fingerprint
    gm = _graph(f"granularity={granularity}")
    _set_lambdas(gm, value_w=4.6, value_a=4.4)
    lams = {n: wq.lam for n, (wq, _) in fb.fracbits_modules(gm).items()}
    before = graph_fingerprint(gm)
    with pytest.raises(BudgetError, match="target-bitops"):
        _freeze(gm, "rounding=solver target-bitops=1e-9")
    assert graph_fingerprint(gm) == before
    assert {n: wq.lam for n, (wq, _) in fb.fracbits_modules(gm).items()} == lams
    target = float(fb_cost.model_cost(gm, detach=True)) * 0.8
    out = _freeze(gm, f"rounding=solver target-bitops={target}")
    assert qpasses.report(out)["totals"]["bitops"] / 1e9 <= target * (1 + 1e-9)


def test_failure_after_removal_restores_the_fracbits_graph(monkeypatch):
    """The safety net: a failure inside the solver (after the FracBits modules are gone) puts the
    FracBits graph back, same Parameter objects."""
    from passes_registry.printing import fingerprint as graph_fingerprint
    from qpasses.passes import freeze_fracbits as ff
    gm = _graph()
    _set_lambdas(gm, value_w=4.6, value_a=4.4)
    params = {n: p for n, p in gm.named_parameters()}
    before = graph_fingerprint(gm)

    def boom(*a, **k):
        raise BudgetError("freeze-fracbits", "target-bitops", "test", minimum=None,
                          maximum=None, unit="GBitOPs")
    monkeypatch.setattr(ff, "solve_pairs", boom)
    monkeypatch.setattr(ff, "solve_bitwidths", boom)
    target = float(fb_cost.model_cost(gm, detach=True)) * 0.8
    with pytest.raises(BudgetError):
        _freeze(gm, f"rounding=solver target-bitops={target}")
    assert graph_fingerprint(gm) == before
    assert all(p is params[n] for n, p in gm.named_parameters())
    assert fb.has_fracbits(gm) and gm(X).shape == (4, 10)
