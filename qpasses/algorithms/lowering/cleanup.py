"""Removal of what the lowering steps left unused: dead nodes, unused submodules and entries of the
integer-simulation container that no node calls."""
from __future__ import annotations

import torch.fx
from torch import nn

from qpasses.algorithms.lowering.config import INT_SIM_CONTAINER

__all__ = ["remove_unused_int_sim"]


def remove_unused_int_sim(gm: torch.fx.GraphModule) -> bool:
    """Eliminate dead nodes, delete unused submodules and drop the container's modules no node
    calls (a fused requantization lives on inside its layer). True when something was removed."""
    before = {name for name, _ in gm.named_modules(remove_duplicate=False)}
    changed = gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    used = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    box = getattr(gm, INT_SIM_CONTAINER, None)
    if isinstance(box, nn.ModuleDict):
        for k in list(box.keys()):
            if f"{INT_SIM_CONTAINER}.{k}" not in used:
                del box[k]
    after = {name for name, _ in gm.named_modules(remove_duplicate=False)}
    return bool(changed) or after != before
