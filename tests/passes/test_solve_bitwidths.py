"""solve-bitwidths: budget met within 1% from below (layer- and kernel-wise), exact vs greedy,
pluggable sensitivities, max-acc-bits, and typed errors for bad budgets and options."""
from __future__ import annotations

import io

import pytest
import torch

from passes_registry import AnalysisManager, PassContext, PassManager, PropertyError
from passes_registry.errors import OptionError, PassFailure
from qpasses.errors import AnnotationError, BudgetError
from qpasses.ir.annotations import get_qmeta
from qpasses.algorithms.bit_allocation import SolveBitwidthsOptions, solve_bitwidths
from qpasses.algorithms.sensitivity import SensitivityError

from .cost_helpers import annotate, small_net, traced


def _uniform(gm, b, extra=""):
    annotate(gm, f"annotate-bitwidths{{weight-bits={b} act-bits={b} first-last-bits=8{extra}}}")
    return AnalysisManager().get("bitops", gm).total


def _run(gm, options, ctx=None):
    with ctx or PassContext(print_stream=io.StringIO()):
        PassManager.parse(f"graph(solve-bitwidths{{{options}}})", assume=gm).run(gm)
    return AnalysisManager().get("bitops", gm)


@pytest.mark.parametrize("b", [3, 4, 5])
def test_layerwise_budget_within_one_percent_from_below(b):
    gm = traced("resnet18")
    target = _uniform(gm, b)
    res = _run(gm, f"target-bitops={target / 1e9!r}")
    assert 0.99 * target <= res.total <= target, res.total / target
    bits = {r.name: r.w_bits for r in res.rows}
    assert bits["conv1"] == 8 and bits["fc"] == 8          # pinned first/last
    assert len(set(bits.values())) >= 3                    # mixed precision happened


def test_kernelwise_budget_and_exact_beats_greedy():
    gm = traced("resnet18")
    target = _uniform(gm, 3, " granularity=kernel")
    exact = solve_bitwidths(gm, SolveBitwidthsOptions(target_bitops=target / 1e9,
                                                      granularity="kernel"))
    greedy = solve_bitwidths(gm, SolveBitwidthsOptions(target_bitops=target / 1e9,
                                                       granularity="kernel", method="greedy"))
    assert exact.allocation.optimal and exact.num_items == 4800 - 64   # conv1 pinned
    assert 0.99 * target <= exact.total_cost <= target
    assert exact.allocation.total_error <= greedy.allocation.total_error
    layer = solve_bitwidths(gm, SolveBitwidthsOptions(target_bitops=target / 1e9))
    greedy_layer = solve_bitwidths(gm, SolveBitwidthsOptions(target_bitops=target / 1e9,
                                                             method="greedy"))
    assert layer.allocation.total_error <= greedy_layer.allocation.total_error
    # kernel-wise has more freedom: never worse than layer-wise on the same error model
    assert exact.allocation.total_error <= layer.allocation.total_error * (1 + 1e-9)
    # written per kernel; the bitops analysis of the written bits is the solver's total
    from qpasses.algorithms.bit_allocation import write_bits
    write_bits(gm, exact.bits, "test")
    res = AnalysisManager().get("bitops", gm)
    assert res.total == exact.total_cost
    assert res["layer3.0.conv2"].w_bits_per_kernel is not None
    assert len(set(res["layer3.0.conv2"].w_bits_per_kernel)) >= 2


def test_size_target_weight_only():
    gm = traced("mobilenet_v2", 32)
    annotate(gm, "annotate-bitwidths{weight-bits=4 act-bits=8 first-last-bits=8}")
    target = AnalysisManager().get("model-size", gm).mb
    _run(gm, f"target-size={target!r}")
    size = AnalysisManager().get("model-size", gm)
    assert 0.99 * target <= size.mb <= target


