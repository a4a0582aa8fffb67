"""Cost of a GMPQ search step (attribution loss, double backprop) vs a fixed-bit QAT step.

    python -m tools.bench_gmpq [--batch 8] [--size 224] [--steps 5] [--threads 1]

All graphs: torchvision ResNet-18 traced and ``annotate-bitwidths{weight-bits=4 act-bits=4}``.

- ``qat``: ``insert-fake-quant{weight-scheme=symmetric per-channel=false act-scheme=pact}`` (the
  quantizer family of the supernet's branches, one bit-width); step = CE forward/backward + SGD.
- ``edmips``: ``insert-gmpq-supernet{w-candidates=[2,3,4] a-candidates=[2,3,4]}``; step =
  ``search_loss(zeta>0, eta=0)`` (CE + expected BitOPs) + SGD on weights and logits.
- ``gmpq``: the same supernet with the frozen fp32 teacher; step = ``search_loss(zeta>0, eta>0)``
  (teacher forward + Grad-CAM, the student's Grad-CAM with ``create_graph=True``).

The median of ``--steps`` timed steps after one warm-up step is reported, interleaved so the
three share the machine's noise.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import qpasses
from passes_registry import PassContext, PassManager
from qpasses.algorithms import gmpq
from qpasses.modules import gmpq as gmpq_modules
from tools.bench_fracbits import interleaved_steps


def measure(batch: int = 8, size: int = 224, steps: int = 5, zeta: float = 3e-4,
            eta: float = 20.0) -> dict[str, list[float]]:
    """Step times (s) of a fixed-bit QAT graph, an EdMIPS-style supernet (no attribution) and a
    GMPQ supernet (attribution loss, double backprop), interleaved."""
    from torchvision.models import resnet18
    torch.manual_seed(0)
    model = resnet18().eval()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    ann = "annotate-bitwidths{weight-bits=4 act-bits=4}"
    tails = {"qat": "insert-fake-quant{weight-scheme=symmetric per-channel=false act-scheme=pact}",
             "edmips": "insert-gmpq-supernet{w-candidates=[2,3,4] a-candidates=[2,3,4]}",
             "gmpq": "insert-gmpq-supernet{w-candidates=[2,3,4] a-candidates=[2,3,4]}"}
    graphs = {}
    for name, tail in tails.items():
        gm = qpasses.trace(model, (x[:1],))
        with PassContext(example_inputs=(x[:1],)):
            gm = PassManager.parse(f"graph({ann},{tail})").run(gm)
        gm.train()
        opts = [torch.optim.SGD(gm.parameters(), lr=1e-3, momentum=0.9)]
        if name != "qat":   # EdMIPS/GMPQ: the logits get their own optimizer
            arch = {id(p) for p in gmpq_modules.arch_parameters(gm)}
            opts = [torch.optim.SGD([p for p in gm.parameters() if id(p) not in arch], lr=1e-3,
                                    momentum=0.9, weight_decay=1e-4),
                    torch.optim.SGD(gmpq_modules.arch_parameters(gm), lr=1e-2, momentum=0.9,
                                    weight_decay=1e-4)]
        graphs[name] = (gm, opts)
    teacher = gmpq.make_teacher(model, graphs["gmpq"][0])

    def step(name):
        gm, opts = graphs[name]
        if name == "qat":
            loss = F.cross_entropy(gm(x), y)
        else:
            loss = gmpq.search_loss(gm, x, y, teacher=teacher if name == "gmpq" else None,
                                    zeta=zeta, eta=eta if name == "gmpq" else 0.0,
                                    options=gmpq.OFFICIAL_CODE).total
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()

    return interleaved_steps({n: (lambda n=n: step(n)) for n in graphs}, steps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--zeta", type=float, default=3e-4)
    ap.add_argument("--eta", type=float, default=20.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    times = measure(args.batch, args.size, args.steps, args.zeta, args.eta)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"ResNet-18 batch {args.batch} {args.size}x{args.size}, {torch.get_num_threads()} "
          f"thread(s), median of {args.steps} steps: QAT {med['qat']:.3f}s, EdMIPS-style "
          f"{med['edmips']:.3f}s (x{med['edmips'] / med['qat']:.2f}), GMPQ {med['gmpq']:.3f}s "
          f"(x{med['gmpq'] / med['qat']:.2f} of QAT)")


if __name__ == "__main__":
    main()
