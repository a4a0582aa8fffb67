"""Budget solver: exactness against brute force, exact vs greedy, budget utilisation and
scale (kernel-wise ResNet-18 and ~10k items)."""
from __future__ import annotations

import functools
import itertools
import time

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.errors import NumericsError
from qpasses.numerics.costs import kernel_macs
from qpasses.algorithms.solver import solve, solve_dp, solve_greedy, solve_milp

HYP = settings(max_examples=50, deadline=None)
BITS = list(range(2, 9))


def _brute_force(costs, errors, budget):
    best = None
    for combo in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(costs[i][j] for i, j in enumerate(combo))
        if cost <= budget:
            err = sum(errors[i][j] for i, j in enumerate(combo))
            best = err if best is None else min(best, err)
    return best


@st.composite
def _instance(draw):
    n = draw(st.integers(1, 5))
    costs, errors = [], []
    for _ in range(n):
        m = draw(st.integers(1, 4))
        costs.append(draw(st.lists(st.integers(0, 30), min_size=m, max_size=m)))
        # Errors on a 1/8 grid: sums are exact in floating point, so ties compare exactly.
        errors.append([x / 8 for x in draw(st.lists(st.integers(-8, 80), min_size=m,
                                                     max_size=m))])
    lo = sum(min(c) for c in costs)
    hi = sum(max(c) for c in costs)
    budget = draw(st.integers(lo, hi + 5))
    return costs, errors, budget


@HYP
@given(inst=_instance())
def test_exact_solvers_match_brute_force(inst):
    costs, errors, budget = inst
    best = _brute_force(costs, errors, budget)
    greedy = solve_greedy(costs, errors, budget)
    for res in (solve_dp(costs, errors, budget), solve_milp(costs, errors, budget),
                solve(costs, errors, budget)):
        assert res.optimal
        assert res.total_cost <= budget
        assert res.total_error == pytest.approx(best, abs=1e-9)
        # Reported totals are those of the reported choices.
        assert res.total_cost == sum(costs[i][j] for i, j in enumerate(res.choices))
        assert res.total_error == pytest.approx(sum(errors[i][j]
                                                    for i, j in enumerate(res.choices)))
        assert res.total_error <= greedy.total_error + 1e-9
    assert greedy.total_cost <= budget


def test_exact_strictly_beats_greedy_on_constructed_instance():
    # Greedy first lowers item 0 (best ratio 0.05/unit, but saves only 1), then still has to
    # lower item 1; the optimum lowers item 1 alone.
    costs = [[9, 10], [0, 10], [0, 10]]
    errors = [[0.05, 0.0], [1.0, 0.0], [1.2, 0.0]]
    budget = 20
    greedy = solve_greedy(costs, errors, budget)
    exact = solve(costs, errors, budget)
    assert greedy.choices == (0, 0, 1) and greedy.total_error == pytest.approx(1.05)
    assert exact.choices == (1, 0, 1) and exact.total_error == pytest.approx(1.0)
    assert solve_milp(costs, errors, budget).choices == (1, 0, 1)
    assert exact.total_cost == budget and greedy.total_cost == budget - 1


def test_infeasible_budget_names_minimum():
    with pytest.raises(NumericsError, match="costs 7"):
        solve([[3, 5], [4, 9]], [[1, 0], [1, 0]], 6)
    with pytest.raises(NumericsError):
        solve([[1, 2], []], [[1, 0], []], 100)  # an item with no admissible candidate
    with pytest.raises(NumericsError):
        solve([[1, 2]], [[1, 0], [1]], 100)
    with pytest.raises(NumericsError):
        solve([[1, 2]], [[1, 0]], 100, method="annealing")


def test_fixed_items_bits_and_fill_toward_budget():
    bits = [[2, 4, 8], [8], [2, 4, 8]]
    costs = [[2, 4, 8], [8], [2, 4, 8]]
    errors = [[0.0, 0.0, 0.0], [0.5], [3.0, 1.0, 0.0]]
    res = solve(costs, errors, 18, bits=bits)
    # Item 2 takes 8 bits (error 0); item 0's errors are all equal, so the leftover budget is
    # spent on it ("from below") without changing the optimal error.
    assert res.bits == (2, 8, 8) and res.total_error == pytest.approx(0.5)
    res = solve(costs, errors, 20, bits=bits)
    assert res.bits == (4, 8, 8) and res.total_cost == 20 and res.utilisation == 1.0
    # A candidate dominated by a cheaper, more accurate one is never chosen.
    res = solve([[4, 9]], [[0.0, 1.0]], 100)
    assert res.choices == (0,)


@functools.lru_cache(maxsize=1)
def _resnet18_kernels() -> list[tuple[int, int]]:
    """(MACs per output channel, C_out) of every ResNet-18 conv, from torchvision."""
    model = torchvision.models.resnet18().eval()
    out: list[tuple[int, int]] = []

    def hook(mod, inp, y):
        out.append((kernel_macs(mod.in_channels, mod.groups, mod.kernel_size, y.shape[2:]),
                    mod.out_channels))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in handles:
        h.remove()
    return out


