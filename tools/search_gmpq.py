"""GMPQ on scikit-learn digits: search a mixed-precision policy on a small proxy, transfer it to
the full-data model, finetune, and compare with an EdMIPS-style search (no attribution loss) and
uniform bits at matched BitOPs (docs/algorithms.md, "GMPQ").

    python -m tools.search_gmpq [--proxy-fraction 0.25] [--search-epochs 40] [--zeta 0.05]
        [--eta 2.0] [--loss code] [--seed 0] [--out gmpq_out]

Model: the digits ResNet of tools/search_fracbits.py (torchvision ``ResNet(BasicBlock,
[1,1,1,1])``, 3x3 stem, no max-pool, ``--width`` 16) whose last two stages keep stride 1, so the
last feature map is 4x4 like GMPQ's CIFAR ResNet (Grad-CAM needs a spatial map). Steps, all with
fixed seeds:

1. fp32 training on the full training split (the deployment model) and on the proxy, a
   stratified ``--proxy-fraction`` of it (the "small dataset": its fp32 model is the teacher and
   the supernet's initialization);
2. search on the proxy with ``annotate-bitwidths{weight-bits=3 act-bits=3 first-last-bits=8},
   insert-gmpq-supernet``
   (w/a candidates {2,3,4}; stem and classifier float) and ``qpasses.algorithms.gmpq.search_loss``:
   GMPQ (``eta > 0``, teacher = the proxy fp32 model) and EdMIPS-style (``eta = 0``), same ζ, seed
   and epochs; weights and logits by separate SGD optimizers (EdMIPS: logits lr 0.01 x
   ``--arch-lr-mult``, wd 1e-4 on both). ζ is given relative to the initial R_C
   (``zeta_eff = zeta / R_C(uniform π)``);
3. ``select-gmpq-policy{target-bitops=T}`` with T = the uniform w3a3 model's BitOPs (the report's
   count): argmax activations, weights projected onto T (the searched argmax BitOPs are reported
   too); search seconds = supernet training + selection (the paper's "GPU hours" column);
4. transfer: the policy is written as an ``annotate-bitwidths`` config file and applied to the
   full-data fp32 model (unsearched layers as in the uniform model), then ``insert-fake-quant{weight-scheme=symmetric per-channel=false
   act-scheme=pact},calibrate{method=percentile}`` and ``--finetune-epochs`` of QAT on the full
   training split; the uniform w3a3 baseline gets the same treatment.

Prints a table (test accuracy, GBitOPs, search seconds, mean bits) and writes bit-width plots
(tools/dump_graph.plot_bits), the policies and results.json to ``--out``.
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
from tqdm import tqdm

import qpasses
from passes_registry import get_record, record_to_json
from qpasses.errors import BudgetError
from qpasses.algorithms import gmpq
from qpasses.modules import gmpq as gmpq_modules
from tools.search_fracbits import accuracy, data, run_pm, train
from tools.search_fracbits import make_model as fracbits_model

# every model: the uniform 3-bit annotation (stem and classifier weights at 8 bits); the search
# and the transferred policy only change the searched layers
ANNOTATE = "annotate-bitwidths{{weight-bits=3 act-bits=3 first-last-bits=8{}}}"
FQ = "insert-fake-quant{weight-scheme=symmetric per-channel=false act-scheme=pact}"


def make_model(width: int = 16) -> torch.nn.Module:
    """The FracBits example's digits ResNet with stride-1 last stages (a 4x4 last map)."""
    m = fracbits_model(width)
    for stage in (m.layer3, m.layer4):
        stage[0].conv1.stride = (1, 1)
        stage[0].downsample[0].stride = (1, 1)
    return m


