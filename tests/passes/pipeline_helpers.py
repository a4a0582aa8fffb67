"""Run a pipeline with verify-each on and collect the statistics its passes report."""
from __future__ import annotations

import torch.fx

from passes_registry import Instrument, PassContext, PassManager


class StatsRecorder(Instrument):
    """Collects every pass's ``result.stats`` into one dict (later passes overwrite keys)."""

    def __init__(self) -> None:
        self.stats: dict = {}

    def after_pass(self, p, gm, result):
        self.stats.update(result.stats)


def run_with_stats(gm: torch.fx.GraphModule, text: str) -> tuple[torch.fx.GraphModule, dict]:
    """``(graph after the pipeline, merged pass statistics)``; verify-each is on."""
    recorder = StatsRecorder()
    with PassContext(verify_each=True, instruments=(recorder,)):
        gm = PassManager.parse(text).run(gm)
    return gm, recorder.stats
