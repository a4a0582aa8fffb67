"""Transformer kernels of the integer simulation (docs/int-sim.md, "Transformer kernels"):
matmul of two integer activations, softmax and LayerNorm. For each: the fast backend equals the
reference backend and the independent numpy oracle bit for bit (shapes, grids, zero points,
dims, every rounding contract), and the error against the float op followed by the same fake
quantizer stays within the documented bound (1 output LSB)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.algorithms.int_sim_reference_transformer import (TRANSFORMER_IMPLS, normalized_ref,
                                                               softmax_probabilities_ref)
from qpasses.errors import NumericsError
from qpasses.modules.int_sim import Requantize
from qpasses.modules.int_sim_transformer import IntLayerNorm, IntMatMul, IntSoftmax
from qpasses.numerics.fixed_point import fbgemm_scale, round_shift
from qpasses.numerics.int_attention import (SOFTMAX_FRAC_BITS, int_matmul_fast,
                                            int_matmul_reference, matmul_bound, matmul_kernel,
                                            softmax_exp_table)
from qpasses.numerics.int_norm import (isqrt, layer_norm_constants, normalized_fast,
                                       normalized_reference, round_shift_fast)

CONTRACTS = ["gemmlowp", "single", "hawq", "float-rne"]
SETTINGS = settings(deadline=None, max_examples=25, derandomize=True)


def _codes(g: torch.Generator, shape, qmin: int, qmax: int) -> torch.Tensor:
    return torch.randint(qmin, qmax + 1, shape, generator=g)


def _run_all(mod, *qs):
    """(fast, reference, oracle) outputs as int64 numpy arrays."""
    outs = []
    for backend in ("fast", "reference"):
        for m in mod.modules():
            if hasattr(m, "set_backend"):
                m.set_backend(backend)
        outs.append(mod(*qs).to(torch.int64).numpy())
    outs.append(np.asarray(TRANSFORMER_IMPLS[type(mod)](mod, *[q.numpy() for q in qs]),
                           dtype=np.int64))
    return outs


def _fake_quant(v: torch.Tensor, s: float, z: int, qmin: int, qmax: int) -> torch.Tensor:
    inv = 1.0 / torch.tensor(s, dtype=torch.float32)
    return (torch.round(v.to(torch.float32) * inv).to(torch.int64) + z).clamp(qmin, qmax)


def _out_grid(draw, signed: bool):
    bits = draw(st.sampled_from([4, 8, 12]))
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


# ------------------------------------------------------------------------------------------------
# matmul


@st.composite
def matmul_cases(draw):
    batch = draw(st.sampled_from([(), (2,), (2, 3), (1, 2)]))
    m, k, n = draw(st.integers(1, 6)), draw(st.integers(1, 40)), draw(st.integers(1, 6))
    a_bits, b_bits = draw(st.sampled_from([4, 8, 12])), draw(st.sampled_from([4, 8]))
    za = draw(st.integers(0, 2 ** a_bits - 1))
    zb = draw(st.integers(0, 2 ** b_bits - 1))
    b_batch = draw(st.sampled_from([batch, batch[1:]]))       # broadcasting
    return dict(a_shape=batch + (m, k), b_shape=b_batch + (k, n), a=(0, 2 ** a_bits - 1, za),
                b=(0, 2 ** b_bits - 1, zb), sa=float(np.exp(draw(st.floats(-6, 0)))),
                sb=float(np.exp(draw(st.floats(-6, 0)))), rounding=draw(st.sampled_from(CONTRACTS)),
                requant=draw(st.booleans()), out=_out_grid(draw, draw(st.booleans())),
                seed=draw(st.integers(0, 2 ** 16)))


@SETTINGS
@given(matmul_cases())
def test_matmul_fast_equals_reference_and_oracle(case):
    g = torch.Generator().manual_seed(case["seed"])
    (a0, a1, za), (b0, b1, zb) = case["a"], case["b"]
    a = _codes(g, case["a_shape"], a0, a1)
    b = _codes(g, case["b_shape"], b0, b1)
    k = case["a_shape"][-1]
    am, bm = max(a1 - za, za - a0), max(b1 - zb, zb - b0)
    rq = None
    sy = None
    if case["requant"]:
        qmin, qmax = case["out"]
        acc = int_matmul_reference(a, b, za, zb).double() * case["sa"] * case["sb"]
        sy = max(float(acc.abs().max()), 1e-3) / max(qmax, 1) * 0.9
        rq = Requantize(case["sa"] * case["sb"] / sy, qmin=qmin, qmax=qmax,
                        rounding=case["rounding"], scale_f32=fbgemm_scale(case["sa"], case["sb"],
                                                                          sy))
        rq.prove(matmul_bound(k, am, bm))
    mod = IntMatMul((case["sa"], za, am), (case["sb"], zb, bm), k, rq)
    fast, ref, oracle = _run_all(mod, a, b)
    np.testing.assert_array_equal(fast, ref)
    np.testing.assert_array_equal(ref, oracle)
    if rq is None:      # the exact accumulator: the float matmul of the centred codes
        want = torch.matmul((a - za).double(), (b - zb).double())
        np.testing.assert_array_equal(ref, want.to(torch.int64).numpy())
    else:               # vs float matmul of the dequantized operands + the same fake quantizer
        xa = (a - za).to(torch.float32) * case["sa"]
        xb = (b - zb).to(torch.float32) * case["sb"]
        fq = _fake_quant(torch.matmul(xa, xb), sy, 0, *case["out"]).numpy()
        assert np.abs(fq - ref).max(initial=0) <= 1


@pytest.mark.parametrize("bound,kernel", [(2 ** 24 - 1, "float32"), (2 ** 24, "float64"),
                                          (2 ** 53 - 1, "float64"), (2 ** 53, "reference")])
def test_matmul_kernel_choice_follows_the_bound(bound, kernel):
    assert matmul_kernel(bound) == kernel


def test_float32_matmul_is_exact_right_below_2_24():
    # K·255·255 just below 2^24: every partial sum is an exact float32 integer
    k = (2 ** 24 - 1) // (255 * 255)
    a = torch.full((3, k), 255)
    b = torch.full((k, 2), 255)
    assert matmul_kernel(matmul_bound(k, 255, 255)) == "float32"
    got = int_matmul_fast(a, b, 0, 0, "float32")
    assert torch.equal(got.to(torch.int64), int_matmul_reference(a, b, 0, 0))


def test_matmul_wider_than_lowered_is_a_typed_error():
    mod = IntMatMul((0.1, 0, 127), (0.1, 0, 127), 4, None)
    with pytest.raises(NumericsError, match="lower the graph again"):
        mod(torch.zeros(1, 8, dtype=torch.int64), torch.zeros(8, 1, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------
# softmax


@st.composite
def softmax_cases(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(1, 7)) for _ in range(ndim))
    dim = draw(st.integers(-ndim, ndim - 1))
    bits = draw(st.sampled_from([4, 8, 12, 16]))
    zp = draw(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    scale = float(np.exp(draw(st.floats(-7, 0)))) * 8.0 / 2 ** (bits / 2)
    out_bits = draw(st.sampled_from([4, 8, 12]))
    return dict(shape=shape, dim=dim, grid=(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, zp),
                scale=scale, out=(out_bits, draw(st.booleans())),
                rounding=draw(st.sampled_from(CONTRACTS)), seed=draw(st.integers(0, 2 ** 16)))


def _softmax_module(case):
    qmin, qmax, zp = case["grid"]
    out_bits, unit = case["out"]
    levels = 2 ** out_bits - 1
    sy = 1.0 / levels if unit else 1.0 / (levels * 0.8)     # [0, 1] or [0, 0.8] (saturates)
    table = softmax_exp_table(case["scale"], qmax - qmin)
    rq = Requantize(2.0 ** -SOFTMAX_FRAC_BITS / sy, qmin=0, qmax=levels,
                    rounding=case["rounding"],
                    scale_f32=torch.tensor(2.0 ** -SOFTMAX_FRAC_BITS / sy, dtype=torch.float32))
    rq.prove(2 ** SOFTMAX_FRAC_BITS)
    return IntSoftmax(case["dim"], table, case["scale"], zp, rq, sy), sy, levels


@SETTINGS
@given(softmax_cases())
def test_softmax_fast_equals_reference_and_oracle_within_one_lsb_of_float(case):
    g = torch.Generator().manual_seed(case["seed"])
    qmin, qmax, zp = case["grid"]
    q = _codes(g, case["shape"], qmin, qmax)
    mod, sy, levels = _softmax_module(case)
    fast, ref, oracle = _run_all(mod, q)
    np.testing.assert_array_equal(fast, ref)
    np.testing.assert_array_equal(ref, oracle)
    # the Q30 probabilities themselves (the output rounding would hide their last bits)
    p_ref = mod.probabilities(q).numpy()               # reference backend (set last)
    mod.set_backend("fast")
    np.testing.assert_array_equal(mod.probabilities(q).numpy(), p_ref)
    np.testing.assert_array_equal(softmax_probabilities_ref(q.numpy(), case["dim"],
                                                            mod.table.numpy(), 30), p_ref)
    x = (q - zp).to(torch.float32) * torch.tensor(case["scale"], dtype=torch.float32)
    fq = _fake_quant(torch.softmax(x, case["dim"]), sy, 0, 0, levels).numpy()
    assert np.abs(fq - ref).max(initial=0) <= 1


def test_softmax_error_vs_float_is_measured_at_most_one_lsb():
    """The documented figure: 8-bit input codes, 8-bit unsigned output (s_y = 1/255), 2000
    random rows of 50 values under each contract."""
    g = torch.Generator().manual_seed(0)
    q = _codes(g, (2000, 50), -128, 127)
    for rounding in CONTRACTS:
        case = dict(grid=(-128, 127, 0), scale=0.05, dim=-1, out=(8, True), rounding=rounding)
        mod, sy, levels = _softmax_module(case)
        y = mod(q).to(torch.int64)
        x = q.to(torch.float32) * torch.tensor(0.05, dtype=torch.float32)
        fq = _fake_quant(torch.softmax(x, -1), sy, 0, 0, levels)
        diff = (fq - y).abs()
        assert int(diff.max()) <= 1, rounding
        assert float((diff != 0).float().mean()) < 1e-3, rounding


def test_softmax_table_is_monotone_and_exact_at_zero():
    t = softmax_exp_table(0.01, 1000)
    assert int(t[0]) == 2 ** SOFTMAX_FRAC_BITS
    assert bool((t[1:] <= t[:-1]).all())
    with pytest.raises(NumericsError, match="span"):
        softmax_exp_table(0.01, 2 ** 16 + 1)


# ------------------------------------------------------------------------------------------------
# layer norm


@st.composite
def layer_norm_cases(draw):
    norm = draw(st.sampled_from([(1,), (3,), (16,), (2, 5), (64,)]))
    lead = draw(st.sampled_from([(), (3,), (2, 3)]))
    bits = draw(st.sampled_from([4, 8, 12, 16]))
    zp = draw(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    return dict(norm=norm, lead=lead, grid=(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, zp),
                scale=float(np.exp(draw(st.floats(-8, 0)))),
                eps=draw(st.sampled_from([1e-5, 1e-6, 1e-2])), affine=draw(st.booleans()),
                out_bits=draw(st.sampled_from([4, 8, 12])), zero_out=draw(st.booleans()),
                constant_rows=draw(st.booleans()),
                rounding=draw(st.sampled_from(CONTRACTS)), seed=draw(st.integers(0, 2 ** 16)))


def _layer_norm_module(case, g):
    qmin, qmax, zp = case["grid"]
    n = math.prod(case["norm"])
    gamma = beta = None
    if case["affine"]:
        gamma = torch.randn(case["norm"], generator=g) * 0.5 + 1.0
        gamma[..., 0] = -0.7 if n > 1 else gamma[..., 0]                # a negative gain
        beta = torch.randn(case["norm"], generator=g) * 0.3
    half = 2 ** (case["out_bits"] - 1)
    amax = (float(gamma.abs().max()) if gamma is not None else 1.0) * 3.0 + \
        (float(beta.abs().max()) if beta is not None else 0.0)
    sy = amax / (half - 1)
    out_zp = 0 if case["zero_out"] else 3
    consts = layer_norm_constants(n, qmax - qmin, max(qmax - zp, zp - qmin), case["scale"],
                                  case["eps"], gamma, beta, sy)
    mod = IntLayerNorm(len(case["norm"]), consts, in_scale=case["scale"], in_zero_point=zp,
                       out_scale=sy, out_zero_point=out_zp, qmin=-half, qmax=half - 1,
                       rounding=case["rounding"], eps=case["eps"])
    return mod, gamma, beta, sy, out_zp


def _float_layer_norm_fq(q, case, gamma, beta, sy, out_zp, half):
    x = (q - case["grid"][2]).to(torch.float32) * torch.tensor(case["scale"], dtype=torch.float32)
    y = F.layer_norm(x.double(), case["norm"], None if gamma is None else gamma.double(),
                     None if beta is None else beta.double(), case["eps"])
    return _fake_quant(y, sy, out_zp, -half, half - 1)


@SETTINGS
@given(layer_norm_cases())
def test_layer_norm_fast_equals_reference_and_oracle_within_one_lsb_of_float(case):
    g = torch.Generator().manual_seed(case["seed"])
    qmin, qmax, zp = case["grid"]
    q = _codes(g, case["lead"] + case["norm"], qmin, qmax)
    if case["constant_rows"]:
        q = q.reshape(-1, math.prod(case["norm"]))[:, :1].expand(
            -1, math.prod(case["norm"])).reshape(q.shape).contiguous()
    mod, gamma, beta, sy, out_zp = _layer_norm_module(case, g)
    fast, ref, oracle = _run_all(mod, q)
    np.testing.assert_array_equal(fast, ref)
    np.testing.assert_array_equal(ref, oracle)
    # the normalized values n_i themselves (the output rounding would hide their last bits)
    x = q.reshape(*case["lead"], -1) - zp
    consts = mod.constants()
    n_ref = normalized_reference(x, consts).numpy()
    np.testing.assert_array_equal(normalized_fast(x, consts).numpy(), n_ref)
    np.testing.assert_array_equal(normalized_ref(x.numpy(), consts.n, consts.frac_bits,
                                                 consts.eps_codes), n_ref)
    half = 2 ** (case["out_bits"] - 1)
    fq = _float_layer_norm_fq(q, case, gamma, beta, sy, out_zp, half).numpy()
    assert np.abs(fq - ref).max(initial=0) <= 1


def test_layer_norm_error_vs_float_is_measured_at_most_one_lsb():
    """The documented figure: 8-bit inputs, N = 768, 400 rows, 8-bit output grid, under each
    contract (the float LayerNorm in float64, then the output fake quantizer)."""
    g = torch.Generator().manual_seed(1)
    for rounding in CONTRACTS:
        case = dict(norm=(768,), grid=(-128, 127, 5), scale=0.03, eps=1e-6, affine=True,
                    out_bits=8, zero_out=False, rounding=rounding)
        q = _codes(g, (400, 768), -128, 127)
        mod, gamma, beta, sy, out_zp = _layer_norm_module(case, g)
        y = mod(q).to(torch.int64)
        fq = _float_layer_norm_fq(q, case, gamma, beta, sy, out_zp, 128)
        diff = (fq - y).abs()
        assert int(diff.max()) <= 1, rounding
        assert float((diff != 0).float().mean()) < 2e-3, rounding


def test_layer_norm_int64_bounds_hold_for_16_bit_inputs_and_vit_h_width():
    """16-bit codes over N = 1280 (ViT-H): the chosen k keeps T = Σc² + N·E below 2^62 even for
    the widest rows (half the codes at each end of the grid), and the result still agrees."""
    n, span = 1280, 2 ** 16 - 1
    c = layer_norm_constants(n, span, 2 ** 15, 1e-3, 1e-6, None, None, 0.05)
    assert n * ((span << c.frac_bits) ** 2 + c.eps_codes) < 2 ** 62
    assert c.frac_bits >= 8
    q = torch.tensor([-(2 ** 15), 2 ** 15 - 1]).repeat(3, n // 2)
    mod = IntLayerNorm(1, c, in_scale=1e-3, in_zero_point=0, out_scale=0.05, out_zero_point=0,
                       qmin=-128, qmax=127, rounding="gemmlowp", eps=1e-6)
    fast, ref, oracle = _run_all(mod, q)
    np.testing.assert_array_equal(fast, ref)
    np.testing.assert_array_equal(ref, oracle)
    assert set(np.unique(ref).tolist()) == {-20, 20}            # ±1/0.05


def test_isqrt_is_exact_near_perfect_squares():
    r = torch.tensor([1, 2 ** 30, 2 ** 31 - 1, 3037000499], dtype=torch.int64)
    x = torch.cat([r * r - 1, r * r, r * r + 1]).clamp(min=0, max=2 ** 62 - 1)
    want = torch.tensor([math.isqrt(int(v)) for v in x])
    assert torch.equal(isqrt(x), want)


@pytest.mark.parametrize("mode", ["rha", "rhu", "rne"])
def test_fast_rounding_shift_equals_round_shift_on_ties(mode):
    v = torch.arange(-40, 41, dtype=torch.int64)
    for r in (0, 1, 2, 3):
        assert torch.equal(round_shift_fast(v, r, mode), round_shift(v, r, mode)), (mode, r)
    big = torch.tensor([2 ** 61 + 2 ** 49, -(2 ** 61) - 2 ** 49, 3 * 2 ** 49, -3 * 2 ** 49])
    assert torch.equal(round_shift_fast(big, 50, mode), round_shift(big, 50, mode))
