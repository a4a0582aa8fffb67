"""FracBits on scikit-learn digits: uniform 3-bit QAT vs FracBits layer-wise vs kernel-wise at
the uniform-3-bit BitOPs budget (docs/algorithms.md, "FracBits").

    python -m tools.search_fracbits [--pretrain-epochs 15] [--search-epochs 12]
        [--finetune-epochs 4] [--kappa 2.0] [--seed 0] [--out fracbits_out]

Model: torchvision's ``ResNet(BasicBlock, [1, 1, 1, 1])`` adapted to 1-channel 8x8 digits (3x3
stem, stride 1, no max-pool; ``--width`` 32 halves torchvision's stage widths). Steps, all with fixed seeds:

1. fp32 pretraining;
2. uniform 3-bit QAT baseline (``--metric size``: weight-only, A8, size target): ``annotate-bitwidths{weight-bits=3 act-bits=3 first-last-bits=8},
   insert-fake-quant{weight-scheme=dorefa act-scheme=pact}`` for search+finetune epochs; its BitOPs
   are the target;
3. FracBits layer-wise, then kernel-wise (0-bit candidate, allow-zero; initialized from the
   layer-wise searched weights, α and λ as in the paper): ``insert-fracbits``, search
   with ``penalty(gm, target_bitops=T, kappa=kappa/T)`` (the L1 loss relative to the target; the
   penalty starts after one warm-up epoch), ``freeze-fracbits{rounding=solver target-bitops=T}``,
   ``insert-fake-quant{weight-scheme=dorefa act-scheme=pact}`` (PACT clips start from the learned α), finetune,
   ``prune-zero-bit-channels``;
4. every quantized model: ``calibrate`` + ``lower-to-int-sim`` where it succeeds (integer
   accuracy reported, or the reason it failed).

Prints a table (accuracy, int-sim accuracy, GBitOPs and ratio to target, size, pruned channels)
and writes per-layer bit-width plots (tools/dump_graph.plot_bits) and results.json to ``--out``.
Distributed: ``torchrun --nproc_per_node=2 -m tools.search_fracbits ...`` trains with
DistributedDataParallel over gloo (CPU), each rank on its shard of the training set; weights, λ
and α gradients are all-reduced, so every rank ends with the same λ (checked and printed).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import qpasses
from passes_registry import PassContext, PassManager, get_record, record_to_json
from qpasses.modules import fracbits as fb
from qpasses.algorithms import fracbits as fb_cost
from qpasses.modules.fracbits import FROZEN_META


def data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return xtr, ytr, xte, yte


def make_model(width: int = 64) -> nn.Module:
    """torchvision ResNet(BasicBlock, [1,1,1,1]) for 1x8x8 inputs, stage widths
    ``width * (1, 2, 4, 8)`` (64 is torchvision's)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    class DigitsResNet(ResNet):
        scale = width / 64

        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            p = int(planes * self.scale)
            if planes == 64:
                self.inplanes = p
            return super()._make_layer(block, p, blocks, stride, dilate)

    m = DigitsResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    m.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
    m.bn1 = nn.BatchNorm2d(width)
    m.maxpool = nn.Identity()
    m.fc = nn.Linear(8 * width, 10)
    return m


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def _dist():
    """(rank, world) under torchrun, (0, 1) otherwise."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(model, xtr, ytr, epochs, lr, seed, desc, extra_loss=None, after_step=None,
          warmup_epochs=0, param_groups=None):
    """SGD (Nesterov, cosine LR). Under torchrun each rank trains on its shard through
    DistributedDataParallel, so weights, λ and α gradients are all-reduced (identical on all
    ranks); the penalty and the λ clamp are computed identically on every rank."""
    g = torch.Generator().manual_seed(seed)
    rank, world = _dist()
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    params = param_groups if param_groups is not None else model.parameters()
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    per_rank = len(xtr) // world
    steps = epochs * ((per_rank + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    bar = tqdm(total=steps, desc=desc, leave=False, file=sys.stderr, disable=rank != 0)
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=g)[:per_rank * world][rank::world]
        for i in range(0, per_rank, 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            pen = extra_loss() if (extra_loss is not None and ep >= warmup_epochs) else None
            total = loss + pen if pen is not None else loss
            opt.zero_grad()
            total.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            bar.update(1)
            post = {"loss": f"{loss.item():.3f}"}
            if pen is not None:
                post["cost"] = f"{float(fb_cost.model_cost(model, detach=True)):.5f}"
            bar.set_postfix(post)
    bar.close()
    model.eval()
    return model


def run_pm(gm, text, calib=None, example=None):
    pm = PassManager.parse(text, assume=gm)
    with PassContext(example_inputs=example, calibration_data=calib):
        return pm.run(gm)


def report(gm):
    rep = qpasses.report(gm)
    pruned = sum(r["pruned_channels"] for r in rep["layers"])
    return rep, rep["totals"]["bitops"] / 1e9, rep["totals"]["size_bits"] / 8e6, pruned


def int_sim(gm, xtr, xte, yte, example):
    try:
        lowered = copy.deepcopy(gm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the trained ranges (PACT clips), not re-observed ones: the model QAT produced
            lowered = run_pm(lowered, "graph(calibrate{method=trained},lower-to-int-sim)",
                             calib=[xtr[i:i + 64] for i in range(0, 512, 64)], example=example)
        return accuracy(lowered, xte, yte), ""
    except Exception as e:  # reported, not hidden
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--search-epochs", type=int, default=12)
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("--kappa", type=float, default=2.0,
                    help="penalty weight relative to the target (kappa/T in GBitOPs units)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--kernel-lambda-lr", type=float, default=1.0,
                    help="λ learning-rate multiplier in the kernel-wise search (a kernel's λ "
                         "gets ~1/C_out of a layer λ's gradient)")
    ap.add_argument("--metric", choices=("bitops", "size"), default="bitops",
                    help="bitops: W3A3 target, weights and activations searched; size: weight-only "
                         "search (A8) at the W3A8 model size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=32, help="ResNet base width (torchvision: 64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="fracbits_out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:    # torchrun --nproc_per_node=N
        import torch.distributed as dist
        dist.init_process_group("gloo")
    rank, world = _dist()
    if rank != 0:   # every rank runs the same passes; only rank 0 talks
        sys.stdout = open(os.devnull, "w")
    os.makedirs(args.out, exist_ok=True)
    xtr, ytr, xte, yte = data(args.seed)
    example = (xte[:2],)
    t0 = time.time()

    torch.manual_seed(args.seed)
    fp = train(make_model(args.width), xtr, ytr, args.pretrain_epochs, args.lr, args.seed, "fp32")
    fp_acc = accuracy(fp, xte, yte)
    print(f"fp32 test accuracy {fp_acc:.2f}%  ({time.time() - t0:.0f}s)", flush=True)
    fp_state = copy.deepcopy(fp.state_dict())
    act_bits = 3 if args.metric == "bitops" else 8
    annotate = f"annotate-bitwidths{{weight-bits=3 act-bits={act_bits} first-last-bits=8}}"
    fq = "insert-fake-quant{weight-scheme=dorefa act-scheme=pact}"
    total_epochs = args.search_epochs + args.finetune_epochs
    rows, results = [], {"fp32_acc": fp_acc}

    def fresh():
        m = make_model(args.width)
        m.load_state_dict(fp_state)
        return qpasses.trace(m.eval(), example)

    # uniform 3-bit QAT (target)
    gm = run_pm(fresh(), f"graph({annotate},{fq})", example=example)
    torch.manual_seed(args.seed)
    train(gm, xtr, ytr, total_epochs, args.lr, args.seed + 1, "uniform-3bit QAT")
    rep, bitops, size, pruned = report(gm)
    target, unit = (bitops, "GBitOPs") if args.metric == "bitops" else (size, "MB")
    acc = accuracy(gm, xte, yte)
    isim, why = int_sim(gm, xtr, xte, yte, example)
    rows.append((f"uniform W3A{act_bits}", acc, isim, bitops, size, 1.0, pruned, why))
    results["uniform"] = {"report": rep}
    print(f"uniform W3A{act_bits}: acc {acc:.2f}%, target {target:.6f} {unit} "
          f"({time.time() - t0:.0f}s)", flush=True)
    target_opt = f"target-{'bitops' if args.metric == 'bitops' else 'size'}={target!r}"
    search_acts = "" if args.metric == "bitops" else " act-scheme=none"

    for gran in ("layer", "kernel"):
        opts = ("granularity=layer init-bits=3.5 candidates=[1,2,3,4,5,6,7,8]" if gran == "layer"
                else "granularity=kernel init-bits=3.5 candidates=[0,1,2,3,4,5,6,7,8] "
                     "allow-zero=true") + search_acts
        gm = run_pm(fresh(), f"graph({annotate},insert-fracbits{{{opts}}})", example=example)
        if gran == "kernel" and "layer_searched" in results:
            # FracBits: start kernel-wise search from the layer-wise searched model, the
            # layer λ broadcast to every kernel
            src = results.pop("layer_searched")
            dst = gm.state_dict()
            with torch.no_grad():
                for k, v in dst.items():
                    if k in src and src[k].shape == v.shape:
                        v.copy_(src[k])
                    elif k in src and k.endswith("lam"):
                        v.fill_(float(src[k]))
        lam_ids = {id(p) for p in fb.lambda_parameters(gm)}
        groups = [{"params": [p for p in gm.parameters() if id(p) not in lam_ids]},
                  {"params": fb.lambda_parameters(gm),
                   "lr": args.lr * (args.kernel_lambda_lr if gran == "kernel" else 1.0)}]
        torch.manual_seed(args.seed)
        train(gm, xtr, ytr, args.search_epochs, args.lr, args.seed + 1, f"FracBits {gran} search",
              extra_loss=lambda gm=gm: fb_cost.penalty(gm, **{f"target_{args.metric}": target},
                                                  kappa=args.kappa / target),
              after_step=lambda gm=gm: fb.clamp_lambdas(gm), warmup_epochs=1,
              param_groups=groups)
        searched_cost = float(fb_cost.model_cost(gm, args.metric, detach=True))
        if gran == "layer":
            results["layer_searched"] = copy.deepcopy(gm.state_dict())
        search_acc = accuracy(gm, xte, yte)
        gm.eval()
        gm = run_pm(gm, f"graph(freeze-fracbits{{rounding=solver {target_opt}}})",
                    example=example)
        frozen = get_record(gm, FROZEN_META)
        gm = run_pm(gm, f"graph({fq})", example=example)   # PACT starts from the learned α
        torch.manual_seed(args.seed)
        train(gm, xtr, ytr, args.finetune_epochs, args.lr * 0.2, args.seed + 2,
              f"FracBits {gran} finetune")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = run_pm(gm, "graph(prune-zero-bit-channels)", example=example)
        rep, bitops, size, pruned = report(gm)
        cost = bitops if args.metric == "bitops" else size
        acc = accuracy(gm, xte, yte)
        isim, why = int_sim(gm, xtr, xte, yte, example)
        rows.append((f"FracBits {gran}", acc, isim, bitops, size, cost / target, pruned, why))
        results[gran] = {"report": rep, "search_acc": search_acc,
                         "searched_cost": searched_cost,
                         "frozen": record_to_json(frozen)["layers"]}
        print(f"FracBits {gran}: search acc {search_acc:.2f}% (λ cost {searched_cost:.6f}), "
              f"final acc {acc:.2f}%, {cost:.6f} {unit} = {cost / target:.4f}x target "
              f"({time.time() - t0:.0f}s)", flush=True)
        try:
            if rank != 0:
                continue
            from tools.dump_graph import plot_bits
            plot_bits(rep, os.path.join(args.out, f"bits_{gran}.png"))
        except Exception as e:  # plotting is optional
            print(f"plot failed: {e}")

    from tabulate import tabulate
    table = tabulate(
        [(n, f"{a:.2f}", "-" if i is None else f"{i:.2f}", f"{b:.6f}", f"{s:.4f}", f"{r:.4f}", p)
         for n, a, i, b, s, r, p, _ in rows],
        headers=["model", "acc %", "int-sim acc %", "GBitOPs", "size MB", f"x target ({unit})",
                 "pruned ch"])
    print(f"\nfp32 accuracy {fp_acc:.2f}%; target = uniform W3A{act_bits} {unit} {target:.6f}; "
          f"seed {args.seed}; {time.time() - t0:.0f}s total")
    print(table)
    for n, *_, why in rows:
        if why:
            print(f"int-sim not available for {n}: {why}")
    results["table"] = table
    if rank == 0:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    if world > 1:
        import torch.distributed as dist
        lam = torch.cat([p.detach().flatten() for p in gm.parameters()])
        both = [torch.zeros_like(lam) for _ in range(world)]
        dist.all_gather(both, lam)
        print(f"DDP: {world} ranks, parameters identical on all ranks: "
              f"{all(torch.equal(both[0], b) for b in both)}")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
