"""What the search passes share: the layers insert-fracbits / insert-gmpq-supernet can take over
(so both skip, warn and refuse the same way), and how freeze-fracbits / select-gmpq-policy write
the chosen input widths."""
from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx
from torch import nn

from qpasses.errors import AnnotationError
from qpasses.modules.fake_quant_layers import unwrap_layer, wrapper_class
from qpasses.ir.layers import LayerInfo, quantizable_layers
from qpasses.ir.annotations import QMeta, get_qmeta, update_qmeta
from qpasses.ir.joins import is_join, layer_input, scale_sharing_groups


def searchable_layers(gm: torch.fx.GraphModule, pass_name: str, layers: Sequence[LayerInfo],
                      stats: dict[str, Any]
                      ) -> Iterator[tuple[LayerInfo, torch.fx.Node, nn.Module, QMeta]]:
    """``(info, node, module, qmeta)`` for every annotated call_module conv/linear whose class can
    be wrapped, each module once. Float islands and unannotated layers are skipped; functional,
    shared and unwrappable layers keep their annotated bits (warned); all counted in
    ``stats["num_skipped"]``. A layer that already has a weight quantizer is an
    ``AnnotationError`` (search passes start from an annotated float graph)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    seen: set[str] = set()
    for info in layers:
        node = nodes[info.node]
        q = get_qmeta(node)
        if q.float_island is not None or q.weight is None:
            stats["num_skipped"] += 1
            continue
        if node.op != "call_module" or str(node.target) in seen:
            warnings.warn(f"{pass_name}: layer '{info.name}' is functional or shared; it keeps "
                          "its annotated bits (not searched)", UserWarning, stacklevel=3)
            stats["num_skipped"] += 1
            continue
        mod = gm.get_submodule(str(node.target))
        if hasattr(mod, "weight_fake_quant"):
            raise AnnotationError(f"{pass_name}: layer '{info.name}' already has a weight "
                                  "quantizer (insert-fake-quant, insert-fracbits or "
                                  f"insert-gmpq-supernet ran); {pass_name} works on an "
                                  "annotated float graph")
        if wrapper_class(type(mod)) is None:
            warnings.warn(f"{pass_name}: layer '{info.name}' ({type(mod).__qualname__}) cannot be "
                          "wrapped; it keeps its annotated bits", UserWarning, stacklevel=3)
            stats["num_skipped"] += 1
            continue
        seen.add(str(node.target))
        yield info, node, mod, q


def write_input_widths(gm: torch.fx.GraphModule, a_bits: dict[str, int], origin: str) -> int:
    """Write searched input widths ``{layer: bits}`` as annotations: per scale-sharing group the
    max over its readers (searched or not), on the readers and the group's joins, as
    insert-fake-quant will implement them (one quantizer per group). Returns how many searched
    layers were raised to their group's width."""
    nodes = {n.name: n for n in gm.graph.nodes}
    readers: dict[str, list[tuple[str, torch.fx.Node]]] = {}
    for info in quantizable_layers(gm):
        node = nodes[info.node]
        x = layer_input(node)
        if x is not None and get_qmeta(node).act is not None:
            readers.setdefault(x.name, []).append((info.name, node))
    raised = 0
    for group in scale_sharing_groups(gm):
        members = [r for t in group for r in readers.get(t, [])]
        if not any(name in a_bits for name, _ in members):
            continue
        width = max(a_bits.get(name, get_qmeta(node).act.bits) for name, node in members)
        for name, node in members:
            raised += int(name in a_bits and a_bits[name] < width)
            spec = get_qmeta(node).act
            if spec.bits != width:
                update_qmeta(node, origin=origin,
                             act=spec.replace(bits=width, scale=None, zero_point=None))
        for t in group:
            spec = get_qmeta(nodes[t]).output
            if is_join(nodes[t]) and spec is not None and spec.bits != width:
                update_qmeta(nodes[t], origin=origin,
                             output=spec.replace(bits=width, scale=None, zero_point=None))
    return raised


@contextmanager
def restore_on_failure(gm: torch.fx.GraphModule) -> Iterator[None]:
    """Run a block that may fail after changing ``gm`` (removing a supernet, then solving): on any
    exception the graph, its submodules, node annotations and graph records are put back as they
    were, and the exception propagates. Parameters and buffers are the same objects before and
    after (a user's optimizer keeps working), so a retry with other options sees the trained
    search state."""
    keep = {id(t): t for t in itertools.chain(gm.parameters(), gm.buffers())}
    saved = copy.deepcopy(gm, keep)
    try:
        yield
    except BaseException:
        for attr in ("_modules", "_parameters", "_buffers"):
            live = getattr(gm, attr)
            live.clear()
            live.update(getattr(saved, attr))
        gm.meta.clear()
        gm.meta.update(saved.meta)
        gm.graph = saved.graph          # re-owns the graph and recompiles
        raise


def remove_search_modules(gm: torch.fx.GraphModule, layer_modules: Any,
                          node_modules: Any) -> None:
    """Undo a search pass's surgery: the layers at ``layer_modules`` back to their float classes
    (same Parameters: trained weights kept), the nodes calling ``node_modules`` (activation
    quantizers, taps) bypassed and erased, and their top-level containers deleted."""
    for target in layer_modules:
        gm.set_submodule(target, unwrap_layer(gm.get_submodule(target)))
    node_modules = set(node_modules)
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target) in node_modules:
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
    for top in {t.split(".")[0] for t in node_modules}:
        if top in gm._modules:
            delattr(gm, top)
    gm.graph.lint()
    gm.recompile()
