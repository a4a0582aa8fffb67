"""insert-gmpq-supernet: turn every searchable layer into a GMPQ/EdMIPS composite layer
(docs/algorithms.md, "GMPQ").

Requires ``bits-annotated`` (``annotate-bitwidths`` decides which layers are quantized, which
inputs are signed and which layers are first/last); establishes ``gmpq-supernet`` and
invalidates ``bits-annotated`` (the annotations no longer describe what the graph computes until
``select-gmpq-policy`` writes the chosen widths back), so ``insert-fake-quant`` cannot run on a
supernet by mistake.

Graph surgery (the conventions of ``insert-fake-quant`` / ``insert-fracbits``):

- **Weights.** Each searched call_module conv/linear is swapped, at the same module path, for the
  fake-quant subclass of its class (``qpasses.modules.fake_quant_layers.wrap_layer``, same Parameters) whose
  ``weight_fake_quant`` is a :class:`~qpasses.modules.gmpq.GMPQWeightMixer`: ``Σ_i π_w,i Q_i(W)``
  over ``w-candidates`` (HAQ linear, ``T = max|W|`` of the first forward).
- **Activations.** Each searched layer's input gets its own
  :class:`~qpasses.modules.gmpq.GMPQActMixer` node (``gmpq_act.<layer path with _>``):
  ``Σ_j π_a,j Q_j(x)`` over ``a-candidates``, one PACT clip per branch. The layer thus computes
  one convolution of the two softmax-weighted sums, which by bilinearity equals the sum over all
  ``|B_w|·|B_a|`` parallel branches (the composite convolution). Signed inputs use double-sided
  PACT.
- **Pinning** (``pin-first-last``, default true): first and last layers (stem, classifier) are
  not searched and stay in float during the search (EdMIPS/GMPQ); they keep their annotations
  and are left out of the expected BitOPs (``cost_model.GMPQ``).
- **Feature tap.** An identity :class:`~qpasses.modules.gmpq.FeatureTap` node
  (``gmpq_feature_tap``) after the Grad-CAM feature map (``feature-node=auto``: the last
  N×C×H×W map feeding the classifier; or a named fx node / module path; ``none``: no tap, for an
  EdMIPS-style search without the attribution loss).

After the pass, train with ``qpasses.algorithms.gmpq.search_loss(gm, x, y, teacher=make_teacher(
model, gm), zeta=..., eta=...)`` (architecture logits from ``arch_parameters(gm)`` in their own
optimizer), then run ``select-gmpq-policy``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from passes_registry import (Pass, PassResult, PreservedAnalyses, register_pass,
                             register_property, set_record)
from passes_registry.errors import OptionError

from qpasses.errors import AnnotationError
from qpasses.modules.fake_quant_layers import wrap_layer
from qpasses.ir.fx import node_shape
from qpasses.ir.layers import first_last_layers, quantizable_layers
from qpasses.ir.records import GMPQ_META, GmpqLayer, GmpqSupernetRecord
from qpasses.modules.gmpq import (ACT_CONTAINER, GMPQActMixer, GMPQWeightMixer, has_supernet,
                                  supernet_record)
from qpasses.algorithms.gmpq import find_feature_node, install_tap
from qpasses.algorithms.search_layers import searchable_layers
from qpasses.ir.joins import layer_input
from qpasses.ir.fx import insert_module_before

__all__ = ["InsertGMPQSupernet", "InsertGMPQSupernetOptions"]

PASS_NAME = "insert-gmpq-supernet"


def _check_candidates(option: str, cands: Any, lo: int, why: str) -> None:
    if not isinstance(cands, tuple) or not cands:
        raise OptionError(PASS_NAME, option, "the candidate list is empty: give at least one "
                                             "bit-width, e.g. [2,3,4]")
    for b in cands:
        if isinstance(b, bool) or not isinstance(b, int) or not lo <= b <= 32:
            raise OptionError(PASS_NAME, option, f"{b!r} is not a bit-width in {lo}..32{why}")
    if len(set(cands)) != len(cands):
        raise OptionError(PASS_NAME, option, f"{list(cands)} lists a bit-width twice")


def check_gmpq_supernet(gm: torch.fx.GraphModule) -> list[str]:
    """The GMPQ record names existing layers whose weight quantizer is a GMPQ mixer."""
    if not has_supernet(gm):
        return ["the graph has no GMPQ supernet (no 'qpasses.gmpq' record)"]
    out = []
    for name, rec in supernet_record(gm).layers.items():
        wm = getattr(gm.get_submodule(rec.module), "weight_fake_quant", None)
        if not isinstance(wm, GMPQWeightMixer):
            out.append(f"layer '{name}' has no GMPQ weight mixer")
    return out


register_property("gmpq-supernet", check_gmpq_supernet,
                  summary="GMPQ/EdMIPS composite layers with architecture logits are installed")


@dataclass(frozen=True)
class InsertGMPQSupernetOptions:
    w_candidates: tuple[int, ...] = field(default=(2, 3, 4), metadata={
        "help": "weight bit-width candidates (2..32; paper 2-4, official R18 code [2,3,4,6])"})
    a_candidates: tuple[int, ...] = field(default=(2, 3, 4), metadata={
        "help": "activation bit-width candidates (1..32)"})
    pin_first_last: bool = field(default=True, metadata={
        "help": "first and last layers are not searched and stay float during the search "
                "(EdMIPS/GMPQ); they keep their annotations"})
    logit_init: float = field(default=0.01, metadata={
        "help": "initial architecture logits (all equal: uniform π)"})
    pact_alpha: float = field(default=6.0, metadata={
        "help": "initial PACT clip of every activation branch"})
    feature_node: str | None = field(default="auto", metadata={
        "help": "Grad-CAM feature map: auto (last N×C×H×W map feeding the classifier), an fx "
                "node name or module path, or none (no attribution loss: EdMIPS-style)"})

    def __post_init__(self) -> None:
        _check_candidates("w-candidates", self.w_candidates, 2,
                          " (the linear weight quantizer needs >= 2 bits)")
        _check_candidates("a-candidates", self.a_candidates, 1, "")
        if not self.pact_alpha > 0:
            raise OptionError(PASS_NAME, "pact-alpha", f"must be > 0, got {self.pact_alpha}")
        if not abs(self.logit_init) < float("inf"):
            raise OptionError(PASS_NAME, "logit-init", f"must be finite, got {self.logit_init}")
        if self.feature_node == "none":   # the text form of None, also accepted from Python
            object.__setattr__(self, "feature_node", None)
        if self.feature_node == "":
            raise OptionError(PASS_NAME, "feature-node", "give auto, none or a node name")


@register_pass
class InsertGMPQSupernet(Pass):
    """Make every searchable layer a composite layer with per-layer architecture logits for
    weights and activations (GMPQ Eq. 5 = EdMIPS' composite convolution; docs/algorithms.md, "GMPQ").

    Each annotated call_module conv/linear (except pinned first/last layers) is swapped at the
    same path for its fake-quant subclass whose ``weight_fake_quant`` is a
    :class:`~qpasses.modules.gmpq.GMPQWeightMixer` (softmax-weighted HAQ linear weights), and its
    input gets a :class:`~qpasses.modules.gmpq.GMPQActMixer` node (softmax-weighted PACT
    branches, ``gmpq_act.<layer>``); one convolution of the two sums equals the sum over all
    parallel branches. A :class:`~qpasses.modules.gmpq.FeatureTap` marks the Grad-CAM feature map
    (``feature-node``). Train with ``qpasses.algorithms.gmpq.search_loss``, then run
    ``select-gmpq-policy``. Requires ``bits-annotated``; establishes ``gmpq-supernet``;
    invalidates ``bits-annotated``, ``fake-quant-inserted`` and ``calibrated``.

    Stats: ``num_layers`` (searched), ``num_pinned``, ``num_act_mixers``, ``num_logits``,
    ``num_skipped`` (functional/shared layers and float islands left as annotated).
    Errors: empty, duplicate or out-of-range candidates (``OptionError``); a graph that already
    has a supernet or fake-quant layers, no searchable layer, or no feature map for Grad-CAM
    (``AnnotationError`` naming what to give).
    """
    name = PASS_NAME
    summary = "install GMPQ/EdMIPS composite layers (softmax-weighted quantized branches)"
    Options = InsertGMPQSupernetOptions
    requires = frozenset({"bits-annotated"})
    establishes = frozenset({"gmpq-supernet"})
    invalidates = frozenset({"bits-annotated", "fake-quant-inserted", "calibrated"})
    preserves = PreservedAnalyses.none()
    writes_records = frozenset({GMPQ_META})

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        opts: InsertGMPQSupernetOptions = self.options
        if has_supernet(gm):
            raise AnnotationError(f"{self.name}: the graph already has a GMPQ supernet; run "
                                  "select-gmpq-policy before inserting again")
        layers = quantizable_layers(gm)
        first, last = first_last_layers(gm, layers)
        nodes = {n.name: n for n in gm.graph.nodes}
        # before the surgery: the act mixers and the tap would hide the classifier's input chain
        feature = None
        if opts.feature_node is not None:
            node = find_feature_node(gm, None if opts.feature_node == "auto"
                                     else opts.feature_node)
            feature = (node.name, node_shape(node))
        stats = {"num_layers": 0, "num_pinned": 0, "num_act_mixers": 0, "num_logits": 0,
                 "num_skipped": 0}
        records: dict[str, GmpqLayer] = {}
        pinned = {i.name for i in layers
                  if opts.pin_first_last and (i.name in first or i.name in last)}
        stats["num_pinned"] = len(pinned)
        for info, node, mod, q in searchable_layers(
                gm, self.name, [i for i in layers if i.name not in pinned], stats):
            wm = GMPQWeightMixer(opts.w_candidates, logit_init=opts.logit_init, name=info.name)
            gm.set_submodule(str(node.target), wrap_layer(mod, wm.to(mod.weight.device)))
            stats["num_layers"] += 1
            stats["num_logits"] += len(opts.w_candidates)
            x = layer_input(node)
            act = None
            if q.act is not None and x is not None and q.act.signed and min(opts.a_candidates) < 2:
                raise OptionError(self.name, "a-candidates",
                                  f"layer '{info.name}' reads a signed input, which needs >= 2 "
                                  "bits (the narrow signed grid of 1 bit is the constant 0): "
                                  "drop 1 from the candidates")
            if q.act is not None and x is not None:
                def make(target: str, signed: bool = q.act.signed,
                         consumer: str = info.name) -> nn.Module:
                    return GMPQActMixer(opts.a_candidates, signed=signed,
                                        alpha_init=opts.pact_alpha, logit_init=opts.logit_init,
                                        name=target, consumer=consumer).to(mod.weight.device)

                mix = insert_module_before(gm, node, x, ACT_CONTAINER, info.name, make)
                act = str(mix.target)
                stats["num_act_mixers"] += 1
                stats["num_logits"] += len(opts.a_candidates)
            records[info.name] = GmpqLayer(module=str(node.target), node=node.name, act=act)
        if not records:
            raise AnnotationError(f"{self.name}: no searchable layer: every annotated layer is "
                                  "pinned, functional or a float island (set "
                                  "pin-first-last=false to search the first and last layers)")
        gm.graph.lint()
        gm.recompile()
        tap = install_tap(gm, nodes[feature[0]]) if feature is not None else None
        set_record(gm, GMPQ_META, GmpqSupernetRecord(
            layers=records, w_candidates=tuple(opts.w_candidates),
            a_candidates=tuple(opts.a_candidates), pin_first_last=opts.pin_first_last,
            feature=feature[0] if feature else None,
            feature_shape=tuple(feature[1]) if feature and feature[1] is not None else None,
            tap=tap))
        return PassResult(modified=True, stats=stats)
