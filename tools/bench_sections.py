"""The benchmark sections of ``python -m tools.bench`` (importing this module registers them).

Each section times one target of the project against its baseline; see tools/bench.py for the
command line and the list of sections. The whole-flow section ``ptq-flow`` lives in
tools/bench_flow.py.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import qpasses
from passes_registry import PassContext, PassManager, get_record
from qpasses.ir.records import INT_SIM_KEY
from tools.bench_harness import Row, Section, benchmark, timed


# ---------------------------------------------------------------------------------------------
# Section: fake-quant (QAT) training step on ResNet-18, ours vs fp32 vs torch.ao prepare_qat_fx

QAT_BATCH = 8
QAT_BITS = (8, 4)


def _qat_variants(seed: int) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    """name -> train-mode module, and one (x, y) batch: fp32 (BN), fp32 BN-folded, ours W8A8 and
    W4A4 (frozen calibrated activation ranges, weight ranges tracking the weights), ours W8A8 with
    activation observers running every step (torch.ao's QAT mode), torch.ao prepare_qat_fx."""
    import torchvision
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    from qpasses.modules.fake_quant_layers import set_observing

    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(QAT_BATCH, 3, 224, 224, generator=gen)
    y = torch.randint(0, 1000, (QAT_BATCH,), generator=gen)
    ex = (x[:1],)
    out: dict[str, Any] = {"fp32": copy.deepcopy(model).train()}
    folded = qpasses.trace(model, ex)
    PassManager.parse("graph(canonicalize,fold-batch-norm)").run(folded)
    out["fp32, BN folded (ours' float graph)"] = folded.train()
    for bits in QAT_BITS:
        gm = qpasses.trace(model, ex)
        with PassContext(example_inputs=ex, calibration_data=[x[:2]]):
            PassManager.parse(
                f"graph(canonicalize,fold-batch-norm,annotate-bitwidths{{weight-bits={bits} "
                f"act-bits={bits}}},insert-fake-quant,calibrate)").run(gm)
        out[f"ours W{bits}A{bits}"] = gm.train()
    gm = qpasses.trace(model, ex)
    PassManager.parse("graph(canonicalize,fold-batch-norm,annotate-bitwidths{weight-bits=8 "
                      "act-bits=8},insert-fake-quant)").run(gm)
    set_observing(gm, True)
    gm(x[:2])  # first observation, as torch.ao's first step
    out["ours W8A8, act observers on"] = gm.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["torch.ao prepare_qat_fx (x86)"] = prepare_qat_fx(
            copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), ex)
    return out, (x, y)


@benchmark("qat-step", "ResNet-18 batch 8 224x224 training step: fake-quant (ours) vs fp32 vs "
                       "torch.ao prepare_qat_fx; plus fake-quant inference overhead")
def bench_qat_step(cfg: argparse.Namespace) -> Section:
    sec = Section("qat-step", ratio_label="ratio (see notes)")
    variants, (x, y) = _qat_variants(cfg.seed)
    steps = {}
    for name, m in variants.items():
        opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)

        def step(m: Any = m, opt: Any = opt) -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        steps[name] = step
    times: dict[str, list[float]] = {n: [] for n in steps}
    cpu: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(cfg.warmup):
        for s in steps.values():
            s()
    for _ in range(cfg.repeat):  # interleaved, so load changes hit every variant alike
        for n, s in steps.items():
            c0 = time.process_time()
            times[n].append(timed(s)[0])
            cpu[n].append(time.process_time() - c0)
    base = statistics.median(times["fp32"])
    base_cpu = statistics.median(cpu["fp32"])
    for n in steps:
        sec.rows.append(Row(sec.name, f"train step: {n}", times[n],
                            ratio=statistics.median(times[n]) / base))
    for n in steps:
        sec.rows.append(Row(sec.name, f"train step, process CPU time: {n}", cpu[n],
                            ratio=statistics.median(cpu[n]) / base_cpu))
    # inference (eval, no grad): frozen quantizers
    inf_names = ["fp32", "fp32, BN folded (ours' float graph)"] + \
        [f"ours W{b}A{b}" for b in QAT_BITS] + ["torch.ao prepare_qat_fx (x86)"]
    for n in inf_names:
        variants[n].eval()
    inf: dict[str, list[float]] = {n: [] for n in inf_names}
    inf_cpu: dict[str, list[float]] = {n: [] for n in inf_names}
    with torch.no_grad():
        for _ in range(cfg.warmup):
            for n in inf_names:
                variants[n](x)
        for _ in range(cfg.repeat):
            for n in inf_names:
                c0 = time.process_time()
                inf[n].append(timed(lambda n=n: variants[n](x))[0])
                inf_cpu[n].append(time.process_time() - c0)
    ref = "fp32, BN folded (ours' float graph)"
    for label, data in (("inference", inf), ("inference, process CPU time", inf_cpu)):
        base_i = statistics.median(data[ref])
        for n in inf_names:
            sec.rows.append(Row(sec.name, f"{label}: {n}", data[n],
                                ratio=statistics.median(data[n]) / base_i))
    sec.notes.append(f"train-step ratios are vs the fp32 step (BN in train mode); inference "
                     f"ratios vs the BN-folded fp32 graph. batch {QAT_BATCH}x3x224x224, "
                     f"{cfg.repeat} interleaved runs (+{cfg.warmup} warm-up), torch "
                     f"{torch.__version__}, {torch.get_num_threads()} threads; process CPU "
                     "time (all threads) is the robust figure on a shared machine")
    sec.notes.append("ours = graph(canonicalize,fold-batch-norm,annotate-bitwidths{weight-bits=B "
                     "act-bits=B},insert-fake-quant,calibrate): per-channel symmetric weights "
                     "(first/last layer 8 bits), asymmetric per-tensor activations; its "
                     "fake-quant ops are vectorized composites bit-identical to torch's fused "
                     "kernels; torch.ao keeps BN (ConvBn fusion) and observes every step; the "
                     "fake-quant cost proper is ours / 'fp32, BN folded'")
    return sec


