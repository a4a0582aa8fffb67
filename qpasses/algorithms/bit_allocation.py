"""Budget-exact weight bit allocation over an annotated graph, shared by ``solve-bitwidths``,
``freeze-fracbits{rounding=solver}``, ``select-gmpq-policy`` and ``search-mixquant``: the items
(layers or kernels) with their candidate costs and errors, the call into the exact solver, and
writing the chosen widths back into QMeta. The pass ``solve-bitwidths`` documents the method.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx

from passes_registry import OptionError
from passes_registry.suggest import did_you_mean

from qpasses.algorithms.cost_model import (FRACBITS, CostConventions, LayerCost, annotated_bits,
                                           cost_layers, kernel_bitops, kernel_size_bits)
from qpasses.algorithms.product_costs import products_bitops
from qpasses.errors import BudgetError, NumericsError, PassFailure
from qpasses.ir.layers import LayerInfo, quantizable_layers
from qpasses.ir.annotations import MAX_BITS, QuantSpec, get_qmeta, update_qmeta
from qpasses.numerics import costs
from qpasses.algorithms import solver
from qpasses.algorithms.sensitivity import SensitivityRequest, lookup_sensitivity, sensitivity_names

__all__ = ["SolveBitwidthsOptions", "SolveResult", "check_candidates", "format_budget",
           "acc_filter", "partition_layers", "solve_bitwidths", "write_bits"]

PASS_NAME = "solve-bitwidths"


def check_candidates(pass_name: str, candidates: Any, *, allow_zero: bool = True,
                     option: str = "candidates", zero_hint: str | None = None) -> None:
    """OptionError (naming ``option``) unless ``candidates`` is a non-empty list of distinct ints
    in 0..32 (1..32 unless ``allow_zero``; ``zero_hint`` says why 0 is refused)."""
    if not isinstance(candidates, tuple) or not candidates:
        raise OptionError(pass_name, option, "give at least one bit-width, e.g. "
                                             "[2,3,4,5,6,7,8]")
    for b in candidates:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= MAX_BITS:
            raise OptionError(pass_name, option, f"{b!r} is out of range: candidate "
                                                 f"bit-widths are ints in 0..{MAX_BITS}")
    if len(set(candidates)) != len(candidates):
        raise OptionError(pass_name, option, f"{list(candidates)} lists a bit-width twice")
    if not allow_zero and 0 in candidates:
        raise OptionError(pass_name, option, zero_hint or
                          "0 (pruned) is only a candidate with granularity=kernel: a 0-bit layer "
                          "would cut the network")


def _check_target(option: str, value: float | None) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value <= 0:
        raise OptionError(PASS_NAME, option, f"{value} is not a valid budget: it must be a "
                                             "positive, finite number")
    if value > MAX_TARGET:
        unit = "GBitOPs" if option == "target-bitops" else "MB"
        raise OptionError(PASS_NAME, option, f"{value} {unit} is beyond any model (at most "
                                             f"{MAX_TARGET:g} {unit}); give the budget in {unit}")


#: largest accepted budget (GBitOPs or MB): beyond any model, and exact as integer BitOPs/bits
MAX_TARGET = 1e12


@dataclass(frozen=True)
class SolveBitwidthsOptions:
    target_bitops: float | None = field(default=None, metadata={
        "help": "BitOPs budget in GBitOPs (1e9 BitOPs, FracBits' unit); exclusive with "
                "target-size"})
    target_size: float | None = field(default=None, metadata={
        "help": "model-size budget in MB (1e6 bytes, weights at their bits + fp32 biases); "
                "exclusive with target-bitops"})
    candidates: tuple[int, ...] = field(default=(2, 3, 4, 5, 6, 7, 8), metadata={
        "help": "allowed weight bit-widths (0..32; 0 = pruned kernel, kernel granularity only)"})
    granularity: Literal["layer", "kernel"] = field(default="layer", metadata={
        "help": "layer: one width per layer; kernel: one width per output kernel"})
    sensitivity: str = field(default="quant-error", metadata={
        "help": "error model: quant-error (weight quantization MSE), hessian (Hutchinson "
                "Hessian-trace-weighted, needs data), lambda (distance to learned FracBits λ), or "
                "one registered with qpasses.algorithms.sensitivity.register_sensitivity"})
    max_acc_bits: int | None = field(default=None, metadata={
        "help": "drop candidates whose worst-case accumulator exceeds this width"})
    method: Literal["exact", "milp", "dp", "greedy"] = field(default="exact", metadata={
        "help": "exact (DP when small, else MILP/HiGHS), milp, dp, or the greedy baseline"})
    pin_first_last: bool = field(default=True, metadata={
        "help": "keep the first and last layers' annotated weight bits (FracBits pins them to 8)"})
    probes: int = field(default=8, metadata={
        "help": "Rademacher probes of the Hutchinson estimate (sensitivity=hessian)"})
    keep_one_kernel: bool = field(default=True, metadata={
        "help": "kernel-wise with 0 among the candidates: in every layer the kernel that 0 bits "
                "would hurt most keeps a non-zero width, so no layer is pruned away (it would "
                "compute a constant); false: whole layers may reach 0 bits"})
    act_candidates: tuple[int, ...] | None = field(default=None, metadata={
        "help": "allowed activation (input) bit-widths, 1..32: choose (weight, activation) pairs "
                "per layer, one activation width per scale-sharing group (layer granularity, "
                "quant-error sensitivity, needs data); none: weights only, activations as "
                "annotated"})
    time_limit: float | None = field(default=60.0, metadata={
        "help": "seconds the MILP may take to prove optimality; then the best allocation found "
                "is used (stats: optimal=0). Many kernels with equal costs make proofs slow; "
                "none: no limit"})

    def __post_init__(self) -> None:
        if (self.target_bitops is None) == (self.target_size is None):
            raise OptionError(PASS_NAME, "target-bitops",
                              "give exactly one budget: target-bitops=GBITOPS or target-size=MB")
        _check_target("target-bitops", self.target_bitops)
        _check_target("target-size", self.target_size)
        check_candidates(PASS_NAME, self.candidates, allow_zero=self.granularity == "kernel")
        if self.sensitivity not in sensitivity_names():
            raise OptionError(PASS_NAME, "sensitivity",
                              f"unknown sensitivity '{self.sensitivity}' (registered: "
                              f"{', '.join(sensitivity_names())})"
                              + did_you_mean(self.sensitivity, sensitivity_names()))
        if self.max_acc_bits is not None and not 2 <= self.max_acc_bits <= 64:
            raise OptionError(PASS_NAME, "max-acc-bits", f"{self.max_acc_bits} is out of range: "
                                                         "accumulator widths are 2..64 bits")
        if self.probes < 1:
            raise OptionError(PASS_NAME, "probes", f"{self.probes} must be >= 1")
        if self.time_limit is not None and not self.time_limit > 0:
            raise OptionError(PASS_NAME, "time-limit", f"{self.time_limit} must be > 0 seconds "
                                                       "(or none)")
        if self.act_candidates is not None:
            self._check_act_candidates()

    def _check_act_candidates(self) -> None:
        check_candidates(PASS_NAME, self.act_candidates, allow_zero=False,
                         option="act-candidates",
                         zero_hint="0 activation bits would make every reader of the tensor "
                                   "compute a constant; activation widths are 1..32")
        why = None
        if self.granularity != "layer":
            why = ("pairs are chosen per layer: use granularity=layer (kernel-wise search "
                   "chooses weights only)")
        elif self.sensitivity != "quant-error":
            why = ("pairs are scored by the output-noise model of weight and activation "
                   "quantization errors: use sensitivity=quant-error")
        elif self.method not in ("exact", "milp"):
            why = "pairs are solved as one MILP (HiGHS): use method=exact or method=milp"
        if why:
            raise OptionError(PASS_NAME, "act-candidates", why)

    @property
    def metric(self) -> str:
        return "bitops" if self.target_bitops is not None else "size"

    @property
    def budget(self) -> int:
        """The budget in BitOPs or in bits (integers, rounded down)."""
        if self.target_bitops is not None:
            return _to_int(self.target_bitops * 1e9)
        return _to_int(self.target_size * 8e6)


def _to_int(x: float) -> int:
    r = round(x)
    return int(r) if abs(x - r) < 1e-3 else int(math.floor(x))


@dataclass(frozen=True)
class SolveResult:
    """What :func:`solve_bitwidths` decided (before or after writing it)."""
    bits: dict[str, int | tuple[int, ...]]   # searchable layer -> width (per-kernel tuple)
    allocation: solver.Allocation
    metric: str                              # "bitops" or "size"
    budget: int                              # BitOPs or bits
    fixed_cost: int                          # cost of everything not searched
    total_cost: int                          # fixed + chosen (model total as the cost model says)
    reachable: tuple[int, int]               # (min, max) total cost with the allowed candidates
    num_items: int
    seconds: float
    act_bits: dict[str, int] = field(default_factory=dict)  # act-candidates: layer -> input width

    @property
    def utilisation(self) -> float:
        return self.total_cost / self.budget


def format_budget(metric: str, value: int) -> str:
    return f"{value / 1e9:.6g} GBitOPs" if metric == "bitops" else f"{value / 8e6:.6g} MB"


def acc_filter(info: LayerInfo, spec: QuantSpec, act: QuantSpec | None,
               cands: tuple[int, ...], max_acc: int) -> list[bool]:
    """Per weight candidate: does the worst-case accumulator of ``info`` (input ``act``) fit
    ``max_acc`` bits?"""
    if act is None or act.bits == 0:
        return [True] * len(cands)
    za = list(act.zero_point) if act.zero_point is not None else [0]
    widths = torch.zeros(len(cands), dtype=torch.int64)
    for z in za:
        w = costs.acc_bits_worst_case(torch.tensor(cands), act.bits, info.fan_in,
                                      w_signed=spec.signed, a_signed=act.signed,
                                      a_zero_point=z, w_narrow=spec.narrow_range,
                                      a_narrow=act.narrow_range)
        widths = torch.maximum(widths, w)
    return [int(v) <= max_acc for v in widths]


def partition_layers(gm: torch.fx.GraphModule, pin_first_last: bool,
                     by_node: dict[str, LayerCost]
                     ) -> tuple[dict[str, list[tuple[LayerInfo, LayerCost, QuantSpec]]],
                                list[LayerInfo]]:
    """``(searchable, fixed)``: the searchable layers by name, each with its calls ``(info,
    cost layer, weight spec)`` (a module called several times is one decision whose cost is the
    sum over its calls), and the calls kept as annotated (no weight spec, float islands, pinned
    first/last layers). PassFailure when nothing is searchable or a shared layer is partly
    pinned."""
    nodes = {n.name: n for n in gm.graph.nodes}
    searchable: dict[str, list[tuple[LayerInfo, LayerCost, QuantSpec]]] = {}
    fixed_layers: list[LayerInfo] = []
    for info in quantizable_layers(gm):
        q = get_qmeta(nodes[info.node])
        layer = by_node[info.node]
        if q.weight is None or q.float_island is not None or \
                (pin_first_last and (layer.first or layer.last)):
            fixed_layers.append(info)
        else:
            searchable.setdefault(info.name, []).append((info, layer, q.weight))
    if not searchable:
        raise PassFailure("no searchable layer: every quantizable layer is pinned, a float "
                          "island or unannotated (set pin-first-last=false to search the first "
                          "and last layers)")
    shared = sorted(set(searchable) & {info.name for info in fixed_layers})
    if shared:
        raise PassFailure(f"layer '{shared[0]}' is called several times and only some calls are "
                          "pinned; pin all of them or none (pin-first-last=false)")
    return searchable, fixed_layers


def solve_bitwidths(gm: torch.fx.GraphModule, options: SolveBitwidthsOptions, ctx: Any = None,
                    *, conventions: CostConventions = FRACBITS,
                    layers: tuple[LayerCost, ...] | None = None) -> SolveResult:
    """Choose weight bits for the searchable layers of an annotated graph (does not write them).

    Raises :class:`~qpasses.errors.BudgetError` when the target lies outside the reachable range
    (stated in the message), :class:`PassFailure` when ``max-acc-bits`` leaves a layer without
    candidates or a pinned layer exceeds it.
    """
    if options.act_candidates is not None:     # (weight, activation) pairs
        from qpasses.algorithms.pair_allocation import solve_pair_bitwidths
        return solve_pair_bitwidths(gm, options, ctx, conventions=conventions)
    t0 = time.perf_counter()
    opts = options
    if layers is None:  # separable costs: see the module docstring
        layers = cost_layers(gm, dataclasses.replace(conventions, prune_inputs=False))
    by_node = {layer.node: layer for layer in layers}
    nodes = {n.name: n for n in gm.graph.nodes}
    w_map, a_map = annotated_bits(gm)
    metric = opts.metric
    searchable, fixed_layers = partition_layers(gm, opts.pin_first_last, by_node)
    cands = tuple(sorted(opts.candidates))

    # Fixed cost: every non-searched layer as annotated, plus the searched layers' biases.
    def layer_cost(layer: LayerCost, w: Any) -> torch.Tensor:
        if metric == "bitops":
            return kernel_bitops(layer, {layer.name: w}, a_map, conventions)
        return kernel_size_bits(layer, {layer.name: w}, conventions)

    fixed = 0
    for info in fixed_layers:
        layer = by_node[info.node]
        fixed += int(layer_cost(layer, w_map.get(info.name)).sum())
        if metric == "size":
            fixed += layer.bias_count * conventions.bias_bits
    if metric == "size":
        fixed += sum(layer.bias_count * conventions.bias_bits
                     for calls in searchable.values() for _, layer, _ in calls)
    else:  # act x act products (attention matmuls): not searched, a constant of the total
        fixed += products_bitops(gm, conventions)

    # Pinned layers must respect max-acc-bits as well.
    if opts.max_acc_bits is not None:
        for info in fixed_layers:
            q = get_qmeta(nodes[info.node])
            if q.weight is None or q.act is None or q.weight.bits == 0:
                continue
            if not acc_filter(info, q.weight, q.act, (q.weight.bits,), opts.max_acc_bits)[0]:
                raise PassFailure(
                    f"layer '{info.name}' keeps {q.weight.bits}-bit weights (pinned or not "
                    f"searched) and its worst-case accumulator exceeds max-acc-bits="
                    f"{opts.max_acc_bits}; set pin-first-last=false or raise max-acc-bits")

    # Items, candidate costs (from the cost model) and errors (from the sensitivity).
    item_costs: list[list[int]] = []
    item_bits: list[list[int]] = []
    allowed_per_layer: list[list[int]] = []
    for calls in searchable.values():
        keep = list(range(len(cands)))
        for info, _, spec in calls:
            q = get_qmeta(nodes[info.node])
            if opts.max_acc_bits is None:
                continue
            ok = acc_filter(info, spec, q.act, cands, opts.max_acc_bits)
            keep = [j for j in keep if ok[j]]
            if not keep:
                raise PassFailure(
                    f"max-acc-bits={opts.max_acc_bits} leaves layer '{info.name}' (fan-in "
                    f"{info.fan_in}, {q.act.bits}-bit input) no candidate among {list(cands)}: "
                    "raise max-acc-bits or allow fewer bits")
        allowed_per_layer.append(keep)
    firsts = [calls[0] for calls in searchable.values()]
    req = SensitivityRequest(gm, tuple(i for i, _, _ in firsts), tuple(s for _, _, s in firsts),
                             cands, opts.granularity, ctx, {"probes": opts.probes})
    errors_per_layer = lookup_sensitivity(opts.sensitivity)(req)
    if len(errors_per_layer) != len(firsts):
        raise NumericsError(f"sensitivity '{opts.sensitivity}' returned {len(errors_per_layer)} "
                            f"tensors for {len(firsts)} layers")
    item_errors: list[list[float]] = []
    spans: list[tuple[int, int]] = []
    for calls, keep, err in zip(searchable.values(), allowed_per_layer, errors_per_layer):
        info = calls[0][0]
        per_cand = sum(torch.stack([layer_cost(layer, torch.full((layer.out_channels,), b,
                                                                  dtype=torch.int64))
                                    for b in cands], dim=1) for _, layer, _ in calls)  # (C, B)
        if opts.granularity == "layer":
            per_cand = per_cand.sum(dim=0, keepdim=True)
        n_items = per_cand.shape[0]
        err = torch.as_tensor(err, dtype=torch.float64)
        if tuple(err.shape) != (n_items, len(cands)):
            raise NumericsError(f"sensitivity '{opts.sensitivity}' gave shape "
                                f"{tuple(err.shape)} for layer '{info.name}', expected "
                                f"{(n_items, len(cands))}")
        if not bool(torch.isfinite(err).all()):
            raise NumericsError(f"sensitivity '{opts.sensitivity}' gave non-finite errors for "
                                f"layer '{info.name}'")
        c_rows = per_cand[:, keep].tolist()
        e_rows = err[:, keep].tolist()
        b_row = [cands[j] for j in keep]
        b_rows = [b_row] * n_items
        if opts.granularity == "kernel" and opts.keep_one_kernel and 0 in b_row and \
                len(b_row) > 1:
            # the kernel whose 0-bit error exceeds its best non-zero error the most
            j0 = b_row.index(0)
            e = err[:, keep]
            others = torch.cat([e[:, :j0], e[:, j0 + 1:]], dim=1).min(dim=1).values
            c = int(torch.argmax(e[:, j0] - others))
            c_rows[c] = c_rows[c][:j0] + c_rows[c][j0 + 1:]
            e_rows[c] = e_rows[c][:j0] + e_rows[c][j0 + 1:]
            b_rows = list(b_rows)
            b_rows[c] = b_row[:j0] + b_row[j0 + 1:]
        spans.append((len(item_costs), len(item_costs) + n_items))
        item_costs.extend(c_rows)
        item_errors.extend(e_rows)
        item_bits.extend(b_rows)

    lo = fixed + sum(min(c) for c in item_costs)
    hi = fixed + sum(max(c) for c in item_costs)
    budget = opts.budget
    option = "target-bitops" if metric == "bitops" else "target-size"
    if budget < lo or budget > hi:
        where = "below the minimum" if budget < lo else "above the maximum"
        raise BudgetError(
            PASS_NAME, option,
            f"{format_budget(metric, budget)} is {where} reachable with candidates {list(cands)}: the "
            f"reachable range is [{format_budget(metric, lo)}, {format_budget(metric, hi)}] ({len(searchable)} "
            f"searchable layers; pinned/float layers and biases cost {format_budget(metric, fixed)})",
            minimum=lo / (1e9 if metric == "bitops" else 8e6),
            maximum=hi / (1e9 if metric == "bitops" else 8e6),
            unit="GBitOPs" if metric == "bitops" else "MB")
    alloc = solver.solve(item_costs, item_errors, budget - fixed, bits=item_bits,
                         method=opts.method, time_limit=opts.time_limit)
    chosen: dict[str, int | tuple[int, ...]] = {}
    for name, (s, e) in zip(searchable, spans):
        vals = alloc.bits[s:e]
        chosen[name] = int(vals[0]) if opts.granularity == "layer" else tuple(vals)
    return SolveResult(chosen, alloc, metric, budget, fixed, fixed + alloc.total_cost, (lo, hi),
                       len(item_costs), time.perf_counter() - t0)


def write_bits(gm: torch.fx.GraphModule, bits: dict[str, int | tuple[int, ...]],
               origin: str) -> tuple[bool, int]:
    """Write weight bits to QMeta (per kernel for tuples). Returns (modified, #stale scales
    dropped): a calibrated scale belongs to the old width and is cleared when the width changes."""
    nodes = {n.name: n for n in gm.graph.nodes}
    modified, dropped = False, 0
    for info in quantizable_layers(gm):
        if info.name not in bits:
            continue
        node = nodes[info.node]
        spec = get_qmeta(node).weight
        b = bits[info.name]
        if isinstance(b, tuple):
            new = spec.replace(bits=max(b), bits_per_kernel=b,
                               axis=spec.axis if spec.axis is not None else 0)
        else:
            new = spec.replace(bits=b, bits_per_kernel=None)
        if new.kernel_bits(info.out_channels) != spec.kernel_bits(info.out_channels) \
                and spec.scale is not None:
            new = new.replace(scale=None, zero_point=None)
            dropped += 1
        if new != spec:
            update_qmeta(node, origin=origin, weight=new)
            modified = True
    return modified, dropped
