"""Budget-exact bit allocation as a multiple-choice knapsack (MCKP).

Each item (a layer, or one output kernel in kernel-wise mode) has a list of candidates; candidate
j of item i has an integer cost ``c_ij`` (BitOPs or size bits) and an error ``e_ij`` (sensitivity,
quantization MSE, ...). Choose exactly one candidate per item to

    minimize Σ_i e_i,choice(i)   subject to   Σ_i c_i,choice(i) <= budget.

Solvers:

* ``"milp"`` - exact, as a 0/1 MILP solved by HiGHS through :func:`scipy.optimize.milp`
  (scipy is a project dependency for this reason: it ships a robust branch-and-cut MILP solver
  and is already required by scikit-learn). An exact Lagrangian reduced-cost fixing step first
  removes every candidate that provably cannot be in an optimal allocation, so 10k items × 7
  candidates solve in about a second. Costs are checked afterwards in exact integer arithmetic,
  and the budget row is tightened and re-solved if HiGHS' float tolerance let a solution
  overshoot.
* ``"dp"`` - exact dynamic programming over costs divided by their greatest common divisor
  (exact, no rounding); only for small reduced budgets (``dp_max_cells``).
* ``"greedy"`` - the classic baseline: start every item at its most accurate candidate and
  repeatedly lower the item with the smallest Δerror/Δcost until the budget is met.
* ``"exact"`` (default) - ``"dp"`` when the DP table is small, else ``"milp"``.

Before solving, candidates dominated by another candidate of the same item (cost <= and
error <=, one strictly) are dropped, items left with a single candidate are fixed, and after an
exact solve any leftover budget is spent on equal-error, costlier candidates ("aim at the budget
from below" without changing the optimal error). Constraints such as a maximum accumulator
width are expressed by the caller removing candidates.
"""
from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qpasses.errors import NumericsError

__all__ = ["Allocation", "solve", "solve_milp", "solve_dp", "solve_greedy", "METHODS"]

METHODS = ("exact", "milp", "dp", "greedy")
_DP_LIMIT = 50_000_000  # cells of the DP table (1 byte each for the argmin table)


@dataclass(frozen=True)
class Allocation:
    """Result of a bit allocation.

    ``choices[i]`` indexes item i's candidate list as given (``bits[i]`` is that candidate's
    bit-width when ``bits`` were given, else None). ``optimal`` is True when the method proved
    optimality (exact methods that finished); ``mip_gap`` is HiGHS' final relative gap.
    """

    choices: tuple[int, ...]
    bits: tuple[int, ...] | None
    total_cost: int
    total_error: float
    budget: int
    method: str
    optimal: bool
    seconds: float
    mip_gap: float | None = None

    @property
    def utilisation(self) -> float:
        """``total_cost / budget`` (<= 1 for every returned allocation)."""
        return self.total_cost / self.budget if self.budget else 1.0

    @property
    def slack(self) -> int:
        """Unused budget, ``budget - total_cost`` (>= 0)."""
        return self.budget - self.total_cost


@dataclass
class _Problem:
    """Items in CSR form after dominance filtering; indices refer to the caller's candidates."""

    costs: list[np.ndarray]      # per item, original candidate costs (int64)
    errors: list[np.ndarray]     # per item, original candidate errors (float64)
    keep: list[np.ndarray]       # per item, indices of the non-dominated candidates, cost asc
    budget: int