# ---------------------------------------------------------------------------------------------
# Section: emulation-mode QAT step (issue 17): fp32 vs fake-quant vs emulate-int-sim

EMU_SHAPE = (8, 3, 224, 224)     # the qat-step section's batch, so the ratios compare


@benchmark("qat-step-emulation", "ResNet-18 batch 8 224x224 training step: fp32 vs fake-quant W4A8 "
                                 "vs the same graph after emulate-int-sim (issue 17 target: "
                                 "<= 1.25x fp32)")
def bench_qat_step_emulation(cfg: argparse.Namespace) -> Section:
    import torchvision
    sec = Section("qat-step-emulation", ratio_label="ratio vs fp32")
    torch.manual_seed(cfg.seed)
    model = torchvision.models.resnet18()
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(*EMU_SHAPE, generator=gen)
    y = torch.randint(0, 1000, (EMU_SHAPE[0],), generator=gen)
    cal = [torch.randn(*EMU_SHAPE, generator=gen) for _ in range(2)]
    ex = (x[:1],)
    variants: dict[str, Any] = {"fp32": copy.deepcopy(model).train()}
    head = ("graph(canonicalize,fold-batch-norm,annotate-bitwidths{weight-bits=4 act-bits=8},"
            "insert-fake-quant,calibrate")
    emu = "emulating W4A8 (emulate-int-sim, gemmlowp)"
    for name, tail in (("fake-quant W4A8", ")"), (emu, ",emulate-int-sim)")):
        gm = qpasses.trace(model, ex)
        with PassContext(example_inputs=ex, calibration_data=cal, verify_each=False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                PassManager.parse(head + tail).run(gm)
        variants[name] = gm.train()
    steps = {}
    for name, m in variants.items():
        opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)

        def step(m: Any = m, opt: Any = opt) -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        steps[name] = step
    times: dict[str, list[float]] = {n: [] for n in steps}
    cpu: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(max(cfg.warmup, 1)):
        for s in steps.values():
            s()
    for _ in range(cfg.repeat):  # interleaved, so load changes hit every variant alike
        for n, s in steps.items():
            c0 = time.process_time()
            times[n].append(timed(s)[0])
            cpu[n].append(time.process_time() - c0)
    for label, data in (("train step", times), ("train step, process CPU time", cpu)):
        base = statistics.median(data["fp32"])
        for n in steps:
            sec.rows.append(Row(sec.name, f"{label}: {n}", data[n],
                                ratio=statistics.median(data[n]) / base))
    engine = variants[emu].int_sim_emulation
    sec.notes.append(f"batch {EMU_SHAPE}, SGD momentum 0.9, {cfg.repeat} interleaved runs "
                     f"(+{max(cfg.warmup, 1)} warm-up), {torch.get_num_threads()} threads, torch "
                     f"{torch.__version__}; the emulating graph relowered {engine.num_lowerings} "
                     "times (once per optimizer step: every step changes the weights); its "
                     "fake-quant layers take the integer graph's accumulators (no second GEMM); "
                     "process CPU time is the robust figure on a shared machine")
    return sec


