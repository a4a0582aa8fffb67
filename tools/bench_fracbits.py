"""Overhead of a FracBits search step vs a fixed-bit fake-quant QAT step (same process).

    python -m tools.bench_fracbits [--batch 8] [--size 224] [--steps 5] [--granularity layer]

Both graphs: torchvision ResNet-18, annotate-bitwidths{weight-bits=3 act-bits=3}; QAT:
insert-fake-quant{weight-scheme=dorefa act-scheme=pact}; FracBits: insert-fracbits (+ the BitOPs
penalty and the λ clamp in each step). A step is forward + backward + SGD step; the median of
``--steps`` timed steps after one warm-up step is reported, interleaved to share noise.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import qpasses
from passes_registry import PassContext, PassManager
from qpasses.modules import fracbits as fb
from qpasses.algorithms import fracbits as fb_cost


def measure(batch: int = 8, size: int = 224, steps: int = 5,
            granularity: str = "layer") -> dict[str, list[float]]:
    """Step times (s) of a fixed-bit QAT graph and a FracBits graph, interleaved."""
    from torchvision.models import resnet18
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    ann = "annotate-bitwidths{weight-bits=3 act-bits=3}"
    graphs = {}
    for name, tail in (("qat", "insert-fake-quant{weight-scheme=dorefa act-scheme=pact}"),
                       ("fracbits", f"insert-fracbits{{granularity={granularity}}}")):
        gm = qpasses.trace(resnet18().eval(), (x[:1],))
        with PassContext(example_inputs=(x[:1],)):
            gm = PassManager.parse(f"graph({ann},{tail})").run(gm)
        gm.train()
        graphs[name] = (gm, torch.optim.SGD(gm.parameters(), lr=1e-3, momentum=0.9))
    target = float(fb_cost.model_cost(graphs["fracbits"][0], detach=True)) * 0.9

    def step(name):
        gm, opt = graphs[name]
        loss = F.cross_entropy(gm(x), y)
        if name == "fracbits":
            loss = loss + fb_cost.penalty(gm, target_bitops=target, kappa=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if name == "fracbits":
            fb.clamp_lambdas(gm)

    return interleaved_steps({n: (lambda n=n: step(n)) for n in graphs}, steps)


def interleaved_steps(steps_by_name, steps: int) -> dict[str, list[float]]:
    """One warm-up call each, then ``steps`` rounds calling every variant once (shared noise)."""
    times = {name: [] for name in steps_by_name}
    for fn in steps_by_name.values():
        fn()
    for _ in range(steps):
        for name, fn in steps_by_name.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--granularity", default="layer", choices=["layer", "kernel"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    times = measure(args.batch, args.size, args.steps, args.granularity)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"ResNet-18 batch {args.batch} {args.size}x{args.size}, {torch.get_num_threads()} "
          f"threads: QAT step {med['qat']:.3f}s, FracBits ({args.granularity}) step "
          f"{med['fracbits']:.3f}s, ratio {med['fracbits'] / med['qat']:.3f}")


if __name__ == "__main__":
    main()