def test_infeasible_budgets_state_the_reachable_range():
    gm = traced("resnet18", 32)
    annotate(gm)
    with pytest.raises(BudgetError, match="below the minimum") as e:
        _run(gm, "target-bitops=0.001")
    err = e.value
    assert "reachable range is [" in str(err) and "target-bitops" in str(err)
    assert err.unit == "GBitOPs" and 0 < err.minimum < err.maximum
    # the minimum is what all-2-bit weights cost: reachable exactly
    _run(gm, f"target-bitops={err.minimum!r}")
    assert AnalysisManager().get("bitops", gm).total == pytest.approx(err.minimum * 1e9, rel=1e-9)
    with pytest.raises(BudgetError, match="above the maximum"):
        _run(gm, f"target-bitops={err.maximum * 1.5!r}")
    with pytest.raises(BudgetError, match="MB"):
        _run(gm, "target-size=1e-6")


@pytest.mark.parametrize("options,match", [
    ("", "exactly one budget"),
    ("target-bitops=1.0 target-size=1.0", "exactly one budget"),
    ("target-bitops=-3.0", "positive"),
    ("target-bitops=0", "positive"),
    ("target-size=inf", "positive"),
    ("target-bitops=1.0 candidates=[2,33]", "out of range"),
    ("target-bitops=1.0 candidates=[-1,4]", "out of range"),
    ("target-bitops=1.0 candidates=[4,4]", "twice"),
    ("target-bitops=1.0 candidates=[0,4]", "granularity=kernel"),
    ("target-bitops=1.0 sensitivity=hesian", "did you mean 'hessian'"),
    ("target-bitops=1.0 max-acc-bits=1", "max-acc-bits"),
])
def test_bad_options_are_typed_errors(options, match):
    with pytest.raises(OptionError, match=match) as e:
        PassManager.parse(f"graph(solve-bitwidths{{{options}}})", assume={"bits-annotated"})
    assert "solve-bitwidths" in str(e.value)


def test_requires_bit_annotations():
    with pytest.raises(PropertyError, match="annotate-bitwidths"):
        PassManager.parse("graph(solve-bitwidths{target-bitops=1.0})", assume=())


def test_max_acc_bits_removes_candidates():
    gm = traced("resnet18", 32)
    target = _uniform(gm, 6)
    with pytest.raises(PassFailure, match="layer 'conv1' keeps 8-bit weights"):
        _run(gm, f"target-bitops={target / 1e9!r} max-acc-bits=20")
    with pytest.raises(PassFailure, match=r"leaves layer 'conv1' \(fan-in 147, 8-bit input\)"):
        _run(gm, f"target-bitops={target / 1e9!r} max-acc-bits=12 pin-first-last=false")
    # at 20 bits no layer may keep its widest candidates; the result respects it
    annotate(gm, "annotate-bitwidths{weight-bits=6 act-bits=4 first-last-bits=6}")
    budget = AnalysisManager().get("bitops", gm).total * 0.5
    _run(gm, f"target-bitops={budget / 1e9!r} max-acc-bits=20 pin-first-last=false")
    acc = AnalysisManager().get("acc-width", gm)
    assert max(r.acc_bits for r in acc.rows) <= 20
    assert AnalysisManager().get("bitops", gm).total <= budget


def test_hessian_and_lambda_sensitivities():
    gm = small_net()
    target = _uniform(gm, 4)
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(SensitivityError, match="needs data"):
        _run(gm, f"target-bitops={target / 1e9!r} sensitivity=hessian")
    ctx = PassContext(example_inputs=(x,), print_stream=io.StringIO())
    res = _run(gm, f"target-bitops={target / 1e9!r} sensitivity=hessian probes=2", ctx)
    assert 0.99 * target <= res.total <= target
    # λ prior: λ = 4 everywhere at the uniform-4 budget gives exactly 4 bits everywhere
    annotate(gm, "annotate-bitwidths{weight-bits=4 act-bits=4}")
    names = [r.name for r in res.rows]
    with pytest.raises(SensitivityError, match="fracbits_lambda"):
        _run(gm, f"target-bitops={target / 1e9!r} sensitivity=lambda")
    ctx = PassContext(config={"fracbits_lambda": {n: 4.2 for n in names}},
                      print_stream=io.StringIO())
    res = _run(gm, f"target-bitops={target / 1e9!r} sensitivity=lambda", ctx)
    assert {r.w_bits for r in res.rows if r.name not in ("c1", "fc")} == {4}
    ctx = PassContext(config={"fracbits_lambda": {"c1": 3.0}}, print_stream=io.StringIO())
    with pytest.raises(SensitivityError, match="no λ for layer 'c2'"):
        _run(gm, f"target-bitops={target / 1e9!r} sensitivity=lambda", ctx)


