"""IR properties of the quantization flow that several passes require, each with a checker that
verify-each runs after a pass establishes it. Properties that belong to one pass family
(``canonical``, ``bn-folded``, ``fracbits-inserted``, ``gmpq-supernet``) are registered next to
the pass that establishes them."""
from __future__ import annotations

import itertools
import warnings

import torch
import torch.fx

from passes_registry import register_property
from passes_registry.registry import lookup_property

from qpasses.algorithms.int_sim_check import check_int_sim as int_sim_problems
from qpasses.errors import AnnotationError, InputError, QpassesWarning, TraceError
from qpasses.ir import ops
from qpasses.ir.annotations import get_qmeta
from qpasses.ir.fx import node_shape
from qpasses.ir.joins import is_join
from qpasses.ir.layers import CONV_FUNCTIONS, LINEAR_FUNCTIONS, module_op, quantizable_layers
from qpasses.modules.fake_quant_layers import fake_quant_modules
from qpasses.modules.int_sim import IntSimModule
from qpasses.modules.lookup import join_output_fq_node, layer_act_fq_node, layer_weight_quantizer


def check_bits_annotated(gm: torch.fx.GraphModule) -> list[str]:
    """Every quantizable layer has weight and input-activation bit-widths, or is explicitly left
    in float."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for info in quantizable_layers(gm):
        q = get_qmeta(nodes[info.node])
        if q.float_island is not None:
            continue
        if q.weight is None:
            out.append(f"layer '{info.name}' has no weight bit-width")
        if q.act is None:
            out.append(f"layer '{info.name}' has no input-activation bit-width")
    return out


register_property("bits-annotated", check_bits_annotated,
                  summary="every quantizable layer carries weight/activation bit-widths")


def check_fake_quant_inserted(gm: torch.fx.GraphModule) -> list[str]:
    """Every annotated layer has a weight quantizer and, with an ``act`` spec, a quantized input;
    every annotated add/cat join has a quantized output."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for info in quantizable_layers(gm):
        node = nodes[info.node]
        q = get_qmeta(node)
        if q.float_island is not None:
            continue
        if q.weight is not None and layer_weight_quantizer(gm, node) is None:
            out.append(f"layer '{info.name}' has a weight spec but no weight quantizer")
        if q.act is not None and layer_act_fq_node(gm, node) is None:
            out.append(f"layer '{info.name}' has an act spec but its input is not fake-quantized")
    for n in gm.graph.nodes:
        q = get_qmeta(n)
        if q.output is not None and q.float_island is None and is_join(n) \
                and join_output_fq_node(gm, n) is None:
            out.append(f"join '{n.name}' has an output spec but its output is not fake-quantized")
    return out


def check_calibrated(gm: torch.fx.GraphModule) -> list[str]:
    """Every fake-quant module has finite, positive scales (and QMeta carries them)."""
    out = []
    for name, q in fake_quant_modules(gm).items():
        out += [f"'{name}': {p}" for p in q.calibration_problems()]
    nodes = {n.name: n for n in gm.graph.nodes}
    for info in quantizable_layers(gm):
        node = nodes[info.node]
        q = get_qmeta(node)
        if q.float_island is not None:
            continue
        if q.weight is not None and layer_weight_quantizer(gm, node) is not None \
                and q.weight.scale is None:
            out.append(f"layer '{info.name}': QMeta weight spec has no scale")
        if q.act is not None and layer_act_fq_node(gm, node) is not None and q.act.scale is None:
            out.append(f"layer '{info.name}': QMeta act spec has no scale")
    return out


register_property("fake-quant-inserted", check_fake_quant_inserted,
                  summary="weight and activation fake quantizers are in the graph as annotated")
register_property("calibrated", check_calibrated,
                  summary="every quantizer has finite positive scales, also recorded in QMeta")


def check_int_sim(gm: torch.fx.GraphModule) -> list[str]:
    """Integer-only between the input quantize and the output dequantize (or explicit float
    islands); fast kernels only where their bound proves them exact."""
    return int_sim_problems(gm)


register_property("int-sim", check_int_sim,
                  summary="integer-only graph between input quantize and output dequantize "
                          "(float islands explicit); fast kernels only where proven exact")


# -- preconditions of the passes that write bit-widths ----------------------------------------------

def realized_widths(gm: torch.fx.GraphModule) -> str | None:
    """What already implements the graph's annotated widths (integer-simulation modules of
    ``lower-to-int-sim``, or fake quantizers of ``insert-fake-quant``), in words; None for an
    annotated float graph."""
    for name, mod in gm.named_modules():
        if isinstance(mod, IntSimModule):
            return f"the integer-simulation module '{name}' (lower-to-int-sim ran)"
    fq = fake_quant_modules(gm)
    if fq:
        return f"the fake quantizer '{next(iter(fq))}' (insert-fake-quant ran)"
    return None