def _kernelwise_instance(rng, copies: int = 1, a_bits: int = 4):
    """Kernel-wise weight bits {2..8} for every ResNet-18 output channel; BitOPs costs and an
    error model ``s_k · 4^{-b}`` (uniform-noise MSE) with lognormal per-kernel sensitivity."""
    costs, errors, bits = [], [], []
    for _ in range(copies):
        for km, c_out in _resnet18_kernels():
            sens = rng.lognormal(0.0, 1.0, size=c_out)
            jitter = 1 + 0.1 * rng.random((c_out, len(BITS)))
            for k in range(c_out):
                costs.append([km * b * a_bits for b in BITS])
                errors.append([float(sens[k] * 4.0 ** -b * jitter[k, i])
                               for i, b in enumerate(BITS)])
                bits.append(BITS)
    return costs, errors, bits


def test_kernelwise_resnet18_budget_and_speed():
    rng = np.random.default_rng(0)
    costs, errors, bits = _kernelwise_instance(rng)
    assert len(costs) == 4800
    budget = int(sum(c[1] + c[2] for c in costs) // 2)  # "3.5-bit" average weights
    t0 = time.perf_counter()
    exact = solve(costs, errors, budget, bits=bits)
    seconds = time.perf_counter() - t0
    greedy = solve_greedy(costs, errors, budget, bits=bits)
    assert exact.optimal and exact.method == "milp"
    assert 0.99 * budget <= exact.total_cost <= budget       # within 1% from below
    assert exact.total_error <= greedy.total_error
    assert seconds < 10.0, f"kernel-wise ResNet-18 solve took {seconds:.1f}s"
    # Mixed precision really happens: sensitive kernels get more bits than insensitive ones.
    assert len(set(exact.bits)) >= 3


def test_ten_thousand_items_seven_candidates():
    rng = np.random.default_rng(1)
    costs, errors, _ = _kernelwise_instance(rng, copies=2)
    assert len(costs) == 9600
    budget = int(sum(c[2] for c in costs) * 1.01)
    t0 = time.perf_counter()
    exact = solve(costs, errors, budget)
    seconds = time.perf_counter() - t0
    assert exact.optimal and 0.99 * budget <= exact.total_cost <= budget
    assert seconds < 10.0, f"10k-item solve took {seconds:.1f}s"
    assert exact.total_error <= solve_greedy(costs, errors, budget).total_error


def test_dp_and_milp_agree_on_medium_instance():
    # Layer-wise weight-only size budget (MixQuant-like): costs = params·bits share a gcd, so
    # the exact DP applies; the MILP must find the same optimum.
    rng = np.random.default_rng(2)
    params = [int(p) for p in rng.integers(1, 200, size=40) * 64]
    costs = [[p * b for b in BITS] for p in params]
    errors = [[float(s * 4.0 ** -b) for b in BITS] for s in rng.lognormal(0, 2, size=40)]
    budget = sum(p * 4 for p in params) + 12_345
    dp, milp = solve_dp(costs, errors, budget), solve_milp(costs, errors, budget)
    assert dp.total_error == pytest.approx(milp.total_error, rel=1e-9, abs=1e-12)
    assert dp.total_cost <= budget and milp.total_cost <= budget
    assert solve(costs, errors, budget).method == "dp"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), frac=st.floats(0.3, 0.95))
def test_solve_pairs_matches_brute_force_with_shared_widths(seed, frac):
    """3 layers, layers 0 and 1 share one activation width; BitOPs-like costs w·a·macs."""
    from qpasses.algorithms.solver import solve_pairs
    rng = np.random.default_rng(seed)
    macs = rng.integers(1, 50, size=3)
    lam = rng.uniform(2, 8, size=(3, 2))
    ws, As = (2, 4, 8), (4, 8)
    items = [[(w, a, float(macs[i] * w * a), (w - lam[i, 0]) ** 2 + (a - lam[i, 1]) ** 2)
              for w in ws for a in As] for i in range(3)]
    top = sum(float(m) * 8 * 8 for m in macs)
    budget = frac * top
    best = None
    for choice in itertools.product(*items):
        if choice[0][1] != choice[1][1]:
            continue
        cost = sum(c for _, _, c, _ in choice)
        err = sum(e for _, _, _, e in choice)
        if cost <= budget and (best is None or err < best[0] - 1e-12):
            best = (err, cost)
    got = solve_pairs(items, [[0, 1]], budget)
    if best is None:
        assert got is None
        return
    assert got is not None and got[0][1] == got[1][1]
    pick = [next(c for c in items[i] if (c[0], c[1]) == got[i]) for i in range(3)]
    assert sum(c for _, _, c, _ in pick) <= budget
    assert sum(e for _, _, _, e in pick) == pytest.approx(best[0], abs=1e-6)
    # a lower bound is honoured whenever some allocation meets it; else the closest below
    feasible = [sum(c for _, _, c, _ in ch) for ch in itertools.product(*items)
                if ch[0][1] == ch[1][1] and sum(c for _, _, c, _ in ch) <= budget]
    low = solve_pairs(items, [[0, 1]], budget, lower=budget * 0.99)
    cost = sum(next(c for c in items[i] if (c[0], c[1]) == low[i])[2] for i in range(3))
    assert cost <= budget
    if not any(c >= 0.99 * budget for c in feasible):
        assert cost == pytest.approx(max(feasible))
    else:
        assert cost >= 0.99 * budget - 1e-6