# ---------------------------------------------------------------------------------------------
# Cost model and budgets (issue 4): solve-bitwidths and search-mixquant run times

SOLVE_MODELS = ("resnet18", "resnet50", "mobilenet_v2")


def _annotated(name: str, bits: int, seed: int) -> Any:
    import torchvision
    torch.manual_seed(seed)
    gm = qpasses.trace(getattr(torchvision.models, name)().eval(), torch.randn(1, 3, 224, 224))
    PassManager.parse(f"graph(annotate-bitwidths{{weight-bits={bits} act-bits={bits} "
                      f"first-last-bits=8}})").run(gm)
    return gm


@benchmark("solve-bitwidths", "ResNet-18/50, MobileNetV2 (224x224): solve-bitwidths at the BitOPs "
                              "of uniform 3/4/5 bits (first/last 8), layer-wise; target < 2 s")
def bench_solve_bitwidths(cfg: argparse.Namespace) -> Section:
    from passes_registry import AnalysisManager
    sec = Section("solve-bitwidths")
    for name in SOLVE_MODELS:
        for b in (3, 4, 5):
            gm = _annotated(name, b, cfg.seed)
            target = AnalysisManager().get("bitops", gm).total
            pm = PassManager.parse(f"graph(solve-bitwidths{{target-bitops={target / 1e9!r}}})",
                                   assume=gm)
            times, util = [], []
            for i in range(cfg.warmup + cfg.repeat):
                with PassContext(verify_each=False) as ctx:
                    t, _ = timed(lambda: pm.run(gm, ctx))
                if i >= cfg.warmup:
                    times.append(t)
                    util.append(AnalysisManager().get("bitops", gm).total / target)
            sec.rows.append(Row(sec.name, f"{name} uniform-{b} budget ({target / 1e9:.3f} "
                                          "GBitOPs): pass run", times))
            sec.notes.append(f"{name} b={b}: result/target = {min(util):.5f}..{max(util):.5f} "
                             f"(must be in [0.99, 1]); max {max(times):.3f} s (< 2 s)")
    gm = _annotated("resnet18", 3, cfg.seed)
    PassManager.parse("graph(annotate-bitwidths{weight-bits=3 act-bits=3 first-last-bits=8 "
                      "granularity=kernel})", assume=gm).run(gm)
    target = AnalysisManager().get("bitops", gm).total
    pm = PassManager.parse(f"graph(solve-bitwidths{{target-bitops={target / 1e9!r} "
                           f"granularity=kernel}})", assume=gm)
    times = []
    for i in range(cfg.warmup + cfg.repeat):
        with PassContext(verify_each=False) as ctx:
            t, _ = timed(lambda: pm.run(gm, ctx))
        if i >= cfg.warmup:
            times.append(t)
    sec.rows.append(Row(sec.name, "resnet18 uniform-3 budget, kernel-wise (4736 items): pass "
                                  "run", times))
    sec.notes.append(f"resnet18 kernel-wise: result/target = "
                     f"{AnalysisManager().get('bitops', gm).total / target:.5f}")
    sec.notes.append(f"{cfg.repeat} runs (+{cfg.warmup} warm-up) each, verify-each off (the "
                     f"pass itself), torch {torch.__version__}, {torch.get_num_threads()} threads")
    return sec


@benchmark("search-mixquant", "ResNet-50: search-mixquant{qem=5} (7 candidates, 25.5M weights); "
                              "target < 1 s")
def bench_search_mixquant(cfg: argparse.Namespace) -> Section:
    sec = Section("search-mixquant")
    gm = _annotated("resnet50", 8, cfg.seed)
    for qem in (5.0, 100.0):
        pm = PassManager.parse(f"graph(search-mixquant{{qem={qem}}})", assume=gm)
        times = []
        for i in range(cfg.warmup + cfg.repeat):
            with PassContext(verify_each=False) as ctx:
                t, _ = timed(lambda: pm.run(gm, ctx))
            if i >= cfg.warmup:
                times.append(t)
        sec.rows.append(Row(sec.name, f"resnet50 qem={qem}: pass run", times))
    sec.notes.append(f"{cfg.repeat} runs (+{cfg.warmup} warm-up), verify-each off, "
                     f"{torch.get_num_threads()} threads")
    return sec


# ---------------------------------------------------------------------------------------------
# Bit-split PTQ (issue 9): ptq-bitsplit of ResNet-18 at W4, 256 calibration images; target < 5 min


@benchmark("ptq-bitsplit", "ResNet-18 (random weights): ptq-bitsplit{w-bits=4} with 256 random "
                           "224x224 calibration images (rows=4096, iters=10); target < 300 s")
