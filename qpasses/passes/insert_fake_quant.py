"""insert-fake-quant: put weight and activation fake quantizers into an annotated graph.

Reads the bit-widths written by ``annotate-bitwidths`` (``QMeta.weight`` / ``act`` on layers,
``QMeta.output`` on add/cat joins) and makes the GraphModule compute with them, forward and
backward (QAT), using the modules of :mod:`qpasses.modules.fake_quant`.

Graph surgery and names (deterministic; the report keys on layer module paths, which never change):

- **Weights.** A layer module is swapped, at the same path, for a subclass of its class that carries
  ``weight_fake_quant`` (``layer1.0.conv1`` becomes a ``FakeQuantConv2d`` holding the same
  ``weight``/``bias`` Parameters, like ``torch.ao.nn.qat``). Functional layers
  (``F.conv2d(x, self.w)``) get a ``call_module`` node on ``weight_fake_quant.<layer>`` between the
  ``get_attr`` and the call. Per-kernel bits and 0-bit kernels come from ``QMeta.weight``.
- **Activations.** One ``call_module`` node per quantized tensor, inserted right after its producer,
  on a module in the ``activation_fake_quant`` ModuleDict. Every quantized consumer of that tensor
  reads the one node (scale sharing); unquantized consumers keep the float tensor. Quantized tensors
  are: the inputs of layers with an ``act`` spec, the inputs and output of add/cat joins with an
  ``output`` spec (the join's consumers read the quantized output, so the integer add/concat is
  well defined), and both operands of every act x act product (matmul/bmm of two tensors) with an
  ``act`` spec (one node per operand; an operand already quantized is reused).
- ``join-scales=shared`` (default): the tensors of one scale-sharing group (a join, its inputs, and
  tensors read by several layers: ``annotate_bitwidths.scale_sharing_groups``) share ONE quantizer
  module, called once per tensor, so they end with one scale and zero point and a join is a plain
  integer add/concat. The module's key is the group's first tensor (graph order), e.g.
  ``activation_fake_quant.layer1_0_relu``. ``join-scales=per-tensor``: one module per tensor, keyed
  by the producer node's name; a lowering must then requantize join inputs to the output scale.
- Each inserted activation node carries ``QMeta.output`` = the spec it implements; layers' ``act``,
  joins' ``output`` and layers' ``weight`` specs are rewritten with the implemented scheme
  (``calibrate`` fills their scales).
- Layers with ``QMeta.float_island`` get nothing. A layer class that overrides ``forward`` cannot
  be wrapped: it becomes a float island (with a warning) instead of being silently mis-quantized.

The pass is idempotent: quantized layers and tensors are skipped on a second run.
"""
from __future__ import annotations

import math

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx

from passes_registry import Pass, PassResult, PreservedAnalyses, get_record, register_pass
from passes_registry.errors import OptionError

from qpasses.errors import AnnotationError
from qpasses.modules.fake_quant import (ActFakeQuant, AffineActFakeQuant, LSQActFakeQuant,
                                        PACTActFakeQuant, WeightFakeQuant)
from qpasses.modules.fake_quant_layers import is_fake_quant_layer, wrap_layer, wrapper_class
from qpasses.ir.fx import (add_inserted_module, attr_value, call_module_on, graph_device,
                           module_container, unique_key)
from qpasses.modules.schemes import act_spec_scheme, grid_scheme
from qpasses.modules.lookup import (is_act_fq_node, join_output_fq_node, layer_weight_quantizer,
                                    make_act_observer)
from qpasses.ir.layers import LayerInfo, quantizable_layers
from qpasses.ir.annotations import QuantSpec, get_qmeta, update_qmeta
from qpasses.ir.records import FROZEN_META, FrozenFracBitsRecord
from qpasses.ir.joins import is_join, join_inputs, layer_input
from qpasses.ir.act_products import act_products, product_operands

__all__ = ["InsertFakeQuant", "InsertFakeQuantOptions", "ACT_CONTAINER", "WEIGHT_CONTAINER"]

