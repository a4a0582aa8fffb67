"""IR properties of the quantization flow that several passes require, each with a checker that
verify-each runs after a pass establishes it. Properties that belong to one pass family
(``canonical``, ``bn-folded``, ``fracbits-inserted``, ``gmpq-supernet``) are registered next to
the pass that establishes them."""
from __future__ import annotations

import torch.fx

from passes_registry import register_property

from qpasses.algorithms.int_sim_check import check_int_sim as int_sim_problems
from qpasses.ir.annotations import get_qmeta
from qpasses.ir.joins import is_join
from qpasses.ir.layers import quantizable_layers
from qpasses.modules.fake_quant_layers import fake_quant_modules
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
