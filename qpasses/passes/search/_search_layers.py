"""The layers a search pass (insert-fracbits, insert-gmpq-supernet) can take over, shared so both
skip, warn and refuse the same way."""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from ...errors import AnnotationError
from ...fake_quant import wrapper_class
from ...graph import LayerInfo
from ...meta import QMeta, get_qmeta


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
