"""The ``ptq-flow`` section of ``python -m tools.bench`` (importing this module registers it).

Times the *whole* post-training quantization flow against torch.ao's *whole* flow (issue 16):

- ours: ``PassManager.parse`` + ``qpasses.trace`` (deep copy, FX trace, shape propagation) +
  ``run`` of :data:`PTQ_PIPELINE` (canonicalize, fold-batch-norm, dce, W8A8 annotation,
  fake-quant insertion, calibration, lowering to the integer simulation), verify-each off (torch.ao
  verifies nothing either), with a per-pass breakdown from the pass manager's ``Timing``
  instrument and the peak resident-memory growth while ``lower-to-int-sim`` runs (that
  measurement's own ``gc`` + ``malloc_trim`` before the lowering is left out of the times);
- torch.ao: FX-mode ``prepare_fx`` (x86 qconfig mapping) + the same calibration forward passes on
  the same batches + ``convert_fx``; the deep copy that keeps the caller's model intact
  (``prepare_fx`` fuses the caller's modules in place) is shown but not counted in its total.

A reference row times the float model's own forward on the calibration batches, as given (not in
any total): what ``calibrate`` would cost without its layout choices; it runs the same batches
through the BN-folded graph with its observers, channels-last with direct oneDNN convolutions
where the graph allows.

Both run on the same model, in the same process, interleaved (one ours, one torch.ao, per
repeat), with one thread unless ``--threads`` says otherwise. Defaults: torchvision ResNet-50 and
MobileNetV2 (random init), one calibration batch of 8 at 224x224, example input = its first image.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import resource
import statistics
import sys
import time
import warnings
from typing import Any

import torch

import qpasses
from passes_registry import PassContext, PassManager, PassesError
from passes_registry.instrument import Instrument, Timing
from qpasses.cli import load_model
from qpasses.errors import InputError
from tools.bench_harness import Row, Section, benchmark, timed

PTQ_PIPELINE = ("graph(canonicalize,fold-batch-norm,dce,annotate-bitwidths{weight-bits=8 "
                "act-bits=8 first-last-bits=none},insert-fake-quant,calibrate,lower-to-int-sim)")
PTQ_MODELS = ("torchvision:resnet50", "torchvision:mobilenet_v2")
LOWERING = "lower-to-int-sim"


def status_kib(field: str) -> int | None:
    """``VmHWM`` / ``VmRSS`` of this process in KiB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux: ``clear_refs`` 5), after handing
    freed heap memory back to the OS (glibc ``malloc_trim``), so that memory an earlier step freed
    but kept resident does not hide the growth that follows."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def named_pipeline_passes(pm: PassManager, name: str) -> frozenset[str]:
    """The leaf passes the named pipeline ``name`` expands to in ``pm`` (empty if absent)."""
    def leaves(elements: Any, inside: bool) -> set[str]:
        out: set[str] = set()
        for e in elements:
            body = getattr(e, "body", None)
            if body is not None:
                out |= leaves(body, inside or getattr(e, "name", None) == name)
            elif inside:
                out.add(e.name)
        return out
    return frozenset(leaves(pm.pipeline.elements, False))


