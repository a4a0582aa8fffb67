"""cleanup-int-sim: remove what the lowering steps left unused."""
from __future__ import annotations

from typing import Any

import torch.fx

from passes_registry import PassResult, register_pass

from qpasses.algorithms.lowering.steps import IntSimRewrite
from qpasses.algorithms.lowering.cleanup import remove_unused_int_sim
from qpasses.algorithms.lowering.record import keep_live_fq_nodes

__all__ = ["CleanupIntSim"]


@register_pass
class CleanupIntSim(IntSimRewrite):
    """Eliminate dead nodes of a lowered graph, delete unused submodules and drop the
    integer-simulation modules no node calls any more (a fused requantization lives on inside its
    layer); the int-sim record forgets quantization points whose node is gone. The last step of
    ``lower-to-int-sim``.
    """
    name = "cleanup-int-sim"
    summary = "remove dead nodes and unused integer-simulation modules of a lowered graph"

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        changed = remove_unused_int_sim(gm)
        if changed:
            keep_live_fq_nodes(gm)
        return PassResult(modified=changed)