PASS_NAME = "insert-fake-quant"
ACT_CONTAINER = "activation_fake_quant"
WEIGHT_CONTAINER = "weight_fake_quant"
ObserverName = Literal["minmax", "moving-average", "avg", "percentile", "mse", "aciq", "kl"]


@dataclass(frozen=True)
class InsertFakeQuantOptions:
    weight_scheme: Literal["symmetric", "asymmetric", "dorefa"] = field(default="symmetric", metadata={
        "help": "symmetric: z = 0 (min/max range); asymmetric: integral zero point; dorefa: "
                "DoReFa/FracBits tanh-normalised weights in [-1, 1]"})
    act_scheme: Literal["affine", "symmetric", "pact", "lsq"] = field(default="affine", metadata={
        "help": "affine: observer range with a zero point; symmetric: z = 0 (signed, or unsigned "
                "where annotate-bitwidths proved the tensor non-negative); pact: learnable clip "
                "alpha; lsq: learnable step size"})
    per_channel: bool = field(default=True, metadata={
        "help": "one weight range per output channel (per-kernel bit vectors always are)"})
    observer: ObserverName = field(default="minmax", metadata={
        "help": "activation range observer (calibrate may replace it with its method)"})
    rounding: Literal["rne", "rha", "rhu", "trunc", "floor"] = field(default="rne", metadata={
        "help": "rounding of the quantizers (rne = round half to even, the fused-kernel path)"})
    join_scales: Literal["shared", "per-tensor"] = field(default="shared", metadata={
        "help": "shared: one quantizer (one scale) per scale-sharing group, so add/cat are plain "
                "integer ops; per-tensor: one quantizer per tensor"})
    pact_alpha: float | None = field(default=None, metadata={
        "help": "initial PACT clip (default: the clip freeze-fracbits learned for the readers, "
                "else FracBits' 8.0, or 10.0 for linear-layer inputs)"})
    percentile: float = field(default=99.99, metadata={
        "help": "percentile of the percentile observer"})

    def __post_init__(self) -> None:
        if self.pact_alpha is not None and not (math.isfinite(self.pact_alpha)
                                                and self.pact_alpha > 0):
            raise OptionError(PASS_NAME, "pact-alpha",
                              f"must be a positive finite clip, got {self.pact_alpha}")
        if not 50.0 < self.percentile <= 100.0:
            raise OptionError(PASS_NAME, "percentile",
                              f"must be in (50, 100], got {self.percentile}")


# ---------------------------------------------------------------------------------------------
# specs


def weight_spec(base: QuantSpec, opts: InsertFakeQuantOptions) -> QuantSpec:
    """The weight spec the inserted quantizer implements (scheme from the options)."""
    axis = 0 if (opts.per_channel or base.bits_per_kernel is not None) else None
    common = dict(signed=True, axis=axis, scale=None, zero_point=None)
    if opts.weight_scheme == "symmetric":
        return base.replace(scheme="symmetric", **common)
    return base.replace(scheme=opts.weight_scheme, narrow_range=False, **common)


def act_spec(base: QuantSpec, opts: InsertFakeQuantOptions) -> QuantSpec:
    """The activation spec the inserted quantizer implements (signedness from annotate-bitwidths:
    unsigned where the tensor is provably non-negative)."""
    signed = base.signed
    scheme = act_spec_scheme(opts.act_scheme, signed)
    narrow = opts.act_scheme == "pact" and signed
    return QuantSpec(bits=base.bits, signed=signed, scheme=scheme, narrow_range=narrow)  # type: ignore[arg-type]


def _act_module(spec: QuantSpec, opts: InsertFakeQuantOptions, name: str,
                linear_consumer: bool) -> ActFakeQuant:
    obs = make_act_observer(opts.observer, spec.signed, percentile=opts.percentile,
                            bits=spec.bits, where=f"tensor '{name}'")
    if opts.act_scheme in ("affine", "symmetric"):
        rs = grid_scheme(act_spec_scheme(opts.act_scheme, spec.signed), spec.signed)
        return AffineActFakeQuant(spec.bits, rs, observer=obs, rounding=opts.rounding, name=name)
    if opts.act_scheme == "pact":
        alpha = opts.pact_alpha if opts.pact_alpha is not None else (10.0 if linear_consumer
                                                                     else 8.0)
        return PACTActFakeQuant(spec.bits, signed=spec.signed, alpha_init=alpha, observer=obs,
                                rounding=opts.rounding, name=name)
    return LSQActFakeQuant(spec.bits, signed=spec.signed, observer=obs, rounding=opts.rounding,
                           name=name)


