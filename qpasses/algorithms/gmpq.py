"""GMPQ (Wang et al., ICCV 2021) search math: the expected-BitOPs complexity, Grad-CAM
attribution, the teacher and the attribution-imitation loss, and the ``gmpq-pi`` sensitivity.

Spec: docs/algorithms.md, "GMPQ". The supernet modules are in :mod:`qpasses.modules.gmpq`; this
module holds what a user's training loop calls.

- :func:`complexity_loss` / :func:`expected_bitops`: Eq. 7, ``Σ_k E_k[b_w]·E_k[b_a]·MACs_k``
  through :mod:`qpasses.algorithms.cost_model` with the
  :data:`~qpasses.algorithms.cost_model.GMPQ` conventions (stem and classifier excluded);
  ``normalize="first-layer"`` divides by the first searched layer's MACs (EdMIPS / official code,
  where ζ = cd = 3e-4 is meaningful).
- :func:`grad_cam`, :func:`forward_with_feature`, :func:`make_teacher`: Grad-CAM (Eq. 3-4) of the
  last conv feature map, read through an identity tap node the pass inserts; the student's map
  keeps its graph (double backprop), the frozen fp32 teacher's is detached.
- :func:`capacity_p` (Eq. 8), :func:`attribution_loss` (R_G, paper top-k form or the official
  code's normalized all-pixel form) and :func:`search_loss` (Eq. 6: ``CE + ζ R_C + η R_G``).

Paper defaults; the official code's choices are options (:data:`OFFICIAL_CODE`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from passes_registry import get_record, set_record
from passes_registry.suggest import did_you_mean

from qpasses.algorithms.cost_model import (GMPQ, CostConventions, LayerCost, annotated_bits,
                                           cost_layers, model_bitops)
from qpasses.algorithms.product_costs import products_bitops
from qpasses.errors import AnnotationError, InputError, NumericsError
from qpasses.ir.records import GMPQ_META, SELECTED_META, GmpqSupernetRecord, GmpqTeacherRecord
from qpasses.ir.fx import node_shape
from qpasses.ir.layers import first_last_layers, quantizable_layers
from qpasses.ir.annotations import get_qmeta
from qpasses.algorithms.sensitivity import (SensitivityError, SensitivityRequest,
                                            register_sensitivity)
from qpasses.modules.gmpq import (TAP_NAME, FeatureTap, GMPQActMixer, GMPQWeightMixer,
                                  has_supernet, supernet_modules, supernet_record)

__all__ = [
    "GMPQLossOptions", "PAPER", "OFFICIAL_CODE", "GMPQLoss", "bit_maps", "supernet_conventions",
    "expected_bitops", "complexity_loss", "capacity_p", "find_feature_node", "install_tap",
    "forward_with_feature", "grad_cam", "make_teacher", "teacher_attribution",
    "attribution_loss", "search_loss", "pi_sensitivity",
]


def bit_maps(gm: torch.fx.GraphModule, *, detach: bool = False
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(w_bits, a_bits)`` for the cost model: ``E[b]`` of every searched layer (with gradient
    unless ``detach``) and the annotated bits of the other annotated layers."""
    w_map, a_map = annotated_bits(gm)
    for name, (wm, am) in supernet_modules(gm).items():
        w = wm.expected_bits()
        w_map[name] = w.detach() if detach else w
        if am is not None:
            a = am.expected_bits()
            a_map[name] = a.detach() if detach else a
        else:
            a_map.pop(name, None)   # input not quantized during the search: counted as float
    return w_map, a_map


def supernet_conventions(info: GmpqSupernetRecord) -> CostConventions:
    """Cost conventions of the expected BitOPs: GMPQ's, with the first and last layers counted
    when they are searched too (``pin-first-last=false``)."""
    return GMPQ if info.pin_first_last else dataclasses.replace(GMPQ, exclude_first_last=False)


def _cost_layers(gm: torch.fx.GraphModule) -> tuple[tuple[LayerCost, ...], CostConventions]:
    info = supernet_record(gm)
    conv = supernet_conventions(info)
    key = (id(gm.graph), len(gm.graph.nodes), conv)
    cache = info.cost_cache
    if key not in cache:
        cache.clear()
        cache[key] = cost_layers(gm, conv)
    return cache[key], conv


