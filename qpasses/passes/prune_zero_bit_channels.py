"""prune-zero-bit-channels: physically remove channels whose weights have 0 bits (FracBits:
Mixed Precision Quantization via Fractional Bit-Widths, Sec. 3.5; docs/algorithms.md, "FracBits").

The rules (when a channel may go, what constants fold where, what is shrunk, how quantizer
modules are handled) are in ``qpasses.algorithms.pruning``; this module holds the pass: options,
checks of the example inputs, the statistics and the prune log.

Outputs: statistics (``num_zero_bit_kernels``, ``num_channels_removed``, ``num_layers_pruned``,
``num_kept_partial``, ``num_kept_unsupported``, ``num_kept_inexact``, ``num_kept_last``,
``num_kept_shape``, ``num_kept_quantizer``, ``num_constants_folded``, ``num_approx_folds``) and
the graph record ``qpasses.prune_log`` (:class:`qpasses.ir.records.PruneLog`): one dict per producer layer with removed or kept 0-bit
channels (``layer``, ``node``, ``mode``, ``removed`` original indices, ``kept``: list of
``{"channel", "reason"}``), plus one ``{"layer": None, ...}`` run record with notes and
``max_deviation``. With ``PassContext(statistics=True)`` a readable summary is printed.

A graph without 0-bit kernels is left unchanged (a warning says so): pruning is a no-op, not an
error.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.fx

from passes_registry import (Pass, PassResult, PreservedAnalyses, get_record, register_pass,
                             set_record)

from qpasses.algorithms.channels import ChannelGroups, no_gc
from qpasses.algorithms.pruning import (ChannelIndex, ChannelPruner, ChannelSurgery, PrunePlan,
                                        is_observing, zero_bit_kernels)
from qpasses.errors import InputError
from qpasses.ir.annotations import get_qmeta
from qpasses.ir.records import PRUNE_LOG_KEY, PruneLog
from qpasses.ir.trace import propagate_shapes

__all__ = ["PruneZeroBitChannels", "PruneOptions", "zero_bit_kernels"]

PASS_NAME = "prune-zero-bit-channels"


@dataclass(frozen=True)
class PruneOptions:
    mode: Literal["exact", "fold-constant"] = field(default="exact", metadata={
        "help": "exact: remove a constant channel only when it is provably zero at its consumers "
                "or folds exactly into their biases; fold-constant: also fold it into padded "
                "convolutions (approximate on the border; the deviation is reported)"})


@register_pass
class PruneZeroBitChannels(Pass):
    """Physically remove channels whose weight bit-width is 0 in every coupled producer.

    Uses the ``channel-groups`` analysis. A channel class is removed when all its producer
    kernels have 0 bits, nothing unsupported touches it, the constant it carries (the producers'
    biases through BN/activations/adds...) is zero at its consumers or folds into their biases
    exactly (``mode=exact``: linear and unpadded conv consumers; ``mode=fold-constant``: padded
    convs too, with the measured deviation reported), and no tensor is left without channels.
    Shrinks weights, biases, BatchNorm, quantizer state, QMeta (per-kernel bits, scales,
    ``pruned_channels`` as original indices) and shapes.

    Requires: -. Establishes: -. Preserves: nothing.

    Statistics: ``num_zero_bit_kernels``, ``num_channels_removed``, ``num_layers_pruned``,
    ``num_kept_partial``, ``num_kept_unsupported``, ``num_kept_inexact``, ``num_kept_last``,
    ``num_kept_shape``, ``num_kept_quantizer``, ``num_constants_folded``, ``num_approx_folds``
    (kernels counted; a kept channel's 0-bit kernels go to the first reason found).

    Example: graph(fold-batch-norm,annotate-bitwidths{granularity=kernel},prune-zero-bit-channels)

    Rationale:
    - Only channels that are 0-bit in every coupled producer are removed: a residual add or a
      concat couples producers, and one live producer keeps the channel alive.
    - A 0-bit kernel still adds its bias; removing the channel is only exact when that constant
      is accounted for, so kept channels are listed with the reason in
      ``gm.meta["qpasses.prune_log"]``.
    - A graph without 0-bit kernels is left unchanged with a warning, not an error.
    """
    name = PASS_NAME
    summary = "remove channels whose weights have 0 bits in every coupled producer"
    Options = PruneOptions
    preserves = PreservedAnalyses.none()
    writes_records = frozenset({PRUNE_LOG_KEY})

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        inputs = getattr(ctx, "example_inputs", None)
        if not any("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "placeholder"):
            if not inputs:
                raise InputError(f"{PASS_NAME}: the graph has no shape information (tensor_meta):"
                                 " trace the model with qpasses.trace(model, example_inputs), or "
                                 "pass PassContext(example_inputs=...) to propagate shapes")
            _propagate(gm, inputs)
        with no_gc():
            cg: ChannelGroups = am.get("channel-groups", gm)
            index = ChannelIndex(gm, cg)
            plan = ChannelPruner(index, self.options.mode).plan()
        stats = _stats(plan)
        if plan.n_zero == 0:
            note = ("no layer has 0-bit kernels (no per-kernel weight bit-widths with zeros): "
                    "nothing to prune. Annotate per-kernel bits first, e.g. "
                    "annotate-bitwidths{granularity=kernel} with 0 in a per-kernel list, or a "
                    "search pass that can choose 0 bits")
            warnings.warn(f"{PASS_NAME}: {note}", UserWarning, stacklevel=2)
            _write_prune_log(gm, [{"layer": None, "mode": self.options.mode, "note": note,
                                   "max_deviation": None}])
            return PassResult(modified=False, stats=stats)
        reference = None
        approx = any(not ex for items in plan.folds.values() for _, _, ex in items)
        if inputs and plan.removed:
            _check_inputs(gm, inputs)       # before anything changes
        if plan.removed and approx and inputs:
            reference = copy.deepcopy(gm)
        entries = _log_entries(index, plan, self.options.mode)
        surgery = ChannelSurgery(index, origin=PASS_NAME)
        if plan.removed:
            with no_gc():
                surgery.apply(plan)
            gm.graph.lint()
            gm.recompile()
            if inputs:
                _propagate(gm, inputs)
        max_dev = _deviation(reference, gm, inputs) if reference is not None else None
        run_rec: dict[str, Any] = {"layer": None, "mode": self.options.mode,
                                   "max_deviation": max_dev,
                                   "note": None if plan.removed else
                                   "0-bit kernels found but no channel could be removed (see "
                                   "the kept reasons)"}
        if surgery.frozen:
            run_rec["frozen_weight_quantizers"] = list(surgery.frozen)
            run_rec["note"] = (f"weight quantizers of {len(surgery.frozen)} layer(s) lost input "
                               "channels holding their range: frozen at their pre-pruning "
                               "ranges (observer off) so outputs are unchanged; "
                               "qpasses.modules.fake_quant_layers.set_observing(gm, True, "
                               "activations=False) lets them track the weights again")
        if surgery.inexact_quantizers:
            run_rec["inexact_weight_quantizers"] = list(surgery.inexact_quantizers)
            warnings.warn(f"{PASS_NAME}: the weight quantizers of "
                          f"{', '.join(surgery.inexact_quantizers[:5])} quantize the pruned "
                          "weights differently and could not be frozen", UserWarning,
                          stacklevel=2)
        if approx and max_dev is None and plan.removed:
            run_rec["note"] = ("approximate folds into padded convolutions; pass "
                               "PassContext(example_inputs=...) to measure the deviation")
        _write_prune_log(gm, entries + [run_rec])
        if getattr(ctx, "statistics", False):
            ctx.stream.write(format_prune_log(entries + [run_rec]) + "\n")
        return PassResult(modified=bool(plan.removed), stats=stats)


def _check_inputs(gm: torch.fx.GraphModule, inputs: Any) -> None:
    """Example inputs must fit the graph's placeholders (any batch size)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) > len(placeholders):
        raise InputError(f"{PASS_NAME}: PassContext.example_inputs has {len(inputs)} tensors but "
                         f"the graph takes {len(placeholders)} inputs")
    for x, ph in zip(inputs, placeholders):
        tm = ph.meta.get("tensor_meta")
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{PASS_NAME}: example input for '{ph.name}' is a "
                             f"{type(x).__name__}, expected a tensor")
        if hasattr(tm, "shape") and (x.dim() != len(tm.shape)
                                     or tuple(x.shape[1:]) != tuple(tm.shape[1:])):
            raise InputError(f"{PASS_NAME}: example input for '{ph.name}' has shape "
                             f"{list(x.shape)}, the graph was traced with {list(tm.shape)} (only "
                             "the batch size may differ); pass inputs of the traced shape")