# ---------------------------------------------------------------------------------------------
# the pass


@register_pass
class InsertFakeQuant(Pass):
    """Insert weight and activation fake quantizers as annotated (module swap + one activation
    node per quantized tensor; see the module docstring for the exact surgery and names).

    Requires ``bits-annotated``; establishes ``fake-quant-inserted``; invalidates ``calibrated``.
    The activation quantizers start in torch.ao's QAT mode (affine: observing and quantizing, the
    scale follows the data); run ``calibrate`` for post-training ranges. Stats: ``num_weight_fq``,
    ``num_act_fq`` (modules), ``num_act_nodes``, ``num_float_islands`` (layers the pass could not
    wrap), ``num_learned_alpha`` (PACT clips started from the ``qpasses.fracbits.frozen``
    record's learned α, with ``act-scheme=pact`` and no ``pact-alpha``).
    """
    name = PASS_NAME
    summary = "insert weight/activation fake-quant modules (QAT-ready) from the bit annotations"
    Options = InsertFakeQuantOptions
    requires = frozenset({"bits-annotated"})
    establishes = frozenset({"fake-quant-inserted"})
    invalidates = frozenset({"calibrated"})
    preserves = PreservedAnalyses.none()
    # act-scheme=pact without pact-alpha starts each PACT clip from the learned FracBits α
    reads_records = frozenset({FROZEN_META})

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        opts: InsertFakeQuantOptions = self.options
        stats = {"num_weight_fq": 0, "num_act_fq": 0, "num_act_nodes": 0, "num_float_islands": 0,
                 "num_learned_alpha": 0}
        layers = quantizable_layers(gm)
        nodes = {n.name: n for n in gm.graph.nodes}
        modified = self._insert_weights(gm, layers, nodes, stats)
        modified |= self._insert_activations(gm, layers, nodes, stats)
        return PassResult(modified=modified, stats=stats)

    # -- weights -------------------------------------------------------------------------------

    def _insert_weights(self, gm: torch.fx.GraphModule, layers: list[LayerInfo],
                        nodes: dict[str, torch.fx.Node], stats: dict[str, int]) -> bool:
        modified = False
        fresh: set[str] = set()  # quantizers inserted by this run (a module may be called twice)
        for info in layers:
            node = nodes[info.node]
            q = get_qmeta(node)
            if q.float_island is not None or q.weight is None:
                continue
            spec = weight_spec(q.weight, self.options)
            try:
                bits = spec.kernel_bits(info.out_channels)
            except AnnotationError as e:
                raise AnnotationError(f"layer '{info.name}': {e}") from None
            if node.op == "call_module":
                mod = gm.get_submodule(str(node.target))
                if not is_fake_quant_layer(mod):
                    if wrapper_class(type(mod)) is None:
                        reason = (f"{type(mod).__qualname__} overrides forward(): "
                                  f"{self.name} cannot quantize its weight")
                        warnings.warn(f"{self.name}: layer '{info.name}' stays in float: {reason}",
                                      UserWarning, stacklevel=2)
                        update_qmeta(node, origin=self.name, float_island=reason)
                        stats["num_float_islands"] += 1
                        modified = True
                        continue
                    wfq = self._weight_fq(info, bits, spec).to(mod.weight.device)
                    gm.set_submodule(str(node.target), wrap_layer(mod, wfq))
                    fresh.add(str(node.target))
                    stats["num_weight_fq"] += 1
                    modified = True
                if str(node.target) not in fresh:
                    continue  # quantized by an earlier run: its spec already describes it
            else:
                w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                if layer_weight_quantizer(gm, node) is None and isinstance(w, torch.fx.Node):
                    weight = attr_value(gm, info.weight_attr)
                    target = add_inserted_module(gm, WEIGHT_CONTAINER, info.name,
                                                 self._weight_fq(info, bits, spec).to(weight.device))
                    fq = call_module_on(gm, target, w, after=w)
                    node.replace_input_with(w, fq)
                    fresh.add(fq.name)
                    stats["num_weight_fq"] += 1
                    modified = True
                wq_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                if not isinstance(wq_node, torch.fx.Node) or wq_node.name not in fresh:
                    continue
            if q.weight != spec:
                update_qmeta(node, origin=self.name, weight=spec)
                modified = True
        return modified

    def _weight_fq(self, info: LayerInfo, bits: tuple[int, ...], spec: QuantSpec) -> WeightFakeQuant:
        opts: InsertFakeQuantOptions = self.options
        return WeightFakeQuant(info.out_channels, list(bits), opts.weight_scheme,
                               per_channel=opts.per_channel,
                               narrow_range=spec.narrow_range and opts.weight_scheme == "symmetric",
                               signed=True, rounding=opts.rounding, name=info.name)

    # -- activations ---------------------------------------------------------------------------

    def _insert_activations(self, gm: torch.fx.GraphModule, layers: list[LayerInfo],
                            nodes: dict[str, torch.fx.Node], stats: dict[str, int]) -> bool:
        opts: InsertFakeQuantOptions = self.options
        graph = gm.graph
        order = {n.name: i for i, n in enumerate(graph.nodes)}
        # tensor name -> [(spec, consumer description)], and the rewiring to do
        demands: dict[str, list[tuple[QuantSpec, str]]] = {}
        reader_layers: dict[str, list[str]] = {}       # tensor -> layers reading it
        frozen: FrozenFracBitsRecord = get_record(gm, FROZEN_META, FrozenFracBitsRecord({}))
        layer_uses: list[tuple[torch.fx.Node, torch.fx.Node]] = []      # (layer node, tensor)
        join_uses: list[tuple[torch.fx.Node, torch.fx.Node]] = []       # (join, input tensor)
        join_outs: list[torch.fx.Node] = []
        linear_readers: set[str] = set()
        for info in layers:
            node = nodes[info.node]
            q = get_qmeta(node)
            if q.float_island is not None or q.act is None:
                continue
            if q.act.bits < 1:
                raise AnnotationError(f"layer '{info.name}': activation bits {q.act.bits}: 0 bits "
                                      "(pruned) is for weights only; give its input 1..32 bits")
            x = layer_input(node)
            if x is None:
                continue
            if is_act_fq_node(gm, x):
                continue  # already quantized (second run)
            demands.setdefault(x.name, []).append((q.act, f"layer '{info.name}'"))
            reader_layers.setdefault(x.name, []).append(info.name)
            layer_uses.append((node, x))
            if info.op == "linear":
                linear_readers.add(x.name)
        for j in list(graph.nodes):
            q = get_qmeta(j)
            if q.output is None or q.float_island is not None or not is_join(j):
                continue
            if q.output.bits < 1:
                raise AnnotationError(f"join '{j.name}': output bits {q.output.bits} must be >= 1")
            for x in join_inputs(j):
                if not is_act_fq_node(gm, x):
                    demands.setdefault(x.name, []).append((q.output, f"join '{j.name}'"))
                    join_uses.append((j, x))
            if join_output_fq_node(gm, j) is None:
                demands.setdefault(j.name, []).append((q.output, f"join '{j.name}' (output)"))
                join_outs.append(j)
        product_uses = self._product_uses(gm, demands)
        if not demands:
            return False

        # groups of tensors sharing one quantizer module
        parent = {t: t for t in demands}

        def find(t: str) -> str:
            while parent[t] != t:
                parent[t] = parent[parent[t]]
                t = parent[t]
            return t

        if opts.join_scales == "shared":
            for j, x in join_uses:
                parent[find(x.name)] = find(j.name) if j.name in parent else find(x.name)
        groups: dict[str, list[str]] = {}
        for t in sorted(demands, key=order.__getitem__):
            groups.setdefault(find(t), []).append(t)

        box_name, box = module_container(gm, ACT_CONTAINER)
        device = graph_device(gm)
        module_of: dict[str, str] = {}   # tensor -> module key
        spec_of: dict[str, QuantSpec] = {}
        for members in sorted(groups.values(), key=lambda m: order[m[0]]):
            wanted = [(s, who) for t in members for s, who in demands[t]]
            base = max((s for s, _ in wanted), key=lambda s: s.bits)
            if len({s.bits for s, _ in wanted}) > 1 or len({s.signed for s, _ in wanted}) > 1:
                detail = ", ".join(f"{who}: {s.short()}" for s, who in wanted)
                warnings.warn(f"{self.name}: tensors {', '.join(members)} share one quantizer but "
                              f"their specs differ ({detail}); using {base.bits} bits "
                              "(re-run annotate-bitwidths to make them consistent)",
                              UserWarning, stacklevel=2)
                base = base.replace(signed=any(s.signed for s, _ in wanted))
            spec = act_spec(base, opts)
            key = unique_key(box, members[0])
            mod = _act_module(spec, opts, f"{box_name}.{key}",
                              linear_consumer=any(t in linear_readers for t in members))
            mod.consumers = tuple(dict.fromkeys(who for _, who in wanted))
            if opts.act_scheme == "pact" and opts.pact_alpha is None:
                # after freeze-fracbits: start from the clip FracBits learned for these readers
                learned = [frozen.layers[n].alpha for t in members
                           for n in reader_layers.get(t, ())
                           if n in frozen.layers and frozen.layers[n].alpha]
                if learned:
                    with torch.no_grad():
                        mod.alpha.fill_(max(learned))
                    stats["num_learned_alpha"] += 1
            box[key] = mod.to(device)
            stats["num_act_fq"] += 1
            for t in members:
                module_of[t], spec_of[t] = key, spec

        # one node per quantized tensor, right after its producer
        last_placeholder = [n for n in graph.nodes if n.op == "placeholder"]
        qnode: dict[str, torch.fx.Node] = {}
        for t in sorted(module_of, key=order.__getitem__):
            src = nodes[t]
            anchor = last_placeholder[-1] if src.op == "placeholder" else src
            fq = call_module_on(gm, f"{box_name}.{module_of[t]}", src, after=anchor)
            update_qmeta(fq, origin=self.name, output=spec_of[t])
            qnode[t] = fq
            stats["num_act_nodes"] += 1

        for node, x in layer_uses:
            node.replace_input_with(x, qnode[x.name])
            q = get_qmeta(node)
            if q.act != spec_of[x.name]:
                update_qmeta(node, origin=self.name, act=spec_of[x.name])
        for j, x in join_uses:
            j.replace_input_with(x, qnode[x.name])
        for j in join_outs:
            fq = qnode[j.name]
            j.replace_all_uses_with(fq, delete_user_cb=lambda u, fq=fq: u is not fq)
        for j in join_outs:
            if get_qmeta(j).output != spec_of[j.name]:
                update_qmeta(j, origin=self.name, output=spec_of[j.name])
        for p, x in product_uses:
            p.replace_input_with(x, qnode[x.name])
            if get_qmeta(p).act != spec_of[x.name]:
                update_qmeta(p, origin=self.name, act=spec_of[x.name])
        return True

    @staticmethod
    def _product_uses(gm: torch.fx.GraphModule, demands: dict[str, list[tuple[QuantSpec, str]]]
                      ) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
        """(product, operand) of every act x act product with an ``act`` spec whose operand is
        not quantized yet; adds each operand's demand (an operand already quantized, e.g. on a
        second run or a tensor a layer also reads, is reused)."""
        uses = []
        for p in act_products(gm):
            q = get_qmeta(p)
            if q.act is None or q.float_island is not None:
                continue
            if q.act.bits < 1:
                raise AnnotationError(f"product '{p.name}': activation bits {q.act.bits} must "
                                      "be >= 1")
            for x in dict.fromkeys(product_operands(p)):
                if not is_act_fq_node(gm, x):
                    demands.setdefault(x.name, []).append((q.act, f"product '{p.name}'"))
                    uses.append((p, x))
        return uses