def expected_bitops(gm: torch.fx.GraphModule, *, detach: bool = False) -> Tensor:
    """Eq. 7 in GBitOPs: ``Σ_k E_k[b_w]·E_k[b_a]·MACs_k / 1e9`` (float64, differentiable)."""
    layers, conv = _cost_layers(gm)
    w_map, a_map = bit_maps(gm, detach=detach)
    return (model_bitops(layers, w_map, a_map, conv).to(torch.float64)  # + act x act products
            + products_bitops(gm, conv)) / 1e9


def complexity_loss(gm: torch.fx.GraphModule,
                    normalize: Literal["none", "first-layer"] = "none") -> Tensor:
    """R_C (Eq. 7). ``none``: expected GBitOPs (paper, B_full read as MACs); ``first-layer``:
    expected BitOPs / MACs of the first searched layer (EdMIPS and the official code)."""
    cost = expected_bitops(gm)
    if normalize == "none":
        return cost
    if normalize != "first-layer":
        raise NumericsError(f"normalize={normalize!r} is invalid; valid: 'none', 'first-layer'")
    layers, _ = _cost_layers(gm)
    searched = set(supernet_record(gm).layers)
    first = next(layer for layer in layers if layer.name in searched)
    return cost * (1e9 / first.macs)


def capacity_p(gm: torch.fx.GraphModule, qw0: float = 4.0, qa0: float = 6.0) -> float:
    """Eq. 8: ``p = mean_k (Q_w^0 / E_k[b_w])·(Q_a^0 / E_k[b_a])`` over searched layers with a
    quantized input, from detached π (a constant per step, as in the official code)."""
    terms = [(qw0 / wm.expected_bits().detach()) * (qa0 / am.expected_bits().detach())
             for wm, am in supernet_modules(gm).values() if am is not None]
    if not terms:
        raise NumericsError("capacity-aware p needs a searched layer with a quantized input; "
                            "give a fixed p instead")
    return float(torch.stack(terms).mean())


# ---------------------------------------------------------------------------------------------
# Feature map and Grad-CAM


def _resolve_node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    nodes = {n.name: n for n in gm.graph.nodes}
    if name in nodes:
        return nodes[name]
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == name]
    if len(calls) == 1:
        return calls[0]
    if len(calls) > 1:
        raise AnnotationError(f"feature-node '{name}' is a module called {len(calls)} times; "
                              f"name one fx node instead: {', '.join(n.name for n in calls)}")
    raise AnnotationError(f"feature-node '{name}' is neither an fx node nor a module path of the "
                          "graph" + did_you_mean(name, list(nodes) + [
                              str(n.target) for n in gm.graph.nodes if n.op == "call_module"]))


def _is_feature_map(shape: tuple[int, ...] | None) -> bool:
    return shape is not None and len(shape) >= 3 and math.prod(shape[2:]) > 1


def find_feature_node(gm: torch.fx.GraphModule, name: str | None = None) -> torch.fx.Node:
    """The node whose output is the Grad-CAM feature map A (``N×C×H×W``, H·W > 1).

    ``name`` (an fx node name or a module path) picks it; otherwise it is the last such map on
    the classifier's input chain, found by walking back from the single last layer through
    single-input ops (flatten, pooling, dropout, activations: ResNet's ``layer4`` output); it must
    lie below a convolution (the input image is not a feature map).
    AnnotationError says what is missing."""
    if name is not None:
        node = _resolve_node(gm, name)
        if not _is_feature_map(node_shape(node)):
            raise AnnotationError(f"feature-node '{name}' has output shape {node_shape(node)}; "
                                  "Grad-CAM needs a convolutional feature map N×C×H×W with "
                                  "H·W > 1")
        return node
    layers = quantizable_layers(gm)
    _, last = first_last_layers(gm, layers)
    if len(last) != 1:
        raise AnnotationError(f"cannot find the Grad-CAM feature map: the graph has "
                              f"{len(last)} last layers ({', '.join(sorted(last)) or 'none'}); "
                              "give insert-gmpq-supernet{feature-node=NODE}")
    nodes = {n.name: n for n in gm.graph.nodes}
    convs = {info.node for info in layers if info.is_conv}
    after_conv: set[str] = set()        # nodes at or below a convolution (not the raw input)
    for n in gm.graph.nodes:
        if n.name in convs or any(i.name in after_conv for i in n.all_input_nodes):
            after_conv.add(n.name)
    head = next(nodes[info.node] for info in layers if info.name in last)
    n = head.args[0] if head.args else None
    while isinstance(n, torch.fx.Node) and n.name in after_conv:
        if _is_feature_map(node_shape(n)):
            return n
        ins = n.all_input_nodes
        if len(ins) != 1:
            break
        n = ins[0]
    raise AnnotationError(
        f"no convolutional feature map feeds the classifier '{next(iter(last))}': GMPQ's "
        "attribution loss needs Grad-CAM of an N×C×H×W map (H·W > 1) such as the last residual "
        "stage's output; give insert-gmpq-supernet{feature-node=NODE} (an fx node or module "
        "path), or feature-node=none for an EdMIPS-style search without the attribution loss")