def bench_ptq_bitsplit(cfg: argparse.Namespace) -> Section:
    from tools.ptq_compare import bench as bitsplit_bench
    sec = Section("ptq-bitsplit", ratio_label="")
    args = argparse.Namespace(seed=cfg.seed, bench_size=224, bench_iters=10, bench_rows=4096)
    res = bitsplit_bench(args)  # one run: minutes, not repeated
    sec.rows.append(Row(sec.name, "resnet18 W4, 256 images 224x224: pass run", [res["seconds"]]))
    sec.notes.append(f"mean per-layer relative output error: RTN best-MSE clip "
                     f"{res['mean_rel_err_rtn_mse']:.4f} -> bit-split "
                     f"{res['mean_rel_err_bitsplit']:.4f}; {torch.get_num_threads()} threads")
    return sec


def _search_step_section(name: str, cfg: argparse.Namespace, runs: dict[str, Callable[[], dict]],
                         note: str) -> Section:
    """A section of search-step times: each run returns {variant: step times}, the fixed-bit
    QAT step ("qat") of the same run is the ratio's base."""
    sec = Section(name, ratio_label="ratio vs QAT step")
    for label, run in runs.items():
        times = run()
        base = statistics.median(times["qat"])
        for variant, ts in times.items():
            sec.rows.append(Row(sec.name, f"{label}: {variant}", ts,
                                ratio=statistics.median(ts) / base))
    sec.notes.append(f"{note}; ResNet-18 batch 8 at 224x224, forward + backward + SGD step, "
                     f"{cfg.repeat} interleaved steps (+1 warm-up), "
                     f"{torch.get_num_threads()} threads")
    return sec


@benchmark("fracbits-step", "FracBits search step vs fixed-bit fake-quant QAT step "
                            "(issue 7 target: <= 1.3x)")
def bench_fracbits_step(cfg: argparse.Namespace) -> Section:
    from tools.bench_fracbits import measure
    return _search_step_section(
        "fracbits-step", cfg,
        {g: (lambda g=g: measure(steps=cfg.repeat, granularity=g)) for g in ("layer", "kernel")},
        "W3A3 DoReFa/PACT QAT vs insert-fracbits (+ BitOPs penalty and λ clamp)")


@benchmark("gmpq-step", "GMPQ search step (attribution loss, double backprop) and EdMIPS-style "
                        "step vs fixed-bit QAT step (issue 8 target: <= 3x)")
def bench_gmpq_step(cfg: argparse.Namespace) -> Section:
    from tools.bench_gmpq import measure
    return _search_step_section(
        "gmpq-step", cfg, {"candidates {2,3,4}": lambda: measure(steps=cfg.repeat)},
        "W4A4 PACT QAT vs insert-gmpq-supernet with search_loss (official-code form)")


# ---------------------------------------------------------------------------------------------
# Integer simulation (issue 5): int-sim reference / fast vs the fake-quant graph, fp32, fbgemm

INT_SIM_PIPELINE = ("graph(canonicalize,fold-batch-norm,annotate-bitwidths{weight-bits=8 "
                    "act-bits=8},insert-fake-quant,calibrate,lower-to-int-sim{backend=fast "
                    "keep-fake-quant=false})")


