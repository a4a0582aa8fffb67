"""DistributedDataParallel worker of test_fracbits_ddp (light: children import torch and qpasses,
not pytest)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import qpasses
from passes_registry import PassContext, PassManager
from qpasses.modules import fracbits as fb
from qpasses.algorithms import fracbits as fb_cost
from tests.conftest import DigitsCNN
from tests.passes.ddp_worker import process_group, save_rank

PIPELINE = ("graph(annotate-bitwidths{weight-bits=3 act-bits=3},"
            "insert-fracbits{granularity=kernel candidates=[0,1,2,3,4,5,6,7,8] allow-zero=true})")


def prepare(seed: int = 0) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    x = torch.rand(1, 1, 8, 8)
    gm = qpasses.trace(DigitsCNN().eval(), (x,))
    with PassContext(example_inputs=(x,)):
        return PassManager.parse(PIPELINE).run(gm)


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with process_group(rank, world, init_file):
        gm = prepare()
        target = float(fb_cost.model_cost(gm, detach=True)) * 0.8
        ddp = torch.nn.parallel.DistributedDataParallel(gm)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        ddp.train()
        for _ in range(3):
            x = torch.rand(8, 1, 8, 8, generator=g)
            y = torch.randint(0, 10, (8,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x), y) + fb_cost.penalty(gm, target_bitops=target,
                                                           kappa=1.0 / target)
            loss.backward()
            opt.step()
            fb.clamp_lambdas(gm)
        save_rank(gm, out_dir, rank)
