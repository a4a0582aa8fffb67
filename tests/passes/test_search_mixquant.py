"""search-mixquant (docs/algorithms.md, "MixQuant"): the noise-model sanity check, the
selection rule, pluggable metrics, and bad options."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import qpasses
from passes_registry import AnalysisManager, PassContext, PassManager
from passes_registry.errors import OptionError, PropertyError
from qpasses.algorithms.mixquant import (quantization_errors, register_qe_metric, select_bits)

from .cost_helpers import annotate, small_net, traced

BITS = (2, 3, 4, 5, 6, 7, 8)


def _noise_model_ratio(b: int, ref: int = 8, power: int = 2) -> float:
    return ((2 ** ref - 1) / (2 ** b - 1)) ** power


def test_analytical_sanity_check_section_4_2():
    """Uniformly distributed weights follow the uniform-rounding-noise model: QE_b / QE_8 is
    ((2^8-1)/(2^b-1))^2 for MSE (4.03, 16.4, 67.7, 289, 1327, 7225) and ~255/(2^b-1) for the
    mean absolute error (2.0, 4.05, 8.2, 17, 36, 85), for every layer."""
    torch.manual_seed(0)
    for shape in [(64, 64, 3, 3), (1000, 512)]:
        w = torch.rand(*shape) * 2 - 1
        mse = quantization_errors(w, BITS, "mse")
        mae = quantization_errors(w, BITS, "mae")
        for j, b in enumerate(BITS[:-1]):
            assert mse[j] / mse[-1] == pytest.approx(_noise_model_ratio(b), rel=0.05), b
            assert mae[j] / mae[-1] == pytest.approx(_noise_model_ratio(b, power=1), rel=0.05), b
    # the noise-model table from the formula: (255/63)^2 = 16.38, (255/31)^2 = 67.66
    assert [round(_noise_model_ratio(b), 2) for b in (7, 6, 5)] == [4.03, 16.38, 67.66]
    assert [round(_noise_model_ratio(b)) for b in (4, 3, 2)] == [289, 1327, 7225]
    assert [round(_noise_model_ratio(b, power=1), 2) for b in (7, 6, 5, 4, 3, 2)] == \
        [2.01, 4.05, 8.23, 17.0, 36.43, 85.0]


def test_heavy_tailed_layers_get_fewer_bits():
    """Where the noise model breaks (mass collapsed near zero, a few outliers) the ratio is
    smaller, so the same QEM gives fewer bits."""
    torch.manual_seed(1)
    uniform = torch.rand(256, 256) * 2 - 1
    heavy = torch.distributions.StudentT(1.5).sample((256, 256))
    for qem, want_uniform in ((20.0, 6), (100.0, 5), (500.0, 4)):
        e_u = quantization_errors(uniform, BITS).tolist()
        e_h = quantization_errors(heavy, BITS).tolist()
        b_u = select_bits(e_u, BITS, e_u[-1], qem)
        b_h = select_bits(e_h, BITS, e_h[-1], qem)
        assert b_u == want_uniform, (qem, b_u)
        assert b_h < b_u, (qem, b_h, b_u)


def test_selection_rule_and_edge_cases():
    assert select_bits([9.0, 4.0, 1.0], (2, 4, 8), 1.0, 4.0) == 4
    assert select_bits([9.0, 4.0, 1.0], (2, 4, 8), 1.0, 9.0) == 2
    assert select_bits([9.0, 4.0, 1.0], (2, 4, 8), 1.0, 1.0) == 8
    # reference error of a width that is not a candidate: nothing qualifies -> most accurate
    assert select_bits([9.0, 4.0], (2, 4), 0.5, 1.0) == 4
    # constant tensors have zero error at every width -> the smallest candidate
    qe = quantization_errors(torch.full((4, 9), 0.37), BITS)
    assert float(qe.abs().max()) < 1e-12
    assert select_bits(qe.tolist(), BITS, float(qe[-1]), 1.0) == 2


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_pass_writes_layer_bits_and_keeps_activations():
    torch.manual_seed(2)
    model = TwoLayers()
    with torch.no_grad():
        model.a.weight.uniform_(-1, 1)
        model.b.weight.copy_(torch.distributions.StudentT(1.5).sample((64, 64)))
        model.c.weight.uniform_(-1, 1)
    gm = qpasses.trace(model, torch.randn(2, 64))
    annotate(gm, "annotate-bitwidths{weight-bits=8 act-bits=6}")
    acts = {r.name: r.a_bits for r in AnalysisManager().get("bitops", gm).rows}
    buf = io.StringIO()
    with PassContext(statistics=True, print_stream=buf):
        PassManager.parse("graph(search-mixquant{qem=20})", assume=gm).run(gm)
    rows = {r.name: r for r in AnalysisManager().get("bitops", gm).rows}
    assert rows["a"].w_bits == 6 and rows["c"].w_bits == 6 and rows["b"].w_bits < 6
    assert {r.name: r.a_bits for r in rows.values()} == acts     # weight-only search
    assert "num_layers" in buf.getvalue()
    # pinned first/last keep their annotation
    annotate(gm, "annotate-bitwidths{weight-bits=8 act-bits=6}")
    PassManager.parse("graph(search-mixquant{qem=20 pin-first-last=true})", assume=gm).run(gm)
    rows = {r.name: r for r in AnalysisManager().get("bitops", gm).rows}
    assert rows["a"].w_bits == 8 and rows["c"].w_bits == 8 and rows["b"].w_bits < 6


def test_pluggable_metric():
    register_qe_metric("test-max-abs", lambda w, w_hat: float((w - w_hat).abs().max()))
    w = torch.rand(32, 32) * 2 - 1
    qe = quantization_errors(w, BITS, "test-max-abs")
    # max |error| is half a step: ratio ~ 255/(2^b-1)
    assert float(qe[0] / qe[-1]) == pytest.approx(255 / 3, rel=0.05)
    gm = annotate(small_net())
    PassManager.parse("graph(search-mixquant{qem=3 metric=test-max-abs})", assume=gm).run(gm)
    assert {r.w_bits for r in AnalysisManager().get("bitops", gm).rows} <= set(BITS)


def test_random_init_resnet_follows_the_noise_model():
    gm = annotate(traced("resnet18", 32), "annotate-bitwidths{weight-bits=8 act-bits=8}")
    PassManager.parse("graph(search-mixquant{qem=5})", assume=gm).run(gm)
    # random-init (uniform Kaiming) weights follow the noise model: 7 bits (4.03 <= 5 < 16.4)
    assert {r.w_bits for r in AnalysisManager().get("bitops", gm).rows} == {7}


@pytest.mark.parametrize("options,match", [
    ("", "qem.*required"),
    ("qem=0.5", ">= 1"),
    ("qem=nan", "nan"),
    ("qem=2 candidates=[0,4]", "only a candidate"),
    ("qem=2 candidates=[2,40]", "out of range"),
    ("qem=2 metric=msee", "did you mean .mse."),
    ("qem=2 reference-bits=0", "reference-bits"),
    ("qem=2 scheme=dorefa", "scheme"),
])
def test_bad_options(options, match):
    with pytest.raises(OptionError, match=match):
        PassManager.parse(f"graph(search-mixquant{{{options}}})", assume={"bits-annotated"})


def test_requires_annotations():
    with pytest.raises(PropertyError, match="annotate-bitwidths"):
        PassManager.parse("graph(search-mixquant{qem=2})", assume=())
