"""The ``verify-int-sim`` section of ``python -m tools.bench`` (importing this registers it).

Issue 16's target for the checker: ``verify-int-sim`` costs at most a few (<= 5) times one int-sim
forward. For each model (``--model``, default maxvit_t and resnet50: seeded random weights from
``tools.zoo_models.build``, or a ``module:function`` spec; ``--image-size``, ``--batch`` images):
``canonicalize,fold-batch-norm,dce,annotate-bitwidths{weight-bits=4 act-bits=8 first-last-bits=8},
insert-fake-quant{weight-scheme=symmetric per-channel=true},calibrate,lower-to-int-sim``
calibrated on the batch, then, interleaved ``--repeat`` times: one no_grad forward of the lowered
graph, ``graph(verify-int-sim{samples=<batch>})`` on it (the bit-exact oracle check,
ranges/accumulators and the deviation from the kept fake-quant graph) and the same with
``deviation=false`` (the checks alone). Rows: wall seconds and
the ratio to the forward; the notes give the process CPU time of the same runs (1 thread: use
``--threads 1``).

    python -m tools.bench --only verify-int-sim --threads 1 --batch 2 --repeat 3
    python -m tools.bench --only verify-int-sim --threads 1 --batch 2 --model maxvit_t
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from tools.bench_harness import Row, Section, benchmark

LOWER = ("graph(canonicalize,fold-batch-norm,dce,annotate-bitwidths{weight-bits=4 act-bits=8 "
         "first-last-bits=8},insert-fake-quant{weight-scheme=symmetric per-channel=true},"
         "calibrate,lower-to-int-sim)")
VERIFY_MODELS = ("maxvit_t", "resnet50")


def lowered(name: str, seed: int, size: int, batch: int) -> tuple[torch.fx.GraphModule,
                                                                   torch.Tensor]:
    """``name`` from the zoo, lowered by :data:`LOWER` (calibrated on its input batch)."""
    import torchvision

    import qpasses
    from passes_registry import PassContext, PassManager
    from qpasses.cli import load_model
    from tools.zoo_models import build

    if name in torchvision.models.list_models():
        model, x = build(name, seed=seed, size=size, batch=batch)
    else:                                        # a module:function spec (qpasses.cli)
        model, _ = load_model(name, seed=seed)
        model.eval()
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    gm = qpasses.trace(model, (x,))
    with warnings.catch_warnings(), PassContext(example_inputs=(x,), calibration_data=[x],
                                                verify_each=False):
        warnings.simplefilter("ignore")
        PassManager.parse(LOWER).run(gm)
    return gm, x


def verify_once(gm: torch.fx.GraphModule, x: torch.Tensor, options: str = "") -> dict:
    """Run ``verify-int-sim{samples=<batch> options}`` once; its stats."""
    from passes_registry import PassContext, PassManager, get_record
    from qpasses.ir.records import INT_SIM_KEY

    pipe = PassManager.parse(f"graph(verify-int-sim{{samples={x.shape[0]} {options}}})",
                             assume=gm)
    with PassContext(example_inputs=(x,), calibration_data=[x], verify_each=False):
        pipe.run(gm)
    return dict(get_record(gm, INT_SIM_KEY).verify or {})


def measure(gm: torch.fx.GraphModule, x: torch.Tensor,
            repeat: int) -> dict[str, tuple[list[float], list[float]]]:
    """Interleaved runs: ``{"forward" | "verify" | "checks only": (wall, cpu)}`` seconds (checks
    only: ``deviation=false``)."""
    out: dict[str, tuple[list[float], list[float]]] = {
        "forward": ([], []), "verify": ([], []), "checks only": ([], [])}

    def fwd() -> None:
        with torch.no_grad():
            gm(x)

    runs = {"forward": fwd, "verify": lambda: verify_once(gm, x),
            "checks only": lambda: verify_once(gm, x, "deviation=false")}
    fwd()                                          # warm-up (fast kernels' prepared weights)
    for _ in range(repeat):
        for k, fn in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            out[k][0].append(time.perf_counter() - t0)
            out[k][1].append(time.process_time() - c0)
    return out


@benchmark("verify-int-sim", "verify-int-sim (bit-exact oracle + deviation) vs one int-sim "
                             "forward of the lowered graph (W4A8), maxvit_t and resnet50")
def bench_verify(cfg: argparse.Namespace) -> Section:
    sec = Section("verify-int-sim", ratio_label="ratio vs one forward")
    names = list(cfg.model or VERIFY_MODELS)
    for name in names:
        gm, x = lowered(name, cfg.seed, cfg.image_size, cfg.batch)
        res = measure(gm, x, max(cfg.repeat, 1))
        fw, fc = statistics.median(res["forward"][0]), statistics.median(res["forward"][1])
        vw, vc = statistics.median(res["verify"][0]), statistics.median(res["verify"][1])
        sec.rows.append(Row(sec.name, f"{name} int-sim forward", res["forward"][0], ratio=1.0))
        sec.rows.append(Row(sec.name, f"{name} verify-int-sim", res["verify"][0],
                            ratio=vw / fw))
        cw, cc = (statistics.median(v) for v in res["checks only"])
        sec.rows.append(Row(sec.name, f"{name} verify-int-sim{{deviation=false}}",
                            res["checks only"][0], ratio=cw / fw))
        sec.notes.append(f"{name} {'x'.join(map(str, x.shape))}: process CPU median forward "
                         f"{fc:.3f} s, verify {vc:.3f} s (ratio {vc / fc:.2f}), deviation=false "
                         f"{cc:.3f} s (ratio {cc / fc:.2f})")
    sec.notes.append(f"{cfg.repeat} interleaved runs, {torch.get_num_threads()} thread(s), "
                     f"torch {torch.__version__}")
    return sec