def install_tap(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """Insert a :class:`FeatureTap` after ``node`` (all its users read the tap); returns the
    tap's module name. The graph is recompiled."""
    name, i = TAP_NAME, 0
    while hasattr(gm, name):
        i += 1
        name = f"{TAP_NAME}_{i}"
    gm.add_module(name, FeatureTap())
    with gm.graph.inserting_after(node):
        tap = gm.graph.call_module(name, (node,))
    for key in ("tensor_meta", "val"):
        if key in node.meta:
            tap.meta[key] = node.meta[key]
    node.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)
    gm.graph.lint()
    gm.recompile()
    return name


def _tap(gm: torch.fx.GraphModule) -> FeatureTap:
    rec = get_record(gm, GMPQ_META)
    tap = rec.tap if rec is not None else None
    if not tap:
        raise AnnotationError("the graph has no Grad-CAM feature tap: build the supernet with "
                              "insert-gmpq-supernet (feature-node=auto or NODE, not none) and the "
                              "teacher with make_teacher(); or search with eta=0 (EdMIPS-style)")
    return gm.get_submodule(tap)


def forward_with_feature(gm: torch.fx.GraphModule, *inputs: Tensor) -> tuple[Tensor, Tensor]:
    """``(output, A)``: one forward that also returns the tapped feature map (grad enabled)."""
    tap = _tap(gm)
    tap.armed = True
    try:
        with torch.enable_grad():
            out = gm(*inputs)
        feature = tap.feature
    finally:
        tap.armed, tap.feature = False, None
    if feature is None:
        raise AnnotationError("the Grad-CAM feature tap was not reached in this forward")
    return out, feature


def grad_cam(logits: Tensor, feature: Tensor, target: Tensor, *,
             weights: Literal["mean", "sum"] = "mean", create_graph: bool = False) -> Tensor:
    """Grad-CAM (Eq. 3-4): ``M_n = ReLU(Σ_c α_nc A_nc)``, ``α_nc = (1/Z) Σ_hw ∂f_{n,t_n}/∂A_nchw``
    with Z = H·W (``weights="mean"``, paper) or Z = 1 (``"sum"``, official code). Returns
    ``N×1×H×W``. ``create_graph=True`` keeps the graph of the gradient (double backprop)."""
    if logits.dim() != 2:
        raise NumericsError(f"grad_cam needs N×T logits, got shape {tuple(logits.shape)}")
    if weights not in ("mean", "sum"):
        raise NumericsError(f"weights={weights!r} is invalid; valid: 'mean', 'sum'")
    score = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()
    (g,) = torch.autograd.grad(score, feature, create_graph=create_graph)
    dims = tuple(range(2, feature.dim()))
    alpha = g.mean(dims, keepdim=True) if weights == "mean" else g.sum(dims, keepdim=True)
    return torch.relu((alpha * feature).sum(1, keepdim=True))


def _signature(gm: torch.fx.GraphModule) -> dict[str, tuple[Any, ...]]:
    return {info.name: (info.op, info.in_channels, info.out_channels, info.kernel_size,
                        info.groups) for info in quantizable_layers(gm)}


def _example_inputs(gm: torch.fx.GraphModule) -> tuple[Tensor, ...]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            tm = n.meta.get("tensor_meta")
            if tm is None:
                raise InputError("make_teacher: the supernet graph has no input shapes; pass "
                                 "example_inputs")
            out.append(torch.zeros(tuple(tm.shape), dtype=tm.dtype))
    return tuple(out)


