"""Cost formulas: MACs/BitOPs/size against FracBits' reference table (docs/algorithms.md, "FracBits"),
differentiability in fractional bits, and accumulator-width soundness and tightness."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.errors import NumericsError
from qpasses.numerics.costs import (acc_bits_data, acc_bits_distiller, acc_bits_worst_case,
                                    acc_range_data, acc_range_worst_case, bits_to_bytes,
                                    bits_to_mb, int_range, kernel_macs, kernel_macs_pruned,
                                    kernel_params, layer_bitops, layer_macs, layer_macs_pruned,
                                    layer_size_bits, signed_width, to_giga)

HYP = settings(max_examples=50, deadline=None)


# ------------------------------------------------------------------------------------------
# Layer shape lists for the models of FracBits' reference numbers
# ------------------------------------------------------------------------------------------

def _torchvision_layers(name: str) -> list[dict]:
    """(c_in, c_out, groups, kernel, out_spatial, has_bias) of every conv/linear, in order,
    read from the torchvision model with forward hooks on a 224×224 input."""
    model = getattr(torchvision.models, name)().eval()
    layers: list[dict] = []

    def hook(mod: torch.nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, torch.nn.Conv2d):
            layers.append(dict(c_in=mod.in_channels, c_out=mod.out_channels, groups=mod.groups,
                               kernel=tuple(mod.kernel_size), out_spatial=tuple(out.shape[2:]),
                               bias=mod.bias is not None))
        elif isinstance(mod, torch.nn.Linear):
            layers.append(dict(c_in=mod.in_features, c_out=mod.out_features, groups=1,
                               kernel=(), out_spatial=(), bias=mod.bias is not None))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in handles:
        h.remove()
    return layers


def _mobilenet_v1_layers() -> list[dict]:
    """MobileNetV1 1.0 (not in torchvision), written out: stem, 13 dw/pw blocks, FC."""
    layers = [dict(c_in=3, c_out=32, groups=1, kernel=(3, 3), out_spatial=(112, 112), bias=False)]
    blocks = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
              (256, 512, 2)] + [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
    hw = 112
    for c_in, c_out, stride in blocks:
        hw //= stride
        layers.append(dict(c_in=c_in, c_out=c_in, groups=c_in, kernel=(3, 3),
                           out_spatial=(hw, hw), bias=False))
        layers.append(dict(c_in=c_in, c_out=c_out, groups=1, kernel=(1, 1),
                           out_spatial=(hw, hw), bias=False))
    layers.append(dict(c_in=1024, c_out=1000, groups=1, kernel=(), out_spatial=(), bias=True))
    return layers


@pytest.fixture(scope="module")
def zoo() -> dict[str, list[dict]]:
    return {"resnet18": _torchvision_layers("resnet18"),
            "mobilenet_v2": _torchvision_layers("mobilenet_v2"),
            "mobilenet_v1": _mobilenet_v1_layers()}


def _fracbits_gbitops(layers: list[dict], b: int, fc_a_bits_searched: bool = True) -> float:
    """FracBits convention: first conv 8×8, last FC 8 (weights) × b (input), others b×b."""
    total = 0
    for idx, l in enumerate(layers):
        w, a = (8, 8) if idx == 0 else (8, b if fc_a_bits_searched else 8) \
            if idx == len(layers) - 1 else (b, b)
        km = kernel_macs(l["c_in"], l["groups"], l["kernel"], l["out_spatial"])
        total += layer_bitops(km, w, a, num_kernels=l["c_out"])
    return to_giga(total)


def _fracbits_size_mb(layers: list[dict], b: int) -> float:
    """Weight-only size: first and last at 8 bits, others at b, fp32 biases, MB = 1e6 bytes."""
    total = 0
    for idx, l in enumerate(layers):
        w = 8 if idx in (0, len(layers) - 1) else b
        total += layer_size_bits(kernel_params(l["c_in"], l["groups"], l["kernel"]), w,
                                 bias_count=l["c_out"] if l["bias"] else 0,
                                 num_kernels=l["c_out"])
    return bits_to_mb(total)


REFERENCE = {  # total MACs and GBitOPs at b = 2, 3, 4, 5
    "resnet18": (1_814_073_344, (14.343, 22.825, 34.698, 49.962)),
    "mobilenet_v1": (568_740_352, (2.938, 5.730, 9.636, 14.657)),
    "mobilenet_v2": (300_774_272, (1.869, 3.322, 5.353, 7.961)),
}


@pytest.mark.parametrize("model", sorted(REFERENCE))
def test_fracbits_reference_macs_and_bitops(zoo, model):
    layers = zoo[model]
    total_macs, gbitops = REFERENCE[model]
    assert sum(layer_macs(l["c_in"], l["c_out"], l["groups"], l["kernel"], l["out_spatial"])
               for l in layers) == total_macs
    for b, ref in zip((2, 3, 4, 5), gbitops):
        assert round(_fracbits_gbitops(layers, b), 3) == pytest.approx(ref, abs=1e-9), (model, b)


def test_fracbits_fc_at_8x8_differs(zoo):
    # counting the FC as 8×8 would give 22.846 / 34.714 for ResNet-18 (not the paper's).
    layers = zoo["resnet18"]
    assert round(_fracbits_gbitops(layers, 3, fc_a_bits_searched=False), 3) == 22.846
    assert round(_fracbits_gbitops(layers, 4, fc_a_bits_searched=False), 3) == 34.714


@pytest.mark.parametrize("model,ref", [("mobilenet_v1", (1.825, 2.223, 2.621)),
                                       ("mobilenet_v2", (1.832, 2.106, 2.379))])
def test_fracbits_reference_model_size(zoo, model, ref):
    for b, mb in zip((2, 3, 4), ref):
        assert round(_fracbits_size_mb(zoo[model], b), 3) == pytest.approx(mb, abs=1e-9)


# ------------------------------------------------------------------------------------------
# MACs
# ------------------------------------------------------------------------------------------

def test_macs_conv_linear_depthwise():
    assert layer_macs(64, 128, 1, (3, 3), (56, 56)) == 64 * 128 * 9 * 56 * 56
    assert layer_macs(512, 1000) == 512_000                        # linear
    assert layer_macs(32, 32, 32, (3, 3), (112, 112)) == 32 * 9 * 112 * 112  # depthwise
    assert layer_macs(64, 64, 4, (3, 3), (7, 7)) == 16 * 64 * 9 * 49        # grouped
    assert kernel_macs(64, 1, (3, 3), (56, 56)) * 128 == layer_macs(64, 128, 1, (3, 3), (56, 56))
    assert kernel_params(32, 32, (3, 3)) == 9
    with pytest.raises(NumericsError):
        layer_macs(30, 64, 4, (3, 3), (7, 7))


@HYP
@given(groups=st.sampled_from([1, 2, 3]), per_in=st.integers(1, 4), per_out=st.integers(1, 3),
       data=st.data())
def test_pruned_macs_match_explicit_count(groups, per_in, per_out, data):
    c_in, c_out = groups * per_in, groups * per_out
    in_alive = data.draw(st.lists(st.booleans(), min_size=c_in, max_size=c_in))
    out_alive = data.draw(st.lists(st.booleans(), min_size=c_out, max_size=c_out))
    kernel, spatial = (3, 1), (2, 5)
    # Explicit: a MAC exists for every alive (output, input) pair in the same group.
    explicit = sum(math.prod(kernel) * math.prod(spatial)
                   for o in range(c_out) for i in range(c_in)
                   if out_alive[o] and in_alive[i] and o // per_out == i // per_in)
    assert layer_macs_pruned(in_alive, out_alive, groups, kernel, spatial) == explicit
    per_kernel = kernel_macs_pruned(in_alive, c_out, groups, kernel, spatial)
    assert int(per_kernel[torch.tensor(out_alive)].sum()) == explicit
    if groups == 1:
        assert layer_macs_pruned(sum(in_alive), sum(out_alive), 1, kernel, spatial) == explicit


def test_pruned_macs_counts_refused_for_groups():
    with pytest.raises(NumericsError, match="masks"):
        layer_macs_pruned(3, 3, 4, (3, 3), (2, 2))


# ------------------------------------------------------------------------------------------
# BitOPs and size: integer, per-kernel and fractional (differentiable)
# ------------------------------------------------------------------------------------------

def test_bitops_integer_and_per_kernel():
    assert layer_bitops(100, 4, 8, num_kernels=3) == 100 * 3 * 4 * 8
    assert isinstance(layer_bitops(100, 4, 8, num_kernels=3), int)
    # Per-kernel bits, 0 = pruned kernel contributes nothing.
    assert layer_bitops(100, [4, 0, 2], 8) == 100 * (4 + 0 + 2) * 8
    t = layer_bitops(torch.tensor([100, 50, 10]), torch.tensor([4, 0, 2]), 8)
    assert t.dtype == torch.int64 and int(t) == (400 + 0 + 20) * 8
    with pytest.raises(NumericsError, match="num_kernels"):
        layer_bitops(100, 4, 8)
    with pytest.raises(NumericsError):
        layer_bitops(100, [4, -1], 8)
    with pytest.raises(NumericsError):
        layer_bitops([1, 2, 3], [4, 4], 8)


def test_bitops_gradient_through_fractional_bits():
    macs = torch.tensor([1000, 2000, 3000])
    lam_w = torch.tensor([2.5, 3.25, 0.0], requires_grad=True)
    lam_a = torch.tensor(3.5, requires_grad=True)
    cost = layer_bitops(macs, lam_w, lam_a)
    cost.backward()
    assert cost.item() == pytest.approx((2500 + 6500 + 0) * 3.5)
    assert lam_w.grad.tolist() == pytest.approx([1000 * 3.5, 2000 * 3.5, 3000 * 3.5])
    assert float(lam_a.grad) == pytest.approx(2500 + 6500)
    assert lam_w.grad.dtype == torch.float32  # gradient comes back in λ's dtype

    w64 = torch.rand(5, dtype=torch.float64, requires_grad=True)
    a64 = torch.rand((), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda w, a: layer_bitops(torch.arange(1, 6), w * 8, a * 8), (w64, a64))
    # Scalar λ_w on a whole layer (layer-wise search).
    lw = torch.tensor(4.5, requires_grad=True)
    layer_bitops(kernel_macs(64, 1, (3, 3), (56, 56)), lw, 4.0, num_kernels=64).backward()
    assert float(lw.grad) == pytest.approx(layer_macs(64, 64, 1, (3, 3), (56, 56)) * 4.0)


@HYP
@given(lw=st.floats(0.0, 8.0), la=st.floats(1.0, 8.0))
def test_bilinear_interpolation_identity(lw, la):
    # FracBits' code interpolates BitOPs over the integer grid (floor, floor+1) in both λ_w and
    # λ_a; because cost is bilinear that equals MACs·λ_w·λ_a, which layer_bitops computes.
    macs = 12345
    fw, fa = lw - math.floor(lw), la - math.floor(la)
    interp = sum(ww * wa * layer_bitops(macs, bw, ba, num_kernels=1)
                 for (bw, ww), (ba, wa) in itertools.product(
                     ((math.floor(lw), 1 - fw), (math.floor(lw) + 1, fw)),
                     ((math.floor(la), 1 - fa), (math.floor(la) + 1, fa))))
    assert layer_bitops(macs, torch.tensor(lw, dtype=torch.float64),
                        torch.tensor(la, dtype=torch.float64), num_kernels=1).item() == \
        pytest.approx(interp, rel=1e-9, abs=1e-6)


def test_size_bits_and_units():
    # conv 64→128 3×3, 4-bit weights, no bias; FC 512→1000, 8-bit, fp32 bias.
    assert layer_size_bits(kernel_params(64, 1, (3, 3)), 4, num_kernels=128) == 64 * 9 * 128 * 4
    fc = layer_size_bits(512, 8, bias_count=1000, num_kernels=1000)
    assert fc == 512 * 1000 * 8 + 1000 * 32
    assert bits_to_bytes(fc) == 512_000 + 4000
    assert bits_to_mb(fc) == pytest.approx(0.516)
    assert layer_size_bits(10, [8, 0, 4], bias_count=2, bias_bits=16) == 10 * 12 + 32
    lam = torch.tensor([2.5, 3.0], requires_grad=True)
    layer_size_bits(torch.tensor([9, 18]), lam, bias_count=2).backward()
    assert lam.grad.tolist() == [9.0, 18.0]


# ------------------------------------------------------------------------------------------
# Accumulator width
# ------------------------------------------------------------------------------------------

def _fits(value: int, width: int) -> bool:
    return -(1 << (width - 1)) <= value <= (1 << (width - 1)) - 1


def test_acc_width_reference_example():
    # K = 3·3·512, W8 signed, A8 unsigned → 29 bits; Distiller's rule agrees here.
    assert int(acc_bits_worst_case(8, 8, 4608)) == 29
    assert acc_bits_distiller(8, 8, 4608) == 29
    lo, hi = acc_range_worst_case(8, 8, 4608)
    assert (int(lo), int(hi)) == (-4608 * 128 * 255, 4608 * 127 * 255)


def test_signed_width_exact():
    assert signed_width(-1, 0).item() == 1
    assert signed_width(0, 1).item() == 2
    assert signed_width(-128, 127).item() == 8
    assert signed_width(-129, 0).item() == 9
    assert signed_width(0, 128).item() == 9
    big = 1 << 40
    assert signed_width(-big, big - 1).item() == 41
    assert signed_width(-big - 1, 0).item() == 42
    for lo in range(-40, 1):
        for hi in range(0, 40):
            brute = next(p for p in range(1, 10) if _fits(lo, p) and _fits(hi, p))
            assert signed_width(lo, hi).item() == brute


def test_acc_width_per_kernel_vector_matches_scalar():
    bits = torch.tensor([0, 1, 2, 4, 8])
    zps = torch.tensor([0, 0, 1, -3, 5])
    vec = acc_bits_worst_case(bits, 6, 300, w_zero_point=zps, a_zero_point=7)
    for b, z, p in zip(bits.tolist(), zps.tolist(), vec.tolist()):
        assert int(acc_bits_worst_case(b, 6, 300, w_zero_point=z, a_zero_point=7)) == p
    assert vec[0].item() == 1  # pruned kernel: constant 0 accumulator
    # Distiller's rule is one bit short for unsigned × unsigned into a signed accumulator.
    assert int(acc_bits_worst_case(2, 2, 1, w_signed=False)) == 5 > acc_bits_distiller(2, 2, 1)


@st.composite
def _quant_setup(draw):
    w_bits, a_bits = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    w_signed, a_signed = draw(st.booleans()), draw(st.booleans())
    w_lo, w_hi = (int(x) for x in int_range(w_bits, w_signed))
    a_lo, a_hi = (int(x) for x in int_range(a_bits, a_signed))
    z_w = draw(st.integers(w_lo, w_hi)) if draw(st.booleans()) else 0
    z_a = draw(st.integers(a_lo, a_hi)) if draw(st.booleans()) else 0
    fan_in = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(w_bits=w_bits, a_bits=a_bits, w_signed=w_signed, a_signed=a_signed,
                w_range=(w_lo, w_hi), a_range=(a_lo, a_hi), z_w=z_w, z_a=z_a, fan_in=fan_in,
                seed=seed)


@HYP
@given(s=_quant_setup())
def test_acc_width_soundness_and_data_aware_bound(s):
    rng = np.random.default_rng(s["seed"])
    (w_lo, w_hi), (a_lo, a_hi), k = s["w_range"], s["a_range"], s["fan_in"]
    c_out = 6
    w = torch.from_numpy(rng.integers(w_lo, w_hi + 1, size=(c_out, k)))
    bias = torch.from_numpy(rng.integers(-50, 51, size=c_out))
    worst = acc_bits_worst_case(s["w_bits"], s["a_bits"], k, s["w_signed"], s["a_signed"],
                                s["z_w"], s["z_a"], bias_abs_max=50)
    data = acc_bits_data(w, a_lo, a_hi, s["z_a"], int_bias=bias, w_zero_point=s["z_w"])
    lo, hi = acc_range_data(w, a_lo, a_hi, s["z_a"], int_bias=bias, w_zero_point=s["z_w"])
    assert data.shape == (c_out,) and bool((data <= worst).all())

    v = w - s["z_w"]
    # Random activations (and the all-min / all-max corners) always fit, and lie in [lo, hi].
    acts = [rng.integers(a_lo, a_hi + 1, size=k) for _ in range(20)] + \
        [np.full(k, a_lo), np.full(k, a_hi)]
    for x in acts:
        acc = (v * (torch.from_numpy(x) - s["z_a"])).sum(dim=1) + bias
        assert bool(((acc >= lo) & (acc <= hi)).all())
        for j in range(c_out):
            assert _fits(int(acc[j]), int(data[j])) and _fits(int(acc[j]), int(worst))
    # Tightness: the bounds are attained, so no narrower width would do.
    x_max = torch.where(v > 0, a_hi, a_lo) - s["z_a"]
    x_min = torch.where(v > 0, a_lo, a_hi) - s["z_a"]
    assert torch.equal((v * x_max).sum(dim=1) + bias, hi)
    assert torch.equal((v * x_min).sum(dim=1) + bias, lo)
    for j in range(c_out):
        p = int(data[j])
        assert p == 1 or not (_fits(int(lo[j]), p - 1) and _fits(int(hi[j]), p - 1))

    # The worst case is attained too: every weight and activation at the extreme corner.
    wlo, whi = acc_range_worst_case(s["w_bits"], s["a_bits"], k, s["w_signed"], s["a_signed"],
                                    s["z_w"], s["z_a"])
    corners = [(wc - s["z_w"]) * (ac - s["z_a"]) * k for wc in (w_lo, w_hi) for ac in (a_lo, a_hi)]
    assert (int(wlo), int(whi)) == (min(corners), max(corners))
    if s["z_w"] == 0 and s["z_a"] == 0 and (s["w_signed"] or s["a_signed"]):
        assert int(acc_bits_worst_case(s["w_bits"], s["a_bits"], k, s["w_signed"],
                                       s["a_signed"])) <= \
            acc_bits_distiller(s["w_bits"], s["a_bits"], k)


def test_acc_data_conv_weight_and_pruned_channel():
    w = torch.zeros(3, 2, 3, 3, dtype=torch.int64)
    w[0] = 8                     # S+ = 144 → max 144·255 = 36720 → 17 bits
    w[1, 0] = -8                 # S- = 72  → min −72·255 = −18360 → 16 bits
    # w[2] all zero: a pruned kernel, accumulator is exactly 0 → 1 bit
    bits = acc_bits_data(w, 0, 255)
    assert bits.tolist() == [17, 16, 1]
    assert acc_bits_data(w, 0, 255, int_bias=[0, 0, 1000]).tolist() == [17, 16, 11]
    with pytest.raises(NumericsError):
        acc_bits_data(w, 0, 255, int_bias=[1, 2])
    with pytest.raises(NumericsError):
        acc_bits_worst_case(40, 8, 10)
