"""The ``lowering-memory`` section of ``python -m tools.bench`` (importing this registers it).

Lowers the two largest torchvision classifiers, ViT-H/14 (632 M parameters) and RegNetY-128GF
(645 M), each in its own subprocess under a memory cap, and reports the peak resident memory
against ``2 x (fp32 weights + one batch's activations)`` (issue 16's memory target):

- the model is ``tools.zoo_models.build`` (seeded random weights, smallest valid input, batch 2),
  traced (the model is dropped after the trace), and goes through :data:`PREFIX` (W4A8, first and
  last layers 8-bit, per-channel symmetric weights, calibrated on the input), then
  ``lower-to-int-sim`` (defaults: keep-fake-quant on) is timed and its peak RSS growth measured
  (``VmHWM`` reset after ``malloc_trim`` just before it, as in ``ptq-flow``);
- the cap: ``RLIMIT_DATA`` (private writable memory) set in the child before torch is imported, else
  ``RLIMIT_AS`` (address space, which counts the CUDA build's virtual reservations), else none (the
  figure is then compared with the cap only); the note says which held;
- "activations" = the fp32 bytes of every value of one forward on the batch (from the traced
  shapes), an upper bound on what one batch keeps alive.

    python -m tools.bench --only lowering-memory               # both models, 12 GiB cap
    python -m tools.bench --only lowering-memory --mem-model vit_b_16 --mem-cap-gib 4
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from tools.bench_harness import Row, Section, benchmark

MODELS = ("vit_h_14", "regnet_y_128gf")
CAP_GIB = 12.0
PREFIX = ("graph(canonicalize,fold-batch-norm,dce,annotate-bitwidths{weight-bits=4 act-bits=8 "
          "first-last-bits=8},insert-fake-quant{weight-scheme=symmetric per-channel=true},"
          "calibrate)")
LOWERING = "graph(lower-to-int-sim)"
_GIB = 2.0 ** 30


def _set_cap(method: str, cap: int) -> str:
    """Apply ``method`` (data / as / none) with ``cap`` bytes; what was set."""
    import resource
    if method == "none":
        return "none"
    which = resource.RLIMIT_DATA if method == "data" else resource.RLIMIT_AS
    resource.setrlimit(which, (cap, resource.getrlimit(which)[1]))
    return "RLIMIT_DATA" if method == "data" else "RLIMIT_AS"


def child(name: str, method: str, cap: int) -> dict[str, Any]:
    """Build, quantize and lower ``name`` in this process under the cap: the result row."""
    out: dict[str, Any] = {"model": name, "cap": _set_cap(method, cap), "cap_bytes": cap}
    try:
        import gc
        import warnings

        import torch

        import qpasses
        from passes_registry import PassContext, PassManager
        from passes_registry.instrument import Timing
        from tools.bench_flow import PeakRSS, status_kib, named_pipeline_passes
        from tools.zoo_models import build
    except BaseException as e:   # noqa: BLE001 - the cap can stop torch's import itself
        out["stage"], out["error"] = "import", f"{type(e).__name__}: {e}"
        return out
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    stage = "build"
    try:
        model, x = build(name)
        out["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        stage = "trace"
        gm = qpasses.trace(model, x)
        del model
        gc.collect()
        out["activation_bytes"] = sum(
            tm.shape.numel() * 4 for n in gm.graph.nodes
            if (tm := n.meta.get("tensor_meta")) is not None and hasattr(tm, "shape"))
        stage = "quantize"
        with PassContext(example_inputs=(x,), calibration_data=[x], verify_each=False):
            PassManager.parse(PREFIX).run(gm)
        stage = "lower"
        pm = PassManager.parse(LOWERING)
        peak, timing = PeakRSS(named_pipeline_passes(pm, "lower-to-int-sim")), Timing()
        with PassContext(example_inputs=(x,), calibration_data=[x], verify_each=False,
                         instruments=(peak, timing)):
            t0 = time.perf_counter()
            pm.run(gm)
            out["lowering_s"] = time.perf_counter() - t0
        out["rss_before_lowering"] = peak.start_bytes
        out["passes_s"] = {r.name: r.seconds for r in timing.records if r.kind == "pass"}
        out["peak_growth_bytes"] = peak.bytes
        out["ok"] = True
    except BaseException as e:   # noqa: BLE001 - report whatever stopped it (MemoryError too)
        out["stage"], out["error"] = stage, f"{type(e).__name__}: {str(e).splitlines()[0]}"
    out["peak_rss_bytes"] = (status_kib("VmHWM") or 0) * 1024   # since the lowering's reset
    return out


def _run_child(name: str, cap: int, timeout: float) -> dict[str, Any]:
    """Run :func:`child` in a subprocess, trying RLIMIT_DATA, then RLIMIT_AS, then no cap when a
    cap stops the child before torch is even imported."""
    last: dict[str, Any] = {}
    for method in ("data", "as", "none"):
        cmd = [sys.executable, "-m", "tools.bench_lowering", "--child", name, "--method", method,
               "--cap", str(cap)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"model": name, "cap": method, "error": f"timed out after {timeout:.0f} s"}
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            last = {"model": name, "cap": method,
                    "error": f"child exited {proc.returncode}: {tail}"}
            continue
        last = json.loads(lines[-1])
        if last.get("stage") != "import":
            return last
    return last


def _note(r: dict[str, Any]) -> str:
    name = r["model"]
    if "weights_bytes" not in r:
        return f"{name}: {r.get('error', 'failed')} (cap {r.get('cap')})"
    w, a = r["weights_bytes"], r.get("activation_bytes", 0)
    target = 2 * (w + a)
    cap = f"cap {r['cap']} {r.get('cap_bytes', 0) / _GIB:.1f} GiB"
    if not r.get("ok"):
        return (f"{name}: FAILED at {r.get('stage')} under {cap}: {r.get('error')}; peak RSS "
                f"{r.get('peak_rss_bytes', 0) / _GIB:.2f} GiB (VmHWM; since the lowering "
                f"started if it did); fp32 weights {w / _GIB:.2f} GiB")
    g = r.get("peak_growth_bytes") or 0
    before = r.get("rss_before_lowering") or 0
    return (f"{name}: ok under {cap}; lowering {r['lowering_s']:.1f} s; RSS before lowering "
            f"{before / _GIB:.2f} GiB, peak growth while lowering {g / _GIB:.2f} GiB (peak "
            f"{(before + g) / _GIB:.2f} GiB); fp32 weights {w / _GIB:.2f} GiB, activations "
            f"{a / 2**20:.1f} MiB; growth / 2x(weights + activations) = {g / target:.2f}")


@benchmark("lowering-memory", "ViT-H/14 and RegNetY-128GF (random weights, tiny inputs): "
                              "lower-to-int-sim under a 12 GiB cap in a subprocess; peak RSS vs "
                              "2x(fp32 weights + activations)")
def bench_lowering_memory(cfg: argparse.Namespace) -> Section:
    sec = Section("lowering-memory", ratio_label="growth / 2x(w + act)")
    cap = int(float(getattr(cfg, "mem_cap_gib", None) or CAP_GIB) * _GIB)
    for name in getattr(cfg, "mem_model", None) or MODELS:
        r = _run_child(name, cap, timeout=3000)
        if r.get("ok"):
            target = 2 * (r["weights_bytes"] + r.get("activation_bytes", 0))
            sec.rows.append(Row(sec.name, f"{name}: lower-to-int-sim", [r["lowering_s"]],
                                ratio=(r.get("peak_growth_bytes") or 0) / target))
        sec.notes.append(_note(r))
    sec.notes.append(f"pipeline {PREFIX} then {LOWERING}; batch 2 at the zoo's smallest size; "
                     "one run per model, 1 thread")
    return sec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_lowering",
                                description="child of the lowering-memory benchmark")
    p.add_argument("--child", required=True)
    p.add_argument("--method", choices=("data", "as", "none"), default="data")
    p.add_argument("--cap", type=int, default=int(CAP_GIB * _GIB))
    a = p.parse_args(argv)
    print(json.dumps(child(a.child, a.method, a.cap)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