def make_teacher(model: nn.Module, gm: torch.fx.GraphModule, *, example_inputs: Any = None,
                 mode: Literal["eval", "train"] = "eval") -> torch.fx.GraphModule:
    """The frozen fp32 teacher for the attribution loss: a traced deep copy of ``model`` (never
    modified) with every parameter frozen and a feature tap at the node matching the supernet's.

    ``mode="eval"`` (default): BN uses running statistics. ``"train"``: the
    official code's train-mode teacher (batch statistics; the copy's running stats move).
    InputError when ``model`` is not the fp32 architecture of ``gm`` (different layers or
    feature-map shape) or is itself a supernet."""
    from qpasses.ir.trace import trace
    if mode not in ("eval", "train"):
        raise InputError(f"make_teacher: mode={mode!r} is invalid; valid: 'eval', 'train'")
    if not isinstance(model, nn.Module):
        raise InputError(f"make_teacher expects the fp32 nn.Module, got {type(model).__name__}")
    info = supernet_record(gm)
    if not has_supernet(gm) or not info.tap:
        raise AnnotationError("make_teacher needs a supernet with a feature tap "
                              "(insert-gmpq-supernet with feature-node=auto or NODE)")
    if any(isinstance(m, (GMPQWeightMixer, GMPQActMixer)) for m in model.modules()):
        raise InputError("make_teacher: the teacher must be the fp32 model, not a GMPQ supernet")
    if isinstance(model, torch.fx.GraphModule) and all(
            "tensor_meta" in n.meta for n in model.graph.nodes if n.op != "output"):
        teacher = copy.deepcopy(model)
    else:
        teacher = trace(model, example_inputs if example_inputs is not None
                        else _example_inputs(gm))
    s_sig, t_sig = _signature(gm), _signature(teacher)
    if s_sig != t_sig:
        diff = sorted(set(s_sig.items()) ^ set(t_sig.items()), key=str)
        name = diff[0][0]
        raise InputError(
            f"make_teacher: the teacher's architecture differs from the supernet's at layer "
            f"'{name}' (supernet: {s_sig.get(name)}, teacher: {t_sig.get(name)}; values are "
            "op, in/out channels, kernel, groups); the teacher must be the fp32 model the "
            "supernet was built from")
    want = tuple(info.feature_shape)
    t_nodes = {n.name: n for n in teacher.graph.nodes}
    node = t_nodes.get(info.feature)
    if node is None or node_shape(node) != want:
        try:
            node = find_feature_node(teacher)
        except AnnotationError as e:
            raise InputError(f"make_teacher: {e}") from None
    if node_shape(node) != want:
        raise InputError(f"make_teacher: the teacher's feature map '{node.name}' has shape "
                         f"{node_shape(node)}, the supernet's '{info.feature}' {want}")
    tap = install_tap(teacher, node)
    teacher.requires_grad_(False)
    teacher.train(mode == "train")
    set_record(teacher, GMPQ_META, GmpqTeacherRecord(tap=tap, feature=node.name,
                                                     teacher_mode=mode))
    return teacher


# ---------------------------------------------------------------------------------------------
# Losses


