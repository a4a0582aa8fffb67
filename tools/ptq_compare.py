#!/usr/bin/env python3
"""Compare post-training weight quantizers: min/max, best-MSE clip, Bit-split (issue 9).

    python -m tools.ptq_compare                      # digits accuracy + per-layer errors, ResNet-18
    python -m tools.ptq_compare --plot ptq.png       # also a matplotlib figure
    python -m tools.ptq_compare --skip-resnet        # digits only (~1 min)
    python -m tools.ptq_compare --bench              # runtime: bit-split of ResNet-18 at W4

Methods (weights; every layer at the same W bits, per output channel, symmetric):

- ``minmax``  ptq-int8 style: round-to-nearest with the min/max range (weights and activations);
- ``mse``     round-to-nearest at the best-MSE weight clip (``ptq-bitsplit{iters=0}``: the bit-split
              initialisation alone), activations with the MSE clip observer;
- ``bitsplit`` ``ptq-bitsplit{iters=N}`` from that start, activations with the MSE clip observer.

Activation quantization goes through ``calibrate`` (A8 / A4, per tensor). Reported:

1. digits (scikit-learn load_digits, the DigitsCNN of tests/conftest.py trained the same way): top-1
   accuracy on the 450 held-out images at W3/W4/W8 x A8/A4;
2. per-layer output reconstruction error ``||Y - X W_q^T||^2 / ||Y||^2`` (float layer inputs X,
   float outputs Y minus bias; the quantity bit-split minimises) on the digits model and on a
   random-weight torchvision ResNet-18 (BN folded, random inputs, ``--resnet-size`` pixels).

``--bench``: wall-clock seconds of ``ptq-bitsplit{w-bits=4}`` on a random-weight ResNet-18 with 256
random calibration images (``--bench-size``, default 224x224) on this machine, split into data
collection and solve (``--bench-iters``).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager, get_record
from qpasses.modules.fake_quant import WeightFakeQuant
from qpasses.modules.fake_quant_layers import is_fake_quant_layer

METHODS = ("minmax", "mse", "bitsplit")


def digits_setup() -> Any:
    """The session fixture's digits model (tests/conftest.py), trained the same way."""
    from tests import conftest
    fn = getattr(conftest.digits_cnn, "__wrapped__", None) or \
        getattr(conftest.digits_cnn, "_fixture_function", conftest.digits_cnn)
    return fn()


def pipeline(method: str, w_bits: int, a_bits: int, iters: int, first_last: str = "none") -> str:
    act = "minmax" if method == "minmax" else "mse"
    tail = {"minmax": "", "mse": ",ptq-bitsplit{iters=0}",
            "bitsplit": f",ptq-bitsplit{{iters={iters}}}"}[method]
    return (f"graph(canonicalize,fold-batch-norm,annotate-bitwidths{{weight-bits={w_bits} "
            f"act-bits={a_bits} first-last-bits={first_last}}},insert-fake-quant{{weight-scheme="
            f"symmetric per-channel=true}},calibrate{{method={act}}}{tail})")


