"""IntAffine (per-channel affine op with a signed multiplier and an integer bias): the fast backend,
the reference backend and verify-int-sim's independent numpy oracle agree bit for bit under every
rounding contract (negative and zero gains, input and output zero points, per tensor and per channel
on any axis, accumulator-wide inputs), and the result is within the documented bound (at most 1/2 +
2^-6 + 2^-bits·|y| output LSB for the integer contracts) of the exact real affine map."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from qpasses.algorithms.int_sim_reference import ReferenceInterpreter
from qpasses.errors import NumericsError
from qpasses.modules.int_sim_affine import IntAffine
from qpasses.numerics.int_affine import affine_constants, affine_error_bound

CONTRACTS = ["gemmlowp", "single", "float-rne", "hawq"]


def _oracle(mod: IntAffine, q: torch.Tensor) -> np.ndarray:
    """The module's value under verify-int-sim's independent interpreter."""
    root = torch.nn.Module()
    root.aff = mod
    g = torch.fx.Graph()
    x = g.placeholder("q")
    y = g.call_module("aff", (x,))
    g.output(y)
    env = ReferenceInterpreter(torch.fx.GraphModule(root, g)).run(q)
    return env[y.name]


@st.composite
def cases(draw):
    rounding = draw(st.sampled_from(CONTRACTS))
    bits = draw(st.sampled_from([31, 31, 16, 8]))
    c = draw(st.integers(1, 5))
    rank = draw(st.integers(2, 4))
    axis = draw(st.integers(1, rank - 1)) if c > 1 else None
    wide = draw(st.booleans())                   # an accumulator input (per-channel scales)
    if wide:
        in_max = draw(st.integers(1, 2 ** 20))
        z_in, lo, hi = 0, -in_max, in_max
        s_in = [float(np.exp(draw(st.floats(-14, -4)))) for _ in range(c)]
    else:
        lo = draw(st.sampled_from([-128, 0, -8]))
        hi = lo + draw(st.sampled_from([255, 15, 7]))
        z_in = draw(st.integers(lo, hi))
        s_in = [float(np.exp(draw(st.floats(-6, 0))))]
    gain = [draw(st.sampled_from([0.0, 1.0, -1.0])) if draw(st.integers(0, 4)) == 0
            else float(np.exp(draw(st.floats(-4, 3)))) * draw(st.sampled_from([1, -1]))
            for _ in range(c)]
    bias = [draw(st.floats(-3, 3)) for _ in range(c)]
    out_scale = float(np.exp(draw(st.floats(-7, 0))))
    out_lo = draw(st.sampled_from([-128, 0, -32767]))
    out_hi = {-128: 127, 0: 255, -32767: 32767}[out_lo]
    z_out = draw(st.integers(out_lo, out_hi)) if out_lo != -32767 else 0
    shape = [2] * rank
    if axis is not None:
        shape[axis] = c
    seed = draw(st.integers(0, 2 ** 16))
    return dict(rounding=rounding, bits=bits, c=c, axis=axis, s_in=s_in, z_in=z_in, lo=lo, hi=hi,
                gain=gain, bias=bias, out_scale=out_scale, z_out=z_out, out_lo=out_lo,
                out_hi=out_hi, shape=shape, seed=seed)


def _module(p):
    consts = affine_constants(torch.tensor(p["gain"]), torch.tensor(p["bias"]),
                              torch.tensor(p["s_in"]), p["out_scale"],
                              max(p["hi"] - p["z_in"], p["z_in"] - p["lo"]), p["rounding"],
                              p["bits"])
    mod = IntAffine(consts, in_zero_point=p["z_in"], out_zero_point=p["z_out"],
                    qmin=p["out_lo"], qmax=p["out_hi"], rounding=p["rounding"],
                    multiplier_bits=p["bits"], axis=p["axis"])
    return mod, consts


@settings(deadline=None, max_examples=150, derandomize=True)
@given(cases())
def test_fast_reference_oracle_bit_exact(p) -> None:
    try:
        mod, consts = _module(p)
    except NumericsError:
        event("refused: beyond int32")
        return                                   # |A| beyond int32: the lowering keeps it float
    if p["rounding"] == "gemmlowp":
        left = max(0, math.frexp(float(consts.real.max()))[1])
        if (consts.acc_max << left) > 2 ** 31 - 1:
            event("refused: gemmlowp left shift")
            return                               # the lowering refuses it (FloatIsland)
    g = torch.Generator().manual_seed(p["seed"])
    q = torch.randint(p["lo"], p["hi"] + 1, p["shape"], generator=g)
    q.view(-1)[:2] = torch.tensor([p["lo"], p["hi"]])       # the range ends
    ref = mod(q)
    mod.set_backend("fast")
    fast = mod(q.to(torch.int32) if p["hi"] > 127 or p["lo"] < -128 else q.to(torch.int16))
    assert torch.equal(fast.to(torch.int64), ref), p
    assert np.array_equal(_oracle(mod, q), ref.numpy()), p
    # the error vs the exact real map (before the output clamp)
    s = torch.tensor(p["s_in"], dtype=torch.float64)
    view = [1] * q.dim()
    if p["axis"] is not None:
        view[p["axis"]] = p["c"]
    gv = torch.tensor(p["gain"], dtype=torch.float64).reshape(view)
    bv = torch.tensor(p["bias"], dtype=torch.float64).reshape(view)
    exact = (gv * s.reshape(view if s.numel() > 1 else [1] * q.dim()) * (q - p["z_in"]) + bv) \
        / p["out_scale"] + p["z_out"]
    inside = (exact > p["out_lo"] + 1) & (exact < p["out_hi"] - 1)
    err = (ref.double() - exact).abs()[inside]
    bound = affine_error_bound(consts.real, consts.frac_bits, p["bits"],
                               int(exact.abs().max()) + 1, p["rounding"])
    assert err.numel() == 0 or float(err.max()) <= bound + 1e-9, (float(err.max()), bound, p)


def test_error_within_one_lsb_on_codes() -> None:
    """8-bit codes through a BatchNorm-like map onto an 8-bit grid: every output within 1/2 +
    2^-6 LSB of the exact value (measured: the maximum is printed by -s)."""
    g = torch.tensor([1.7, -0.6, 0.0, 3.1])
    b = torch.tensor([0.2, -0.5, 0.4, 0.0])
    q = torch.arange(-128, 128).reshape(1, 1, -1).expand(1, 4, 256).clone()
    worst = 0.0
    for rounding in CONTRACTS:
        c = affine_constants(g, b, torch.tensor([0.02]), 0.05, 128, rounding)
        mod = IntAffine(c, in_zero_point=-3, out_zero_point=0, qmin=-(2 ** 15),
                        qmax=2 ** 15 - 1, rounding=rounding, multiplier_bits=31, axis=1)
        exact = (g.double().reshape(1, 4, 1) * 0.02 * (q + 3) + b.double().reshape(1, 4, 1)) / 0.05
        err = float((mod(q).double() - exact).abs().max())
        worst = max(worst, err)
        assert err <= 0.5 + 2.0 ** -6, (rounding, err)
    print(f"max |int - exact| = {worst:.4f} LSB")


def test_refuses_an_accumulator_beyond_int32() -> None:
    with pytest.raises(NumericsError, match="int32"):
        affine_constants(torch.tensor([1.0]), torch.tensor([1e12]), torch.tensor([1.0]), 1e-3,
                         2 ** 20, "gemmlowp")
