"""The DistributedDataParallel worker of test_qat (a light module: spawned children import only
torch and qpasses, not pytest)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import qpasses
from passes_registry import PassContext, PassManager
from tests.tools.tiny_models import TinyCNN

PIPELINE = ("graph(canonicalize,fold-batch-norm,annotate-bitwidths{weight-bits=4 act-bits=4},"
            "insert-fake-quant{act-scheme=pact},calibrate)")


def prepare_pact(seed: int = 0) -> torch.fx.GraphModule:
    """TinyCNN -> W4A4 PACT fake-quant graph, calibrated on fixed data (same on every rank)."""
    torch.manual_seed(seed)
    gm = qpasses.trace(TinyCNN().eval(), torch.randn(1, 3, 8, 8))
    g = torch.Generator().manual_seed(123)
    with PassContext(calibration_data=[torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]):
        PassManager.parse(PIPELINE).run(gm)
    return gm


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        gm = prepare_pact()
        ddp = torch.nn.parallel.DistributedDataParallel(gm)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        ddp.train()
        for _ in range(2):
            x = 2 * torch.randn(8, 3, 8, 8, generator=g)
            y = torch.randint(0, 4, (8,), generator=g)
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        torch.save({n: p.detach() for n, p in gm.named_parameters()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
