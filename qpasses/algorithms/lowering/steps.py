"""The common declaration of the ``lower-to-int-sim`` steps that rewrite an already lowered graph.

Each step (``fuse-requantize``, ``shift-unfused-biases``, ``exact-zero-kernel-constants``,
``cleanup-int-sim``) takes an integer graph and leaves one: it requires and re-establishes the
``int-sim`` property (so verify-each checks the graph after every step), needs the int-sim record
and may update it.
"""
from __future__ import annotations

from passes_registry import Pass, PreservedAnalyses

from qpasses.ir.records import INT_SIM_KEY

__all__ = ["IntSimRewrite"]


class IntSimRewrite(Pass):
    """Base of the passes that rewrite a lowered (integer) graph in place; subclasses give
    ``name``, ``summary`` and ``run``."""
    requires = frozenset({"int-sim"})
    establishes = frozenset({"int-sim"})
    preserves = PreservedAnalyses.none()
    requires_records = frozenset({INT_SIM_KEY})
    writes_records = frozenset({INT_SIM_KEY})
