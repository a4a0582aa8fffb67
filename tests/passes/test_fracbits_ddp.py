"""FracBits under DistributedDataParallel (2 processes, gloo, CPU): λ and α stay in sync."""
from __future__ import annotations

import torch


def test_fracbits_ddp_two_processes_same_lambda(tmp_path):
    from . import fracbits_ddp_worker as worker
    from .ddp_worker import launch
    start = worker.prepare()
    r0, r1 = launch("tests.passes.fracbits_ddp_worker", tmp_path)
    lams = [n for n in r0 if n.endswith("lam")]
    assert lams and any(n.endswith("alpha") for n in r0)
    for n in r0:
        assert torch.equal(r0[n], r1[n]), n
    moved = [n for n, p in start.named_parameters() if not torch.equal(p.detach(), r0[n])]
    assert any(n.endswith("lam") for n in moved) and any(n.endswith("alpha") for n in moved)
