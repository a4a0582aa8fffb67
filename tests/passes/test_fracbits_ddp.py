"""FracBits under DistributedDataParallel (2 processes, gloo, CPU): λ and α stay in sync."""
from __future__ import annotations

import os

import torch


def test_fracbits_ddp_two_processes_same_lambda(tmp_path):
    import torch.multiprocessing as mp

    from . import fracbits_ddp_worker as worker
    start = worker.prepare()
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.set_forkserver_preload(["torch", "qpasses", "tests.passes.fracbits_ddp_worker"])
    try:
        mp.start_processes(worker.run, args=(2, str(tmp_path / "init"), str(tmp_path)),
                           nprocs=2, join=True, start_method="forkserver")
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    lams = [n for n in r0 if n.endswith("lam")]
    assert lams and any(n.endswith("alpha") for n in r0)
    for n in r0:
        assert torch.equal(r0[n], r1[n]), n
    moved = [n for n, p in start.named_parameters() if not torch.equal(p.detach(), r0[n])]
    assert any(n.endswith("lam") for n in moved) and any(n.endswith("alpha") for n in moved)
