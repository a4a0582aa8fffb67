"""IR properties qpasses passes require and establish, each with a checker run by verify-each."""
from __future__ import annotations

import torch.fx

from passes_registry import register_property

from .graph import quantizable_layers
from .meta import get_qmeta


def check_bits_annotated(gm: torch.fx.GraphModule) -> list[str]:
    """Every quantizable layer has a weight bit-width (or is explicitly left in float)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for info in quantizable_layers(gm):
        q = get_qmeta(nodes[info.node])
        if q.weight is None and q.float_island is None:
            out.append(f"layer '{info.name}' has no weight bit-width")
    return out


register_property("bits-annotated", check_bits_annotated,
                  summary="every quantizable layer carries weight/activation bit-widths")