def proxy_split(xtr, ytr, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split
    idx, _ = train_test_split(range(len(ytr)), train_size=fraction, random_state=seed,
                              stratify=ytr.numpy())
    return xtr[idx], ytr[idx]


def search(gm, teacher, x, y, args, eta: float, desc: str) -> float:
    """Single-level EdMIPS/GMPQ search: weights and logits step on every minibatch."""
    options = gmpq.OFFICIAL_CODE if args.loss == "code" else gmpq.PAPER
    arch = gmpq_modules.arch_parameters(gm)
    ids = {id(p) for p in arch}
    opt_w = torch.optim.SGD([p for p in gm.parameters() if id(p) not in ids], lr=args.lr,
                            momentum=0.9, weight_decay=1e-4)
    opt_a = torch.optim.SGD(arch, lr=0.01 * args.arch_lr_mult, momentum=0.9, weight_decay=1e-4)
    steps = args.search_epochs * ((len(x) + args.batch - 1) // args.batch)
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, steps) for o in (opt_w, opt_a)]
    zeta = args.zeta / float(gmpq.complexity_loss(gm, options.normalize).detach())
    g = torch.Generator().manual_seed(args.seed + 1)
    bar = tqdm(total=steps, desc=desc, leave=False, file=sys.stderr)
    gm.train()
    t0 = time.perf_counter()
    for _ in range(args.search_epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), args.batch):
            b = perm[i:i + args.batch]
            loss = gmpq.search_loss(gm, x[b], y[b], teacher=teacher if eta > 0 else None,
                                    zeta=zeta, eta=eta, options=options)
            opt_w.zero_grad()
            opt_a.zero_grad()
            loss.total.backward()
            opt_w.step()
            opt_a.step()
            for s in scheds:
                s.step()
            bar.update(1)
            bar.set_postfix(ce=f"{loss.task.item():.3f}", rg=f"{loss.attribution.item():.3f}",
                            gbitops=f"{float(gmpq.expected_bitops(gm, detach=True)):.4f}")
    bar.close()
    gm.eval()
    return time.perf_counter() - t0


def project(gm, target: float, example):
    """select-gmpq-policy{target-bitops=target}; when the argmax activations leave the target
    out of the weights' reach, the nearest reachable budget instead (reported)."""
    try:
        return run_pm(copy.deepcopy(gm), f"graph(select-gmpq-policy{{target-bitops={target!r}}})",
                      example=example)
    except BudgetError as e:
        near = e.maximum if target > e.maximum else e.minimum
        print(f"  target {target:.6f} GBitOPs unreachable with the argmax activations; "
              f"projecting onto {near:.6f} (lower/raise zeta to land closer)", flush=True)
        return run_pm(gm, f"graph(select-gmpq-policy{{target-bitops={near!r}}})",
                      example=example)


def policy_config(rep, searched, path: str) -> dict:
    """The searched layers' bits as an annotate-bitwidths config file (layer names as globs)."""
    cfg = {r["name"]: {"weight_bits": r["w_bits"], "act_bits": r["a_bits"]}
           for r in rep["layers"] if r["name"] in searched}
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    return cfg


