"""``channel-groups``: which channels of which tensors and parameters must be pruned together.

The walk and its coupling rules live in ``qpasses.algorithms.channels``; this module registers
the analysis and exposes its result types.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx

from passes_registry import Analysis, register_analysis

from qpasses.algorithms.channels import (ChannelGroup, ChannelGroups, ChannelWalker, Member,
                                         TensorChannels, no_gc)

__all__ = ["ChannelGroups", "ChannelGroup", "Member", "TensorChannels", "ChannelGroupsAnalysis",
           "compute_channel_groups"]


def compute_channel_groups(gm: torch.fx.GraphModule) -> ChannelGroups:
    """The channel-groups result for ``gm`` (what the analysis caches)."""
    with no_gc():
        walker = ChannelWalker(gm)
        walker.run()
        return walker.result()


@register_analysis
class ChannelGroupsAnalysis(Analysis):
    """Coupled output channels: for every conv/linear output channel, the tensors and parameter
    slices that must be pruned with it (DepGraph-style groups on the FX graph), and why a channel
    can never be pruned (the node that blocks it)."""
    name = "channel-groups"
    summary = "coupled channel groups for pruning (producers, consumers, BN, concat, split, ...)"
    depends_on = frozenset({"structure"})

    def compute(self, gm: torch.fx.GraphModule, am: Any) -> ChannelGroups:
        return compute_channel_groups(gm)

    def format(self, result: ChannelGroups, gm: torch.fx.GraphModule) -> str:
        return str(result)
