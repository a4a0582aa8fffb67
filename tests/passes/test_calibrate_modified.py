"""calibrate reports ``modified`` honestly without hashing the whole graph twice.

The pass compares a cheap snapshot (structure, weights and records fingerprints; QMeta objects by
identity, then by text) instead of two full fingerprints. verify-each recomputes the full
fingerprints and raises VerificationError when the claim disagrees, so every run here with
``verify_each=True`` checks that the snapshot says exactly what the fingerprints say, both ways:
a run that changes scales (modified) and a run that changes nothing (a graph without layers).
"""
from __future__ import annotations

import torch

import qpasses
from passes_registry import PassContext, PassManager, fingerprint
from passes_registry.instrument import Statistics
from tests.models import TinyCNN

PREP = ("graph(canonicalize,fold-batch-norm,annotate-bitwidths{weight-bits=8 act-bits=8 "
        "first-last-bits=none},insert-fake-quant)")


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


def _prepared():
    torch.manual_seed(0)
    gm = qpasses.trace(TinyCNN().eval(), torch.randn(1, 3, 8, 8))
    PassManager.parse(PREP).run(gm)
    return gm


def _run(gm, text, batches=None):
    """Run ``text`` with verify-each on; the pass's ``modified`` claim."""
    stats = Statistics()
    with PassContext(calibration_data=batches if batches is not None else _batches(),
                     verify_each=True, instruments=(stats,)):
        before = fingerprint(gm)
        PassManager.parse(text, assume=gm).run(gm)
    return fingerprint(gm) != before


def test_first_calibration_is_modified_and_verified():
    gm = _prepared()
    assert _run(gm, "graph(calibrate)")


class NoLayers(torch.nn.Module):
    """Nothing to quantize: insert-fake-quant inserts nothing, calibrate has nothing to do."""

    def forward(self, x):
        return torch.relu(x).mean((2, 3))


def test_nothing_to_calibrate_is_not_modified():
    gm = qpasses.trace(NoLayers(), torch.randn(1, 3, 8, 8))
    PassManager.parse(PREP).run(gm)
    assert not _run(gm, "graph(calibrate)")
    assert not _run(gm, "graph(calibrate{method=trained})")


def test_trained_rerun_writes_equal_qmeta_and_is_verified():
    gm = _prepared()
    _run(gm, "graph(calibrate)")
    qmeta_before = {n.name: n.meta.get("qpasses") for n in gm.graph.nodes}
    # method=trained re-exports the same scales (new QMeta objects equal to the old ones) and
    # re-enables the quantizers (their flag buffers are written: modified)
    assert _run(gm, "graph(calibrate{method=trained})")
    after = {n.name: n.meta.get("qpasses") for n in gm.graph.nodes}
    assert after == qmeta_before
    assert any(after[k] is not qmeta_before[k] for k in after if after[k] is not None)
