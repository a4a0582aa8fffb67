"""The ``int-sim-vit`` section of ``python -m tools.bench`` (importing this registers it).

ViT-B/16 at its real 224x224 size (seeded random weights, ``tools.zoo_models.build``; ``--image-size``
and ``--batch`` override, a multiple of 16 for the size):
W8A8 ``ptq-int8`` calibrated on the batch, then ``lower-to-int-sim`` (fast backend, timed), and
inference of the fp32 model, our fake-quant graph and the integer graph, interleaved. The
integer graph is the whole model: decomposed attention (q/k/v/out projections, Q·Kᵀ and
attention·V as integer matmuls), integer softmax and LayerNorm, GELU tables; the notes give its
float-island count (0 expected) and the share of MACs in integer layers.

    python -m tools.bench --only int-sim-vit --repeat 3 --threads 1 --batch 2
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from tools.bench_harness import Section, benchmark

PIPELINE = "graph(ptq-int8)"


@benchmark("int-sim-vit", "ViT-B/16 at 224x224 (random weights): lowering of the whole "
                          "transformer to integers, and int-sim fast inference vs fp32")
def bench_int_sim_vit(cfg: argparse.Namespace) -> Section:
    import warnings

    import qpasses
    from passes_registry import PassContext, PassManager
    from qpasses.report import report
    from tools.bench_sections import time_variants
    from tools.zoo_models import build

    sec = Section("int-sim-vit", ratio_label="ratio vs fp32")
    model, x = build("vit_b_16", cfg.seed, size=cfg.image_size, batch=cfg.batch)
    gm = qpasses.trace(model, (x,))
    with warnings.catch_warnings(), PassContext(example_inputs=(x,), calibration_data=[x],
                                                verify_each=False):
        warnings.simplefilter("ignore")
        PassManager.parse(PIPELINE).run(gm)
        fq = copy.deepcopy(gm).eval()
        t0 = time.perf_counter()
        PassManager.parse("graph(lower-to-int-sim{keep-fake-quant=false})", assume=gm).run(gm)
        t_lower = time.perf_counter() - t0
    rep = report(gm)
    totals = rep["totals"]
    time_variants(sec, {"fp32": model, "fake-quant graph (ours)": fq, "int-sim fast": gm}, x,
                  cfg, "fp32")
    sec.notes.append(
        f"vit_b_16 {'x'.join(map(str, x.shape))}, W8A8 (ptq-int8, gemmlowp); lower-to-int-sim took "
        f"{t_lower:.2f} s; {len(rep['float_islands'])} float islands; "
        f"{100.0 * totals['int_macs'] / totals['macs']:.1f}% of {totals['macs'] / 1e9:.2f} GMACs "
        f"per image in integer layers; {torch.get_num_threads()} threads")
    return sec