class PeakRSS(Instrument):
    """Peak resident-memory growth (bytes) of the process while the passes ``names`` run (the
    expansion of one named pipeline, which runs as consecutive passes).

    On Linux the high-water mark is reset before the first of them (after ``malloc_trim``), so the
    figure is their own peak above the RSS they started from; elsewhere it is the growth of
    ``ru_maxrss`` (0 when the passes stay under an earlier peak of the process)."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names, self.bytes, self.method = names, None, ""
        self._start: int | None = None
        self.seconds = 0.0     # spent in its own hooks (gc + malloc_trim): not the flow's time

    @property
    def start_bytes(self) -> int | None:
        """The RSS (``VmHWM`` method) or peak RSS the passes started from, in bytes."""
        return None if self._start is None else self._start * 1024

    @staticmethod
    def _maxrss_kib() -> int:
        scale = 1 if sys.platform == "darwin" else 1024   # ru_maxrss: bytes on macOS, else KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale // 1024

    def before_pass(self, p: Any, gm: torch.fx.GraphModule) -> None:
        if p.name not in self.names or self._start is not None:
            return
        t0 = time.perf_counter()
        rss = status_kib("VmRSS") if reset_peak_rss() else None   # RSS after the trim
        self.seconds += time.perf_counter() - t0
        if rss is not None:
            self._start, self.method = rss, "VmHWM - VmRSS at the start, after malloc_trim"
        else:
            self._start, self.method = self._maxrss_kib(), "ru_maxrss growth"

    def after_pass(self, p: Any, gm: torch.fx.GraphModule, result: Any) -> None:
        if p.name not in self.names or self._start is None:
            return
        peak = (status_kib("VmHWM") or self._start) if self.method.startswith("VmHWM") \
            else self._maxrss_kib()
        self.bytes = max(peak - self._start, 0) * 1024


def _ours(model: torch.nn.Module, pipeline: str, example: tuple, cal: list[torch.Tensor]
          ) -> tuple[dict[str, float], int | None, str, torch.fx.GraphModule]:
    """One whole run of our flow: {step: seconds} (trace, then each pass in order, the passes of
    ``lower-to-int-sim`` prefixed by it and summed), the lowering's peak RSS growth and how it was
    measured, and the lowered graph."""
    t_parse, pm = timed(lambda: PassManager.parse(pipeline))
    lowering = named_pipeline_passes(pm, LOWERING)
    timing, peak = Timing(), PeakRSS(lowering)
    t_trace, gm = timed(lambda: qpasses.trace(model, example))
    with PassContext(example_inputs=example, calibration_data=cal, verify_each=False,
                     instruments=(peak, timing)) as ctx:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_run, gm = timed(lambda: pm.run(gm, ctx))
    t_run -= peak.seconds          # the measurement's gc + malloc_trim is not the flow's time
    steps = {"parse": t_parse, "trace (deep copy + fx trace + shape propagation)": t_trace}
    for r in timing.records:
        if r.kind != "pass":
            continue
        if r.name in lowering:
            steps[LOWERING] = steps.get(LOWERING, 0.0) + r.seconds
            key = f"{LOWERING}: {r.name}"
        else:
            key = r.name
        steps[key] = steps.get(key, 0.0) + r.seconds
    steps["pass manager overhead (run - sum of passes)"] = t_run - timing.total()
    steps["total"] = t_parse + t_trace + t_run
    return steps, peak.bytes, peak.method, gm


FLOAT_FORWARD = "forward of the calibration batches as given (reference; not in a total)"


def _float_forward(model: torch.nn.Module, cal: list[torch.Tensor]) -> float:
    """Seconds of the float model's forward passes on the calibration batches (no grad), as given:
    the reference for ``calibrate``, which runs the same batches through the (BN-folded) graph."""
    def run() -> None:
        with torch.no_grad():
            for c in cal:
                model(c)
    return timed(run)[0]


def _torchao(model: torch.nn.Module, example: tuple, cal: list[torch.Tensor]
             ) -> tuple[dict[str, float], torch.nn.Module]:
    """One whole run of torch.ao's FX flow on a copy of ``model``: {step: seconds}, converted."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    qconfig = get_default_qconfig_mapping("x86")
    t_copy, m = timed(lambda: copy.deepcopy(model).eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_prep, prepared = timed(lambda: prepare_fx(m, qconfig, example))

        def calibrate() -> None:
            with torch.no_grad():
                for c in cal:
                    prepared(c)
        t_cal, _ = timed(calibrate)
        t_conv, converted = timed(lambda: convert_fx(prepared))
    return {"deep copy (not in total)": t_copy, "prepare_fx (x86 qconfig mapping)": t_prep,
            "calibration forward": t_cal, "convert_fx": t_conv,
            "total": t_prep + t_cal + t_conv}, converted


def _flow_model(sec: Section, spec: str, pipeline: str, cfg: argparse.Namespace) -> None:
    model, _ = load_model(spec, seed=cfg.seed)
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    size, batch = cfg.image_size, cfg.batch
    cal = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(cfg.calib_batches)]
    example = (cal[0][:1],)
    for _ in range(cfg.warmup):
        _ours(model, pipeline, example, cal)
        _torchao(model, example, cal)
    ours: dict[str, list[float]] = {}
    ao: dict[str, list[float]] = {}
    flt: list[float] = []
    peaks: list[int] = []
    method, gm, converted = "", None, None
    for _ in range(cfg.repeat):                   # interleaved: load changes hit both alike
        steps, peak_b, method, gm = _ours(model, pipeline, example, cal)
        flt.append(_float_forward(model, cal))
        for k, v in steps.items():
            ours.setdefault(k, []).append(v)
        if peak_b is not None:
            peaks.append(peak_b)
        steps, converted = _torchao(model, example, cal)
        for k, v in steps.items():
            ao.setdefault(k, []).append(v)
    name = spec.partition(":")[2] or spec
    ao_total = statistics.median(ao["total"])
    for k, v in ours.items():
        sec.rows.append(Row(sec.name, f"{name} ours: {k}", v,
                            ratio=statistics.median(v) / ao_total if k == "total" else None))
    for k, v in ao.items():
        sec.rows.append(Row(sec.name, f"{name} torch.ao: {k}", v,
                            ratio=1.0 if k == "total" else None))
    sec.rows.append(Row(sec.name, f"{name} float model: {FLOAT_FORWARD}", flt))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    acts = cal[0].numel() * cal[0].element_size()
    peak_txt = (f"{max(peaks) / 2**20:.1f} MiB (max over runs; {method})" if peaks
                else "not measured (the pipeline has no lower-to-int-sim)")
    sec.notes.append(f"{name}: peak RSS growth while lowering {peak_txt}; fp32 weights "
                     f"{weights / 2**20:.1f} MiB, one calibration batch {acts / 2**20:.1f} MiB")
    with torch.no_grad():
        x = cal[0]
        ref = model(x)
        err_ours = (gm(x) - ref).abs().max().item() if gm is not None else float("nan")
        err_ao = (converted(x) - ref).abs().max().item() if converted is not None else float("nan")
    sec.notes.append(f"{name}: max |out - float model| on the calibration batch: ours "
                     f"{err_ours:.3g}, torch.ao {err_ao:.3g}")


