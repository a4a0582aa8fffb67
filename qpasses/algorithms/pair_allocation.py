"""(weight, activation) pair allocation: ``solve-bitwidths{act-candidates=[...]}``, and the pair
costs that ``freeze-fracbits{rounding=solver}`` shares.

Each layer is one item whose candidates are (w, a) pairs: w from ``candidates`` (the annotated
width for pinned layers), a from ``act-candidates``. Costs come from the one cost model
(:mod:`qpasses.algorithms.cost_model`; BitOPs are ``MACs·w·a``, so pairs give a far finer cost
grid than weights alone). The layers reading one scale-sharing group
(:func:`qpasses.ir.joins.scale_sharing_groups`; the calls of a shared module join their groups)
get one activation width; the inputs of the first layers (the image, counted at 8 bits by the
FracBits conventions) keep their annotated width, and so does every group they are in.

Error of a pair (first-order output-noise model per output position, additive independent
noise): ``e(w, a) = E[x²]·‖Q_w(W) − W‖² + ‖W‖²·E[(Q_a(x) − x)²]`` summed over the layer's calls,
where the weight term is the ``quant-error`` sensitivity (per-channel min/max) and the
activation term is measured on up to 4 batches of ``PassContext.calibration_data`` (else
``example_inputs``) with a per-tensor min/max quantizer of the annotated activation scheme.
One MILP (:func:`qpasses.algorithms.solver.solve_pairs`) minimizes ``Σ e`` with
``0.99·budget <= cost <= budget`` (else the closest allocation below the budget); the chosen
total is checked in exact integers afterwards.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import networkx as nx
import torch
import torch.fx

from qpasses.algorithms import solver
from qpasses.algorithms.bit_allocation import (PASS_NAME, SolveBitwidthsOptions, SolveResult,
                                               acc_filter, format_budget, partition_layers)
from qpasses.algorithms.cost_model import (FRACBITS, CostConventions, LayerCost, annotated_bits,
                                           cost_layers, layer_bitops, layer_size_bits,
                                           model_bitops, model_size_bits)
from qpasses.algorithms.product_costs import products_bitops
from qpasses.algorithms.sensitivity import (SensitivityError, SensitivityRequest,
                                            lookup_sensitivity)
from qpasses.errors import BudgetError, PassFailure
from qpasses.ir.annotations import QuantSpec, get_qmeta
from qpasses.ir.batches import check_batch_inputs, context_batches
from qpasses.ir.joins import layer_input, scale_sharing_groups
from qpasses.ir.layers import LayerInfo, layer_weight, quantizable_layers
from qpasses.numerics import quantizers

__all__ = ["activation_noise", "layer_pair_costs", "solve_pair_bitwidths"]


def layer_pair_costs(gm: torch.fx.GraphModule, w_choices: dict[str, tuple],
                     a_choices: dict[str, tuple], metric: str,
                     conventions: CostConventions = FRACBITS
                     ) -> tuple[dict[str, dict[tuple, float]], float]:
    """``({layer: {(w, a): cost}}, cost of everything else)`` of the annotated graph, in BitOPs
    (``metric="bitops"``) or size bits, through the shared cost model (a layer called several
    times costs the sum over its calls); ``a`` may be None (a layer whose input width is not
    chosen). For :func:`~qpasses.algorithms.solver.solve_pairs`."""
    calls: dict[str, list[LayerCost]] = {}
    for c in cost_layers(gm, conventions):
        calls.setdefault(c.name, []).append(c)
    w_now, a_now = annotated_bits(gm)

    def cost(n: str, w: Any, a: Any) -> float:
        wm, am = {n: w}, {n: a if a is not None else a_now.get(n)}
        return float(sum(float(layer_bitops(c, wm, am, conventions)) if metric == "bitops"
                         else float(layer_size_bits(c, wm, conventions)) for c in calls[n]))

    costs = {n: {(w, a): cost(n, w, a) for w in w_choices[n] for a in a_choices[n]}
             for n in w_choices}
    layers = [c for cs in calls.values() for c in cs]
    total = (float(model_bitops(layers, w_now, a_now, conventions))
             + products_bitops(gm, conventions) if metric == "bitops"  # products: a constant
             else float(model_size_bits(layers, w_now, conventions)))
    fixed = total - sum(cost(n, w_now.get(n), a_now.get(n)) for n in w_choices)
    return costs, fixed


def _scheme(spec: QuantSpec) -> tuple[str, bool]:
    if spec.scheme in ("symmetric", "asymmetric", "unsigned"):
        return spec.scheme, spec.narrow_range and spec.scheme == "symmetric"
    return ("symmetric", spec.narrow_range) if spec.signed else ("unsigned", False)


def activation_noise(gm: torch.fx.GraphModule, specs: dict[str, QuantSpec | None],
                     candidates: tuple[int, ...], ctx: Any
                     ) -> dict[str, tuple[float, list[float]]]:
    """``{layer node: (E[x²], [E[(Q_a(x) − x)²] for a in candidates])}`` of each named layer
    call's input ``x`` over up to 4 batches of the context's data (per-tensor min/max qparams
    of the node's activation spec per batch; no spec: the list is empty)."""
    batches = context_batches(ctx, gm)
    if not batches:
        raise SensitivityError(f"{PASS_NAME}{{act-candidates}}: activation errors are measured "
                               "on data: run the pipeline inside PassContext(calibration_data="
                               "...) or PassContext(example_inputs=...)")
    nodes = {n.name: n for n in gm.graph.nodes}
    inputs = {name: layer_input(nodes[name]) for name in specs}
    acc = {name: [0.0, 0, [0.0] * len(candidates)] for name in specs}

    class _Rec(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            if node.name in acc and inputs[node.name] in self.env:
                x = self.env[inputs[node.name]]
                if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
                    x = x.detach().double()
                    if not bool(torch.isfinite(x).all()):
                        raise SensitivityError(
                            f"{PASS_NAME}{{act-candidates}}: the input of layer node "
                            f"'{node.name}' holds NaN or inf on the calibration data; check the "
                            "data (activation errors are measured on it)")
                    rec = acc[node.name]
                    rec[0] += float((x * x).sum())
                    rec[1] += x.numel()
                    spec = specs[node.name]
                    if spec is not None:
                        scheme, narrow = _scheme(spec)
                        for j, a in enumerate(candidates):
                            s, z = quantizers.minmax_qparams(x, a, scheme, narrow=narrow)
                            d = quantizers.quantize_dequantize(x, s, z, a, scheme,
                                                               narrow=narrow) - x
                            rec[2][j] += float((d * d).sum())
            return super().run_node(node)

    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                check_batch_inputs(gm, b, i, PASS_NAME)
                _Rec(gm).run(*b)
    finally:
        gm.train(was)
    out = {}
    for name, (sq, count, sse) in acc.items():
        count = max(count, 1)
        out[name] = (sq / count, [v / count for v in sse] if specs[name] is not None else [])
    return out


def _act_groups(gm: torch.fx.GraphModule, items: list[str], fixed_a: set[str]
                ) -> tuple[list[list[int]], set[str]]:
    """Components of items that must share one activation width (they read tensors of one
    scale-sharing group, joined through the calls of shared modules), and the items whose width
    stays as annotated (a component holding a fixed item or a reader that is not an item)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    group_of = {t: g for g, members in enumerate(scale_sharing_groups(gm)) for t in members}
    index = {n: i for i, n in enumerate(items)}
    graph = nx.Graph()
    graph.add_nodes_from(range(len(items)))
    outside: set[int] = set()
    for info in quantizable_layers(gm):
        node = nodes[info.node]
        x = layer_input(node)
        if x is None or get_qmeta(node).act is None or x.name not in group_of:
            continue
        g = ("g", group_of[x.name])
        if info.name in index:
            graph.add_edge(index[info.name], g)
        else:
            graph.add_edge(("out", info.name), g)
            outside.add(group_of[x.name])
    comps, fixed = [], set(fixed_a)
    for comp in nx.connected_components(graph):
        members = sorted(i for i in comp if isinstance(i, int))
        if any(items[i] in fixed_a for i in members) or \
                any(isinstance(k, tuple) and k[0] == "g" and k[1] in outside for k in comp):
            fixed.update(items[i] for i in members)
        elif len(members) > 1:
            comps.append(members)
    return comps, fixed


def solve_pair_bitwidths(gm: torch.fx.GraphModule, options: SolveBitwidthsOptions,
                         ctx: Any = None, *, conventions: CostConventions = FRACBITS
                         ) -> SolveResult:
    """Choose (weight, activation) pairs for the layers of an annotated graph (module
    docstring; writes nothing). ``SolveResult.bits`` holds the searched weights,
    ``act_bits`` the chosen input widths. BudgetError when the target is outside the reachable
    range; PassFailure when ``max-acc-bits`` leaves a layer no pair."""
    t0 = time.perf_counter()
    opts = options
    conv = dataclasses.replace(conventions, prune_inputs=False)
    by_node = {c.node: c for c in cost_layers(gm, conv)}
    searchable, fixed_layers = partition_layers(gm, opts.pin_first_last, by_node)
    nodes = {n.name: n for n in gm.graph.nodes}
    w_now, _ = annotated_bits(gm)
    # items: searchable layers, plus pinned layers whose input width is chosen
    calls: dict[str, list[tuple[LayerInfo, LayerCost]]] = {
        n: [(info, c) for info, c, _ in cs] for n, cs in searchable.items()}
    for info in fixed_layers:
        q = get_qmeta(nodes[info.node])
        if q.weight is not None and q.float_island is None and q.act is not None:
            calls.setdefault(info.name, []).append((info, by_node[info.node]))
    items = list(calls)
    fixed_a = {n for n, cs in calls.items()
               if any(get_qmeta(nodes[i.node]).act is None or
                      (c.first and conv.first_input_bits is not None) for i, c in cs)}
    groups, fixed_a = _act_groups(gm, items, fixed_a)
    cands = tuple(sorted(opts.candidates))
    acands = tuple(sorted(opts.act_candidates))
    w_choices = {n: (cands if n in searchable else (w_now[n],)) for n in items}
    a_choices = {n: ((None,) if n in fixed_a else acands) for n in items}

    pairs: dict[str, list[tuple[Any, Any]]] = {}
    for n in items:
        ok = [(w, a) for w in w_choices[n] for a in a_choices[n]]
        if opts.max_acc_bits is not None:
            for info, _ in calls[n]:
                q = get_qmeta(nodes[info.node])
                ok = [(w, a) for w, a in ok if acc_filter(
                    info, q.weight, q.act if a is None else q.act.replace(bits=a),
                    (max(w) if isinstance(w, tuple) else w,), opts.max_acc_bits)[0]]
            if not ok:
                raise PassFailure(f"max-acc-bits={opts.max_acc_bits} leaves layer '{n}' no "
                                  f"(weight, activation) pair among {list(w_choices[n])} x "
                                  f"{[a for a in a_choices[n] if a is not None] or 'annotated'}"
                                  ": raise max-acc-bits or allow fewer bits")
        pairs[n] = ok

    costs, fixed_f = layer_pair_costs(gm, w_choices, a_choices, opts.metric, conv)
    fixed = int(round(fixed_f))
    budget = opts.budget
    lo = fixed + sum(int(min(costs[n][p] for p in pairs[n])) for n in items)
    hi = fixed + sum(int(max(costs[n][p] for p in pairs[n])) for n in items)
    option = "target-bitops" if opts.metric == "bitops" else "target-size"
    unit, scale = ("GBitOPs", 1e9) if opts.metric == "bitops" else ("MB", 8e6)
    if not lo <= budget <= hi:
        where = "below the minimum" if budget < lo else "above the maximum"
        raise BudgetError(
            PASS_NAME, option,
            f"{format_budget(opts.metric, budget)} is {where} reachable with candidates "
            f"{list(cands)} and act-candidates {list(acands)}: the reachable range is "
            f"[{format_budget(opts.metric, lo)}, {format_budget(opts.metric, hi)}] "
            f"({len(items)} layers; everything else costs {format_budget(opts.metric, fixed)})",
            minimum=lo / scale, maximum=hi / scale, unit=unit)

    # errors: output-noise model (module docstring)
    names = list(searchable)
    req = SensitivityRequest(gm, tuple(searchable[n][0][0] for n in names),
                             tuple(searchable[n][0][2] for n in names), cands, "layer", ctx)
    w_err = {n: dict(zip(cands, e.reshape(-1).tolist()))
             for n, e in zip(names, lookup_sensitivity("quant-error")(req))}
    specs = {info.node: (None if n in fixed_a else get_qmeta(nodes[info.node]).act)
             for n in items for info, _ in calls[n]}
    noise = activation_noise(gm, specs, acands, ctx)
    err: dict[str, dict[tuple, float]] = {}
    for n in items:
        info0 = calls[n][0][0]
        w_sq = float(layer_weight(gm, info0).detach().double().pow(2).sum())
        err[n] = {}
        for w, a in pairs[n]:
            e = 0.0
            for info, _ in calls[n]:
                m2, mse = noise[info.node]
                e += m2 * w_err.get(n, {}).get(w, 0.0)
                if a is not None:
                    e += w_sq * mse[acands.index(a)]
            err[n][(w, a)] = e
        if not all(math.isfinite(e) for e in err[n].values()):
            raise SensitivityError(f"{PASS_NAME}{{act-candidates}}: the errors of layer '{n}' "
                                   "are not finite (NaN or inf in the data, the weights or the "
                                   "layer's input); check the calibration data")
    top = max((e for d in err.values() for e in d.values()), default=0.0) or 1.0

    rows = [[(w, a, costs[n][(w, a)], err[n][(w, a)] / top) for w, a in pairs[n]] for n in items]
    cap = budget - fixed
    for _ in range(4):
        chosen = solver.solve_pairs(rows, groups, cap, lower=0.99 * budget - fixed,
                                    time_limit=opts.time_limit)
        if chosen is None:
            raise PassFailure(f"no (weight, activation) allocation meets "
                              f"{format_budget(opts.metric, budget)} while the layers of each "
                              "scale-sharing group share one activation width (max-acc-bits "
                              "leaves them no common width); raise the target or max-acc-bits")
        used = sum(int(costs[n][p]) for n, p in zip(items, chosen))
        if fixed + used <= budget:       # exact integer check of the float MILP
            break
        cap -= (fixed + used - budget) + 0.5
    else:
        raise PassFailure("the pair MILP kept exceeding the budget after tightening")
    seconds = time.perf_counter() - t0
    choice = tuple(pairs[n].index(p) for n, p in zip(items, chosen))
    alloc = solver.Allocation(choice, tuple(int(max(w) if isinstance(w, tuple) else w)
                                            for w, _ in chosen), used,
                              float(sum(err[n][p] for n, p in zip(items, chosen))), budget - fixed,
                              "milp-pairs", opts.time_limit is None or seconds < opts.time_limit,
                              seconds)
    bits = {n: int(w) for n, (w, _) in zip(items, chosen) if n in searchable}
    act_bits = {n: int(a) for n, (_, a) in zip(items, chosen) if a is not None}
    return SolveResult(bits, alloc, opts.metric, budget, fixed, fixed + used, (lo, hi),
                       len(items), seconds, act_bits)