def _propagate(gm: torch.fx.GraphModule, inputs: Any) -> None:
    """Shape propagation on example inputs, on a copy when quantizers/observers would record
    the run (so pruning never calibrates anything)."""
    stateful = any(is_observing(m) for m in gm.modules())
    if not stateful:
        propagate_shapes(gm, inputs)
        return
    twin = copy.deepcopy(gm)
    propagate_shapes(twin, inputs)
    metas = {n.name: n.meta.get("tensor_meta") for n in twin.graph.nodes}
    for n in gm.graph.nodes:
        if metas.get(n.name) is not None:
            n.meta["tensor_meta"] = metas[n.name]


def _deviation(reference: torch.fx.GraphModule, gm: torch.fx.GraphModule, inputs: Any) -> float:
    def run(m: torch.fx.GraphModule) -> list[torch.Tensor]:
        m = copy.deepcopy(m)
        with torch.no_grad():
            out = m(*inputs)
        flat: list[torch.Tensor] = []
        torch.utils._pytree.tree_map(lambda t: flat.append(t) if isinstance(t, torch.Tensor)
                                     else None, out)
        return flat
    try:
        a, b = run(reference), run(gm)
    except Exception as e:  # noqa: BLE001 - inputs that do not fit are the user's mistake
        raise InputError(f"{PASS_NAME}: running the graph on PassContext.example_inputs to "
                         f"measure the fold-constant deviation failed: {type(e).__name__}: {e}")
    return float(max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))) \
        if a else 0.0