def _prepare(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]],
             budget: int, bits: Sequence[Sequence[int]] | None) -> _Problem:
    if len(costs) != len(errors):
        raise NumericsError(f"got costs for {len(costs)} items but errors for {len(errors)}")
    if bits is not None and len(bits) != len(costs):
        raise NumericsError(f"got bits for {len(bits)} items but costs for {len(costs)}")
    if int(budget) != budget:
        raise NumericsError(f"budget must be an integer, got {budget!r}")
    c_list, e_list, keep = [], [], []
    for i, (c_i, e_i) in enumerate(zip(costs, errors)):
        c = np.asarray(c_i)
        e = np.asarray(e_i, dtype=np.float64)
        if c.ndim != 1 or c.size == 0 or c.shape != e.shape:
            raise NumericsError(f"item {i}: needs >= 1 candidate and as many errors as costs "
                                f"(got {c.size} costs, {e.size} errors); an item with no "
                                "admissible candidate cannot be allocated")
        if bits is not None and len(bits[i]) != c.size:
            raise NumericsError(f"item {i}: {len(bits[i])} bit-widths for {c.size} candidates")
        if not np.issubdtype(c.dtype, np.integer):
            if not np.all(np.mod(c, 1) == 0):
                raise NumericsError(f"item {i}: costs must be integers (BitOPs or bits)")
        c = c.astype(np.int64)
        if np.any(c < 0) or not np.all(np.isfinite(e)):
            raise NumericsError(f"item {i}: costs must be >= 0 and errors finite")
        # Pareto front: sort by (cost, error); keep a candidate only if strictly more accurate
        # than every cheaper one. This drops dominated and duplicate candidates.
        order = np.lexsort((e, c))
        front, best = [], math.inf
        for j in order:
            if e[j] < best:
                front.append(j)
                best = e[j]
        c_list.append(c)
        e_list.append(e)
        keep.append(np.asarray(front, dtype=np.int64))
    min_cost = sum(int(c[k[0]]) for c, k in zip(c_list, keep))
    if min_cost > budget:
        raise NumericsError(f"budget {int(budget)} is infeasible: the cheapest admissible "
                            f"allocation costs {min_cost}; raise the budget or allow fewer bits")
    return _Problem(c_list, e_list, keep, int(budget))


def _finish(p: _Problem, choice: list[int], bits: Sequence[Sequence[int]] | None, method: str,
            optimal: bool, t0: float, fill: bool, mip_gap: float | None = None) -> Allocation:
    total = sum(int(p.costs[i][j]) for i, j in enumerate(choice))
    if total > p.budget:  # exact integer check of what the numeric solvers returned
        raise AssertionError(f"{method} solver returned cost {total} > budget {p.budget}")
    if fill:
        # Spend leftover budget on costlier candidates of equal (or lower) error: the optimal
        # error is unchanged and the allocation moves toward the budget from below.
        slack = p.budget - total
        for i, j in enumerate(choice):
            c, e = p.costs[i], p.errors[i]
            ok = np.flatnonzero((e <= e[j]) & (c > c[j]) & (c - c[j] <= slack))
            if ok.size:
                best = int(ok[np.argmax(c[ok])])
                slack -= int(c[best] - c[j])
                choice[i] = best
        total = p.budget - slack
    err = float(sum(p.errors[i][j] for i, j in enumerate(choice)))
    chosen_bits = None if bits is None else tuple(int(bits[i][j]) for i, j in enumerate(choice))
    return Allocation(tuple(int(j) for j in choice), chosen_bits, total, err, p.budget, method,
                      optimal, time.perf_counter() - t0, mip_gap)


def solve_greedy(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int,
                 bits: Sequence[Sequence[int]] | None = None) -> Allocation:
    """Greedy baseline: start at each item's most accurate (max-bits) candidate and repeatedly
    step the item whose next cheaper candidate has the smallest Δerror/Δcost, until the total
    cost is <= budget. Not optimal; O(N·M·log N)."""
    t0 = time.perf_counter()
    return _greedy(_prepare(costs, errors, budget, bits), bits, t0)


def _greedy(p: _Problem, bits: Sequence[Sequence[int]] | None, t0: float) -> Allocation:
    pos = [len(k) - 1 for k in p.keep]  # position on the front; last = most accurate
    total = sum(int(p.costs[i][k[-1]]) for i, k in enumerate(p.keep))

    def step(i: int) -> tuple[float, int, int] | None:
        if pos[i] == 0:
            return None
        cur, nxt = p.keep[i][pos[i]], p.keep[i][pos[i] - 1]
        d_err = p.errors[i][nxt] - p.errors[i][cur]
        d_cost = int(p.costs[i][cur] - p.costs[i][nxt])  # > 0 on a Pareto front
        return d_err / d_cost, -d_cost, i  # ties: prefer the bigger saving, then item order

    heap = [s for s in (step(i) for i in range(len(pos))) if s is not None]
    heapq.heapify(heap)
    while total > p.budget:
        _, neg_saving, i = heapq.heappop(heap)  # never empty: all-min is feasible (_prepare)
        total += neg_saving
        pos[i] -= 1
        nxt = step(i)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    choice = [int(k[q]) for k, q in zip(p.keep, pos)]
    return _finish(p, choice, bits, "greedy", False, t0, fill=False)