def quantize(model: nn.Module, example: torch.Tensor, text: str, data: list) -> Any:
    gm = qpasses.trace(model, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with PassContext(calibration_data=data):
            PassManager.parse(text).run(gm)
    return gm.eval()


def float_graph(model: nn.Module, example: torch.Tensor) -> Any:
    gm = qpasses.trace(model, example)
    PassManager.parse("graph(canonicalize,fold-batch-norm)").run(gm)
    return gm.eval()


@torch.no_grad()
def layer_errors(fp_gm: Any, q_gm: Any, x: torch.Tensor) -> dict[str, float]:
    """Per-layer relative output error of the quantized weights on the float layer inputs."""
    qmods = {n: m for n, m in q_gm.named_modules() if is_fake_quant_layer(m)}
    errs: dict[str, list[float]] = {}
    handles = []

    def hook(name: str, qmod: nn.Module) -> Any:
        def fn(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            wq: WeightFakeQuant = qmod.weight_fake_quant
            was = wq.fake_quant_on
            wq.enable_fake_quant(True)
            w_q = wq(qmod.weight)
            wq.enable_fake_quant(was)
            if isinstance(mod, nn.Linear):
                y, yq = F.linear(args[0], mod.weight), F.linear(args[0], w_q)
            else:
                y = mod._conv_forward(args[0], mod.weight, None)
                yq = mod._conv_forward(args[0], w_q, None)
            e = errs.setdefault(name, [0.0, 0.0])
            e[0] += float(((y - yq) ** 2).sum())
            e[1] += float((y ** 2).sum())
        return fn

    for name, mod in fp_gm.named_modules():
        if name in qmods:
            handles.append(mod.register_forward_hook(hook(name, qmods[name])))
    try:
        fp_gm(x)
    finally:
        for h in handles:
            h.remove()
    return {n: a / b if b > 0 else 0.0 for n, (a, b) in errs.items()}


def run_digits(args: argparse.Namespace) -> tuple[list, dict]:
    from tests.conftest import accuracy
    d = digits_setup()
    data = d.batches(8)
    fp = float_graph(d.model, d.x_test[:1])
    acc_rows, err_rows = [], {}
    for w in args.w_bits:
        for a in args.a_bits:
            row = [f"W{w}A{a}", f"{d.fp32_acc:.2f}"]
            for m in METHODS:
                gm = quantize(d.model, d.x_test[:1], pipeline(m, w, a, args.iters), data)
                row.append(f"{accuracy(gm, d.x_test, d.y_test):.2f}")
                if a == args.a_bits[0]:
                    err_rows[(w, m)] = layer_errors(fp, gm, d.x_test)
            acc_rows.append(row)
            print(f"  digits W{w}A{a} done", file=sys.stderr)
    return acc_rows, err_rows


def run_resnet(args: argparse.Namespace) -> dict:
    import torchvision
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18().eval()
    s = args.resnet_size
    g = torch.Generator().manual_seed(args.seed)
    data = [torch.randn(8, 3, s, s, generator=g) for _ in range(args.resnet_batches)]
    x_eval = torch.randn(8, 3, s, s, generator=g)
    fp = float_graph(model, data[0][:1])
    out = {}
    for w in args.w_bits:
        for m in ("minmax", "mse", "bitsplit"):
            t0 = time.perf_counter()
            gm = quantize(model, data[0][:1], pipeline(m, w, 8, args.resnet_iters), data)
            out[(w, m)] = layer_errors(fp, gm, x_eval)
            print(f"  resnet18 W{w} {m}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return out


def error_table(errs: dict, w_bits: list[int]) -> str:
    layers = list(next(iter(errs.values())))
    headers = ["layer"] + [f"W{w} {m}" for w in w_bits for m in METHODS]
    rows = [[n] + [f"{errs[(w, m)][n]:.2e}" for w in w_bits for m in METHODS] for n in layers]
    return tabulate(rows, headers=headers, disable_numparse=True)


def plot(path: str, acc_rows: list | None, digit_errs: dict | None, res_errs: dict | None,
         w_bits: list[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [p for p in (acc_rows, digit_errs, res_errs) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    k = 0
    if acc_rows:
        ax = axes[0][k]
        k += 1
        labels = [r[0] for r in acc_rows]
        xs = range(len(labels))
        for i, m in enumerate(METHODS):
            ax.bar([x + 0.27 * (i - 1) for x in xs], [float(r[2 + i]) for r in acc_rows],
                   width=0.27, label=m)
        ax.axhline(float(acc_rows[0][1]), color="k", ls="--", lw=1, label="fp32")
        ax.set_xticks(list(xs), labels)
        low = min(float(v) for r in acc_rows for v in r[1:])
        ax.set_ylim(max(0.0, low - 5.0), 100.0)
        ax.set_ylabel("top-1 %")
        ax.set_title("digits accuracy")
        ax.legend()
    for title, errs in (("digits", digit_errs), ("resnet18 (random weights)", res_errs)):
        if not errs:
            continue
        ax = axes[0][k]
        k += 1
        w = min(w_bits)
        layers = list(errs[(w, METHODS[0])])
        for m in METHODS:
            ax.semilogy(range(len(layers)), [errs[(w, m)][n] for n in layers], marker="o",
                        label=m)
        ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
        ax.set_ylabel("relative output error")
        ax.set_title(f"{title}: per-layer error at W{w}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def bench(args: argparse.Namespace) -> dict[str, float]:
    """Seconds for ptq-bitsplit{w-bits=4} on random-weight ResNet-18, 256 random images."""
    import torchvision
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18().eval()
    s = args.bench_size
    g = torch.Generator().manual_seed(args.seed)
    data = [torch.randn(16, 3, s, s, generator=g) for _ in range(256 // 16)]
    gm = qpasses.trace(model, data[0][:1])
    PassManager.parse("graph(canonicalize,fold-batch-norm,annotate-bitwidths{weight-bits=4 "
                      "act-bits=8 first-last-bits=none},insert-fake-quant{weight-scheme="
                      "symmetric per-channel=true})").run(gm)
    from qpasses.passes.ptq_bitsplit import PtqBitsplit
    p = PtqBitsplit(iters=args.bench_iters, samples=256, rows=args.bench_rows)
    with PassContext(calibration_data=data, progress=True) as ctx:
        t0 = time.perf_counter()
        stats = dict(p.run(gm, ctx, None).stats)   # the pass itself, as the manager runs it
        total = time.perf_counter() - t0
    errs = get_record(gm, "ptq_bitsplit").layers
    rtn = sum(e.rtn for e in errs.values()) / len(errs)
    bs = sum(e.bitsplit for e in errs.values()) / len(errs)
    res = {"seconds": total, "rows": args.bench_rows, "collect_s": stats.get("collect_ms", 0) / 1e3,
           "solve_s": stats.get("solve_ms", 0) / 1e3, "layers": len(errs), "iters": args.bench_iters, "size": s,
           "mean_rel_err_rtn_mse": rtn, "mean_rel_err_bitsplit": bs}
    print(f"ptq-bitsplit W4 ResNet-18 (random weights), 256 random images {s}x{s}, "
          f"iters={args.bench_iters} rows={args.bench_rows}: {total:.1f} s on this machine "
          f"({torch.get_num_threads()} torch threads; collect {res['collect_s']:.1f} s, solve "
          f"{res['solve_s']:.1f} s); mean per-layer relative error "
          f"RTN best-MSE {rtn:.4f} -> bit-split {bs:.4f}")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--w-bits", type=int, nargs="+", default=[3, 4, 8])
    p.add_argument("--a-bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--iters", type=int, default=20, help="bit-split iterations (digits)")
    p.add_argument("--resnet-iters", type=int, default=5)
    p.add_argument("--resnet-size", type=int, default=64)
    p.add_argument("--resnet-batches", type=int, default=4)
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--plot", default=None, metavar="PNG")
    p.add_argument("--bench", action="store_true", help="only the ResNet-18 runtime benchmark")
    p.add_argument("--bench-size", type=int, default=224)
    p.add_argument("--bench-iters", type=int, default=10)
    p.add_argument("--bench-rows", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.bench:
        bench(args)
        return 0
    acc_rows = digit_errs = res_errs = None
    if not args.skip_digits:
        acc_rows, digit_errs = run_digits(args)
        print("digits top-1 accuracy (%)  [minmax: min/max weights+acts; mse: best-MSE weight "
              "clip + MSE act clip; bitsplit: ptq-bitsplit + MSE act clip]")
        print(tabulate(acc_rows, headers=["config", "fp32"] + list(METHODS),
                       disable_numparse=True))
        print(f"\ndigits per-layer relative output error (weights only, A{args.a_bits[0]} run)")
        print(error_table(digit_errs, args.w_bits))
    if not args.skip_resnet:
        res_errs = run_resnet(args)
        print(f"\nresnet18 (random weights, BN folded, {args.resnet_size}x{args.resnet_size} "
              "random inputs) per-layer relative output error")
        print(error_table(res_errs, args.w_bits))
    if args.plot:
        plot(args.plot, acc_rows, digit_errs, res_errs, args.w_bits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