def test_pipeline_text_round_trips_and_realized_widths_are_refused():
    text = ("graph(solve-bitwidths{candidates={2,4,8} granularity=kernel max-acc-bits=24 "
            "method=greedy target-bitops=1.5})")
    pm = PassManager.parse(text, assume={"bits-annotated"})
    assert PassManager.parse(str(pm), assume={"bits-annotated"}).pipeline == pm.pipeline
    gm = traced("resnet18", 32)
    annotate(gm, "annotate-bitwidths{weight-bits=8 act-bits=8}")
    x = torch.randn(2, 3, 32, 32)
    with PassContext(example_inputs=(x,), calibration_data=[x], print_stream=io.StringIO()):
        PassManager.parse("graph(insert-fake-quant,calibrate)", assume=gm).run(gm)
    target = AnalysisManager().get("bitops", gm).total * 0.5
    # the quantizers implement the annotated widths: re-solving would make the report lie
    with pytest.raises(AnnotationError, match="already realized.*float graph"):
        _run(gm, f"target-bitops={target / 1e9!r}")
    node = next(n for n in gm.graph.nodes if n.target == "layer2.0.conv2")
    assert get_qmeta(node).weight.bits == 8


class _Shared(torch.nn.Module):
    """One conv module called twice (shared weights) at two resolutions."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.body = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.body(torch.relu(self.stem(x))))
        y = torch.relu(self.body(torch.nn.functional.max_pool2d(y, 2)))
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_shared_module_is_one_decision_costed_over_all_calls():
    import qpasses
    gm = qpasses.trace(_Shared(), torch.randn(1, 3, 16, 16))
    target = _uniform(gm, 4)
    for gran in ("layer", "kernel"):
        annotate(gm, f"annotate-bitwidths{{weight-bits=4 act-bits=4 granularity={gran}}}")
        res = solve_bitwidths(gm, SolveBitwidthsOptions(target_bitops=target * 0.8 / 1e9,
                                                        granularity=gran))
        assert list(res.bits) == ["body"]
        from qpasses.algorithms.bit_allocation import write_bits
        write_bits(gm, res.bits, "test")
        bitops = AnalysisManager().get("bitops", gm)
        body = [r for r in bitops.rows if r.name == "body"]
        assert len(body) == 2 and body[0].w_bits_per_kernel == body[1].w_bits_per_kernel
        assert bitops.total == res.total_cost <= target * 0.8


def test_kernelwise_zero_bits_never_remove_a_whole_layer():
    gm = traced("resnet18")
    target = _uniform(gm, 3, " granularity=kernel") * 0.4 / 1e9
    cands = (0, 2, 3, 4, 5, 6, 7, 8)

    def dead_layers(keep):
        res = solve_bitwidths(gm, SolveBitwidthsOptions(
            target_bitops=target, granularity="kernel", candidates=cands, keep_one_kernel=keep))
        assert res.total_cost <= target * 1e9
        return [n for n, b in res.bits.items() if max(b) == 0]

    assert dead_layers(True) == []
    assert len(dead_layers(False)) >= 5     # what the per-kernel errors alone would choose


# ---------------------------------------------------------------------------------------------
# act-candidates: (weight, activation) pairs

def _pairs_graph():
    gm = small_net()
    annotate(gm, "annotate-bitwidths{weight-bits=4 act-bits=4 first-last-bits=8}")
    return gm


def _pair_ctx():
    torch.manual_seed(1)
    return PassContext(example_inputs=(torch.randn(4, 3, 16, 16),), print_stream=io.StringIO())


def _independent_errors(gm, x, w_cands, a_cands):
    """The output-noise error of every (layer, w, a) computed from scratch: inputs captured with
    forward pre-hooks, min/max quantizers applied explicitly."""
    from qpasses.numerics import quantizers
    seen = {}

    def hook(name):
        def record(module, args):
            seen[name] = args[0].detach().double()
        return record

    hooks = [gm.get_submodule(n).register_forward_pre_hook(hook(n))
             for n in ("c1", "c2", "c3", "c4", "fc")]
    with torch.no_grad():
        gm(x)
    for h in hooks:
        h.remove()
    out = {}
    for n, xin in seen.items():
        w = gm.get_submodule(n).weight.detach().double()
        m2 = float((xin ** 2).mean())
        flat = w.reshape(w.shape[0], -1)
        for b in w_cands:
            amax = flat.abs().amax(dim=1, keepdim=True)
            s = amax / ((2 ** b - 1) / 2)
            wq = torch.clamp(torch.round(flat / s), -2 ** (b - 1), 2 ** (b - 1) - 1) * s
            sse = float(((wq - flat) ** 2).sum())
            for a in a_cands:
                sa, za = quantizers.minmax_qparams(xin, a, "unsigned")
                mse = float(((quantizers.quantize_dequantize(xin, sa, za, a, "unsigned")
                              - xin) ** 2).mean())
                out[(n, b, a)] = (m2 * sse, float((w ** 2).sum()) * mse)
    return out


def test_act_pairs_equal_brute_force_on_a_tiny_model():
    import itertools
    from qpasses.algorithms.cost_model import annotated_bits, model_bitops
    gm = _pairs_graph()
    ctx = _pair_ctx()
    x = ctx.example_inputs[0]
    w_c, a_c = (2, 4, 8), (3, 6)
    errs = _independent_errors(gm, x, w_c, a_c)
    w0, a0 = annotated_bits(gm)
    full = float(model_bitops(gm, w0, a0))
    for frac in (0.65, 0.85):
        budget = int(full * frac)
        # brute force: c2..c4 pick (w, a) with c3 and c4 sharing a (they read one group: the
        # residual add), fc keeps 8-bit weights and picks a, c1 keeps everything
        best = None
        for w2, w3, w4, a2, a34, afc in itertools.product(w_c, w_c, w_c, a_c, a_c, a_c):
            wm = dict(w0, c2=w2, c3=w3, c4=w4)
            am = dict(a0, c2=a2, c3=a34, c4=a34, fc=afc)
            cost = int(model_bitops(gm, wm, am))
            if cost > budget:
                continue
            e = sum(errs[(n, wm[n] if n != "fc" else 8, am[n])][0] * (n != "fc")
                    + errs[(n, wm[n] if n != "fc" else 8, am[n])][1]
                    for n in ("c2", "c3", "c4", "fc"))
            key = (cost < 0.99 * budget, e)          # inside the 1% window first, then error
            if best is None or key < best[0]:
                best = (key, cost, wm, am)
        res = solve_bitwidths(gm, SolveBitwidthsOptions(
            target_bitops=budget / 1e9, candidates=w_c, act_candidates=a_c), ctx)
        assert res.total_cost <= budget
        wm, am = dict(w0, **res.bits), dict(a0, **res.act_bits)
        assert int(model_bitops(gm, wm, am)) == res.total_cost
        e = sum(errs[(n, 8 if n == "fc" else wm[n], am[n])][0] * (n != "fc")
                + errs[(n, 8 if n == "fc" else wm[n], am[n])][1] for n in ("c2", "c3", "c4", "fc"))
        assert (res.total_cost < 0.99 * budget) == best[0][0]
        assert e == pytest.approx(best[0][1], rel=1e-6), (res.bits, res.act_bits, best)
        assert res.act_bits["c3"] == res.act_bits["c4"] and "c1" not in res.act_bits


@pytest.mark.parametrize("frac", [0.45, 0.7, 0.9])
def test_act_pairs_meet_the_budget_from_below_and_share_group_widths(frac):
    gm = traced("resnet18", 32)
    annotate(gm, "fold-batch-norm,annotate-bitwidths{weight-bits=6 act-bits=6 first-last-bits=8}")
    before = AnalysisManager().get("bitops", gm).total
    target = before * frac
    torch.manual_seed(1)
    with PassContext(example_inputs=(torch.randn(2, 3, 32, 32),), print_stream=io.StringIO()):
        pm = PassManager.parse(f"graph(solve-bitwidths{{target-bitops={target / 1e9!r} "
                               "act-candidates=[2,3,4,5,6,7,8]})", assume=gm)
        pm.run(gm)
    res = AnalysisManager().get("bitops", gm)
    assert 0.99 * target <= res.total <= target, res.total / target
    a_bits = {r.name: r.a_bits for r in res.rows}
    assert len(set(a_bits.values())) >= 2                    # activations were searched
    from qpasses.ir.joins import layer_input, scale_sharing_groups
    nodes = {n.name: n for n in gm.graph.nodes}
    from qpasses.ir.layers import quantizable_layers
    for group in scale_sharing_groups(gm):
        widths = {get_qmeta(nodes[i.node]).act.bits for i in quantizable_layers(gm)
                  if layer_input(nodes[i.node]).name in group}
        widths |= {get_qmeta(nodes[t]).output.bits for t in group
                   if get_qmeta(nodes[t]).output is not None}
        assert len(widths) <= 1, (group, widths)


def test_without_act_candidates_activations_are_untouched():
    gm = _pairs_graph()
    acts = {n.name: get_qmeta(n).act for n in gm.graph.nodes}
    target = AnalysisManager().get("bitops", gm).total * 0.7
    _run(gm, f"target-bitops={target / 1e9!r}")
    assert {n.name: get_qmeta(n).act for n in gm.graph.nodes} == acts


@pytest.mark.parametrize("options,match", [
    ("act-candidates=[0,4]", "0 activation bits"),
    ("act-candidates=[]", "at least one bit-width"),
    ("act-candidates=[4,33]", "out of range"),
    ("act-candidates=[4,4]", "twice"),
    ("act-candidates=[4,8] granularity=kernel", "granularity=layer"),
    ("act-candidates=[4,8] sensitivity=hessian", "sensitivity=quant-error"),
    ("act-candidates=[4,8] method=greedy", "method=exact"),
])
def test_bad_act_candidates_are_typed_errors_naming_the_option(options, match):
    with pytest.raises(OptionError, match=match) as e:
        PassManager.parse(f"graph(solve-bitwidths{{target-bitops=1.0 {options}}})",
                          assume={"bits-annotated"})
    assert "solve-bitwidths" in str(e.value) and "act-candidates" in str(e.value)


def test_act_candidates_need_data_and_a_reachable_target():
    gm = _pairs_graph()
    target = AnalysisManager().get("bitops", gm).total * 0.7
    with pytest.raises(SensitivityError, match="act-candidates.*needs data|measured on data"):
        _run(gm, f"target-bitops={target / 1e9!r} act-candidates=[4,8]")
    with pytest.raises(BudgetError, match="act-candidates") as e:
        _run(gm, "target-bitops=1e-6 act-candidates=[4,8]", _pair_ctx())
    assert 0 < e.value.minimum < e.value.maximum
    text = "graph(solve-bitwidths{act-candidates={4,8} target-bitops=1.5})"
    pm = PassManager.parse(text, assume={"bits-annotated"})
    assert PassManager.parse(str(pm), assume={"bits-annotated"}).pipeline == pm.pipeline