def _reduced(p: _Problem) -> tuple[list[int], list[np.ndarray], list[np.ndarray], int, float]:
    """Fix single-candidate items and shift each free item so its cheapest candidate costs 0
    and has error 0. Returns (free items, reduced costs, reduced errors, reduced budget,
    constant error)."""
    free, rc, re = [], [], []
    base_cost, base_err = 0, 0.0
    for i, k in enumerate(p.keep):
        c0, e0 = int(p.costs[i][k[0]]), float(p.errors[i][k[0]])
        base_cost += c0
        base_err += e0
        if len(k) > 1:
            free.append(i)
            rc.append(p.costs[i][k] - c0)
            re.append(p.errors[i][k] - e0)
    return free, rc, re, p.budget - base_cost, base_err


def _dp_cells(rc: list[np.ndarray], cap: int) -> tuple[int, int]:
    """(gcd of reduced costs, number of DP cells) for the exact DP."""
    g = 0
    for c in rc:
        g = math.gcd(g, *(int(x) for x in c))
    if g == 0:
        return 1, 0
    return g, len(rc) * (cap // g + 1)


def solve_dp(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int,
             bits: Sequence[Sequence[int]] | None = None,
             max_cells: int = _DP_LIMIT) -> Allocation:
    """Exact DP over costs divided by their gcd: ``best[w] = min error with reduced cost <= w``,
    one vectorized min-plus update per item, argmin table for backtracking. Raises
    :class:`NumericsError` when ``items × (budget/gcd + 1)`` exceeds ``max_cells``."""
    t0 = time.perf_counter()
    return _dp(_prepare(costs, errors, budget, bits), bits, t0, max_cells)


def _dp(p: _Problem, bits: Sequence[Sequence[int]] | None, t0: float,
        max_cells: int) -> Allocation:
    choice = [int(k[0]) for k in p.keep]
    free, rc, re, cap, _ = _reduced(p)
    g, cells = _dp_cells(rc, cap)
    if cells > max_cells:
        raise NumericsError(f"DP table would have {cells} cells (> max_cells={max_cells}); "
                            "use method='milp'")
    if free:
        w_max = cap // g
        best = np.zeros(w_max + 1)
        arg = np.zeros((len(free), w_max + 1), dtype=np.uint8 if max(map(len, rc)) <= 255 else np.uint16)
        for n, (c, e) in enumerate(zip(rc, re)):
            c = c // g
            new = np.full(w_max + 1, np.inf)
            for j in range(len(c)):  # candidate j: new[w] = best[w - c_j] + e_j
                cj = int(c[j])
                if cj > w_max:
                    break  # costs ascend along the front
                cand = best[: w_max + 1 - cj] + e[j]
                better = cand < new[cj:]
                new[cj:][better] = cand[better]
                arg[n, cj:][better] = j
            best = new
        w = w_max
        for n in range(len(free) - 1, -1, -1):
            j = int(arg[n, w])
            i = free[n]
            choice[i] = int(p.keep[i][j])
            w -= int(rc[n][j] // g)
    return _finish(p, choice, bits, "dp", True, t0, fill=True)


def _fill_up(p: _Problem, pos: list[int], slack: int) -> list[int]:
    """Greedy upward repair: while some item's next more accurate front candidate fits in the
    slack, take the one with the best error decrease per unit cost. ``pos`` indexes the fronts.
    """
    def step(i: int) -> tuple[float, int, int] | None:
        if pos[i] + 1 >= len(p.keep[i]):
            return None
        cur, nxt = p.keep[i][pos[i]], p.keep[i][pos[i] + 1]
        d_cost = int(p.costs[i][nxt] - p.costs[i][cur])
        return (p.errors[i][nxt] - p.errors[i][cur]) / d_cost, d_cost, i

    heap = [s for s in (step(i) for i in range(len(pos))) if s is not None]
    heapq.heapify(heap)
    while heap:
        _, d_cost, i = heapq.heappop(heap)
        if d_cost > slack:
            continue  # the cheapest upgrade of item i does not fit; no other one will
        slack -= d_cost
        pos[i] += 1
        nxt = step(i)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return pos


def _bound_reduce(p: _Problem) -> tuple[_Problem, list[int] | None]:
    """Exact problem reduction by Lagrangian reduced-cost fixing.

    For any λ >= 0, ``L(λ) = Σ_i min_j (e_ij + λ c_ij) − λ·budget`` is a lower bound, and any
    feasible allocation x satisfies ``E(x) >= L(λ) + Σ_i r_i,x(i)`` with reduced costs
    ``r_ij = e_ij + λ c_ij − min_j' (e_ij' + λ c_ij') >= 0``. So with an incumbent of error U,
    no allocation with error <= U uses a candidate with ``r_ij > U − L(λ)``: it is dropped.
    λ is found by bisection on the budget crossing (the LP dual); the incumbent is the
    λ-solution on the feasible side, repaired upward into the leftover budget
    (:func:`_fill_up`). The gap U − L is then about one item's step, so most items become fixed
    and the MILP that remains is small (ResNet-18 kernel-wise: 4.8k items → ~200). Returns the reduced problem and
    the incumbent's choices (None when the unconstrained optimum already fits).
    """
    n = len(p.keep)
    width = max(len(k) for k in p.keep)
    cost = np.zeros((n, width), dtype=np.int64)
    err = np.full((n, width), np.inf)
    for i, k in enumerate(p.keep):
        cost[i, :len(k)] = p.costs[i][k]
        err[i, :len(k)] = p.errors[i][k]
    rows = np.arange(n)
    cost_f = cost.astype(np.float64)

    def pick(lam: float) -> tuple[np.ndarray, int]:
        # argmin takes the first (cheapest, since fronts are cost-ascending) on ties.
        idx = np.argmin(err + lam * cost_f, axis=1)
        return idx, int(cost[rows, idx].sum())

    idx0, used0 = pick(0.0)
    if used0 <= p.budget:  # every item at its most accurate candidate fits: optimal
        keep = [k[j:j + 1] for k, j in zip(p.keep, idx0)]
        return _Problem(p.costs, p.errors, keep, p.budget), None
    finite = err[np.isfinite(err)]
    lam_hi = (float(np.ptp(finite)) + 1.0) / max(1.0, float(cost_f.max()))
    while pick(lam_hi)[1] > p.budget:  # terminates: a large λ picks the cheapest candidates
        lam_hi *= 2.0
    lam_lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lam_lo + lam_hi)
        if pick(mid)[1] <= p.budget:
            lam_hi = mid
        else:
            lam_lo = mid

    def lower(lam: float) -> float:
        return float(np.min(err + lam * cost_f, axis=1).sum() - lam * p.budget)

    lam = lam_hi if lower(lam_hi) >= lower(lam_lo) else lam_lo
    bound = lower(lam)
    idx_hi, used_hi = pick(lam_hi)
    pos = _fill_up(p, [int(j) for j in idx_hi], p.budget - used_hi)
    inc = [int(k[q]) for k, q in zip(p.keep, pos)]
    inc_err = float(sum(p.errors[i][j] for i, j in enumerate(inc)))
    red = err + lam * cost_f
    red -= red.min(axis=1, keepdims=True)
    # Margin for float round-off in the sums: never drop a candidate that might be optimal.
    tol = 1e-9 * (float(np.abs(finite).max()) * n + abs(bound) + 1.0)
    alive = red <= (inc_err - bound) + tol
    keep = [k[alive[i, :len(k)]] for i, k in enumerate(p.keep)]
    return _Problem(p.costs, p.errors, keep, p.budget), inc


def solve_milp(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int,
               bits: Sequence[Sequence[int]] | None = None, time_limit: float | None = None,
               mip_rel_gap: float = 0.0) -> Allocation:
    """Exact 0/1 MILP with HiGHS: binary x_ij, ``Σ_j x_ij = 1`` per free item,
    ``Σ c'_ij x_ij <= budget'`` (costs shifted so each item's cheapest candidate is 0, scaled by
    the budget for conditioning), minimize ``Σ e'_ij x_ij`` (errors scaled by their max; HiGHS
    proves optimality up to its absolute gap of 1e-6 on that scaled objective). ``optimal`` is
    False when ``time_limit`` stopped HiGHS first or ``mip_rel_gap`` > 0."""
    t0 = time.perf_counter()
    return _milp(_prepare(costs, errors, budget, bits), bits, t0, time_limit, mip_rel_gap)


def _milp(p: _Problem, bits: Sequence[Sequence[int]] | None, t0: float,
          time_limit: float | None, mip_rel_gap: float) -> Allocation:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    p, incumbent = _bound_reduce(p)
    choice = [int(k[0]) for k in p.keep]
    free, rc, re, cap, _ = _reduced(p)
    optimal, gap = True, 0.0
    if free and cap > 0:
        sizes = np.array([len(c) for c in rc])
        n_var = int(sizes.sum())
        row = np.repeat(np.arange(len(free)), sizes)
        one_hot = csr_array((np.ones(n_var), (row, np.arange(n_var))),
                            shape=(len(free), n_var))
        c_flat = np.concatenate(rc).astype(np.float64)
        e_flat = np.concatenate(re)
        e_scale = float(np.abs(e_flat).max()) or 1.0
        # disp=False: HiGHS logs nothing to stdout (the tools' output is the report)
        options: dict[str, float | bool] = {"mip_rel_gap": mip_rel_gap, "presolve": True,
                                            "disp": False}
        if time_limit is not None:
            options["time_limit"] = time_limit
        rhs = float(cap)
        for _attempt in range(4):
            res = milp(e_flat / e_scale, integrality=np.ones(n_var),
                       bounds=Bounds(0, 1),
                       constraints=[LinearConstraint(one_hot, 1, 1),
                                    LinearConstraint(c_flat[None, :] / cap, -np.inf, rhs / cap)],
                       options=options)
            if res.x is None:
                if incumbent is not None and res.status == 1:  # time limit, nothing better
                    return _finish(p, incumbent, bits, "milp", False, t0, fill=True)
                raise NumericsError(f"MILP solver failed: {res.message}")
            # Round to one candidate per item and check the budget in exact integers.
            starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
            picks = [int(np.argmax(res.x[s:s + m])) for s, m in zip(starts, sizes)]
            used = sum(int(rc[n][j]) for n, j in enumerate(picks))
            if used <= cap:
                break
            rhs -= (used - cap) + 0.5  # HiGHS tolerance let it overshoot: tighten and retry
        else:
            raise NumericsError("MILP solution kept exceeding the budget after tightening")
        optimal = res.status == 0 and mip_rel_gap == 0.0
        gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
        for n, j in enumerate(picks):
            i = free[n]
            choice[i] = int(p.keep[i][j])
    return _finish(p, choice, bits, "milp", optimal, t0, fill=True, mip_gap=gap)


def solve(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int,
          bits: Sequence[Sequence[int]] | None = None, method: str = "exact",
          time_limit: float | None = None, dp_max_cells: int = 5_000_000) -> Allocation:
    """Choose one candidate per item minimizing total error with total cost <= ``budget``.

    ``costs[i][j]`` / ``errors[i][j]`` (and optionally ``bits[i][j]``) describe candidate j of
    item i. ``method``: ``"exact"`` (DP if its table has <= ``dp_max_cells`` cells, else MILP),
    ``"milp"``, ``"dp"`` or ``"greedy"``. Raises :class:`NumericsError` when even the cheapest
    allocation exceeds the budget (the message states that minimum).
    """
    if method not in METHODS:
        raise NumericsError(f"unknown solver method {method!r}; choose one of {METHODS}")
    t0 = time.perf_counter()
    p = _prepare(costs, errors, budget, bits)
    if method == "greedy":
        return _greedy(p, bits, t0)
    if method == "dp":
        return _dp(p, bits, t0, _DP_LIMIT)
    if method == "exact":
        _, rc, _, cap, _ = _reduced(p)
        if _dp_cells(rc, cap)[1] <= dp_max_cells:
            return _dp(p, bits, t0, dp_max_cells)
    return _milp(p, bits, t0, time_limit, 0.0)


def solve_pairs(items: Sequence[Sequence[tuple[int, int, float, float]]],
                groups: Sequence[Sequence[int]], budget: float, lower: float | None = None,
                time_limit: float | None = 20.0) -> list[tuple[int, int]] | None:
    """Choose one (weight, activation) width pair per layer: ``items[i]`` lists layer i's
    candidates as ``(w, a, cost, error)``; the layers of each ``groups`` entry read one tensor and
    must share ``a``. Minimizes ``Σ error`` subject to ``lower <= Σ cost <= budget``; when no
    allocation reaches ``lower``, the least error among those closest below the budget (HiGHS
    MILP, ``time_limit`` seconds per solve to prove optimality). BitOPs cost ``w·a`` per MAC, so pairs
    give a far finer cost grid than weights alone. Returns the pairs, or None when infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    cols = [(i, w, a) for i, cands in enumerate(items) for w, a, _, _ in cands]
    cost = [c for cands in items for _, _, c, _ in cands]
    err = [e for cands in items for _, _, _, e in cands]
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    gcols = sorted({(group_of[i], a) for i, _, a in cols if i in group_of})
    gindex = {k: len(cols) + j for j, k in enumerate(gcols)}
    nz = len(cols) + len(gcols)
    entries: list[tuple[int, int, float]] = []        # (row, column, value)
    lo: list[float] = []
    hi: list[float] = []

    def row(cells: list[tuple[int, float]], bound: float) -> None:
        entries.extend((len(lo), j, v) for j, v in cells)
        lo.append(bound)
        hi.append(bound)

    for i in range(len(items)):                       # one pair per layer
        row([(j, 1.0) for j, (m, _, _) in enumerate(cols) if m == i], 1.0)
    for g in range(len(groups)):                      # one width per group
        row([(j, 1.0) for (gg, _), j in gindex.items() if gg == g], 1.0)
    for i, g in group_of.items():                     # a layer's a = its group's a
        for a in sorted({a for m, _, a in cols if m == i}):
            row([(j, 1.0) for j, (m, _, aa) in enumerate(cols) if m == i and aa == a]
                + [(gindex[(g, a)], -1.0)], 0.0)
    r, c, v = zip(*entries)
    rows = csr_array((v, (r, c)), shape=(len(lo), nz))
    constraints = [LinearConstraint(rows, lo, hi)]
    options: dict[str, float | bool] = {"mip_rel_gap": 0.0, "disp": False}
    if time_limit is not None:
        options["time_limit"] = time_limit
    zeros = [0.0] * len(gcols)

    def run(objective: list[float], low: float) -> Any:
        return milp(c=objective + zeros, integrality=np.ones(nz), bounds=Bounds(0, 1),
                    constraints=constraints + [LinearConstraint([cost + zeros], [low], [budget])],
                    options=options)

    res = run(err, lower if lower is not None else -np.inf)
    if res.x is None and lower is not None:
        # no allocation in [lower, budget]: the closest below the budget, then the best error
        top = run([-c for c in cost], -np.inf)
        if top.x is None:
            return None
        reach = float(np.dot(cost, top.x[:len(cols)]))
        res = run(err, reach - 1e-9 * max(abs(reach), 1.0))
        if res.x is None:
            res = top
    if res.x is None:
        return None
    chosen: list[tuple[int, int]] = [(0, 0)] * len(items)
    for j, (i, w, a) in enumerate(cols):
        if res.x[j] > 0.5:
            chosen[i] = (w, a)
    return chosen