def refuse_realized_widths(gm: torch.fx.GraphModule, pass_name: str) -> None:
    """``AnnotationError`` when the widths are already realized: re-annotating would change the
    reported bits and BitOPs while the quantizers (or integer weights) keep the old widths, so
    the report would no longer describe the computation."""
    what = realized_widths(gm)
    if what is not None:
        raise AnnotationError(
            f"{pass_name}: the graph's bit-widths are already realized by {what}; new widths "
            "would be reported but not computed. Re-run the pipeline from the float graph "
            "(qpasses.trace the model again) with the widths chosen before insert-fake-quant")


def refuse_unshaped_layers(gm: torch.fx.GraphModule, pass_name: str) -> None:
    """``TraceError`` when conv/linear nodes carry no traced shapes (a plain
    ``torch.fx.symbolic_trace``): they would not count as layers, and 0 annotated layers would
    pass as ``bits-annotated``."""
    unshaped = []
    for n in gm.graph.nodes:
        is_layer = ((n.op == "call_module" and module_op(gm.get_submodule(str(n.target)))
                     is not None)
                    or (n.op == "call_function"
                        and (n.target in CONV_FUNCTIONS or n.target in LINEAR_FUNCTIONS)))
        if is_layer and (node_shape(n) is None or not n.args or node_shape(n.args[0]) is None):
            unshaped.append(n.name)
    if unshaped:
        raise TraceError(
            f"{pass_name}: conv/linear node '{unshaped[0]}'"
            + (f" (and {len(unshaped) - 1} more)" if len(unshaped) > 1 else "")
            + " has no traced shapes; trace the model with example inputs: "
              "qpasses.trace(model, example_inputs) (or run torch.fx ShapeProp) before "
            + pass_name)


#: widest activation the integer simulation represents exactly (codes times a 31-bit
#: requantization multiplier stay inside int64)
INT_SIM_MAX_ACT_BITS = 24


def check_lowerable(gm: torch.fx.GraphModule, pass_name: str) -> None:
    """Typed errors, before any rewrite, for fake-quant graphs the integer simulation cannot
    represent: float16/bfloat16 parameters (``InputError``: convert the model to float32), an
    activation quantizer wider than :data:`INT_SIM_MAX_ACT_BITS` (``AnnotationError`` naming the
    layers it feeds), and one fake-quantized conv/linear module called at several places
    (``AnnotationError``): the fake-quant graph computes it, but the integer graph needs one
    integer layer per call (each call's input has its own scale), which the lowering does not
    build."""
    for name, t in itertools.chain(gm.named_parameters(), gm.named_buffers()):
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
            raise InputError(
                f"{pass_name}: '{name}' is {t.dtype}; the integer simulation and its checks run "
                "on float32 models: convert the model (model.float()) and trace it again")
    for name, q in fake_quant_modules(gm).items():
        bits = int(getattr(q, "num_bits", 0))
        if not getattr(q, "is_weight_quantizer", False) and bits > INT_SIM_MAX_ACT_BITS:
            serves = ", ".join(getattr(q, "consumers", ())) or name
            raise AnnotationError(
                f"{pass_name}: activation quantizer '{name}' ({serves}) is {bits}-bit; the "
                f"integer simulation supports activations up to {INT_SIM_MAX_ACT_BITS} bits. "
                f"Annotate at most act-bits={INT_SIM_MAX_ACT_BITS}, or leave those layers in "
                "float (annotate-bitwidths{skip={...}})")
    calls: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            if module_op(mod) is not None and getattr(mod, "weight_fake_quant", None) is not None:
                calls.setdefault(str(n.target), []).append(n.name)
    shared = {t: names for t, names in calls.items() if len(names) > 1}
    if shared:
        target, names = next(iter(shared.items()))
        raise AnnotationError(
            f"{pass_name}: layer '{target}' is one module called {len(names)} times (nodes "
            f"{', '.join(names)}); the integer graph needs one integer layer per call. Give each "
            "call its own module in the model (copy.deepcopy of the layer; weights may stay "
            "tied), or leave the layer in float (annotate-bitwidths{skip={" + target + "}})")


def warn_unfolded_batch_norms(gm: torch.fx.GraphModule, pass_name: str) -> list[str]:
    """One ``QpassesWarning`` naming the BatchNorm modules still in the graph (fold-batch-norm
    did not run, or could not fold them): they stay separate per-channel ops between quantized
    layers (an extra requantization in the integer graph). Returns their names."""
    bns = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"
           and isinstance(gm.get_submodule(str(n.target)), ops.BATCH_NORM_BASE)]
    bns += [n.name for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.nn.functional.batch_norm]
    if bns:
        bn_folded = lookup_property("bn-folded")
        foldable = len(bn_folded.checker(gm)) if bn_folded and bn_folded.checker else 0
        hint = (f"run fold-batch-norm before {pass_name} to fold the {foldable} that follow a "
                "conv/linear" if foldable else
                "none follows a conv/linear, so fold-batch-norm cannot fold them")
        warnings.warn(
            f"{pass_name}: {len(bns)} BatchNorm(s) are not folded ({', '.join(bns[:5])}"
            f"{', ...' if len(bns) > 5 else ''}); each costs a quantizer-free per-channel "
            f"op between quantized layers (lower-to-int-sim: one IntAffine requantization in "
            f"eval mode, a float island in training mode); {hint}", QpassesWarning,
            stacklevel=2)
    return bns