def finetune(fp_state, annotate: str, args, xtr, ytr, example, desc: str):
    m = make_model(args.width)
    m.load_state_dict(fp_state)
    gm = qpasses.trace(m.eval(), example)
    calib = [xtr[i:i + 128] for i in range(0, 512, 128)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # group-raised act bits are expected (and reported)
        gm = run_pm(gm, f"graph({annotate},{FQ},calibrate{{method=percentile}})", calib=calib,
                    example=example)
    torch.manual_seed(args.seed)
    train(gm, xtr, ytr, args.finetune_epochs, args.lr * 0.2, args.seed + 2, desc)
    return gm


def mean_bits(rep) -> tuple[float, float]:
    rows = [r for r in rep["layers"] if r["w_bits"] is not None]
    return (sum(r["w_bits"] for r in rows) / len(rows), sum(r["a_bits"] for r in rows) / len(rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proxy-fraction", type=float, default=0.25)
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--search-epochs", type=int, default=40)
    ap.add_argument("--finetune-epochs", type=int, default=6)
    ap.add_argument("--zeta", type=float, default=0.05,
                    help="complexity weight relative to the initial R_C")
    ap.add_argument("--eta", type=float, default=2.0, help="attribution weight of GMPQ")
    ap.add_argument("--loss", choices=["paper", "code"], default="code",
                    help="R_G form and R_C normalization: the paper's or the official code's")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--arch-lr-mult", type=float, default=30.0,
                    help="logit lr = 0.01 x this (EdMIPS' 0.01 assumes 25 ImageNet epochs)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="gmpq_out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    xtr, ytr, xte, yte = data(args.seed)
    xpr, ypr = proxy_split(xtr, ytr, args.proxy_fraction, args.seed)
    example = (xte[:2],)

    torch.manual_seed(args.seed)
    fp_full = train(make_model(args.width), xtr, ytr, args.pretrain_epochs, args.lr, args.seed,
                    "fp32 full")
    torch.manual_seed(args.seed)
    fp_proxy = train(make_model(args.width), xpr, ypr, args.pretrain_epochs, args.lr, args.seed,
                     "fp32 proxy")
    fp_acc, proxy_acc = accuracy(fp_full, xte, yte), accuracy(fp_proxy, xte, yte)
    fp_state = copy.deepcopy(fp_full.state_dict())
    print(f"fp32 test accuracy: full data {fp_acc:.2f}% ({len(xtr)} samples), proxy "
          f"{proxy_acc:.2f}% ({len(xpr)} samples)  ({time.time() - t0:.0f}s)", flush=True)

    # uniform w3a3: the matched budget
    uni = finetune(fp_state, ANNOTATE.format(""), args, xtr, ytr, example, "uniform w3a3 finetune")
    uni_rep = qpasses.report(uni)
    target = uni_rep["totals"]["bitops"] / 1e9
    rows = [("uniform w3a3", accuracy(uni, xte, yte), target, target, None,
             *mean_bits(uni_rep))]
    results = {"fp32_acc": fp_acc, "proxy_fp32_acc": proxy_acc, "target_gbitops": target,
               "args": vars(args)}
    print(f"uniform w3a3: {rows[0][1]:.2f}%, {target:.6f} GBitOPs  ({time.time() - t0:.0f}s)",
          flush=True)

    for method, eta in (("GMPQ", args.eta), ("EdMIPS-style", 0.0)):
        gm = qpasses.trace(fp_proxy, example)
        gm = run_pm(gm, f"graph({ANNOTATE.format('')},insert-gmpq-supernet{{w-candidates="
                        f"[2,3,4] a-candidates=[2,3,4]}})", example=example)
        teacher = gmpq.make_teacher(fp_proxy, gm) if eta > 0 else None
        torch.manual_seed(args.seed)
        seconds = search(gm, teacher, xpr, ypr, args, eta, f"{method} search")
        t_sel = time.perf_counter()
        argmax = run_pm(copy.deepcopy(gm), "graph(select-gmpq-policy)", example=example)
        argmax_gbitops = qpasses.report(argmax)["totals"]["bitops"] / 1e9
        selected = project(gm, target, example)
        seconds += time.perf_counter() - t_sel
        sel_rep = qpasses.report(selected)
        cfg_path = os.path.join(args.out, f"policy_{method.split('-')[0].lower()}.json")
        policy = get_record(selected, gmpq_modules.SELECTED_META)
        policy_config(sel_rep, policy.layers, cfg_path)
        ft = finetune(fp_state, ANNOTATE.format(f" config={cfg_path}"), args, xtr, ytr,
                      example, f"{method} finetune")
        rep = qpasses.report(ft)
        acc = accuracy(ft, xte, yte)
        rows.append((method, acc, rep["totals"]["bitops"] / 1e9, argmax_gbitops, seconds,
                     *mean_bits(rep)))
        results[method] = {"report": rep, "policy": cfg_path, "search_seconds": seconds,
                           "argmax_gbitops": argmax_gbitops,
                           "selected": record_to_json(policy)["layers"]}
        print(f"{method}: search {seconds:.1f}s (argmax {argmax_gbitops:.6f} GBitOPs), "
              f"finetuned {acc:.2f}% at {rows[-1][2]:.6f} GBitOPs  ({time.time() - t0:.0f}s)",
              flush=True)
        try:
            from tools.dump_graph import plot_bits
            plot_bits(rep, os.path.join(args.out, f"bits_{method.split('-')[0].lower()}.png"))
        except Exception as e:  # plotting is optional
            print(f"plot failed: {e}")

    from tabulate import tabulate
    table = tabulate(
        [(n, f"{a:.2f}", f"{b:.6f}", f"{b / target:.4f}", f"{am:.6f}",
          "-" if s is None else f"{s:.1f}", f"{mw:.2f}", f"{ma:.2f}")
         for n, a, b, am, s, mw, ma in rows],
        headers=["method", "test acc %", "GBitOPs", "x target", "argmax GBitOPs",
                 "search s", "mean w bits", "mean a bits"])
    print(f"\nfp32 {fp_acc:.2f}% (proxy fp32 {proxy_acc:.2f}%); target = uniform w3a3 "
          f"{target:.6f} GBitOPs; seed {args.seed}; loss form {args.loss}; zeta {args.zeta}, "
          f"eta {args.eta}; {time.time() - t0:.0f}s total")
    print(table)
    results["table"] = table
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