@benchmark("ptq-flow", "ResNet-50 and MobileNetV2: whole PTQ flow (trace + canonicalize, fold-"
                       "batch-norm, dce, W8A8, insert-fake-quant, calibrate, lower-to-int-sim) vs "
                       "torch.ao prepare_fx + calibration + convert_fx (issue 16: <= 0.5x)")
def bench_ptq_flow(cfg: argparse.Namespace) -> Section:
    sec = Section("ptq-flow")
    for flag, value in (("--image-size", cfg.image_size), ("--batch", cfg.batch),
                        ("--calib-batches", cfg.calib_batches), ("--repeat", cfg.repeat)):
        if value < 1:
            raise InputError(f"ptq-flow: {flag} must be >= 1, got {value}")
    pipeline = cfg.pipeline or PTQ_PIPELINE
    try:
        PassManager.parse(pipeline)
    except PassesError as e:
        sec.skipped = f"pipeline does not build: {str(e).splitlines()[0]}"
        return sec
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or 1)
    try:
        for spec in cfg.model or PTQ_MODELS:
            _flow_model(sec, spec, pipeline, cfg)
        sec.notes.append(
            f"pipeline {pipeline}; {cfg.calib_batches} calibration batch(es) of "
            f"{cfg.batch}x3x{cfg.image_size}x{cfg.image_size} (the same tensors for both), example "
            f"input = the first image; {cfg.repeat} interleaved runs (+{cfg.warmup} warm-up), "
            f"verify-each off, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    finally:
        torch.set_num_threads(threads)
    return sec
