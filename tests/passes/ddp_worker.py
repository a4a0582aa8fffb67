"""The DistributedDataParallel worker of test_qat, and the launch / process-group plumbing every
DDP test shares (a light module: spawned children import only torch and qpasses, not pytest)."""
from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import qpasses
from passes_registry import PassContext, PassManager
from tests.models import TinyCNN

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


def launch(worker_module: str, tmp_path: Path, nprocs: int = 2) -> list[dict]:
    """Run ``worker_module.run(rank, nprocs, init_file, out_dir)`` in ``nprocs`` processes and
    return each rank's saved parameters (:func:`save_rank`)."""
    import torch.multiprocessing as mp
    worker = importlib.import_module(worker_module)
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # children: one thread each, no oversubscription
    # forkserver: children start from a fresh server process (no inherited threads or state, like
    # spawn) that imports torch and qpasses once for both ranks instead of once per rank (~10 s
    # instead of ~15 s on a busy 2-core machine)
    mp.set_forkserver_preload(["torch", "qpasses", worker_module])
    try:
        mp.start_processes(worker.run, args=(nprocs, str(tmp_path / "init"), str(tmp_path)),
                           nprocs=nprocs, join=True, start_method="forkserver")
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(nprocs)]


@contextlib.contextmanager
def process_group(rank: int, world: int, init_file: str) -> Iterator[None]:
    """A gloo process group for the child's lifetime, one thread per child."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def save_rank(gm: torch.fx.GraphModule, out_dir: str, rank: int) -> None:
    torch.save({n: p.detach() for n, p in gm.named_parameters()},
               os.path.join(out_dir, f"rank{rank}.pt"))


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with process_group(rank, world, init_file):
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
        save_rank(gm, out_dir, rank)
