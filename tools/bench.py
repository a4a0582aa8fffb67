#!/usr/bin/env python3
"""Benchmarks: a list of named sections, each timing something N times and reporting medians.

    python -m tools.bench                                 # every section
    python -m tools.bench --only ptq-flow --repeat 5 --json bench.json
    python -m tools.bench --only ptq-flow --image-size 32 --batch 2 --repeat 1   # a quick check
    python -m tools.bench --list

Sections live in tools/bench_sections.py and tools/bench_flow.py and register with
``tools.bench_harness.benchmark``; each takes the parsed config and returns a ``Section`` (rows of
measurements plus notes).

Section ``ptq-flow`` (issue 16's target: <= 0.5x torch.ao): the *whole* post-training flow on
torchvision ResNet-50 and MobileNetV2 (random init; ``--model`` picks others): ours =
``PassManager.parse`` + ``qpasses.trace`` + ``run`` of ``graph(canonicalize,fold-batch-norm,dce,
annotate-bitwidths{weight-bits=8 act-bits=8 first-last-bits=none},insert-fake-quant,calibrate,
lower-to-int-sim)`` (``--pipeline`` overrides), with a per-pass breakdown from the ``Timing``
instrument and the peak RSS growth while lowering; torch.ao = FX-mode ``prepare_fx``
(``get_default_qconfig_mapping("x86")``) + the same calibration forward passes on the same
batches + ``convert_fx``. ``--calib-batches`` batches of ``--batch`` images at ``--image-size``
(default one batch of 8 at 224), interleaved runs, 1 thread unless ``--threads``. Reports median
seconds and the ratio ours / torch.ao. (It replaces ``fold-vs-torchao``, which timed only
canonicalize + fold-batch-norm + dce against torch.ao's whole prepare + convert.)

Section ``lowering-memory`` (issue 16's memory target: peak <= 2x(fp32 weights + activations)):
``lower-to-int-sim`` of ViT-H/14 and RegNetY-128GF (random weights, tiny inputs), each in a
subprocess under a 12 GiB ``RLIMIT_DATA`` cap (``RLIMIT_AS`` or none where that stops torch's
import; the notes say which), reporting the lowering's seconds and peak RSS growth against
``2 x (fp32 weights + one batch's activations)``; ``--mem-model`` / ``--mem-cap-gib`` override.
Minutes per model: run it alone. The ``ptq-flow`` notes carry the same peak figure for ResNet-50
and MobileNetV2.

Section ``int-sim-vit`` (issue 14): ViT-B/16 at 224x224 (random weights; ``--batch``), W8A8, lowered
to the whole-model integer graph (attention, softmax, LayerNorm in integers): lowering seconds,
float islands, integer MAC share, and int-sim fast inference vs fp32 and the fake-quant graph.
``python -m tools.bench --only int-sim-vit --repeat 3 --threads 1 --batch 2``.

Section ``verify-int-sim`` (issue 16: checking costs <= 5x one int-sim forward): maxvit_t and
resnet50 (``--model`` picks others) at ``--image-size`` with ``--batch`` images, W4A8 lowered, then
``verify-int-sim{samples=<batch>}`` vs one no_grad forward of the integer graph, interleaved.
``python -m tools.bench --only verify-int-sim --threads 1 --batch 2 --repeat 5``.

Section ``qat-step`` (issue 3's target: <= 1.15x fp32): one SGD training step of torchvision
ResNet-18 (random init, batch 8x3x224x224) for fp32, the BN-folded fp32 graph, the fake-quant graph
(ours, W8A8 and W4A4, calibrated; and W8A8 with activation observers on every step) and torch.ao
``prepare_qat_fx``, interleaved in one process; then eval-mode inference of the same graphs (the
fake-quant inference overhead). ``python -m tools.bench --only qat-step --repeat 5``.

Section ``qat-step-emulation`` (issue 17's target: <= 1.25x fp32): one SGD step of ResNet-18
(batch 8x3x224x224, as ``qat-step``) for fp32, the W4A8 fake-quant graph and the same graph after
``emulate-int-sim``, interleaved, wall and process CPU time.
``python -m tools.bench --only qat-step-emulation --repeat 5 --threads 1``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence

import torch

import tools.bench_sections  # noqa: F401  (registers its sections)
import tools.bench_ort  # noqa: F401  (registers its section)
import tools.bench_lowering  # noqa: F401  (registers its section)
import tools.bench_vit  # noqa: F401  (registers its section)
import tools.bench_verify  # noqa: F401  (registers its section)
from passes_registry import PassesError
from tools.bench_flow import PTQ_MODELS, PTQ_PIPELINE
from tools.bench_harness import BENCHMARKS, format_sections, run_sections


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description="qpasses benchmarks")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this section")
    p.add_argument("--list", action="store_true", help="list the sections")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per measure (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs")
    p.add_argument("--model", action="append", metavar="SPEC",
                   help=f"ptq-flow: model(s) to run (default {', '.join(PTQ_MODELS)})")
    p.add_argument("--image-size", type=int, default=224,
                   help="ptq-flow, ort-int8, int-sim-vit: image height and width")
    p.add_argument("--batch", type=int, default=8,
                   help="ptq-flow: images per calibration batch; ort-int8, int-sim-vit: batch")
    p.add_argument("--calib-batches", type=int, default=1, help="ptq-flow: calibration batches")
    p.add_argument("--pipeline", default=None,
                   help=f"ptq-flow: our pipeline (default {PTQ_PIPELINE})")
    p.add_argument("--mem-model", action="append", metavar="NAME",
                   help="lowering-memory: torchvision model(s) to lower (default vit_h_14, "
                        "regnet_y_128gf)")
    p.add_argument("--mem-cap-gib", type=float, default=12.0,
                   help="lowering-memory: memory cap of the child process in GiB")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write results as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    cfg = make_parser().parse_args(argv)
    if cfg.list:
        for name, (desc, _) in BENCHMARKS.items():
            print(f"{name}: {desc}")
        return 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        sections = run_sections(cfg)
    except PassesError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    print(format_sections(sections))
    if cfg.json:
        data = {"env": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine()},
                "sections": [{"name": s.name, "skipped": s.skipped, "notes": s.notes,
                              "rows": [r.as_dict() for r in s.rows]} for s in sections]}
        with open(cfg.json, "w") as f:
            json.dump(data, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