def _write_prune_log(gm: torch.fx.GraphModule, records: list[dict[str, Any]]) -> None:
    """Append this run's records to the prune log record (the one place the log is written)."""
    log = get_record(gm, PRUNE_LOG_KEY, PruneLog())
    set_record(gm, PRUNE_LOG_KEY, PruneLog(log.entries + tuple(records)))


def _stats(plan: PrunePlan) -> dict[str, int]:
    """The pass statistics (kernels counted; a kept class counts under its category)."""
    cg = plan.cg
    kinds = dict.fromkeys(("partial", "unsupported", "inexact", "last", "shape", "quantizer"), 0)
    for c in plan.kept_reason:
        n = sum(1 for n, i in cg.class_producers[c] if n in plan.zero and plan.zero[n][i])
        kinds[plan.kept_kind.get(c, "inexact")] += n
    removed = sum(len(cg.class_producers[c]) for c in plan.removed)
    layers = {n for c in plan.removed for n, _ in cg.class_producers[c]}
    folds = sum(len(v) for v in plan.folds.values())
    approx = sum(1 for v in plan.folds.values() for _, _, ex in v if not ex)
    return {"num_zero_bit_kernels": plan.n_zero, "num_channels_removed": removed,
            "num_layers_pruned": len(layers), "num_kept_partial": kinds["partial"],
            "num_kept_unsupported": kinds["unsupported"], "num_kept_inexact": kinds["inexact"],
            "num_kept_last": kinds["last"], "num_kept_shape": kinds["shape"],
            "num_kept_quantizer": kinds["quantizer"], "num_constants_folded": folds,
            "num_approx_folds": approx}


def _log_entries(index: ChannelIndex, plan: PrunePlan, mode: str) -> list[dict[str, Any]]:
    """Per producer layer: removed and kept 0-bit channels as ORIGINAL indices (call before
    apply: QMeta.pruned_channels still holds only earlier runs' removals)."""
    out = []
    for name, info in index.infos.items():
        zero = plan.zero.get(name)
        key = (name, -1)
        if zero is None or key not in index.cls_arr:
            continue
        cls = index.cls_arr[key]
        removed_now = [j for j in range(len(cls)) if int(cls[j]) in plan.removed]
        kept = [(j, plan.kept_reason.get(int(cls[j]), "kept")) for j in np.flatnonzero(zero)
                if int(cls[j]) not in plan.removed]
        if not removed_now and not kept:
            continue
        pruned = get_qmeta(index.nodes[name]).pruned_channels
        alive = sorted(set(range(len(cls) + len(pruned))) - set(pruned))
        out.append({"layer": info.name, "node": name, "mode": mode,
                    "removed": [alive[j] for j in removed_now],
                    "kept": [{"channel": alive[int(j)], "reason": r} for j, r in kept]})
    return out


def format_prune_log(entries: list[dict[str, Any]]) -> str:
    lines = [f"{PASS_NAME}:"]
    for e in entries:
        if e.get("layer") is None:
            if e.get("max_deviation") is not None:
                lines.append(f"  max deviation on example inputs (fold-constant): "
                             f"{e['max_deviation']:.3g}")
            if e.get("note"):
                lines.append(f"  note: {e['note']}")
            continue
        lines.append(f"  {e['layer']}: removed {len(e['removed'])}, kept {len(e['kept'])} "
                     "0-bit")
        for k in e["kept"][:3]:
            lines.append(f"    kept channel {k['channel']}: {k['reason']}")
        if len(e["kept"]) > 3:
            lines.append(f"    ... {len(e['kept']) - 3} more kept")
    return "\n".join(lines)