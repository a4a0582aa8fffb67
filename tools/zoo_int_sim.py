"""Sweep torchvision classifiers through a quantization pipeline down to the verified integer graph.

Each model runs in its own subprocess (so its peak memory is its own and a crash or an out-of-memory
kill is reported as such, not inherited by the next model): ``tools.zoo_models.build`` (seeded
random weights, smallest valid input, batch 2), trace, the pipeline with the input as calibration
data, ``verify-int-sim``, then the report. One row per model: float islands (count and the most
common ops), the share of MACs the report counts in integer layers, verify-int-sim's verdict and
top-1 agreement with the fake-quant graph, seconds, and peak RSS.

    python -m tools.zoo_int_sim                       # all 80 models, default pipeline
    python -m tools.zoo_int_sim --models vit_b_16 densenet121 --widths w8a8
    python -m tools.zoo_int_sim --widths emulate     # emulation mode: deviation, agreement
    python -m tools.zoo_int_sim --json zoo.json --plot zoo.png

Exit status 1 when a model fails, keeps a float island, or is not bit-exact.
"""
from __future__ import annotations

import argparse
import collections
import json
import resource
import subprocess
import sys
import time
from typing import Any

from tabulate import tabulate

PIPELINES = {
    "default": "graph(default)",
    "w8a8": "graph(ptq-int8,lower-to-int-sim,verify-int-sim)",
    # the default's quantization, then emulation mode: the lowered graph checked against the
    # emulating fake-quant graph (deviation and top-1 agreement, issue 17)
    "emulate": "graph(canonicalize,fold-batch-norm,dce,annotate-bitwidths{weight-bits=4 "
               "act-bits=8 first-last-bits=8},insert-fake-quant{weight-scheme=symmetric "
               "per-channel=true},calibrate,emulate-int-sim,lower-to-int-sim,verify-int-sim)",
}


def run_one(name: str, widths: str) -> dict[str, Any]:
    """Build, quantize, lower and verify one model in this process; the row as a dict."""
    import warnings

    import torch

    import qpasses
    from passes_registry import PassContext, PassManager, get_record
    from qpasses.ir.records import INT_SIM_KEY
    from qpasses.report import report
    from tools.zoo_models import build

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    model, x = build(name)
    params = sum(p.numel() for p in model.parameters())
    gm = qpasses.trace(model, x)
    del model
    with PassContext(example_inputs=(x,), calibration_data=[x]):
        PassManager.parse(PIPELINES[widths]).run(gm)
    rep = report(gm)
    islands = rep["float_islands"]
    verify = get_record(gm, INT_SIM_KEY).verify or {}
    total = rep["totals"]["macs"]
    int_macs = rep["totals"].get("int_macs")
    lower_s = sum(p["seconds"] for p in rep["passes"]
                  if p["name"] in ("lower-fake-quant-ops", "fuse-requantize",
                                   "shift-unfused-biases", "exact-zero-kernel-constants",
                                   "cleanup-int-sim"))
    return {
        "model": name, "params_m": params / 1e6, "float_islands": len(islands),
        "island_ops": dict(collections.Counter(i["op"] for i in islands).most_common(4)),
        "int_macs_pct": None if int_macs is None or not total else 100.0 * int_macs / total,
        "bit_exact": bool(verify.get("num_nodes_checked")),
        "top1_agree_pct": verify.get("top1_agree_pct"),
        "max_lsb_diff": verify.get("max_lsb_diff"),
        "lower_s": lower_s, "total_s": time.perf_counter() - t0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _child(name: str, widths: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tools.zoo_int_sim", "--one", name, "--widths", widths]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        err = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        return {"model": name, "error": err[:200]}
    return json.loads(lines[-1])


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(ok)), 3.5))
    ax.bar([r["model"] for r in ok], [r["int_macs_pct"] or 0.0 for r in ok],
           color=["tab:green" if r["float_islands"] == 0 else "tab:orange" for r in ok])
    ax.set_ylabel("MACs in integer layers (%)")
    ax.set_ylim(0, 100)
    ax.tick_params(axis="x", rotation=90, labelsize=6)
    ax.set_title("integer-only share per model (orange: float islands remain)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from tools.zoo_models import MODELS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="model names (default: all)")
    ap.add_argument("--widths", choices=sorted(PIPELINES), default="default")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--plot", default=None, help="write a PNG bar chart of integer MACs here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child's entry point
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.widths)))
        return 0
    names = args.models or MODELS
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from torchvision's classifiers")
    from tqdm import tqdm

    rows = []
    for name in tqdm(names, desc=f"zoo {args.widths}", file=sys.stderr):
        rows.append(_child(name, args.widths, args.timeout))
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["model"], "-", "error", "-", "-", "-", "-", "-", "-", "-",
                         r["error"]])
            continue
        pct = r["int_macs_pct"]
        body.append([r["model"], f"{r['params_m']:.1f}", r["float_islands"],
                     "-" if pct is None else f"{pct:.1f}", "yes" if r["bit_exact"] else "NO",
                     r["top1_agree_pct"], r.get("max_lsb_diff"), f"{r['lower_s']:.2f}",
                     f"{r['total_s']:.1f}",
                     f"{r['peak_rss_mib']:.0f}",
                     ", ".join(f"{k} x{v}" for k, v in r["island_ops"].items())])
    print(tabulate(body, headers=["model", "params (M)", "islands", "int MACs %", "bit-exact",
                                  "top-1 agree %", "max LSB diff", "lower s", "total s",
                                  "peak RSS MiB",
                                  "island ops"]))
    bad = [r["model"] for r in rows if "error" in r or r["float_islands"] or not r["bit_exact"]
           or (args.widths == "emulate" and ((r["max_lsb_diff"] or 0) > 1
                                             or r["top1_agree_pct"] not in (None, 100.0)))]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} models integer-only and bit-exact"
          + (f"; not: {', '.join(bad)}" if bad else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        _plot(rows, args.plot)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