@dataclass(frozen=True)
class GMPQLossOptions:
    """How R_C and R_G are computed (docs/algorithms.md, "GMPQ"). Defaults are the paper's;
    :data:`OFFICIAL_CODE` holds the released code's choices."""
    p: float | None = field(default=None, metadata={
        "help": "attribution sharpness; None: capacity-aware Eq. 8 (paper), code: 3"})
    qw0: float = field(default=4.0, metadata={"help": "Q_w^0 of Eq. 8"})
    qa0: float = field(default=6.0, metadata={"help": "Q_a^0 of Eq. 8"})
    form: Literal["paper", "code"] = field(default="paper", metadata={
        "help": "paper: Σ over the teacher's top-k pixels of (M_q - M_f^p/ΣM_f^p)²; code: "
                "mean over all pixels of (M_f^p/‖M_f^p‖ - M_q/‖M_q‖)²"})
    topk: int = field(default=1000, metadata={"help": "pixels of the paper form (clipped to H·W)"})
    target: Literal["label", "argmax"] = field(default="label", metadata={
        "help": "Grad-CAM class: the label (paper) or each model's own argmax (code)"})
    cam_weights: Literal["mean", "sum"] = field(default="mean", metadata={
        "help": "Grad-CAM channel weight: mean of ∂f/∂A over pixels (paper 1/Z) or sum (code)"})
    normalize: Literal["none", "first-layer"] = field(default="none", metadata={
        "help": "R_C in GBitOPs (paper) or divided by the first searched layer's MACs (code)"})

    def __post_init__(self) -> None:
        if self.p is not None and not (math.isfinite(self.p) and self.p > 0):
            raise NumericsError(f"GMPQLossOptions: p must be > 0 (or None for Eq. 8), got {self.p}")
        if not (self.qw0 > 0 and self.qa0 > 0):
            raise NumericsError("GMPQLossOptions: qw0 and qa0 must be > 0")
        if self.topk < 1:
            raise NumericsError(f"GMPQLossOptions: topk must be >= 1, got {self.topk}")
        for name, valid in (("form", ("paper", "code")), ("target", ("label", "argmax")),
                            ("cam_weights", ("mean", "sum")),
                            ("normalize", ("none", "first-layer"))):
            if getattr(self, name) not in valid:
                raise NumericsError(f"GMPQLossOptions: {name}={getattr(self, name)!r} is "
                                    f"invalid; valid: {', '.join(valid)}")


PAPER = GMPQLossOptions()
# the released search_attention.py; use with zeta=3e-4 (README) and eta=20 (default) or 40 (README)
OFFICIAL_CODE = GMPQLossOptions(p=3.0, form="code", target="argmax", cam_weights="sum",
                                normalize="first-layer")


def attribution_loss(m_q: Tensor, m_f: Tensor, p: float, *, form: str = "paper",
                     topk: int = 1000) -> Tensor:
    """R_G, averaged over the batch. ``paper``: ``Σ_{ij∈TopK(M_f)} (M_q,ij − M_f,ij^p/Σ M_f^p)²``;
    ``code``: ``mean_{n,h,w} (M_f^p/‖M_f^p‖₂ − M_q/‖M_q‖₂)²`` (per-sample L2, eps 1e-12)."""
    if m_q.shape != m_f.shape:
        raise NumericsError(f"attribution maps differ in shape: student {tuple(m_q.shape)}, "
                            f"teacher {tuple(m_f.shape)}")
    mq = m_q.flatten(1)
    mf = m_f.detach().flatten(1)
    target = mf.pow(p)
    if form == "code":
        return (F.normalize(target, dim=1) - F.normalize(mq, dim=1)).pow(2).mean()
    if form != "paper":
        raise NumericsError(f"form={form!r} is invalid; valid: 'paper', 'code'")
    target = target / target.sum(1, keepdim=True).clamp(min=1e-12)
    idx = mf.topk(min(topk, mf.shape[1]), dim=1).indices
    return (mq.gather(1, idx) - target.gather(1, idx)).pow(2).sum(1).mean()


def _cam_target(logits: Tensor, y: Tensor, how: str) -> Tensor:
    return y if how == "label" else logits.detach().argmax(1)


def teacher_attribution(teacher: torch.fx.GraphModule, x: Tensor, y: Tensor,
                        options: GMPQLossOptions = PAPER) -> Tensor:
    """The teacher's Grad-CAM map M_f (detached; plain backward through the head only)."""
    rec = get_record(teacher, GMPQ_META)
    mode = rec.teacher_mode if isinstance(rec, GmpqTeacherRecord) else None
    if mode is None:
        raise InputError("the teacher must come from make_teacher(fp32_model, supernet)")
    teacher.train(mode == "train")   # whatever the caller did to it since
    logits, feature = forward_with_feature(teacher, x)
    t = _cam_target(logits, y, options.target)
    return grad_cam(logits, feature, t, weights=options.cam_weights).detach()


@dataclass
class GMPQLoss:
    """The terms of Eq. 6 for one minibatch (``total`` is what to backpropagate)."""
    total: Tensor
    task: Tensor
    complexity: Tensor
    attribution: Tensor
    p: float | None
    logits: Tensor


