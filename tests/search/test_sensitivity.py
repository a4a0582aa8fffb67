"""Sensitivities for bit allocation: the vectorized quantization-error kernel equals explicit
round trips; Hutchinson traces are exact where the Hessian is diagonal."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qpasses
from passes_registry import PassContext
from qpasses.errors import NumericsError
from qpasses.ir.layers import quantizable_layers
from qpasses.numerics import quantizers as Q
from qpasses.algorithms.sensitivity import (SensitivityError, hutchinson_traces,
                                            register_sensitivity, sensitivity_names,
                                            weight_quant_errors)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 40),
       scheme=st.sampled_from(["symmetric", "asymmetric", "asymmetric_signed", "unsigned"]),
       per_channel=st.booleans(), narrow=st.booleans(),
       bits=st.lists(st.integers(0, 16), min_size=1, max_size=5, unique=True),
       seed=st.integers(0, 1000), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_error_kernel_equals_explicit_round_trip(rows, cols, scheme, per_channel, narrow, bits,
                                                 seed, scale):
    narrow = narrow and scheme in ("symmetric", "asymmetric_signed")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    if scheme == "unsigned":
        w = w.abs()
    got = weight_quant_errors(w, bits, scheme=scheme, narrow=narrow, per_channel=per_channel,
                              reductions=("sse", "sae"))
    for j, b in enumerate(bits):
        s, z = Q.minmax_qparams(w, b, scheme, axis=0 if per_channel else None, narrow=narrow)
        w_hat = Q.quantize_dequantize(w.double(), s, z, b, scheme, narrow=narrow, axis=0)
        d = (w_hat - w.double()).reshape(rows, -1)
        step2 = (s.double() ** 2).expand(rows) if s.numel() == 1 else s.double() ** 2
        # Equal up to float32 rounding of t = x/s (as the fake-quant path computes it): |t| <=
        # 2^(b-1) steps, so each error term is off by at most eps_t = 2^(b-1)·2.4e-7 steps; and
        # round-off below 1e-4 steps per weight is reported as 0.
        eps_t = (2 ** max(b - 1, 0) * 2.4e-7 if b <= 10 else 1e-9) + 1e-4
        tol = 1e-6 * d.pow(2).sum(1) + cols * eps_t * step2
        assert torch.all((got["sse"][:, j] - d.pow(2).sum(1)).abs() <= tol + 1e-12), (b, j)
        tol_a = 1e-6 * d.abs().sum(1) + cols * eps_t * step2.sqrt()
        assert torch.all((got["sae"][:, j] - d.abs().sum(1)).abs() <= tol_a + 1e-12), (b, j)


def test_error_kernel_bad_input():
    with pytest.raises(NumericsError):
        weight_quant_errors(torch.randn(3, 3), [4], reductions=("max",))
    with pytest.raises(NumericsError):
        weight_quant_errors(torch.randn(0), [4])
    with pytest.raises(NumericsError):
        weight_quant_errors(torch.randn(3, 3), [40])


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.fc(x)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # loss = 0.5·||W x||² with x = c·e_2: the Hessian block of row i is c² e_2 e_2ᵀ, whose
    # Hutchinson estimate v_2²·c² = c² is exact for every Rademacher probe.
    gm = qpasses.trace(OneLinear(), torch.randn(1, 5))
    x = torch.zeros(1, 5)
    x[0, 2] = 3.0
    ctx = PassContext(example_inputs=(x,),
                      config={"loss": lambda out, batch: 0.5 * out.pow(2).sum()})
    (tr,) = hutchinson_traces(gm, quantizable_layers(gm), ctx, probes=3)
    assert torch.allclose(tr, torch.full((3,), 9.0, dtype=torch.float64))
    with pytest.raises(SensitivityError, match="needs data"):
        hutchinson_traces(gm, quantizable_layers(gm), PassContext())
    with pytest.raises(SensitivityError, match="scalar"):
        hutchinson_traces(gm, quantizable_layers(gm), PassContext(
            example_inputs=(x,), config={"loss": lambda out, batch: out}))


def test_custom_sensitivity_is_pluggable():
    register_sensitivity("test-uniform", lambda req: [
        torch.tensor([[float(8 - b) for b in req.candidates]]).expand(
            info.out_channels if req.granularity == "kernel" else 1, -1)
        for info in req.layers])
    assert "test-uniform" in sensitivity_names()
