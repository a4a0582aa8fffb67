"""Real-data accuracy on scikit-learn's digits (the session's fp32 DigitsCNN, tests/conftest.py;
450 held-out images, so one image is 0.22 points):

- ``ptq-int8`` (Distiller range-linear W8A8, BN folded) loses at most 0.5 top-1 points;
- W4A4 fake-quant QAT for a few epochs recovers to within 1.5 points of fp32.

The exact figures are printed (``pytest -s``) and attached as junit properties.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import qpasses
from passes_registry import PassContext, PassManager
from qpasses.modules.fake_quant_layers import fake_quant_modules
from tests.conftest import accuracy


def test_ptq_int8_top1_drop_at_most_half_a_point(digits_cnn, record_property):
    d = digits_cnn
    results = {}
    for clip in ("minmax", "percentile", "mse"):
        gm = qpasses.trace(d.model, d.x_test[:1])
        with PassContext(calibration_data=d.batches(4)):
            PassManager.parse(f"graph(ptq-int8{{clip={clip}}})").run(gm)
        gm.eval()
        results[clip] = accuracy(gm, d.x_test, d.y_test)
    line = (f"digits fp32 {d.fp32_acc:.2f}% (trained in {d.train_seconds:.1f}s); ptq-int8 "
            + ", ".join(f"clip={k}: {v:.2f}%" for k, v in results.items()))
    print("\n" + line)
    record_property("ptq_int8", line)
    assert d.fp32_acc > 95.0
    assert d.fp32_acc - results["minmax"] <= 0.5
    assert all(d.fp32_acc - v <= 0.5 for v in results.values()), results


def test_w4a4_qat_recovers_within_one_and_a_half_points(digits_cnn, record_property):
    d = digits_cnn
    torch.manual_seed(0)
    gm = qpasses.trace(d.model, d.x_test[:1])
    with PassContext(calibration_data=d.batches(4)):
        PassManager.parse(
            "graph(canonicalize,fold-batch-norm,annotate-bitwidths{weight-bits=4 act-bits=4 "
            "first-last-bits=none},insert-fake-quant{weight-scheme=symmetric per-channel=true "
            "act-scheme=pact},calibrate{method=percentile percentile=99.9})").run(gm)
    assert all(m.num_bits == 4 if hasattr(m, "num_bits") else m.bits.max().item() == 4
               for m in fake_quant_modules(gm).values())
    ptq = accuracy(gm.eval(), d.x_test, d.y_test)
    epochs, batch = 5, 64
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, epochs * ((len(d.x_train) + batch - 1) // batch))
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gm.train()
        for _ in range(epochs):
            perm = torch.randperm(len(d.x_train), generator=g)
            for i in range(0, len(perm), batch):
                b = perm[i:i + batch]
                opt.zero_grad()
                F.cross_entropy(gm(d.x_train[b]), d.y_train[b]).backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    qat = accuracy(gm.eval(), d.x_test, d.y_test)
    line = (f"digits fp32 {d.fp32_acc:.2f}%; W4A4 (PACT acts, per-channel weights) after "
            f"calibration {ptq:.2f}%, after {epochs} QAT epochs {qat:.2f}% "
            f"(drop {d.fp32_acc - qat:.2f} points)")
    print("\n" + line)
    record_property("w4a4_qat", line)
    assert d.fp32_acc - qat <= 1.5