def search_loss(gm: torch.fx.GraphModule, x: Tensor, y: Tensor, *,
                teacher: torch.fx.GraphModule | None = None, zeta: float = 0.0,
                eta: float = 0.0, options: GMPQLossOptions = PAPER,
                criterion: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> GMPQLoss:
    """Eq. 6: ``criterion(gm(x), y) + ζ·R_C + η·R_G`` on one minibatch.

    ``eta = 0`` is the EdMIPS objective (no teacher, no Grad-CAM). With ``eta > 0`` the student's
    attribution keeps its graph (double backprop) and ``teacher`` (:func:`make_teacher`) is
    required. The gradient is taken with ``torch.autograd.grad``, so no ``.grad`` is touched
    before your ``total.backward()``."""
    for name, v in (("zeta", zeta), ("eta", eta)):
        if not (math.isfinite(v) and v >= 0):
            raise NumericsError(f"search_loss: {name} must be a finite number >= 0, got {v}")
    zero = torch.zeros((), device=x.device)
    p = None
    if eta > 0:
        if teacher is None:
            raise InputError("search_loss: eta > 0 needs the fp32 teacher: "
                             "teacher = make_teacher(fp32_model, gm)")
        logits, feature = forward_with_feature(gm, x)
        m_q = grad_cam(logits, feature, _cam_target(logits, y, options.target),
                       weights=options.cam_weights, create_graph=True)
        m_f = teacher_attribution(teacher, x, y, options)
        p = options.p if options.p is not None else capacity_p(gm, options.qw0, options.qa0)
        r_g = attribution_loss(m_q, m_f, p, form=options.form, topk=options.topk)
    else:
        logits, r_g = gm(x), zero
    task = criterion(logits, y)
    r_c = complexity_loss(gm, options.normalize).to(task.dtype) if zeta > 0 else zero
    total = task + zeta * r_c + eta * r_g
    return GMPQLoss(total, task, r_c, r_g, p, logits)


# ---------------------------------------------------------------------------------------------
# solve-bitwidths prior: -log π_w of the selected policy


def pi_sensitivity(req: SensitivityRequest) -> list[Tensor]:
    """``gmpq-pi``: ``-log π_w(b)`` of the searched supernet (the ``qpasses.gmpq.selected``
    record of select-gmpq-policy, or ``ctx.config["gmpq_pi"] = {layer: {bits: π}}``), so the solver keeps
    the most probable policy within the budget. ``ctx.config["gmpq_cost_reward"] = μ`` subtracts
    ``μ·share of the BitOPs`` (``MACs·b·a_bits`` over the layers' total at the widest
    candidate), which select-gmpq-policy raises until the budget is used (within 1%)."""
    config = getattr(req.ctx, "config", None) or {}
    selected = get_record(req.gm, SELECTED_META)
    pis: Mapping[str, Mapping[int, float]] = config.get("gmpq_pi") or {
        n: dict(zip(r.w_candidates, r.pi_w))
        for n, r in (selected.layers.items() if selected is not None else ()) if r.pi_w}
    mu = float(config.get("gmpq_cost_reward", 0.0))
    cand = torch.tensor(req.candidates, dtype=torch.float64)
    nodes = {n.name: n for n in req.gm.graph.nodes}
    act = [get_qmeta(nodes[info.node]).a_bits or 32 for info in req.layers]
    total = sum(info.macs * a for info, a in zip(req.layers, act)) * float(cand.max())
    out = []
    for info, a in zip(req.layers, act):
        pi = pis.get(info.name)
        if pi is None:
            raise SensitivityError(f"sensitivity=gmpq-pi: no learned π for layer '{info.name}' "
                                   "(run select-gmpq-policy on a trained supernet, or pass "
                                   "PassContext(config={'gmpq_pi': {layer: {bits: π}}}))")
        missing = [b for b in req.candidates if b not in pi]
        if missing:
            raise SensitivityError(f"sensitivity=gmpq-pi: candidate {missing[0]} was not "
                                   f"searched for layer '{info.name}' (searched: {sorted(pi)})")
        p = torch.tensor([float(pi[b]) for b in req.candidates], dtype=torch.float64)
        err = -torch.log(p.clamp(min=1e-12)) - mu * info.macs * cand * a / total
        err = err[None, :]
        out.append(err.expand(info.out_channels, -1) if req.granularity == "kernel" else err)
    return out


register_sensitivity("gmpq-pi", pi_sensitivity,
                     "-log of the learned GMPQ/EdMIPS weight probability π_w (after "
                     "select-gmpq-policy)")