def torch_ao_int8(model: torch.nn.Module, x: torch.Tensor,
                  cal: list[torch.Tensor]) -> torch.fx.GraphModule:
    """torch.ao FX-mode int8 (fbgemm, x86 qconfig mapping) of a copy of ``model``, calibrated on
    ``cal``: the anchor the int-sim and export benchmarks compare with."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
        with torch.no_grad():
            for c in cal:
                prepared(c)
        return convert_fx(prepared)


def _int_sim_variants(name: str, shape: tuple[int, ...], seed: int,
                      with_reference: bool) -> tuple[dict[str, Any], torch.Tensor, list[str]]:
    import torchvision

    from qpasses.modules.int_sim import set_backend
    from qpasses.modules.int_sim_layers import kernel_table

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(*shape)
    cal = [torch.randn(1, *shape[1:]) for _ in range(2)]
    gm = qpasses.trace(model, (x,))
    head = INT_SIM_PIPELINE.split(",lower-to-int-sim")[0] + ")"
    with PassContext(example_inputs=(x,), calibration_data=cal, verify_each=False):
        PassManager.parse(head).run(gm)
    fq = copy.deepcopy(gm).eval()
    t_lower, _ = timed(lambda: PassManager.parse(
        "graph(lower-to-int-sim{backend=fast keep-fake-quant=false})", assume=gm).run(
            gm, PassContext(example_inputs=(x,), calibration_data=cal, verify_each=False)))
    variants: dict[str, Any] = {"fp32": model, "fake-quant graph (ours)": fq,
                                "int-sim fast": gm}
    if with_reference:
        ref = copy.deepcopy(gm)
        set_backend(ref, "reference")
        variants["int-sim reference"] = ref
    variants["torch.ao convert_fx (fbgemm int8)"] = torch_ao_int8(model, x, cal)
    counts: dict[str, int] = {}
    for r in kernel_table(gm):
        counts[r["cpu_engine"]] = counts.get(r["cpu_engine"], 0) + 1
    stats = get_record(gm, INT_SIM_KEY).stats
    notes = [f"{name} {'x'.join(map(str, shape))}, W8A8 (first/last 8 bits), rounding=gemmlowp; "
             f"lowering took {t_lower:.2f} s; CPU engines per layer: "
             + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
             + f"; {stats['num_float_islands']} float islands"]
    return variants, x, notes


def time_variants(sec: Section, variants: dict[str, Any], x: torch.Tensor,
                   cfg: argparse.Namespace, base: str, slow: set[str] = frozenset()) -> None:
    """Interleaved wall-clock runs (rows) and, in a note, the medians of the process CPU time of
    the same runs: on a shared machine wall time also counts other processes' load, CPU time
    mostly does not (it still counts threads spinning while they wait for a preempted peer)."""
    times: dict[str, list[float]] = {n: [] for n in variants}
    cpu: dict[str, list[float]] = {n: [] for n in variants}
    with torch.no_grad():
        for _ in range(max(cfg.warmup, 1)):       # first call prepares int8 weights
            for m in variants.values():
                m(x)
        for i in range(cfg.repeat):              # interleaved: load changes hit all alike
            for n, m in variants.items():
                if n in slow and i >= 1:
                    continue
                c0 = time.process_time()
                times[n].append(timed(lambda m=m: m(x))[0])
                cpu[n].append(time.process_time() - c0)
    b = statistics.median(times[base])
    for n in variants:
        sec.rows.append(Row(sec.name, n, times[n], ratio=statistics.median(times[n]) / b))
    cb = statistics.median(cpu[base])
    sec.notes.append("process CPU time, median s (ratio vs " + base + "): " + "; ".join(
        f"{n} {statistics.median(v):.4f} ({statistics.median(v) / cb:.2f})"
        for n, v in cpu.items()))


@benchmark("int-sim", "ResNet-18 1x3x224x224 inference: int-sim reference and fast backends vs "
                      "the fake-quant graph, fp32 and torch.ao fbgemm int8 (convert_fx)")
def bench_int_sim(cfg: argparse.Namespace) -> Section:
    sec = Section("int-sim", ratio_label="ratio vs fp32")
    variants, x, notes = _int_sim_variants("resnet18", (1, 3, 224, 224), cfg.seed, True)
    time_variants(sec, variants, x, cfg, "fp32", slow={"int-sim reference"})
    sec.notes += notes
    fq_t = statistics.median(next(r for r in sec.rows if r.what.startswith("fake")).times)
    fast_t = statistics.median(next(r for r in sec.rows if r.what == "int-sim fast").times)
    ref_t = statistics.median(next(r for r in sec.rows if r.what == "int-sim reference").times)
    sec.notes.append(f"int-sim fast / fake-quant = {fast_t / fq_t:.2f}; reference / fast = "
                     f"{ref_t / fast_t:.1f} (reference timed once per repeat cycle at most); "
                     f"{cfg.repeat} interleaved runs, torch {torch.__version__}, "
                     f"{torch.get_num_threads()} threads")
    return sec


@benchmark("int-sim-resnet50", "ResNet-50 batch 8 at 224x224 inference: int-sim fast vs fp32 "
                               "(issue 5 target: <= 1.0x) and torch.ao fbgemm int8")
def bench_int_sim_resnet50(cfg: argparse.Namespace) -> Section:
    sec = Section("int-sim-resnet50", ratio_label="ratio vs fp32")
    import os
    variants, x, notes = _int_sim_variants("resnet50", (8, 3, 224, 224), cfg.seed, False)
    del variants["fake-quant graph (ours)"]
    time_variants(sec, variants, x, cfg, "fp32")
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    sec.notes += notes + [f"{cfg.repeat} interleaved runs, {torch.get_num_threads()} threads, "
                          f"{os.cpu_count()} CPUs, load average {load} (after the runs)"]
    return sec

